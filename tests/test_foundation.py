"""Foundation: presets, the offline processor, generate, determinism, save/load, bad input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import omnilab
from omnilab.lab import SAMPLES_PER_FRAME
from omnilab.models.presets import build_preset, preset_config


def test_tokenizer_has_real_ids(tiny):
    tok = tiny.processor.tokenizer
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|audio_pad|>") == 151675
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|video_pad|>") == 151656


def test_tiny_is_the_real_architecture_at_toy_size(tiny):
    model = tiny.model
    assert type(model).__name__ == "Qwen3OmniMoeForConditionalGeneration"
    text = model.config.thinker_config.text_config
    assert text.num_hidden_layers >= 4 and text.num_experts >= 16 and text.num_experts_per_tok >= 4
    talker = model.config.talker_config
    assert talker.num_code_groups == 16 and talker.text_config.shared_expert_intermediate_size > 0
    assert int(model.code2wav.total_upsample) == SAMPLES_PER_FRAME
    assert talker.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert tiny.speakers == ["Aiden", "Chelsie", "Ethan"]


def test_small_routes_like_the_real_model():
    config = preset_config("small")
    assert config.thinker_config.text_config.num_experts >= 32
    assert config.thinker_config.text_config.num_experts_per_tok == 8
    assert config.talker_config.text_config.num_experts_per_tok == 6


def test_generate_with_all_media_gives_text_and_frame_aligned_speech(tiny, all_media_conversation):
    reply = tiny.generate(all_media_conversation, max_new_tokens=4, max_speech_frames=8)
    assert len(reply.token_ids) >= 1 and isinstance(reply.text, str)
    assert reply.audio.dtype == np.float32 and reply.sample_rate == 24_000
    frames = reply.codes.shape[0]
    assert reply.codes.shape[1] == 16 and frames >= 1
    # code2wav holds back a few hundred samples at the end (causal transposed convolutions)
    assert 0 <= frames * SAMPLES_PER_FRAME - len(reply.audio) < SAMPLES_PER_FRAME
    assert reply.random_weights


def test_max_speech_frames_gives_exactly_that_many_frames(tiny):
    reply = tiny.generate("Hello", max_new_tokens=3, max_speech_frames=10)
    assert reply.codes.shape == (10, 16)
    # the audio is the 10 frames' samples less code2wav's held-back tail (under one frame)
    assert 0 <= 10 * SAMPLES_PER_FRAME - len(reply.audio) < SAMPLES_PER_FRAME


@contextlib.contextmanager
def first_token_ends_the_reply(lab):
    """Make <|im_end|> the thinker's every choice (a hook on its output head, removed after)."""
    end = lab.model.config.im_end_token_id

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., end] = 1e4
        return logits

    handle = lab.thinker.lm_head.register_forward_hook(hook)
    try:
        yield end
    finally:
        handle.remove()


def test_an_empty_reply_gives_empty_speech_in_generate_and_stream(tiny):
    with first_token_ends_the_reply(tiny) as end:
        reply = tiny.generate("Hello", max_new_tokens=3, max_speech_frames=4, trace=True)
        streamed = list(tiny.stream("Hello", max_new_tokens=3, max_speech_frames=4))[-1].reply
    for r in (reply, streamed):
        assert r.token_ids == [end] and r.text == ""
        assert r.audio.dtype == np.float32 and r.audio.shape == (0,)
        assert r.codes.shape == (0, 16)
    assert reply.trace.rows("codes") == 0 and reply.trace.text == ""


def test_return_audio_false_gives_text_only(tiny):
    reply = tiny.generate("Say something.", max_new_tokens=3, return_audio=False)
    assert reply.audio is None and reply.codes is None and len(reply.token_ids) == 3


def test_use_audio_in_video_interleaves_audio_tokens(tiny, data_dir):
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(data_dir / "video.mp4")}]}]
    without = tiny.prepare(conversation)["input_ids"][0]
    with_audio = tiny.prepare(conversation, use_audio_in_video=True)["input_ids"][0]
    assert (without == 151675).sum() == 0
    assert (with_audio == 151675).sum() > 0 and (with_audio == 151656).sum() == (without == 151656).sum()
    reply = tiny.generate(conversation, use_audio_in_video=True, max_new_tokens=2, max_speech_frames=3)
    assert reply.audio is not None


def test_same_seed_gives_identical_weights_and_greedy_output():
    a, b = build_preset("tiny", seed=0), build_preset("tiny", seed=0)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    c = build_preset("tiny", seed=1)
    assert not torch.equal(a.thinker.lm_head.weight, c.thinker.lm_head.weight)


def test_greedy_generate_is_reproducible(tiny):
    first = tiny.generate("Hello", max_new_tokens=4, max_speech_frames=4)
    second = tiny.generate("Hello", max_new_tokens=4, max_speech_frames=4)
    assert first.token_ids == second.token_ids
    assert np.array_equal(first.codes, second.codes)
    assert np.array_equal(first.audio, second.audio)


