"""Reading a residual stream through a model's own output head (the logit lens's map).

Only this module knows where the heads sit: the thinker's final RMSNorm and `lm_head`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def thinker_unembed(lab) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function hidden [..., H] → logits [..., vocab]: the thinker's final norm, then `lm_head`."""
    thinker = lab.thinker
    norm = thinker.model.language_model.norm
    head = thinker.get_output_embeddings()
    return lambda hidden: head(norm(hidden))


def thinker_layers(lab) -> int:
    """Decoder layers of the thinker's language model."""
    return len(lab.thinker.model.language_model.layers)
