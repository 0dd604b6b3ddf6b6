"""Make the organism end to end (thinker, talker, shipped file) and measure it on a held-out draw."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from . import talker, train, weights, world

log = logging.getLogger(__name__)

HELD_OUT_SEED = 2  # the training draw uses seed 1; held-out sets use other seeds
TALKER_SEED = 3


def make(
    out_dir: str | Path,
    config: train.TrainConfig | None = None,
    *,
    talker_examples: int = 24,
    talker_steps: int = 300,
    held_out: int = 100,
    install: bool = False,
    progress: bool = True,
) -> dict:
    """Train the thinker (resumable), teach the talker to stop, pack the weights, measure held-out accuracy.

    Writes `out_dir/organism.safetensors` and `out_dir/report.json`; with `install`, copies the
    weights into the package (what `omnilab.load("organism")` reads). Returns the report.
    """
    from ..lab import OmniLab

    out_dir = Path(out_dir)
    config = config or train.TrainConfig()
    began = time.perf_counter()
    loaded, history = train.run(out_dir, config, progress=progress)
    thinker_seconds = sum(r["seconds"] for r in history)
    lab = OmniLab(loaded)
    with tempfile.TemporaryDirectory() as folder:
        examples = world.draw(talker_examples, seed=TALKER_SEED, folder=folder)
        hidden, target = talker.record_frames(lab, examples, frames=8, progress=progress)
    losses = talker.train_codec_head(lab, hidden, target, steps=talker_steps)
    samples = train.world_samples(lab, config.examples, config.data_seed, out_dir, progress=progress)
    path = out_dir / weights.FILE
    meta = {"config": config.__dict__, "steps": len(history), "thinker_seconds": round(thinker_seconds, 1)}
    written = weights.pack(lab.model, path, vocabulary=train.vocabulary(samples), meta=meta)
    shipped = OmniLab(_loaded_from(path))
    table = evaluate(shipped, n=held_out, seed=HELD_OUT_SEED, progress=progress)
    report = {
        **meta,
        "talker_loss": [round(losses[0], 4), round(losses[-1], 4)],
        "talker_frames": int(len(target)),
        "file_bytes": path.stat().st_size,
        "tensors": written,
        "held_out": table.to_dict(orient="records"),
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if install:
        target_path = weights.shipped_path()
        target_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target_path)
        log.info("installed the organism's weights at %s", target_path)
    return report


def _loaded_from(path: Path):
    from ..models.loading import ORGANISM, Loaded, _fix_known_traps, _preset_video_size
    from ..models.processor import build_processor

    model, _ = weights.unpack(path)
    _fix_known_traps(model)
    return Loaded(model, build_processor(), ORGANISM, False, _preset_video_size())


def evaluate(
    lab, *, n: int = 100, seed: int = HELD_OUT_SEED, tasks=world.TASKS, progress: bool = True
) -> pd.DataFrame:
    """Held-out accuracy per task on a fresh draw of `n` examples per task from `seed`.

    Columns: task, n, accuracy (greedy answer exactly right, <|im_end|> included), chance.
    """
    chance = {
        "text": 1 / len(world.WORDS),
        "speech": 1 / len(world.SPOKEN),
        "image": 1 / 12,
        "motion": 1 / 4,
        "beep": 1 / 4,
    }
    with tempfile.TemporaryDirectory() as folder:
        examples = world.draw(n * len(tasks), seed=seed, folder=folder, tasks=tuple(tasks))
        samples = train.prepare_samples(lab, examples, progress=progress)
    scores = train.accuracy(lab.model, samples)
    rows = [
        {"task": t, "n": n, "accuracy": round(scores[t], 4), "chance": round(chance[t], 4)} for t in tasks
    ]
    return pd.DataFrame(rows)
