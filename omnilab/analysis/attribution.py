"""Input attribution: which input tokens — text, audio, image, video — a reply token depends on.

One file on purpose (~550 lines): both methods share the teacher-forced objective, the merged inputs
and the token table, and their aggregations (by modality, item, window, patch) read those alone.

An analysis that must run the model, so it takes an OmniLab rather than a Trace. The thing explained
is the log-probability of one reply token given the prompt and the reply tokens before it (teacher
forcing, one thinker forward). Its inputs are the embeddings each position enters the decoder with:
text embeddings with the audio / image / video tower features merged in at their placeholders, plus
the vision tower's deepstack features that the model adds to visual positions after its first
layers (see `omnilab.instrument.embeds`). Attributing to the placeholder ids themselves cannot work:
every `<|image_pad|>` has the same embedding, the information is in the features that replace it.

Methods:
    integrated_gradients  Integrated Gradients (Sundararajan, Taly & Yan, 2017, "Axiomatic Attribution
                          for Deep Networks"), captum's implementation, on the merged embeddings and the
                          deepstack features, from an all-zero baseline. Completeness: the attributions
                          sum to f(input) − f(baseline) up to captum's convergence `delta`. Two choices
                          make that delta shrink with steps on an MoE thinker: the routers keep the
                          input's experts along the path (`routing="frozen"`: top-k switches are jumps
                          no gradient sees), and the quadrature nodes are log-spaced in the path
                          fraction (`log_spaced_nodes`: RMSNorms make f vary on every scale of it).
    feature_ablation      Occlusion of groups (Zeiler & Fergus, 2014; captum's FeatureAblation): each
                          media item is one group, all text one group; a group's attribution is
                          f(input) − f(input with the group's embeddings and deepstack features zeroed),
                          spread evenly over the group's tokens (so sums per group give the effect).

    attribute                 → Attribution (tokens table, target, delta, total)
    attribution_by_modality   → modality, tokens, attribution, share
    attribution_by_item       → modality, item, tokens, attribution, share
    attribution_by_window     → audio windows of `seconds`, or video frames
    attribution_by_patch      → one image's (h, w) grid
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import ConversationError
from ..trace import MODALITIES

__all__ = [
    "METHODS",
    "Attribution",
    "attribute",
    "attribution_by_item",
    "attribution_by_modality",
    "attribution_by_patch",
    "attribution_by_window",
]

log = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "feature_ablation")
ROUTINGS = ("frozen", "model")
LOG_FLOOR = 1e-10  # the smallest path fraction with its own quadrature nodes (see log_spaced_nodes)
# Forwards per batch: positions × hidden size × layers of one batch stay under this (with gradients,
# ~1,400 positions of the 30B-A3B thinker, ~10 GB in bf16; the whole of a tiny-model run).
ACTIVATION_BUDGET = 2**27

TOKEN_COLUMNS = [
    "pos",
    "phase",
    "token_id",
    "piece",
    "text",
    "modality",
    "item",
    "t",
    "h",
    "w",
    "seconds",
    "frame",
    "attribution",
    "deepstack",
]


@dataclass(frozen=True)
class Attribution:
    """What `attribute` found.

    tokens: one row per input position (the prompt, then the reply tokens before the target):
        pos, phase ("prefill" for the prompt, "decode" for reply tokens), token_id, piece (the token's
        text; also as `text`, the trace's name for it), modality, item (media item index, -1 for
        text), t/h/w (TM-RoPE ids), seconds (audio time, video frame time, NaN for text), frame
        (audio token index, video frame index, -1 else), attribution (summed over the hidden size;
        deepstack included), deepstack (the part of it that came through the deepstack features).
    target: token_id, piece, index (in the reply), logprob (at the input), baseline_logprob (at the
        all-zero baseline). delta: captum's convergence delta, sum(attribution) − (logprob −
        baseline_logprob); NaN for feature ablation. method, steps; total: sum of attributions.
    meta: prompt_length, reply_ids (the reply tokens used), position_id_per_seconds,
        video_second_per_grid (seconds per video frame, per video), use_audio_in_video, routing.
    """

    tokens: pd.DataFrame
    target: dict
    delta: float
    method: str
    steps: int
    total: float
    meta: dict = field(default_factory=dict)


def attribute(
    lab,
    conversation,
    *,
    target: int | None = None,
    method: str = "integrated_gradients",
    steps: int = 32,
    baseline="zeros",
    use_audio_in_video: bool = False,
    reply=None,
    routing: str | None = None,
    internal_batch_size: int | None = None,
    show_progress: bool = False,
) -> Attribution:
    """Attribute one reply token's log-probability to every input position of `conversation`.

    target: None = the first reply token; an int = index into the reply tokens (negative counts from
    the end when `reply` is given). reply: a Reply or token ids; None = the greedy reply, generated
    as far as the target. method: "integrated_gradients" (`steps` quadrature nodes, log-spaced: see
    `log_spaced_nodes`) or "feature_ablation" (one forward per group). baseline: "zeros" (all
    embeddings and deepstack features zero) or an array shaped like the merged embeddings ([S, H] or
    [1, S, H]; deepstack features stay zero). routing: "frozen" keeps every thinker router's experts
    as chosen for the input (see `omnilab.instrument.embeds.frozen_routing`), "model" lets them
    switch; None = "frozen" for Integrated Gradients (else the deltas hold the jumps of every expert
    swap along the path and do not shrink with steps) and "model" for ablation. At the zero
    baseline every hidden state is zero, so both give the same f(baseline) = −log(vocabulary size).
    internal_batch_size: forwards per batch (default: as many as ACTIVATION_BUDGET allows). show_progress:
    a progress bar (tqdm; captum's for ablation). The model is left as found: no hooks, its requires_grad
    flags, eval mode and rope deltas restored. Runs the decoder directly (not the thinker's forward),
    so a `lab.intervene(modality=...)` does not apply here; unrestricted router interventions do.
    """
    import torch

    from ..instrument.embeds import (
        frozen_routing,
        gradients_to_inputs,
        merge_inputs,
        thinker_logits,
        thinker_of,
    )

    if method not in METHODS:
        raise ConversationError(f"unknown attribution method {method!r}; choose {' or '.join(METHODS)}")
    if method == "integrated_gradients" and (
        isinstance(steps, bool) or not isinstance(steps, int) or steps < 2
    ):
        raise ConversationError(
            f"steps must be an int ≥ 2 (quadrature nodes of the path integral); got {steps!r}"
        )
    if routing not in (None, *ROUTINGS):
        raise ConversationError(
            f"unknown routing {routing!r}; use 'frozen', 'model' or None (the method's default)"
        )
    reply_ids, index = _reply_and_index(lab, conversation, target, reply, use_audio_in_video)
    target_id = reply_ids[index]

    # Not in inference mode, even when the caller is: its tensors cannot take part in autograd.
    with torch.inference_mode(False):
        started = time.perf_counter()
        inputs = lab.prepare(conversation, use_audio_in_video=use_audio_in_video)
        prompt_length = int(inputs["input_ids"].shape[1])
        merged = merge_inputs(
            lab, inputs, use_audio_in_video=use_audio_in_video, append_ids=reply_ids[:index]
        )
        embeds = merged.inputs_embeds
        base_embeds = _baseline(baseline, embeds)
        has_deepstack = merged.deepstack is not None
        inputs_tuple = (embeds,) + ((merged.deepstack.unsqueeze(0),) if has_deepstack else ())
        baselines = (base_embeds,) + ((torch.zeros_like(inputs_tuple[1]),) if has_deepstack else ())

        def logprob(embeds_batch, deepstack_batch=None):
            logits = thinker_logits(lab, merged, embeds_batch, deepstack_batch)
            return torch.log_softmax(logits.float(), dim=-1)[:, target_id]

        text_config = thinker_of(lab).config.text_config
        per_forward = merged.length * text_config.hidden_size * text_config.num_hidden_layers
        per_batch = internal_batch_size or max(1, ACTIVATION_BUDGET // per_forward)
        tokens = _token_rows(lab, merged, prompt_length)
        routing = routing or ("frozen" if method == "integrated_gradients" else "model")
        freeze = frozen_routing(lab, merged) if routing == "frozen" else contextlib.nullcontext()
        with gradients_to_inputs(lab), freeze:
            with torch.no_grad():
                at_input = float(logprob(*inputs_tuple)[0])
                at_baseline = float(logprob(*baselines)[0])
            if method == "integrated_gradients":
                per_token, deepstack, delta = _integrated_gradients(
                    logprob, inputs_tuple, baselines, merged, steps, per_batch, show_progress
                )
            else:
                group = _groups(tokens)
                per_token = _feature_ablation(
                    logprob, inputs_tuple, baselines, merged, group, per_batch, show_progress
                )
                deepstack, delta = np.zeros(merged.length), math.nan
        tokens["attribution"] = per_token
        tokens["deepstack"] = deepstack
        log.info(
            "%s attribution of reply token %d over %d positions in %.2f s",
            method,
            index,
            merged.length,
            time.perf_counter() - started,
        )
        second_per_grid = inputs.get("video_second_per_grid")
        return Attribution(
            tokens=tokens[TOKEN_COLUMNS],
            target={
                "token_id": int(target_id),
                "piece": _pieces(lab.processor.tokenizer, [target_id])[0],
                "index": int(index),
                "logprob": at_input,
                "baseline_logprob": at_baseline,
            },
            delta=delta,
            method=method,
            steps=int(steps) if method == "integrated_gradients" else 0,
            total=float(tokens["attribution"].sum()),
            meta={
                "prompt_length": prompt_length,
                "reply_ids": [int(i) for i in reply_ids],
                "position_id_per_seconds": _pps(lab),
                "video_second_per_grid": []
                if second_per_grid is None
                else [float(s) for s in second_per_grid],
                "use_audio_in_video": bool(use_audio_in_video),
                "routing": routing,
            },
        )


# -- summaries ---------------------------------------------------------------------------------------
def attribution_by_modality(attr) -> pd.DataFrame:
    """Attribution per modality: modality, tokens, attribution (sum over its tokens), share
    (attribution / total, signed: with mixed signs a share can fall outside [0, 1]). Rows in the
    order text, audio, image, video; the attributions sum to the total."""
    tokens = _tokens(attr)
    grouped = tokens.groupby("modality", sort=False)["attribution"].agg(["size", "sum"])
    order = [m for m in MODALITIES if m in grouped.index] + [m for m in grouped.index if m not in MODALITIES]
    grouped = grouped.reindex(order)
    total = float(tokens["attribution"].sum())
    return pd.DataFrame(
        {
            "modality": pd.Series(order, dtype=object),
            "tokens": grouped["size"].to_numpy(dtype=np.int64),
            "attribution": grouped["sum"].to_numpy(dtype=float),
            "share": grouped["sum"].to_numpy(dtype=float) / total if total else np.nan,
        }
    )


def attribution_by_item(attr) -> pd.DataFrame:
    """Attribution per media item (and all text as item -1): modality, item, tokens, attribution,
    share. With feature ablation each row is exactly one ablated group's effect."""
    tokens = _tokens(attr)
    grouped = (
        tokens.groupby(["modality", "item"], sort=False)["attribution"].agg(["size", "sum"]).reset_index()
    )
    rank = {m: i for i, m in enumerate(MODALITIES)}
    grouped = grouped.sort_values(
        ["modality", "item"], key=lambda s: s.map(rank) if s.name == "modality" else s
    )
    total = float(tokens["attribution"].sum())
    return pd.DataFrame(
        {
            "modality": grouped["modality"].astype(object).to_numpy(),
            "item": grouped["item"].to_numpy(dtype=np.int64),
            "tokens": grouped["size"].to_numpy(dtype=np.int64),
            "attribution": grouped["sum"].to_numpy(dtype=float),
            "share": grouped["sum"].to_numpy(dtype=float) / total if total else np.nan,
        }
    )


def attribution_by_window(attr, modality: str = "audio", *, seconds: float = 1.0) -> pd.DataFrame:
    """Attribution over time. audio: windows of `seconds` per audio item (by each token's time);
    video: one row per frame (`seconds` is not used; a frame lasts until the next one starts).

    Columns: item, frame (video; -1 for audio), window_start, window_end (seconds from the item's
    start), tokens, attribution. Only windows that hold tokens appear.
    """
    if modality not in ("audio", "video"):
        raise ConversationError(f"attribution_by_window covers audio and video; got {modality!r}")
    if not seconds or seconds <= 0:
        raise ConversationError(f"window length must be positive seconds; got {seconds!r}")
    tokens = _tokens(attr)
    rows = tokens[tokens["modality"].astype(str) == modality]
    columns = ["item", "frame", "window_start", "window_end", "tokens", "attribution"]
    if len(rows) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    if modality == "audio":
        window = np.floor(rows["seconds"].to_numpy(dtype=float) / seconds + 1e-9).astype(np.int64)
        grouped = (
            rows.assign(window=window)
            .groupby(["item", "window"], sort=True)["attribution"]
            .agg(["size", "sum"])
            .reset_index()
        )
        start = grouped["window"].to_numpy() * float(seconds)
        return pd.DataFrame(
            {
                "item": grouped["item"].to_numpy(dtype=np.int64),
                "frame": -1,
                "window_start": start,
                "window_end": start + float(seconds),
                "tokens": grouped["size"].to_numpy(dtype=np.int64),
                "attribution": grouped["sum"].to_numpy(dtype=float),
            }
        )
    grouped = (
        rows.groupby(["item", "frame"], sort=True)
        .agg(
            tokens=("attribution", "size"),
            attribution=("attribution", "sum"),
            window_start=("seconds", "min"),
        )
        .reset_index()
    )
    per_frame = _meta(attr).get("video_second_per_grid") or []
    ends = []
    for item, part in grouped.groupby("item", sort=True):
        starts = part["window_start"].to_numpy(dtype=float)
        if int(item) < len(per_frame):
            length = per_frame[int(item)]
        else:
            length = float(np.median(np.diff(starts))) if len(starts) > 1 else math.nan
        ends.append(np.append(starts[1:], starts[-1] + length))
    return pd.DataFrame(
        {
            "item": grouped["item"].to_numpy(dtype=np.int64),
            "frame": grouped["frame"].to_numpy(dtype=np.int64),
            "window_start": grouped["window_start"].to_numpy(dtype=float),
            "window_end": np.concatenate(ends),
            "tokens": grouped["tokens"].to_numpy(dtype=np.int64),
            "attribution": grouped["attribution"].to_numpy(dtype=float),
        }
    )


def attribution_by_patch(attr, item: int = 0) -> pd.DataFrame:
    """One image's attribution on its token grid: h, w (row and column of the merged 2×2-patch grid,
    from 0), pos, attribution; one row per image token, in row-major order."""
    tokens = _tokens(attr)
    rows = tokens[(tokens["modality"].astype(str) == "image") & (tokens["item"] == item)]
    if len(rows) == 0:
        present = sorted(
            int(i) for i in tokens.loc[tokens["modality"].astype(str) == "image", "item"].unique()
        )
        raise ConversationError(
            f"the attribution has no image item {item!r}; its image items are {present or 'none'}"
        )
    h = rows["h"].to_numpy(dtype=np.int64)
    w = rows["w"].to_numpy(dtype=np.int64)
    out = pd.DataFrame(
        {
            "h": h - h.min(),
            "w": w - w.min(),
            "pos": rows["pos"].to_numpy(dtype=np.int64),
            "attribution": rows["attribution"].to_numpy(dtype=float),
        }
    )
    return out.sort_values(["h", "w"], ignore_index=True)


def _integrated_gradients(logprob, inputs, baselines, merged, steps, per_batch, show_progress):
    """captum's Integrated Gradients at our quadrature nodes: (per position, its deepstack part, delta)."""
    from captum.attr import IntegratedGradients
    from tqdm.auto import tqdm

    from .. import hf_private

    ig = IntegratedGradients(logprob)
    sizes, alphas = log_spaced_nodes(steps)
    total = None
    starts = range(0, steps, per_batch)
    for start in tqdm(starts, desc="integrated gradients", disable=not show_progress or len(starts) < 2):
        chunk = slice(start, start + per_batch)
        # what captum's own internal batching does, with our nodes instead of its fixed schemes
        part = hf_private.integrated_gradients_at(ig, inputs, baselines, sizes[chunk], alphas[chunk])
        part = tuple(a.detach() for a in part)
        total = part if total is None else tuple(a + b for a, b in zip(total, part, strict=True))
    delta = float(ig.compute_convergence_delta(total, baselines, inputs).reshape(-1)[0])
    per_token = total[0][0].double().sum(-1).cpu().numpy()
    deepstack = np.zeros(merged.length)
    if merged.deepstack is not None:  # [layers, V, H] per visual position, summed over layers and hidden
        deepstack[merged.visual_pos_masks[0].cpu().numpy()] = (
            total[1][0].double().sum(dim=(0, 2)).cpu().numpy()
        )
    return per_token + deepstack, deepstack, delta


def _feature_ablation(logprob, inputs, baselines, merged, group, per_batch, show_progress) -> np.ndarray:
    """captum's FeatureAblation over `group` (one id per position; a group's deepstack rows go with
    it): each position gets its group's effect divided by the group's size."""
    import torch
    from captum.attr import FeatureAblation

    device = inputs[0].device
    masks = (torch.as_tensor(group, device=device).view(1, -1, 1),)
    if merged.deepstack is not None:
        visual = merged.visual_pos_masks[0].cpu().numpy()
        masks += (torch.as_tensor(group[visual], device=device).view(1, 1, -1, 1),)
    groups = int(group.max()) + 1
    attributions = FeatureAblation(logprob).attribute(
        inputs,
        baselines=baselines,
        feature_mask=masks,
        perturbations_per_eval=max(1, min(per_batch, groups)),
        show_progress=show_progress,
    )
    effect = attributions[0][0, :, 0].double().cpu().numpy()  # the group's effect, at every member
    return effect / np.bincount(group, minlength=groups)[group]


def log_spaced_nodes(steps: int, floor: float = LOG_FLOOR) -> tuple[list[float], list[float]]:
    """Quadrature of the Integrated Gradients path integral over α ∈ [0, 1]: (step sizes, alphas).

    The thinker's output along the straight path α·x changes on every scale of α, from ~1e-9 to 1:
    each RMSNorm is scale-free until α·|x| nears its epsilon, and norms compound through the layers.
    Uniform or Gauss-Legendre nodes in α miss the small scales (convergence deltas of 0.1-0.3 on the
    tiny model however many steps), so the nodes are Gauss-Legendre in log α over [floor, 1]
    (`steps` − 1 of them, weight α·dlog α) plus one midpoint node for [0, floor], where the model is
    linear in α. The path is unchanged; only where it is sampled. Deltas on `tiny`: ~1e-3 at 32
    steps, ~1e-5 at 64.
    """
    x, w = np.polynomial.legendre.leggauss(steps - 1)
    span = -math.log(floor)
    alphas = np.exp(-span * (1 - x) / 2)
    sizes = w * span / 2 * alphas
    return [floor, *sizes.tolist()], [floor / 2, *alphas.tolist()]


# -- helpers -----------------------------------------------------------------------------------------
def _tokens(attr) -> pd.DataFrame:
    tokens = attr.tokens if isinstance(attr, Attribution) else attr
    if not isinstance(tokens, pd.DataFrame) or "attribution" not in tokens or "modality" not in tokens:
        raise ConversationError("pass an Attribution (from omnilab.analysis.attribute) or its tokens table")
    return tokens


def _meta(attr) -> dict:
    return attr.meta if isinstance(attr, Attribution) else {}


def _reply_and_index(lab, conversation, target, reply, use_audio_in_video) -> tuple[list[int], int]:
    """The reply token ids (as far as needed) and the target's index into them."""
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))):
        raise ConversationError(f"target is a reply token index (int) or None; got {target!r}")
    index = 0 if target is None else int(target)
    if reply is None:
        if index < 0:
            raise ConversationError(
                f"target {index} counts from the end of the reply, which is not known yet; pass reply= "
                "(a Reply or token ids) or a target ≥ 0"
            )
        generated = lab.generate(
            conversation, return_audio=False, max_new_tokens=index + 1, use_audio_in_video=use_audio_in_video
        )
        ids = [int(i) for i in generated.token_ids]
        if index >= len(ids):
            raise ConversationError(
                f"target {index} is past the end of the greedy reply: it ended after {len(ids)} tokens; "
                f"choose a target below {len(ids)}"
            )
        return ids, index
    ids = getattr(reply, "token_ids", reply)
    try:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    except (TypeError, ValueError):
        raise ConversationError(
            f"reply must be a Reply or a list of token ids; got {type(reply).__name__}"
        ) from None
    if not ids:
        raise ConversationError("the reply has no tokens: nothing to attribute")
    if not -len(ids) <= index < len(ids):
        raise ConversationError(
            f"target {index} is out of range: the reply has {len(ids)} tokens (indices 0..{len(ids) - 1}, "
            f"or -{len(ids)}..-1 from the end)"
        )
    return ids, index % len(ids)


