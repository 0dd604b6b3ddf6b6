"""One sample of a collection: prepared, run under the tracer, and turned into store rows.

The per-sample pieces both engines of `collect` and the batches of `batch` use: `prepare_sample`
(the model inputs and the media items, refused as too long past the limit), `run_sample` (one sample
alone: a traced prefill forward, or a traced `generate`), `finished` and `failed` (the rows of a
sample that ran or failed) and `trace_tables` (a Trace's tables in the store's schema). A leaf of
`store/`: `collect` and `batch` import it, it imports neither.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..conversation import Gathered, prepare_inputs
from ..errors import ConversationError
from ..generation import last_logits_only
from ..instrument.context import model_lock
from ..instrument.tracer import DEFAULT_CAPTURE as TRACER_CAPTURE
from ..options import GenerationOptions, options_from
from ..trace import TABLES as TRACE_TABLES
from ..trace import to_arrow, token_modality
from . import layout
from .activations import sample_activations
from .manifest import Sample

log = logging.getLogger(__name__)

# The Tracer's default capture without its stage times: a store keeps no timings (one name, one idea).
DEFAULT_CAPTURE = tuple(name for name in TRACER_CAPTURE if name != "timings")


@dataclass
class SampleResult:
    """What one sample gave: rows for each store table (with `sample_id`), or one `errors` row."""

    sample_id: str
    ok: bool
    tokens: int
    seconds: float
    tables: dict[str, pa.Table] = field(default_factory=dict)
    activations: dict = field(
        default_factory=dict
    )  # site key -> (index table, values), see store.activations
    # Where its seconds went (STAGES; a batch's shared work split evenly over its samples).
    stages: dict[str, float] = field(default_factory=dict)


# prepare: the processor (media, template, features); forward: the model with its recording hooks;
# record: the recorders' tables and the Trace; rows: the Trace into store rows (Arrow).
STAGES = ("prepare", "forward", "record", "rows")


def run_sample(
    lab,
    sample: Sample,
    *,
    capture=DEFAULT_CAPTURE,
    generate: int = 0,
    max_tokens: int | None = None,
    options: GenerationOptions | None = None,
) -> SampleResult:
    """Run one sample under the tracer and turn what it gave into store rows (never raises for a bad sample).

    A prefill (`generate` 0) is the forward `lab.forward` runs, begun on the tracer with the
    sample's media items and use_audio_in_video as `lab.forward` begins it, so its trace carries
    the metadata a `lab.forward` trace carries; only the last position goes through the head (the
    store keeps no logits).
    """
    import torch

    start = time.perf_counter()
    stages = dict.fromkeys(STAGES, 0.0)
    try:
        inputs, gathered = prepare_sample(lab, sample, generate=generate, max_tokens=max_tokens)
        stages["prepare"] = time.perf_counter() - start
        text, generated, trace = "", 0, None
        if generate:
            turn = options_from(
                options,
                {
                    "max_new_tokens": generate,
                    "use_audio_in_video": sample.use_audio_in_video,
                    "return_audio": bool("codes" in capture and lab.has_talker),
                },
            )
            reply = lab.generate(sample.resolved(), turn, trace=tuple(capture) or False)
            text, generated, trace = reply.text, len(reply.token_ids), reply.trace
        elif capture:
            tracer = lab.trace(capture=tuple(capture))
            with tracer:
                tracer.begin(
                    inputs,
                    gathered,
                    prompt_length=int(inputs["input_ids"].shape[1]),
                    use_audio_in_video=sample.use_audio_in_video,
                )
                with model_lock(lab.model), last_logits_only(lab.thinker), torch.inference_mode():
                    lab.thinker(**inputs, use_audio_in_video=sample.use_audio_in_video)
                ran = time.perf_counter()
            trace = tracer.trace
            stages["record"] = time.perf_counter() - ran
        else:
            with model_lock(lab.model), last_logits_only(lab.thinker), torch.inference_mode():
                lab.thinker(**inputs, use_audio_in_video=sample.use_audio_in_video)
    except Exception as exc:  # a bad sample must not stop the run: record why and go on
        return failed(sample, exc, time.perf_counter() - start)
    stages["forward"] = time.perf_counter() - start - stages["prepare"] - stages["record"]
    prompt = int(inputs["input_ids"].shape[1])
    return finished(
        sample, prompt, time.perf_counter() - start, trace, text=text, generated=generated, stages=stages
    )


def prepare_sample(
    lab, sample: Sample, *, generate: int = 0, max_tokens: int | None = None
) -> tuple[dict, Gathered]:
    """The sample's model inputs (what `lab.prepare` gives) and its gathered media (the items a trace
    names), refused as too long past `max_tokens` (or the context)."""
    inputs, gathered = prepare_inputs(
        lab.processor,
        sample.resolved(),
        use_audio_in_video=sample.use_audio_in_video,
        video_size=lab.video_size,
        device=lab.device,
    )
    prompt = int(inputs["input_ids"].shape[1])
    limit = max_tokens or _context(lab)
    if limit and prompt + generate > limit:
        raise ConversationError(
            f"sample {sample.sample_id!r} is too long: {prompt} prompt tokens"
            f"{f' + {generate} new' if generate else ''}; the limit is {limit}; shorten its media or text"
        )
    return inputs, gathered


def failed(sample: Sample, exc: Exception, seconds: float) -> SampleResult:
    """The `errors` row of a sample that failed with `exc`."""
    log.warning("sample %r failed: %s: %s", sample.sample_id, type(exc).__name__, exc)
    log.debug("sample %r failed", sample.sample_id, exc_info=True)
    row = {
        "line": sample.line,
        "error": type(exc).__name__,
        "reason": str(exc),
        "seconds": seconds,
        "conversation": _json(sample.conversation),
        "extra": _json(sample.extra),
    }
    return SampleResult(
        sample.sample_id, False, 0, seconds, {"errors": _rows("errors", sample.sample_id, row)}
    )


def finished(
    sample: Sample, prompt: int, seconds: float, trace, *, text="", generated=0, stages: dict | None = None
) -> SampleResult:
    """The `samples` row and the trace's tables of a sample that ran (`trace` None: run untraced);
    `stages`: where its seconds went (STAGES), the rows' own time added here."""
    began = time.perf_counter()
    counts = sample.media_counts()
    row = {
        "line": sample.line,
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "text": text,
        "audio_items": counts["audio"],
        "image_items": counts["image"],
        "video_items": counts["video"],
        "use_audio_in_video": sample.use_audio_in_video,
        "seconds": seconds,
        "conversation": _json(sample.conversation),
        "extra": _json(sample.extra),
        "meta": _json(trace.meta if trace is not None else {}),
    }
    tables = {"samples": _rows("samples", sample.sample_id, row)}
    activations = {}
    if trace is not None:
        tables.update(trace_tables(sample.sample_id, trace))
        activations = sample_activations(sample.sample_id, trace)
    stages = {**dict.fromkeys(STAGES, 0.0), **(stages or {})}
    stages["rows"] += time.perf_counter() - began
    return SampleResult(sample.sample_id, True, prompt + generated, seconds, tables, activations, stages)


