"""Attribution patching (AtP): every (site, position) patch effect from two forwards and one backward.

A linear estimate of activation patching (Nanda, 2023, "Attribution Patching: Activation Patching At
Industrial Scale"; Kramár et al., 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components"): patching the clean activation a_clean into the corrupted run at a site
and position changes the metric by about

    (a_clean - a_corrupted) · d metric / d a  (the gradient taken in the corrupted run)

so one clean forward, one corrupted forward and one backward estimate every cell that
`patching_sweep` measures one patched forward each. A group of positions sums its positions'
estimates (the first-order effect of patching them together). The estimate is exact for a metric
linear in the site; it fails where the model is far from linear between the two runs, above all
where attention saturates (a key the query did not attend to in the corrupted run has a near-zero
gradient through the softmax: Kramár et al.'s AtP* recomputes the attention softmax for query and
key nodes; here the nodes are residual, attention and MLP outputs, so compare with the sweep on the
cells that matter, as `agreement` does).

    attribution_patching(lab, clean, corrupted, metric) → the columns of patching_sweep (metric =
        corrupted + estimate), and estimate
    agreement(atp, sweep) → Spearman's rank correlation of the two over the cells, and more
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ..errors import InterventionError
from ..instrument.grad import gradients, token_id
from ..instrument.patch import record_run
from .lens import token_modalities
from .patching import _sites, position_groups

__all__ = ["agreement", "attribution_patching"]


def _metric(lab, metric) -> Callable[[torch.Tensor], torch.Tensor]:
    """A metric of the last position's logits [vocab] as a differentiable function."""
    if callable(metric):
        return metric
    if isinstance(metric, (str, int, np.integer)) and not isinstance(metric, bool):
        token = token_id(lab, metric)
        return lambda logits: torch.log_softmax(logits.float(), -1)[token]
    raise InterventionError(f"metric is a function of logits [vocab], a token id or text; got {metric!r}")


def attribution_patching(
    lab,
    clean,
    corrupted,
    metric: Callable[[torch.Tensor], torch.Tensor] | int | str,
    *,
    sites="resid.*",
    positions: str | int | list | dict = "each",
    use_audio_in_video: bool = False,
) -> pd.DataFrame:
    """Estimate each clean-into-corrupted patch effect, per site and position group, by AtP.

    metric: a function of the last position's next-token logits [vocab] (float32) written with torch
    operations (it is differentiated), or a token (id or text) whose log-probability is the metric.
    sites, positions: as `patching_sweep` (default every position alone). Returns site, kind, layer,
    group, modality, pos_start, pos_end, positions, metric (corrupted + estimate), clean, corrupted,
    recovered (estimate / (clean - corrupted)), estimate.
    """
    chosen = _sites(lab, sites)
    score = _metric(lab, metric)
    clean_run = record_run(lab, clean, chosen, use_audio_in_video=use_audio_in_video)
    result = gradients(
        lab,
        corrupted,
        lambda logits: score(logits[-1].float()),
        sites=[s.alias for s in chosen],
        use_audio_in_video=use_audio_in_video,
        last_only=True,
    )
    _check_aligned(lab, clean_run.input_ids, result.input_ids)
    groups = position_groups(lab, result.input_ids, positions)
    with torch.no_grad():
        clean_value = float(score(clean_run.last_logits))
    corrupted_value = result.metric
    span = clean_value - corrupted_value
    rows = []
    for site in chosen:
        delta = clean_run.acts[site.name][0].float() - result.activations[site.alias].values
        per_position = (delta * result.grads[site.alias].values).sum(-1).numpy()  # [L]
        for g in groups:
            estimate = float(per_position[g.positions].sum())
            rows.append(
                (site.alias, site.kind, site.layer, g.label, g.modality, int(g.positions.min()),
                 int(g.positions.max()), len(g.positions), corrupted_value + estimate, clean_value,
                 corrupted_value, estimate / span if span else np.nan, estimate)
            )  # fmt: skip
    columns = ["site", "kind", "layer", "group", "modality", "pos_start", "pos_end", "positions", "metric"]
    frame = pd.DataFrame(rows, columns=[*columns, "clean", "corrupted", "recovered", "estimate"])
    frame["group"] = pd.Categorical(frame["group"], categories=[g.label for g in groups], ordered=True)
    return frame


def _check_aligned(lab, a: torch.Tensor, b: torch.Tensor) -> None:
    how = "e.g. the same question with a blank image or silence of the same size instead of the real one"
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
            f"position {p} is {ma[p]} in clean but {mb[p]} in corrupted: the prompts must place the same "
            f"modalities at the same positions ({how})"
        )


def agreement(atp: pd.DataFrame, sweep: pd.DataFrame) -> dict:
    """How AtP's estimates agree with a patching sweep's measured effects over the same cells.

    Returns cells, spearman (rank correlation of the effects, metric - corrupted), pearson,
    large (the cells whose |measured effect| is above a tenth of the largest), spearman_large (the
    rank correlation over those: the many near-zero cells rank by noise), sign (the share of the
    large cells where the signs agree), top (of the sweep's 10% largest effects, the share that are
    also in AtP's 10% largest).
    """
    from scipy.stats import pearsonr, spearmanr

    key = ["site", "group"]
    left = atp.assign(group=atp["group"].astype(str)).set_index(key)["estimate"]
    right = sweep.assign(group=sweep["group"].astype(str)).set_index(key)
    right = right["metric"] - right["corrupted"]
    both = pd.concat([left.rename("atp"), right.rename("sweep")], axis=1, join="inner").dropna()
    if len(both) < 3:
        raise InterventionError(
            f"AtP and the sweep share {len(both)} cells; run both over the same sites and positions"
        )
    large = both["sweep"].abs() > 0.1 * both["sweep"].abs().max()
    k = max(1, len(both) // 10)
    top_sweep = set(both["sweep"].abs().nlargest(k).index)
    top_atp = set(both["atp"].abs().nlargest(k).index)
    return {
        "cells": len(both),
        "spearman": float(spearmanr(both["atp"], both["sweep"]).statistic),
        "pearson": float(pearsonr(both["atp"], both["sweep"]).statistic),
        "large": int(large.sum()),
        "spearman_large": float(spearmanr(both["atp"][large], both["sweep"][large]).statistic)
        if large.sum() >= 3
        else float("nan"),
        "sign": float((np.sign(both["atp"][large]) == np.sign(both["sweep"][large])).mean()),
        "top": len(top_sweep & top_atp) / k,
    }
