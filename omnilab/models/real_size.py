"""The real Qwen3-Omni 30B-A3B at full size with random weights, for measuring where a GPU is lent.

No machine of ours can download the real weights, but every speed and memory figure depends on the
sizes, not the values: `load("qwen3-omni-30b-a3b-random", device_map="cuda", dtype="bfloat16")` builds
the published config at full size. The model is constructed directly on the target device, in the
target dtype, by transformers' own classes and initialization from one seeded generator: no 60 GB
float32 copy on the CPU first. Here it is tested on the `meta` device and as `REDUCED`: the real width
with the depth cut (2 thinker layers, 1 talker layer, 2-layer towers), about 2.4 B parameters.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from . import presets
from .card import real_config

NAMES = {
    "qwen3-omni-30b-a3b-random": "qwen3-omni-30b-a3b-instruct",
    "qwen3-omni-30b-a3b-random-reduced": "qwen3-omni-30b-a3b-instruct",
}

# Depth only: every width, expert count, head count, token id and rope section stays the real one.
REDUCED = {
    "thinker_config": {
        "text_config": {"num_hidden_layers": 2},
        "audio_config": {"encoder_layers": 2},
        "vision_config": {"depth": 2, "deepstack_visual_indexes": [0, 1]},
    },
    "talker_config": {
        "accept_hidden_layer": 1,  # the thinker layer the talker reads; the real one is 24 of 48
        "text_config": {"num_hidden_layers": 1},
        "code_predictor_config": {"num_hidden_layers": 1, "layer_types": ["full_attention"]},
    },
    "code2wav_config": {"num_hidden_layers": 1},
}


def config(name: str) -> Qwen3OmniMoeConfig:
    """The config `name` builds: the published one, depth-reduced for the `-reduced` name."""
    if not name.endswith("-reduced"):
        return real_config(NAMES[name])
    return presets.config_from_dict(presets.merge_config(presets.real_config_dict(), REDUCED))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Qwen3OmniMoeForConditionalGeneration:
    """Build `name` on `device` in `dtype`, its random weights drawn from `seed`.

    Reproducible for one device and dtype (a GPU's generator differs from the CPU's).
    """
    cfg = config(name)
    cfg.name_or_path = f"omnilab/{name}"
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        model = Qwen3OmniMoeForConditionalGeneration(cfg)
        presets.init_talker_experts(model)
    return model.eval()
