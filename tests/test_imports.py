"""The package's import structure: every module imports on its own, no import cycle at any level, no gradio.

The cycle test reads every import, a function's too: a function-level import that closes a circle
does not fail at import time, but it is the same knot in the layering (the module below reaches
back up), and it fails the day someone hoists the import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "omnilab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _module_level(body):
    """Statements run at import time (into if/try blocks, but not `if TYPE_CHECKING:`)."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                yield from _module_level(node.orelse)
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)
        else:
            yield node


def imports_of(name: str, path: Path, *, module_level: bool = False, source: str | None = None) -> set[str]:
    """The omnilab modules `name` imports (anywhere, or at module level only), with the packages
    whose `__init__` such an import runs (`omnilab.streaming` for `omnilab.streaming.steps`) when
    `name` is outside them; the root package is left out (it loads before any of its modules)."""
    tree = ast.parse(source if source is not None else path.read_text())
    nodes = _module_level(tree.body) if module_level else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found |= submodules
            if len(submodules) < len(node.names):  # some names come from `target` itself
                found.add(target)
    with_packages = set()
    for module in found:
        parts = module.split(".")
        for end in range(2, len(parts) + 1):
            package = ".".join(parts[:end])
            if package != module and name.startswith(package + "."):
                continue  # a module of the package: its __init__ is already running
            with_packages.add(package)
    return {m for m in with_packages if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_reads_function_level_imports_and_the_packages_they_run():
    source = "def run():\n    from ..streaming.steps import Decoder\n"
    found = imports_of("omnilab.store.batch", MODULES["omnilab.store.batch"], source=source)
    assert found == {"omnilab.streaming", "omnilab.streaming.steps"}
    assert (
        imports_of("omnilab.store.batch", MODULES["omnilab.store.batch"], source=source, module_level=True)
        == set()
    )
    inside = imports_of("omnilab.streaming.pipeline", MODULES["omnilab.streaming.pipeline"], source=source)
    assert inside == {"omnilab.streaming.steps"}  # its own package's __init__ is already running


def test_no_import_cycle_at_any_level():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    assert "omnilab.lab" in graph["omnilab"]  # the graph sees relative imports
    assert "omnilab.instrument.tracer" in graph["omnilab.lab"]  # and function-level ones
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_gradio_or_the_app():
    """Invariant 1: no import of gradio or apps, nor runpy (which would load the app into the library)."""
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            roots = {n.split(".")[0] for n in names}
            assert not roots & {"gradio", "apps", "runpy"}, (
                f"{name} imports {sorted(roots & {'gradio', 'apps', 'runpy'})}"
            )


def test_omnilab_demo_becomes_python_m_apps_demo_without_importing_the_app(monkeypatch):
    from omnilab import cli

    calls = []

    def execve(path, argv, env):  # what the process would become
        calls.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execve", execve)
    before = set(sys.modules)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "tiny", "--port", "7999"])
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv[1:3] == ["-m", "apps.demo"]
    assert argv[argv.index("--model") + 1] == "tiny" and argv[argv.index("--port") + 1] == "7999"
    assert str(ROOT.parent) in env["PYTHONPATH"].split(os.pathsep)
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] == "apps"}


_IMPORT_EACH = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "omnilab" or m.startswith("omnilab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"failed": failed, "gradio": "gradio" in sys.modules}))
"""


@pytest.mark.timeout(300)
def test_every_module_imports_on_its_own():
    """Each module imported first, with no omnilab module loaded before it (one fresh process)."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(sorted(MODULES))],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert not report["gradio"], "importing omnilab loaded gradio"


# -- the other invariants of ARCHITECTURE.md ---------------------------------------------------------
HOOKING = {  # invariant 4: the modules that install hooks besides the Recorders (instrument/record/)
    "omnilab.generation",
    "omnilab.instrument.context",
    "omnilab.instrument.interventions",
    "omnilab.instrument.edits",
    "omnilab.instrument.patch",
    "omnilab.instrument.embeds",
    "omnilab.instrument.grad",
    "omnilab.instrument.codec",
    "omnilab.analysis.lens",
    "omnilab.organism.talker",
    "omnilab.bench.activations",
}
RUN_THE_MODEL = {  # invariant 5: analyses that take a lab and run it
    "omnilab.analysis.attribution.attribute",
    "omnilab.analysis.attribution_patching.attribution_patching",
    "omnilab.analysis.lens.logit_lens",
    "omnilab.analysis.lens.talker_lens",
    "omnilab.analysis.patching.patching_sweep",
    "omnilab.analysis.sae.token_activations",
    "omnilab.analysis.speech.residual_audio",
    "omnilab.analysis.speech.residual_series",
}
READ_THE_CONFIG = {  # ... and those that take a lab for its config only
    "omnilab.analysis.lens.token_modalities",
    "omnilab.analysis.patching.position_groups",
    "omnilab.analysis.patching.sweep_memory_per_row",
}
TOKEN_ID_LITERALS = {  # invariant 6: where token ids may be written as numbers, and why (see there)
    "omnilab.models.processor",  # builds the tokenizer: Qwen's special tokens from 151643 on
    "omnilab.organism.train",  # the organism is the tiny preset with Qwen's tokenizer
    "omnilab.bench.store",  # synthetic store rows
    "omnilab.bench.analysis",  # synthetic trace rows
}


def test_only_the_named_modules_install_hooks():
    hooking = set()
    for name, path in MODULES.items():
        if name.startswith("omnilab.instrument.record"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("register_") and "hook" in node.attr:
                hooking.add(name)
    assert hooking - HOOKING == set(), (
        "hooks outside the Recorders; add the module to invariant 4 and HOOKING"
    )
    assert HOOKING - hooking == set(), "no longer hooks: take it out of invariant 4 and HOOKING"


def test_only_the_named_analyses_take_a_lab():
    taking = set()
    for name, path in MODULES.items():
        if not name.startswith("omnilab.analysis"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.args.args:
                if node.args.args[0].arg in ("lab", "model"):
                    taking.add(f"{name}.{node.name}")
    assert taking == RUN_THE_MODEL | READ_THE_CONFIG, "update invariant 5 and RUN_THE_MODEL / READ_THE_CONFIG"


def test_token_ids_are_not_literals():
    """Invariant 6: Qwen's special-token ids (151643-151700) appear as numbers only where ARCHITECTURE.md says."""
    found = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is int and 151643 <= node.value <= 151700:
                found.add(name)
    assert found <= TOKEN_ID_LITERALS, f"token ids written as numbers in {sorted(found - TOKEN_ID_LITERALS)}"


def test_files_over_500_lines_say_why_they_are_one_file():
    """Invariant 8: a module over ~500 lines says in its docstring's first lines why it is one file."""
    long = []
    for path in sorted([*ROOT.rglob("*.py"), *(ROOT.parent / "apps").rglob("*.py")]):
        lines = path.read_text().splitlines()
        if len(lines) > 520 and "one file" not in "\n".join(lines[:6]).lower():
            long.append(f"{path.relative_to(ROOT.parent)} ({len(lines)} lines)")
    assert not long, f"over 500 lines without saying why in the first lines: {long}"
