"""Input attribution and residual-codebook audio on the tiny model.

Every expected value is computed independently of omnilab.analysis.attribution: through the model's
own thinker forward (which merges media and positions itself), with hooks only where an ablation
must zero embeddings.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import omnilab
from omnilab import analysis, plots
from omnilab.plots import MODALITY_COLORS

REPLY = [9707, 11, 1879]  # a fixed reply ("Hello, world"): target 1 is "," after "Hello"
TARGET = 1


@pytest.fixture(scope="module")
def conversation(data_dir):
    return [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": str(data_dir / "speech.wav")},
                {"type": "image", "image": str(data_dir / "image.png")},
                {"type": "text", "text": "What do you hear and see?"},
            ],
        }
    ]


@pytest.fixture(scope="module")
def video_conversation(data_dir):
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(data_dir / "video.mp4")},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]


@pytest.fixture(scope="module")
def ig(tiny, conversation):
    return analysis.attribute(tiny, conversation, reply=REPLY, target=TARGET, steps=64)


@pytest.fixture(scope="module")
def ablation(tiny, conversation):
    return analysis.attribute(tiny, conversation, reply=REPLY, target=TARGET, method="feature_ablation")


def _logprob(lab, conversation, prefix, token, *, zero_positions=None) -> float:
    """log p(token | prompt + prefix) from the thinker's own forward; `zero_positions` (bool [S])
    zeroes those positions' merged embeddings and deepstack features on the way into the decoder."""
    inputs = dict(lab.prepare(conversation))
    extra = torch.tensor([prefix], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    decoder = lab.thinker.model.language_model
    handle = None
    if zero_positions is not None:
        zero = torch.tensor(np.asarray(zero_positions, dtype=bool))

        def pre_hook(module, args, kwargs):
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"].masked_fill(zero[None, :, None], 0.0)
            if kwargs.get("deepstack_visual_embeds") is not None:
                rows = zero[kwargs["visual_pos_masks"][0]]
                kwargs["deepstack_visual_embeds"] = [
                    layer.masked_fill(rows[:, None], 0.0) for layer in kwargs["deepstack_visual_embeds"]
                ]
            return args, kwargs

        handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    saved = lab.thinker.model.rope_deltas
    try:
        with torch.no_grad():
            logits = lab.thinker(**inputs).logits[0, -1]
    finally:
        lab.thinker.model.rope_deltas = saved
        if handle is not None:
            handle.remove()
    return float(torch.log_softmax(logits.float(), -1)[token])


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


# -- Integrated Gradients ---------------------------------------------------------------------------
def test_integrated_gradients_are_complete(tiny, conversation, ig):
    at_input = _logprob(tiny, conversation, REPLY[:TARGET], REPLY[TARGET])
    at_zero = -math.log(tiny.thinker.config.text_config.vocab_size)  # zero embeddings: uniform logits
    assert ig.target["logprob"] == pytest.approx(at_input, abs=1e-4)
    assert ig.target["baseline_logprob"] == pytest.approx(at_zero, abs=1e-4)
    assert abs(ig.delta) < 1e-3
    assert abs(ig.total - (at_input - at_zero)) <= abs(ig.delta) + 1e-4
    assert ig.total == pytest.approx(ig.tokens["attribution"].sum())


def test_by_modality_sums_to_the_total(ig, ablation):
    for attr in (ig, ablation):
        by_modality = analysis.attribution_by_modality(attr)
        assert list(by_modality["modality"]) == ["text", "audio", "image"]
        assert by_modality["attribution"].sum() == pytest.approx(attr.total, abs=1e-9)
        assert by_modality["share"].sum() == pytest.approx(1.0)
        assert by_modality["tokens"].sum() == len(attr.tokens)


def test_every_input_position_has_a_row(tiny, conversation, ig):
    ids = tiny.prepare(conversation)["input_ids"][0].tolist() + REPLY[:TARGET]
    tokens = ig.tokens
    assert tokens["pos"].tolist() == list(range(len(ids)))
    assert tokens["token_id"].tolist() == ids
    assert tokens["attribution"].notna().all()
    assert (tokens["modality"] == "audio").sum() == ids.count(151675)
    assert (tokens["modality"] == "image").sum() == ids.count(151655)
    assert set(tokens["modality"]) == {"text", "audio", "image"}
    media = tokens[tokens["modality"] != "text"]
    assert (media["item"] == 0).all() and media["seconds"].notna().all()
    assert tokens["phase"].iloc[-1] == "decode" and tokens["piece"].iloc[-1] == "Hello"
    assert ig.target == {**ig.target, "token_id": REPLY[TARGET], "piece": ",", "index": TARGET}
    # the deepstack part is there, and only at image positions
    assert (tokens.loc[tokens["modality"] != "image", "deepstack"] == 0).all()
    assert (tokens.loc[tokens["modality"] == "image", "deepstack"] != 0).any()


def test_attribution_leaves_the_model_as_found(tiny):
    model = tiny.model
    model.thinker.lm_head.weight.requires_grad_(False)  # one flag that differs from the rest
    before = (
        _hook_count(model),
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        model.thinker.model.rope_deltas,
    )
    try:
        analysis.attribute(tiny, "Hi", reply=[9707], steps=4)
        analysis.attribute(tiny, "Hi", reply=[9707], method="feature_ablation", routing="frozen")
        after = (
            _hook_count(model),
            [p.requires_grad for p in model.parameters()],
            [m.training for m in model.modules()],
            model.thinker.model.rope_deltas,
        )
    finally:
        model.thinker.lm_head.weight.requires_grad_(True)
    assert after[:3] == before[:3]
    assert after[3] is before[3]


def test_attribution_runs_inside_inference_mode(tiny):
    with torch.inference_mode():
        attr = analysis.attribute(tiny, "Hi", reply=[9707], steps=4)
    assert np.isfinite(attr.tokens["attribution"]).all() and np.isfinite(attr.delta)


def test_default_target_is_the_first_greedy_token(tiny):
    expected = tiny.generate("Hi", return_audio=False, max_new_tokens=1).token_ids[0]
    attr = analysis.attribute(tiny, "Hi", method="feature_ablation")
    assert attr.target["token_id"] == expected and attr.target["index"] == 0
    assert len(attr.tokens) == tiny.prepare("Hi")["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reply": REPLY, "target": 3}, "out of range"),
        ({"reply": REPLY, "target": -4}, "out of range"),
        ({"reply": REPLY, "target": "first"}, "index"),
        ({"target": -1}, "not known yet"),
        ({"reply": [], "target": 0}, "no tokens"),
        ({"reply": REPLY, "method": "shapley"}, "method"),
        ({"reply": REPLY, "steps": 1}, "steps"),
        ({"reply": REPLY, "baseline": "noise"}, "baseline"),
    ],
)
def test_bad_requests_get_a_clear_error(tiny, options, message):
    with pytest.raises(omnilab.ConversationError, match=message):
        analysis.attribute(tiny, "Hi", **options)


