"""What `lab.generate`, `lab.stream` and the store share about running the model's generation.

A leaf below `lab.py`, `streaming/` and `store/` (it imports nothing of omnilab), so none of them has
to import another for these: the thinker's head on the last row only, the talker's repetition
notice, and how `model.generate`'s keyword arguments split between the thinker and the talker.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator

import torch

TALKER_ONLY = ("talker_", "token2wav_")
WHOLE_MODEL_ONLY = ("return_audio", "speaker")


def quiet_talker_penalty_notice() -> None:
    """Filter transformers' warning that the talker's repetition penalty skips its prompt.

    Upstream's talker penalizes repeated codes among the generated ones only, on purpose (it passes
    the prompt as embeddings "to prevent repetition penalty out of bound"), and transformers warns
    about exactly that on every spoken turn. Settling it would change the speech (penalty 1.0), so
    this one message is filtered where the talker is started; a filter rather than
    `warnings.catch_warnings`, which is not thread-safe (adding it again only moves it to the front).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"Passing `repetition_penalty` with `inputs_embeds` and without `input_ids`",
        category=UserWarning,
        module=r"transformers\.generation\.utils",
    )


@contextlib.contextmanager
def last_logits_only(thinker) -> Iterator[None]:
    """While open, the thinker's head computes logits for the last position only ([B, 1, vocab]).

    Generation reads only the last row, but the thinker's forward has no `logits_to_keep`: at prefill
    its head makes [L, 151,936] float32 logits (6 GB at 10k tokens) to use one row of them.
    """
    head = getattr(thinker, "lm_head", None)  # the talker's head is codec_head: left alone
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


def thinker_only_kwargs(kwargs: dict) -> dict:
    """`model.generate`'s keyword arguments for a model without a talker (a thinker-only checkpoint):
    the talker's and the whole model's dropped, `thinker_` prefixes removed (its generate is the
    plain GenerationMixin one, which takes them unprefixed)."""
    return {
        k.removeprefix("thinker_"): v
        for k, v in kwargs.items()
        if not k.startswith(TALKER_ONLY) and k not in WHOLE_MODEL_ONLY
    }


def split_kwargs(model, kwargs: dict, speech: bool) -> tuple[dict, dict]:
    """The thinker's and the talker's `generate` arguments, split as `model.generate` splits them."""
    if not hasattr(model, "thinker"):  # a thinker-only checkpoint: its generate takes them unprefixed
        return thinker_only_kwargs(kwargs), {}
    bound = inspect.signature(type(model).generate).bind(model, **kwargs)
    bound.apply_defaults()
    named, extra = bound.arguments, bound.arguments.get("kwargs", {})
    config = model.config.talker_config
    shared = {"use_audio_in_video": named["use_audio_in_video"]}
    thinker = {
        "max_new_tokens": named["thinker_max_new_tokens"],
        "eos_token_id": named["thinker_eos_token_id"],
    }
    talker = {}
    if speech:
        vocab = config.text_config.vocab_size
        talker = {
            "max_new_tokens": named["talker_max_new_tokens"],
            "do_sample": named["talker_do_sample"],
            "top_k": named["talker_top_k"],
            "top_p": named["talker_top_p"],
            "temperature": named["talker_temperature"],
            "eos_token_id": config.codec_eos_token_id,
            "repetition_penalty": named["talker_repetition_penalty"],
            "suppress_tokens": [i for i in range(vocab - 1024, vocab) if i != config.codec_eos_token_id],
            "output_hidden_states": True,
            "return_dict_in_generate": True,
        }
    for key, value in extra.items():
        if key.startswith("thinker_"):
            thinker[key[len("thinker_") :]] = value
        elif key.startswith("talker_"):
            talker[key[len("talker_") :]] = value
        elif key.startswith("token2wav_"):
            continue
        elif key == "feature_attention_mask":
            thinker[key] = value
            talker["audio_feature_lengths"] = torch.sum(value, dim=1)
        elif key in ("input_features", "attention_mask"):
            thinker[key] = value
        else:
            shared[key] = value
    for key, value in shared.items():
        thinker.setdefault(key, value)
        if key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
            talker.setdefault(key, value)
    thinker["input_ids"] = named["input_ids"]
    if speech:
        thinker.update(output_hidden_states=True, return_dict_in_generate=True)
    return thinker, talker
