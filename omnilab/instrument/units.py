"""Heads and experts as sites: the per-head attention output and one expert's output.

    attn.3.z            the thinker's layer-3 attention, per head, before o_proj: [rows, heads, head_dim]
    attn.3.z.5          head 5 of it: [rows, head_dim]
    expert.1.7          expert 7 of the thinker's layer-1 MoE, for the tokens routed to it: [routed, hidden]
    talker.attn.0.z, talker.expert.0.3                                    the talker's, likewise

These are parts of modules, not modules, so the registry of `sites.py` does not list them; they are
named here and reached through `lab.intervene(set=, add=, edit=)` (omnilab.instrument.edits) and read
with `capture`:

- a head's output is the slice of `o_proj`'s input that belongs to it (the attention output reshaped
  [rows, heads * head_dim] in head order, as transformers' attention does before `o_proj`); a
  pre-hook on `o_proj` changes it, so a zeroed head contributes exactly nothing to the projection.
- an expert's output is `down_proj(act(gate) * up)` of the tokens routed to it, before the router's
  weight (the fused experts hold every expert in 3-D parameters; `expert_output` computes one, the
  eager way). Changing it: a pre-hook on the fused `mlp.experts` gives the expert weight 0 for the
  changed rows (its term vanishes from the weighted sum exactly, whatever the experts
  implementation), and a forward hook adds weight x the new output back. Routing is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InterventionError
from .sites import find_sites

_HEADS = re.compile(r"^(?P<talker>talker\.)?attn\.(?P<layer>\d+)\.z(?:\.(?P<index>\d+))?$")
_EXPERT = re.compile(r"^(?P<talker>talker\.)?expert\.(?P<layer>\d+)\.(?P<index>\d+)$")


@dataclass(frozen=True)
class Unit:
    """A head site ("heads": all heads or one) or an expert site ("expert") of one layer."""

    alias: str
    kind: str  # "heads" | "expert"
    component: str  # thinker | talker
    layer: int
    index: int | None  # the head (None: every head) or the expert
    module: torch.nn.Module  # o_proj (heads) or the fused experts (expert)
    heads: int = 0
    head_dim: int = 0
    width: int = 0  # the hidden size

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one row of the unit's values."""
        if self.kind == "expert":
            return (self.width,)
        return (self.head_dim,) if self.index is not None else (self.heads, self.head_dim)


def is_unit(name) -> bool:
    """Whether `name` names a head or expert site (attn.L.z[.H], expert.L.E, with talker. in front)."""
    return isinstance(name, str) and bool(_HEADS.match(name) or _EXPERT.match(name))


def resolve_unit(model, name: str) -> Unit:
    """The Unit `name` names, checked against the model (layer, head and expert in range)."""
    match = _HEADS.match(name) or _EXPERT.match(name)
    if match is None:
        raise InterventionError(
            f"{name!r} is not a head or expert site; heads are attn.L.z (all) or attn.L.z.H, experts "
            "expert.L.E (talker. in front for the talker's)"
        )
    component = "talker" if match["talker"] else "thinker"
    layer, index = int(match["layer"]), match["index"]
    kind = "heads" if match.re is _HEADS else "expert"
    wanted = "attention" if kind == "heads" else "mlp"
    owners = {s.layer: s.module for s in find_sites(model) if s.kind == wanted and s.component == component}
    if layer not in owners:
        have = f"layers {min(owners)}..{max(owners)}" if owners else "none"
        raise InterventionError(f"{name}: the {component} has no layer {layer} ({have})")
    owner = owners[layer]
    if kind == "heads":
        config = owner.config
        heads = int(config.num_attention_heads)
        head_dim = int(owner.head_dim)
        if index is not None and not 0 <= int(index) < heads:
            raise InterventionError(
                f"{name}: head {index} is out of range ({component} layer {layer} has heads 0..{heads - 1})"
            )
        return Unit(
            name, kind, component, layer, None if index is None else int(index), owner.o_proj,
            heads, head_dim, int(config.hidden_size),
        )  # fmt: skip
    experts = getattr(owner, "experts", None)
    if experts is None:
        raise InterventionError(f"{name}: the {component}'s layer {layer} MLP is dense (no experts)")
    if not 0 <= int(index) < experts.num_experts:
        raise InterventionError(
            f"{name}: expert {index} is out of range ({component} layer {layer} has experts "
            f"0..{experts.num_experts - 1})"
        )
    return Unit(name, kind, component, layer, int(index), experts, width=int(experts.hidden_dim))


