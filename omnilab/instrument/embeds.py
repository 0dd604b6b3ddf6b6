"""The thinker's merged input embeddings, and the thinker run from them.

Qwen3-Omni's thinker never sees its placeholder ids (`<|audio_pad|>`, `<|image_pad|>`,
`<|video_pad|>`) as embeddings: `Qwen3OmniMoeThinkerModel.forward` looks up the text embeddings,
runs the audio and vision towers, and scatters their features over the placeholder positions; the
vision tower's *deepstack* features are then added to the hidden states of the visual positions
after the first decoder layers. `merge_inputs` does exactly those steps with the model's own
methods (`get_input_embeddings`, `get_audio_features`, `get_image_features`, `get_video_features`,
`get_placeholder_mask`, `get_rope_index`) and keeps the results, so the towers run once;
`thinker_logits` then runs the language model and LM head from (possibly changed) embeddings,
in batches. This is what attribution needs: a differentiable function of the embeddings each
position really enters the decoder with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MergedInputs:
    """One sequence as the thinker's decoder receives it (batch 1).

    input_ids [1, S]; inputs_embeds [1, S, H]: text embeddings with audio / image / video features
    at their placeholders; position_ids [3, 1, S]: the TM-RoPE (t, h, w) ids from `get_rope_index`;
    attention_mask [1, S]; visual_pos_masks [1, S] (bool) and deepstack [layers, V, H]: the vision
    tower's deepstack features of the V visual positions (in sequence order), added after decoder
    layers 0..layers-1 — both None without image or video.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    visual_pos_masks: torch.Tensor | None
    deepstack: torch.Tensor | None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def model_of(lab_or_model) -> torch.nn.Module:
    """The model of an OmniLab (or the module itself)."""
    return lab_or_model if isinstance(lab_or_model, torch.nn.Module) else lab_or_model.model


def thinker_of(lab_or_model) -> torch.nn.Module:
    """The Qwen3OmniMoeThinkerForConditionalGeneration of an OmniLab, a full model or a thinker."""
    model = model_of(lab_or_model)
    return model.thinker if hasattr(model, "thinker") else model


