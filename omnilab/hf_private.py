"""Every use of transformers' (and captum's) private internals, each behind a named function (one module on purpose).

omnilab steps the thinker and talker with transformers' own generation machinery (the body of
`GenerationMixin._sample`), builds the talker's prompt with the lines `generate` uses, and swaps the
towers' attention function. Those are private: a transformers upgrade may rename or reshape them.
Attribution runs captum's Integrated Gradients at its own quadrature nodes, which only captum's private
`_attribute` takes. Nothing else in omnilab touches them; `REQUIRED` (and `optional_required()`, for
captum, an optional dependency imported only when asked) lists each with the parameters we pass, and
tests/test_hf_private.py fails naming the one that changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager

from transformers import GenerationMixin, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

Omni = modeling.Qwen3OmniMoeForConditionalGeneration
Talker = modeling.Qwen3OmniMoeTalkerForConditionalGeneration


# -- generation steps ---------------------------------------------------------------------------------
def prefill(model, input_ids, generation_config, model_kwargs: dict):
    """The first forward of a prepared generation (`GenerationMixin._prefill`): its model outputs."""
    return model._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)


def decode_mode(model) -> AbstractContextManager:
    """The context `_sample` runs decode forwards in (`_optimize_model_for_decode`: decode-time kernels)."""
    return model._optimize_model_for_decode()


def update_model_kwargs(model, outputs, model_kwargs: dict) -> dict:
    """The next step's model kwargs after `outputs` (`_update_model_kwargs_for_generation`: cache,
    attention mask, cache position; the talker's generation step and hidden states)."""
    return model._update_model_kwargs_for_generation(
        outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
    )


def talker_user_parts(model, start, end, multimodal_mask, thinker_hidden, thinker_embed):
    """The talker's embeddings of a user segment (`_get_talker_user_parts`)."""
    return model._get_talker_user_parts(start, end, multimodal_mask, thinker_hidden, thinker_embed)


def talker_assistant_parts(model, start, end, speaker_id, thinker_embed, tts_pad, tts_bos, tts_eos):
    """The talker's embeddings, ids and mask of the assistant segment (`_get_talker_assistant_parts`)."""
    return model._get_talker_assistant_parts(start, end, speaker_id, thinker_embed, tts_pad, tts_bos, tts_eos)


# -- attention and experts implementations ------------------------------------------------------------
def attention_implementation(config) -> str:
    """The attention implementation a config selects (`config._attn_implementation`)."""
    return config._attn_implementation


def set_config_attention(config, name: str) -> None:
    """Point a sub-model's config at attention function `name` (a tower has no public setter for
    a function registered with AttentionInterface that is not one of transformers' own)."""
    config._attn_implementation = name


def experts_implementation(config) -> str | None:
    """The MoE experts implementation a config selects (`config._experts_implementation`)."""
    return config._experts_implementation


def attention_function(name: str) -> Callable:
    """transformers' attention function registered as `name`; its eager attention for "eager"."""
    if name == "eager":
        return modeling.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, modeling.eager_attention_forward)


def eager_attention(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs):
    """Qwen3-Omni's eager attention (`eager_attention_forward`): (output, weights)."""
    return modeling.eager_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def rotary(query, key, cos, sin):
    """Queries and keys [B, heads, L, head_dim] turned by the rotary embedding (cos, sin) the way the
    thinker's and talker's attention turn them (`apply_rotary_pos_emb`)."""
    return modeling.apply_rotary_pos_emb(query, key, cos, sin)


# -- captum ----------------------------------------------------------------------------------------
def integrated_gradients_at(ig, inputs, baselines, step_sizes, alphas):
    """captum's Integrated Gradients of `ig` (an `IntegratedGradients`) summed over the given quadrature
    nodes (`IntegratedGradients._attribute` with `step_sizes_and_alphas`: the public `attribute` takes
    only its fixed schemes, and its internal batching is this call per batch of nodes)."""
    return ig._attribute(
        inputs=inputs,
        baselines=baselines,
        n_steps=len(alphas),
        step_sizes_and_alphas=(step_sizes, alphas),
    )


