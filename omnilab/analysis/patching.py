"""Activation patching: which (layer, position group) carries what differs between two runs.

Run a clean and a corrupted prompt (e.g. the same question with the real image and with a blank one
of the same size); for each site and group of positions, put the clean activation into the corrupted
run there and read a metric of the next-token logits (Meng et al., 2022, "Locating and Editing
Factual Associations in GPT" (causal tracing); Heimersheim & Nanda, 2024, "How to use and interpret
activation patching"). `recovered` = (patched - corrupted) / (clean - corrupted): 1 where the patch
restores the clean answer, 0 where it changes nothing.

Batched: clean and corrupted run once; the text model's inputs of the corrupted run (merged
embeddings, TM-RoPE positions, mask, deepstack features) and the hidden state entering each layer
are kept, and the patches at one layer ride one batch (one patch per row, chunked by a memory
estimate) through that layer and the ones after it only: no tower re-runs, no layers a patch cannot
change; the final norm is the model's and `lm_head` reads only the last position. `batched=False` instead runs
one full `lab.forward` per patch under `lab.intervene(set=..., at=...)` (the reference: a test shows
both agree to float rounding — grouped expert matmuls round differently at different batch sizes).

An analysis that must run the model, so it takes an OmniLab, as attribution does.

    patching_sweep(lab, clean, corrupted, metric)  → site, kind, layer, group, modality, pos_start,
                                                      pos_end, positions, metric, clean, corrupted, recovered
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import InterventionError
from ..instrument.budget import MEMORY_BUDGET_BYTES
from ..instrument.patch import RecordedRun, patched_last_logits, record_run
from ..instrument.sites import resolve_sites
from .lens import token_modalities

__all__ = ["patching_sweep", "sweep_memory_per_row"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """A group of prompt positions patched together."""

    label: str
    positions: np.ndarray
    modality: str


def patching_sweep(
    lab,
    clean,
    corrupted,
    metric: Callable[[torch.Tensor], float] | int | str,
    *,
    sites="resid.*",
    positions: str | int | list | dict = "modality",
    batched: bool = True,
    memory_budget: int = MEMORY_BUDGET_BYTES,
    use_audio_in_video: bool = False,
) -> pd.DataFrame:
    """Patch each clean site activation, per position group, into the corrupted run; one row per patch.

    metric: a function of the last position's next-token logits [vocab] (float32) → a number, or a
    token (id or text) whose log-probability is the metric. sites: thinker residual, attention or MLP
    sites (aliases, paths, globs). positions: "modality" (contiguous blocks of one modality), "each"
    (every position alone), n (n equal runs of consecutive positions), a list of positions or of
    lists, or {label: positions}. Returns site, kind, layer, group, modality, pos_start, pos_end,
    positions (count), metric, clean, corrupted, recovered.
    """
    chosen = _sites(lab, sites)
    score = _metric(lab, metric)
    clean_run, corrupted_run = (
        record_run(lab, c, chosen, use_audio_in_video=use_audio_in_video) for c in (clean, corrupted)
    )
    _check_aligned(lab, clean_run, corrupted_run)
    groups = position_groups(lab, corrupted_run.input_ids, positions)
    patches = list(itertools.product(chosen, groups))
    if batched:
        values = _batched(lab, corrupted_run, clean_run.acts, patches, score, memory_budget)
    else:
        values = [_one(lab, corrupted, clean_run.acts, s, g, score, use_audio_in_video) for s, g in patches]
    clean_value, corrupted_value = score(clean_run.last_logits), score(corrupted_run.last_logits)
    span = clean_value - corrupted_value
    rows = [
        (s.alias, s.kind, s.layer, g.label, g.modality, int(g.positions.min()), int(g.positions.max()),
         len(g.positions), v, clean_value, corrupted_value, (v - corrupted_value) / span if span else np.nan)
        for (s, g), v in zip(patches, values, strict=True)
    ]  # fmt: skip
    columns = ["site", "kind", "layer", "group", "modality", "pos_start", "pos_end", "positions", "metric"]
    frame = pd.DataFrame(rows, columns=[*columns, "clean", "corrupted", "recovered"])
    frame["group"] = pd.Categorical(frame["group"], categories=[g.label for g in groups], ordered=True)
    return frame


def _sites(lab, sites) -> list:
    chosen = resolve_sites(lab.model, sites)
    bad = [
        s.alias for s in chosen if s.component != "thinker" or s.kind not in ("residual", "attention", "mlp")
    ]
    if bad:
        raise InterventionError(
            f"a patching sweep patches thinker residual, attention or MLP sites; {', '.join(bad)} "
            "are not (sites='resid.*', 'attn.*', 'mlp.*' or single layers like 'resid.3')"
        )
    return chosen


def _metric(lab, metric) -> Callable[[torch.Tensor], float]:
    if callable(metric):
        return lambda logits: float(metric(logits))
    if isinstance(metric, str):
        ids = lab.processor.tokenizer.encode(metric, add_special_tokens=False)
        if not ids:
            raise InterventionError("metric is empty text; pass a token, a token id or a function of logits")
        metric = ids[0]
    if isinstance(metric, (int, np.integer)) and not isinstance(metric, bool):
        token = int(metric)
        return lambda logits: float(torch.log_softmax(logits.float(), -1)[token])
    raise InterventionError(f"metric is a function of logits [vocab], a token id or text; got {metric!r}")


def _check_aligned(lab, clean: RecordedRun, corrupted: RecordedRun) -> None:
    a, b = clean.input_ids, corrupted.input_ids
    how = "e.g. the same question with a blank image of the same size instead of the real one"
    if a.shape != b.shape:
        raise InterventionError(
            f"clean has {a.shape[0]} tokens and corrupted {b.shape[0]}: patching compares position by "
            f"position, so both prompts need the same layout ({how})"
        )
    ma, mb = token_modalities(lab, a.numpy()), token_modalities(lab, b.numpy())
    differ = np.flatnonzero(ma != mb)
    if len(differ):
        p = int(differ[0])
        raise InterventionError(
            f"position {p} is {ma[p]} in clean but {mb[p]} in corrupted ({len(differ)} positions differ): "
            f"the prompts must place the same modalities at the same positions ({how})"
        )
    pa, pb = clean.lm_inputs["position_ids"], corrupted.lm_inputs["position_ids"]
    if pa is not None and pb is not None and not torch.equal(pa, pb):
        raise InterventionError(
            "clean and corrupted give their tokens different TM-RoPE positions (media of different "
            f"sizes or durations): give the corrupted media the clean one's size and length ({how})"
        )


def position_groups(lab, ids: torch.Tensor, positions) -> list[Group]:
    """The position groups of a sweep over a prompt of `ids` (see patching_sweep's `positions`)."""
    modality = token_modalities(lab, np.asarray(ids))
    length = len(modality)

    def group(label, where) -> Group:
        where = np.asarray(sorted(set(int(p) % length for p in where)), dtype=np.int64)
        kinds = set(modality[where])
        return Group(str(label), where, kinds.pop() if len(kinds) == 1 else "mixed")

    def check(where) -> list[int]:
        where = [where] if isinstance(where, (int, np.integer)) else list(where)
        outside = [p for p in where if not -length <= int(p) < length]
        if outside or not where:
            raise InterventionError(
                f"positions {outside or where} are outside the prompt (positions 0-{length - 1})"
            )
        return where

    if isinstance(positions, str) and positions == "modality":
        cuts = np.flatnonzero(modality[1:] != modality[:-1]) + 1
        blocks = np.split(np.arange(length), cuts)
        return [group(f"{modality[b[0]]} {b[0]}-{b[-1]}", b) for b in blocks]
    if isinstance(positions, str) and positions == "each":
        return [group(str(p), [p]) for p in range(length)]
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        if not 1 <= positions <= length:
            raise InterventionError(f"positions={positions} groups; the prompt has {length} positions")
        return [group(f"{b[0]}-{b[-1]}", b) for b in np.array_split(np.arange(length), int(positions))]
    if isinstance(positions, dict):
        return [group(label, check(where)) for label, where in positions.items()]
    if isinstance(positions, (list, tuple, range)):
        return [group(w if np.ndim(w) == 0 else f"{min(w)}-{max(w)}", check(w)) for w in positions]
    raise InterventionError(
        f"positions={positions!r}; use 'modality', 'each', a number of groups, a list or {{label: positions}}"
    )


def sweep_memory_per_row(lab, length: int) -> int:
    """Estimated peak bytes one patch row of a batched sweep adds: hidden states, attention scores,
    the routed experts' activations and router logits, float32, over `length` positions."""
    text = lab.thinker.config.text_config
    hidden, heads = text.hidden_size, text.num_attention_heads
    routed = text.num_experts_per_tok * text.moe_intermediate_size * 3 + text.num_experts
    return 4 * length * (8 * hidden + heads * length + routed)


def _batched(
    lab, run: RecordedRun, clean_acts: dict, patches: list, score, memory_budget: int
) -> list[float]:
    """Each patch's metric: patches at one layer ride one batch (chunked by the memory estimate),
    which runs only that layer and those after it."""
    length = int(run.input_ids.shape[0])
    chunk = max(1, int(memory_budget // sweep_memory_per_row(lab, length)))
    log.info("patching sweep: %d patches, up to %d per batch, %d positions", len(patches), chunk, length)
    values: dict[int, float] = {}
    for layer in sorted({site.layer for site, _ in patches}):
        rows = [i for i, (site, _) in enumerate(patches) if site.layer == layer]
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            masks: dict[str, torch.Tensor] = {}
            for row, i in enumerate(part):
                site, group = patches[i]
                mask = masks.setdefault(site.name, torch.zeros(len(part), length, dtype=torch.bool))
                mask[row, torch.as_tensor(group.positions)] = True
            logits = patched_last_logits(lab, run, layer, clean_acts, masks)
            values.update({i: score(row) for i, row in zip(part, logits, strict=True)})
    return [values[i] for i in range(len(patches))]


def _one(lab, corrupted, clean_acts: dict, site, group: Group, score, use_audio_in_video: bool) -> float:
    rows = clean_acts[site.name][0, torch.as_tensor(group.positions)]
    at = group.positions.tolist()
    with lab.intervene(set={site.name: rows}, at=at):
        logits = lab.forward(corrupted, use_audio_in_video=use_audio_in_video)
    return score(logits[0, -1].float())
