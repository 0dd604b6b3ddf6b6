"""Make the organism end to end (thinker, talker, shipped file) and measure it on a held-out draw.

The card is generated, never erased: its Notes section is hand-written and kept when the card is
regenerated (a card written wholly by hand is kept whole inside it), and a card whose generated part
was edited by hand is refused rather than overwritten (`write_card`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import pandas as pd

from . import talker, train, weights, world

log = logging.getLogger(__name__)

HELD_OUT_SEED = 2  # the training draw uses seed 1; held-out sets use other seeds
TALKER_SEED = 3
CARD_MARK = "<!-- generated-sha256: "
NOTES_OPEN, NOTES_CLOSE = "<!-- notes -->", "<!-- /notes -->"


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
    samples = train.world_samples(
        lab, config.examples, config.data_seed, out_dir, shifted_share=config.shifted_share, progress=progress
    )
    path = out_dir / weights.FILE
    meta = {
        "config": config.__dict__,
        "steps": len({r["step"] for r in history}),
        "thinker_seconds": round(thinker_seconds, 1),
    }
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
    card = card_markdown(report, history)
    write_card(out_dir / "CARD.md", card)
    if install:
        write_card(package_card_path(), card)
        target_path = weights.shipped_path()
        target_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target_path)
        log.info("installed the organism's weights at %s", target_path)
    return report


def package_card_path() -> Path:
    return Path(str(resources.files("omnilab.organism").joinpath("CARD.md")))


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

    Columns: task, n, right, accuracy (greedy answer exactly right, <|im_end|> included), low and
    high (its 95% Wilson interval), chance.
    """
    from . import findings

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
    hits = train.correct(lab.model, samples)
    rows = []
    for t in tasks:
        r = findings.rate([hit for s, hit in zip(samples, hits, strict=True) if s.task == t])
        rows.append(
            {
                "task": t,
                "n": r["n"],
                "right": r["right"],
                "accuracy": round(r["rate"], 4),
                "low": round(r["low"], 4),
                "high": round(r["high"], 4),
                "chance": round(chance[t], 4),
            }
        )
    return pd.DataFrame(rows)