def test_save_then_load_gives_identical_logits(tiny, tmp_path, all_media_conversation):
    tiny.save(tmp_path / "ckpt")
    loaded = omnilab.load(str(tmp_path / "ckpt"), attn_implementation="eager")
    tiny.model.set_attn_implementation("eager")
    try:
        inputs = tiny.prepare(all_media_conversation)
        again = loaded.prepare(all_media_conversation)
        assert torch.equal(inputs["input_ids"], again["input_ids"])
        with torch.no_grad():
            a = tiny.model.thinker(**inputs).logits
            b = loaded.model.thinker(**again).logits
        assert torch.equal(a, b)
    finally:
        tiny.model.set_attn_implementation("sdpa")
    assert loaded.model_id == "omnilab/tiny" and loaded.random_weights


def test_checkpoint_without_talker_refuses_speech(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    thinker_only = omnilab.load(str(tmp_path / "ckpt"), talker=False)
    assert not thinker_only.has_talker
    with pytest.raises(omnilab.ConversationError, match="cannot speak"):
        thinker_only.generate("Hi", return_audio=True)
    assert thinker_only.generate("Hi", max_new_tokens=2).audio is None


def test_a_thinker_only_model_generates_what_the_full_models_thinker_generates(tiny):
    """A thinker-only model's generate is the plain one: it takes the options unprefixed (it once got
    thinker_max_new_tokens and refused it as an unused model kwarg)."""
    from omnilab.lab import OmniLab
    from omnilab.models.loading import Loaded

    thinker_only = OmniLab(
        Loaded(tiny.model.thinker, tiny.processor, "omnilab/thinker", True, tiny.video_size)
    )
    assert not hasattr(thinker_only.model, "thinker") and not thinker_only.has_talker
    reply = thinker_only.generate("Hi", max_new_tokens=3)
    assert reply.audio is None and len(reply.token_ids) == 3
    assert reply.token_ids == tiny.generate("Hi", max_new_tokens=3, return_audio=False).token_ids


def test_offline_hub_id_not_cached_gets_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(omnilab.ModelLoadError, match="offline") as info:
        omnilab.load("Qwen/Qwen3-Omni-30B-A3B-Instruct")
    assert "Qwen/Qwen3-Omni-30B-A3B-Instruct" in str(info.value)


def test_missing_local_path_gets_a_clear_error():
    with pytest.raises(omnilab.ModelLoadError, match="does not exist"):
        omnilab.load("./no/such/checkpoint")


@pytest.mark.parametrize(
    ("conversation", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user", "content": [{"type": "smell", "smell": 1}]}], "type"),
        ([{"role": "user", "content": [{"type": "text", "text": "  "}]}], "empty"),
        (42, "Qwen chat format"),
    ],
)
def test_bad_conversations_get_specific_errors(tiny, conversation, match):
    with pytest.raises(omnilab.ConversationError, match=match):
        tiny.generate(conversation, max_new_tokens=1, return_audio=False)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"type": "audio", "audio": "/no/such.wav"}, "no.such|not exist|missing|not found"),
        ({"type": "image", "image": "/no/such.png"}, "no.such|not exist|missing|not found"),
        ({"type": "video", "video": "/no/such.mp4"}, "no.such|not exist|missing|not found"),
        ({"type": "audio", "audio": np.zeros(100, dtype=np.float32)}, "sample rate|sampling"),
        ({"type": "image", "image": "https://example.com/x.png"}, "local"),
    ],
)
def test_bad_media_in_a_conversation_gets_a_media_error(tiny, item, match):
    with pytest.raises(omnilab.MediaError, match=match):
        tiny.prepare([{"role": "user", "content": [item]}])


def test_unknown_speaker_is_refused(tiny):
    with pytest.raises(omnilab.ConversationError, match="unknown speaker"):
        tiny.generate("Hi", speaker="Zed", max_new_tokens=1)


def test_real_card_from_package_data_on_meta_device():
    frame = omnilab.card("qwen3-omni-30b-a3b-instruct")
    thinker = frame.set_index("component").loc["thinker"]
    assert thinker["layers"] == 48 and thinker["experts"] == 128 and thinker["top_k"] == 8


def test_a_spoken_turn_with_video_shows_no_transformers_notices(tiny, data_dir):
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(data_dir / "video.mp4")},
                {"type": "text", "text": "Hi"},
            ],
        }
    ]
    hf_logging.warning_once.cache_clear()  # each notice is logged once per process: see this run's
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiny.generate(conversation, max_new_tokens=2, max_speech_frames=2)
            list(tiny.stream(conversation, max_new_tokens=2, max_speech_frames=2))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert [str(w.message) for w in caught if "transformers" in w.filename] == []
