"""What a capture will cost in memory, estimated before the run, and the budget a caller holds it to.

Attention is recorded at a cost linear in tokens by default (AttentionSettings: whole rows of the
last prompt token and the generated tokens, every query's mass per modality block); asking for every
row (queries="all") costs the square of the prompt. Each recorded row costs ATTENTION_ROW_BYTES at
its peak, each routing row ROUTING_ROW_BYTES (both measured, below). The Tracer estimates before the forward and refuses a run
over its budget (BudgetError); the app records such a turn without attention and says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import InterventionError

MEMORY_BUDGET_BYTES = 1024**3  # what one turn's captures may hold, by default
# Bytes a recorded row costs at the capture's peak: tracemalloc's peak over a traced `generate` minus
# the bare one's, the trace's DataFrame built. Attention (the recorder's int16/int32/float16 parts, the
# table filled from them, its DataFrame view): 49 (every row, `tiny`, 1.2k tokens) to 58 (the
# defaults, `small`, 6k tokens); rounded up. Routing (component, layer, pos, phase, rank, expert,
# weight, modality): 128.4 and 128.2 on `small` at 6k and 12k tokens.
ATTENTION_ROW_BYTES = 64
ROUTING_ROW_BYTES = 128
# capture "logits": a row per (token, layer, expert) (component, layer, pos, expert, logit). Taken at
# a routing row's cost, which has more columns: its DataFrame view measured 76 bytes a row on `tiny`.
ROUTER_LOGIT_ROW_BYTES = ROUTING_ROW_BYTES
DEFAULT_BLOCKS = 8  # modality runs assumed when only a token count is known


class BudgetError(InterventionError):
    """A capture whose estimated memory passes the budget it is held to (refused before the run)."""


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


def _block_starts(lab, inputs) -> np.ndarray | None:
    """Where each modality run of the prompt starts (None for a bare token count)."""
    if isinstance(inputs, int):
        return None
    from .record.tokens import special_tokens

    names = special_tokens(lab.model).modality_names(inputs["input_ids"][0])
    return np.concatenate([[0], np.flatnonzero(names[1:] != names[:-1]) + 1])


def attention_rows(lab, inputs, settings=None, *, max_new_tokens: int = 0) -> int:
    """Rows one thinker layer and head records under `settings` (AttentionSettings) for a run of
    `inputs` making `max_new_tokens`: whole rows (their causal keys), block rows and top-k rows."""
    from .record.attention import attention_settings

    settings = attention_settings(settings)
    length, new = prompt_tokens(inputs), int(max_new_tokens)
    fed = length + max(new - 1, 0)  # the last new token is never fed back
    queries = np.arange(fed)
    if settings.queries == "all":
        chosen = queries
    elif settings.queries == "last":
        chosen = queries[length - 1 :]
    else:
        chosen = queries[np.isin(queries, np.asarray(settings.queries, dtype=np.int64))]
    rows = int((chosen + 1).sum())
    if settings.blocks:
        starts = _block_starts(lab, inputs)
        rows += int((fed - starts).sum()) if starts is not None else fed * DEFAULT_BLOCKS
    return rows + int(np.minimum(int(settings.top_k), queries + 1).sum())  # a short prefix has fewer keys


def estimate_capture_bytes(
    lab,
    inputs,
    capture=("routing", "attention"),
    attention_layers: Mapping[str, list[int]] | None = None,
    *,
    max_new_tokens: int = 0,
    heads: list[int] | None = None,
    attention=None,
    speech_frames: int = 0,
) -> CaptureEstimate:
    """Estimate the peak memory of recording `capture` on a run of `inputs` (before running it).

    attention (`attention`: AttentionSettings or a dict of its fields): for each (component, layer)
    asked, heads x `attention_rows` rows at ATTENTION_ROW_BYTES; attention_transient: one chunk of
    float32 scores (a few copies) and the keys of the recorded layers. routing: (L + new) x MoE
    layers x top-k rows at ROUTING_ROW_BYTES, L the prompt length and `new` the generated tokens, and
    with `speech_frames` the talker's (its prompt, at most L and its own head, and a row per step);
    router_logits (capture "logits"): every expert's logit of those tokens and layers.
    Tower attention (audio and vision encoders) is not estimated. Talker attention layers are
    estimated at the thinker's length. Returns a CaptureEstimate with bytes by kind.
    """
    from .record.activations import TALKER_ASSISTANT_POSITIONS
    from .record.attention import attention_settings

    settings = attention_settings(attention)
    length, new = prompt_tokens(inputs), int(max_new_tokens)
    out: dict[str, int] = {}
    if "attention" in capture:
        per_head = attention_rows(lab, inputs, settings, max_new_tokens=new)
        rows = keys = transient = 0
        for component, layers in (attention_layers or {"thinker": [0]}).items():
            config = _text_config(lab, component)
            if config is None or component not in ("thinker", "talker"):
                continue
            count = len(heads) if heads is not None else int(config.num_attention_heads)
            rows += len(list(layers)) * count * per_head
            head_dim = int(getattr(config, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
            kv = int(config.num_key_value_heads)
            keys += len(list(layers)) * (length + new) * kv * head_dim * 4
            # one layer at a time: a chunk of scores (scores, probabilities, block sums) and the
            # recomputed queries and keys of the prompt (a few float32 copies)
            chunk = min(settings.chunk_bytes, 4 * count * length * length)
            transient = max(transient, 3 * chunk + 3 * length * (count + kv) * head_dim * 4)
        out["attention"] = rows * ATTENTION_ROW_BYTES
        out["attention_transient"] = keys + transient if rows else 0
    if "routing" in capture or "logits" in capture:
        config = _text_config(lab, "thinker")
        top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        rows = (length + new) * layers * top_k
        logits = (length + new) * layers * int(getattr(config, "num_experts", 0) or 0)
        talker = _text_config(lab, "talker") if speech_frames else None
        if talker is not None:
            talker_rows = length + TALKER_ASSISTANT_POSITIONS + int(speech_frames) + 1
            rows += talker_rows * int(talker.num_hidden_layers) * int(talker.num_experts_per_tok)
            logits += talker_rows * int(talker.num_hidden_layers) * int(talker.num_experts)
        out["routing"] = rows * ROUTING_ROW_BYTES
        if "logits" in capture:  # every expert's router logit per token and layer
            out["router_logits"] = logits * ROUTER_LOGIT_ROW_BYTES
    return CaptureEstimate(length, out)


def check_budget(tracer, inputs, *, max_new_tokens: int = 0, speech_frames: int = 0) -> CaptureEstimate:
    """The estimate of `tracer`'s captures on `inputs` for a run making `max_new_tokens` tokens and
    `speech_frames` frames; a BudgetError, before any forward, when it passes `tracer.memory_budget`."""
    estimate = estimate_capture_bytes(
        tracer.lab,
        inputs,
        tracer.capture,
        tracer.attention_layers or None,
        max_new_tokens=max_new_tokens,
        heads=tracer.heads,
        attention=tracer.attention,
        speech_frames=speech_frames,
    )
    if getattr(tracer, "requests", None):  # activations of sites (lab.trace(sites=...))
        from .record.activations import estimate_bytes

        sized = estimate_bytes(
            tracer.lab.model,
            tracer.requests,
            inputs["input_ids"][0],
            **tracer.activation_options,
            max_new_tokens=max_new_tokens,
            speech_frames=speech_frames,
        )
        estimate = CaptureEstimate(estimate.tokens, {**estimate.bytes, "activations": sized})
    if estimate.over(tracer.memory_budget):
        raise BudgetError(
            f"this trace was refused before running: recording it would need "
            f"{describe(estimate, tracer.memory_budget)}; record less (attention={{'queries': 'last'}}, "
            "fewer attention_layers or heads, fewer sites, positions= or modality=, a shorter prompt) or raise lab.trace(memory_budget=...)"
        )
    return estimate


def human_bytes(size: float) -> str:
    """A byte count in the unit that reads best: '512 bytes', '11.8 KB', '3.2 MB', '1.07 GB' (1 KB = 1000 bytes)."""
    size = float(size)
    if size < 1e3:
        return f"{size:,.0f} bytes"
    unit, scale = next(
        (u, k) for u, k in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)) if size < k * 1e3 or u == "GB"
    )
    return f"{size / scale:,.{2 if unit == 'GB' else 1}f} {unit}"


def describe(estimate: CaptureEstimate, budget: int = MEMORY_BUDGET_BYTES) -> str:
    """'attention 3.20 GB + routing 96.0 MB = 3.30 GB for 1,700 prompt tokens; the budget is 1.07 GB'."""
    parts = " + ".join(f"{kind} {human_bytes(size)}" for kind, size in estimate.bytes.items() if size)
    return (
        f"{parts or 'nothing'} = {human_bytes(estimate.total)} for {estimate.tokens:,} prompt tokens; "
        f"the budget is {human_bytes(budget)}"
    )
