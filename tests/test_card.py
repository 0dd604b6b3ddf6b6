"""The parameter card: counts on the published 30B-A3B config (meta device) and on a tiny real model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import (
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

from omnilab.errors import ModelLoadError
from omnilab.models.card import card, format_card, meta_model, real_config

COMPONENTS = ["thinker", "audio_encoder", "vision_encoder", "talker", "code_predictor", "code2wav"]


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def real_model():
    return meta_model(real_config())


@pytest.fixture(scope="module")
def real_card(real_model):
    return card(real_model).set_index("component")


# --- the published architecture ------------------------------------------------------------------


def test_meta_model_allocates_no_weights(real_model):
    assert all(p.is_meta for p in real_model.parameters())


def test_card_rows_are_the_six_components_and_a_total(real_card):
    assert list(real_card.index) == [*COMPONENTS, "total"]


def test_thinker_is_48_layers_of_128_experts_top_8(real_card):
    row = real_card.loc["thinker"]
    assert (row.layers, row.experts, row.top_k, row.shared_expert) == (48, 128, 8, False)
    assert row.hidden_size == 2048


def test_talker_is_20_layers_of_128_experts_top_6_with_a_shared_expert(real_card):
    row = real_card.loc["talker"]
    assert (row.layers, row.experts, row.top_k, row.shared_expert) == (20, 128, 6, True)
    assert row.hidden_size == 1024


def test_code_predictor_has_16_codebooks_and_5_layers(real_card):
    row = real_card.loc["code_predictor"]
    assert (row.codebooks, row.layers) == (16, 5)
    assert pd.isna(row.experts)  # dense


def test_components_partition_the_model(real_model, real_card):
    assert real_card.loc[COMPONENTS, "params_total"].sum() == numel(real_model)
    assert real_card.loc["total", "params_total"] == numel(real_model)


def test_thinker_active_counts_8_of_128_routed_experts(real_model, real_card):
    text = real_model.thinker.model.language_model
    routed = sum(p.numel() for n, p in text.named_parameters() if ".experts." in n)
    dense = numel(text) - routed + real_model.thinker.lm_head.weight.numel()
    assert real_card.loc["thinker", "params_active"] == dense + routed * 8 // 128


@pytest.mark.parametrize("component", ["audio_encoder", "vision_encoder"])
def test_towers_match_the_published_size(real_card, component):
    assert real_card.loc[component, "ratio_total"] == pytest.approx(1, abs=0.05)


def test_thinker_total_matches_30b_without_the_towers(real_model, real_card):
    row = real_card.loc["thinker"]
    assert row.ratio_total == pytest.approx(1, abs=0.05)
    with_towers = numel(real_model.thinker)
    assert with_towers / 30e9 > 1.05  # the towers are not part of the published 30B
    assert f"{with_towers / 1e9:.2f}B" in row.note


def test_thinker_active_3b_is_a_rounded_label(real_model, real_card):
    row = real_card.loc["thinker"]
    assert row.ratio_active > 1.05  # embeddings counted fully: 3.35B, Qwen's "3.3B activated"
    embed = real_model.thinker.model.language_model.embed_tokens.weight
    one_row_per_token = row.params_active - embed.numel() + embed.shape[1]
    assert one_row_per_token / 3e9 == pytest.approx(1, abs=0.05)
    assert "rounded label" in row.note
    assert f"{one_row_per_token / 1e9:.2f}B" in row.note


def test_talker_3b_is_a_rounded_label_for_its_routed_experts(real_model, real_card):
    row = real_card.loc["talker"]
    assert 1.0 < row.ratio_total < 1.07
    routed = sum(p.numel() for n, p in real_model.talker.model.named_parameters() if ".experts." in n)
    assert routed / 3e9 == pytest.approx(1, abs=0.05)
    assert "rounded label" in row.note
    assert f"{routed / 1e9:.2f}B" in row.note


def test_talker_active_matches_the_published_300m(real_card):
    assert real_card.loc["talker", "ratio_active"] == pytest.approx(1, abs=0.05)


def test_code_predictor_80m_is_its_decoder_layers(real_model, real_card):
    row = real_card.loc["code_predictor"]
    assert row.ratio_total > 1.5  # 15 codebook embeddings and 15 heads on top of the layers
    layers = numel(real_model.talker.code_predictor.model.layers)
    assert layers / 80e6 == pytest.approx(1, abs=0.05)
    assert "decoder layers" in row.note


def test_code2wav_is_8_percent_over_a_round_200m(real_model, real_card):
    row = real_card.loc["code2wav"]
    assert 1.0 < row.ratio_total < 1.10
    without_embedding = numel(real_model.code2wav) - real_model.code2wav.code_embedding.weight.numel()
    assert without_embedding / 200e6 < 0.95  # neither reading lands within 5%: say so
    assert "round figure" in row.note


@pytest.mark.parametrize("name", ["qwen3-omni-30b-a3b-thinking", "qwen3-omni-30b-a3b-captioner"])
def test_text_only_variants_have_no_speech_rows(name):
    df = card(real_config(name))
    assert list(df.component) == ["thinker", "audio_encoder", "vision_encoder", "total"]


def test_card_accepts_a_variant_name():
    assert list(card("qwen3-omni-30b-a3b-thinking").component)[0] == "thinker"


def test_unknown_name_raises_model_load_error_listing_the_known_names():
    with pytest.raises(ModelLoadError, match="qwen3-omni-30b-a3b-instruct"):
        real_config("qwen3-omni-7b")


def test_format_card_shows_sizes_in_human_units(real_card):
    text = format_card(real_card.reset_index())
    for component in [*COMPONENTS, "total"]:
        assert f"\n{component} " in text
    assert f"{real_card.loc['thinker', 'params_total'] / 1e9:.2f}B" in text
    assert f"{real_card.loc['audio_encoder', 'params_total'] / 1e6:.1f}M" in text


# --- a tiny real model --------------------------------------------------------------------------

ROPE = {
    "rope_type": "default",
    "rope_theta": 1e6,
    "mrope_section": [4, 2, 2],
    "interleaved": True,
    "mrope_interleaved": True,
}
TINY_MOE = {"thinker": (2, 8, 2, 64, 32), "talker": (2, 8, 2, 32, 16)}  # layers, E, k, hidden, moe_inter


def tiny_config() -> Qwen3OmniMoeConfig:
    """Every size explicit and small; the config classes' defaults are not the real model either."""
    return Qwen3OmniMoeConfig(
        thinker_config={
            "text_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "vocab_size": 1024,
                "rope_parameters": ROPE,
            },
            "audio_config": {
                "d_model": 32,
                "encoder_layers": 2,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 64,
                "num_mel_bins": 16,
                "downsample_hidden_size": 8,
                "output_dim": 64,
                "max_source_positions": 64,
            },
            "vision_config": {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
                "patch_size": 4,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
        },
        talker_config={
            "thinker_hidden_size": 64,
            "num_code_groups": 4,
            "accept_hidden_layer": 1,
            "spatial_merge_size": 2,
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "moe_intermediate_size": 16,
                "shared_expert_intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "vocab_size": 96,
                "rope_parameters": ROPE,
            },
            "code_predictor_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "num_code_groups": 4,
                "vocab_size": 64,
            },
        },
        code2wav_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "codebook_size": 64,
            "num_quantizers": 4,
            "decoder_dim": 32,
            "upsample_rates": [2, 2],
            "upsampling_ratios": [2],
            "sliding_window": 8,
        },
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Qwen3OmniMoeForConditionalGeneration(tiny_config())


