"""Steer the organism by one SAE feature: clamp or scale it at the site, and see whether the answer follows.

    result = steer_feature(lab, sae, feature=41, examples=blue_pictures,
                           target=lambda e: e.answer.replace(e.facts["colour"], "red"),
                           value=8.0, modality="image")
    result["success"]      # {n, right, rate, low, high}: the answer became the target (95% Wilson)

The edit goes through the SAE and keeps its error: at each position the site's output x becomes
x + decode(f') - decode(f), where f = encode(x) and f' is f with one feature clamped to `value`
(or multiplied by `scale`). Only that feature's contribution changes; what the SAE does not
reconstruct stays. It is applied through `lab.intervene(edit=...)` at every position (or only at
`modality`'s tokens) of the prompt and the answer, teacher-forced: success means every target token and <|im_end|> is the argmax,
what greedy decoding would produce with the edit in place. The same examples without the edit give
the baseline rate of answering the target (0 when the target differs from the true answer).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from .model import SAEError, SparseAutoencoder
from .quality import cpu_threads, rate, site_forward, site_layer


def edited_site(
    sae: SparseAutoencoder, hidden: torch.Tensor, feature: int, *, value=None, scale=None
) -> torch.Tensor:
    """`hidden` [seq, d_in] with SAE feature `feature` clamped to `value` or multiplied by `scale`."""
    if (value is None) == (scale is None):
        raise SAEError("give exactly one of value= (clamp the feature) or scale= (multiply it)")
    if not 0 <= feature < sae.d_sae:
        raise SAEError(f"feature {feature} is outside the SAE's {sae.d_sae} features")
    device = sae.W_enc.device
    with torch.no_grad():
        x = hidden.float().to(device)
        features = sae.encode(x)
        changed = features.clone()
        changed[:, feature] = value if value is not None else features[:, feature] * scale
        delta = (changed[:, feature] - features[:, feature])[:, None] * sae.W_dec[feature][None, :]
    return (x + delta).to(dtype=hidden.dtype, device=hidden.device)


def steer_feature(
    lab,
    sae: SparseAutoencoder,
    feature: int,
    examples,
    target,
    *,
    value: float | None = None,
    scale: float | None = None,
    modality: str | None = None,
    site: str | None = None,
    threads: int | None = 1,
    progress: bool = False,
) -> dict:
    """Success of steering world `examples` to `target(example)` (a new answer) by one SAE feature.

    Returns {"success": rate, "baseline": rate, "rows": DataFrame}: rates are {n, right, rate,
    low, high} (95% Wilson); rows has per example its answer, target, and whether each run gave it.
    threads: torch CPU threads while it runs (quality.cpu_threads).
    """
    from ..organism import train

    site = site or sae.site
    layer = site_layer(site)
    wanted = [dataclasses.replace(e, answer=target(e)) for e in examples]
    samples = train.prepare_samples(lab, wanted, progress=progress)
    records = []

    def edit(values, rows):
        return edited_site(sae, values, feature, value=value, scale=scale)

    for example, sample in zip(examples, samples, strict=True):
        with cpu_threads(threads):
            logits, targets, _ = site_forward(lab, sample, layer)
            spec = {"edit": {site: edit}}
            if modality is not None:
                spec["modality"] = modality
            steered, _, _ = site_forward(lab, sample, layer, spec=spec)
        records.append(
            {
                "task": example.task,
                "answer": example.answer,
                "target": target(example),
                "baseline": bool((logits.argmax(-1) == targets).all()),
                "steered": bool((steered.argmax(-1) == targets).all()),
            }
        )
    rows = pd.DataFrame(records)
    return {"success": rate(rows["steered"]), "baseline": rate(rows["baseline"]), "rows": rows}
