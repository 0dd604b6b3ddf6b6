"""Shared pieces of the benchmarks: a mixed-modality prompt of a target length, and a timer."""

from __future__ import annotations

import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent.parent / "data"
_LABS: dict = {}


def load_lab(model: str, device: str | None = None):
    """`omnilab.load(model)` on `device` ("cuda", "cuda:1"; None: the CPU), loaded once per process
    so that benches run one after another (scripts/device_check.sh) share a real-size model."""
    key = (model, device)
    if key not in _LABS:
        from .. import load

        _LABS.clear()  # one model at a time: a real-size model fills a GPU
        _LABS[key] = load(model, device_map=device) if device else load(model)
    return _LABS[key]


def _sync() -> None:
    """Wait for queued GPU work, so that a timing covers it (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mixed_conversation(lab, target_tokens: int) -> list[dict]:
    """Audio + image + video + enough text that the prompt has about `target_tokens` tokens."""
    media = [
        {"type": "audio", "audio": str(DATA / "speech.wav")},
        {"type": "image", "image": str(DATA / "image.png")},
        {"type": "video", "video": str(DATA / "video.mp4")},
    ]
    words = []
    while True:
        conversation = [
            {"role": "user", "content": [*media, {"type": "text", "text": " ".join(words) or "Describe."}]}
        ]
        length = lab.prepare(conversation)["input_ids"].shape[1]
        if length >= target_tokens:
            return conversation
        words += ["describe what you hear and see"] * max(1, (target_tokens - length) // 6)


def best_of(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` runs of `fn` (seconds), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_interleaved(fns: dict, repeats: int = 5) -> dict[str, float]:
    """The fastest run of each of `fns` (seconds), run in turns so that load on a shared machine
    falls on all of them alike; one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}
