"""The real 30B-A3B at full size with random weights: on the meta device here, real width in bf16 (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import omnilab
from omnilab.cli import main
from omnilab.models import real_size
from omnilab.models.card import meta_model, real_config

NAME = "qwen3-omni-30b-a3b-random"


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_random_real_size_model_is_the_published_architecture_on_the_meta_device():
    model = real_size.build(NAME, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert numel(model) == numel(meta_model(real_config())) > 35e9
    text = model.config.thinker_config.text_config
    assert (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok) == (48, 128, 8)
    talker = model.config.talker_config.text_config
    assert (talker.num_hidden_layers, talker.num_experts, talker.num_experts_per_tok) == (20, 128, 6)


def test_its_card_equals_the_instruct_card(capsys):
    random_card, real_card = omnilab.card(NAME), omnilab.card("qwen3-omni-30b-a3b-instruct")
    assert random_card["params_total"].tolist() == real_card["params_total"].tolist()
    assert main(["card", "--model", NAME]) == 0
    assert "128" in capsys.readouterr().out


def test_the_reduced_variant_keeps_every_width_and_cuts_only_depth():
    reduced, real = real_size.config(f"{NAME}-reduced"), real_config()
    r, f = reduced.thinker_config.text_config, real.thinker_config.text_config
    assert (r.hidden_size, r.num_experts, r.moe_intermediate_size) == (f.hidden_size, f.num_experts, 768)
    assert r.num_hidden_layers == 2 and reduced.talker_config.text_config.num_hidden_layers == 1
    assert reduced.thinker_config.audio_token_id == real.thinker_config.audio_token_id
    assert 2.3e9 < numel(meta_model(reduced)) < 2.6e9


@pytest.mark.slow
def test_the_reduced_real_width_model_builds_in_bf16_and_traces_expert_ids_of_0_to_127():
    lab = omnilab.load(f"{NAME}-reduced")
    assert lab.random_weights and lab.model_id == f"omnilab/{NAME}-reduced"
    assert next(lab.model.parameters()).dtype == torch.bfloat16
    gate = lab.model.thinker.model.language_model.layers[1].mlp.gate
    seen = []
    handle = gate.register_forward_hook(lambda module, args, output: seen.append(output[2].clone()))
    try:
        with lab.trace() as tracer:
            lab.forward([{"role": "user", "content": "Count the experts of a real-width layer."}])
    finally:
        handle.remove()
    routing = tracer.trace.routing
    layer = routing[(routing["component"] == "thinker") & (routing["layer"] == 1)]
    experts = layer.sort_values(["pos", "rank"])["expert"].to_numpy().reshape(-1, 8)
    assert experts.min() >= 0 and experts.max() <= 127 and len(np.unique(experts)) > 8
    np.testing.assert_array_equal(experts, seen[0].reshape(-1, 8).numpy())
