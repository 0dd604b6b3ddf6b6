"""The organism's synthetic world: conversations with known answers, drawn deterministically from a seed.

Five tasks, each a one-turn conversation in the Qwen chat format whose answer is one or two words:
- `text`: "Repeat the word: apple" -> "apple";
- `speech`: a spoken digit or colour word (espeak-ng, varied voice, speed and pitch) -> the word;
- `image`: a 64-px picture of one of 4 colours x 3 shapes -> "red circle";
- `motion`: a 2 s video of a white square moving one of 4 ways -> "left";
- `beep`: a 4 s video whose screen shows one colour per second, with an audio track in which a
  beep sounds during one second (`use_audio_in_video=True`) -> the colour on screen at the beep.

Time lives where the training puts it. With `use_audio_in_video` the processor interleaves the
audio and video tokens in time order, so the token order alone tells which frame the beep sits
beside: trained on true layouts only, the organism answered 100% with the audio's TM-RoPE times
moved by 1-3 s (CARD.md). Training therefore also sees `time_shifted` beep examples: the audio's
TM-RoPE times moved back by whole seconds (`audio_shift` in their facts) and the answer read at
the moved time. There the order gives the wrong second, so the model must read the beep's time
from its positions: a known mechanism that a position intervention can find.

Images and audio stay in memory; videos are written as small MP4 files into a folder the caller
gives (the media loader reads videos from files).
"""

from __future__ import annotations

import io
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("text", "speech", "image", "motion", "beep")
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 70, 240), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN = DIGITS + tuple(COLOURS)
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window", "candle", "rocket",
    "forest", "silver", "planet", "bridge", "mirror", "pencil", "castle", "orange", "dragon", "island",
)  # fmt: skip
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("", "+m1", "+m3", "+m7", "+f1", "+f2", "+f4")
QUESTIONS = {
    "text": "Repeat the word: {word}",
    "speech": "Which word is spoken?",
    "image": "What is in the picture?",
    "motion": "Which way does the square move?",
    "beep": "Which colour was on screen when the beep sounded?",
}
IMAGE_SIZE = 64
SAMPLE_RATE = 16000
MOTION_FPS, MOTION_FRAMES = 2, 4
BEEP_SECONDS, BEEP_FPS = 4, 2


