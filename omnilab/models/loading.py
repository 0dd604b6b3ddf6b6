"""Load a model and its processor: a preset by name, or a real checkpoint by hub id or local path.

Real checkpoints load with `from_pretrained` exactly as a GPU user would (dtype, device_map through
accelerate, attention implementation, experts implementation), with the checkpoint's own
processor. Presets build offline from `presets.py` and `processor.py`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeProcessor,
)

from ..errors import ModelLoadError
from . import presets, real_size
from .processor import PRESET_VIDEO_PIXELS, build_processor

log = logging.getLogger(__name__)

ORGANISM = "organism"  # the tiny preset trained on omnilab.organism's world; its weights ship in the package
MARKER = "omnilab.json"  # written beside checkpoints that omnilab saves (preset name, processor caps)


@dataclass(frozen=True)
class Loaded:
    model: torch.nn.Module
    processor: Qwen3OmniMoeProcessor
    model_id: str
    random_weights: bool
    video_size: dict | None  # per-frame pixel caps the processor call must pass, or None for its own


def _preset_video_size() -> dict:
    return {"shortest_edge": PRESET_VIDEO_PIXELS[0], "longest_edge": PRESET_VIDEO_PIXELS[1]}


def _fix_known_traps(model: torch.nn.Module) -> None:
    # transformers 5.24: generate(return_audio=True) with image/video reads the audio config from the
    # talker's config; it is only on the thinker's.
    if getattr(model, "has_talker", False):
        model.talker.config.audio_config = model.thinker.config.audio_config
        # The published config gives the talker audio_token_id 151646 (Qwen2.5-Omni's), while the
        # thinker's audio tokens are 151675: the talker's rope index then misses every audio token
        # whenever an image or video is in the same prompt, and generate crashes on a shape mismatch.
        model.talker.config.audio_token_id = model.thinker.config.audio_token_id


def load_model(
    name: str = "tiny",
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    talker: bool = True,
) -> Loaded:
    """Load preset `name` ("tiny", "small"), the trained "organism", the real size with random weights
    ("qwen3-omni-30b-a3b-random", "-reduced"), or a checkpoint (hub id or local directory)."""
    if name in presets.PRESETS or name in real_size.NAMES or name == ORGANISM:
        if name in real_size.NAMES:  # built on its device in its dtype (bfloat16 unless asked)
            device = "cuda" if device_map == "auto" and torch.cuda.is_available() else device_map
            device = "cpu" if device in (None, "auto") else device
            model = real_size.build(name, seed=seed, dtype=_dtype(dtype or "bfloat16"), device=device)
            dtype = device_map = None
        elif name == ORGANISM:
            from ..organism.weights import unpack

            model = unpack()[0]
        else:
            model = presets.build_preset(name, seed=seed)
        if not talker:
            model.disable_talker()
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        if experts_implementation:
            model.set_experts_implementation(experts_implementation)
        if dtype is not None:
            model = model.to(_dtype(dtype))
        if device_map not in (None, "cpu"):
            model = model.to("cuda" if device_map == "auto" else device_map)
        _fix_known_traps(model)
        model_id, random_weights = (ORGANISM, False) if name == ORGANISM else (f"omnilab/{name}", True)
        return Loaded(model, build_processor(), model_id, random_weights, _preset_video_size())
    return _load_checkpoint(
        name,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
        talker=talker,
    )


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use 'bfloat16', 'float16' or 'float32'") from None


def _load_checkpoint(
    name, *, dtype, device_map, attn_implementation, experts_implementation, talker
) -> Loaded:
    path = Path(name).expanduser()
    is_local = path.exists()
    if not is_local and (name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1):
        raise ModelLoadError(
            f"model path '{name}' does not exist; give a preset ({', '.join(presets.PRESETS)}), "
            "a local checkpoint directory, or a hub id like 'Qwen/Qwen3-Omni-30B-A3B-Instruct'"
        )
    if is_local and not (path / "config.json").is_file():
        raise ModelLoadError(f"'{name}' has no config.json; it is not a transformers checkpoint directory")
    source = str(path) if is_local else name
    try:
        config = Qwen3OmniMoeConfig.from_pretrained(source)
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise ModelLoadError(_not_found_message(name, exc)) from None
    kwargs: dict = {}
    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype) if dtype != "auto" else "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if not talker:
        config.enable_audio_output = False
    try:
        model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(source, config=config, **kwargs)
        processor = Qwen3OmniMoeProcessor.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(_not_found_message(name, exc)) from None
    model.eval()
    _fix_known_traps(model)
    marker = path / MARKER if is_local else None
    meta = json.loads(marker.read_text()) if marker is not None and marker.is_file() else {}
    return Loaded(
        model,
        processor,
        meta.get("model_id", name),
        bool(meta.get("random_weights", False)),
        meta.get("video_size"),
    )


def _not_found_message(name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if offline:
        return (
            f"model '{name}' is not in the local Hugging Face cache and this machine is offline "
            f"(HF_HUB_OFFLINE=1). Download it where there is network (`hf download {name}`) and pass "
            f"its local directory, or unset HF_HUB_OFFLINE. ({reason})"
        )
    return f"model '{name}' could not be loaded: {reason}"


def save(loaded: Loaded, directory: str | Path) -> Path:
    """Save model, processor and omnilab's marker so that `load(directory)` gives the same model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(directory)
    loaded.processor.save_pretrained(directory)
    marker = {
        "model_id": loaded.model_id,
        "random_weights": loaded.random_weights,
        "video_size": loaded.video_size,
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=2))
    return directory
