"""Collect: run the instruments over every sample of a manifest into a trace store, resumably.

The local and Ray engines share the shard buffer and the exactly-once bookkeeping, and the resume
rules read best beside both; what runs one sample is `sample`, what runs a batch is `batch`.

    summary = collect("data/manifest.jsonl", "runs/demo", model="tiny")

Samples run in padded batches (`batch`: each prepared alone, then one traced forward of the
thinker over a batch of prompts, each row de-padded to its sample) or, when `generate` > 0, one by
one (a traced `generate`); each becomes rows keyed by its id. Finished samples are
buffered and written as one shard every `shard_samples` samples, `shard_rows` rows or
`shard_seconds` seconds, whichever comes first; a shard is committed whole or not at all (see
`layout`). Small batches rather than one shard per sample: a store of many thousand samples stays
hundreds of files of megabytes (what DuckDB scans well), while a kill costs at most one batch.

A collect that starts over a store skips every sample already in a committed shard, so a run
killed at any moment and started again finishes the rest, each sample exactly once; at most the
samples of the shard being buffered are run again (a batch reaches the buffer only once all its
samples have finished, each sample's rows whole). A sample that fails (missing or corrupt media, too long) is
written to `errors` with its reason and the run goes on; it is not retried.

Engines: "local" runs one model in this process; "ray" runs `workers` Ray actors, one model each
(a whole GPU each where the cluster has GPUs, a fraction of a CPU each where it does not), while
this process writes the shards, a batch per Ray task. Both run the same `run_batches`.
A Ray run killed with SIGKILL resumes like a local one; the local Ray instance it started then leaves
Ray's dashboard and runtime-env agents running (Ray's own leak, ~100 MB each): kill the run's process
group, or `ray stop --force`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from ..errors import ConversationError, OmnilabError, TraceError
from ..instrument.budget import MEMORY_BUDGET_BYTES
from ..options import GenerationOptions, options_from
from . import layout
from .activations import check_sites, shard_activations
from .batch import run_batches, task_size
from .manifest import Sample, read_manifest
from .sample import DEFAULT_CAPTURE, STAGES, SampleResult, run_sample, trace_tables  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

_SITE_PATTERN = re.compile(r"^[A-Za-z_][\w.*?\[\]:-]*$")
ENGINES = ("local", "ray")


def collect(
    manifest,
    out,
    *,
    model="tiny",
    capture=DEFAULT_CAPTURE,
    generate: int = 0,
    engine: str = "local",
    workers: int = 1,
    ray_address: str | None = None,
    shard_samples: int = 16,
    shard_seconds: float = 30.0,
    shard_rows: int = 4_000_000,
    max_tokens: int | None = None,
    progress: bool = True,
    options: GenerationOptions | None = None,
    batch_size: int | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
) -> dict:
    """Run the instruments over `manifest` into the store at `out`; skip samples already there.

    model: a preset or checkpoint name for `omnilab.load`, or a loaded OmniLab (local engine).
    capture: what the tracer records (`Tracer` capture names); empty runs without tracing.
    generate: new tokens per sample (the options' max_new_tokens); 0 traces one prefill forward of
    the thinker only. options: the GenerationOptions of each generated turn (sampling, speaker, ...);
    the sample's use_audio_in_video, `generate` and the capture (speech when "codes") override theirs.
    max_tokens: longest prompt (+ generate) accepted; longer samples fail as "too long"
    (default: the model's context). batch_size: samples per forward (see `batch`; None: as many as
    the memory estimate fits in `memory_budget` bytes, at most 8). Returns a summary: samples in the
    manifest, done, errors, skipped (already in the store), shards written, tokens, seconds (write_seconds of them spent
    writing shards), samples/s and tokens/s of the samples run, and stage_seconds: where the
    samples' time went (prepare: the processor; forward: the model and its recording hooks; record:
    the recorders' tables and Traces; rows: Traces into store rows; write: the shards).
    """
    started = time.perf_counter()
    samples = read_manifest(manifest)
    capture = _capture(capture)
    options_from(options, {})  # a clear error now, not one per sample
    if not isinstance(generate, int) or isinstance(generate, bool) or generate < 0:
        raise ConversationError(f"generate must be a whole number of new tokens ≥ 0; got {generate!r}")
    if engine not in ENGINES:
        raise OmnilabError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if not isinstance(workers, int) or workers < 1:
        raise OmnilabError(f"workers must be a positive whole number; got {workers!r}")
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise OmnilabError(
            f"batch_size must be a positive whole number or None (from memory); got {batch_size!r}"
        )
    if shard_samples < 1:
        raise OmnilabError(f"shard_samples must be at least 1; got {shard_samples!r}")
    root = Path(out)
    _check_folder(root)

    with layout.writer_lock(root):
        layout.clear_tmp(root)
        meta = layout.read_meta(root) if (root / layout.META_FILE).exists() else None
        if meta is not None:
            _check_same(root, meta, {"capture": list(capture), "generate": generate})
        done = layout.done_ids(root)
        todo = [s for s in samples if s.sample_id not in done]
        summary = {
            "store": str(root),
            "samples": len(samples),
            "done": 0,
            "errors": 0,
            "skipped": len(samples) - len(todo),
            "shards": 0,
            "tokens": 0,
            "write_seconds": 0.0,
            "stage_seconds": {**dict.fromkeys(STAGES, 0.0), "write": 0.0},
        }
        if todo:
            if engine == "local" and workers > 1:
                log.warning(
                    "the local engine runs one model in this process; --workers %d needs --engine ray",
                    workers,
                )
            runner = (
                _LocalEngine(model)
                if engine == "local"
                else _RayEngine(model, workers=workers, address=ray_address)
            )
            try:
                check_sites(runner, capture)
                described = runner.describe()
                if meta is None:
                    meta = layout.new_meta(
                        capture=capture,
                        generate=generate,
                        manifest=str(Path(manifest).resolve()),
                        **described,
                    )
                    layout.write_meta(root, meta)
                else:
                    _check_same(root, meta, described)
                run = {"capture": capture, "generate": generate, "max_tokens": max_tokens, "options": options}
                run.update(batch_size=batch_size, memory_budget=memory_budget)
                _write(
                    root,
                    runner.results(todo, run),
                    summary,
                    total=len(todo),
                    shard_samples=shard_samples,
                    shard_seconds=shard_seconds,
                    shard_rows=shard_rows,
                    progress=progress,
                )
            finally:
                runner.close()
    seconds = time.perf_counter() - started
    ran = summary["done"] + summary["errors"]
    summary.update(
        seconds=round(seconds, 3),
        write_seconds=round(summary["write_seconds"], 3),
        stage_seconds={stage: round(seconds, 3) for stage, seconds in summary["stage_seconds"].items()},
        samples_per_s=round(ran / seconds, 3) if ran else 0.0,
        tokens_per_s=round(summary["tokens"] / seconds, 1) if ran else 0.0,
    )
    log.info("collect %s: %s", root, summary)
    return summary


# -- writing -------------------------------------------------------------------------------------
def _write(
    root: Path,
    results: Iterable[SampleResult],
    summary: dict,
    *,
    total: int,
    shard_samples: int,
    shard_seconds: float,
    shard_rows: int,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    buffer: list[SampleResult] = []
    buffered_rows = 0
    buffered_since = time.monotonic()
    started = time.monotonic()

    def flush() -> None:
        if buffer:
            start = time.perf_counter()
            tables = {}
            for name in layout.TABLES:
                parts = [r.tables[name] for r in buffer if name in r.tables]
                if parts:
                    tables[name] = pa.concat_tables(parts)
            layout.write_shard(root, tables, shard_activations(buffer))
            summary["shards"] += 1
            summary["write_seconds"] += time.perf_counter() - start
            summary["stage_seconds"]["write"] += time.perf_counter() - start
            buffer.clear()
            nonlocal buffered_rows
            buffered_rows = 0

    bar = tqdm(total=total, unit="sample", desc="collect", disable=not progress, dynamic_ncols=True)
    try:
        for result in results:
            if not buffer:
                buffered_since = time.monotonic()
            buffer.append(result)
            buffered_rows += sum(t.num_rows for t in result.tables.values())
            summary["done" if result.ok else "errors"] += 1
            summary["tokens"] += result.tokens
            for stage, seconds in result.stages.items():
                summary["stage_seconds"][stage] += seconds
            elapsed = max(time.monotonic() - started, 1e-9)
            bar.set_postfix(
                {"tokens/s": f"{summary['tokens'] / elapsed:.0f}", "errors": summary["errors"]}, refresh=False
            )
            bar.update(1)
            if (
                len(buffer) >= shard_samples
                or buffered_rows >= shard_rows
                or time.monotonic() - buffered_since >= shard_seconds
            ):
                flush()
        flush()
    except BaseException:
        # Interrupted (Ctrl-C, an engine failure): keep what finished, then stop.
        try:
            flush()
        except Exception:
            log.exception("could not write the last shard of %s", root)
        raise
    finally:
        bar.close()


# -- engines -------------------------------------------------------------------------------------
def describe(lab) -> dict:
    """What the store records about the model a run uses."""
    from ..instrument.tracer import config_hash

    return {"model_id": lab.model_id, "config_hash": config_hash(lab.model)}


class _LocalEngine:
    """One model in this process."""

    def __init__(self, model):
        from ..lab import OmniLab, load

        self.lab = model if isinstance(model, OmniLab) else load(model)

    def describe(self) -> dict:
        return describe(self.lab)

    def results(self, samples: list[Sample], options: dict) -> Iterator[SampleResult]:
        for batch in run_batches(self.lab, samples, **options):
            yield from batch

    def close(self) -> None:
        pass


class RayWorker:
    """A Ray actor's state: one loaded model (on the actor's GPU when it has one)."""

    def __init__(self, model: str, threads: int):
        import torch

        from ..lab import load

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else None
        self.lab = load(model, device_map=device)

    def describe(self) -> dict:
        return describe(self.lab)

    def run(self, samples: list[Sample], options: dict) -> list[SampleResult]:
        return [result for batch in run_batches(self.lab, samples, **options) for result in batch]


class _RayEngine:
    """`workers` Ray actors, one model each; results come back here, where the shards are written."""

    def __init__(self, model, *, workers: int, address: str | None):
        from ..lab import OmniLab

        if isinstance(model, OmniLab):
            raise OmnilabError(
                "the ray engine loads one model per actor, so it needs the model's name or path, not a "
                "loaded OmniLab; pass model='tiny' (or the checkpoint) instead"
            )
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError:
            raise OmnilabError("the ray engine needs Ray: pip install 'omnilab[scale]' (ray[data])") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            options = {"logging_level": logging.WARNING, "log_to_driver": False}
            try:
                if address:
                    ray.init(address=address, **options)
                else:
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **options)
            except Exception as exc:  # Ray raises bare Exceptions (e.g. a node that timed out starting)
                ray.shutdown()
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                raise OmnilabError(
                    f"could not start or reach {where}: {exc}; retry, or start one with `ray start --head` "
                    "and pass its address (--ray-address), or use --engine local"
                ) from None
            self.started = True
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1))
        if resources.get("GPU", 0) >= 1:
            actor_options = {"num_gpus": 1, "num_cpus": min(1.0, cpus / workers)}
            threads = 1
        else:
            # Fractions of a CPU: whole CPUs per actor on a small machine would leave the writer none.
            share = cpus / (workers + 1)
            actor_options = {"num_cpus": min(1.0, share)}
            threads = max(1, math.floor(cpus / workers))
        actor = ray.remote(**actor_options)(RayWorker)
        self.actors = [actor.remote(model, threads) for _ in range(workers)]

    def describe(self) -> dict:
        described = self.ray.get([a.describe.remote() for a in self.actors])
        if any(d != described[0] for d in described):
            raise OmnilabError(f"the ray actors loaded different models: {described}")
        return described[0]

    def results(self, samples: list[Sample], options: dict) -> Iterator[SampleResult]:
        ray = self.ray
        size = task_size(options["batch_size"], options["capture"], options["generate"])
        queue = iter([samples[i : i + size] for i in range(0, len(samples), size)])  # a batch a task
        pending: dict = {}  # object ref -> actor
        per_actor = 2  # one running, one waiting: no actor idles while this process writes

        def submit(actor) -> bool:
            chunk = next(queue, None)
            if chunk is None:
                return False
            pending[actor.run.remote(chunk, options)] = actor
            return True

        for actor in self.actors:
            for _ in range(per_actor):
                submit(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            results = ray.get(ready[0])
            submit(actor)
            yield from results  # a task's batch, whole, into the shard buffer

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


# -- helpers -------------------------------------------------------------------------------------
def _capture(capture) -> tuple[str, ...]:
    if capture is None:
        return DEFAULT_CAPTURE
    if isinstance(capture, str):
        capture = capture.split(",")
    names = sorted({c.strip() for c in capture if c and c.strip()})
    from ..instrument.tracer import CAPTURES

    # Any other name is a site pattern ("resid.*"), checked against the model when it is loaded.
    unknown = [c for c in names if c not in CAPTURES and not _SITE_PATTERN.match(c)]
    if unknown:
        raise OmnilabError(
            f"unknown capture {unknown}; choose from {', '.join(CAPTURES)} or site patterns (lab.sites())"
        )
    return tuple(names)


def _check_folder(root: Path) -> None:
    """A store folder is new, empty, a store, or what a run killed before its first write left."""
    if root.exists() and not root.is_dir():
        raise TraceError(f"--out '{root}' is a file; a trace store is a folder")
    if not root.exists() or (root / layout.META_FILE).exists():
        return
    leftovers = {layout.LOCK, layout.TMP, layout.META_FILE + ".tmp"}
    others = sorted(p.name for p in root.iterdir() if p.name not in leftovers)
    if others == [layout.SHARDS] and not any((root / layout.SHARDS).iterdir()):
        return
    if others:
        raise TraceError(
            f"'{root}' is not an omnilab trace store ({layout.META_FILE} is missing) and is not empty "
            f"(it holds {', '.join(others[:5])}{', …' if len(others) > 5 else ''}); choose a new or empty --out"
        )


def _check_same(root: Path, meta: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise TraceError(
                f"trace store '{root}' was collected with {key} {meta.get(key)!r}; this run asks for {value!r}; "
                f"collect into a new --out, or rerun with the store's options ({root / layout.META_FILE})"
            )