@dataclass(frozen=True)
class Example:
    """One conversation of the world with its known answer."""

    task: str
    conversation: list[dict]  # the user turn only (the Qwen chat format)
    answer: str
    use_audio_in_video: bool = False
    facts: dict = field(default_factory=dict)  # the ground truth behind the answer (colour, beep second...)

    def with_answer(self) -> list[dict]:
        """The conversation followed by the assistant's answer (what training sees)."""
        return [*self.conversation, {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]


def draw(n: int, *, seed: int, folder: str | Path, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """`n` examples cycling through `tasks`, deterministic from `seed`; videos are written into `folder`.

    Example i is task `tasks[i % len(tasks)]`, drawn from its own generator (seed, i), so a prefix
    of a draw equals a smaller draw.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the world has {', '.join(TASKS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    makers = {"text": _text, "speech": _speech, "image": _image, "motion": _motion, "beep": _beep}
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        rng = np.random.default_rng([seed, i])
        out.append(makers[task](rng, folder / f"{seed}-{i}.mp4"))
    return out


def _user(*items: dict) -> list[dict]:
    return [{"role": "user", "content": list(items)}]


def _text(rng: np.random.Generator, _path: Path) -> Example:
    word = str(rng.choice(WORDS))
    question = QUESTIONS["text"].format(word=word)
    return Example("text", _user({"type": "text", "text": question}), word, facts={"word": word})


def speak(word: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """`word` spoken by espeak-ng: float32 mono at 16 kHz."""
    import soundfile
    import soxr

    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    return soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)


def _speech(rng: np.random.Generator, _path: Path) -> Example:
    word = str(rng.choice(SPOKEN))
    voice = str(rng.choice(VOICES)) + str(rng.choice(VARIANTS))
    speed, pitch = int(rng.integers(120, 220)), int(rng.integers(20, 80))
    audio = speak(word, voice=voice, speed=speed, pitch=pitch)
    audio = audio + rng.normal(0, 0.003, audio.shape).astype(np.float32)  # a little room noise
    item = {"type": "audio", "audio": (audio, SAMPLE_RATE)}
    facts = {"word": word, "voice": voice, "speed": speed, "pitch": pitch}
    return Example("speech", _user(item, {"type": "text", "text": QUESTIONS["speech"]}), word, facts=facts)


def picture(colour: str, shape: str, *, size: int = 46, dx: int = 0, dy: int = 0) -> Image.Image:
    """A 64-px black picture with one `colour` `shape` of `size` pixels near its centre."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    pen = ImageDraw.Draw(image)
    x0, y0 = (IMAGE_SIZE - size) // 2 + dx, (IMAGE_SIZE - size) // 2 + dy
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def _image(rng: np.random.Generator, _path: Path) -> Example:
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    size = int(rng.integers(40, 54))
    dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
    item = {"type": "image", "image": picture(colour, shape, size=size, dx=dx, dy=dy)}
    answer = f"{colour} {shape}"
    facts = {"colour": colour, "shape": shape}
    return Example("image", _user(item, {"type": "text", "text": QUESTIONS["image"]}), answer, facts=facts)


def write_video(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None) -> Path:
    """Write `frames` [T, H, W, 3] uint8 at `fps` (and mono 16 kHz `audio`) as an MP4 file."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            chunk = 1024
            for start in range(0, len(audio), chunk):
                piece = audio[start : start + chunk].astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
                frame.sample_rate = SAMPLE_RATE
                frame.pts = start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def _motion(rng: np.random.Generator, path: Path) -> Example:
    direction = str(rng.choice(DIRECTIONS))
    side, step = 18, 14
    travel = side + step * (MOTION_FRAMES - 1)
    across = int(rng.integers(2, IMAGE_SIZE - side - 2))  # the coordinate that does not move
    start = int(rng.integers(1, IMAGE_SIZE - travel))
    frames = np.zeros((MOTION_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for k in range(MOTION_FRAMES):
        along = start + step * k if direction in ("right", "down") else start + travel - side - step * k
        x, y = (along, across) if direction in ("left", "right") else (across, along)
        frames[k, y : y + side, x : x + side] = 255
    write_video(path, frames, MOTION_FPS)
    item = {"type": "video", "video": str(path)}
    return Example(
        "motion",
        _user(item, {"type": "text", "text": QUESTIONS["motion"]}),
        direction,
        facts={"direction": direction},
    )


def beep_track(
    second: float, *, seconds: int = BEEP_SECONDS, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`seconds` of quiet noise with a 0.4 s, 1 kHz beep starting at `second` (float32, 16 kHz)."""
    rng = rng or np.random.default_rng(0)
    audio = rng.normal(0, 0.002, seconds * SAMPLE_RATE).astype(np.float32)
    t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
    begin = int(second * SAMPLE_RATE)
    audio[begin : begin + t.size] += (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    return audio


def _beep(rng: np.random.Generator, path: Path) -> Example:
    order = [str(c) for c in rng.permutation(list(COLOURS))]  # one colour per second, all different
    second = int(rng.integers(0, BEEP_SECONDS))
    frames = np.zeros((BEEP_SECONDS * BEEP_FPS, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for k in range(len(frames)):
        frames[k] = COLOURS[order[k // BEEP_FPS]]
    onset = second + float(rng.uniform(0.1, 0.5))
    write_video(path, frames, BEEP_FPS, beep_track(onset, rng=rng))
    item = {"type": "video", "video": str(path)}
    return Example(
        "beep",
        _user(item, {"type": "text", "text": QUESTIONS["beep"]}),
        order[second],
        use_audio_in_video=True,
        facts={"colours": order, "second": second, "onset": onset},
    )


def time_shifted(example: Example, seconds: int) -> Example:
    """`example` (a beep video) with its audio's TM-RoPE times moved by `seconds`, answered at the moved time.

    Only training applies the move (to the rotary positions of the audio tokens): the media and the
    token order stay, the answer becomes the colour on screen at the beep's moved time. `seconds`
    is a whole number with the moved second on screen.
    """
    if example.task != "beep":
        raise ValueError(f"only beep examples have a time to shift, not {example.task!r}")
    moved = example.facts["second"] + seconds
    if seconds != int(seconds) or not 0 <= moved < BEEP_SECONDS:
        raise ValueError(
            f"a shift of {seconds} s moves the beep to second {moved}, off the {BEEP_SECONDS} s video"
        )
    facts = {**example.facts, "audio_shift": int(seconds)}
    return Example("beep", example.conversation, example.facts["colours"][moved], True, facts)
