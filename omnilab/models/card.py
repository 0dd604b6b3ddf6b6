"""Parameter card: what each component of a Qwen3-Omni model holds, next to the published figures.

One file on purpose (~530 lines): each count's rule and the note that explains it against the
report's figure must be read together.

`card(model)` counts the parameters of the six components of `Qwen3OmniMoeForConditionalGeneration`
(thinker text stack, audio encoder, vision encoder, talker, code predictor, code2wav), total and
active per token, and sets them beside Table 1 of the Qwen3-Omni technical report (arXiv 2509.17765).
`real_config()` and `meta_model()` give the published 30B-A3B architecture without any weights, so the
card of the real model costs half a second and no memory.
"""

from __future__ import annotations

import importlib.resources
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

from omnilab.errors import ModelLoadError
from omnilab.models.presets import config_from_dict

# name -> whether the checkpoint speaks (has talker and code2wav). Thinking and Captioner are the
# Instruct thinker without the speech path.
VARIANTS: dict[str, bool] = {
    "qwen3-omni-30b-a3b-instruct": True,
    "qwen3-omni-30b-a3b-thinking": False,
    "qwen3-omni-30b-a3b-captioner": False,
}
_CONFIG_FILE = "qwen3-omni-30b-a3b-instruct.json"

# Qwen3-Omni technical report (arXiv 2509.17765), Table 1: (total, active). The report gives one
# figure for dense modules; dense means every parameter is active.
PUBLISHED: dict[str, tuple[float, float]] = {
    "thinker": (30e9, 3e9),
    "audio_encoder": (650e6, 650e6),
    "vision_encoder": (540e6, 540e6),
    "talker": (3e9, 0.3e9),
    "code_predictor": (80e6, 80e6),
    "code2wav": (200e6, 200e6),
}
TOLERANCE = 0.05  # how close a count must be to a published figure to call it a match

COLUMNS = [
    "component",
    "module",
    "layers",
    "experts",
    "top_k",
    "shared_expert",
    "hidden_size",
    "codebooks",
    "params_total",
    "params_active",
    "published_total",
    "published_active",
    "ratio_total",
    "ratio_active",
    "note",
]

# Config fields that fix a component's size; a component whose fields all equal the published
# checkpoint's gets the published figures beside it (a tiny test model does not).
_SIZE_FIELDS = (
    "hidden_size",
    "d_model",
    "num_hidden_layers",
    "encoder_layers",
    "depth",
    "intermediate_size",
    "encoder_ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_heads",
    "num_code_groups",
    "codebook_size",
    "num_quantizers",
    "decoder_dim",
    "upsample_rates",
    "upsampling_ratios",
    "num_position_embeddings",
    "out_hidden_size",
    "output_dim",
)


def real_config(name: str = "qwen3-omni-30b-a3b-instruct") -> Qwen3OmniMoeConfig:
    """The published config of a Qwen3-Omni 30B-A3B checkpoint, from omnilab's package data.

    Thinking and Captioner share the Instruct thinker and have `enable_audio_output=False`, so a model
    built from their config has no talker and no code2wav.
    """
    if name not in VARIANTS:
        known = ", ".join(repr(n) for n in VARIANTS)
        raise ModelLoadError(f"model name {name!r} is not one omnilab knows; the known names are {known}")
    text = importlib.resources.files("omnilab").joinpath("models", "configs", _CONFIG_FILE).read_text()
    data = json.loads(text)
    data["enable_audio_output"] = VARIANTS[name]
    return config_from_dict(data)


def meta_model(
    config: Qwen3OmniMoeConfig | Qwen3OmniMoeThinkerConfig,
) -> Qwen3OmniMoeForConditionalGeneration | Qwen3OmniMoeThinkerForConditionalGeneration:
    """The model of `config` on the `meta` device: every shape, no weights allocated.

    A `Qwen3OmniMoeThinkerConfig` gives the thinker alone (`Qwen3OmniMoeThinkerForConditionalGeneration`).
    """
    model_class = (
        Qwen3OmniMoeThinkerForConditionalGeneration
        if isinstance(config, Qwen3OmniMoeThinkerConfig)
        else Qwen3OmniMoeForConditionalGeneration
    )
    with torch.device("meta"):
        return model_class(config)