def optional_required() -> tuple[tuple[str, object, str, tuple[str, ...]], ...]:
    """REQUIRED's entries for the optional dependencies (captum), imported here and only here."""
    from captum.attr import IntegratedGradients

    return (
        ("captum.attr.IntegratedGradients._attribute", IntegratedGradients, "_attribute", ("inputs", "baselines", "n_steps", "step_sizes_and_alphas")),
    )  # fmt: skip


# -- what the functions above rely on -----------------------------------------------------------------
# (name, owner, attribute, the parameters we pass: by name, or a property / context manager)
REQUIRED: tuple[tuple[str, object, str, tuple[str, ...]], ...] = (
    ("GenerationMixin._prefill", GenerationMixin, "_prefill", ("input_ids", "generation_config", "model_kwargs", "is_first_iteration")),
    ("GenerationMixin._optimize_model_for_decode", GenerationMixin, "_optimize_model_for_decode", ()),
    ("GenerationMixin._update_model_kwargs_for_generation", GenerationMixin, "_update_model_kwargs_for_generation", ("outputs", "model_kwargs", "is_encoder_decoder")),
    ("Qwen3OmniMoeTalkerForConditionalGeneration._update_model_kwargs_for_generation", Talker, "_update_model_kwargs_for_generation", ("outputs", "model_kwargs", "is_encoder_decoder")),
    ("GenerationMixin.generate(custom_generate=)", GenerationMixin, "generate", ("custom_generate",)),
    ("GenerationMixin.prepare_inputs_for_generation", GenerationMixin, "prepare_inputs_for_generation", ("input_ids", "next_sequence_length")),
    ("Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation", Talker, "prepare_inputs_for_generation", ("input_ids", "attention_mask", "inputs_embeds")),
    ("Qwen3OmniMoeForConditionalGeneration._get_talker_user_parts", Omni, "_get_talker_user_parts", ("im_start_index", "segment_end_index", "multimodal_mask", "thinker_hidden", "thinker_embed")),
    ("Qwen3OmniMoeForConditionalGeneration._get_talker_assistant_parts", Omni, "_get_talker_assistant_parts", ("im_start_index", "segment_end_index", "speaker_id", "thinker_embed", "tts_pad_embed", "tts_bos_embed", "tts_eos_embed")),
    ("PretrainedConfig._attn_implementation", PretrainedConfig, "_attn_implementation", ("property",)),
    ("PretrainedConfig._experts_implementation", PretrainedConfig, "_experts_implementation", ("property",)),
    ("modeling_qwen3_omni_moe.eager_attention_forward", modeling, "eager_attention_forward", ("module", "query", "key", "value", "attention_mask", "scaling", "dropout")),
    ("modeling_qwen3_omni_moe.apply_rotary_pos_emb", modeling, "apply_rotary_pos_emb", ("q", "k", "cos", "sin")),
    ("modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface", ALL_ATTENTION_FUNCTIONS, "get_interface", ("attn_implementation", "default")),
)  # fmt: skip


def check(name: str, owner, attribute: str, parameters: tuple[str, ...]) -> str | None:
    """Why `owner.attribute` no longer fits what omnilab passes it, or None when it does."""
    found = inspect.getattr_static(owner, attribute, None)
    if found is None:
        return f"the installed package no longer has {name}; omnilab/hf_private.py relies on it"
    if parameters == ("property",):
        return None if isinstance(found, property) else f"{name} is no longer a property"
    signature = inspect.signature(getattr(owner, attribute))
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds:
        # A wrapper that takes anything (transformers 5.25 wraps apply_rotary_pos_emb as
        # (*args, **kwargs)): its names cannot be read, so what it does is checked by calling it
        # (tests/test_hf_private.py).
        return None
    names = set(signature.parameters)
    missing = [p for p in parameters if p not in names]
    if missing:
        return f"{name} no longer takes {', '.join(missing)} (its signature is now {signature})"
    return None
