"""Specification of the lock and its drift check (scripts/check_env.py, `make check-env`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
CHECK = ROOT / "scripts" / "check_env.py"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def _check(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(lock)], capture_output=True, text=True, timeout=60)


def test_the_running_environment_is_the_lock():
    result = _check(LOCK)
    assert result.returncode == 0, result.stderr


def test_every_requirement_of_pyproject_is_pinned_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "all":  # `all` only names the other extras
            wanted += requirements
    pins = _pins()
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower() for r in wanted}
    assert names - set(pins) == set()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # what pip finds on local disk


def test_a_changed_pin_is_named_in_one_line(tmp_path):
    pins = _pins()
    changed = LOCK.read_text().replace(f"tqdm=={pins['tqdm']}\n", "tqdm==0.0.1\n")
    changed = changed.replace(f"duckdb=={pins['duckdb']}\n", "")
    lock = tmp_path / "requirements.lock"
    lock.write_text(changed + "not-a-real-package==1.0\n")
    result = _check(lock)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"tqdm {pins['tqdm']} (lock: 0.0.1)" in lines[0]
    assert f"duckdb {pins['duckdb']} is not in the lock" in lines[0]
    assert "not-a-real-package is missing (lock: 1.0)" in lines[0]


def test_a_lock_line_it_cannot_read_is_refused_by_name(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("omnilab @ file:///somewhere\n")
    result = _check(lock)
    assert result.returncode != 0
    assert "omnilab @ file:///somewhere" in (result.stderr + result.stdout)