@dataclass(frozen=True)
class _Component:
    """Where a component lives in the module tree, and where its config lives in the model's config."""

    name: str
    paths: tuple[str, ...]  # candidate module paths under the thinker prefix or root; first found wins
    config: str  # attribute chain from the full model's config
    carve_out: tuple[str, ...] = ()  # components whose parameters sit inside this one's module
    layers: str = "layers"  # ModuleList, relative to the module, whose length is the layer count
    codebooks: str | None = None  # attribute chain from the full model's config to the codebook count


_COMPONENTS = (
    _Component(
        "thinker",
        ("{t}",),
        "thinker_config.text_config",
        carve_out=("audio_encoder", "vision_encoder"),
        layers="model.language_model.layers",
    ),
    _Component("audio_encoder", ("{t}.model.audio_tower", "{t}.audio_tower"), "thinker_config.audio_config"),
    _Component(
        "vision_encoder",
        ("{t}.model.visual", "{t}.visual"),
        "thinker_config.vision_config",
        layers="blocks",
    ),
    _Component(
        "talker",
        ("talker",),
        "talker_config.text_config",
        carve_out=("code_predictor",),
        layers="model.layers",
        codebooks="talker_config.num_code_groups",
    ),
    _Component(
        "code_predictor",
        ("talker.code_predictor",),
        "talker_config.code_predictor_config",
        layers="model.layers",
        codebooks="talker_config.code_predictor_config.num_code_groups",
    ),
    _Component(
        "code2wav",
        ("code2wav",),
        "code2wav_config",
        layers="pre_transformer.layers",
        codebooks="code2wav_config.num_quantizers",
    ),
)


def _join(prefix: str, path: str) -> str:
    return ".".join(part for part in (prefix, path) if part)