def merge_inputs(lab_or_model, inputs, *, use_audio_in_video: bool = False, append_ids=None) -> MergedInputs:
    """The merged input embeddings of `inputs` (a BatchFeature from `lab.prepare`), batch 1.

    `append_ids` (token ids) are appended after the prompt as plain text tokens (a reply prefix, for
    teacher forcing). Runs under no_grad; the model is not changed (its `rope_deltas` included).
    """
    thinker = thinker_of(lab_or_model)
    inner = thinker.model
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"merge_inputs takes one sequence; got a batch of {input_ids.shape[0]}")
    device = thinker.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if append_ids is not None and len(append_ids):
        extra = torch.as_tensor(list(append_ids), dtype=input_ids.dtype, device=device).view(1, -1)
        input_ids = torch.cat([input_ids, extra], dim=1)
        attention_mask = torch.cat(
            [attention_mask, torch.ones_like(extra, dtype=attention_mask.dtype)], dim=1
        )

    with torch.no_grad():
        embeds = thinker.get_input_embeddings()(input_ids)
        feature_attention_mask = inputs.get("feature_attention_mask")
        audio_lengths = None
        if inputs.get("input_features") is not None:
            audio = inner.get_audio_features(
                inputs["input_features"], feature_attention_mask, None, return_dict=True
            ).last_hidden_state
            _, _, audio_mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds)
            embeds = embeds.masked_scatter(audio_mask, audio.to(embeds.device, embeds.dtype))
        if feature_attention_mask is not None:
            audio_lengths = feature_attention_mask.sum(dim=1)

        image_mask = video_mask = None
        image_stack = video_stack = None
        if inputs.get("pixel_values") is not None:
            out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
            features = torch.cat(out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
            image_mask, _, _ = inner.get_placeholder_mask(
                input_ids, inputs_embeds=embeds, image_features=features
            )
            embeds = embeds.masked_scatter(image_mask, features)
            image_mask = image_mask[..., 0]
            image_stack = [torch.cat(f, dim=0) for f in out.deepstack_features]
        if inputs.get("pixel_values_videos") is not None:
            out = inner.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
            )
            features = torch.cat(out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
            _, video_mask, _ = inner.get_placeholder_mask(
                input_ids, inputs_embeds=embeds, video_features=features
            )
            embeds = embeds.masked_scatter(video_mask, features)
            video_mask = video_mask[..., 0]
            video_stack = [torch.cat(f, dim=0) for f in out.deepstack_features]

        # Deepstack features in the order of the visual positions, as the model joins them.
        visual_pos_masks, deepstack = None, None
        if image_mask is not None and video_mask is not None:
            visual_pos_masks = image_mask | video_mask
            image_rows, video_rows = image_mask[visual_pos_masks], video_mask[visual_pos_masks]
            layers = []
            for image_layer, video_layer in zip(image_stack, video_stack, strict=True):
                joint = image_layer.new_zeros(int(visual_pos_masks.sum()), image_layer.shape[-1])
                joint[image_rows] = image_layer
                joint[video_rows] = video_layer
                layers.append(joint)
            deepstack = torch.stack(layers)
        elif image_mask is not None:
            visual_pos_masks, deepstack = image_mask, torch.stack(image_stack)
        elif video_mask is not None:
            visual_pos_masks, deepstack = video_mask, torch.stack(video_stack)
        if deepstack is not None:
            deepstack = deepstack.to(embeds.device, embeds.dtype)

        # get_rope_index is pure (compute_3d_position_ids would also store rope_deltas on the model).
        position_ids, _ = inner.get_rope_index(
            input_ids,
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            attention_mask,
            use_audio_in_video,
            audio_lengths,
            inputs.get("video_second_per_grid"),
        )
    return MergedInputs(
        input_ids=input_ids,
        inputs_embeds=embeds.detach(),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask,
        visual_pos_masks=visual_pos_masks,
        deepstack=deepstack.detach() if deepstack is not None else None,
    )


def thinker_logits(
    lab_or_model,
    merged: MergedInputs,
    inputs_embeds: torch.Tensor | None = None,
    deepstack: torch.Tensor | None = None,
    *,
    last_only: bool = True,
) -> torch.Tensor:
    """The thinker's logits from embeddings: [B, vocab] at the last position (or [B, S, vocab]).

    `inputs_embeds` [B, S, H] and `deepstack` [B, layers, V, H] replace the merged ones (default:
    `merged`'s own, batch 1); the positions, mask and visual positions are `merged`'s. Gradients flow
    when the caller enables them — the decoder runs exactly as in the thinker's forward (no cache).
    """
    thinker = thinker_of(lab_or_model)
    embeds = merged.inputs_embeds if inputs_embeds is None else inputs_embeds
    batch = embeds.shape[0]
    kwargs = {}
    if merged.visual_pos_masks is not None:
        stack = merged.deepstack.unsqueeze(0).expand(batch, -1, -1, -1) if deepstack is None else deepstack
        layers, visual, hidden = stack.shape[1:]
        # The model adds deepstack rows to hidden[visual_pos_masks], which walks the batch first.
        joined = stack.transpose(0, 1).reshape(layers, batch * visual, hidden)
        kwargs["deepstack_visual_embeds"] = list(joined.unbind(0))
        kwargs["visual_pos_masks"] = merged.visual_pos_masks.expand(batch, -1)
    out = thinker.model.language_model(
        inputs_embeds=embeds,
        attention_mask=merged.attention_mask.expand(batch, -1),
        position_ids=merged.position_ids.expand(-1, batch, -1),
        use_cache=False,
        **kwargs,
    )
    hidden_states = out.last_hidden_state
    if last_only:
        hidden_states = hidden_states[:, -1]
    return thinker.lm_head(hidden_states)


@contextlib.contextmanager
def gradients_to_inputs(lab_or_model) -> Iterator[None]:
    """Freeze every parameter and keep eval mode while open (gradients then reach only the inputs);
    on exit every requires_grad flag, training flag and the thinker's rope_deltas are as they were."""
    model = model_of(lab_or_model)
    thinker = thinker_of(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    rope_deltas = getattr(thinker.model, "rope_deltas", None)
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.training = training
        thinker.model.rope_deltas = rope_deltas


@contextlib.contextmanager
def frozen_routing(lab_or_model, merged: MergedInputs) -> Iterator[None]:
    """While open, every thinker router keeps, for each position, the experts it chose for `merged`
    as it is; only the weights follow the router's softmax (renormalized over those experts where
    the router renormalizes). The thinker then is a continuous function of its input embeddings.

    Top-k routing is discontinuous: where two experts swap at the k-th place the layer's output
    jumps. Gradient methods (Integrated Gradients) never see such jumps, so along a path that
    crosses them completeness fails by their sum. With the routing frozen at the input's choices
    there are none. Works for any batch of `merged`'s sequence (rows repeat per batch element).
    """
    from .sites import routers

    found = routers(model_of(lab_or_model), "thinker")
    chosen: dict[int, torch.Tensor] = {}
    handles = []

    def recorder(layer):
        def hook(module, args, output):
            chosen[layer] = output[2].detach()

        return hook

    def freezer(layer):
        def hook(module, args, output):
            logits, weights, _ = output
            indices = chosen[layer].repeat(logits.shape[0] // chosen[layer].shape[0], 1)
            probs = torch.softmax(logits.float(), dim=-1)
            new_weights = probs.gather(-1, indices)
            if module.norm_topk_prob:
                new_weights = new_weights / new_weights.sum(-1, keepdim=True)
            return logits, new_weights.to(weights.dtype), indices

        return hook

    try:
        for layer, module in found.items():
            handles.append(module.register_forward_hook(recorder(layer)))
        with torch.no_grad():
            thinker_logits(lab_or_model, merged)
        for handle in handles:
            handle.remove()
        handles.clear()
        for layer, module in found.items():
            handles.append(module.register_forward_hook(freezer(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()
