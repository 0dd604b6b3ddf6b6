"""Set (patch) or add (steer) a tensor at the output of named sites, inside `lab.intervene`.

    with lab.intervene(set={"resid.2": clean[2]}): ...                 # run B with run A's layer-2 residual
    with lab.intervene(add={"resid.2": 4.0 * v}, modality="audio"): ...  # steer every audio token
    with lab.intervene(set={"attn.1": x}, at=[5, 6, 7]): ...             # only prompt positions 5-7

A value is a vector [width] (the same row everywhere it applies) or rows [n, width] (a leading batch
dimension of 1 is dropped): n = len(at) rows in the order of `at`, or, without `at`, one row per
prompt position (n must equal the prompt's length). Where it applies:
- `at` (positions in the component's own sequence, negative from the prompt's end) must lie in the
  prompt; without `at` a vector applies at every position, prompt and every generated token alike
  (a steering vector steers the whole reply), and rows apply to the prompt's positions only.
- `modality` (of Intervention) further limits it to that modality's tokens.
Sites are thinker or talker residual, attention or MLP sites (aliases or module paths, globs
included: resolve_sites). The hooks run before any recording hook, so a trace records the patched
values, and the patched output is a new tensor (the model's own is never written in place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InterventionError
from .sites import Site, component_module, resolve_sites

PATCHABLE_KINDS = ("residual", "attention", "mlp")
PATCHABLE_COMPONENTS = ("thinker", "talker")


@dataclass(frozen=True)
class SitePatch:
    """One change at one site: `mode` "set" or "add", `value` [width] or [rows, width]."""

    site: Site
    mode: str
    value: torch.Tensor


def site_width(model: torch.nn.Module, site: Site) -> int:
    """The width (hidden size) of the tensor a residual, attention or MLP site outputs."""
    config = component_module(model, site.component).config
    return int(getattr(config, "text_config", config).hidden_size)


def check_positions(at) -> list[int] | None:
    """`at` as a list of ints (negative ones count from the prompt's end), or None for everywhere."""
    if at is None:
        return None
    values = [at] if isinstance(at, int) else list(at) if isinstance(at, (list, tuple, range)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InterventionError(f"at= takes a position or a list of positions (ints); got {at!r}")
    if not values:
        raise InterventionError("at= is empty; give at least one prompt position, or leave it out")
    return [int(v) for v in values]


def build_patches(
    model, spec_set: dict | None, spec_add: dict | None, at: list[int] | None
) -> list[SitePatch]:
    """The SitePatch of every site that `set` and `add` name, their shapes checked against the model."""
    patches = []
    for mode, spec in (("set", spec_set), ("add", spec_add)):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise InterventionError(f"{mode} is {{site: tensor}}; got {type(spec).__name__}")
        for pattern, value in spec.items():
            for site in resolve_sites(model, pattern):
                if site.kind not in PATCHABLE_KINDS or site.component not in PATCHABLE_COMPONENTS:
                    raise InterventionError(
                        f"{mode}: {site.alias} is a {site.component} {site.kind} site; set/add work at "
                        "thinker and talker residual, attention and MLP sites (resid.L, attn.L, mlp.L, "
                        "talker.resid.L ...); routers take ablate=/force="
                    )
                patches.append(SitePatch(site, mode, _check_value(model, site, mode, pattern, value, at)))
    return patches


def _check_value(model, site: Site, mode: str, pattern: str, value, at) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InterventionError(
                f"{mode}[{pattern!r}] is not a tensor ({type(value).__name__})"
            ) from error
    width = site_width(model, site)
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim not in (1, 2) or value.shape[-1] != width:
        raise InterventionError(
            f"{mode}[{pattern!r}] has shape {tuple(value.shape)}; {site.alias} ({site.name}) has width "
            f"{width}: give a vector [{width}] or rows [positions, {width}]"
        )
    if value.ndim == 2 and at is not None and value.shape[0] != len(at):
        raise InterventionError(
            f"{mode}[{pattern!r}] has {value.shape[0]} rows but at= names {len(at)} positions: give "
            f"[{len(at)}, {width}] (one row per position of at=) or a vector [{width}]"
        )
    return value.detach()


def resolve_prompt_positions(at: list[int], length: int, component: str) -> list[int]:
    """`at` within a prompt of `length` positions (negative from its end); refuses positions outside it."""
    outside = [p for p in at if not -length <= p < length]
    if outside:
        raise InterventionError(
            f"at= positions {outside} are outside the {component}'s prompt (positions 0-{length - 1}, "
            f"or -{length}..-1 from its end); generated positions cannot be named in at="
        )
    return [p % length for p in at]


def apply_patch(
    patch: SitePatch,
    hidden: torch.Tensor,
    start: int,
    at: list[int] | None,
    modality_rows: torch.Tensor | None,
) -> torch.Tensor:
    """`hidden` [B, S, W] (rows at positions start .. start+S-1) with `patch` applied: a new tensor."""
    seq = hidden.shape[1]
    value = patch.value.to(hidden.device, hidden.dtype)
    if at is not None:
        positions = torch.as_tensor(at, dtype=torch.long)
        source = torch.arange(len(at))
    elif value.ndim == 2:
        if start == 0 and value.shape[0] != seq:
            raise InterventionError(
                f"{patch.mode}[{patch.site.alias!r}] has {value.shape[0]} rows; the prompt has {seq} "
                f"positions: give [{seq}, {value.shape[1]}], a vector, or at= with {value.shape[0]} positions"
            )
        positions = torch.arange(min(value.shape[0], start + seq))
        source = positions
    else:
        positions, source = None, None
    if positions is None:
        rows = torch.ones(seq, dtype=torch.bool)
        index = None
    else:
        inside = (positions >= start) & (positions < start + seq)
        rows = torch.zeros(seq, dtype=torch.bool)
        rows[positions[inside] - start] = True
        index = torch.full((seq,), -1, dtype=torch.long)
        index[positions[inside] - start] = source[inside]
    if modality_rows is not None:
        rows &= modality_rows.cpu()
    if not bool(rows.any()):
        return hidden
    out = hidden.clone()
    where = rows.nonzero().reshape(-1).to(hidden.device)
    if value.ndim == 1:
        new = value.expand(len(where), -1)
    else:
        new = value[index[rows].to(hidden.device)]
    if patch.mode == "set":
        out[:, where] = new
    else:
        out[:, where] = hidden[:, where] + new
    return out
