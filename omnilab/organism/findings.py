"""What the organism shows, measured on a model: routing against modality, expert ablation, shifted time.

Each function runs the model on examples of the world and returns plain numbers or tables; the
findings tests (tests/test_organism_findings.py) and the model card read them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import train


def routing_source(lab, examples) -> dict:
    """The thinker's prompt routing of `examples` (one greedy token each, traced), as one source.

    Returns {"routing", "tokens", "meta"}: the traces' tables joined with a `sample_id` column (so no
    two traces' tokens merge), a source every routing analysis reads (modality_nmi, modality_experts).
    """
    routing, tokens = [], []
    for number, example in enumerate(examples):
        reply = lab.generate(
            example.conversation,
            trace=True,
            max_new_tokens=1,
            return_audio=False,
            use_audio_in_video=example.use_audio_in_video,
        )
        trace = reply.trace
        routing.append(trace.table("routing").assign(sample_id=number))
        tokens.append(trace.table("tokens").assign(sample_id=number))
    return {"routing": pd.concat(routing, ignore_index=True), "tokens": pd.concat(tokens, ignore_index=True)}


def top1_nmi(source: dict) -> pd.DataFrame:
    """NMI of the top-1 expert and the token's modality per thinker layer, over the prompts of `source`.

    Columns as `analysis.modality_nmi` (layer, modalities, mi, h_expert, h_modality, nmi).
    """
    from ..analysis import modality_nmi

    top1 = source["routing"][source["routing"]["rank"] == 0]
    return modality_nmi({"routing": top1, "tokens": source["tokens"]}, component="thinker")


def audio_experts(source: dict, **thresholds) -> dict[int, list[int]]:
    """{layer: experts} that `analysis.modality_experts` names for audio in the thinker ({} if none)."""
    from ..analysis import modality_experts

    table = modality_experts(source, component="thinker", **thresholds)
    table = table[table["modality"] == "audio"]
    return {int(layer): sorted(int(e) for e in group["expert"]) for layer, group in table.groupby("layer")}


def random_experts(like: dict[int, list[int]], num_experts: int, seed: int) -> dict[int, list[int]]:
    """As many experts per layer as `like` has, drawn at random (seeded) from those it does not name."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, experts in like.items():
        others = [e for e in range(num_experts) if e not in experts]
        out[layer] = sorted(int(e) for e in rng.choice(others, size=len(experts), replace=False))
    return out


@torch.no_grad()
def ablated_accuracy(lab, samples, experts: dict[int, list[int]], *, modality: str | None = None) -> float:
    """Accuracy on `samples` (one task) with the thinker's `experts` ({layer: [expert]}) ablated.

    For every token, or with `modality` only for that modality's tokens ("text": every token that
    is not a media placeholder). A modality needs each row's token ids, so those runs go one sample
    at a time through the whole thinker (where the intervention sees them).
    """
    spec = {"thinker": {layer: list(e) for layer, e in experts.items()}}
    if modality is None:
        with lab.intervene(ablate=spec):
            scores = train.accuracy(lab.model, samples)
        return float(np.mean(list(scores.values())))
    right = []
    for sample in samples:
        batch, rows, positions, targets = train.collate([sample])
        with lab.intervene(ablate=spec, modality=modality):
            logits = lab.model.thinker(**batch, use_audio_in_video=sample.use_audio_in_video).logits
        right.append(bool((logits[rows, positions].argmax(-1) == targets).all()))
    return float(np.mean(right))


@torch.no_grad()
def shifted_accuracy(lab, samples, seconds: float) -> float:
    """Accuracy on `samples` with every audio token's TM-RoPE positions moved by `seconds` (0: none).

    Only the rotary positions change (`train.shifted_audio`: the Intervention `lab.intervene(positions=)`
    makes): the tokens, their order and the audio itself stay, so what breaks is what the model reads
    from the audio's time.
    """
    right = []
    for sample in samples:
        batch, rows, positions, targets = train.collate([sample])
        with train.shifted_audio(lab.model, batch, torch.tensor([float(seconds)])):
            logits, _ = train.answer_logits(
                lab.model.thinker, batch, rows, positions, use_audio_in_video=sample.use_audio_in_video
            )
        right.append(bool((logits.argmax(-1) == targets).all()))
    return float(np.mean(right))
