"""Name every installed package that differs from the lock, in one line, and exit 1 if any does.

Usage: python scripts/check_env.py [requirements.lock]

Reads the lock's `name==version` pins and this interpreter's installed distributions (the standard
library only, so it runs before anything else is trusted). A package differs when its version is not
the pinned one, when a pinned package is missing, or when it is installed but not in the lock. omnilab
itself (installed editable from this checkout) is not in the lock and is not checked.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

UNLOCKED = {"omnilab"}


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of -, _ and . become one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if match is None:
            raise SystemExit(
                f"check-env: cannot read the lock line {line!r} in {path}: expected name==version"
            )
        pins[normalise(match.group(1))] = match.group(3)
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[normalise(name)] = dist.version
    return found


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One phrase per package that differs from the lock, sorted by name."""
    out = []
    for name in sorted(set(pins) | set(have)):
        if name in UNLOCKED:
            continue
        want, got = pins.get(name), have.get(name)
        if want is None:
            out.append(f"{name} {got} is not in the lock")
        elif got is None:
            out.append(f"{name} is missing (lock: {want})")
        elif got != want:
            out.append(f"{name} {got} (lock: {want})")
    return out


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else "requirements.lock")
    if not lock.is_file():
        print(f"check-env: no lock at {lock}; run `make lock` to make one", file=sys.stderr)
        return 2
    differs = drift(read_lock(lock), installed())
    if differs:
        print(
            f"check-env: {len(differs)} package(s) differ from {lock}: "
            + "; ".join(differs)
            + ". Run `make install` to reinstall from the lock, or `make lock` to upgrade it.",
            file=sys.stderr,
        )
        return 1
    print(f"check-env: the environment matches {lock} ({sum(1 for n in read_lock(lock))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
