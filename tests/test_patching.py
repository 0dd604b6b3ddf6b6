"""lab.intervene(set=, add=, at=) and analysis.patching_sweep on the tiny model.

Equalities are bit-exact where the same operations see the same inputs. Where a patch changes one
token, the other tokens' logits may move by float rounding (≤ 1e-6 here): the grouped expert matmul
groups tokens by expert, so a token routed elsewhere changes the others' matmul shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import omnilab
from omnilab import analysis, plots

A = "Hello there, how are you today?"
B = "Name three big rivers of Europe now."  # the same token count as A (checked below)
WIDTH = 64  # the tiny thinker's hidden size


def _capture(lab, site_module, conversation, **run):
    """Every output of `site_module` during `lab.forward` (or generate with run=...)."""
    seen = []
    handle = site_module.register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).clone())
    )
    try:
        if run:
            lab.generate(conversation, **run)
        else:
            lab.forward(conversation)
    finally:
        handle.remove()
    return seen


def _layer(lab, layer):
    return lab.thinker.model.language_model.layers[layer]


def test_patching_a_runs_own_activation_back_changes_nothing(tiny):
    base = tiny.forward(A)
    (own,) = _capture(tiny, _layer(tiny, 1), A)
    with tiny.intervene(set={"resid.1": own}):
        patched = tiny.forward(A)
    assert torch.equal(base, patched)


def test_run_a_residual_at_every_position_makes_b_give_a_logits(tiny):
    assert tiny.prepare(A)["input_ids"].shape == tiny.prepare(B)["input_ids"].shape
    logits_a, logits_b = tiny.forward(A), tiny.forward(B)
    assert not torch.equal(logits_a, logits_b)
    (resid_a,) = _capture(tiny, _layer(tiny, 1), A)
    with tiny.intervene(set={"resid.1": resid_a[0]}):  # [L, width]: every prompt position
        patched = tiny.forward(B)
    assert torch.equal(patched, logits_a)


def test_adding_a_zero_vector_is_bit_identical(tiny):
    base = tiny.forward(A)
    with tiny.intervene(add={"resid.2": torch.zeros(WIDTH), "attn.0": torch.zeros(WIDTH)}):
        assert torch.equal(tiny.forward(A), base)


def test_at_limits_a_patch_to_those_positions(tiny):
    base = tiny.forward(A)
    (before,) = _capture(tiny, _layer(tiny, 2), A)
    v = torch.full((WIDTH,), 3.0)
    with tiny.intervene(add={"resid.2": v}, at=[2, -1]):
        (after,) = _capture(tiny, _layer(tiny, 2), A)
        logits = tiny.forward(A)
    changed = (after != before).any(-1)[0]
    length = before.shape[1]
    assert changed.nonzero().reshape(-1).tolist() == [2, length - 1]
    assert torch.equal(after[0, 2], before[0, 2] + v)
    torch.testing.assert_close(logits[0, :2], base[0, :2], atol=1e-6, rtol=0)  # rounding only (see top)
    assert (logits[0, -1] - base[0, -1]).abs().max() > 1e-3


def test_modality_limits_a_patch_to_that_modalitys_tokens(tiny, all_media_conversation):
    ids = tiny.prepare(all_media_conversation)["input_ids"][0]
    image = ids == tiny.thinker.config.image_token_id
    (before,) = _capture(tiny, _layer(tiny, 0), all_media_conversation)
    with tiny.intervene(set={"resid.0": torch.ones(WIDTH)}, modality="image"):
        (after,) = _capture(tiny, _layer(tiny, 0), all_media_conversation)
    assert torch.equal(after[0, image], torch.ones(int(image.sum()), WIDTH))
    assert torch.equal(after[0, ~image], before[0, ~image])


def test_a_vector_applies_at_generated_positions_unless_at_limits_it(tiny):
    run = {"max_new_tokens": 4, "return_audio": False}
    v = torch.linspace(-1, 1, WIDTH)
    with tiny.intervene(set={"resid.3": v}):
        everywhere = _capture(tiny, _layer(tiny, 3), A, **run)
    assert len(everywhere) == 4  # prefill + 3 decode steps
    assert all(torch.equal(out[0], v.expand_as(out[0])) for out in everywhere)
    with tiny.intervene(set={"resid.3": v}, at=[0]):
        prompt_only = _capture(tiny, _layer(tiny, 3), A, **run)
    assert torch.equal(prompt_only[0][0, 0], v) and not torch.equal(prompt_only[0][0, 1], v)
    assert not any(torch.equal(out[0, 0], v) for out in prompt_only[1:])


def test_rows_without_at_patch_the_prompt_and_leave_generated_tokens(tiny):
    run = {"max_new_tokens": 3, "return_audio": False}
    own = _capture(tiny, _layer(tiny, 1), A, **run)
    with tiny.intervene(set={"resid.1": own[0][0]}):
        again = _capture(tiny, _layer(tiny, 1), A, **run)
    assert all(torch.equal(x, y) for x, y in zip(own, again, strict=True))


def test_set_and_add_nest_with_router_interventions(tiny):
    with tiny.intervene(ablate={"thinker": {0: [1, 2]}}):
        ablated = tiny.forward(A)
    with tiny.intervene(ablate={"thinker": {0: [1, 2]}}), tiny.intervene(add={"resid.1": torch.zeros(WIDTH)}):
        both = tiny.forward(A)
    assert torch.equal(ablated, both)
    assert not torch.equal(ablated, tiny.forward(A))


def test_the_talker_residual_can_be_steered_and_zero_changes_no_code(tiny):
    run = {"max_new_tokens": 4, "max_speech_frames": 3}
    base = tiny.generate(A, **run)
    with tiny.intervene(add={"talker.resid.0": torch.zeros(WIDTH)}):
        same = tiny.generate(A, **run)
    with tiny.intervene(add={"talker.resid.0": torch.full((WIDTH,), 50.0)}):
        steered = tiny.generate(A, **run)
    assert np.array_equal(same.codes, base.codes) and np.array_equal(same.audio, base.audio)
    assert steered.token_ids == base.token_ids  # the thinker is untouched
    assert not np.array_equal(steered.codes, base.codes)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"set": {"resid.1": torch.zeros(32)}}, r"shape \(32,\).*width 64"),
        ({"add": {"resid.9": torch.zeros(WIDTH)}}, "no site 'resid.9'.*closest: resid"),
        ({"set": {"resid.1": torch.zeros(3, WIDTH)}, "at": [1, 2]}, "3 rows but at= names 2"),
        ({"add": {"router.1": torch.zeros(WIDTH)}}, "router site.*ablate=/force="),
        ({"at": [1]}, "give set= or add="),
        ({"add": {"resid.1": torch.zeros(WIDTH)}, "at": "first"}, "at= takes a position"),
    ],
)
def test_bad_patches_get_clear_errors(tiny, spec, match):
    with pytest.raises(omnilab.InterventionError, match=match):
        tiny.intervene(**spec)


def test_positions_outside_the_prompt_and_wrong_row_counts_are_refused_at_the_run(tiny):
    length = tiny.prepare(A)["input_ids"].shape[1]
    with tiny.intervene(add={"resid.1": torch.zeros(WIDTH)}, at=[length]):
        with pytest.raises(
            omnilab.InterventionError, match=f"outside the thinker's prompt \\(positions 0-{length - 1}"
        ):
            tiny.forward(A)
    with tiny.intervene(set={"resid.1": torch.zeros(length + 2, WIDTH)}):
        with pytest.raises(
            omnilab.InterventionError, match=f"has {length + 2} rows; the prompt has {length}"
        ):
            tiny.forward(A)


# -- the patching sweep ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_pair(data_dir, tmp_path_factory):
    image = Image.open(data_dir / "image.png")
    blank = tmp_path_factory.mktemp("patching") / "blank.png"
    Image.new(image.mode, image.size).save(blank)

    def ask(path):
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What is this?"}],
            }
        ]

    return ask(data_dir / "image.png"), ask(blank)


@pytest.fixture(scope="module")
def sweep(tiny, image_pair):
    return analysis.patching_sweep(tiny, *image_pair, " the", sites="resid.*", positions="modality")


def test_a_sweep_is_a_tidy_frame_of_layers_by_modality_blocks(tiny, sweep):
    assert len(sweep) == 4 * 3  # 4 layers x (text, image, text) blocks
    assert list(sweep["modality"].unique()) == ["text", "image"]
    assert sweep["layer"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert (sweep["positions"] == sweep["pos_end"] - sweep["pos_start"] + 1).all()


def test_patching_the_last_layer_at_the_last_block_recovers_the_clean_metric(sweep):
    last = sweep[(sweep["layer"] == 3)].sort_values("pos_end").iloc[-1]
    assert last["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert sweep[(sweep["layer"] == 3)].sort_values("pos_end").iloc[0]["recovered"] == pytest.approx(
        0, abs=1e-4
    )


def test_a_batched_sweep_equals_one_forward_per_patch(tiny, image_pair, sweep):
    # Tolerance 1e-5 on log-probabilities: batched rows go through the same layers, but the grouped
    # expert matmuls and attention see other batch shapes, so sums round in another order (measured
    # ≤ 1e-6 on tiny).
    one = analysis.patching_sweep(tiny, *image_pair, " the", sites="resid.*", batched=False)
    np.testing.assert_allclose(sweep["metric"], one["metric"], atol=1e-5, rtol=0)


def test_a_sweep_chunks_its_batch_by_the_memory_budget(tiny, image_pair, sweep):
    length = tiny.prepare(image_pair[0])["input_ids"].shape[1]
    per_row = analysis.patching.sweep_memory_per_row(tiny, length)
    small = analysis.patching_sweep(tiny, *image_pair, " the", memory_budget=per_row * 2)  # 6 batches of 2
    np.testing.assert_allclose(small["metric"], sweep["metric"], atol=1e-5, rtol=0)


def test_misaligned_runs_are_refused(tiny, image_pair):
    with pytest.raises(omnilab.InterventionError, match="clean has .* tokens and corrupted"):
        analysis.patching_sweep(tiny, image_pair[0], "What is this?", " the")
    with pytest.raises(omnilab.InterventionError, match="thinker residual, attention or MLP"):
        analysis.patching_sweep(tiny, *image_pair, " the", sites="router.*")


def test_position_groups_by_count_list_and_label(tiny, image_pair):
    ids = tiny.prepare(image_pair[0])["input_ids"][0]
    groups = analysis.patching.position_groups(tiny, ids, 4)
    assert sum(len(g.positions) for g in groups) == len(ids) and len(groups) == 4
    named = analysis.patching.position_groups(tiny, ids, {"first": [0, 1], "last": [-1]})
    assert [g.label for g in named] == ["first", "last"] and named[1].positions.tolist() == [len(ids) - 1]
    with pytest.raises(omnilab.InterventionError, match="outside the prompt"):
        analysis.patching.position_groups(tiny, ids, [[0, len(ids)]])


def test_the_patching_heatmap_shows_sites_by_groups(sweep):
    fig = plots.patching_heatmap(sweep)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (4, 3)
    assert list(fig.data[0].y) == ["resid.0", "resid.1", "resid.2", "resid.3"]


def test_the_sweep_bench_times_both_ways_and_they_agree(tiny):
    from omnilab.bench.patching import sweep_speedup

    figures = sweep_speedup(tiny, tokens=64, groups=4, per_patch_sample=4)
    assert figures["patches"] == 4 * 4 and figures["per_patch_timed"] == 4
    assert figures["batched_s"] > 0 and figures["speedup"] == figures["per_patch_s"] / figures["batched_s"]
    assert figures["max_abs_diff"] <= 1e-5
