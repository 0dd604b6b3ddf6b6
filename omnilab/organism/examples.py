"""Example inputs of the organism's world as files: what the app offers one click away.

    rows = examples(folder)   # [{"task", "text", "image", "audio", "video", "use_audio_in_video", "answer"}]

One example of each task from the card's evaluation draw (seed 2; not held out by construction), its media written into `folder`
(PNG, 16 kHz WAV, MP4), so a file input can take it as a user's upload.
"""

from __future__ import annotations

from pathlib import Path

import soundfile

from . import world

SEED = 2  # the card's evaluation seed: a separate draw, but not held out by construction (it may
# repeat training inputs: same templates, vocabulary and ranges)

BANNER = (
    "**The organism**: Qwen3-Omni's real architecture at toy size, trained here on a synthetic world "
    "(omnilab/organism/CARD.md). It answers five questions, in one or two words: *Repeat the word: "
    "apple* (20 words), *Which word is spoken?* (a spoken digit or colour), *What is in the picture?* "
    "(red/green/blue/yellow circle/square/triangle), *Which way does the square move?* (a video), and "
    '*Which colour was on screen when the beep sounded?* (a video with its audio: tick "use the '
    "video's audio\"; it reads the beep's time from its TM-RoPE positions). It answers 99-100% of its "
    "evaluation draw, which repeats many training inputs (not held out by construction). Anything else gets a guess from those "
    "answers, and its speech is noise of the right length. Try an example below."
)


def examples(folder: str | Path) -> list[dict]:
    """One example of each task from the evaluation draw with its media as files in `folder` (see the module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for example in world.draw(len(world.TASKS), seed=SEED, folder=folder):
        row = {"task": example.task, "text": "", "image": None, "audio": None, "video": None}
        for item in example.conversation[0]["content"]:
            kind = item["type"]
            if kind == "text":
                row["text"] = item["text"]
            elif kind == "image":
                row["image"] = str(folder / f"{example.task}.png")
                item["image"].save(row["image"])
            elif kind == "audio":
                row["audio"] = str(folder / f"{example.task}.wav")
                samples, rate = item["audio"]
                soundfile.write(row["audio"], samples, rate)
            elif kind == "video":
                row["video"] = str(item["video"])
        rows.append({**row, "use_audio_in_video": example.use_audio_in_video, "answer": example.answer})
    return rows
