"""Circuits on the organism: AtP against the sweep, the heads that listen, experts zeroed.

The measurements notebook 08 states, each a number with its interval, written once here so that the
notebook only calls them:

- `atp_against_sweep`: attribution patching against the patching sweep, clean example against its
  corrupted twin (`silenced`: the audio replaced by silence of the same length; `blanked`: the image
  by a black one of the same size), metric the logit difference between the clean answer's first
  token and the corrupted run's own top token (its second where the corrupted run still answers
  right) (a log-probability saturates where the clean model is
  sure, and AtP's linear estimate fails there; the difference stays linear longer).
- `listening_heads`: every head's attention mass from the last prompt position onto the audio
  (or image) tokens, averaged over examples ("Are Audio-Language Models Listening?", 2025).
- `ablation_against_random`: accuracy with the top-k heads (or any heads) zero- or mean-ablated,
  against k random heads over several draws, each a rate with its 95% Wilson interval.
- `expert_zeroing`: accuracy with chosen experts' outputs zeroed at their routed tokens.
- `steering_against_noise`: an audio-minus-silence direction (the residual at the last prompt
  position, speech minus its silenced twin, averaged), added there to noisy speech: accuracy per
  multiple of it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..analysis.attribution_patching import agreement, attribution_patching
from ..analysis.heads import head_scores
from ..analysis.intervals import wilson
from ..analysis.patching import patching_sweep
from ..instrument.grad import token_id
from ..instrument.units import capture, expert_ablation, head_ablation
from . import train


def rate(lab, samples) -> dict:
    """{n, right, rate, low, high}: the samples (one task) answered exactly right, with the 95%
    Wilson interval."""
    shares = train.accuracy(lab.model, samples)
    if len(shares) != 1:
        raise ValueError(f"rate takes the samples of one task; got {sorted(shares)}")
    n = len(samples)
    right = int(round(next(iter(shares.values())) * n))
    low, high = wilson(right, n)
    return {"n": n, "right": right, "rate": right / n, "low": low, "high": high}


def _replaced(example, kind: str, make) -> list[dict]:
    out = []
    for message in example.conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [{**p, kind: make(p[kind])} if p.get("type") == kind else p for p in content]
        out.append({**message, "content": content})
    return out


def silenced(example) -> list[dict]:
    """The example's conversation with each audio replaced by silence of the same length."""
    return _replaced(example, "audio", lambda audio: (np.zeros_like(audio[0]), audio[1]))


def blanked(example) -> list[dict]:
    """The example's conversation with each image replaced by a black image of the same size."""
    return _replaced(example, "image", lambda image: Image.new(image.mode, image.size))


def noisy(example, snr_db: float, *, seed: int = 0):
    """The example with Gaussian noise added to each audio at `snr_db` (signal power over noise's)."""
    rng = np.random.default_rng(seed)

    def add(audio):
        wave, rate_hz = audio
        power = float(np.mean(np.asarray(wave, np.float64) ** 2)) or 1e-12
        noise = rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), np.shape(wave))
        return (np.asarray(wave) + noise).astype(np.float32), rate_hz

    return dataclasses.replace(example, conversation=_replaced(example, "audio", add))


def audio_direction(lab, examples, layer: int) -> torch.Tensor:
    """Mean over `examples` of resid.`layer` at the last prompt position, speech minus silence [width]."""
    site = f"resid.{layer}"
    diffs = []
    for example in examples:
        spoken = capture(lab, example.conversation, [site])[site].values[-1]
        silent = capture(lab, silenced(example), [site])[site].values[-1]
        diffs.append(spoken.double() - silent.double())
    return torch.stack(diffs).mean(0).to(next(lab.model.parameters()).dtype)


def steering_against_noise(lab, samples, direction: torch.Tensor, layer: int, alphas) -> pd.DataFrame:
    """Accuracy of `samples` (prepared, one task) with alpha x `direction` added to resid.`layer` at
    each sample's last prompt position: alpha, n, right, rate, low, high."""
    rows = []
    for alpha in alphas:
        right = 0
        for sample in samples:
            with lab.intervene(add={f"resid.{layer}": alpha * direction}, at=[sample.answer_start - 1]):
                right += int(round(next(iter(train.accuracy(lab.model, [sample]).values()))))
        low, high = wilson(right, len(samples))
        rows.append({"alpha": alpha, "n": len(samples), "right": right, "rate": right / len(samples),
                     "low": low, "high": high})  # fmt: skip
    return pd.DataFrame(rows)


def atp_against_sweep(lab, examples, corrupt, *, sites="resid.*", positions="each") -> pd.DataFrame:
    """Per example: AtP and the batched sweep over the same cells, timed, and their agreement.

    corrupt: example -> its corrupted conversation (silenced, blanked). Returns task, answer, cells,
    spearman, spearman_large, pearson, sign, atp_s, sweep_s.
    """
    rows = []
    for example in examples:
        corrupted = corrupt(example)
        good = token_id(lab, example.answer.split()[0])
        with torch.inference_mode():
            top = lab.forward(corrupted)[0, -1].topk(2).indices.tolist()
        wrong = top[1] if top[0] == good else top[0]  # the corrupted run's own answer (if not the clean one)
        start = time.perf_counter()
        atp = attribution_patching(
            lab, example.conversation, corrupted, lambda logits, good=good, wrong=wrong: logits[good] - logits[wrong],
            sites=sites, positions=positions,
        )  # fmt: skip
        atp_s = time.perf_counter() - start
        start = time.perf_counter()
        sweep = patching_sweep(
            lab, example.conversation, corrupted, lambda logits, good=good, wrong=wrong: float(logits[good] - logits[wrong]),
            sites=sites, positions=positions,
        )  # fmt: skip
        sweep_s = time.perf_counter() - start
        agree = agreement(atp, sweep)
        rows.append(
            {"task": example.task, "answer": example.answer, **agree, "atp_s": atp_s, "sweep_s": sweep_s}
        )
    return pd.DataFrame(rows)


