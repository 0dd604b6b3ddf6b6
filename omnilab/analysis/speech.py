"""Speech analyses: the talker's codec codes, the reply's audio, and which text was being spoken when.

The talker emits one frame per 80 ms (12.5 Hz): 16 codes, codebook 0 from the talker itself and 1-15
from the code predictor; code2wav turns frames into 24 kHz audio (1,920 samples a frame).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from ..errors import TraceError
from ._source import equals, meta, table

__all__ = [
    "codebook_grid",
    "codebook_usage",
    "mel_spectrogram",
    "residual_audio",
    "residual_series",
    "spoken_text",
    "waveform_envelope",
]

FRAME_SECONDS = 0.08  # one talker frame
DEFAULT_CODEBOOK_SIZE = 2048  # Qwen3-Omni's code2wav codebook_size

USAGE_COLUMNS = [
    "codebook",
    "frames",
    "codes_used",
    "codebook_size",
    "utilization",
    "entropy",
    "entropy_norm",
    "perplexity",
    "top_code",
    "top_share",
]
GRID_COLUMNS = ["frame", "codebook", "code", "seconds", "text"]
SPOKEN_COLUMNS = ["frame", "start", "end", "pos", "token_id", "text"]
MEL_COLUMNS = ["frame", "seconds", "mel", "hz", "db", "dbfs"]
DBFS_FLOOR = -160.0  # dBFS below this read as this (below 24-bit audio's noise floor, about -144)
WAVE_COLUMNS = ["seconds", "low", "high"]


def codebook_usage(trace, *, codebook_size: int | None = None) -> pd.DataFrame:
    """How each of the 16 codebooks is used over the reply: one row per codebook.

    frames; codes_used: distinct codes; utilization = codes_used / codebook_size (meta's
    codebook_size, else 2048); entropy: of the codebook's code distribution over frames, in nats, and
    entropy_norm = entropy / ln(min(codebook_size, frames)), the largest entropy reachable with this many
    frames; perplexity = e^entropy, the effective number of codes; top_code and its top_share. A
    collapsed codebook has entropy near 0. Source: codebook utilization and perplexity as in VQ-VAE /
    SoundStream (Zeghidour et al., 2021) and the Mimi/Moshi codec analyses (Défossez et al., 2024).
    """
    codes = table(trace, "codes")
    size = int(codebook_size or meta(trace).get("codebook_size") or DEFAULT_CODEBOOK_SIZE)
    if len(codes) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in USAGE_COLUMNS})
    counts = codes.groupby(["codebook", "code"], sort=True).size().rename("n").reset_index()
    total = counts.groupby("codebook")["n"].transform("sum")
    counts["p"] = counts["n"] / total
    counts["plogp"] = -counts["p"] * np.log(counts["p"])
    grouped = counts.groupby("codebook", sort=True)
    out = pd.DataFrame(
        {
            "frames": grouped["n"].sum(),
            "codes_used": grouped.size(),
            "entropy": grouped["plogp"].sum(),
        }
    )
    top = counts.loc[grouped["n"].idxmax(), ["codebook", "code", "p"]].set_index("codebook")
    out["top_code"] = top["code"]
    out["top_share"] = top["p"]
    out["codebook_size"] = size
    out["utilization"] = out["codes_used"] / size
    reachable = np.log(np.minimum(size, out["frames"]).clip(lower=2))
    out["entropy_norm"] = out["entropy"] / reachable
    out["perplexity"] = np.exp(out["entropy"])
    return out.reset_index()[USAGE_COLUMNS]


def spoken_text(trace) -> pd.DataFrame:
    """Which reply text token was being spoken at each talker frame: one row per frame.

    Approximation: the talker reads one text token per step, so frame i is paired with the thinker's
    i-th reply token (decode-phase thinker tokens in pos order); frames past the end of the text get
    pos -1 and empty text. The real talker starts from a few prefix steps and lags the text by them, so
    read the pairing as ± a few frames. start/end: the frame's time span (80 ms frames). Source: the
    talker's streaming design in the Qwen3-Omni technical report (2025), §3.
    """
    frames = _frames(trace)
    tokens = table(trace, "tokens")
    reply = (
        tokens[equals(tokens["component"], "thinker") & equals(tokens["phase"], "decode")]
        if len(tokens)
        else tokens
    )
    reply = reply.sort_values("pos") if len(reply) else reply
    n = len(frames)
    pos = np.full(n, -1, dtype=np.int64)
    token_id = np.full(n, -1, dtype=np.int64)
    text = np.full(n, "", dtype=object)
    m = min(n, len(reply))
    if m:
        pos[:m] = reply["pos"].to_numpy()[:m]
        token_id[:m] = reply["token_id"].to_numpy()[:m]
        text[:m] = reply["text"].to_numpy(dtype=object)[:m]
    return pd.DataFrame(
        {
            "frame": frames,
            "start": frames * FRAME_SECONDS,
            "end": (frames + 1) * FRAME_SECONDS,
            "pos": pos,
            "token_id": token_id,
            "text": pd.Series(text, dtype=object),
        }
    )


def _frames(trace) -> np.ndarray:
    codes = table(trace, "codes")
    if len(codes):
        return np.unique(codes["frame"].to_numpy()).astype(np.int64)
    tokens = table(trace, "tokens")
    if len(tokens):
        speech = tokens[equals(tokens["modality"], "speech")]
        return np.unique(speech["frame"].to_numpy()).astype(np.int64)
    return np.zeros(0, dtype=np.int64)


def codebook_grid(trace) -> pd.DataFrame:
    """The frame × codebook grid of codes: one row per (frame, codebook), with the frame's time and
    the text being spoken (see spoken_text). Source: the multi-codebook codec layout of Qwen3-Omni's
    talker and code predictor (technical report, 2025, §3).
    """
    codes = table(trace, "codes")
    if len(codes) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in GRID_COLUMNS})
    spoken = spoken_text(trace).set_index("frame")["text"]
    grid = codes.sort_values(["frame", "codebook"]).reset_index(drop=True)
    frame = grid["frame"].to_numpy()
    return pd.DataFrame(
        {
            "frame": frame,
            "codebook": grid["codebook"].to_numpy(),
            "code": grid["code"].to_numpy(),
            "seconds": frame * FRAME_SECONDS,
            "text": pd.Categorical(spoken.reindex(frame).fillna("").to_numpy(dtype=object)),
        }
    )


def _audio(trace) -> tuple[np.ndarray | None, int]:
    audio = trace.get("audio") if isinstance(trace, dict) else getattr(trace, "audio", None)
    rate = trace.get("sample_rate") if isinstance(trace, dict) else getattr(trace, "sample_rate", None)
    rate = int(rate or meta(trace).get("sample_rate") or 24_000)
    if audio is None:
        return None, rate
    return np.asarray(audio, dtype=np.float32).reshape(-1), rate


def mel_spectrogram(
    trace, *, n_mels: int = 80, hop_seconds: float = 0.01, n_fft: int = 1024, top_db: float = 80.0
) -> pd.DataFrame:
    """The reply's log-mel spectrogram: one row per (time frame, mel band).

    Power mel spectrogram (librosa, `n_fft`, hop `hop_seconds`, `n_mels` bands up to Nyquist): db is
    relative to its own maximum, floored at -top_db; dbfs is absolute, relative to the loudest mel
    cell of a full-scale (amplitude 1) 1 kHz sine at the same settings, floored at DBFS_FLOOR, so
    near-silence reads as near-silence and two clips compare on one scale. hz is each band's centre
    frequency, seconds each frame's centre. Empty when the trace has no audio. Source:
    librosa.feature.melspectrogram (McFee et al., 2015); the mel scale of Stevens et al. (1937).
    """
    audio, rate = _audio(trace)
    if audio is None or len(audio) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in MEL_COLUMNS})
    import librosa

    # dB are relative to the maximum, so scaling the audio changes nothing but librosa's 1e-10 power
    # floor: without it, quiet speech (random-weight talkers peak near 1e-6) would floor to one flat value.
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio / peak
    hop = max(int(round(hop_seconds * rate)), 1)
    n_fft = min(n_fft, max(len(audio), 16))
    power = librosa.feature.melspectrogram(
        y=audio, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, fmax=rate / 2
    )
    db = librosa.power_to_db(power, ref=np.max, top_db=top_db)
    reference = _full_scale_power(rate, n_fft, hop, n_mels)
    with np.errstate(divide="ignore"):
        dbfs = (
            10 * np.log10(np.maximum(power, 1e-30) * peak**2 / reference)
            if peak > 0
            else np.full_like(power, -np.inf)
        )
    dbfs = np.maximum(dbfs, DBFS_FLOOR)
    hz = librosa.mel_frequencies(n_mels=n_mels, fmin=0.0, fmax=rate / 2)
    frames = db.shape[1]
    mel_index, frame_index = np.meshgrid(np.arange(n_mels), np.arange(frames), indexing="ij")
    return pd.DataFrame(
        {
            "frame": frame_index.ravel(),
            "seconds": frame_index.ravel() * hop / rate,
            "mel": mel_index.ravel(),
            "hz": hz[mel_index.ravel()],
            "db": db.ravel().astype(np.float32),
            "dbfs": dbfs.ravel().astype(np.float32),
        }
    ).sort_values(["frame", "mel"], ignore_index=True)


@functools.cache
def _full_scale_power(rate: int, n_fft: int, hop: int, n_mels: int) -> float:
    """The loudest mel power of a full-scale 1 kHz sine (0 dBFS) at these settings."""
    import librosa

    seconds = max(4 * n_fft / rate, 0.25)
    tone = np.sin(2 * np.pi * 1000.0 * np.arange(int(seconds * rate)) / rate).astype(np.float32)
    power = librosa.feature.melspectrogram(
        y=tone, sr=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, fmax=rate / 2
    )
    return float(power.max())


def waveform_envelope(trace, *, points: int = 2000) -> pd.DataFrame:
    """The reply's waveform reduced to `points` bins: each bin's time and its lowest and highest sample
    (what a waveform plot draws, without shipping every sample to the browser). Source: the min/max
    envelope of audio editors' overview displays.
    """
    audio, rate = _audio(trace)
    if audio is None or len(audio) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in WAVE_COLUMNS})
    bins = int(min(points, len(audio)))
    edges = np.linspace(0, len(audio), bins + 1).astype(np.int64)
    low = np.minimum.reduceat(audio, edges[:-1])
    high = np.maximum.reduceat(audio, edges[:-1])
    return pd.DataFrame({"seconds": edges[:-1] / rate, "low": low, "high": high})


def residual_audio(lab, trace_or_codes, *, keep: int) -> np.ndarray:
    """The reply's speech re-synthesized from codebooks 0..keep-1 only: 24 kHz float32 audio.

    What each residual codebook adds: code2wav embeds a frame's 16 codes and averages them; dropping
    codebooks k..15 zeroes their embeddings (the divisor stays 16), which is residual-VQ truncation
    as in SoundStream (Zeghidour et al., 2021) and EnCodec (Défossez et al., 2022): codebook 0 alone
    is the coarse speech, each further one a refinement. keep=16 is the model's own decode (equal to
    the reply's audio). `trace_or_codes`: a Trace (its codes table), a Reply (its codes) or an array
    [frames, 16]. This runs the model's code2wav (see `omnilab.instrument.codec`).
    """
    from ..instrument.codec import decode_codes

    return decode_codes(lab, codes_array(trace_or_codes), keep=keep)


def residual_series(lab, trace_or_codes, keeps=range(1, 17)) -> dict[int, np.ndarray]:
    """`residual_audio` for each number of kept codebooks in `keeps`: {keep: audio}."""
    codes = codes_array(trace_or_codes)
    return {int(k): residual_audio(lab, codes, keep=k) for k in keeps}


def codes_array(source) -> np.ndarray:
    """The codec frames of a Trace (codes table), a Reply (codes) or an array, as [frames, codebooks]."""
    if isinstance(source, np.ndarray) or hasattr(source, "detach") or isinstance(source, (list, tuple)):
        array = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
        return array.reshape(0, 16) if array.size == 0 else array
    if hasattr(source, "token_ids") and hasattr(source, "codes"):  # a Reply
        if source.codes is None:
            raise TraceError("this reply has no speech codes: generate it with return_audio=True")
        return np.asarray(source.codes)
    codes = table(source, "codes")
    if len(codes) == 0:
        raise TraceError("this trace has no speech codes: trace a reply generated with return_audio=True")
    frame = codes["frame"].to_numpy(dtype=np.int64)
    book = codes["codebook"].to_numpy(dtype=np.int64)
    frames, books = int(frame.max()) + 1, int(book.max()) + 1
    array = np.full((frames, books), -1, dtype=np.int64)
    array[frame, book] = codes["code"].to_numpy(dtype=np.int64)
    if len(codes) != frames * books or (array < 0).any():
        raise TraceError(
            f"the codes table is incomplete: {len(codes)} rows for {frames} frames × {books} codebooks"
        )
    return array