def trace_tables(sample_id: str, trace) -> dict[str, pa.Table]:
    """The non-empty tables of `trace` as Arrow tables in the store's schema (`sample_id` in front).

    Read from the trace's column arrays, never through pandas: this runs once per sample and table,
    so its cost is part of what tracing costs a collection. router_stats takes each token's modality
    from `tokens` as the trace's routing table does.
    """
    out = {}
    for name in TRACE_TABLES:
        n = trace.rows(name)
        if n == 0:
            continue
        columns = trace.columns(name)
        if name in layout.WITH_MODALITY and "modality" not in columns:
            modality = token_modality(trace.columns("tokens"), columns["component"], columns["pos"])
            columns = {**columns, "modality": modality}
        schema = layout.schema(name)
        arrays = [pa.repeat(pa.scalar(sample_id, pa.string()), n)]
        arrays += [to_arrow(columns[column.name], column.type) for column in list(schema)[1:]]
        out[name] = pa.Table.from_arrays(arrays, schema=schema)
    return out


def _context(lab) -> int | None:
    config = getattr(lab.thinker, "config", None)
    text = getattr(config, "text_config", config)
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def _rows(table: str, sample_id: str, row: dict) -> pa.Table:
    return pa.Table.from_pylist([{"sample_id": sample_id, **row}], schema=layout.schema(table))


def _json(value) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False)


def _default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
