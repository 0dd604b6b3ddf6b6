"""What the organism shows, measured on a model: routing against modality, expert ablation, shifted time.

Each function runs the model on examples of the world and returns plain numbers or tables; the
findings tests (tests/test_organism_findings.py) and the model card read them. A rate comes with
its sample size and a 95% Wilson interval (`rate`), never as a bare point estimate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..analysis.intervals import rate, wilson  # noqa: F401  (findings.wilson: the card and tests use it)
from . import train, world


def describe(r: dict) -> str:
    """'97% (39/40, 95% CI 87-100%)': a rate as the card states it."""
    return f"{r['rate']:.0%} ({r['right']}/{r['n']}, 95% CI {r['low']:.0%}-{r['high']:.0%})"


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
def shifted_hits(lab, samples, seconds: float) -> list[bool]:
    """Per sample, whether its answer stays exactly right with the audio's TM-RoPE positions moved by `seconds`."""
    right = []
    for sample in samples:
        batch, rows, positions, targets = train.collate([sample])
        with train.shifted_audio(lab.model, batch, torch.tensor([float(seconds)])):
            logits, _ = train.answer_logits(
                lab.model.thinker, batch, rows, positions, use_audio_in_video=sample.use_audio_in_video
            )
        right.append(bool((logits.argmax(-1) == targets).all()))
    return right


def time_by_second(lab, beeps: list, *, shifts=(-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)) -> pd.DataFrame:
    """The time finding per beep second: for each shift and each second the beep sounds in, how often
    the answer stays the colour of the beep's true second (`keeps`) and how often it becomes the colour
    at the beep's moved time (`follows`), with n and 95% Wilson intervals.

    `beeps`: beep examples (world.Example). A beep whose moved onset leaves the video (before 0 s or
    after its end) is `off_screen`: no colour is on screen at its moved time, so only `keeps` is
    defined; those rows stand apart. Shift 0 is the unmoved baseline.
    """
    samples = train.prepare_samples(lab, beeps, progress=False)
    followers = {}
    rows = []
    for shift in (0.0, *shifts):
        if shift == 0.0:
            keeps = train.correct(lab.model, samples)
        else:
            keeps = shifted_hits(lab, samples, shift)
        moved = [b.facts["onset"] + shift for b in beeps]
        off = [not 0 <= m < world.BEEP_SECONDS for m in moved]
        # `follows`: the colour on screen at the moved onset, asked with the same shift
        follow_examples = [
            (i, _answered(b, b.facts["colours"][int(m)]))
            for i, (b, m, o) in enumerate(zip(beeps, moved, off, strict=True))
            if not o and int(m) != b.facts["second"]
        ]
        follows = {}
        if follow_examples:
            key = (shift, tuple(i for i, _ in follow_examples))
            if key not in followers:
                moved_samples = train.prepare_samples(lab, [e for _, e in follow_examples], progress=False)
                followers[key] = dict(
                    zip([i for i, _ in follow_examples], shifted_hits(lab, moved_samples, shift), strict=True)
                )
            follows = followers[key]
        for second in range(world.BEEP_SECONDS):
            for off_screen in (False, True):
                idx = [i for i, b in enumerate(beeps) if b.facts["second"] == second and off[i] == off_screen]
                if not idx:
                    continue
                row = {"shift": shift, "second": second, "off_screen": off_screen}
                row.update({f"keeps_{k}": v for k, v in rate([keeps[i] for i in idx]).items()})
                moved_idx = [i for i in idx if i in follows]
                if moved_idx:
                    row.update({f"follows_{k}": v for k, v in rate([follows[i] for i in moved_idx]).items()})
                rows.append(row)
    return pd.DataFrame(rows)


def _answered(example, answer: str):
    return world.Example(
        example.task, example.conversation, answer, example.use_audio_in_video, example.facts
    )


def attribution_shares(lab, conversation, modality: str, *, steps: int = 128) -> dict:
    """Integrated Gradients on `conversation`'s first reply token: the share of |attribution| on
    `modality`'s tokens, that modality's share of the prompt's tokens, and completeness: captum's
    delta against the logit gap (logprob at the input minus at the all-zero baseline).
    """
    from ..analysis import attribute

    result = attribute(lab, conversation, method="integrated_gradients", steps=steps)
    tokens = result.tokens[result.tokens["phase"] == "prefill"] if "phase" in result.tokens else result.tokens
    size = tokens["attribution"].abs()
    mine = (tokens["modality"] == modality).to_numpy()
    gap = float(result.target["logprob"] - result.target["baseline_logprob"])
    return {
        "share": float(size[mine].sum() / size.sum()),
        "token_share": float(mine.mean()),
        "delta": float(result.delta),
        "gap": gap,
        "delta_of_gap": abs(float(result.delta)) / max(abs(gap), 1e-9),
        "steps": steps,
    }


@torch.no_grad()
def shifted_accuracy(lab, samples, seconds: float) -> float:
    """Accuracy on `samples` with every audio token's TM-RoPE positions moved by `seconds` (0: none).

    Only the rotary positions change (`train.shifted_audio`: the Intervention `lab.intervene(positions=)`
    makes): the tokens, their order and the audio itself stay, so what breaks is what the model reads
    from the audio's time.
    """
    return float(np.mean(shifted_hits(lab, samples, seconds)))


def top1_nmi_interval(source: dict, *, resamples: int = 200, seed: int = 0) -> pd.DataFrame:
    """`top1_nmi` per layer with a 95% bootstrap interval over the prompts (resampled with replacement).

    Columns: layer, nmi, low, high, prompts.
    """
    point = top1_nmi(source).set_index("layer")["nmi"]
    ids = source["routing"]["sample_id"].unique()
    routing = {i: g for i, g in source["routing"].groupby("sample_id")}
    tokens = {i: g for i, g in source["tokens"].groupby("sample_id")}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        picks = rng.choice(ids, size=len(ids), replace=True)
        sample = {
            "routing": pd.concat(
                [routing[p].assign(sample_id=k) for k, p in enumerate(picks)], ignore_index=True
            ),
            "tokens": pd.concat(
                [tokens[p].assign(sample_id=k) for k, p in enumerate(picks)], ignore_index=True
            ),
        }
        draws.append(top1_nmi(sample).set_index("layer")["nmi"])
    spread = pd.concat(draws, axis=1)
    return pd.DataFrame(
        {
            "layer": point.index.astype(int),
            "nmi": point.to_numpy(),
            "low": spread.quantile(0.025, axis=1).to_numpy(),
            "high": spread.quantile(0.975, axis=1).to_numpy(),
            "prompts": len(ids),
        }
    )


@torch.no_grad()
def ablated_hits(lab, samples, experts: dict[int, list[int]]) -> list[bool]:
    """Per sample, whether its answer stays right with the thinker's `experts` ablated for every token."""
    spec = {"thinker": {layer: list(e) for layer, e in experts.items()}}
    with lab.intervene(ablate=spec):
        return train.correct(lab.model, samples)
