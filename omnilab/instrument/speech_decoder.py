"""Speech from codec frames as they come: code2wav decoded causally, a chunk at a time.

code2wav is causal: decoding new frames with enough frames of left context before them gives the
samples a full decode gives (to rounding). `exact_left_context` is that context; `SpeechDecoder`
takes one frame's 16 codes at a time and hands back the samples not sent before.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def exact_left_context(code2wav) -> int:
    """Frames of left context that make a causal code2wav decode equal a full one (to rounding).

    Each of the pre-transformer's sliding-window layers reaches `sliding_window - 1` frames further
    back, so the receptive field is layers × (window − 1) frames, plus a few for the convolutions
    after it (measured on the presets: 143 frames reach rounding level, 3e-7; the window alone, 72,
    leaves 3e-4 to 1e-3 relative error with random weights).
    """
    config = code2wav.config
    layers = sum(1 for kind in config.layer_types[: config.num_hidden_layers] if kind == "sliding_attention")
    if layers < config.num_hidden_layers or not config.sliding_window:
        return int(config.max_position_embeddings)  # a full-attention layer sees everything
    return layers * (int(config.sliding_window) - 1) + _CONV_CONTEXT_FRAMES


_CONV_CONTEXT_FRAMES = 8  # the causal convolutions after the transformer reach back < 8 frames
GROW_CAP_FRAMES = 32  # the largest chunk of chunk_frames="grow" (2.56 s of speech)


class SpeechDecoder:
    """Codec frames in, new audio samples out: code2wav decoded causally, a chunk at a time.

    Each decode covers the new frames plus up to `left_context` frames before them (default
    `exact_left_context`, so the samples equal a full decode's to rounding). A decode of n frames
    yields n × 1,920 samples minus a tail the causal transposed convolutions hold back until the
    next frame comes, so the decoder counts the samples it has sent and emits only those after them.
    The first decode runs as soon as `first_chunk_frames` frames are in, later ones every
    `chunk_frames`, or with `chunk_frames="grow"` after 1, 2, 4, 8 ... new frames (at most
    `GROW_CAP_FRAMES`): each chunk is then as long as all the audio sent before it, and the left
    context is paid about log2(n) + n / 32 times instead of n times.
    """

    def __init__(
        self,
        code2wav,
        *,
        left_context: int | None = None,
        chunk_frames: int | str = 1,
        first_chunk_frames: int = 1,
    ):
        self.code2wav = code2wav
        self.left_context = exact_left_context(code2wav) if left_context is None else int(left_context)
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames
        self.samples_per_frame = int(code2wav.total_upsample)
        self.frames: list[np.ndarray] = []
        self.frames_decoded = 0
        self.samples_sent = 0
        self.seconds: list[float] = []  # time of each decode

    @property
    def last_seconds(self) -> float:
        return self.seconds[-1] if self.seconds else 0.0

    def push(self, codes) -> np.ndarray | None:
        """Add one frame's 16 codes; the new samples if a chunk was due, else None."""
        self.frames.append(np.asarray(codes, dtype=np.int64).reshape(-1))
        return self._decode() if len(self.frames) - self.frames_decoded >= self._due() else None

    def _due(self) -> int:
        """New frames the next decode waits for."""
        if self.frames_decoded == 0:
            return self.first_chunk_frames
        if self.chunk_frames == "grow":
            return min(self.frames_decoded, GROW_CAP_FRAMES)  # as long as what was sent so far
        return self.chunk_frames

    def flush(self) -> np.ndarray | None:
        """Decode what is left; after the last frame this includes the tail held back so far."""
        return self._decode() if len(self.frames) > self.frames_decoded else None

    def _decode(self) -> np.ndarray:
        end = len(self.frames)
        first = max(0, self.frames_decoded - self.left_context)
        device = next(self.code2wav.parameters()).device
        codes = torch.from_numpy(np.stack(self.frames[first:end], axis=1)).unsqueeze(0).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            wav = self.code2wav(codes).reshape(-1).float().cpu().numpy()
        self.seconds.append(time.perf_counter() - started)
        offset = first * self.samples_per_frame  # where wav[0] sits in the whole reply
        chunk = np.ascontiguousarray(wav[self.samples_sent - offset :], dtype=np.float32)
        self.frames_decoded = end
        self.samples_sent += len(chunk)
        return chunk
