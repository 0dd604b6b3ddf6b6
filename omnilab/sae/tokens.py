"""One SAE feature over a chosen input's tokens (runs the thinker once; the feature view's token panel)."""

from __future__ import annotations

import pandas as pd
import torch


@torch.no_grad()
def token_activations(
    lab, sae, conversation, feature: int, *, site: str | None = None, **forward
) -> pd.DataFrame:
    """One SAE feature's activation over every prompt token of `conversation` (runs the thinker once).

    Returns the site's rows (pos, modality, text, seconds, ...) with an `activation` column.
    """
    site = site or sae.site
    with lab.trace(sites=site) as tracer:
        lab.forward(conversation, **forward)
    acts = tracer.trace.activations[site]
    values = sae.encode(acts.values.float().to(sae.W_enc.device))[:, feature].cpu().numpy()
    return acts.rows.assign(activation=values)
