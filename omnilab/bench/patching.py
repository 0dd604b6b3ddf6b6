"""`sweep_speedup`: a patching sweep batched over patches vs one forward per patch (TransformerLens'
way), 8 layers x 16 position groups on `small` over ~512 mixed tokens, clean vs a blank image of the
same size. The lead wires it into `omnilab bench activations`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image

from ..analysis.patching import patching_sweep, position_groups
from ._common import _sync, load_lab, mixed_conversation


def blank_image_twin(conversation: list[dict], directory: Path) -> list[dict]:
    """`conversation` with each image replaced by a black image of the same size (aligned for patching)."""
    out = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for i, part in enumerate(content):
                if part.get("type") == "image":
                    image = Image.open(part["image"])
                    path = directory / f"blank_{len(out)}_{i}.png"
                    Image.new(image.mode, image.size).save(path)
                    part = {**part, "image": str(path)}
                parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out


def sweep_speedup(
    lab=None, *, model: str = "small", device: str | None = None, tokens: int = 512, groups: int = 16,
    per_patch_sample: int | None = 32,
) -> dict:  # fmt: skip
    """Seconds of the batched sweep and of one forward per patch, and their ratio (target ≥ 4).

    per_patch_sample: time only that many per-patch forwards, spread over layers and groups, and
    scale to all patches (None: all 128; a per-patch forward costs the same whichever patch it carries).
    Returns model, tokens, layers, groups, patches, batched_s, per_patch_s, per_patch_timed,
    speedup, max_abs_diff (of the metric, over the patches timed both ways).
    """
    lab = lab or load_lab(model, device)
    conversation = mixed_conversation(lab, tokens)
    layers = len(lab.thinker.model.language_model.layers)
    sites = [f"resid.{i}" for i in range(min(layers, 8))]
    with tempfile.TemporaryDirectory() as tmp:
        corrupted = blank_image_twin(conversation, Path(tmp))
        args = (lab, conversation, corrupted, 0)
        patching_sweep(*args, sites=sites[:1], positions=2)  # warm-up: kernels, media caches
        _sync()
        start = time.perf_counter()
        batched = patching_sweep(*args, sites=sites, positions=groups)
        _sync()
        batched_s = time.perf_counter() - start
        ids = lab.prepare(conversation)["input_ids"][0]
        chosen = position_groups(lab, ids, groups)
        if per_patch_sample is not None:  # spread the sample over layers and groups
            step = max(1, len(batched) // per_patch_sample)
            rows = list(range(0, len(batched), step))[:per_patch_sample]
        else:
            rows = list(range(len(batched)))
        picked = {(batched["site"][r], batched["group"][r]) for r in rows}
        positions = {g.label: g.positions.tolist() for g in chosen if any(g.label == p[1] for p in picked)}
        sample_sites = sorted({p[0] for p in picked}, key=sites.index)
        _sync()
        start = time.perf_counter()
        one = patching_sweep(*args, sites=sample_sites, positions=positions, batched=False)
        _sync()
        timed_s = time.perf_counter() - start
    full = batched.set_index(["site", batched["group"].astype(str)])["metric"]
    mine = one.set_index(["site", one["group"].astype(str)])["metric"]
    patches = len(batched)
    per_patch_s = timed_s / len(one) * patches
    return {
        "model": lab.model_id,
        "tokens": int(ids.shape[0]),
        "layers": len(sites),
        "groups": len(chosen),
        "patches": patches,
        "batched_s": batched_s,
        "per_patch_s": per_patch_s,
        "per_patch_timed": len(one),
        "speedup": per_patch_s / batched_s,
        "max_abs_diff": float((full.loc[mine.index] - mine).abs().max()),
    }
