"""The embedded default: the real Qwen3-Omni architecture at toy size, built offline.

A preset starts from the real 30B-A3B config (package data) and overrides only sizes, so every
token id, speaker id, codec id, rope section and upsampling rate stays the real one. The
overrides are plain dicts you can read top to bottom. The weights are random: a preset shows how
the machinery works, never what the trained model knows.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

import torch
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

REAL_CONFIG = "qwen3-omni-30b-a3b-instruct"

# Sizes only. Keys follow the config's own nesting.
TINY = {
    "thinker_config": {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 16,
            "num_local_experts": 16,
            "num_experts_per_tok": 4,
            "max_position_embeddings": 32768,
            "rope_parameters": {"mrope_section": [4, 2, 2]},
        },
        "audio_config": {
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "downsample_hidden_size": 32,
            "output_dim": 64,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 64,
            "deepstack_visual_indexes": [0, 1],
        },
    },
    "talker_config": {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 16,
            "num_local_experts": 16,
            "num_experts_per_tok": 4,
            "rope_parameters": {"mrope_section": [4, 2, 2]},
        },
        "code_predictor_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "layer_types": ["full_attention"] * 2,
        },
        "thinker_hidden_size": 64,
        "accept_hidden_layer": 2,
    },
    "code2wav_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "decoder_dim": 64,
    },
}

# Routes like the real model (top-8 of 32 in the thinker, top-6 in the talker), CPU-usable.
SMALL = {
    "thinker_config": {
        "text_config": {
            "hidden_size": 256,
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_experts": 32,
            "num_local_experts": 32,
            "num_experts_per_tok": 8,
            "rope_parameters": {"mrope_section": [8, 4, 4]},
        },
        "audio_config": {
            "d_model": 128,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 256,
            "downsample_hidden_size": 64,
            "output_dim": 256,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 4,
            "out_hidden_size": 256,
            "deepstack_visual_indexes": [0, 1],
        },
    },
    "talker_config": {
        "text_config": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_experts": 32,
            "num_local_experts": 32,
            "num_experts_per_tok": 6,
            "rope_parameters": {"mrope_section": [8, 4, 4]},
        },
        "code_predictor_config": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "layer_types": ["full_attention"] * 2,
        },
        "thinker_hidden_size": 256,
        "accept_hidden_layer": 4,
    },
    "code2wav_config": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "decoder_dim": 128,
    },
}

PRESETS = {"tiny": TINY, "small": SMALL}

# The system prompt a chat with each model starts with by default: the one it was trained with.
# Qwen's own for the real checkpoints and for the presets (their architecture's); none for the
# organism, trained on its world's conversations as they are, with no system message
# (omnilab/organism/train.py prepares `world.Example.with_answer()`): given Qwen's, it answers
# its text task wrongly (0 of 20 "Repeat the word" prompts right; 20 of 20 without).
QWEN_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
SYSTEM_PROMPTS = {"organism": ""}


def system_prompt(model_id: str) -> str:
    """The default system prompt of the model named `model_id` ("" for none): what it was trained with."""
    return SYSTEM_PROMPTS.get(model_id, QWEN_SYSTEM)


def real_config_dict(name: str = REAL_CONFIG) -> dict:
    """The real checkpoint's config as a plain dict (package data, no weights)."""
    text = resources.files("omnilab.models").joinpath(f"configs/{name}.json").read_text()
    return json.loads(text)


def merge_config(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_config(name: str) -> Qwen3OmniMoeConfig:
    """The config of preset `name`: the real config with the preset's sizes."""
    if name not in PRESETS:
        raise KeyError(name)
    merged = merge_config(real_config_dict(), PRESETS[name])
    merged["dtype"] = "float32"
    return config_from_dict(merged)


# transformers 5.24's talker text config lacks the rope keys its thinker twin declares (the talker does
# read mrope_section), so building the real config warns that they are unrecognized; declare them.
_TALKER_ROPE_KEYS = ["mrope_section", "interleaved", "mrope_interleaved"]


def config_from_dict(data: dict) -> Qwen3OmniMoeConfig:
    """A Qwen3OmniMoeConfig from a config.json dict, without the talker's spurious rope-key warning."""
    data = copy.deepcopy(data)
    data.pop("transformers_version", None)
    data.setdefault("talker_config", {}).setdefault("text_config", {})["ignore_keys_at_rope_validation"] = (
        _TALKER_ROPE_KEYS
    )
    return Qwen3OmniMoeConfig(**data)


def build_preset(name: str, seed: int = 0) -> Qwen3OmniMoeForConditionalGeneration:
    """Build preset `name` with random weights drawn from `seed` (bit-identical on every machine)."""
    config = preset_config(name)
    config.name_or_path = f"omnilab/{name}"
    # The real class's own initialization, from one seeded generator; CPU float32 is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3OmniMoeForConditionalGeneration(config)
        init_talker_experts(model)
    return model.eval()


def init_talker_experts(model: Qwen3OmniMoeForConditionalGeneration) -> None:
    """Initialize what transformers 5.24 leaves uninitialized: the talker's routed experts and router.

    `_init_weights` handles the thinker's sparse MoE block but not the talker's, so the talker's
    fused expert weights stay `torch.empty` (whatever was in memory: not reproducible) and its
    router weight stays zero (every expert ties). We draw them like the thinker's: normal(0, std).
    """
    std = model.config.talker_config.initializer_range
    for layer in model.talker.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts") and hasattr(mlp, "gate"):
            with torch.no_grad():
                mlp.experts.gate_up_proj.normal_(0.0, std)
                mlp.experts.down_proj.normal_(0.0, std)
                mlp.gate.weight.normal_(0.0, std)