def _find(model: nn.Module, candidates: tuple[str, ...], thinker: str) -> str | None:
    for candidate in candidates:
        path = candidate.format(t=thinker).strip(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if module is not None:
            return path
    return None


def _sub_config(config: PretrainedConfig, chain: str, thinker_only: bool):
    """The attribute at `chain` from the full model's config (None where absent)."""
    if thinker_only:
        if not chain.startswith("thinker_config."):
            return None
        chain = chain.removeprefix("thinker_config.")
    for attr in chain.split("."):
        config = getattr(config, attr, None)
        if config is None:
            return None
    return config


def _size_signature(config: PretrainedConfig | None) -> dict:
    if config is None:
        return {}
    return {field: getattr(config, field) for field in _SIZE_FIELDS if hasattr(config, field)}


def _expert_fractions(model: nn.Module) -> dict[str, float]:
    """Parameter name -> the share of it a token uses: k/E for routed experts (absent = 1)."""
    fractions: dict[str, float] = {}
    for block_path, block in model.named_modules():
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if not isinstance(experts, nn.Module) or not isinstance(gate, nn.Module):
            continue
        top_k = getattr(gate, "top_k", None) or getattr(block, "top_k", None)
        num_experts = getattr(experts, "num_experts", None) or getattr(gate, "num_experts", None)
        if top_k is None or num_experts is None:
            continue
        for name, param in experts.named_parameters():
            # fused 3-D expert weights lead with the expert dimension; anything else is shared
            if param.dim() >= 2 and param.shape[0] == num_experts:
                fractions[_join(block_path, f"experts.{name}")] = top_k / num_experts
    return fractions


def _moe_shape(module: nn.Module) -> tuple[int | None, int | None, bool]:
    """(experts, top_k, has a shared expert) of the sparse MoE blocks under `module`."""
    for block in module.modules():
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if isinstance(experts, nn.Module) and isinstance(gate, nn.Module) and hasattr(gate, "top_k"):
            num_experts = getattr(experts, "num_experts", None) or getattr(gate, "num_experts", None)
            return num_experts, gate.top_k, isinstance(getattr(block, "shared_expert", None), nn.Module)
    return None, None, False


def _branches(module: nn.Module, path: str, carved: set[str]) -> list[str]:
    """The largest submodule paths under `path` that hold parameters and contain no carved-out path."""
    if path in carved:
        return []
    if not any(c.startswith(path + ".") for c in carved) and path:
        return [path] if any(True for _ in module.parameters()) else []
    found = []
    for name, child in module.named_children():
        found += _branches(child, _join(path, name), carved)
    return found


@dataclass(frozen=True)
class _Counts:
    total: int
    active: int
    embedding: int  # nn.Embedding weights
    head: int  # output projections to a vocabulary (lm_head, codec_head)
    routed: int  # routed expert weights


def _count(model: nn.Module, prefix: str, carved: set[str], fractions: dict[str, float]) -> _Counts:
    modules = dict(model.named_modules())
    total = embedding = head = routed = 0
    active = 0.0
    for name, param in model.named_parameters():
        inside = name.startswith(prefix + ".") or not prefix
        if not inside or any(name.startswith(c + ".") for c in carved):
            continue
        n = param.numel()
        fraction = fractions.get(name, 1.0)
        total += n
        active += n * fraction
        owner = modules.get(name.rpartition(".")[0])
        if isinstance(owner, nn.Embedding):
            embedding += n
        if "lm_head" in name or "codec_head" in name:
            head += n
        if fraction < 1.0:
            routed += n
    return _Counts(total, round(active), embedding, head, routed)


def _human(n: float) -> str:
    """30532646912 -> '30.53B', 647933440 -> '647.9M'."""
    if pd.isna(n):
        return "-"
    for scale, unit, places in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{places}f}{unit}"
    return f"{int(n)}"


def _published(n: float) -> str:
    """30e9 -> '30B', 0.3e9 -> '300M': the figure as the report writes it."""
    if pd.isna(n):
        return "-"
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def _vs(count: int, published: float) -> str:
    return f"{_human(count)}, {count / published:.2f}x"


# Why a count and the report differ, stated with the numbers computed on the model. Only used where
# the component has the published checkpoint's size, so the narrative and the numbers agree.
def _thinker_note(c: _Counts, others: dict[str, _Counts], hidden: int) -> str:
    published_total, published_active = PUBLISHED["thinker"]
    towers = sum(others[n].total for n in ("audio_encoder", "vision_encoder") if n in others)
    embed = c.embedding
    return (
        f"Published 30B is the text stack alone (as Qwen3-30B-A3B's 30.5B is); with the audio and vision "
        f"towers the thinker module holds {_vs(c.total + towers, published_total)}. "
        f"Published A3B is a rounded label: counting embed_tokens and lm_head fully, as Qwen's "
        f"'3.3B activated' does, gives {_vs(c.active, published_active)}; counting only the one "
        f"embedding row a token reads gives {_vs(c.active - embed + hidden, published_active)}; "
        f"without embed_tokens and lm_head {_vs(c.active - embed - c.head, published_active)}."
    )


def _talker_note(c: _Counts, others: dict[str, _Counts], hidden: int) -> str:
    published_total, _ = PUBLISHED["talker"]
    predictor = others["code_predictor"].total if "code_predictor" in others else 0
    return (
        f"Published 3B is a rounded label (the report writes 3B-A0.3B): the routed experts alone hold "
        f"{_vs(c.routed, published_total)}, the rest (attention, shared experts, thinker projections, "
        f"codec embedding and head) {_human(c.total - c.routed)}. The 3B does not include the code "
        f"predictor (the report lists it as MTP): with it {_vs(c.total + predictor, published_total)}."
    )