def _baseline(baseline, embeds):
    import torch

    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ConversationError(f"unknown baseline {baseline!r}; use 'zeros' or an array of embeddings")
        return torch.zeros_like(embeds)
    values = torch.as_tensor(
        np.asarray(baseline, dtype=np.float32) if not torch.is_tensor(baseline) else baseline
    )
    values = values.to(embeds.device, embeds.dtype)
    if values.dim() == 2:
        values = values.unsqueeze(0)
    if tuple(values.shape) != tuple(embeds.shape):
        raise ConversationError(
            f"baseline shape {tuple(values.shape)} does not match the merged embeddings {tuple(embeds.shape)}"
        )
    return values


def _groups(tokens: pd.DataFrame) -> np.ndarray:
    """Ablation groups: all text tokens form one, each media item one, numbered in order of appearance."""
    modality = tokens["modality"].astype(str).to_numpy()
    key = np.where(modality == "text", "text", modality + ":" + tokens["item"].astype(str).to_numpy())
    return pd.factorize(key)[0].astype(np.int64)


def _pps(lab) -> float:
    from ..instrument.record import position_id_per_seconds

    return position_id_per_seconds(lab.model)


def _pieces(tokenizer, ids) -> list[str]:
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]


def _token_rows(lab, merged, prompt_length: int) -> pd.DataFrame:
    """One row per input position, annotated as the tracer annotates a trace's tokens."""
    from ..instrument.record import annotate_tokens, special_tokens

    ids = merged.input_ids[0].cpu().numpy().astype(np.int64)
    positions = merged.position_ids[:, 0].cpu().numpy().astype(np.int64)
    pos = np.arange(len(ids))
    decode = pos >= prompt_length
    columns = {
        "pos": pos,
        "phase": np.where(decode, "decode", "prefill").astype(object),
        "step": np.where(decode, pos - prompt_length + 1, 0),
        "token_id": ids,
        "t": positions[0],
        "h": positions[1],
        "w": positions[2],
    }
    model = lab.model
    frame = pd.DataFrame(
        annotate_tokens(columns, "thinker", lab.processor.tokenizer, special_tokens(model), _pps(lab))
    )
    frame["piece"] = frame["text"]
    return frame
