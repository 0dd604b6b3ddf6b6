"""What a capture will cost in memory, estimated before the run, and the budget a caller holds it to.

Attention is recorded today as one row per (head, query, key) of the eager attention maps, so its
cost grows with the square of the prompt: 2 thinker layers x 4 heads at 4,000 tokens on `tiny` are
128 million rows and 13.7 GB (measured: peak RSS of a traced turn minus the bare turn, the trace's
DataFrame included). A caller estimates first and records less (or refuses) over budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

MEMORY_BUDGET_BYTES = 1024**3  # what one turn's captures may hold, by default
# Bytes one recorded row costs at its peak, measured on `tiny` (2,000 and 4,000 prompt tokens, the
# trace's DataFrame built): the hook's float32 copy of the map, the per-head columns, their
# concatenation and the DataFrame (87 and 106 bytes a row); rounded up.
ATTENTION_ROW_BYTES = 112
ATTENTION_TRANSIENT_COPIES = 3  # eager attention: scores, softmax and the hook's copy, float32 each
ROUTING_ROW_BYTES = 64  # component, layer, pos, phase, rank, expert, weight, and the DataFrame


@dataclass(frozen=True)
class CaptureEstimate:
    """The estimated peak bytes of one run's captures, by kind ("attention", "routing", ...)."""

    tokens: int  # prompt tokens
    bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.bytes.values()))

    def over(self, budget: int = MEMORY_BUDGET_BYTES) -> bool:
        """Whether the captures would hold more than `budget` bytes."""
        return self.total > budget


def _text_config(lab, component: str):
    model = lab.thinker if component == "thinker" else getattr(lab.model, component, None)
    config = getattr(model, "config", None)
    return getattr(config, "text_config", config)


def prompt_tokens(inputs) -> int:
    """The prompt length of `inputs`: a token count, or prepared inputs with `input_ids` [1, L]."""
    if isinstance(inputs, int):
        return inputs
    return int(inputs["input_ids"].shape[-1])


def estimate_capture_bytes(
    lab,
    inputs,
    capture=("routing", "attention"),
    attention_layers: Mapping[str, list[int]] | None = None,
    *,
    max_new_tokens: int = 0,
    heads: list[int] | None = None,
) -> CaptureEstimate:
    """Estimate the peak memory of recording `capture` on a run of `inputs` (before running it).

    attention: for each (component, layer) asked, heads x (L^2 + new x (L + new)) rows at
    ATTENTION_ROW_BYTES, plus the eager map of one layer (heads x L^2 float32, a few copies), where
    L is the prompt length and `new` the generated tokens. routing: (L + new) x MoE layers x top-k
    rows at ROUTING_ROW_BYTES. Tower attention (audio and vision encoders) is not estimated.
    Returns a CaptureEstimate with bytes by kind ("attention", "attention_transient", "routing").
    """
    length, new = prompt_tokens(inputs), int(max_new_tokens)
    out: dict[str, int] = {}
    if "attention" in capture:
        cells = length * length + new * (length + new)
        rows = transient = 0
        for component, layers in (attention_layers or {"thinker": [0]}).items():
            config = _text_config(lab, component)
            if config is None or component not in ("thinker", "talker"):
                continue
            count = len(heads) if heads is not None else int(config.num_attention_heads)
            rows += len(list(layers)) * count * cells
            transient = max(transient, count * length * length * 4 * ATTENTION_TRANSIENT_COPIES)
        out["attention"] = rows * ATTENTION_ROW_BYTES
        out["attention_transient"] = transient
    if "routing" in capture:
        config = _text_config(lab, "thinker")
        top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        out["routing"] = (length + new) * layers * top_k * ROUTING_ROW_BYTES
    return CaptureEstimate(length, out)


def describe(estimate: CaptureEstimate, budget: int = MEMORY_BUDGET_BYTES) -> str:
    """'attention 3.2 GB + routing 0.1 GB = 3.3 GB for 1,700 prompt tokens; the budget is 1.1 GB'."""
    parts = " + ".join(f"{kind} {size / 1e9:.1f} GB" for kind, size in estimate.bytes.items() if size)
    return (
        f"{parts or 'nothing'} = {estimate.total / 1e9:.1f} GB for {estimate.tokens:,} prompt tokens; "
        f"the budget is {budget / 1e9:.1f} GB"
    )