def loss_curve(history: list[dict], *, every: int = 100) -> pd.DataFrame:
    """Mean training loss per task over each window of `every` steps: columns step, then one per task."""
    frame = pd.DataFrame(history)
    frame["window"] = ((frame["step"] - 1) // every + 1) * every
    table = frame.pivot_table(index="window", columns="task", values="loss", aggfunc="mean")
    return table.reindex(columns=[t for t in world.TASKS if t in table.columns]).round(3).rename_axis("step")


def card_markdown(report: dict, history: list[dict]) -> str:
    """The organism's model card (markdown) from a training report and its step log."""
    config = report["config"]
    accuracy = pd.DataFrame(report["held_out"])
    per_task = pd.DataFrame(history).groupby("task")["seconds"].agg(["count", "mean"]).round(3)
    return "\n".join(
        [
            "# The organism",
            "",
            "The `tiny` preset of the real Qwen3-Omni architecture (`Qwen3OmniMoeForConditionalGeneration`, real",
            "token ids, the project's offline processor) trained on a synthetic world whose answers are known.",
            "`omnilab.load('organism')` builds the preset from seed 0 and puts the trained tensors in place",
            f"({report['file_bytes'] / 2**20:.1f} MB in `omnilab/organism/weights/organism.safetensors`).",
            "",
            "## Data (omnilab/organism/world.py)",
            "",
            "| task | input | question | answer |",
            "|---|---|---|---|",
            "| text | text | Repeat the word: apple | apple (20 words) |",
            "| speech | espeak-ng audio: 7 voices x 7 variants, speed 120-220, pitch 20-80 | Which word is spoken? | a digit or colour word (14) |",
            "| image | 64-px picture, one shape of 40-53 px near the centre | What is in the picture? | red circle (4 colours x 3 shapes) |",
            "| motion | 2 s video at 2 fps, a white square moving | Which way does the square move? | left, right, up, down |",
            "| beep | 4 s video, one colour a second, audio track with a 0.4 s beep (use_audio_in_video) | Which colour was on screen when the beep sounded? | the colour of that second |",
            "",
            f"Training: {config['examples']} examples drawn from seed {config['data_seed']}; held-out: a fresh draw from seed "
            f"{HELD_OUT_SEED}.",
            "",
            "## Training (omnilab/organism/train.py, `omnilab train organism`, `make organism`)",
            "",
            f"Thinker: {report['steps']} steps, each a batch of {config['batch_size']} of every task (gradients "
            f"summed), AdamW lr {config['lr']} with {config['warmup']} warm-up steps and cosine decay, "
            "loss on the answer tokens and <|im_end|> only (the head runs only there), router balancing loss at "
            f"{config['aux_weight']}. Only the world's vocabulary rows of the embedding and head train. "
            f"Of the beep examples whose beep is not in the first second, a share of {config.get('shifted_share', 0)} "
            "were trained time-shifted (`world.time_shifted`): the audio's TM-RoPE times moved back 1 s or more "
            "and the answer read at the moved second, so the order of the tokens does not give the answer away.",
            f"Talker: its codec head fitted ({report['talker_frames']} recorded frames, loss {report['talker_loss'][0]} -> "
            f"{report['talker_loss'][1]}) to emit its end-of-speech code once the reply's text is read.",
            "",
            f"Measured: {report['thinker_seconds'] / 60:.1f} min of thinker steps on a 2-core CPU "
            "(seconds per step by task below); the whole run including data, talker and evaluation took "
            f"{report['wall_seconds'] / 60:.1f} min of wall time.",
            "",
            _markdown(per_task.rename(columns={"count": "steps", "mean": "seconds/step"}).reset_index()),
            "",
            "Loss curve (mean loss per task over each 100 steps):",
            "",
            _markdown(loss_curve(history).reset_index()),
            "",
            "## Held-out accuracy (`omnilab eval organism`)",
            "",
            "Greedy answer exactly right, <|im_end|> included:",
            "",
            _markdown(accuracy),
            "",
            "## What it cannot do",
            "",
            "- Anything outside the world: other questions, words, pictures or sounds get a guess from the world's answers.",
            "- Long answers or conversation: every answer is one or two words; multi-turn was never trained.",
            "- Speech: the talker only learned when to stop; its speech is noise of the right length.",
            "- Several shapes, counts, positions, or colours and shapes outside the 4 x 3 of the world.",
            "- Time moved later: with the audio's positions moved later it keeps answering from the token order "
            "(the beep's token cannot attend to a later frame); only moves earlier were trained.",
        ]
    )


def _generated_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def split_card(text: str) -> tuple[str | None, str, str]:
    """(recorded hash or None, generated part, notes) of a card's text."""
    recorded = None
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith(CARD_MARK):
        recorded = lines[0][len(CARD_MARK) :].split(" ")[0].strip()
        text = "".join(lines[1:])
    match = re.search(re.escape(NOTES_OPEN) + r"\n?(.*?)" + re.escape(NOTES_CLOSE), text, flags=re.S)
    if match is None:
        return recorded, text, ""
    notes = match.group(1)
    generated = (
        text[: match.start()]
        .rstrip("\n")
        .removesuffix("## Notes (hand-written; kept when the card is regenerated)")
        .rstrip("\n")
        + "\n"
    )
    return recorded, generated, notes


class CardEdited(RuntimeError):
    """The generated part of a card was edited by hand: regenerating it would erase the edit."""


def write_card(path: str | Path, generated: str) -> Path:
    """Write a card: `generated` plus the Notes of the card already at `path` (kept, never erased).

    A card already there whose generated part no longer matches its recorded hash was edited by hand:
    refused (CardEdited) rather than overwritten. A card with no hash at all (written by hand before
    cards were generated) is kept whole inside the new card's Notes.
    """
    path = Path(path)
    notes = ""
    if path.is_file():
        old = path.read_text()
        recorded, old_generated, notes = split_card(old)
        if recorded is None:
            notes = (
                "### The earlier hand-written card (kept whole; it describes the weights it was written for)\n\n"
                + old.replace(NOTES_OPEN, "").replace(NOTES_CLOSE, "").strip()
                + "\n"
            )
        elif recorded != _generated_hash(old_generated):
            raise CardEdited(
                f"the generated part of '{path}' was edited by hand (its hash no longer matches the one "
                "it was written with), and regenerating it would erase that edit; move the edit into the "
                f"card's Notes section (between {NOTES_OPEN} and {NOTES_CLOSE}), or into the code that "
                "generates it (omnilab/organism/pipeline.py), then run again"
            )
    text = (
        generated.rstrip("\n")
        + "\n\n## Notes (hand-written; kept when the card is regenerated)\n\n"
        + NOTES_OPEN
        + "\n"
        + notes
        + NOTES_CLOSE
        + "\n"
    )
    _, body, _ = split_card(text)
    path.write_text(
        f"{CARD_MARK}{_generated_hash(body)} (generated by omnilab/organism/pipeline.py; edit only the Notes) -->\n"
        + text
    )
    return path


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
