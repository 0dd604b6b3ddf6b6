"""`omnilab bench forward`: thinker forward time of `small` on ~256 mixed-modality tokens, with the
default experts implementation (the fastest the device supports) vs the eager per-expert loop."""

from __future__ import annotations

import torch

from ..hf_private import experts_implementation
from ._common import best_of, load_lab, mixed_conversation


def run(model: str = "small", device: str | None = None, tokens: int = 256, repeats: int = 5) -> dict:
    lab = load_lab(model, device)
    conversation = mixed_conversation(lab, tokens)
    inputs = lab.prepare(conversation)
    thinker = lab.model.thinker
    default = experts_implementation(thinker.config.text_config) or "grouped_mm"

    def forward():
        with torch.inference_mode():
            thinker(**inputs)

    figures = {"model": lab.model_id, "tokens": int(inputs["input_ids"].shape[1]), "default_impl": default}
    figures["default_s"] = best_of(forward, repeats)
    lab.model.set_experts_implementation("eager")
    try:
        figures["eager_s"] = best_of(forward, repeats)
    finally:
        lab.model.set_experts_implementation(default)
    figures["default_over_eager"] = figures["default_s"] / figures["eager_s"]
    return figures
