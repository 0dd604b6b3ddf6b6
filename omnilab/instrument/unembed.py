"""Reading a residual stream through a model's own output head (the logit lens's map).

Only this module knows where the heads sit: the thinker's final RMSNorm and `lm_head`, the talker's final
RMSNorm and `codec_head` (codebook 0).
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


def talker_unembed(lab) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function hidden [..., H] → codebook-0 logits [..., codes]: the talker's final norm, then `codec_head`."""
    talker = lab.model.talker
    return lambda hidden: talker.codec_head(talker.model.norm(hidden))


def talker_layer_modules(lab) -> list[torch.nn.Module]:
    """The talker's decoder layers (their outputs are its residual stream), in order."""
    return list(lab.model.talker.model.layers)