# -- feature ablation -----------------------------------------------------------------------------
def test_ablating_a_group_changes_the_logprob_by_its_attribution(tiny, conversation, ablation):
    assert math.isnan(ablation.delta) and ablation.method == "feature_ablation"
    at_input = _logprob(tiny, conversation, REPLY[:TARGET], REPLY[TARGET])
    tokens = ablation.tokens
    by_item = analysis.attribution_by_item(ablation)
    assert list(zip(by_item["modality"], by_item["item"], strict=True)) == [
        ("text", -1),
        ("audio", 0),
        ("image", 0),
    ]
    for row in by_item.itertuples():
        group = ((tokens["modality"] == row.modality) & (tokens["item"] == row.item)).to_numpy()
        ablated = _logprob(tiny, conversation, REPLY[:TARGET], REPLY[TARGET], zero_positions=group)
        assert row.attribution == pytest.approx(at_input - ablated, abs=1e-5), row.modality
        # spread evenly over the group's tokens
        assert np.allclose(tokens.loc[group, "attribution"], row.attribution / group.sum())


# -- summaries ----------------------------------------------------------------------------------
def test_audio_windows_partition_the_audio_attribution(ig):
    windows = analysis.attribution_by_window(ig, "audio", seconds=1.0)
    audio = ig.tokens[ig.tokens["modality"] == "audio"]
    assert windows["attribution"].sum() == pytest.approx(audio["attribution"].sum())
    assert windows["tokens"].sum() == len(audio)
    assert np.allclose(windows["window_end"] - windows["window_start"], 1.0)
    assert windows["window_start"].is_monotonic_increasing and windows["window_start"].iloc[0] == 0.0


def test_video_attribution_by_frame(tiny, video_conversation):
    attr = analysis.attribute(tiny, video_conversation, reply=REPLY, method="feature_ablation")
    frames = analysis.attribution_by_window(attr, "video")
    grid = tiny.prepare(video_conversation)["video_grid_thw"][0].tolist()
    assert frames["frame"].tolist() == list(range(grid[0]))
    video = attr.tokens[attr.tokens["modality"] == "video"]
    assert frames["attribution"].sum() == pytest.approx(video["attribution"].sum())
    assert (frames["window_end"] > frames["window_start"]).all()
    assert np.allclose(frames["window_start"].iloc[1:].to_numpy(), frames["window_end"].iloc[:-1].to_numpy())


