"""The registry of hook sites, named after the transformers module paths.

A site is a module of the model that omnilab knows how to record at or change. Sites are found from
the model's own modules, so the same code finds 4 thinker routers on `tiny` and 48 on the real
checkpoint (built on the meta device). Each has its module path and a short alias a researcher types:

    resid.10            thinker.model.language_model.layers.10          (the layer's output; see below)
    resid_pre.10 / resid_mid.10 / resid_post.10                           (TransformerLens's names, below)
    attn.10 / mlp.10    ...layers.10.self_attn / ...layers.10.mlp       (attention / MoE block output;
                                                                          maps: capture="attention")
    router.10           ...layers.10.mlp.gate
    talker.resid.3      talker.model.layers.3        (talker.attn.3, talker.mlp.3, talker.router.3 likewise)
    code_predictor.resid.0, audio_tower, vision_tower, deepstack.1, codec_head, code_predictor, code2wav

The residual stream has TransformerLens's names too (`talker.` in front for the talker's), each read
where the model really carries it: `resid_pre.L` enters layer L (the input of `layers.L`),
`resid_mid.L` is after attention and before the MLP (the input of `layers.L.post_attention_layernorm`),
`resid_post.L` leaves layer L after deepstack has added the vision tower's features at image and video
positions (the input of `layers.L+1`, of the final norm after the last layer). `resid.L` stays the
alias of the layer's own output, as `output_hidden_states` has it: in the first layers, before
deepstack (it equals `resid_post.L` where no deepstack feature is added). A site's `point` says
whether its tensor is its module's output or its input.

`resolve_sites(model, patterns)` takes aliases, module paths, globs over either (`resid.*`) and the
named sets in SITE_SETS (`routing`, `positions`, `codes`, `residual`).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import InterventionError

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
    (
        "residual",
        r"^thinker\.model\.language_model\.layers\.(\d+)$",
        "the residual stream after the layer, as output_hidden_states has it: in the first layers, before "
        "deepstack adds the vision tower's features at image and video positions",
    ),
    ("residual", r"^talker\.model\.layers\.(\d+)$", "the residual stream after the layer"),
    ("residual", r"^talker\.code_predictor\.model\.layers\.(\d+)$", "the residual stream after the layer"),
    ("mlp", r"^thinker\.model\.language_model\.layers\.(\d+)\.mlp$", "the MoE block's output"),
    ("mlp", r"^talker\.model\.layers\.(\d+)\.mlp$", "the MoE block's output (shared expert included)"),
    (
        "attention",
        r"^thinker\.model\.language_model\.layers\.(\d+)\.self_attn$",
        "the attention block's output (after o_proj); its maps: capture='attention' (eager)",
    ),
    (
        "attention",
        r"^talker\.model\.layers\.(\d+)\.self_attn$",
        "the attention block's output (after o_proj); its maps: capture='attention' (eager)",
    ),
    (
        "attention",
        r"^thinker\.model\.audio_tower\.layers\.(\d+)\.self_attn$",
        "the attention block's output; its maps: capture='attention' (a recording function)",
    ),
    (
        "attention",
        r"^thinker\.model\.visual\.blocks\.(\d+)\.attn$",
        "the attention block's output; its maps: capture='attention' (a recording function)",
    ),
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
    kind: str  # router, rotary, residual, mlp, attention, audio_tower, vision_tower, deepstack, ...
    component: str  # thinker, talker, code_predictor, audio_tower, vision_tower, code2wav
    layer: int | None
    records: str
    module: torch.nn.Module
    alias: str = ""  # the short name, e.g. "resid.10" (the module path where there is none)
    point: str = "output"  # "output": the module's output is the site's tensor; "input": its first input


# (component, kind) -> the alias stem; a layer's number follows it ("resid.10")
_ALIAS = {
    ("thinker", "residual"): "resid",
    ("thinker", "mlp"): "mlp",
    ("thinker", "attention"): "attn",
    ("thinker", "router"): "router",
    ("talker", "residual"): "talker.resid",
    ("talker", "mlp"): "talker.mlp",
    ("talker", "attention"): "talker.attn",
    ("talker", "router"): "talker.router",
    ("code_predictor", "residual"): "code_predictor.resid",
    ("audio_tower", "attention"): "audio_tower.attn",
    ("vision_tower", "attention"): "vision_tower.attn",
    ("vision_tower", "deepstack"): "deepstack",
    ("thinker", "rotary"): "thinker.rotary",
    ("talker", "rotary"): "talker.rotary",
}
# named sets of sites: name -> the kinds (and components) they hold
SITE_SETS = {
    "routing": {"router"},
    "positions": {"rotary"},
    "codes": {"codec_head", "code_predictor"},
    "residual": {"residual"},
}


def _alias(name: str, kind: str, component: str, layer: int | None) -> str:
    stem = _ALIAS.get((component, kind))
    if stem is None:
        return (
            kind
            if kind in {"audio_tower", "vision_tower", "codec_head", "code_predictor", "code2wav"}
            else name
        )
    return stem if layer is None else f"{stem}.{layer}"


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
                component = _component(name)
                alias = _alias(name, kind, component, layer)
                sites.append(Site(name, kind, component, layer, what, module, alias))
                if kind == "residual" and component in RESIDUAL_POINT_COMPONENTS:
                    sites += _residual_points(model, name, component, layer)
                break
    return sites


# TransformerLens's residual names: (kind, alias stem, what it records)
RESIDUAL_POINTS = (
    ("resid_pre", "resid_pre", "the residual stream entering the layer (the layer's input)"),
    (
        "resid_mid",
        "resid_mid",
        "the residual stream after attention, before the MLP (post_attention_layernorm's input)",
    ),
    (
        "resid_post",
        "resid_post",
        "the residual stream leaving the layer, deepstack's vision features added (the next layer's "
        "input, the final norm's after the last layer)",
    ),
)
RESIDUAL_POINT_COMPONENTS = ("thinker", "talker")
RESIDUAL_POINT_KINDS = tuple(kind for kind, _, _ in RESIDUAL_POINTS)


def _residual_points(model: torch.nn.Module, name: str, component: str, layer: int) -> list[Site]:
    """resid_pre.L, resid_mid.L and resid_post.L of the decoder layer at module path `name`."""
    text = component_module(model, component)
    text = text.model.language_model if component == "thinker" else text.model
    layers = text.layers
    following = layers[layer + 1] if layer + 1 < len(layers) else text.norm
    modules = {
        "resid_pre": layers[layer],
        "resid_mid": layers[layer].post_attention_layernorm,
        "resid_post": following,
    }
    stem = "" if component == "thinker" else "talker."
    return [
        Site(f"{name}:{kind}", kind, component, layer, what, modules[kind], f"{stem}{alias}.{layer}", "input")
        for kind, alias, what in RESIDUAL_POINTS
    ]


def sites_frame(sites: list[Site]) -> pd.DataFrame:
    """The registry as a table: alias, name, kind, component, layer, point (output or input), records."""
    return pd.DataFrame(
        [(s.alias, s.name, s.kind, s.component, s.layer, s.point, s.records) for s in sites],
        columns=["alias", "name", "kind", "component", "layer", "point", "records"],
    )


def resolve_sites(model: torch.nn.Module, patterns) -> list[Site]:
    """The sites `patterns` name, in module order, each once.

    A pattern is an alias ("resid.10"), a module path, a glob over either ("resid.*",
    "talker.model.layers.*"), or a named set of SITE_SETS ("routing"). A pattern that names nothing
    is refused, with the closest real names.
    """
    sites = find_sites(model)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InterventionError(f"a site is named by a string; got {type(pattern).__name__} {pattern!r}")
        if pattern in SITE_SETS:
            hits = [s for s in sites if s.kind in SITE_SETS[pattern]]
        else:
            hits = [
                s
                for s in sites
                if fnmatch.fnmatchcase(s.alias, pattern) or fnmatch.fnmatchcase(s.name, pattern)
            ]
        if not hits:
            names = [s.alias for s in sites] + [s.name for s in sites] + list(SITE_SETS)
            close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else "see lab.sites()"
            raise InterventionError(f"no site {pattern!r} in this model; {hint}")
        chosen.update(s.name for s in hits)
    return [s for s in sites if s.name in chosen]


def site_tensor(output) -> torch.Tensor:
    """The hidden-state tensor in a site module's output (attention and towers return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for key in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise InterventionError(f"cannot find a tensor in a site's output of type {type(output).__name__}")


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


def site_width(model: torch.nn.Module, site: Site) -> int | None:
    """The width of a site's tensor, from the config (None where the config does not say)."""
    if site.kind == "router":
        gate = site.module
        return int(getattr(gate, "num_experts", 0) or gate.weight.shape[0])
    if site.kind == "codec_head":
        return int(site.module.out_features)
    if site.kind in ("residual", "mlp", "attention", *RESIDUAL_POINT_KINDS) and site.component in (
        "thinker",
        "talker",
        "code_predictor",
    ):
        owner = component_module(model, "talker" if site.component != "thinker" else "thinker")
        if site.component == "code_predictor":
            owner = owner.code_predictor
        config = owner.config
        return int(getattr(config, "text_config", config).hidden_size)
    if site.kind == "audio_tower":
        return int(site.module.config.output_dim)
    if site.kind == "vision_tower":
        return int(site.module.config.out_hidden_size)
    weights = list(site.module.parameters())  # a deepstack merger ends in its output projection
    return int(weights[-1].shape[0]) if weights else None
