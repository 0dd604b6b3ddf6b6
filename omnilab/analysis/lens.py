"""The logit lens: what each layer of the thinker would say if decoding stopped there.

Each layer's residual stream (its decoder layer's output, the model's own `output_hidden_states`) is
read through the model's final RMSNorm and `lm_head` (nostalgebraist, 2020, "interpreting GPT: the
logit lens"; Belrose et al., 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens", for why intermediate layers read this way are biased). At the last layer the lens is the
model's own next-token distribution: its top-1 equals `lab.forward`'s argmax (a test checks it).

An analysis that must run the model, so it takes an OmniLab, as attribution does.

    logit_lens(lab, conversation, target=...)  → layer, pos, modality, rank, token_id, token, prob
                                                  (+ target_id, target_rank, target_prob)

The talker's lens reads each talker layer's residual stream at the row that predicts the next frame
(the last row of each talker forward) through the talker's final norm and `codec_head`: codebook 0
per layer and frame. Its last layer is the talker's own codebook-0 logits (a test checks the argmax).

    talker_lens(lab, conversation)             → frame, layer, rank, code, prob, talker_code
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import ConversationError
from ..instrument.unembed import talker_layer_modules, talker_unembed, thinker_layers, thinker_unembed

__all__ = ["logit_lens", "talker_lens"]

POSITION_CHUNK = 64  # positions unembedded at once: a 152k-word vocabulary is the memory here


def logit_lens(
    lab,
    conversation,
    *,
    layers=None,
    positions=None,
    last: int | None = None,
    target: int | str | None = None,
    top: int = 5,
    use_audio_in_video: bool = False,
) -> pd.DataFrame:
    """The thinker's logit lens over the prompt of `conversation` (one forward, nothing generated).

    layers: decoder layers (0-based, "after layer L"; None: all). positions: prompt positions (None:
    all; negative counts from the end); or `last`: the last n positions (all of a shorter prompt;
    the very last predicts the reply's first token). target: a token id, or text whose first token is taken; its
    rank (0 = the top token) and probability are added per layer and position. Returns one row per
    (layer, pos, rank) for the `top` most probable next tokens, with the position's modality.
    """
    inputs = lab.prepare(conversation, use_audio_in_video=use_audio_in_video)
    ids = inputs["input_ids"][0]
    n_layers, length = thinker_layers(lab), int(ids.shape[0])
    layers = _pick(layers, n_layers, "layer", f"the thinker has layers 0-{n_layers - 1}")
    if last is not None:
        if positions is not None or isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ConversationError(f"last is a whole number ≥ 1 given instead of positions; got {last!r}")
        positions = range(max(0, length - last), length)
    positions = _pick(positions, length, "position", f"the prompt has positions 0-{length - 1}")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ConversationError(f"top must be a whole number ≥ 1; got {top!r}")
    tokenizer = lab.processor.tokenizer
    target_id = _target_id(target, tokenizer, lab.thinker.config.text_config.vocab_size)
    with torch.inference_mode():
        hidden = lab.thinker(**inputs, output_hidden_states=True, use_audio_in_video=use_audio_in_video)
    states = hidden.hidden_states  # (embeddings, layer 0 .. layer N-2 outputs, the final *normed* output)
    unembed = thinker_unembed(lab)
    head = lab.thinker.get_output_embeddings()
    index = torch.as_tensor(positions, device=ids.device)
    parts = []
    for layer in layers:
        state = states[layer + 1][0, index]
        read = head if layer == n_layers - 1 else unembed  # the model's last state is already normed
        parts.append(_top_rows(read, state, layer, positions, top, target_id))
    frame = pd.concat(parts, ignore_index=True)
    modality = token_modalities(lab, ids.cpu().numpy())
    frame.insert(2, "modality", pd.Categorical(modality[frame["pos"].to_numpy()]))
    pieces = {int(t): tokenizer.decode([int(t)]) for t in pd.unique(frame["token_id"])}
    frame.insert(5, "token", frame["token_id"].map(pieces))
    return frame


def talker_lens(lab, conversation, *, top: int = 3, **options) -> pd.DataFrame:
    """The talker's logit lens over one spoken reply of `conversation` (`lab.generate` with speech).

    `options`: generation options (max_new_tokens, max_speech_frames, speaker ...; greedy by
    default). Returns one row per (frame, layer, rank) for the `top` most probable codebook-0 codes
    (frames are `reply.codes`'s rows, the talker's last, never completed step left out)
    the layer's residual reads as, with `talker_code`: the talker's own argmax of `codec_head` at
    that frame (what the last layer's rank 0 must equal).
    """
    if not lab.has_talker:
        raise ConversationError(f"model '{lab.model_id}' has no talker; the talker lens needs one")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ConversationError(f"top must be a whole number ≥ 1; got {top!r}")
    layers = talker_layer_modules(lab)
    states: list[list[torch.Tensor]] = [[] for _ in layers]
    own: list[torch.Tensor] = []

    def keep(layer):
        return lambda module, args, output: states[layer].append(_last_row(output))

    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(layers)]
    handles.append(
        lab.model.talker.codec_head.register_forward_hook(lambda m, a, o: own.append(_last_row(o)))
    )
    try:
        reply = lab.generate(conversation, return_audio=True, **options)
    finally:
        for handle in handles:
            handle.remove()
    # The talker's last step makes a codebook-0 code the code predictor never completes (or its end
    # of speech): frames are the reply's, one per completed code, so that step is left out.
    frames = 0 if reply.codes is None else len(reply.codes)
    states, own = [rows[:frames] for rows in states], own[:frames]
    if frames == 0:
        raise ConversationError(
            "the talker spoke no frame for this conversation; the talker lens has nothing to read"
        )
    unembed, parts = talker_unembed(lab), []
    talker_code = torch.stack(own).argmax(-1).cpu().numpy()
    with torch.inference_mode():
        for layer, rows in enumerate(states):
            probs = torch.softmax(unembed(torch.stack(rows)).float(), dim=-1)
            values, codes = probs.topk(min(top, probs.shape[-1]), dim=-1)
            k = codes.shape[-1]
            parts.append(
                pd.DataFrame(
                    {
                        "frame": np.repeat(np.arange(len(rows)), k),
                        "layer": layer,
                        "rank": np.tile(np.arange(k), len(rows)),
                        "code": codes.reshape(-1).cpu().numpy(),
                        "prob": values.reshape(-1).cpu().numpy(),
                        "talker_code": np.repeat(talker_code, k),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def _last_row(output) -> torch.Tensor:
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden[0, -1].detach().clone()


def _top_rows(
    read, state: torch.Tensor, layer: int, positions: list[int], top: int, target_id
) -> pd.DataFrame:
    rows: dict[str, list] = {k: [] for k in ("pos", "rank", "token_id", "prob", "target_rank", "target_prob")}
    for start in range(0, len(positions), POSITION_CHUNK):
        with torch.inference_mode():
            probs = torch.softmax(read(state[start : start + POSITION_CHUNK]).float(), dim=-1)
        values, tokens = probs.topk(top, dim=-1)
        pos = np.repeat(positions[start : start + POSITION_CHUNK], top)
        rows["pos"].append(pos)
        rows["rank"].append(np.tile(np.arange(top), len(probs)))
        rows["token_id"].append(tokens.reshape(-1).cpu().numpy())
        rows["prob"].append(values.reshape(-1).cpu().numpy())
        if target_id is not None:
            chosen = probs[:, target_id]
            rank = (probs > chosen[:, None]).sum(dim=-1)  # tokens strictly more probable
            rows["target_rank"].append(np.repeat(rank.cpu().numpy(), top))
            rows["target_prob"].append(np.repeat(chosen.cpu().numpy(), top))
    frame = pd.DataFrame({k: np.concatenate(v) for k, v in rows.items() if v})
    frame.insert(0, "layer", layer)
    if target_id is not None:
        frame.insert(len(frame.columns) - 2, "target_id", target_id)
    return frame


def _pick(values, size: int, what: str, fits: str) -> list[int]:
    if values is None:
        return list(range(size))
    values = [values] if isinstance(values, (int, np.integer)) else list(values)
    picked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not -size <= value < size:
            raise ConversationError(f"{what} {value!r} is out of range; {fits}")
        picked.append(int(value) % size)
    return picked


def _target_id(target, tokenizer, vocab: int) -> int | None:
    if target is None:
        return None
    if isinstance(target, str):
        ids = tokenizer.encode(target, add_special_tokens=False)
        if not ids:
            raise ConversationError("target is empty text; pass a word or a token id")
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < vocab:
        raise ConversationError(f"target {target!r} is not a token id of this model (0-{vocab - 1}) or text")
    return int(target)


def token_modalities(lab, ids: np.ndarray) -> np.ndarray:
    """The modality of each token id of the thinker's prompt: text, or its media placeholder's."""
    config = lab.thinker.config
    out = np.full(len(ids), "text", dtype=object)
    for name in ("audio", "image", "video"):
        out[ids == getattr(config, f"{name}_token_id")] = name
    return out