def test_image_attribution_on_its_patch_grid(tiny, conversation, ig):
    patches = analysis.attribution_by_patch(ig, item=0)
    _, h, w = tiny.prepare(conversation)["image_grid_thw"][0].tolist()
    assert len(patches) == (h // 2) * (w // 2)  # one token per 2×2 merged patch
    assert patches["h"].max() == h // 2 - 1 and patches["w"].max() == w // 2 - 1
    image = ig.tokens[ig.tokens["modality"] == "image"]
    assert patches["attribution"].sum() == pytest.approx(image["attribution"].sum())
    with pytest.raises(omnilab.ConversationError, match="no image item 3"):
        analysis.attribution_by_patch(ig, item=3)


# -- plots ----------------------------------------------------------------------------------------
def test_token_figure_has_one_bar_trace_per_modality(ig):
    fig = plots.attribution_tokens(ig.tokens)
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["text", "audio", "image"]
    assert sum(len(t.x) for t in fig.data) == len(ig.tokens)
    assert [t.marker.color for t in fig.data] == [MODALITY_COLORS[m] for m in ("text", "audio", "image")]
    text = fig.data[0]
    assert "&lt;|im_start|&gt;" in text.customdata[:, 0] and "\\n" in text.customdata[:, 0]


def test_window_and_patch_figures_draw_the_summaries(ig):
    windows = analysis.attribution_by_window(ig, "audio", seconds=1.0)
    fig = plots.attribution_windows(windows, modality="audio")
    assert sum(len(t.y) for t in fig.data) == len(windows)
    assert np.allclose(np.concatenate([t.y for t in fig.data]), windows["attribution"])
    patches = analysis.attribution_by_patch(ig, item=0)
    grid = np.asarray(plots.attribution_patches(patches).data[0].z, dtype=float)
    assert grid.shape == (patches["h"].max() + 1, patches["w"].max() + 1)
    assert np.nansum(grid) == pytest.approx(patches["attribution"].sum())


def test_modality_figure_draws_the_summary(ig):
    by_modality = analysis.attribution_by_modality(ig)
    fig = plots.attribution_modality(by_modality)
    (bar,) = fig.data
    assert list(bar.x) == ["text", "audio", "image"]
    assert np.allclose(bar.y, by_modality["attribution"])
    assert list(bar.marker.color) == [MODALITY_COLORS[m] for m in bar.x]
    with pytest.raises(ValueError, match="share"):
        plots.attribution_modality(by_modality.drop(columns="share"))


# -- residual codebooks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spoken(tiny):
    return tiny.generate("Hello", trace=True, max_new_tokens=4, max_speech_frames=16)


def test_keeping_all_codebooks_reproduces_the_reply_audio(tiny, spoken):
    scale = np.abs(spoken.audio).max()
    for source in (spoken, spoken.trace, spoken.codes, torch.as_tensor(spoken.codes)):
        audio = analysis.residual_audio(tiny, source, keep=16)
        assert audio.dtype == np.float32 and audio.shape == spoken.audio.shape
        assert np.abs(audio - spoken.audio).max() <= 1e-5 * scale


def test_dropping_codebooks_removes_their_embeddings(tiny, spoken):
    """keep=k equals a plain decode where the embeddings of codebooks k..15 are zero vectors."""
    code2wav = tiny.model.code2wav
    size = code2wav.config.codebook_size
    kept = analysis.residual_audio(tiny, spoken, keep=4)
    saved = code2wav.code_embedding.weight.detach().clone()
    try:
        with torch.no_grad():
            code2wav.code_embedding.weight[4 * size :] = 0
            codes = torch.as_tensor(spoken.codes.T[None])
            expected = code2wav.chunked_decode(codes).reshape(-1).numpy()
    finally:
        with torch.no_grad():
            code2wav.code_embedding.weight.copy_(saved)
    assert np.allclose(kept, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(kept, spoken.audio)
    assert _hook_count(code2wav) == 0


def test_residual_series_covers_every_keep(tiny, spoken):
    series = analysis.residual_series(tiny, spoken.trace, keeps=[1, 8, 16])
    assert list(series) == [1, 8, 16]
    assert {len(a) for a in series.values()} == {len(spoken.audio)}
    assert np.array_equal(series[16], analysis.residual_audio(tiny, spoken, keep=16))


@pytest.mark.parametrize("keep", [0, 17, 2.5, True])
def test_keep_out_of_range_is_an_intervention_error(tiny, spoken, keep):
    with pytest.raises(omnilab.InterventionError, match="keep must be an int in 1..16"):
        analysis.residual_audio(tiny, spoken, keep=keep)
