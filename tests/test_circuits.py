"""The circuit toolkit on the tiny model: edit= functions, gradients, heads and experts as sites,
attribution patching and head scores.

Equalities are bit-exact where the same operations see the same inputs; each hand-written hook
below is the reference the library's site must equal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import omnilab
from omnilab import analysis
from omnilab.analysis import intervals
from omnilab.instrument.grad import logit_difference
from omnilab.instrument.units import capture, expert_ablation, expert_output, head_ablation, unit_means

A = "Hello there, how are you today?"
B = "Name three big rivers of Europe now."  # the same token count as A
WIDTH, HEADS, HEAD_DIM = 64, 4, 16  # the tiny thinker's


def _layer(lab, layer):
    return lab.thinker.model.language_model.layers[layer]


# -- edits as functions ---------------------------------------------------------------------------
def test_an_identity_edit_is_bit_identical_to_no_edit(tiny):
    base = tiny.forward(A)
    run = {"max_new_tokens": 3, "return_audio": False}
    reply = tiny.generate(A, **run)
    with tiny.intervene(edit={"resid.3": lambda v, rows: v, "attn.1": lambda v, rows: v.clone()}):
        assert torch.equal(tiny.forward(A), base)
        assert tiny.generate(A, **run).token_ids == reply.token_ids


def test_an_edit_that_adds_a_vector_equals_add_bit_for_bit(tiny):
    vec = torch.linspace(-2, 2, WIDTH)
    with tiny.intervene(add={"resid.2": vec}):
        added = tiny.forward(A)
    with tiny.intervene(edit={"resid.2": lambda v, rows: v + vec}):
        edited = tiny.forward(A)
    assert torch.equal(added, edited)
    assert not torch.equal(added, tiny.forward(A))


def test_an_edit_sees_its_rows_and_only_those_at_and_modality_choose(tiny, all_media_conversation):
    seen = []

    def look(values, rows):
        seen.append((values.shape, rows.copy()))
        return values

    length = tiny.prepare(A)["input_ids"].shape[1]
    with tiny.intervene(edit={"resid.1": look}, at=[2, -1]):
        tiny.generate(A, max_new_tokens=3, return_audio=False)
    assert len(seen) == 1  # at= names prompt positions: decode steps are left alone
    shape, rows = seen[0]
    assert shape == (2, WIDTH) and rows["pos"].tolist() == [2, length - 1]
    assert list(rows.columns[:6]) == ["component", "phase", "step", "pos", "modality", "batch"]

    seen.clear()
    with tiny.intervene(edit={"resid.0": look}):
        tiny.generate(A, max_new_tokens=3, return_audio=False)
    assert [r["phase"].iloc[0] for _, r in seen] == ["prefill", "decode", "decode"]
    assert [int(r["pos"].iloc[0]) for _, r in seen[1:]] == [length, length + 1]

    seen.clear()
    ids = tiny.prepare(all_media_conversation)["input_ids"][0]
    with tiny.intervene(edit={"resid.0": look}, modality="image"):
        tiny.forward(all_media_conversation)
    ((shape, rows),) = seen
    assert shape[0] == int((ids == tiny.thinker.config.image_token_id).sum())
    assert set(rows["modality"]) == {"image"}


def test_an_edit_runs_after_set_at_the_same_site_and_its_result_is_what_follows(tiny):
    v = torch.linspace(0, 1, WIDTH)
    got = []

    def double(values, rows):
        got.append(values.clone())
        return values * 2

    seen = []
    handle = _layer(tiny, 1).register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        with tiny.intervene(set={"resid.1": v}, edit={"resid.1": double}):
            tiny.forward(A)
    finally:
        handle.remove()
    assert torch.equal(got[0], v.expand_as(got[0]))  # the edit saw the set values
    assert torch.equal(seen[0][0], (2 * v).expand_as(seen[0][0]))  # and the model went on with its result


def test_edits_reach_the_talker_and_code_predictor_in_generate_and_stream(tiny):
    calls = {"talker.resid.0": [], "code_predictor.resid.0": []}

    def note(key):
        def fn(values, rows):
            calls[key].append(rows[["component", "phase", "step"]].iloc[0].tolist())
            return values

        return fn

    run = {"max_new_tokens": 3, "max_speech_frames": 2}
    base = tiny.generate(A, **run)
    with tiny.intervene(edit={k: note(k) for k in calls}):
        same = tiny.generate(A, **run)
    assert np.array_equal(same.codes, base.codes)
    assert (
        calls["talker.resid.0"][0] == ["talker", "prefill", 0] and calls["talker.resid.0"][1][1] == "decode"
    )
    assert {c[0] for c in calls["code_predictor.resid.0"]} == {"code_predictor"}
    with tiny.intervene(edit={"talker.resid.0": lambda v, rows: v + 50.0}):
        steered = tiny.generate(A, **run)
    assert not np.array_equal(steered.codes, base.codes)
    n = len(calls["talker.resid.0"])
    with tiny.intervene(edit={k: note(k) for k in calls}):
        events = list(tiny.stream(A, **run))
    assert events[-1].kind == "done"
    assert len(calls["talker.resid.0"]) > n  # the stream's talker steps ran the edit too


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda v, rows: v[:1], r"edit\['resid.1'\] returned shape \(1, 64\).*same shape"),
        (lambda v, rows: v.double(), r"returned dtype torch.float64.*\.to\(values.dtype\)"),
        (lambda v, rows: v.to("meta"), r"on meta.*\.to\(values.device\)"),
        (lambda v, rows: None, r"returned NoneType, not a tensor"),
    ],
)
def test_a_wrong_edit_result_is_refused_by_name(tiny, fn, match):
    with tiny.intervene(edit={"resid.1": fn}):
        with pytest.raises(omnilab.InterventionError, match=match):
            tiny.forward(A)


def test_bad_edit_specs_are_refused(tiny):
    with pytest.raises(omnilab.InterventionError, match="give a function fn"):
        tiny.intervene(edit={"resid.1": 3.0})
    with pytest.raises(omnilab.InterventionError, match="router site.*ablate=/force="):
        tiny.intervene(edit={"router.1": lambda v, rows: v})
    with pytest.raises(omnilab.InterventionError, match="head 9 is out of range"):
        tiny.intervene(edit={"attn.1.z.9": lambda v, rows: v})


# -- gradients --------------------------------------------------------------------------------------
def test_the_gradient_at_resid_equals_autograd_through_a_hand_written_hook(tiny):
    metric = logit_difference(tiny, " the", " a")
    result = tiny.gradients(A, metric, sites=["resid.2", "attn.1.z"])
    kept = {}
    handle = _layer(tiny, 2).register_forward_hook(
        lambda m, a, o: kept.__setitem__("x", o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.enable_grad():
            value = metric(tiny.thinker(**tiny.prepare(A)).logits[0])
            (grad,) = torch.autograd.grad(value, [kept["x"]])
    finally:
        handle.remove()
    torch.testing.assert_close(result.grads["resid.2"].values, grad[0].float(), atol=1e-6, rtol=0)
    assert abs(result.metric - float(value.detach())) < 1e-6
    assert grad.abs().max() > 0
    assert result.grads["attn.1.z"].values.shape == (len(result.input_ids), HEADS, HEAD_DIM)
    assert result.grads["resid.2"].rows["pos"].tolist() == list(range(len(result.input_ids)))


def test_the_answer_loss_is_the_answers_cross_entropy(tiny):
    result = tiny.gradients(A, "answer_loss", answer=" I am fine", sites="resid.0")
    answer = tiny.processor.tokenizer.encode(" I am fine", add_special_tokens=False)
    ids = torch.cat([tiny.prepare(A)["input_ids"][0], torch.tensor(answer)])
    assert torch.equal(result.input_ids, ids)
    with torch.inference_mode():
        logits = tiny.thinker(input_ids=ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[-len(answer) - 1 : -1], torch.tensor(answer))
    assert abs(result.metric - float(expected)) < 1e-5
    with pytest.raises(omnilab.InterventionError, match="needs answer="):
        tiny.gradients(A, "answer_loss")


# -- heads ------------------------------------------------------------------------------------------
def test_head_zeroing_equals_a_hand_written_hook_before_o_proj_bit_for_bit(tiny):
    def zero_head(module, args):
        x = args[0].clone()
        x.view(*x.shape[:2], HEADS, HEAD_DIM)[:, :, 2] = 0
        return (x,)

    handle = _layer(tiny, 1).self_attn.o_proj.register_forward_pre_hook(zero_head)
    try:
        expected = tiny.forward(A)
    finally:
        handle.remove()
    with tiny.intervene(set=head_ablation(tiny, {1: [2]})):
        ablated = tiny.forward(A)
    with tiny.intervene(edit={"attn.1.z": lambda v, rows: v * torch.tensor([1.0, 1, 0, 1])[:, None]}):
        edited = tiny.forward(A)
    assert torch.equal(ablated, expected) and torch.equal(edited, expected)
    assert not torch.equal(expected, tiny.forward(A))


def test_per_head_patching_carries_a_runs_heads_into_another(tiny):
    z_a = capture(tiny, A, ["attn.1.z", "attn.1.z.3"])
    assert z_a["attn.1.z"].values.shape[1:] == (HEADS, HEAD_DIM)
    assert torch.equal(z_a["attn.1.z.3"].values, z_a["attn.1.z"].values[:, 3])
    with tiny.intervene(set={"attn.1.z": z_a["attn.1.z"].values}):
        patched = tiny.forward(B)  # every head of layer 1 from A: B's later layers see A's attention there
    with tiny.intervene(set={"attn.1": _attn_output(tiny, A)}):
        expected = tiny.forward(B)
    assert torch.equal(patched, expected)
    means = unit_means(tiny, [A, B], ["attn.1.z"])
    with tiny.intervene(set=head_ablation(tiny, {1: [0, 3]}, means=means)):
        seen = capture(tiny, A, ["attn.1.z"])["attn.1.z"].values
    assert torch.equal(seen[:, 0], means["attn.1.z"][0].expand_as(seen[:, 0]))
    assert torch.equal(seen[:, 1], z_a["attn.1.z"].values[:, 1])


def _attn_output(lab, conversation):
    seen = []
    handle = _layer(lab, 1).self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0].clone()))
    try:
        lab.forward(conversation)
    finally:
        handle.remove()
    return seen[0][0]


# -- experts ----------------------------------------------------------------------------------------
def _routed(lab, conversation, layer, expert):
    seen = {}
    experts = _layer(lab, layer).mlp.experts
    handle = experts.register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
    try:
        lab.forward(conversation)
    finally:
        handle.remove()
    return seen["args"]


def test_expert_zeroing_equals_a_hand_written_hook_on_the_fused_expert_output(tiny):
    layer, expert = 1, 3
    hidden, index, weights = _routed(tiny, A, layer, expert)
    assert (index == expert).any()  # some token is routed to it

    def zero_weight(module, args):  # the expert's term of the fused weighted sum, removed
        h, i, w = args
        return h, i, torch.where(i == expert, torch.zeros_like(w), w)

    def subtract(module, args, output):  # the same, taken off the fused output by hand
        h, i, w = args
        token, rank = torch.where(i == expert)
        term = expert_output(module, h[token], expert) * w[token, rank][:, None]
        return output.index_add(0, token, -term)

    experts = _layer(tiny, layer).mlp.experts
    outputs = {}
    for name, kind, hook in (("weight", "pre", zero_weight), ("subtract", "post", subtract)):
        handle = (experts.register_forward_pre_hook if kind == "pre" else experts.register_forward_hook)(hook)
        try:
            outputs[name] = tiny.forward(A)
        finally:
            handle.remove()
    with tiny.intervene(set=expert_ablation(tiny, {layer: [expert]})):
        zeroed = tiny.forward(A)
    assert torch.equal(zeroed, outputs["weight"])
    torch.testing.assert_close(zeroed, outputs["subtract"], atol=1e-5, rtol=0)
    assert not torch.equal(zeroed, tiny.forward(A))


def test_an_experts_rows_are_its_routed_tokens_and_an_identity_edit_changes_nothing(tiny):
    layer, expert = 1, 3
    hidden, index, weights = _routed(tiny, A, layer, expert)
    token, rank = torch.where(index == expert)
    base = tiny.forward(A)
    acts = capture(tiny, A, [f"expert.{layer}.{expert}"])[f"expert.{layer}.{expert}"]
    assert acts.rows["pos"].tolist() == token.tolist()
    assert acts.rows["rank"].tolist() == rank.tolist()
    np.testing.assert_allclose(acts.rows["weight"], weights[token, rank].numpy(), rtol=1e-6)
    assert torch.equal(acts.values, expert_output(_layer(tiny, layer).mlp.experts, hidden[token], expert))
    assert torch.equal(tiny.forward(A), base)  # capture (an identity edit) left the model alone
    means = unit_means(tiny, [A], [f"expert.{layer}.{expert}"])
    with tiny.intervene(set=expert_ablation(tiny, {layer: [expert]}, means=means)):
        mean_ablated = tiny.forward(A)
    assert not torch.equal(mean_ablated, base)


def test_the_talkers_experts_are_sites_too(tiny):
    run = {"max_new_tokens": 2, "max_speech_frames": 2}
    base = tiny.generate(A, **run)
    routed = []
    heads = []
    edits = {
        "talker.expert.0.1": lambda v, rows: (routed.append(rows), v)[1],
        "talker.attn.0.z": lambda v, rows: (heads.append(v.shape), v)[1],
    }
    with tiny.intervene(edit=edits):
        same = tiny.generate(A, **run)
    assert heads and all(shape[1:] == (HEADS, HEAD_DIM) for shape in heads)
    assert np.array_equal(same.codes, base.codes)
    rows = pd.concat(routed)
    assert set(rows["component"]) == {"talker"} and {"prefill", "decode"} & set(rows["phase"])
    with tiny.intervene(set={f"talker.expert.0.{e}": torch.full((WIDTH,), 30.0) for e in range(16)}):
        changed = tiny.generate(A, **run)
    assert not np.array_equal(changed.codes, base.codes)


# -- attribution patching and head scores -------------------------------------------------------------
@pytest.fixture(scope="module")
def image_pair(data_dir, tmp_path_factory):
    image = Image.open(data_dir / "image.png")
    blank = tmp_path_factory.mktemp("circuits") / "blank.png"
    Image.new(image.mode, image.size).save(blank)

    def ask(path):
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What is this?"}],
            }
        ]

    return ask(data_dir / "image.png"), ask(blank)


def test_attribution_patching_estimates_the_sweeps_cells_and_ranks_them_alike(tiny, image_pair):
    sites = ["resid.1", "resid.3"]
    atp = analysis.attribution_patching(tiny, *image_pair, " the", sites=sites, positions="each")
    sweep = analysis.patching_sweep(tiny, *image_pair, " the", sites=sites, positions="each")
    assert atp[["site", "pos_start"]].equals(sweep[["site", "pos_start"]])  # the same cells, in order
    assert atp["clean"].iloc[0] == pytest.approx(sweep["clean"].iloc[0], abs=1e-5)
    assert atp["corrupted"].iloc[0] == pytest.approx(sweep["corrupted"].iloc[0], abs=1e-5)
    # before the image the two prompts are the same: nothing to patch, and AtP says so
    ids = tiny.prepare(image_pair[0])["input_ids"][0]
    first_image = int((ids == tiny.thinker.config.image_token_id).nonzero()[0])
    assert atp[atp["pos_start"] < first_image]["estimate"].abs().max() < 1e-6
    agree = analysis.atp_agreement(atp, sweep)
    assert agree["cells"] == len(sweep) and agree["spearman"] > 0.4 and agree["pearson"] > 0.8


def test_attribution_patching_refuses_misaligned_prompts(tiny, image_pair):
    with pytest.raises(omnilab.InterventionError, match="tokens and corrupted"):
        analysis.attribution_patching(tiny, image_pair[0], A, " the", sites="resid.0")


def test_head_scores_rank_a_planted_listening_head_first():
    tokens = pd.DataFrame(
        {"component": "thinker", "phase": "prefill", "pos": range(6),
         "modality": ["text", "audio", "audio", "audio", "text", "text"]}
    )  # fmt: skip
    rows = []
    for head, on_audio in ((0, 0.2), (1, 0.9), (2, 0.5)):
        rows += [("thinker", 0, head, 5, 0, 1, (1 - on_audio) / 2, "block"),
                 ("thinker", 0, head, 5, 1, 4, on_audio, "block"),
                 ("thinker", 0, head, 5, 4, 6, (1 - on_audio) / 2, "block")]  # fmt: skip
    columns = ["component", "layer", "head", "query_pos", "key_pos", "key_end", "weight", "reduction"]
    scores = analysis.head_scores(
        {"attention": pd.DataFrame(rows, columns=columns), "tokens": tokens}, "audio"
    )
    assert scores["mass"].tolist() == pytest.approx([0.2, 0.9, 0.5])
    assert scores.sort_values("rank")["head"].tolist() == [1, 2, 0]


def test_head_scores_of_a_traced_forward_are_the_recorded_rows_mass(tiny, all_media_conversation):
    with tiny.trace(capture=("attention",), attention_layers={"thinker": [1]}) as tr:
        tiny.forward(all_media_conversation)
    scores = analysis.head_scores(tr.trace, "audio")
    assert len(scores) == HEADS and scores["mass"].between(0, 1).all() and scores["mass"].max() > 0
    attention, tokens = tr.trace.attention, tr.trace.tokens
    row = attention[attention["reduction"] == "row"]
    audio = set(tokens[tokens["modality"] == "audio"]["pos"])
    by_row = row[row["key_pos"].isin(audio)].groupby("head")["weight"].apply(lambda w: w.astype(float).sum())
    np.testing.assert_allclose(scores["mass"], by_row.to_numpy(), atol=2e-3)  # float16 sums


def test_the_atp_bench_reports_a_speed_ratio_and_agreement():
    from omnilab.bench import atp
    from omnilab.cli import BENCHES

    figures = atp.run("tiny", tokens=64, layers=1, sweep_positions=3)
    assert "atp" in BENCHES
    assert figures["cells"] == figures["layers"] * figures["tokens"]
    assert figures["speedup"] == pytest.approx(figures["sweep_s"] / figures["atp_s"])
    assert figures["agreement"]["cells"] == figures["layers"] * figures["sweep_timed_positions"]


def test_the_organisms_corrupted_twins_keep_the_layout():
    from omnilab.organism import circuits
    from omnilab.organism.world import Example

    wave = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    picture = Image.new("RGB", (40, 30), "red")
    example = Example(
        "speech",
        [{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)}, {"type": "image", "image": picture},
                                      {"type": "text", "text": "Which word?"}]}],
        "one",
    )  # fmt: skip
    silent = circuits.silenced(example)[0]["content"]
    assert silent[0]["audio"][1] == 16000 and np.array_equal(silent[0]["audio"][0], np.zeros_like(wave))
    blank = circuits.blanked(example)[0]["content"][1]["image"]
    assert blank.size == picture.size and blank.getextrema() == ((0, 0), (0, 0), (0, 0))
    noisy = circuits.noisy(example, 0.0, seed=1).conversation[0]["content"][0]["audio"][0]
    assert noisy.shape == wave.shape and np.mean((noisy - wave) ** 2) == pytest.approx(
        np.mean(wave**2), rel=0.1
    )
    assert intervals.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook interval
