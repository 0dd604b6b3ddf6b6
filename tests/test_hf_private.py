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


def test_optional_private_functions_still_fit():
    pytest.importorskip("captum")
    for required in hf_private.optional_required():
        problem = hf_private.check(*required)
        assert problem is None, problem


def _own_private_names() -> set[str]:
    """Private names omnilab defines itself outside hf_private.py (its classes' and modules' functions,
    attributes it sets, `_omnilab*` state it leaves on models): `lab._prepare`, `lab._tracers`,
    `intervention._tracker` are omnilab's. A name transformers' model, config or generation classes
    carry is never counted as omnilab's, even where omnilab sets it."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

    names = set()
    for path in OMNILAB.rglob("*.py"):
        if path.name == "hf_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "getattr"):
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    names.add(str(node.args[1].value))
    library = (GenerationMixin, PretrainedConfig, PreTrainedModel)
    return {
        n
        for n in names
        if n.startswith("_") and not n.startswith("__") and not any(hasattr(c, n) for c in library)
    }


OWN = _own_private_names()


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
            if node.attr in OWN or node.attr.startswith("_omnilab"):
                continue  # omnilab's own state on objects it made
            found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


PARTS = sorted(
    p.name
    for p in OMNILAB.iterdir()
    if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.name != "hf_private.py")
)


def test_the_scan_covers_every_part_of_the_package_and_sees_a_private_call(tmp_path):
    assert {"analysis", "store", "organism", "widgets", "plots", "lab.py", "cli.py"} <= set(PARTS)
    probe = tmp_path / "probe.py"
    probe.write_text("def f(ig):\n    return ig._attribute(inputs=1)\n")
    assert _private_uses(probe) == ["ig._attribute (line 2)"]
    # what omnilab counts as its own never covers a library's private it calls through hf_private
    assert {"_attribute", "_prefill", "_attn_implementation", "_get_talker_user_parts"}.isdisjoint(OWN)


@pytest.mark.parametrize("module", PARTS)
def test_no_private_transformers_internals_outside_hf_private(module):
    root = OMNILAB / module
    paths = [root] if root.is_file() else sorted(root.rglob("*.py"))
    uses = {str(p.relative_to(OMNILAB)): _private_uses(p) for p in paths}
    uses = {k: v for k, v in uses.items() if v}
    assert not uses, f"private internals outside omnilab/hf_private.py: {uses}"


def test_rotary_still_turns_queries_and_keys_as_rope_does():
    """hf_private.rotary is called positionally; transformers 5.25 hides its names behind a wrapper,
    so its behaviour is pinned instead: x * cos + rotate_half(x) * sin on both queries and keys."""
    import torch

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 5, 8, generator=generator), torch.randn(1, 2, 5, 8, generator=generator)
    angles = torch.randn(1, 5, 8, generator=generator)
    cos, sin = angles.cos(), angles.sin()

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    turned_query, turned_key = hf_private.rotary(query, key, cos, sin)
    expected_query = query * cos[:, None] + rotate_half(query) * sin[:, None]
    expected_key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    torch.testing.assert_close(turned_query, expected_query)
    torch.testing.assert_close(turned_key, expected_key)


def test_check_passes_a_wrapper_that_takes_anything_to_the_behaviour_tests():
    class Wrapped:
        @staticmethod
        def wrapped(*args, **kwargs):
            pass

    assert hf_private.check("X.wrapped", Wrapped, "wrapped", ("q", "k")) is None
