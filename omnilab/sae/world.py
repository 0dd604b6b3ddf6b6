"""The organism's world as a store: examples written as a manifest (facts kept), collected, factors read back.

    examples = world.draw(120, seed=11, folder="runs/media", split="held_out")
    store = collect_world(lab, examples, "runs/world", sites=("resid.1", "resid.3"))
    factors = world_factors(store)      # sample_id, task, factor, value: the truth each input carries

Each example's task, answer and facts go into the manifest line beside its conversation, so the
store's `samples.extra` holds them; `world_factors` turns them into the factors an SAE is scored
against (`analysis.sae_factor_scores`):
- image: `colour` (red, green, blue, yellow) and `shape` (circle, square, triangle);
- speech: `digit` (zero..nine) or `colour` (a spoken colour word);
- motion: `direction` (left, right, up, down);
- beep: `second` (0..3, when the beep sounds) and `colour` (on screen at the beep: the answer);
- text: `word` (the copied word; pairs are left out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..organism import world

FACTORS = ("colour", "shape", "digit", "direction", "second", "word")
TASKS = ("text", "speech", "image", "motion", "beep")  # the world's tasks that carry factors


def draw_world(n: int, *, seed: int, folder, tasks=TASKS, split: str = "held_out") -> list[world.Example]:
    """`n` examples of `tasks` from the world's `split` (where the world has splits), from `seed`."""
    import inspect

    if "split" in inspect.signature(world.draw).parameters:
        return world.draw(n, seed=seed, folder=folder, tasks=tuple(tasks), split=split)
    return world.draw(n, seed=seed, folder=folder, tasks=tuple(tasks))


def world_manifest(examples: list[world.Example], folder) -> Path:
    """Write `examples` as `folder/manifest.jsonl` with their media files beside it; returns its path.

    Ids are "{task}-{i}"; each line keeps `task`, `answer` and `facts` (the store's samples.extra).
    """
    import soundfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, example in enumerate(examples):
        sample_id = f"{example.task}-{i}"
        content = []
        for item in example.conversation[0]["content"]:
            kind = item["type"]
            if kind == "image" and not isinstance(item["image"], str):
                name = f"{sample_id}.png"
                item["image"].save(folder / name)
                item = {"type": "image", "image": name}
            elif kind == "audio" and not isinstance(item["audio"], str):
                samples, rate = item["audio"]
                name = f"{sample_id}.wav"
                soundfile.write(folder / name, np.asarray(samples, dtype=np.float32), rate)
                item = {"type": "audio", "audio": name}
            elif kind == "video":
                item = {"type": "video", "video": str(Path(item["video"]).resolve())}
            content.append(item)
        line = {
            "id": sample_id,
            "conversation": [{"role": "user", "content": content}],
            "use_audio_in_video": example.use_audio_in_video,
            "task": example.task,
            "answer": example.answer,
            "facts": _plain(example.facts),
        }
        lines.append(json.dumps(line))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def collect_world(
    lab,
    examples: list[world.Example],
    out,
    *,
    sites=("resid.*",),
    media=None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Collect `examples` into a store at `out` with `sites`' activations (prefill of the prompt only).

    The manifest and media go to `media` (default: a folder `out`.media beside the store). Returns `out`.
    """
    from ..store import collect

    out = Path(out)
    media = Path(media) if media is not None else out.with_name(out.name + ".media")
    manifest = world_manifest(examples, media)
    summary = collect(
        manifest,
        out,
        model=lab,
        capture=("positions", *sites),
        batch_size=batch_size,
        progress=progress,
    )
    if summary["errors"]:
        from ..store import query

        failed = query(out, "SELECT line, reason FROM errors LIMIT 3").to_dict(orient="records")
        raise RuntimeError(f"{summary['errors']} world sample(s) failed to collect into '{out}': {failed}")
    return out


def example_factors(task: str, facts: dict) -> dict[str, str]:
    """The factors {factor: value} one example of `task` with `facts` carries (see the module)."""
    if task == "image":
        return {"colour": facts["colour"], "shape": facts["shape"]}
    if task == "speech":
        word = facts["word"]
        return {"digit": word} if word in world.DIGITS else {"colour": word}
    if task == "motion":
        return {"direction": facts["direction"]}
    if task == "beep":
        moved = facts["second"] + int(facts.get("audio_shift", 0))
        return {"second": str(moved), "colour": facts["colours"][moved]}
    if task == "text" and not facts.get("pair"):
        return {"word": facts["word"]}
    return {}


def world_factors(store) -> pd.DataFrame:
    """The world's factors of every sample of a `collect_world` store: sample_id, task, factor, value."""
    from ..store import query

    samples = query(store, "SELECT sample_id, extra FROM samples ORDER BY sample_id")
    rows = []
    for sample_id, extra in zip(samples["sample_id"], samples["extra"], strict=True):
        extra = json.loads(extra) if isinstance(extra, str) else (extra or {})
        if "task" not in extra or "facts" not in extra:
            continue
        for factor, value in example_factors(extra["task"], extra["facts"]).items():
            rows.append(
                {"sample_id": sample_id, "task": extra["task"], "factor": factor, "value": str(value)}
            )
    if not rows:
        raise ValueError(
            f"store '{store}' has no world facts in samples.extra; collect it with omnilab.sae.collect_world"
        )
    return pd.DataFrame(rows)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