def listening_heads(lab, examples, *, modality: str = "audio", queries="last") -> pd.DataFrame:
    """Every thinker head's attention mass on `modality` from `queries`, over `examples`: layer, head,
    mass (the mean), sd, examples, rank (1 = the most), sorted by rank."""
    layers = list(range(len(lab.thinker.model.language_model.layers)))
    parts = []
    for number, example in enumerate(examples):
        with lab.trace(capture=("attention",), attention_layers={"thinker": layers}) as tracer:
            lab.forward(example.conversation, use_audio_in_video=example.use_audio_in_video)
        parts.append(head_scores(tracer.trace, modality, queries=queries).assign(example=number))
    scores = pd.concat(parts)
    out = scores.groupby(["layer", "head"], as_index=False).agg(
        mass=("mass", "mean"), sd=("mass", "std"), examples=("mass", "size")
    )
    out["rank"] = out["mass"].rank(ascending=False, method="first").astype(int)
    return out.sort_values("rank").reset_index(drop=True)


def heads_of(frame: pd.DataFrame) -> dict[int, list[int]]:
    """{layer: [head, ...]} of a frame's (layer, head) rows."""
    out: dict[int, list[int]] = {}
    for layer, head in zip(frame["layer"], frame["head"], strict=True):
        out.setdefault(int(layer), []).append(int(head))
    return out


def random_heads(lab, k: int, *, seed: int) -> dict[int, list[int]]:
    """`k` thinker heads drawn at random (without replacement) over all layers."""
    layers = len(lab.thinker.model.language_model.layers)
    heads = int(lab.thinker.config.text_config.num_attention_heads)
    chosen = np.random.default_rng(seed).choice(layers * heads, size=k, replace=False)
    return heads_of(pd.DataFrame({"layer": chosen // heads, "head": chosen % heads}))


def describe(r: dict) -> str:
    """'92% (11/12, 95% CI 65-99%)': a rate as the card states it."""
    return f"{r['rate']:.0%} ({r['right']}/{r['n']}, 95% CI {r['low']:.0%}-{r['high']:.0%})"


def ablated_rate(lab, samples, spec: dict | None) -> dict:
    """The rate (with its Wilson interval) of samples answered exactly right under `set=spec`."""
    if not spec:
        return rate(lab, samples)
    with lab.intervene(set=spec):
        return rate(lab, samples)


def ablation_against_random(
    lab, samples, heads: dict[int, list[int]], *, draws: int = 5, seed: int = 0, means: dict | None = None
) -> pd.DataFrame:
    """Accuracy with no head ablated, with `heads` ablated (zero, or mean with `means`), and with as
    many random heads, `draws` times: which, heads, n, right, rate, low, high."""
    k = sum(len(v) for v in heads.values())
    runs = [("none", {}), ("chosen", heads)]
    runs += [(f"random {i}", random_heads(lab, k, seed=seed + i)) for i in range(draws)]
    rows = []
    for which, chosen in runs:
        spec = head_ablation(lab, chosen, means=means) if chosen else None
        rows.append({"which": which, "heads": str(chosen), **ablated_rate(lab, samples, spec)})
    return pd.DataFrame(rows)


def audio_experts(lab, examples, *, k: int = 4) -> dict[int, list[int]]:
    """The `k` thinker experts whose routed prompt tokens are most often audio tokens, over
    `examples` (each expert weighted by its top-k slots; at least 5 routed tokens): {layer: [expert]}."""
    from .findings import routing_source

    source = routing_source(lab, examples)
    routing, tokens = source["routing"], source["tokens"]
    routing = routing[routing["component"] == "thinker"]
    tokens = tokens[tokens["component"] == "thinker"][["sample_id", "pos", "modality"]]
    joined = routing.drop(columns=["modality"], errors="ignore").merge(tokens, on=["sample_id", "pos"])
    joined["audio"] = joined["modality"] == "audio"
    share = joined.groupby(["layer", "expert"])["audio"].agg(["mean", "size"]).reset_index()
    top = share[share["size"] >= 5].nlargest(k, "mean")
    out: dict[int, list[int]] = {}
    for layer, expert in zip(top["layer"], top["expert"], strict=True):
        out.setdefault(int(layer), []).append(int(expert))
    return {layer: sorted(v) for layer, v in sorted(out.items())}


def expert_zeroing(lab, samples, experts: dict[int, list[int]], *, means: dict | None = None) -> dict:
    """The rate right with `experts` ({layer: [expert]}) outputs zeroed (or set to `means`) at the
    tokens routed to them; routing itself unchanged."""
    return ablated_rate(lab, samples, expert_ablation(lab, experts, means=means))
