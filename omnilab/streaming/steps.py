"""One model's generation, a step at a time, with transformers' own machinery (the body of `_sample`).

`model.generate(custom_generate=capture)` prepares the decoding state (generation config, logits
processors, stopping criteria, cache, position ids) and hands it to `capture` instead of decoding;
a `Decoder` then runs the loop body of `GenerationMixin._sample` one forward per call. The talker's
prompt is built by the lines of `Qwen3OmniMoeForConditionalGeneration.generate` that build it.
transformers' private steps are called through omnilab.hf_private.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .. import hf_private
from ..errors import ConversationError
from ..generation import last_logits_only
from ..instrument.context import model_lock  # noqa: F401  (the model's one lock; a stream holds it each step)


def sync(device: torch.device) -> None:
    # GPU work is asynchronous: stage times mean something only once the device has caught up.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """A `custom_generate` that decodes nothing: it returns the state `generate` prepared."""
    return Prepared(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)


@dataclass
class Prepared:
    input_ids: torch.Tensor
    logits_processor: object
    stopping_criteria: object
    generation_config: object
    model_kwargs: dict


class Decoder:
    """One model's decoding loop (the body of `GenerationMixin._sample`), advanced a step per call.

    `prepare()` gives the next forward's inputs (the decode branch of the model's own
    `prepare_inputs_for_generation`); `forward(inputs)` runs it and picks the next token.
    """

    def __init__(self, model, prepared: Prepared):
        self.model = model
        self.input_ids = prepared.input_ids
        self.logits_processor = prepared.logits_processor
        self.stopping_criteria = prepared.stopping_criteria
        self.config = prepared.generation_config
        self.kwargs = prepared.model_kwargs
        self.prompt_length = prepared.input_ids.shape[1]
        self.unfinished = torch.ones(self.input_ids.shape[0], dtype=torch.long, device=self.input_ids.device)
        self.outputs = None
        self.steps = 0  # forwards run, the prefill included
        self.done = False

    @property
    def generated(self) -> torch.Tensor:
        return self.input_ids[0, self.prompt_length :]

    def prefill(self) -> torch.Tensor:
        with last_logits_only(self.model):  # only the last row is read: no [L, vocab] logits
            outputs = hf_private.prefill(self.model, self.input_ids, self.config, self.kwargs)
        return self._select(outputs)

    def prepare(self, **updates) -> dict:
        self.kwargs.update(updates)
        next_length = 1 if self.kwargs["use_cache"] else None
        return self.model.prepare_inputs_for_generation(
            self.input_ids, next_sequence_length=next_length, **self.kwargs
        )

    def forward(self, inputs: dict) -> torch.Tensor:
        with hf_private.decode_mode(self.model):
            outputs = self.model(**inputs, return_dict=True)
        return self._select(outputs)

    def _select(self, outputs) -> torch.Tensor:
        self.kwargs = hf_private.update_model_kwargs(self.model, outputs, self.kwargs)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.input_ids.device)
        scores = self.logits_processor(self.input_ids, logits)
        if self.config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        # One sequence, stopped as soon as it finishes: _sample's padding of finished rows never applies.
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=-1)
        self.unfinished = self.unfinished & ~self.stopping_criteria(self.input_ids, scores)
        self.done = bool(self.unfinished.max() == 0)
        self.outputs = outputs
        self.steps += 1
        return tokens


def talker_prompt(model, input_ids, attention_mask, thinker_embed, thinker_hidden, speaker_id: int) -> dict:
    """The talker's prefill, built by the lines of `generate` that build it, from the prompt and first token.

    `thinker_embed` covers the prompt and the first reply token, `thinker_hidden` (the
    `accept_hidden_layer` states) the prompt. Returns inputs_embeds, input_ids and attention_mask for
    the talker, and the projected tts_pad / tts_eos embeddings.
    """
    config = model.config
    thinker_config = config.thinker_config
    multimodal_mask = (
        (input_ids == thinker_config.audio_token_id)
        | (input_ids == thinker_config.image_token_id)
        | (input_ids == thinker_config.video_token_id)
    )
    mask = (
        input_ids.new_ones(input_ids.shape) if attention_mask is None else attention_mask.to(input_ids.device)
    )
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    im_starts = torch.where(input_ids == config.im_start_token_id, positions, positions.new_full((), -1))
    previous_im_start = torch.cummax(im_starts, dim=-1).values.clamp_min(0)
    roles = input_ids.gather(1, (previous_im_start + 1).clamp_max(length - 1))
    user_mask = (roles == config.user_token_id) & mask.bool()
    user_lengths = user_mask.sum(dim=-1)
    max_user = int(user_lengths.max().item())
    if max_user == 0:
        raise ConversationError("the conversation has no user turn; the talker speaks a reply to one")
    user_indices = torch.where(user_mask, length + positions, positions).argsort(dim=-1)[:, -max_user:]
    full_user = hf_private.talker_user_parts(model, 0, length, multimodal_mask, thinker_hidden, thinker_embed)
    user_embeds = full_user.gather(1, user_indices.unsqueeze(-1).expand(-1, -1, full_user.shape[-1]))
    user_ids = input_ids.gather(1, user_indices)
    user_attention = (
        torch.arange(max_user, device=input_ids.device).unsqueeze(0) >= (max_user - user_lengths).unsqueeze(1)
    ).to(mask.dtype)
    starts = (input_ids[:, :-1] == config.im_start_token_id) & (input_ids[:, 1:] == config.assistant_token_id)
    assistant_start = torch.nonzero(starts[0], as_tuple=False).flatten()[-1].item()
    special = torch.tensor(
        [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
        device=model.thinker.device,
        dtype=input_ids.dtype,
    )
    tts_bos, tts_eos, tts_pad = (
        model.talker.text_projection(model.thinker.get_input_embeddings()(special))
        .to(input_ids.device)
        .chunk(3, dim=1)
    )
    assistant_embeds, assistant_ids, _ = hf_private.talker_assistant_parts(
        model, assistant_start, thinker_embed.shape[1], speaker_id, thinker_embed, tts_pad, tts_bos, tts_eos
    )
    return {
        "inputs_embeds": torch.cat((user_embeds, assistant_embeds), dim=1),
        "input_ids": torch.cat((user_ids, assistant_ids), dim=1),
        "attention_mask": torch.cat((user_attention, mask.new_ones((1, assistant_embeds.shape[1]))), dim=1),
        "tts_pad": tts_pad,
        "tts_eos": tts_eos,
    }


@contextmanager
def code_predictor_sampling(talker, do_sample: bool) -> Iterator[None]:
    """The talker reads its code predictor's `do_sample` every step (generate sets it): set it, then restore."""
    config = talker.code_predictor.generation_config
    saved = config.do_sample
    config.do_sample = do_sample
    try:
        yield
    finally:
        config.do_sample = saved
