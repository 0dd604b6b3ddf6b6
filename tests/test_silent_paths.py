"""No silent path: every instrument does what it was asked, or refuses by name (issue 24).

Each test here failed before its fix: the instrument quietly did less than it was asked.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from omnilab.errors import InterventionError
from omnilab.instrument.budget import BudgetError, human_bytes
from omnilab.instrument.context import model_lock
from omnilab.instrument.tracer import active_tracer

TEXT = [{"role": "user", "content": [{"type": "text", "text": "Name three primary colours."}]}]


def _image_conversation(path) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What is this?"}],
        }
    ]


@pytest.fixture(scope="module")
def two_images(data_dir, tmp_path_factory):
    """The sample image and its mirror image: the same size, so the same tokens, other pixels."""
    folder = tmp_path_factory.mktemp("images")
    mirrored = folder / "mirrored.png"
    Image.open(data_dir / "image.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    return _image_conversation(data_dir / "image.png"), _image_conversation(mirrored)


# -- 1. interventions ---------------------------------------------------------------------------------
def test_a_modality_intervention_refuses_a_forward_whose_tokens_it_cannot_see(tiny):
    # a forward from embeddings has no token ids: the mask used to come back all False (nothing done)
    ids = tiny.prepare(TEXT)["input_ids"]
    embeds = tiny.thinker.get_input_embeddings()(ids)
    with tiny.intervene(ablate={"thinker": {0: [0, 1]}}, modality="text"), torch.no_grad():
        with pytest.raises(InterventionError, match="no token ids.*which rows are text tokens"):
            tiny.model.thinker(inputs_embeds=embeds)


def test_set_and_add_with_a_modality_reach_every_row_of_a_batched_forward(tiny, data_dir, tmp_path):
    import soundfile

    from omnilab.store.batch import batch_inputs

    audio, rate = soundfile.read(data_dir / "speech.wav")
    soundfile.write(tmp_path / "second.wav", audio[:rate], rate)  # one second: a short batch
    speech = {"type": "audio", "audio": str(tmp_path / "second.wav")}
    inputs = tiny.prepare([{"role": "user", "content": [speech, {"type": "text", "text": "What?"}]}])
    twice = batch_inputs([inputs, inputs], pad_id=151643)
    vector = torch.full((64,), 3.0)
    with torch.no_grad():
        bare = tiny.model.thinker(**twice).logits
        for spec in ({"add": {"resid.1": vector}}, {"set": {"mlp.2": vector}}):
            with tiny.intervene(**spec, modality="audio"):
                one = tiny.model.thinker(**inputs).logits
                both = tiny.model.thinker(**twice).logits
            assert not torch.allclose(both[0], bare[0], atol=1e-3)  # it reached the batch (it used not to)
            torch.testing.assert_close(both[0], one[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(both[1], one[0], atol=1e-4, rtol=1e-4)


def test_replay_past_what_the_trace_recorded_is_refused(tiny):
    with tiny.trace(capture=("routing",)) as tr:
        tiny.forward(TEXT)  # the prompt only
    with tiny.intervene(replay=tr.trace):
        with pytest.raises(InterventionError, match=r"replay: the trace has no thinker layer \d routing at"):
            tiny.generate(TEXT, max_new_tokens=3, return_audio=False)


def test_a_positions_transform_with_a_modality_rewrites_only_that_modalitys_rows(
    tiny, all_media_conversation
):
    with (
        tiny.intervene(positions="temporal_only", modality="audio"),
        tiny.trace(capture=("positions",)) as tr,
    ):
        tiny.forward(all_media_conversation)
    tokens = tr.trace.tokens
    audio, image = tokens[tokens["modality"] == "audio"], tokens[tokens["modality"] == "image"]
    assert (audio["h"] == audio["t"]).all() and (audio["w"] == audio["t"]).all()
    assert (image["h"] != image["t"]).any()  # left as the model placed them (they used to be rewritten)


# -- 2. the memory budget -------------------------------------------------------------------------------
def test_the_budget_counts_generated_rows(tiny):
    from omnilab.instrument.record.activations import estimate_bytes, resolve_requests

    requests = resolve_requests(tiny.model, "resid.*")
    prompt_only = estimate_bytes(
        tiny.model, requests, tiny.prepare(TEXT)["input_ids"][0], dtype=torch.float32
    )
    with pytest.raises(BudgetError):
        with tiny.trace(capture=(), sites=["resid.*"], memory_budget=prompt_only):
            tiny.generate(TEXT, max_new_tokens=8, return_audio=False)
    with tiny.trace(capture=(), sites=["resid.*"], memory_budget=prompt_only):  # the prompt alone fits
        tiny.forward(TEXT)


def test_the_budget_counts_talker_sites_and_says_sizes_in_human_units(tiny):
    with pytest.raises(BudgetError, match=r"activations \d+(\.\d)? KB .*the budget is 1.0 KB"):
        with tiny.trace(capture=(), sites=["talker.resid.*"], memory_budget=1000):
            tiny.generate(TEXT, max_new_tokens=2, max_speech_frames=2)
    assert [human_bytes(n) for n in (512, 11_776, 3_200_000, 2 * 10**9)] == [
        "512 bytes",
        "11.8 KB",
        "3.2 MB",
        "2.00 GB",
    ]


def test_the_budget_estimate_covers_what_a_spoken_run_records(tiny):
    sites = ["resid.*", "talker.resid.0", "code_predictor.resid.0"]
    with tiny.trace(capture=(), sites=sites, memory_budget=None) as tr:
        tiny.generate(TEXT, max_new_tokens=4, max_speech_frames=3)
    recorded = sum(a.values.numel() * a.values.element_size() for a in tr.trace.activations.values())
    from omnilab.instrument.record.activations import estimate_bytes, resolve_requests

    estimate = estimate_bytes(
        tiny.model,
        resolve_requests(tiny.model, sites),
        tiny.prepare(TEXT)["input_ids"][0],
        dtype=torch.float32,
        max_new_tokens=4,
        speech_frames=3,
    )
    assert recorded <= estimate <= 1.5 * recorded


def test_the_budget_counts_router_logits_rows(tiny):
    from omnilab.instrument.budget import ROUTER_LOGIT_ROW_BYTES, estimate_capture_bytes

    run = {"max_new_tokens": 3, "max_speech_frames": 2}
    with tiny.trace(capture=("routing", "logits"), memory_budget=None) as tr:
        tiny.generate(TEXT, **run)
    estimate = estimate_capture_bytes(
        tiny, tiny.prepare(TEXT), ("routing", "logits"), max_new_tokens=3, speech_frames=2
    )
    rows = estimate.bytes["router_logits"] // ROUTER_LOGIT_ROW_BYTES
    assert len(tr.trace.router_logits) <= rows <= 1.5 * len(tr.trace.router_logits)


# -- 3. talker sites where the talker does not run ------------------------------------------------------
@pytest.mark.parametrize("run", ["forward", "silent generate"])
def test_talker_sites_where_the_talker_does_not_run_are_refused_by_name(tiny, run):
    with pytest.raises(InterventionError, match=r"talker\.resid\.0 record the talker"):
        with tiny.trace(sites=["resid.0", "talker.resid.0"]):
            if run == "forward":
                tiny.forward(TEXT)
            else:
                tiny.generate(TEXT, max_new_tokens=2, return_audio=False)


# -- 4. one Tracer, one entry -----------------------------------------------------------------------------
def test_a_tracer_entered_twice_is_refused(tiny):
    tracer = tiny.trace(capture=("routing",))
    with tracer:
        tiny.forward(TEXT)
    first = tracer.trace
    with pytest.raises(InterventionError, match="already entered"):
        with tracer:
            pass
    assert tracer.trace is first
    nested = tiny.trace(capture=("routing",))
    with nested, pytest.raises(InterventionError, match="already entered"):
        with nested:
            pass


# -- 6. the model's lock, and tracers per thread ---------------------------------------------------------
@pytest.mark.parametrize("run", ["forward", "generate", "collect", "collect batched"])
def test_forward_generate_and_collection_hold_the_models_lock(tiny, run):
    lock, free = model_lock(tiny.model), []

    def probe(module, args, kwargs):  # from another thread, during the run: is the lock taken?
        def try_lock():
            got = lock.acquire(blocking=False)
            free.append(got)
            if got:
                lock.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()

    handle = tiny.thinker.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        if run == "forward":
            tiny.forward(TEXT)
        elif run == "generate":
            tiny.generate(TEXT, max_new_tokens=2, return_audio=False)
        else:  # the store's forwards, one sample at a time and batched
            from omnilab.store.batch import run_batches
            from omnilab.store.manifest import Sample

            samples = [Sample(f"s{i}", TEXT, line=i) for i in range(2)]
            capture = ("routing",) if run == "collect batched" else ()
            results = [
                r for batch in run_batches(tiny, samples, capture=capture, batch_size=2) for r in batch
            ]
            assert len(results) == 2 and all(r.ok for r in results)
    finally:
        handle.remove()
    assert free and not any(free)


def test_a_tracer_records_only_its_own_threads_runs(tiny):
    seen = []
    with tiny.trace(capture=("routing",)) as tr:
        thread = threading.Thread(target=lambda: seen.append(active_tracer(tiny)))
        thread.start()
        thread.join()
        assert active_tracer(tiny) is tr
    assert seen == [None]
    assert active_tracer(tiny) is None and not tiny._tracers


# -- 7. the model's dtype by default ---------------------------------------------------------------------
def test_activations_default_to_the_models_dtype_and_float16_is_a_choice(tiny):
    language_model = tiny.thinker.model.language_model
    kept = []
    handle = language_model.layers[1].register_forward_hook(lambda m, a, o: kept.append(o.detach().clone()))
    try:
        with tiny.trace(sites="resid.1") as tr:
            tiny.forward(TEXT)
    finally:
        handle.remove()
    values = tr.trace.activations["resid.1"].values
    assert values.dtype == torch.float32
    assert torch.equal(values, kept[0][0])  # lossless: set= with it patches the very value
    with tiny.trace(sites="resid.1", dtype=torch.float16) as tr:
        tiny.forward(TEXT)
    assert tr.trace.activations["resid.1"].values.dtype == torch.float16


# -- 8. TransformerLens's residual names ------------------------------------------------------------------
def _deepstack_layers(lab) -> int:
    return len(lab.model.config.thinker_config.vision_config.deepstack_visual_indexes)


def test_resid_pre_mid_post_are_read_where_the_model_carries_them(tiny, two_images):
    conversation = two_images[0]
    layers = len(tiny.thinker.model.language_model.layers)
    with tiny.trace(sites=["resid.*", "resid_pre.*", "resid_mid.*", "resid_post.*", "attn.*"]) as tr:
        tiny.forward(conversation)
    acts = {k: v.values for k, v in tr.trace.activations.items()}
    image = torch.tensor((tr.trace.activations["resid.0"].rows["modality"] == "image").to_numpy())
    deep = _deepstack_layers(tiny)
    assert deep >= 1
    for layer in range(layers - 1):
        assert torch.equal(acts[f"resid_post.{layer}"], acts[f"resid_pre.{layer + 1}"])
        # resid.L is the layer's output; resid_post.L has deepstack's vision features added
        same = torch.equal(acts[f"resid_post.{layer}"], acts[f"resid.{layer}"])
        assert same == (layer >= deep)
        if layer < deep:
            assert torch.equal(acts[f"resid_post.{layer}"][~image], acts[f"resid.{layer}"][~image])
    assert torch.equal(
        acts[f"resid_post.{layers - 1}"], acts[f"resid.{layers - 1}"]
    )  # the final norm's input
    for layer in range(layers):
        torch.testing.assert_close(
            acts[f"resid_mid.{layer}"], acts[f"resid_pre.{layer}"] + acts[f"attn.{layer}"], rtol=0, atol=0
        )


def test_patching_resid_post_carries_another_images_vision_features(tiny, two_images):
    a, b = two_images
    last = _deepstack_layers(tiny) - 1  # the last layer deepstack adds to
    with tiny.trace(sites=[f"resid_post.{last}", f"resid.{last}", f"resid.{last + 1}:input"]) as tr:
        clean = tiny.forward(a)
    acts = tr.trace.activations
    bare = tiny.forward(b)
    assert (bare - clean).abs().max() > 1e-3
    with tiny.intervene(set={f"resid_post.{last}": acts[f"resid_post.{last}"].values}):
        patched = tiny.forward(b)
    torch.testing.assert_close(patched, clean, rtol=0, atol=0)
    with tiny.intervene(set={f"resid.{last + 1}:input": acts[f"resid.{last + 1}:input"].values}):
        by_input = tiny.forward(b)
    torch.testing.assert_close(by_input, clean, rtol=0, atol=0)
    with tiny.intervene(set={f"resid.{last}": acts[f"resid.{last}"].values}):
        before_deepstack = tiny.forward(b)  # B's vision features are still added after it
    assert (before_deepstack - clean).abs().max() > 1e-4


def test_resid_mid_and_resid_pre_can_be_set_and_added(tiny):
    other = [{"role": "user", "content": [{"type": "text", "text": "Name three primary shapes."}]}]
    with tiny.trace(sites=["resid_mid.1", "resid_pre.2"]) as tr:
        clean = tiny.forward(TEXT)
    acts = tr.trace.activations
    with (
        tiny.intervene(set={"resid_mid.1": acts["resid_mid.1"].values[-1:]}, at=[-1]),
        tiny.trace(sites=["resid_mid.1"]) as patched,
    ):
        tiny.forward(other)
    with tiny.trace(sites=["resid_mid.1"]) as plain:
        tiny.forward(other)
    got, before = (
        patched.trace.activations["resid_mid.1"].values,
        plain.trace.activations["resid_mid.1"].values,
    )
    torch.testing.assert_close(got[-1], acts["resid_mid.1"].values[-1], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:-1], before[:-1])  # rows left alone stay bit for bit
    with tiny.intervene(set={"resid_pre.2": acts["resid_pre.2"].values}):
        torch.testing.assert_close(tiny.forward(other)[0, -1], clean[0, -1], rtol=0, atol=0)
    shift = torch.zeros(64)
    shift[0] = 5.0
    with tiny.intervene(add={"resid_mid.1": shift}), tiny.trace(sites=["resid_mid.1"]) as steered:
        tiny.forward(other)
    torch.testing.assert_close(
        steered.trace.activations["resid_mid.1"].values[:, 0], before[:, 0] + 5.0, rtol=1e-5, atol=1e-5
    )


def test_the_code_predictor_and_codec_head_can_be_set_and_added(tiny):
    run = {"max_new_tokens": 2, "max_speech_frames": 2}
    with tiny.trace(capture=(), sites="code_predictor.resid.0") as bare:
        tiny.generate(TEXT, **run)
    shift = torch.full((64,), 2.0)
    with (
        tiny.intervene(add={"code_predictor.resid.0": shift}, at=[1]),
        tiny.trace(capture=(), sites="code_predictor.resid.0") as steered,
    ):
        tiny.generate(TEXT, **run)
    first = [t.activations["code_predictor.resid.0"] for t in (bare.trace, steered.trace)]
    (b, s) = [a.values[torch.from_numpy((a.rows["frame"] == 0).to_numpy().copy())] for a in first]
    assert torch.equal(s[0], b[0])  # its position 0 (the talker's hidden state) left alone
    torch.testing.assert_close(s[1], b[1] + 2.0, rtol=0, atol=1e-6)  # position 1: codebook 0's embedding
    vocab = tiny.model.talker.codec_head.out_features
    logits = torch.full((vocab,), -50.0)
    logits[7] = 50.0
    with tiny.intervene(set={"codec_head": logits}):
        reply = tiny.generate(TEXT, **run)
    assert len(reply.codes) == 2 and (reply.codes[:, 0] == 7).all()


def test_sites_set_and_add_do_not_reach_say_where_to_patch_instead(tiny):
    with pytest.raises(InterventionError, match="vision_tower.*patch resid_pre.0 there"):
        tiny.intervene(add={"vision_tower": torch.zeros(64)})
    with pytest.raises(InterventionError, match="deepstack.*patch resid_post.L"):
        tiny.intervene(add={"deepstack.0": torch.zeros(64)})


def test_input_sites_already_inputs_refuse_the_suffix(tiny):
    with pytest.raises(InterventionError, match="already a module's input"):
        tiny.intervene(set={"resid_pre.1:input": torch.zeros(64)})
    with pytest.raises(InterventionError, match="already a module's input"):
        tiny.trace(sites="resid_post.0:input")


# -- 9. rows in order, frames that match ------------------------------------------------------------------
def test_vision_tower_rows_come_in_position_order(tiny, data_dir):
    video_first = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(data_dir / "video.mp4")},
                {"type": "image", "image": str(data_dir / "image.png")},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    with tiny.trace(sites=["vision_tower", "resid.0:input"]) as tr:
        tiny.forward(video_first)
    rows = tr.trace.activations["vision_tower"].rows
    assert list(rows["modality"].iloc[[0, -1]]) == ["video", "image"]
    assert (np.diff(rows["pos"].to_numpy()) > 0).all()
    embeds = tr.trace.activations["resid.0:input"].values
    at = embeds[torch.from_numpy(rows["pos"].to_numpy().astype(np.int64))]
    assert torch.equal(tr.trace.activations["vision_tower"].values, at)  # each row where it lands


def test_talker_lens_frames_are_the_replys_frames(tiny):
    from omnilab import analysis

    replies = []
    original = tiny.generate

    def keep(*args, **kwargs):
        replies.append(original(*args, **kwargs))
        return replies[-1]

    tiny.generate = keep
    try:
        lens = analysis.talker_lens(tiny, "Hello there", max_new_tokens=3, max_speech_frames=2, top=1)
    finally:
        del tiny.generate
    assert sorted(set(lens["frame"])) == list(range(len(replies[0].codes)))  # one more, before
