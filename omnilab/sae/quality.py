"""An SAE's standard quality numbers: over a store's activations, and spliced into the organism.

- `sae_quality(sae, store)`: fraction of variance explained (1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²), L0 (mean
  active features per row), dead features (never active over the selection) and dense ones (active
  on more than `dense` of the rows), streamed batch by batch.
- `spliced_accuracy(lab, sae, examples)`: the organism's task accuracy (every answer token and
  <|im_end|> the argmax, teacher-forced: what greedy decoding gives) and the mean cross-entropy of
  the answer tokens, clean and with the SAE's reconstruction in place of the site's output at every
  position (`lab.intervene(edit={site: reconstruct})`). Each accuracy with its 95% Wilson interval.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..analysis.intervals import rate
from .model import SAEError, SparseAutoencoder
from .train import DEFAULT_WHERE


@torch.no_grad()
def sae_quality(
    sae: SparseAutoencoder,
    store,
    *,
    site: str | None = None,
    where: str | None = DEFAULT_WHERE,
    dense: float = 0.1,
    batch_rows: int = 16_384,
) -> dict:
    """{rows, fve, mse, l0, dead, dead_share, dense, dense_share, frequency} of `sae` over `site`
    (default: the SAE's own) in `store`; `frequency` is each feature's share of rows active [d_sae]."""
    from ..store import activations

    acts = activations(store, site or _site(sae), where=where)
    n = len(acts)
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    errors = torch.zeros((), dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    active = torch.zeros((), dtype=torch.float64)
    device = sae.W_enc.device
    for _, values in acts.batches(batch_rows):
        x = values.float().to(device)
        features = sae.encode(x)
        x_hat = sae.decode(features)
        total += x.sum(0).double().cpu()
        squares += x.double().pow(2).sum().cpu()
        errors += (x - x_hat).double().pow(2).sum().cpu()
        on = features > 0
        fired += on.sum(0).double().cpu()
        active += on.sum().double().cpu()
    variance = squares - total.pow(2).sum() / n
    frequency = (fired / n).numpy()
    return {
        "rows": n,
        "fve": float(1 - errors / variance),
        "mse": float(errors / n),
        "l0": float(active / n),
        "dead": int((fired == 0).sum()),
        "dead_share": float((fired == 0).double().mean()),
        "dense": int((frequency > dense).sum()),
        "dense_share": float((frequency > dense).mean()),
        "frequency": frequency,
    }


def _site(sae: SparseAutoencoder) -> str:
    if not sae.site:
        raise SAEError("this SAE names no site (metadata.hook_name); pass site=")
    return sae.site


def site_layer(site: str) -> int:
    """The decoder layer of a thinker residual site "resid.L" (what the splice supports)."""
    match = re.fullmatch(r"resid\.(\d+)", site or "")
    if not match:
        raise SAEError(
            f"site {site!r}: splicing and steering run at the thinker's residual sites resid.L, whose clean "
            "value the forward's hidden states give; train the SAE on one of those"
        )
    return int(match.group(1))


def site_forward(lab, sample, layer: int, *, spec: dict | None = None):
    """One teacher-forced thinker forward of a prepared `sample` (organism.train.Sample), batch 1.

    Returns (answer logits [answer tokens, vocab], targets, the site's output [seq, width]) under the
    intervention `spec` (lab.intervene's keywords) when given. The head runs at the answer rows only.
    """
    from ..organism import train

    batch, rows, positions, targets = train.collate([sample])
    thinker = lab.model.thinker
    context = lab.intervene(**spec) if spec else _null()
    keywords = {
        "use_audio_in_video": sample.use_audio_in_video,
        "output_hidden_states": True,
        "use_cache": False,
    }
    with torch.no_grad(), context:
        # modality= and edit= read the token ids of a forward the thinker itself runs
        if spec and (spec.get("modality") is not None or "edit" in spec):
            out = thinker(**batch, **keywords)
            logits = out.logits[rows, positions].float()
        else:  # the text model, and the head at the answer rows only
            out = thinker.model(**batch, **keywords)
            logits = thinker.lm_head(out.last_hidden_state[rows, positions]).float()
    # hidden_states[L + 1] is decoder layer L's output (read before deepstack adds, as resid.L is)
    return logits, targets, out.hidden_states[layer + 1][0]


@contextmanager
def cpu_threads(threads: int | None):
    """While open, torch runs on `threads` CPU threads (None: unchanged); restored on exit.

    Batch-1 forwards of the organism are small: on 2 shared, busy cores one thread ran them 7-20x
    faster than two (measured), the second thread mostly spinning.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def spliced_accuracy(
    lab,
    sae: SparseAutoencoder,
    examples,
    *,
    site: str | None = None,
    threads: int | None = 1,
    progress: bool = False,
):
    """Per task and overall ("all"): n, clean and spliced accuracy (each with low/high, 95% Wilson) and
    answer-token loss (mean cross-entropy, nats), for world `examples` (their own answers).

    threads: torch CPU threads while it runs (see `cpu_threads`; None leaves torch's setting)."""
    from ..organism import train

    site = site or _site(sae)
    layer = site_layer(site)
    samples = train.prepare_samples(lab, examples, progress=progress)
    records = []
    device = sae.W_enc.device

    def reconstruct(values, rows):
        with torch.no_grad():
            return sae(values.float().to(device)).to(dtype=values.dtype, device=values.device)

    for sample in samples:
        with cpu_threads(threads):
            logits, targets, _ = site_forward(lab, sample, layer)
            spliced, _, _ = site_forward(lab, sample, layer, spec={"edit": {site: reconstruct}})
        records.append(
            {
                "task": sample.task,
                "clean": bool((logits.argmax(-1) == targets).all()),
                "spliced": bool((spliced.argmax(-1) == targets).all()),
                "clean_loss": float(F.cross_entropy(logits, targets)),
                "spliced_loss": float(F.cross_entropy(spliced, targets)),
            }
        )
    frame = pd.DataFrame(records)
    rows = []
    for task, group in [*frame.groupby("task", sort=False), ("all", frame)]:
        clean, spliced = rate(group["clean"]), rate(group["spliced"])
        rows.append(
            {
                "task": task,
                "n": len(group),
                "clean": clean["rate"],
                "clean_low": clean["low"],
                "clean_high": clean["high"],
                "spliced": spliced["rate"],
                "spliced_low": spliced["low"],
                "spliced_high": spliced["high"],
                "clean_loss": float(np.mean(group["clean_loss"])),
                "spliced_loss": float(np.mean(group["spliced_loss"])),
            }
        )
    return pd.DataFrame(rows)