def _code_predictor_note(c: _Counts, others: dict[str, _Counts], hidden: int) -> str:
    published_total, _ = PUBLISHED["code_predictor"]
    body = c.total - c.embedding - c.head
    return (
        f"Published 80M is the decoder layers alone: without the per-codebook embeddings "
        f"({_human(c.embedding)}) and heads ({_human(c.head)}) the module holds "
        f"{_vs(body, published_total)}."
    )


def _code2wav_note(c: _Counts, others: dict[str, _Counts], hidden: int) -> str:
    published_total, _ = PUBLISHED["code2wav"]
    return (
        f"Published 200M is a round figure; no natural part of the module lands within "
        f"{TOLERANCE:.0%}: without its codebook embedding ({_human(c.embedding)}) it holds "
        f"{_vs(c.total - c.embedding, published_total)}."
    )


_EXPLAIN: dict[str, Callable[[_Counts, dict[str, _Counts], int], str]] = {
    "thinker": _thinker_note,
    "talker": _talker_note,
    "code_predictor": _code_predictor_note,
    "code2wav": _code2wav_note,
}


def _as_model(model_or_config: nn.Module | PretrainedConfig | str) -> nn.Module:
    if isinstance(model_or_config, str):
        return meta_model(real_config(model_or_config))
    if isinstance(model_or_config, PretrainedConfig):
        return meta_model(model_or_config)
    return model_or_config


def card(model_or_config: nn.Module | PretrainedConfig | str) -> pd.DataFrame:
    """One row per component of a Qwen3-Omni model, and a `total` row: its size beside the published one.

    Accepts a model (real or on `meta`; full or thinker-only), a config (built on `meta`), or a name
    for `real_config`. Columns: `component`, `module` (the module paths counted, joined by " + "),
    `layers`, `experts`, `top_k`, `shared_expert`, `hidden_size`, `codebooks`, `params_total`,
    `params_active` (per token: routed expert weights count k/E, everything else fully, embeddings
    included), `published_total`, `published_active` (report Table 1; NaN where the component is not the
    published 30B-A3B size), `ratio_total`, `ratio_active` (params / published), `note`. Components a
    model lacks (Thinking, Captioner: no talker, code predictor, code2wav) have no row.
    """
    model = _as_model(model_or_config)
    root_config = model.config
    thinker_only = not hasattr(root_config, "thinker_config")
    thinker = "" if thinker_only else "thinker"
    reference = real_config()

    paths: dict[str, str] = {}
    for component in _COMPONENTS:
        path = _find(model, component.paths, thinker)
        if path is not None:
            paths[component.name] = path
    fractions = _expert_fractions(model)

    counts: dict[str, _Counts] = {}
    for component in _COMPONENTS:
        if component.name in paths:
            carved = {paths[c] for c in component.carve_out if c in paths}
            counts[component.name] = _count(model, paths[component.name], carved, fractions)

    rows = []
    for component in _COMPONENTS:
        if component.name not in paths:
            continue
        path, c = paths[component.name], counts[component.name]
        module = model.get_submodule(path) if path else model
        carved = {paths[o] for o in component.carve_out if o in paths}
        config = _sub_config(root_config, component.config, thinker_only)
        experts, top_k, shared = _moe_shape(module)
        try:
            layers = len(module.get_submodule(component.layers))
        except AttributeError:
            layers = None
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        codebooks = (
            _sub_config(root_config, component.codebooks, thinker_only) if component.codebooks else None
        )

        is_published = _size_signature(config) == _size_signature(
            _sub_config(reference, component.config, thinker_only=False)
        )
        published_total, published_active = PUBLISHED[component.name] if is_published else (None, None)

        notes = []
        if experts:
            notes.append(f"Active counts {top_k}/{experts} of the routed expert weights.")
        if shared:
            notes.append("The shared expert and its gate count fully.")
        counted = [f"embeddings ({_human(c.embedding)})"] if c.embedding else []
        counted += [f"output heads ({_human(c.head)})"] if c.head else []
        if counted:
            notes.append(f"Counted fully in total and active: {' and '.join(counted)}.")
        if component.name == "code2wav":
            notes.append("Layers counts the transformer in front of the ConvNet upsampler and decoder.")
        if component.name == "code_predictor" and codebooks:
            notes.append(f"It predicts codebooks 1-{codebooks - 1}; the talker predicts codebook 0.")
        if is_published and component.name in _EXPLAIN:
            notes.append(_EXPLAIN[component.name](c, counts, hidden))
        rows.append(
            {
                "component": component.name,
                "module": " + ".join(_branches(module, path, carved)) or "(root)",
                "layers": layers,
                "experts": experts,
                "top_k": top_k,
                "shared_expert": shared,
                "hidden_size": hidden,
                "codebooks": codebooks,
                "params_total": c.total,
                "params_active": c.active,
                "published_total": published_total,
                "published_active": published_active,
                "note": " ".join(notes),
            }
        )

    all_params = sum(p.numel() for p in model.parameters())
    unassigned = all_params - sum(c.total for c in counts.values())
    published = [r for r in rows if r["published_total"] is not None]
    total_note = (
        "Active is summed over components, each on its own stream (text tokens, audio frames, image "
        "patches, codec frames), so it is not one token's cost."
    )
    if published:
        total_note += (
            f" Published is the sum of the report's figures for the {len(published)} components that "
            "have one."
        )
    if unassigned:
        total_note += f" {_human(unassigned)} parameters belong to no component."
    rows.append(
        {
            "component": "total",
            "module": "(root)",
            "params_total": all_params,
            "params_active": sum(c.active for c in counts.values()),
            "published_total": sum(r["published_total"] for r in published) if published else None,
            "published_active": sum(r["published_active"] for r in published) if published else None,
            "note": total_note,
        }
    )

    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for column in ("layers", "experts", "top_k", "hidden_size", "codebooks", "params_total", "params_active"):
        df[column] = df[column].astype("Int64")
    for column in ("published_total", "published_active"):
        df[column] = df[column].astype("float64")
    df["shared_expert"] = df["shared_expert"].astype("boolean")
    df["ratio_total"] = df["params_total"].astype("float64") / df["published_total"]
    df["ratio_active"] = df["params_active"].astype("float64") / df["published_active"]
    return df


