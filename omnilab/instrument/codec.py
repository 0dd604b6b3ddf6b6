"""code2wav from outside generation: decode codec frames, optionally with residual codebooks dropped.

Qwen3-Omni's code2wav (`Qwen3OmniMoeCode2Wav`) embeds a frame's 16 codes with one table
(`code_embedding`, codebook j's codes offset by j × codebook_size), averages the 16 vectors, and
decodes the result (transformer, upsampling, vocoder). The codes are residual: codebook 0 (from the
talker) is coarse, codebooks 1-15 (from the code predictor) refine it. As in any residual VQ
(SoundStream, EnCodec), reconstructing from the first k codebooks means summing only their vectors
— the dropped ones contribute nothing. So `keep=k` zeroes the embeddings of codebooks k..15 at the
output of `code_embedding` (a forward hook) and leaves the average's divisor at 16: the mean is the
sum scaled by the fixed 1/16 the model learned with, and keep=16 is the model's own decode exactly.
Renormalizing by k instead would amplify the coarse codes, which no trained decoder has seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import InterventionError, TraceError

CHUNK_FRAMES = 300  # what Qwen3OmniMoeForConditionalGeneration.generate decodes with
LEFT_CONTEXT_FRAMES = 25


def code2wav_of(lab_or_model) -> torch.nn.Module:
    """The code2wav module of an OmniLab or a full model, or a clear error when it has none."""
    model = lab_or_model if isinstance(lab_or_model, torch.nn.Module) else lab_or_model.model
    code2wav = getattr(model, "code2wav", None)
    if code2wav is None:
        raise InterventionError(
            "this model has no code2wav (a Thinking checkpoint, or loaded with talker=False); "
            "load it with talker=True to decode speech codes"
        )
    return code2wav


def num_codebooks(lab_or_model) -> int:
    return int(code2wav_of(lab_or_model).config.num_quantizers)


def decode_codes(lab_or_model, codes, *, keep: int | None = None) -> np.ndarray:
    """Decode codec frames [frames, 16] to 24 kHz float32 audio, as `generate` does.

    Same chunking as the model's generate (300-frame chunks, 25 frames of left context), no
    gradients, deterministic. keep: decode with codebooks 0..keep-1 only (see the module docstring);
    None or 16 = all.
    """
    code2wav = code2wav_of(lab_or_model)
    books = int(code2wav.config.num_quantizers)
    size = int(code2wav.config.codebook_size)
    array = np.asarray(codes.detach().cpu() if torch.is_tensor(codes) else codes)
    if array.ndim != 2 or array.shape[1] != books:
        raise TraceError(
            f"codes must be [frames, {books}] (one row per 80 ms frame); got shape {array.shape}"
        )
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= size):
        raise TraceError(f"codes must be integers in 0..{size - 1} (this code2wav's codebook size)")
    keep = books if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= books:
        raise InterventionError(f"keep must be an int in 1..{books} (codebooks kept, from 0); got {keep!r}")
    if array.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    device = next(code2wav.parameters()).device
    tensor = torch.as_tensor(array.astype(np.int64).T[None], device=device)  # [1, 16, frames]
    with kept_codebooks(code2wav, int(keep)), torch.inference_mode():
        wav = code2wav.chunked_decode(tensor, chunk_size=CHUNK_FRAMES, left_context_size=LEFT_CONTEXT_FRAMES)
    return wav.reshape(-1).float().cpu().numpy().astype(np.float32)


@contextlib.contextmanager
def kept_codebooks(code2wav: torch.nn.Module, keep: int) -> Iterator[None]:
    """While open, code2wav's code embedding gives zero vectors for codebooks keep..15."""
    books = int(code2wav.config.num_quantizers)
    if keep >= books:
        yield
        return

    def hook(module, args, output):
        # output [batch, codebooks, frames, hidden]: the embedding of codes + codebook offsets
        mask = torch.zeros(books, dtype=output.dtype, device=output.device)
        mask[:keep] = 1
        return output * mask.view(1, books, 1, 1)

    handle = code2wav.code_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
