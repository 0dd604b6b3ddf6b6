"""Batched collection: many samples in one traced forward of the thinker, each sample's rows apart.

    for results in run_batches(lab, samples, capture=("routing", "positions"), batch_size=8): ...

Each sample is prepared alone (`lab.prepare`, the path `generate` uses; most bad samples fail here
and go to `errors` before any batch forms). The prepared samples of a window are sorted by length
and cut into batches of at most `batch_size` (None: DEFAULT_MAX_BATCH) whose estimated memory fits
the budget; a sample that does not fit even alone runs alone. One batch is one forward: input ids
and attention masks right padded, audio features padded to the longest and stacked (each with its
feature mask), image and video patches and grids concatenated in row order — what the thinker's
towers and `get_rope_index` expect of a batch, so every row gets its own TM-RoPE positions from its
own mask. Samples with `use_audio_in_video` batch only with each other (the forward takes one flag).

Padded, not packed: a packed row needs attention kept inside each sample (a block-diagonal mask or
varlen attention) and TM-RoPE positions restarted per sample, and the thinker's forward derives
neither from prepared inputs; padding needs neither, and sorting by length keeps the padding small.
Right padding keeps each sample's real tokens at positions 0..len-1 of its row, and causal
attention never lets them see the pads behind them, so de-padding is a slice: the recorders keep
row i's first len_i positions (`Turn(batch_row=i, prompt_length=len_i)`).

A batch whose forward fails is split: out of memory, in halves (down to one sample); any other
error, into its samples run alone, so only the sample at fault lands in `errors`. Samples that
generate (`generate` > 0) run one by one: upstream `generate` with the talker is batch 1. So do
captures whose recorders do not split a batch by row (attention, timings) and sites outside the
thinker's text model (towers, the talker, `:input`); the residual, attention and MLP sites of the
thinker (`resid.*`, `attn.*`, `mlp.*`) are batched and de-padded like routing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..conversation import batch_inputs
from ..generation import last_logits_only
from ..instrument.budget import MEMORY_BUDGET_BYTES, estimate_capture_bytes
from ..instrument.context import model_lock
from .manifest import Sample
from .sample import SampleResult, failed, finished, prepare_sample, run_sample

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
WINDOW_BATCHES = 4  # samples prepared and sorted together: this many batches' worth
# Captures whose recorders split a batched forward by row (codes: the talker does not run at prefill).
BATCHED_CAPTURES = frozenset({"routing", "logits", "positions", "codes"})
FORWARD_COPIES = 12  # hidden-size float32 vectors a token holds at the peak of a layer (rough)


@dataclass(frozen=True)
class Prepared:
    """A sample, its model inputs and prompt length, the seconds preparing it took, and its media
    items (what a trace's meta names)."""

    sample: Sample
    inputs: dict
    length: int
    seconds: float
    items: tuple = ()


# Site patterns whose rows a batch splits: the thinker's text-model sites, keyed by prompt position
# (tower rows map to placeholders, which a padded batch does not keep apart; the talker never runs).
BATCHED_SITES = re.compile(r"^(resid|attn|mlp)\.|^thinker\.model\.language_model\.layers\.")


def batched(capture, generate: int) -> bool:
    """Whether a run of `capture` and `generate` goes through batches (else one `run_sample` each)."""
    from ..instrument.tracer import CAPTURES

    names = set(capture)
    patterns = {n for n in names if n not in CAPTURES}
    sites_ok = all(BATCHED_SITES.match(p) and not p.endswith(":input") for p in patterns)
    return not generate and (names - patterns) <= BATCHED_CAPTURES and sites_ok


def task_size(batch_size: int | None, capture, generate: int) -> int:
    """How many samples one run of `run_batches` (a Ray task) should take: one batch's worth."""
    return (batch_size or DEFAULT_MAX_BATCH) if batched(capture, generate) else 1


def run_batches(
    lab,
    samples: list[Sample],
    *,
    capture=(),
    generate: int = 0,
    max_tokens: int | None = None,
    options=None,
    batch_size: int | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
) -> Iterator[list[SampleResult]]:
    """Run `samples` a batch at a time; yields each batch's results (one per sample, errors included)."""
    run = {"capture": capture, "generate": generate, "max_tokens": max_tokens, "options": options}
    if not batched(capture, generate):
        for sample in samples:
            yield [run_sample(lab, sample, **run)]
        return
    max_batch = batch_size or DEFAULT_MAX_BATCH
    window = max_batch * WINDOW_BATCHES
    for first in range(0, len(samples), window):
        prepared, errors = [], []
        for sample in samples[first : first + window]:
            start = time.perf_counter()
            try:
                inputs, gathered = prepare_sample(lab, sample, generate=0, max_tokens=max_tokens)
            except Exception as exc:  # a bad sample must not stop the run: record why and go on
                errors.append(failed(sample, exc, time.perf_counter() - start))
                continue
            length = int(inputs["input_ids"].shape[1])
            seconds = time.perf_counter() - start
            prepared.append(Prepared(sample, inputs, length, seconds, tuple(gathered.items)))
        if errors:
            yield errors
        fits = _fits(lab, capture, memory_budget)
        for batch in plan_batches(prepared, max_batch, fits):
            yield _run(lab, batch, run)


def plan_batches(prepared: list[Prepared], max_batch: int, fits) -> list[list[Prepared]]:
    """Batches of at most `max_batch` samples of one use_audio_in_video, longest first, each batch's
    padded lengths accepted by `fits(lengths)` (a sample that fits nowhere runs alone). At batch 1
    the manifest's order is kept (nothing to gain by sorting; stores keep their order)."""
    if max_batch == 1:
        return [[p] for p in prepared]
    batches = []
    for flag in (False, True):
        group = sorted((p for p in prepared if p.sample.use_audio_in_video == flag), key=lambda p: -p.length)
        batch: list[Prepared] = []
        for item in group:
            if batch and (len(batch) >= max_batch or not fits([p.length for p in batch] + [item.length])):
                batches.append(batch)
                batch = []
            batch.append(item)
        if batch:
            batches.append(batch)
    return batches


def batch_bytes(lab, lengths: list[int], capture) -> int:
    """Estimated peak bytes of one padded batch of prompts of `lengths`: each row's captures at the
    padded length (`estimate_capture_bytes`), the site activations asked for (every padded position
    of every site, at its width, in the recording dtype), plus the forward's own activations
    (FORWARD_COPIES hidden vectors and the top-k experts' intermediate of every padded position,
    float32)."""
    from ..instrument.record.activations import default_dtype, resolve_requests
    from ..instrument.sites import site_width
    from ..instrument.tracer import CAPTURES

    padded = max(lengths)
    captures = estimate_capture_bytes(lab, padded, tuple(capture)).total * len(lengths)
    patterns = [name for name in capture if name not in CAPTURES]
    if patterns:
        element = torch.empty(0, dtype=default_dtype(lab.model)).element_size()
        widths = sum(site_width(lab.model, r.site) or 0 for r in resolve_requests(lab.model, patterns))
        captures += widths * element * padded * len(lengths)
    config = lab.thinker.config.text_config
    per_token = FORWARD_COPIES * config.hidden_size
    per_token += 3 * config.num_experts_per_tok * getattr(config, "moe_intermediate_size", config.hidden_size)
    return int(captures + 4 * per_token * padded * len(lengths))


def _fits(lab, capture, budget: int):
    def fits(lengths: list[int]) -> bool:
        return batch_bytes(lab, lengths, capture) <= budget

    return fits


def _run(lab, batch: list[Prepared], run: dict) -> list[SampleResult]:
    """One batch's forward and each sample's rows; split on failure (see the module docstring)."""
    if len(batch) == 1:
        return [_alone(lab, batch[0], run)]
    try:
        return _forward(lab, batch, run["capture"])
    except torch.OutOfMemoryError:
        half = len(batch) // 2
        log.warning(
            "a batch of %d samples ran out of memory; running it as %d + %d",
            len(batch),
            half,
            len(batch) - half,
        )
        return _run(lab, batch[:half], run) + _run(lab, batch[half:], run)
    except Exception as exc:  # one sample at fault should not cost the others: run each alone
        log.warning(
            "a batch of %d samples failed (%s: %s); running each alone", len(batch), type(exc).__name__, exc
        )
        return [_alone(lab, p, run) for p in batch]


def _alone(lab, prepared: Prepared, run: dict) -> SampleResult:
    try:
        return _forward(lab, [prepared], run["capture"])[0]
    except Exception as exc:  # out of memory alone, or a sample the model cannot run
        return failed(prepared.sample, exc, prepared.seconds)


def _forward(lab, batch: list[Prepared], capture) -> list[SampleResult]:
    """One traced forward of the thinker over `batch`; each row's trace cut to its own prompt."""
    from ..instrument.record import ActivationsRecorder, Recording, Turn, resolve_requests
    from ..instrument.tracer import assemble_trace, capture_spec, recorders_for, split_capture

    start = time.perf_counter()
    inputs = batch_inputs([p.inputs for p in batch], lab.processor.tokenizer.pad_token_id)
    flag = batch[0].sample.use_audio_in_video
    traces = [None] * len(batch)
    if capture:
        capture, patterns = split_capture(tuple(capture))
        capture = capture_spec(capture)
        recorders = recorders_for(lab.model, capture)
        if patterns:
            recorders.append(ActivationsRecorder(resolve_requests(lab.model, patterns)))
        recording = Recording(lab.model, recorders)
        with model_lock(lab.model), recording, last_logits_only(lab.thinker), torch.inference_mode():
            lab.thinker(**inputs, use_audio_in_video=flag)
        ran = time.perf_counter()
        tokenizer = lab.processor.tokenizer
        for row, p in enumerate(batch):
            # What a batch-1 trace of the same prefill carries (run_sample): its items and flag.
            turn = Turn(tokenizer, prompt_length=p.length, batch_row=row)
            traces[row] = assemble_trace(
                lab, recording, turn, capture=capture, text="", items=list(p.items), use_audio_in_video=flag
            )
    else:
        with model_lock(lab.model), last_logits_only(lab.thinker), torch.inference_mode():
            lab.thinker(**inputs, use_audio_in_video=flag)
        ran = time.perf_counter()
    done = time.perf_counter()
    share = (done - start) / len(batch)  # each sample's part of the batch's time
    out = []
    for p, trace in zip(batch, traces, strict=True):
        stages = {
            "prepare": p.seconds,
            "forward": (ran - start) / len(batch),
            "record": (done - ran) / len(batch),
        }
        out.append(finished(p.sample, p.length, p.seconds + share, trace, stages=stages))
    return out