@pytest.fixture(scope="module")
def tiny_card(tiny_model):
    return card(tiny_model).set_index("component")


def test_tiny_model_is_real_not_meta(tiny_model):
    assert not any(p.is_meta for p in tiny_model.parameters())


def test_tiny_card_counts_every_parameter_of_each_module(tiny_model, tiny_card):
    m = tiny_model
    expected = {
        "thinker": numel(m.thinker) - numel(m.thinker.model.audio_tower) - numel(m.thinker.model.visual),
        "audio_encoder": numel(m.thinker.model.audio_tower),
        "vision_encoder": numel(m.thinker.model.visual),
        "talker": numel(m.talker) - numel(m.talker.code_predictor),
        "code_predictor": numel(m.talker.code_predictor),
        "code2wav": numel(m.code2wav),
        "total": numel(m),
    }
    assert tiny_card["params_total"].to_dict() == expected


@pytest.mark.parametrize("component", ["thinker", "talker"])
def test_tiny_moe_active_is_total_less_the_unrouted_experts(tiny_card, component):
    layers, experts, top_k, hidden, moe_inter = TINY_MOE[component]
    routed = layers * experts * 3 * hidden * moe_inter  # gate, up, down of every expert
    row = tiny_card.loc[component]
    assert row.params_active < row.params_total
    assert row.params_active == row.params_total - routed * (experts - top_k) // experts


@pytest.mark.parametrize("component", ["audio_encoder", "vision_encoder", "code_predictor", "code2wav"])
def test_tiny_dense_components_are_fully_active(tiny_card, component):
    row = tiny_card.loc[component]
    assert row.params_active == row.params_total


def test_tiny_card_reads_its_shape_from_the_model(tiny_card):
    assert tiny_card.loc["thinker", ["layers", "experts", "top_k"]].tolist() == [2, 8, 2]
    assert tiny_card.loc["talker", ["layers", "experts", "top_k", "codebooks"]].tolist() == [2, 8, 2, 4]
    assert bool(tiny_card.loc["talker", "shared_expert"])


def test_tiny_card_has_no_published_figures(tiny_card):
    assert tiny_card["published_total"].isna().all()
    assert tiny_card["ratio_total"].isna().all()


def test_thinker_only_model_matches_the_full_models_thinker_rows(tiny_model, tiny_card):
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_model.config.thinker_config)
    df = card(thinker).set_index("component")
    assert list(df.index) == ["thinker", "audio_encoder", "vision_encoder", "total"]
    rows = ["thinker", "audio_encoder", "vision_encoder"]
    assert df.loc[rows, "params_total"].tolist() == tiny_card.loc[rows, "params_total"].tolist()
    assert df.loc[rows, "params_active"].tolist() == tiny_card.loc[rows, "params_active"].tolist()
    assert df.loc["audio_encoder", "module"] == "model.audio_tower"


def test_building_the_configs_logs_no_rope_key_warning():
    import logging

    from omnilab.models import real_size
    from omnilab.models.presets import preset_config

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_rope_utils")
    logger.addHandler(handler)
    try:
        real_config(), preset_config("tiny"), real_size.config("qwen3-omni-30b-a3b-random-reduced")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "rope_parameters" in r.getMessage()]
    # the talker still reads its TM-RoPE sections
    assert real_config().talker_config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
