"""TM-RoPE analyses: where each token sits in (t, h, w) and in time, and whether audio and video agree.

Qwen3-Omni's TM-RoPE gives every token three position ids. Text advances all three by one. An image or
video patch gets t from its frame's time (video frame f at t0 + f · second_per_grid ·
position_id_per_seconds) and h, w from its place in the grid; audio token i gets t = h = w = t0 + i.
The audio encoder emits 13 tokens per second of audio (each 1 s chunk of 100 mel frames gives 13;
`_get_feat_extract_output_lengths` with n_window 50), the same rate as position_id_per_seconds = 13, so
an audio token lasts 1/13 s ≈ 77 ms and its t is its time. With audio in video the two streams start at
the same t0 and are interleaved by t.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import TraceError
from ..trace import MODALITIES, PHASES
from ._source import equals, meta, table

__all__ = ["av_alignment", "position_layout"]

DEFAULT_POSITION_ID_PER_SECONDS = 13  # Qwen3-Omni's config; also its audio tokens per second

LAYOUT_COLUMNS = [
    "component",
    "pos",
    "phase",
    "modality",
    "item",
    "text",
    "t",
    "h",
    "w",
    "t_step",
    "seconds",
    "position_seconds",
    "seconds_per_token",
    "frame",
]
ALIGNMENT_COLUMNS = [
    "pos",
    "item",
    "frame",
    "t",
    "media_seconds",
    "position_seconds",
    "offset",
    "video_item",
    "video_frame",
    "video_pos",
    "video_seconds",
    "gap",
    "aligned",
]


def _position_id_per_seconds(trace) -> float:
    value = meta(trace).get("position_id_per_seconds")
    return float(value) if value else float(DEFAULT_POSITION_ID_PER_SECONDS)


def _tokens(trace, component: str) -> pd.DataFrame:
    tokens = table(trace, "tokens")
    if len(tokens) == 0:
        return tokens
    rows = tokens[equals(tokens["component"], component)]
    return rows.drop_duplicates("pos", keep="last").sort_values("pos").reset_index(drop=True)


def position_layout(trace, *, component: str = "thinker", layer=None) -> pd.DataFrame:
    """Each token's TM-RoPE position and time: one row per token of `component`, in pos order.

    t, h, w: the position ids the model used; t_step: t minus the previous token's t (1 for text, 0
    between patches of one video frame, larger across a video frame); seconds: from the tokens table
    (media tokens); position_seconds = t / position_id_per_seconds, the time TM-RoPE implies for every
    token, text included; seconds_per_token: for audio and video tokens, the duration of their time slot
    (the gap to the next distinct t of the same item, in seconds, the item's median gap for the last
    slot) divided by the tokens sharing that t (an audio token covers 1/13 s; a video frame's patches
    share its slot). `layer` is accepted for the common signature and ignored (positions are per token).
    Source: Qwen3-Omni technical report (2025), §2 "TM-RoPE"; Qwen2.5-Omni (Xu et al., 2025), §2.2.
    """
    del layer
    tokens = _tokens(trace, component)
    if len(tokens) == 0:
        return _empty_layout()
    pps = _position_id_per_seconds(trace)
    t = tokens["t"].to_numpy().astype(np.int64)
    t_step = np.concatenate([[0], np.diff(t)])
    media = tokens["modality"].isin(["audio", "image", "video"]).to_numpy()
    slot = _seconds_per_token(tokens[media], pps)
    seconds_per_token = np.full(len(tokens), np.nan)
    seconds_per_token[media] = slot
    out = pd.DataFrame(
        {
            "component": pd.Categorical(tokens["component"].astype(str)),
            "pos": tokens["pos"].to_numpy(),
            "phase": pd.Categorical(tokens["phase"].astype(str), categories=list(PHASES)),
            "modality": pd.Categorical(tokens["modality"].astype(str), categories=list(MODALITIES)),
            "item": tokens["item"].to_numpy(),
            "text": pd.Categorical(tokens["text"].astype(str)),
            "t": t,
            "h": tokens["h"].to_numpy(),
            "w": tokens["w"].to_numpy(),
            "t_step": t_step,
            "seconds": tokens["seconds"].to_numpy(dtype=float),
            "position_seconds": t / pps,
            "seconds_per_token": seconds_per_token,
            "frame": tokens["frame"].to_numpy(),
        }
    )
    return out


def _seconds_per_token(media: pd.DataFrame, pps: float) -> np.ndarray:
    if len(media) == 0:
        return np.zeros(0)
    keys = media[["modality", "item", "t"]].astype({"modality": str})
    slots = (
        keys.groupby(["modality", "item", "t"], sort=True, observed=True)
        .size()
        .rename("tokens")
        .reset_index()
    )
    nxt = slots.groupby(["modality", "item"], observed=True)["t"].shift(-1)
    gap = (nxt - slots["t"]) / pps
    median = gap.groupby([slots["modality"], slots["item"]], observed=True).transform("median")
    fallback = np.where(slots["modality"] == "audio", 1.0 / pps, np.nan)
    gap = gap.fillna(median).fillna(pd.Series(fallback, index=slots.index))
    slots["seconds_per_token"] = gap / slots["tokens"]
    merged = keys.merge(
        slots[["modality", "item", "t", "seconds_per_token"]], on=["modality", "item", "t"], how="left"
    )
    return merged["seconds_per_token"].to_numpy()


def _empty_layout() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in LAYOUT_COLUMNS})


def av_alignment(
    trace,
    *,
    component: str = "thinker",
    layer=None,
    tolerance: float = 0.08,
    audio_token_seconds: float | None = None,
) -> pd.DataFrame:
    """Does each audio token sit, in TM-RoPE time, where the video frame of its moment sits?

    One row per audio token. An audio item is paired with the video item that starts at the same t
    (audio in video: both streams start at one t0); unpaired audio gets NaN video columns and
    aligned = True (there is nothing to be aligned with). For a paired token: media_seconds =
    frame × audio_token_seconds (default 1 / position_id_per_seconds, Qwen3-Omni's 13 audio tokens per
    second), the moment of the audio it encodes; position_seconds = (t − t0) / position_id_per_seconds,
    the moment TM-RoPE places it at; offset = position_seconds − media_seconds. The video frame at the
    same moment is the last frame starting at or before media_seconds (a video frame's start is
    (t_frame − t0) / position_id_per_seconds, exact by construction); video_seconds is its start and
    gap = position_seconds − video_seconds is how far after that frame's position the token sits.
    aligned = |offset| ≤ tolerance (80 ms, about one audio token): False flags a token whose position
    breaks the audio-video correspondence (an intervention on positions, a processor bug, an audio rate
    other than the position rate). `layer` is ignored.
    Source: Qwen3-Omni technical report (2025), §2 "TM-RoPE" (time-aligned audio and video ids).
    """
    del layer
    tokens = _tokens(trace, component)
    if len(tokens) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in ALIGNMENT_COLUMNS})
    pps = _position_id_per_seconds(trace)
    modality = tokens["modality"].astype(str).to_numpy()
    audio = tokens[modality == "audio"]
    video = tokens[modality == "video"]
    if tolerance <= 0:
        raise TraceError(f"tolerance must be positive seconds; got {tolerance}")
    rows = []
    video_start = video.groupby("item")["t"].min() if len(video) else pd.Series(dtype="int64")
    for _, group in audio.groupby("item", sort=True):
        group = group.sort_values("pos")
        frame = group["frame"].to_numpy()
        frame = np.where(frame >= 0, frame, np.arange(len(group)))
        t = group["t"].to_numpy().astype(np.int64)
        # the audio item's start: the t of its first frame (robust to a moved token elsewhere)
        t0 = int(np.median(t - frame))
        paired = video_start.index[video_start.to_numpy() == t0]
        media_seconds = frame * (audio_token_seconds or 1.0 / pps)
        position_seconds = (t - t0) / pps
        offset = position_seconds - media_seconds
        piece = pd.DataFrame(
            {
                "pos": group["pos"].to_numpy(),
                "item": group["item"].to_numpy(),
                "frame": frame,
                "t": t,
                "media_seconds": media_seconds,
                "position_seconds": position_seconds,
                "offset": offset,
            }
        )
        if len(paired):
            video_item = int(paired[0])
            frames = (
                video[video["item"] == video_item]
                .groupby("frame", sort=True)
                .agg(video_pos=("pos", "min"), video_t=("t", "min"))
                .reset_index()
            )
            frame_seconds = (frames["video_t"].to_numpy() - t0) / pps
            which = np.clip(np.searchsorted(frame_seconds, media_seconds + 1e-9, side="right") - 1, 0, None)
            piece["video_item"] = video_item
            piece["video_frame"] = frames["frame"].to_numpy()[which]
            piece["video_pos"] = frames["video_pos"].to_numpy()[which]
            piece["video_seconds"] = frame_seconds[which]
            piece["gap"] = position_seconds - frame_seconds[which]
            piece["aligned"] = np.abs(offset) <= tolerance
        else:
            for column in ("video_item", "video_frame", "video_pos"):
                piece[column] = -1
            piece["video_seconds"] = np.nan
            piece["gap"] = np.nan
            piece["aligned"] = True
        rows.append(piece)
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in ALIGNMENT_COLUMNS})
    out = pd.concat(rows, ignore_index=True)[ALIGNMENT_COLUMNS]
    return out.astype(
        {"video_item": np.int64, "video_frame": np.int64, "video_pos": np.int64, "aligned": bool}
    )
