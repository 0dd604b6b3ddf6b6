"""transformers' private internals that omnilab relies on are all still there, with the parameters it passes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from omnilab import hf_private

OMNILAB = Path(hf_private.__file__).resolve().parent


@pytest.mark.parametrize("required", hf_private.REQUIRED, ids=[r[0] for r in hf_private.REQUIRED])
def test_private_function_still_fits(required):
    problem = hf_private.check(*required)
    assert problem is None, problem


def test_check_names_a_function_that_changed():
    class Changed:
        def _prefill(self, input_ids):  # lost generation_config, model_kwargs, is_first_iteration
            pass

    problem = hf_private.check("X._prefill", Changed, "_prefill", ("input_ids", "generation_config"))
    assert problem is not None and "X._prefill" in problem and "generation_config" in problem
    assert "no longer has X._gone" in hf_private.check("X._gone", Changed, "_gone", ())


def _private_uses(path: Path) -> list[str]:
    """`obj._name(...)` calls on objects other than self/cls, and private transformers imports, in `path`."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            if any(part.startswith("_") for part in node.module.split(".")) or node.module.endswith(
                "modeling_utils"
            ):
                found.append(f"from {node.module} import ...")
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr.startswith("_omnilab") or node.attr in ("_tracers", "_prepare", "_generate"):
                continue  # omnilab's own state on objects it made
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


@pytest.mark.parametrize("module", ["streaming", "instrument", "models", "lab.py", "bench"])
def test_no_private_transformers_internals_outside_hf_private(module):
    root = OMNILAB / module
    paths = [root] if root.is_file() else sorted(root.rglob("*.py"))
    uses = {str(p.relative_to(OMNILAB)): _private_uses(p) for p in paths}
    uses = {k: v for k, v in uses.items() if v}
    assert not uses, f"private internals outside omnilab/hf_private.py: {uses}"
