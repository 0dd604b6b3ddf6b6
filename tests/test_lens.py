"""The logit lens (on the tiny model) and linear probes (on features with a planted answer)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from omnilab import analysis, plots
from omnilab.errors import ConversationError, TraceError


@pytest.fixture(scope="module")
def mixed(all_media_conversation):
    return all_media_conversation


@pytest.fixture(scope="module")
def lens(tiny, mixed):
    return analysis.logit_lens(tiny, mixed, target=" the", top=3)


def test_the_last_layer_of_the_lens_is_the_models_own_prediction(tiny, mixed, lens):
    logits = tiny.forward(mixed)[0]
    last = lens[(lens["layer"] == lens["layer"].max()) & (lens["rank"] == 0)].sort_values("pos")
    np.testing.assert_array_equal(last["token_id"].to_numpy(), logits.argmax(-1).numpy())
    probs = torch.softmax(logits.float(), -1).max(-1).values.numpy()
    np.testing.assert_allclose(last["prob"].to_numpy(), probs, rtol=1e-5)


def test_every_layer_and_position_has_its_top_tokens_in_order(tiny, mixed, lens):
    length = tiny.prepare(mixed)["input_ids"].shape[1]
    assert len(lens) == len(tiny.thinker.model.language_model.layers) * length * 3
    assert (lens.groupby(["layer", "pos"])["prob"].apply(lambda p: p.is_monotonic_decreasing)).all()
    assert set(lens["modality"]) == {"text", "audio", "image", "video"}


def test_the_target_rank_counts_the_tokens_more_probable_than_it(tiny, lens):
    target = tiny.processor.tokenizer.encode(" the", add_special_tokens=False)[0]
    assert (lens["target_id"] == target).all()
    hit = lens[lens["token_id"] == target]  # where the target is among the top 3, its rank is its row's
    assert (hit["target_rank"] == hit["rank"]).all()
    top1 = lens[lens["rank"] == 0]
    assert (
        top1.loc[top1["target_rank"] > 0, "prob"] >= top1.loc[top1["target_rank"] > 0, "target_prob"]
    ).all()


def test_layers_and_positions_select_and_out_of_range_ones_say_what_fits(tiny, mixed):
    picked = analysis.logit_lens(tiny, mixed, layers=[1], positions=[0, -1], top=1)
    length = tiny.prepare(mixed)["input_ids"].shape[1]
    assert picked["layer"].tolist() == [1, 1] and picked["pos"].tolist() == [0, length - 1]
    with pytest.raises(ConversationError, match=r"layer 9 is out of range; the thinker has layers 0-3"):
        analysis.logit_lens(tiny, mixed, layers=[9])
    with pytest.raises(
        ConversationError, match=rf"position {length} is out of range; the prompt has positions"
    ):
        analysis.logit_lens(tiny, mixed, positions=[length])
    with pytest.raises(ConversationError, match="is not a token id"):
        analysis.logit_lens(tiny, mixed, target=10**9)


def test_last_reads_the_last_positions_and_a_short_prompt_whole(tiny):
    length = tiny.prepare("Hi")["input_ids"].shape[1]
    tail = analysis.logit_lens(tiny, "Hi", layers=[0], last=3, top=1)
    assert tail["pos"].tolist() == [length - 3, length - 2, length - 1]
    assert analysis.logit_lens(tiny, "Hi", layers=[0], last=10**4, top=1)["pos"].tolist() == list(
        range(length)
    )
    with pytest.raises(ConversationError, match="last is a whole number"):
        analysis.logit_lens(tiny, "Hi", last=0)


def test_the_lens_heatmap_shows_layers_by_positions(lens):
    fig = plots.logit_lens_heatmap(lens)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (lens["layer"].nunique(), lens["pos"].nunique())
    assert "target rank" in fig.data[0].colorbar.title.text


def _planted(n=400, width=16, seed=0):
    """Layer 0: noise; layer 1: the class is in feature 0; layer 2: `value` is feature 1 (a number)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    value = rng.uniform(0, 10, n)
    noise = rng.standard_normal((3, n, width)).astype(np.float32)
    noise[1, :, 0] += 4.0 * label
    noise[2, :, 1] += value
    return noise, label, value


