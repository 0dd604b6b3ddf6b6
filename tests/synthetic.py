"""Synthetic Traces with planted structure, for tests that need to know the answer in advance.

`synthetic_trace(...)` builds a schema-conformant Trace (through `Trace.build`) of a thinker turn over
text, a video with its audio interleaved (TM-RoPE as Qwen3-Omni lays it out), a short text reply, and
a talker that speaks it: tokens, routing, router_stats, router_logits, codes, attention, spans,
timings, audio and meta. Routing is the top-k of random router logits; each planted structure edits
those logits so that its analysis has a known answer:

    audio_experts=(0, 1)     audio tokens take these experts first; no other token ever takes them
    coactivation=(2, 3)      expert b is chosen exactly when expert a is
    repetition=0.6           exactly this fraction of consecutive same-modality token pairs share their
                             first choice (the rest differ); exact on its own, and among text pairs
                             when combined with audio_experts
    vocabulary=(4242, 4)     every occurrence of token id 4242 takes expert 4 first
    misaligned=5             the audio token at this index of the audio item has its t moved by
                             `shift` position ids (default 6, 0.46 s): it breaks audio-video alignment
    attention=0.7            head 0 of each attention layer gives text queries after the media this
                             much attention mass on audio keys
    codebook_collapse=15     this codebook uses one code only (entropy 0)
    quiet_audio=True         audio tokens' router logits are sharpened: lower entropy than text

`meta["planted"]` records what was planted. Everything is drawn from `seed` and is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from omnilab.trace import Trace

AUDIO_ID, VIDEO_ID = 151675, 151656
PPS = 13  # position ids per second (Qwen3-Omni's position_id_per_seconds)
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1_920  # one talker frame: 80 ms
DEFAULT_PLANTED = {
    "audio_experts": (0, 1),
    "coactivation": (2, 3),
    "vocabulary": (4242, 4),
    "misaligned": 5,
    "attention": 0.7,
    "codebook_collapse": 15,
    "quiet_audio": True,
}


def synthetic_trace(
    n_tokens: int = 160,
    layers: int = 4,
    experts: int = 16,
    k: int = 4,
    planted: dict | None = None,
    *,
    seed: int = 0,
    media: bool = True,
    reply_tokens: int = 12,
    talker: bool = True,
    talker_layers: int = 2,
    talker_k: int | None = None,
    attention_layers: tuple[int, ...] = (0,),
    heads: int = 2,
    shift: int = 6,
) -> Trace:
    """A Trace of about `n_tokens` thinker tokens with the `planted` structures (default: DEFAULT_PLANTED).

    media=False gives a text-only prompt. The thinker has `layers` MoE layers of `experts` experts,
    top-`k`; the talker `talker_layers` layers, top-`talker_k` (default k), one decode token per reply
    token (so frame i speaks reply token i).
    """
    planted = dict(DEFAULT_PLANTED if planted is None else planted)
    rng = np.random.default_rng(seed)
    thinker = _thinker_tokens(n_tokens, reply_tokens, media, planted, shift, rng)
    frames = reply_tokens if talker else 0
    tables = [thinker]
    if talker:
        tables.append(_talker_tokens(frames, rng))
    tokens = pd.concat(tables, ignore_index=True)

    routing, stats, logits = [], [], []
    for name, count, depth in (("thinker", layers, k), ("talker", talker_layers, talker_k or k)):
        part = tokens[tokens["component"] == name]
        if len(part) == 0 or count == 0:
            continue
        r, s, lg = _routing(part, name, count, experts, depth, planted, rng)
        routing.append(r)
        stats.append(s)
        logits.append(lg)

    codes = _codes(frames, planted, rng)
    audio = _audio(frames)
    attention = _attention(thinker, attention_layers, heads, planted, rng)
    meta = {
        "model_id": "synthetic",
        "random_weights": True,
        "num_experts": {"thinker": experts, "talker": experts},
        "top_k": {"thinker": k, "talker": talker_k or k},
        "position_id_per_seconds": PPS,
        "sample_rate": SAMPLE_RATE,
        "text": " ".join(thinker.loc[thinker["phase"] == "decode", "text"]),
        "planted": {**planted, "shift": shift},
        "capture": ["routing", "router_stats", "router_logits", "positions", "attention", "codes"],
    }
    return Trace.build(
        tokens=tokens,
        routing=pd.concat(routing, ignore_index=True),
        router_stats=pd.concat(stats, ignore_index=True),
        router_logits=pd.concat(logits, ignore_index=True),
        codes=codes,
        attention=attention,
        spans=_spans(thinker),
        timings=pd.DataFrame(
            {
                "stage": ["thinker_prefill", "thinker_decode", "talker_decode"],
                "seconds": [0.1, 0.2, 0.3],
                "calls": [1, reply_tokens, frames],
            }
        ),
        audio=audio,
        sample_rate=SAMPLE_RATE,
        meta=meta,
    )


# -- tokens ----------------------------------------------------------------------------------------------


def _thinker_tokens(n_tokens, reply_tokens, media, planted, shift, rng) -> pd.DataFrame:
    """Prompt text, [a video of 4 frames (2x2 patches each, 1 s a frame as Qwen's 2 fps sampling with
    temporal patches of 2 gives) with its 4 s of audio interleaved], more text, then `reply_tokens`
    decode tokens."""
    rows = []
    vocab_id = planted.get("vocabulary", (None,))[0]

    def text_token(phase, step, piece=None):
        token_id = int(vocab_id if vocab_id is not None and rng.random() < 0.15 else rng.integers(100, 400))
        rows.append(
            {
                "phase": phase,
                "step": step,
                "token_id": token_id,
                "text": piece or f"w{token_id}",
                "modality": "text",
                "item": -1,
                "seconds": np.nan,
                "frame": -1,
                "kind": "text",
            }
        )

    media_tokens = 0
    if media:
        video_frames, grid, spg = 4, 2, 1.0
        audio_len = int(video_frames * spg * PPS)  # 13 audio tokens a second, one position id each
        media_tokens = video_frames * grid * grid + audio_len
    prefix = max((n_tokens - reply_tokens - media_tokens) // 2, 2)
    suffix = max(n_tokens - reply_tokens - media_tokens - prefix, 2)
    for _ in range(prefix):
        text_token("prefill", 0)
    if media:
        # TM-RoPE with audio in video: both start at one t; video frame f at t0 + f * spg * pps, audio
        # token i at t0 + i; interleaved by t (video first on ties). t is filled in below.
        entries = []
        for f in range(video_frames):
            for hh in range(grid):
                for ww in range(grid):
                    entries.append(
                        (
                            f * spg * PPS,
                            0,
                            {
                                "modality": "video",
                                "frame": f,
                                "h": hh,
                                "w": ww,
                                "token_id": VIDEO_ID,
                                "text": "<|VIDEO|>",
                            },
                        )
                    )
        for i in range(audio_len):
            entries.append(
                (
                    float(i),
                    1,
                    {
                        "modality": "audio",
                        "frame": i,
                        "h": 0,
                        "w": 0,
                        "token_id": AUDIO_ID,
                        "text": "<|AUDIO|>",
                    },
                )
            )
        entries.sort(key=lambda e: (e[0], e[1]))
        for offset, _, entry in entries:
            rows.append(
                {
                    "phase": "prefill",
                    "step": 0,
                    "item": 0,
                    "seconds": np.nan,
                    "kind": "media",
                    "offset": offset,
                    **entry,
                }
            )
    for _ in range(suffix):
        text_token("prefill", 0)
    for step in range(reply_tokens):
        text_token("decode", step + 1, piece=f"say{step}")

    frame = pd.DataFrame(rows)
    n = len(frame)
    frame["component"] = "thinker"
    frame["pos"] = np.arange(n)
    # t/h/w: text advances by one; a media block starts at the next t and text resumes after its max t.
    t = np.zeros(n)
    h = np.zeros(n)
    w = np.zeros(n)
    cursor = 0.0
    in_media = frame["kind"].to_numpy() == "media"
    media_start = None
    for i in range(n):
        if in_media[i]:
            if media_start is None:
                media_start = cursor
            t[i] = media_start + frame.at[i, "offset"]
            h[i] = media_start + frame.at[i, "h"] if frame.at[i, "modality"] == "video" else t[i]
            w[i] = media_start + frame.at[i, "w"] if frame.at[i, "modality"] == "video" else t[i]
            continue
        if media_start is not None:
            cursor = max(t[in_media].max(), h[in_media].max(), w[in_media].max()) + 1
            media_start = None
        t[i] = h[i] = w[i] = cursor
        cursor += 1
    misaligned = planted.get("misaligned")
    if media and misaligned is not None:
        audio_rows = np.flatnonzero(frame["modality"].to_numpy() == "audio")
        row = audio_rows[int(misaligned)]
        t[row] += shift
        h[row] += shift
        w[row] += shift
    frame["t"], frame["h"], frame["w"] = t.astype(np.int64), h.astype(np.int64), w.astype(np.int64)
    media_mask = frame["modality"].isin(["audio", "video"]).to_numpy()
    frame["seconds"] = np.where(media_mask, frame["t"] / PPS, np.nan)
    return frame.drop(columns=["kind", "offset"], errors="ignore")


def _talker_tokens(frames, rng) -> pd.DataFrame:
    prefix = 3
    n = prefix + frames
    return pd.DataFrame(
        {
            "component": "talker",
            "phase": ["prefill"] * prefix + ["decode"] * frames,
            "step": [0] * prefix + list(range(1, frames + 1)),
            "pos": np.arange(n),
            "token_id": [-1] * prefix + list(rng.integers(0, 2048, frames)),
            "text": "",
            "modality": ["text"] * prefix + ["speech"] * frames,
            "item": -1,
            "t": np.arange(n),
            "h": np.arange(n),
            "w": np.arange(n),
            "seconds": np.nan,
            "frame": [-1] * prefix + list(range(frames)),
        }
    )


# -- routing ---------------------------------------------------------------------------------------------


def _routing(tokens, component, layers, experts, k, planted, rng):
    n = len(tokens)
    modality = tokens["modality"].to_numpy()
    token_id = tokens["token_id"].to_numpy()
    logits = rng.normal(0.0, 1.0, size=(layers, n, experts))
    audio = modality == "audio"

    if planted.get("quiet_audio") and component == "thinker":
        logits[:, audio] *= 4.0

    repeat_rate = planted.get("repetition")
    if repeat_rate is not None:
        _plant_repetition(logits, modality, float(repeat_rate), rng)

    reserved = planted.get("audio_experts")
    if reserved is not None and component == "thinker":
        reserved = list(reserved)
        top = logits.max(axis=2)
        for j, e in enumerate(reserved):
            logits[:, audio, e] = top[:, audio] + 10.0 - j
        logits[:, ~audio, :] = np.where(np.isin(np.arange(experts), reserved), -np.inf, logits[:, ~audio, :])

    vocabulary = planted.get("vocabulary")
    if vocabulary is not None and component == "thinker":
        token, expert = vocabulary
        rows = token_id == token
        logits[:, rows, expert] = logits[:, rows].max(axis=2) + 5.0

    order = np.argsort(-logits, axis=2, kind="stable")[:, :, :k]

    pair = planted.get("coactivation")
    if pair is not None and component == "thinker":
        order = _plant_coactivation(order, logits, pair, k)

    chosen = np.take_along_axis(logits, order, axis=2)
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    top = finite.max(axis=2, keepdims=True)
    prob = np.exp(finite - top)
    prob /= prob.sum(axis=2, keepdims=True)
    chosen_prob = np.exp(chosen - top) / np.exp(finite - top).sum(axis=2, keepdims=True)
    topk_mass = chosen_prob.sum(axis=2)
    weights = chosen_prob / topk_mass[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(prob > 0, prob * np.log(prob), 0.0).sum(axis=2)

    pos = tokens["pos"].to_numpy()
    phase = tokens["phase"].to_numpy()
    li, ti, ri = np.meshgrid(np.arange(layers), np.arange(n), np.arange(k), indexing="ij")
    routing = pd.DataFrame(
        {
            "component": component,
            "layer": li.ravel(),
            "pos": pos[ti.ravel()],
            "phase": phase[ti.ravel()],
            "rank": ri.ravel(),
            "expert": order.ravel(),
            "weight": weights.ravel(),
        }
    )
    li2, ti2 = np.meshgrid(np.arange(layers), np.arange(n), indexing="ij")
    stats = pd.DataFrame(
        {
            "component": component,
            "layer": li2.ravel(),
            "pos": pos[ti2.ravel()],
            "phase": phase[ti2.ravel()],
            "entropy": entropy.ravel(),
            "topk_mass": topk_mass.ravel(),
        }
    )
    li3, ti3, ei3 = np.meshgrid(np.arange(layers), np.arange(n), np.arange(experts), indexing="ij")
    logit_frame = pd.DataFrame(
        {
            "component": component,
            "layer": li3.ravel(),
            "pos": pos[ti3.ravel()],
            "expert": ei3.ravel(),
            "logit": np.clip(logits, -60000, 60000).ravel(),
        }
    )
    return routing, stats, logit_frame


def _plant_repetition(logits, modality, rate, rng):
    """Exactly round(rate * pairs) of the same-modality consecutive pairs share their first choice."""
    layers, n, experts = logits.shape
    same = modality[1:] == modality[:-1]
    candidates = np.flatnonzero(same)
    repeat = np.zeros(n - 1, dtype=bool)
    repeat[rng.permutation(candidates)[: int(round(rate * len(candidates)))]] = True
    for i in range(1, n):
        if repeat[i - 1]:
            logits[:, i] = logits[:, i - 1]
        elif same[i - 1]:
            collide = logits[:, i].argmax(axis=1) == logits[:, i - 1].argmax(axis=1)
            for layer in np.flatnonzero(collide):
                row = logits[layer, i]
                first, second = np.argsort(-row)[:2]
                row[first], row[second] = row[second], row[first]


def _plant_coactivation(order, logits, pair, k):
    """Make expert b chosen exactly when a is: drop b where a is absent, add b (last rank) where a is."""
    a, b = pair
    order = order.copy()
    has_a = (order == a).any(axis=2)
    has_b = (order == b).any(axis=2)
    # b without a: replace b by the best expert not chosen that is neither a nor b
    layers, n, experts = logits.shape
    for layer, token in zip(*np.nonzero(has_b & ~has_a), strict=True):
        ranked = [
            e for e in np.argsort(-logits[layer, token]) if e not in order[layer, token] and e not in pair
        ]
        order[layer, token][order[layer, token] == b] = ranked[0]
    # a without b: b takes the last slot not held by a
    for layer, token in zip(*np.nonzero(has_a & ~has_b), strict=True):
        row = order[layer, token]
        slot = k - 1 if row[k - 1] != a else k - 2
        row[slot] = b
    # keep ranks ordered by logit, with b right after a on ties
    logits[:, :, b] = np.where((order == a).any(axis=2), logits[:, :, a] - 1e-3, logits[:, :, b])
    chosen = np.take_along_axis(logits, order, axis=2)
    return np.take_along_axis(order, np.argsort(-chosen, axis=2, kind="stable"), axis=2)


# -- the rest of the tables ------------------------------------------------------------------------------


def _codes(frames, planted, rng) -> pd.DataFrame:
    codebooks = 16
    codes = rng.integers(0, 2048, size=(frames, codebooks))
    collapsed = planted.get("codebook_collapse")
    if collapsed is not None:
        codes[:, collapsed] = 7
    fi, ci = np.meshgrid(np.arange(frames), np.arange(codebooks), indexing="ij")
    return pd.DataFrame({"frame": fi.ravel(), "codebook": ci.ravel(), "code": codes.ravel()})


def _audio(frames) -> np.ndarray | None:
    """A 1 kHz tone for the first half, 3 kHz for the second: one talker frame = 80 ms."""
    if frames == 0:
        return None
    samples = frames * SAMPLES_PER_FRAME
    time = np.arange(samples) / SAMPLE_RATE
    tone = np.where(time < time[-1] / 2, np.sin(2 * np.pi * 1000 * time), np.sin(2 * np.pi * 3000 * time))
    return (0.5 * tone).astype(np.float32)


def _attention(tokens, layers, heads, planted, rng) -> pd.DataFrame:
    """Causal attention maps; head 0 gives text queries after the media `planted["attention"]` on audio keys."""
    n = len(tokens)
    if not layers or n == 0:
        return None
    modality = tokens["modality"].to_numpy()
    audio = modality == "audio"
    after_media = np.zeros(n, dtype=bool)
    if audio.any():
        after_media[np.flatnonzero(audio).max() + 1 :] = True
    target = planted.get("attention")
    q, kk = np.tril_indices(n)
    frames = []
    for layer in layers:
        for head in range(heads):
            raw = rng.random(len(q)) + 1e-3
            totals = np.bincount(q, raw, minlength=n)
            weight = raw / totals[q]
            if target is not None and head == 0:
                boost = (modality[q] == "text") & after_media[q]
                on_audio = audio[kk]
                audio_mass = np.bincount(q[on_audio], weight[on_audio], minlength=n)
                scale_audio = np.where(audio_mass > 0, target / np.where(audio_mass > 0, audio_mass, 1), 1)
                scale_rest = np.where(
                    audio_mass < 1, (1 - target) / np.where(audio_mass < 1, 1 - audio_mass, 1), 1
                )
                factor = np.where(on_audio, scale_audio[q], scale_rest[q])
                weight = np.where(boost, weight * factor, weight)
            frames.append(
                pd.DataFrame(
                    {
                        "component": "thinker",
                        "layer": layer,
                        "head": head,
                        "query_pos": q,
                        "key_pos": kk,
                        "weight": weight,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _spans(tokens) -> pd.DataFrame:
    modality = tokens["modality"].to_numpy()
    item = tokens["item"].to_numpy()
    change = np.flatnonzero((modality[1:] != modality[:-1]) | (item[1:] != item[:-1])) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(tokens)]])
    return pd.DataFrame(
        {
            "component": "thinker",
            "modality": modality[starts],
            "item": item[starts],
            "start": starts,
            "end": ends,
        }
    )


# -- a real trace of the tiny model -----------------------------------------------------------------------

_TINY_TRACES: dict = {}
VIDEO = Path(__file__).resolve().parent.parent / "data" / "video.mp4"


def tiny_trace(lab) -> Trace:
    """A real trace of `lab` (the tiny preset): a video with its audio, a 3-token reply spoken in 4
    frames, with routing, router logits, positions, attention (thinker layer 0) and codes. Generated
    once per lab and session (a few seconds)."""
    key = id(lab)
    if key not in _TINY_TRACES:
        conversation = [
            {
                "role": "user",
                "content": [{"type": "video", "video": str(VIDEO)}, {"type": "text", "text": "hi"}],
            }
        ]
        reply = lab.generate(
            conversation,
            trace=("routing", "positions", "codes", "timings", "attention", "logits"),
            use_audio_in_video=True,
            max_new_tokens=3,
            max_speech_frames=4,
            seed=0,
        )
        _TINY_TRACES[key] = reply.trace
    return _TINY_TRACES[key]
