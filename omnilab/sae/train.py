"""Train a sparse autoencoder on one site of a store, streaming its activations, resumably.

    sae = train_sae("runs/world", "resid.2", "runs/sae-resid.2", SAETrainConfig(width=512, k=16))

The store's lazy reader (`omnilab.store.activations`) gives the selected rows; they are read in
chunks of `chunk_rows` rows (the only values in memory), each chunk's rows shuffled, and cut into
batches. One pass first takes the mean and variance of the selection (the decoder bias starts at the
mean; the loss is the squared error over the total variance, so 1 - loss is the fraction of variance
explained). Step s's batch is a function of (seed, s) alone, so a run stopped at any checkpoint and
started again continues bit for bit (checkpoint.pt beside the result).

TopK (Gao et al., 2024, "Scaling and evaluating sparse autoencoders"): the k largest pre-activations
per row; its AuxK loss teaches dead features (no activation for `dead_after` rows) to predict the
residual error. BatchTopK (Bussmann et al., 2024): the k·batch largest over the batch; saved as a
JumpReLU whose threshold is the running mean of the smallest kept activation (as SAELens does).
Decoder rows are kept at unit norm. On the CPU training runs on `threads` torch threads (1 by
default): a step's matrices (a few hundred rows by a few hundred features) are too small to split,
and on a shared machine the idle threads' spinning made steps ~6x slower (measured on 2 busy cores).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import SAEError, SparseAutoencoder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "training.json"
DEFAULT_WHERE = "component = 'thinker'"


@dataclass(frozen=True)
class SAETrainConfig:
    """What a training run does; equal configs over the same store give bit-identical runs on the CPU."""

    width: int = 512  # d_sae, features
    k: int = 16  # active features per row (topk), or on average per row (batchtopk)
    architecture: str = "topk"  # or "batchtopk" (saved as jumprelu)
    epochs: int = 8  # passes over the selection
    batch_size: int = 512  # rows per step
    lr: float = 2e-3  # Adam, with a linear decay over the last fifth of the steps
    aux_k: int | None = None  # AuxK's k (default: d_in // 2)
    aux_coefficient: float = 1 / 32
    dead_after: int = 20_000  # rows without an activation after which a feature counts as dead
    threshold_lr: float = 0.01  # batchtopk's threshold update
    chunk_rows: int = 65_536  # rows read from the store at a time
    where: str | None = DEFAULT_WHERE  # SQL over the store's activation rows (store.activations)
    seed: int = 0
    save_every: int = 200  # steps between checkpoints
    threads: int | None = 1  # torch CPU threads while training (None: leave torch's setting)


def _plan(n: int, config: SAETrainConfig):
    """Every step's (epoch, chunk, batch index in chunk, chunk's steps): the whole run, in order."""
    chunks = [(start, min(start + config.chunk_rows, n)) for start in range(0, n, config.chunk_rows)]
    for epoch in range(config.epochs):
        order = torch.randperm(
            len(chunks), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch)
        )
        for c in order.tolist():
            steps = math.ceil((chunks[c][1] - chunks[c][0]) / config.batch_size)
            for b in range(steps):
                yield epoch, c, chunks[c], b, steps


def _chunk(
    acts, bounds: tuple[int, int], epoch: int, index: int, config: SAETrainConfig, device
) -> torch.Tensor:
    """Chunk `index`'s rows of the selection (read now), float32, shuffled for `epoch`."""
    part = replace(acts, rows=acts.rows.iloc[bounds[0] : bounds[1]])
    values = part.values().float()
    seed = (config.seed * 1_000_003 + epoch) * 65_537 + index
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))
    return values[order].to(device)


def _moments(acts, config: SAETrainConfig, progress: bool) -> tuple[torch.Tensor, float]:
    """The selection's mean [width] and total variance (sum over dimensions), in one streamed pass."""
    total = torch.zeros(acts.width, dtype=torch.float64)
    squares = torch.zeros(acts.width, dtype=torch.float64)
    bar = tqdm(total=len(acts), desc="sae: mean", disable=not progress, mininterval=2, unit="row")
    for _, values in acts.batches(config.chunk_rows):
        values = values.double()
        total += values.sum(0)
        squares += (values * values).sum(0)
        bar.update(len(values))
    bar.close()
    mean = total / len(acts)
    variance = float((squares / len(acts) - mean * mean).clamp(min=0).sum())
    return mean.float(), variance


def _batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    relu = pre.relu()
    flat = relu.flatten()
    values, index = flat.topk(min(flat.numel(), k * pre.shape[0]))
    return torch.zeros_like(flat).scatter(0, index, values).reshape(pre.shape)


def _lr(step: int, total: int, config: SAETrainConfig) -> float:
    decay_from = int(total * 0.8)
    if step < decay_from:
        return config.lr
    return config.lr * max(0.0, (total - step) / max(1, total - decay_from))