def expert_output(experts: torch.nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert `expert`'s output for rows `hidden` [n, hidden_dim], before the router weight:
    down_proj(act(gate) * up), computed as transformers' eager experts loop does."""
    gate, up = torch.nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])


def head_ablation(lab, heads: dict, *, means: dict | None = None, component: str = "thinker") -> dict:
    """A `set=` spec that ablates `heads` ({layer: [head, ...]}): zeros, or each head's mean output
    from `means` ({"attn.L.z": [heads, head_dim]}, e.g. from `unit_means`)."""
    stem = "talker." if component == "talker" else ""
    spec = {}
    for layer, chosen in heads.items():
        for head in [chosen] if isinstance(chosen, int) else chosen:
            unit = resolve_unit(lab.model, f"{stem}attn.{int(layer)}.z.{int(head)}")
            if means is None:
                spec[unit.alias] = torch.zeros(unit.head_dim)
            else:
                mean = means.get(f"{stem}attn.{int(layer)}.z")
                if mean is None:
                    raise InterventionError(f"means has no {stem}attn.{layer}.z; compute it with unit_means")
                spec[unit.alias] = mean[int(head)]
    return spec


def expert_ablation(lab, experts: dict, *, means: dict | None = None, component: str = "thinker") -> dict:
    """A `set=` spec that ablates `experts` ({layer: [expert, ...]}) at their routed tokens: their
    output zeroed, or set to its mean from `means` ({"expert.L.E": [hidden]}); routing is unchanged."""
    stem = "talker." if component == "talker" else ""
    spec = {}
    for layer, chosen in experts.items():
        for expert in [chosen] if isinstance(chosen, int) else chosen:
            unit = resolve_unit(lab.model, f"{stem}expert.{int(layer)}.{int(expert)}")
            if means is None:
                spec[unit.alias] = torch.zeros(unit.width)
            elif unit.alias not in means:
                raise InterventionError(f"means has no {unit.alias}; compute it with unit_means")
            else:
                spec[unit.alias] = means[unit.alias]
    return spec


def capture(lab, conversation, names, **forward) -> dict:
    """name -> Activations of the head/expert (or any editable) sites `names` over one `lab.forward`
    of `conversation`: values [rows, ...] as the model computed them, and their rows (component,
    phase, step, pos, modality; experts add rank and weight)."""
    from ..activations import Activations

    names = [names] if isinstance(names, str) else list(names)
    seen: dict[str, list] = {name: [] for name in names}

    def keep(name):
        def fn(values, rows):
            seen[name].append((values.detach().clone(), rows))
            return values

        return fn

    reading = lab.intervene(edit={name: keep(name) for name in names})
    reading.edits.prepend = False  # after any open intervention's changes: what the model used
    with reading:
        lab.forward(conversation, **forward)
    import pandas as pd

    out = {}
    for name, parts in seen.items():
        if not parts:
            continue
        values = torch.cat([v for v, _ in parts])
        rows = pd.concat([r for _, r in parts], ignore_index=True)
        out[name] = Activations(name, name, rows, values)
    return out


def unit_means(lab, conversations, names, **forward) -> dict:
    """name -> the mean of the site's values over every row of `conversations` (one forward each):
    the reference of a mean ablation (`head_ablation(means=)`, `expert_ablation(means=)`)."""
    sums: dict = {}
    counts: dict = {}
    for conversation in conversations:
        for name, acts in capture(lab, conversation, names, **forward).items():
            values = acts.values.double()
            sums[name] = sums.get(name, 0) + values.sum(0)
            counts[name] = counts.get(name, 0) + values.shape[0]
    missing = [n for n in ([names] if isinstance(names, str) else names) if n not in sums]
    if missing:
        raise InterventionError(f"unit_means: no rows reached {missing} (an expert no token was routed to?)")
    dtype = next(lab.model.parameters()).dtype
    return {name: (sums[name] / counts[name]).to(dtype) for name in sums}
