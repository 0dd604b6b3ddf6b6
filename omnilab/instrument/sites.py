"""The registry of hook sites, named after the transformers module paths.

A site is a module of the model that omnilab knows how to record at. Sites are found from the
model's own modules, so the same code finds 4 thinker routers on `tiny` and 48 on the real
checkpoint (built on the meta device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch

# (kind, pattern on the module path, what it records)
_PATTERNS = [
    (
        "router",
        r"^thinker\.model\.language_model\.layers\.(\d+)\.mlp\.gate$",
        "top-k experts and weights, router logits",
    ),
    ("router", r"^talker\.model\.layers\.(\d+)\.mlp\.gate$", "top-k experts and weights, router logits"),
    ("rotary", r"^thinker\.model\.language_model\.rotary_emb$", "the (t, h, w) position ids the model uses"),
    ("rotary", r"^talker\.model\.rotary_emb$", "the (t, h, w) position ids the model uses"),
    ("attention", r"^thinker\.model\.language_model\.layers\.(\d+)\.self_attn$", "attention maps (eager)"),
    ("attention", r"^talker\.model\.layers\.(\d+)\.self_attn$", "attention maps (eager)"),
    (
        "attention",
        r"^thinker\.model\.audio_tower\.layers\.(\d+)\.self_attn$",
        "attention maps (recording function)",
    ),
    ("attention", r"^thinker\.model\.visual\.blocks\.(\d+)\.attn$", "attention maps (recording function)"),
    ("audio_tower", r"^thinker\.model\.audio_tower$", "audio encoder output"),
    ("vision_tower", r"^thinker\.model\.visual$", "vision encoder output incl. deepstack features"),
    ("deepstack", r"^thinker\.model\.visual\.merger_list\.(\d+)$", "deepstack feature merger output"),
    ("codec_head", r"^talker\.codec_head$", "codebook-0 logits"),
    ("code_predictor", r"^talker\.code_predictor$", "residual codebooks 1-15"),
    ("code2wav", r"^code2wav$", "waveform from codes"),
    ("talker", r"^talker$", "one talker step: the frame's 16 codes"),
    ("thinker", r"^thinker$", "one thinker step"),
]
_COMPILED = [(kind, re.compile(p), what) for kind, p, what in _PATTERNS]


@dataclass(frozen=True)
class Site:
    name: str  # the module path, e.g. "thinker.model.language_model.layers.10.mlp.gate"
    kind: str  # router, rotary, attention, audio_tower, vision_tower, deepstack, codec_head, ...
    component: str  # thinker, talker, code2wav
    layer: int | None
    records: str
    module: torch.nn.Module


def _component(name: str) -> str:
    if ".audio_tower" in name:
        return "audio_tower"
    if ".visual" in name:
        return "vision_tower"
    if name.startswith("talker.code_predictor"):
        return "code_predictor"
    return name.split(".", 1)[0]


def find_sites(model: torch.nn.Module, *, refresh: bool = False) -> list[Site]:
    """Every hook site of `model` (a full Qwen3-Omni or a thinker-only model), in module order.

    Found once per model and kept on it (walking every module costs milliseconds, paid on every
    trace otherwise); `refresh=True` walks again (after changing the model's modules).
    """
    cached = model.__dict__.get("_omnilab_sites")
    if cached is not None and not refresh:
        return list(cached)
    sites = _walk(model)
    model.__dict__["_omnilab_sites"] = tuple(sites)
    return sites


def _walk(model: torch.nn.Module) -> list[Site]:
    prefix = "" if hasattr(model, "thinker") else "thinker."
    sites = []
    for raw_name, module in model.named_modules():
        name = prefix + raw_name if raw_name else prefix.rstrip(".")
        for kind, pattern, what in _COMPILED:
            match = pattern.match(name)
            if match:
                layer = int(match.group(1)) if match.groups() else None
                sites.append(Site(name, kind, _component(name), layer, what, module))
                break
    return sites


def sites_frame(sites: list[Site]) -> pd.DataFrame:
    """The registry as a table: name, kind, component, layer, records."""
    return pd.DataFrame(
        [(s.name, s.kind, s.component, s.layer, s.records) for s in sites],
        columns=["name", "kind", "component", "layer", "records"],
    )


def routers(model: torch.nn.Module, component: str) -> dict[int, torch.nn.Module]:
    """The router (`mlp.gate`) of every MoE layer of `component`, by layer."""
    return {s.layer: s.module for s in find_sites(model) if s.kind == "router" and s.component == component}


def component_module(model: torch.nn.Module, component: str) -> torch.nn.Module | None:
    """The thinker or talker module of `model` (None when the model has no such component)."""
    if component == "thinker":
        return model.thinker if hasattr(model, "thinker") else model
    return getattr(model, component, None) if getattr(model, "has_talker", component != "talker") else None


def rotary(model: torch.nn.Module, component: str) -> torch.nn.Module | None:
    """The text rotary embedding of `component` (it receives the positions the model really uses)."""
    module = component_module(model, component)
    if module is None:
        return None
    return module.model.language_model.rotary_emb if component == "thinker" else module.model.rotary_emb