def train_sae(
    store,
    site: str,
    out,
    config: SAETrainConfig | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
    until: int | None = None,
) -> SparseAutoencoder:
    """Train an SAE on `site`'s activations in `store` (the rows `config.where` selects); write it to `out`.

    `out` gets SAELens's cfg.json + sae_weights.safetensors, training.json (the config, the loss
    curve, seconds) and checkpoint.pt; a run over an `out` with a checkpoint resumes it (its config
    must be the same). `until` stops after that step (with a checkpoint), as an interrupted run would.
    device: "cpu", "cuda", ... (default: cuda when available).
    """
    from ..store import activations
    from ..store.layout import read_meta

    config = config or SAETrainConfig()
    if config.architecture not in ("topk", "batchtopk"):
        raise SAEError(f"architecture {config.architecture!r}: train 'topk' or 'batchtopk'")
    if not 0 < config.k <= config.width:
        raise SAEError(f"k={config.k} must lie in 1..width ({config.width})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acts = activations(store, site, where=config.where)
    if len(acts) == 0:
        raise SAEError(
            f"the selection {config.where!r} of site {site!r} in '{store}' has no rows; widen where="
        )
    meta = read_meta(Path(store))
    metadata = {
        "hook_name": site,
        "model_name": meta.get("model_id"),
        "dataset_path": str(Path(store).resolve()),
        "omnilab_where": config.where,
        "omnilab_rows": len(acts),
        "context_size": None,
        "prepend_bos": False,
        "hook_head_index": None,
    }
    sae = SparseAutoencoder(
        acts.width,
        config.width,
        k=config.k,
        architecture="topk" if config.architecture == "topk" else "jumprelu",
        metadata=metadata,
        seed=config.seed,
    ).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
    total = sum(1 for _ in _plan(len(acts), config))
    checkpoint = out / CHECKPOINT
    began = time.perf_counter()
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        if state["config"] != asdict(config) or state["site"] != site or state["rows"] != len(acts):
            raise SAEError(
                f"'{checkpoint}' belongs to another run (site {state['site']!r}, {state['rows']} rows, "
                f"config {state['config']}); give another out folder or delete it"
            )
        sae.load_state_dict(state["sae"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, since = state["step"], state["history"], state["since"].to(device)
        mean, variance, seconds = state["mean"], state["variance"], state["seconds"]
        log.info("resumed %s at step %d of %d", checkpoint, start, total)
    else:
        mean, variance = _moments(acts, config, progress)
        with torch.no_grad():
            sae.b_dec.copy_(mean.to(device))
        start, history, seconds = 0, [], 0.0
        since = torch.zeros(config.width, dtype=torch.long, device=device)
    aux_k = config.aux_k or max(1, acts.width // 2)
    bar = tqdm(total=total, initial=start, desc=f"sae {site}", disable=not progress, mininterval=2)
    chunk_key, values = None, None
    stop = min(total, until or total)
    threads = torch.get_num_threads()
    if device.type == "cpu" and config.threads:
        torch.set_num_threads(config.threads)
    try:
        for step, (epoch, c, bounds, b, _) in enumerate(_plan(len(acts), config)):
            if step < start:
                continue
            if step >= stop:
                break
            if chunk_key != (epoch, c):
                chunk_key, values = (epoch, c), _chunk(acts, bounds, epoch, c, config, device)
            x = values[b * config.batch_size : (b + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, total, config)
            pre = sae.pre_activations(x)
            features = _batch_topk(pre, config.k) if config.architecture == "batchtopk" else sae.activate(pre)
            x_hat = sae.decode(features)
            error = x - x_hat
            loss = error.pow(2).sum(-1).mean() / variance
            fired = (features > 0).any(0)
            since = torch.where(fired, torch.zeros_like(since), since + len(x))
            dead = since > config.dead_after
            aux = torch.zeros((), device=device)
            if bool(dead.any()):
                dead_pre = pre.masked_fill(~dead, float("-inf"))
                top = dead_pre.topk(min(aux_k, int(dead.sum())), dim=-1)
                aux_features = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
                aux_hat = aux_features @ sae.W_dec
                target = error.detach()
                aux = (target - aux_hat).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp(min=1e-12)
            optimizer.zero_grad(set_to_none=True)
            (loss + config.aux_coefficient * aux).backward()
            optimizer.step()
            with torch.no_grad():
                sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))
                if config.architecture == "batchtopk" and bool((features > 0).any()):
                    smallest = features[features > 0].min()
                    sae.threshold.mul_(1 - config.threshold_lr).add_(config.threshold_lr * smallest)
            history.append(
                {
                    "step": step + 1,
                    "loss": round(loss.item(), 6),
                    "aux": round(float(aux.detach()), 6),
                    "dead": int(dead.sum()),
                    "epoch": epoch,
                }  # fmt: skip
            )
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(fve=f"{1 - loss.item():.3f}", dead=int(dead.sum()))
            if (step + 1) % config.save_every == 0 or step + 1 == stop:
                state = {
                    "sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                    "history": history, "since": since.cpu(), "mean": mean, "variance": variance,
                    "seconds": seconds + time.perf_counter() - began, "config": asdict(config),
                    "site": site, "rows": len(acts),
                }  # fmt: skip
                torch.save(state, checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    seconds += time.perf_counter() - began
    sae.eval()
    if stop == total:
        sae.save(out)
        summary = {"config": asdict(config), "site": site, "rows": len(acts), "steps": total,
                   "seconds": round(seconds, 2), "device": str(device), "history": history}  # fmt: skip
        (out / HISTORY).write_text(json.dumps(summary) + "\n")
    return sae.cpu()