def test_a_probe_finds_the_planted_class_only_where_it_is():
    features, label, _ = _planted()
    scores = analysis.linear_probe(features, label)
    by_layer = scores.set_index("layer")["test_score"]
    assert (scores["metric"] == "accuracy").all() and (scores["n_classes"] == 3).all()
    assert by_layer[1] > 0.9 and by_layer[0] < 0.5 and by_layer[0] < scores["baseline"].iloc[0] + 0.15


def test_a_probe_regresses_a_number_and_reports_r2():
    features, _, value = _planted()
    scores = analysis.linear_probe({0: features[0], 2: features[2]}, value)
    assert (scores["metric"] == "r2").all()
    by_layer = scores.set_index("layer")["test_score"]
    assert (
        by_layer[2] > 0.8 and by_layer[0] < 0.2
    )  # noise of variance 1 on a value of variance 8.3: R² ≤ 0.89


def test_groups_keep_each_group_on_one_side_of_the_split():
    features, label, _ = _planted()
    groups = np.repeat(np.arange(40), 10)
    scores = analysis.linear_probe(features[1], label, groups=groups, test_size=0.25)
    assert scores["n_test"].iloc[0] % 10 == 0 and scores["test_score"].iloc[0] > 0.9


def test_probe_inputs_that_do_not_fit_get_clear_errors():
    features, label, _ = _planted()
    with pytest.raises(
        TraceError, match=r"layer 0's features have shape \(400, 16\); the probe needs \[399, width\]"
    ):
        analysis.linear_probe(features[0], label[:-1])
    with pytest.raises(TraceError, match="one class only"):
        analysis.linear_probe(features[0], np.zeros(400))
    with pytest.raises(TraceError, match="task 'guess' is not one of"):
        analysis.linear_probe(features[0], label, task="guess")


def test_probe_lines_draw_each_score_and_baseline():
    features, label, _ = _planted()
    scores = analysis.linear_probe(features, label)
    fig = plots.probe_lines(pd.concat([scores.assign(label="class")]))
    assert [t.name for t in fig.data] == ["class", "class baseline"]
    assert list(fig.data[0].y) == scores.sort_values("layer")["test_score"].tolist()


# -- the talker's lens ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def talker_lens(tiny):
    return analysis.talker_lens(tiny, "Hello there", max_new_tokens=4, max_speech_frames=3, top=2)


def test_the_talker_lens_last_layer_is_the_talkers_own_codebook0_argmax(talker_lens):
    # talker_code is the argmax of codec_head's own output (what sampling sees before its logits
    # processors: the spoken code may differ where a repetition penalty steps in)
    last = talker_lens[(talker_lens["layer"] == talker_lens["layer"].max()) & (talker_lens["rank"] == 0)]
    assert len(last) == 3  # the reply's 3 frames (the 4th talker step completes none)
    np.testing.assert_array_equal(last["code"].to_numpy(), last["talker_code"].to_numpy())


def test_the_talker_lens_reads_every_talker_layer_and_frame(tiny, talker_lens):
    layers = len(tiny.model.talker.model.layers)
    assert len(talker_lens) == layers * 3 * 2  # 3 frames: the talker's 4th step completes none
    assert (talker_lens.groupby(["layer", "frame"])["prob"].apply(lambda p: p.is_monotonic_decreasing)).all()


def test_the_talker_lens_heatmap_shows_layers_by_frames(talker_lens):
    fig = plots.talker_lens_heatmap(talker_lens)
    assert np.asarray(fig.data[0].z).shape == (talker_lens["layer"].nunique(), 3)
