"""Activations of any site: equal to the model's own hidden states, joined to the tokens, saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilab.errors import InterventionError
from omnilab.instrument.budget import BudgetError
from omnilab.instrument.record import ActivationsRecorder, Recording, TokensRecorder, Turn, resolve_requests
from omnilab.trace import Trace

TEXT = [{"role": "user", "content": [{"type": "text", "text": "Name three primary colours."}]}]


class HiddenStates:
    """The model's own output_hidden_states of every forward of a text model (switched on by a pre-hook)."""

    def __init__(self, module):
        self.module = module
        self.forwards: list[tuple[torch.Tensor, ...]] = []

    def __enter__(self):
        def pre(mod, args, kwargs):
            return args, {**kwargs, "output_hidden_states": True}

        def post(mod, args, output):
            self.forwards.append(tuple(h.detach().clone() for h in output.hidden_states))

        self.handles = [
            self.module.register_forward_pre_hook(pre, with_kwargs=True),
            self.module.register_forward_hook(post),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _by_forward(acts, component: str):
    """(phase, step) -> values of one component's forward, in order."""
    rows = acts.rows
    out = {}
    for (phase, step), group in rows[rows["component"] == component].groupby(["phase", "step"], sort=False):
        out[(phase, int(step))] = acts.values[torch.from_numpy(group.index.to_numpy().copy())]
    return list(out.values())


def _assert_residuals_equal_hidden_states(trace, forwards, prefix: str, component: str, norm):
    layers = len(forwards[0]) - 1
    assert layers >= 2 and forwards
    embeds = _by_forward(trace.activations[f"{prefix}0:input"], component)
    assert len(embeds) == len(forwards)
    for f, hidden in enumerate(forwards):
        torch.testing.assert_close(embeds[f], hidden[0][0], rtol=0, atol=0)
        for layer in range(layers):
            captured = _by_forward(trace.activations[f"{prefix}{layer}"], component)[f]
            if layer < layers - 1:  # earlier entries are layer outputs
                torch.testing.assert_close(captured, hidden[layer + 1][0], rtol=0, atol=0)
            else:  # the last entry is already normed
                torch.testing.assert_close(norm(captured), hidden[-1][0], rtol=0, atol=0)


def test_thinker_residual_equals_output_hidden_states_prefill_and_decode(tiny):
    language_model = tiny.model.thinker.model.language_model
    with HiddenStates(language_model) as reference:
        with tiny.trace(sites=["resid.*", "resid.0:input"], dtype=torch.float32) as tr:
            tiny.generate(TEXT, max_new_tokens=4, return_audio=False)
    trace = tr.trace
    assert len(reference.forwards) >= 3  # prefill and decode steps
    phases = trace.activations["resid.1"].rows["phase"]
    assert {"prefill", "decode"} <= set(phases)
    with torch.no_grad():
        _assert_residuals_equal_hidden_states(
            trace, reference.forwards, "resid.", "thinker", language_model.norm
        )


def test_talker_residual_equals_output_hidden_states(tiny):
    talker_model = tiny.model.talker.model
    with HiddenStates(talker_model) as reference:
        with tiny.trace(sites=["talker.resid.*", "talker.resid.0:input"], dtype=torch.float32) as tr:
            reply = tiny.generate(TEXT, max_new_tokens=4, return_audio=True, max_speech_frames=4)
    assert reply.audio is not None
    trace = tr.trace
    assert {"prefill", "decode"} <= set(trace.activations["talker.resid.0"].rows["phase"])
    assert set(trace.activations["talker.resid.0"].rows["modality"]) >= {"speech"}
    with torch.no_grad():
        _assert_residuals_equal_hidden_states(
            trace, reference.forwards, "talker.resid.", "talker", talker_model.norm
        )


def test_rows_join_the_tokens_table(tiny, all_media_conversation):
    with tiny.trace(sites=["resid.2"]) as tr:
        tiny.forward(all_media_conversation)
    acts, tokens = tr.trace.activations["resid.2"], tr.trace.tokens
    assert acts.values.dtype == torch.float32 and acts.values.shape == (len(acts.rows), 64)  # the model's
    joined = acts.rows.merge(tokens, on=["component", "pos"], suffixes=("", "_tok"))
    assert len(joined) == len(acts.rows) == len(tokens)
    assert (joined["modality"] == joined["modality_tok"]).all()
    assert {"audio", "image", "video", "text"} <= set(acts.rows["modality"])


def test_towers_fill_the_placeholders_they_map_to(tiny, all_media_conversation):
    sites = ["audio_tower", "vision_tower", "resid.0:input"]
    with tiny.trace(sites=sites, dtype=torch.float32) as tr:
        tiny.forward(all_media_conversation)
    acts = tr.trace.activations
    embeds = acts["resid.0:input"]
    for tower, modalities in (("audio_tower", {"audio"}), ("vision_tower", {"image", "video"})):
        rows = acts[tower].rows
        assert set(rows["modality"]) == modalities and (rows["pos"] >= 0).all()
        # what the tower gave is what the first layer reads at those positions
        at = embeds.values[torch.from_numpy(rows["pos"].to_numpy().astype(np.int64))]
        torch.testing.assert_close(acts[tower].values, at, rtol=0, atol=0)


def test_modality_and_positions_choose_rows(tiny, all_media_conversation):
    with tiny.trace(sites=["resid.1", "audio_tower"], modality="audio") as tr:
        tiny.forward(all_media_conversation)
    rows = tr.trace.activations["resid.1"].rows
    assert len(rows) > 0 and set(rows["modality"]) == {"audio"}
    with tiny.trace(sites="mlp.*", positions=[0, 3, 5]) as tr:
        tiny.forward(TEXT)
    assert list(tr.trace.activations["mlp.0"].rows["pos"]) == [0, 3, 5]
    assert tr.trace.activations["mlp.3"].values.shape == (3, 64)


def test_positions_outside_the_prompt_say_which_and_what_fits(tiny):
    with pytest.raises(InterventionError, match=r"positions 500, 900 .* 0\.\.\d+"):
        with tiny.trace(sites="resid.0", positions=[1, 500, 900]):
            tiny.forward(TEXT)


def test_unknown_site_names_the_closest(tiny):
    with pytest.raises(InterventionError, match="closest: resid.1"):
        tiny.trace(sites="resid.1x")


def test_capture_over_budget_is_refused_before_the_forward_with_the_estimate(tiny):
    ran = []
    handle = tiny.model.thinker.model.language_model.layers[0].register_forward_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(BudgetError, match=r"activations 13\.3 KB.*the budget is 1\.0 KB"):
            with tiny.trace(sites="resid.*", memory_budget=1000):
                tiny.forward(TEXT)
    finally:
        handle.remove()
    assert ran == []


def test_named_sets_mean_the_existing_captures(tiny):
    with tiny.trace(sites=["routing", "resid.0"]) as tr:
        tiny.forward(TEXT)
    assert tr.trace.rows("routing") > 0 and list(tr.trace.activations) == ["resid.0"]


def test_save_and_load_keep_activations_lazily(tiny, tmp_path):
    with tiny.trace(sites=["resid.0", "resid.0:input"], dtype=torch.bfloat16) as tr:
        tiny.forward(TEXT)
    tr.trace.save(tmp_path / "t")
    assert (tmp_path / "t" / "activations" / "resid.0@input.safetensors").is_file()
    loaded = Trace.load(tmp_path / "t")
    acts = loaded.activations["resid.0"]
    assert "values" not in acts._cache  # not read until asked
    assert acts.values.dtype == torch.bfloat16
    assert torch.equal(acts.values, tr.trace.activations["resid.0"].values)
    assert acts.rows.equals(tr.trace.activations["resid.0"].rows)
    loaded.save(tmp_path / "t")  # over itself: the values it had not read yet survive
    again = Trace.load(tmp_path / "t").activations["resid.0:input"]
    assert torch.equal(again.values, tr.trace.activations["resid.0:input"].values)


def test_code_predictor_rows_follow_its_own_sequence_per_frame(tiny):
    with tiny.trace(sites=["code_predictor.resid.0", "codec_head"]) as tr:
        reply = tiny.generate(TEXT, max_new_tokens=4, max_speech_frames=3)
    rows = tr.trace.activations["code_predictor.resid.0"].rows
    assert set(rows["component"]) == {"code_predictor"} and set(rows["modality"]) == {"speech"}
    frames = len(reply.codes)
    assert sorted(set(rows["frame"])) == list(range(frames))
    books = reply.codes.shape[1]
    assert (rows.groupby("frame")["pos"].max() == books - 1).all()  # codebook 0's embedding, then 1..15
    head = tr.trace.activations["codec_head"]
    assert head.values.shape[1] == tiny.model.talker.codec_head.out_features


def test_batch_row_and_right_padding(tiny):
    ids = tiny.prepare(TEXT)["input_ids"]
    n = ids.shape[1]
    short = ids[:, : n - 3]
    batch = torch.cat([ids, torch.cat([short, torch.zeros(1, 3, dtype=ids.dtype)], 1)])
    mask = torch.ones_like(batch)
    mask[1, n - 3 :] = 0
    recorder = ActivationsRecorder(resolve_requests(tiny.model, "resid.1"), dtype=torch.float32)
    with Recording(tiny.model, [TokensRecorder(), recorder]), torch.inference_mode():
        out = tiny.model.thinker(input_ids=batch, attention_mask=mask, output_hidden_states=True)
    keys, values = recorder.recorded(Turn(tiny.processor.tokenizer, prompt_length=n - 3, batch_row=1))[
        "resid.1"
    ]
    assert list(keys["pos"]) == list(range(n - 3))
    torch.testing.assert_close(values, out.hidden_states[2][1, : n - 3], rtol=0, atol=0)
    np.testing.assert_array_equal(keys["component"], "thinker")