def format_card(df: pd.DataFrame, width: int = 100) -> str:
    """A fixed-width table of `card(...)` with sizes in K/M/B, then each component's modules and note."""
    header = (
        f"{'component':<15}{'layers':>7}{'experts':>8}{'top_k':>6}{'shared':>7}{'hidden':>7}"
        f"{'codebooks':>10}{'total':>10}{'active':>10}{'published':>16}{'ratio':>13}"
    )

    def cell(value) -> str:
        return "-" if pd.isna(value) else str(value)

    lines = [header, "-" * len(header)]
    for row in df.itertuples(index=False):
        published = (
            "-"
            if pd.isna(row.published_total)
            else f"{_published(row.published_total)} / {_published(row.published_active)}"
        )
        shared = "-" if pd.isna(row.shared_expert) else ("yes" if row.shared_expert else "no")
        ratio = "-" if pd.isna(row.ratio_total) else f"{row.ratio_total:.2f} / {row.ratio_active:.2f}"
        lines.append(
            f"{row.component:<15}{cell(row.layers):>7}{cell(row.experts):>8}{cell(row.top_k):>6}"
            f"{shared:>7}{cell(row.hidden_size):>7}"
            f"{cell(row.codebooks):>10}{_human(row.params_total):>10}{_human(row.params_active):>10}"
            f"{published:>16}{ratio:>13}"
        )
    lines.append("")
    lines.append(
        "total, active, published and ratio are total / active per token; published: arXiv 2509.17765"
    )
    for row in df.itertuples(index=False):
        lines.append("")
        lines.append(f"{row.component}: {row.module}")
        lines += textwrap.wrap(row.note, width=width, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)
