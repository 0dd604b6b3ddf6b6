#!/usr/bin/env bash
# Regenerate omnilab's sample media in data/ (speech.wav, image.png, video.mp4).
# Needs: espeak-ng, sox, ffmpeg (with libx264) and a Python with Pillow.
# Usage: bash data/make_samples.sh [python]   (default python: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${1:-../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

# speech.wav: espeak-ng speaks at 22.05 kHz; sox resamples to 16 kHz mono 16-bit
# without dither (-D), so the bytes are the same on every run.
RAW="$(mktemp --suffix=.wav)"
trap 'rm -f "$RAW"' EXIT
espeak-ng -v en-us -s 200 -w "$RAW" \
  "The quick brown fox jumps over the lazy dog. Qwen three omni listens and speaks."
sox -D "$RAW" -r 16000 -c 1 -b 16 speech.wav

# image.png: 256x192 shapes and text, drawn with Pillow (no randomness, no system fonts).
"$PYTHON" - <<'PY'
from PIL import Image, ImageDraw, ImageFont

image = Image.new("RGB", (256, 192), (235, 240, 250))
draw = ImageDraw.Draw(image)
draw.rectangle((16, 16, 112, 96), fill=(220, 40, 40), outline=(0, 0, 0), width=2)
draw.ellipse((136, 20, 236, 120), fill=(40, 120, 220), outline=(0, 0, 0), width=2)
draw.polygon([(40, 176), (96, 112), (152, 176)], fill=(40, 170, 70), outline=(0, 0, 0))
draw.line((164, 176, 244, 176), fill=(250, 180, 0), width=5)
draw.text((172, 150), "omnilab", fill=(0, 0, 0), font=ImageFont.load_default(size=14))
image.save("image.png", optimize=True)
PY

# video.mp4: 2 s of ffmpeg's test pattern at 160x120, 10 fps, H.264 + the first 2 s of the
# speech as AAC (mono 16 kHz). Bit-exact flags and one thread keep the bytes reproducible.
ffmpeg -y -loglevel error \
  -f lavfi -i "testsrc=size=160x120:rate=10:duration=2" \
  -i speech.wav \
  -map 0:v -map 1:a -t 2 \
  -c:v libx264 -preset veryfast -crf 28 -pix_fmt yuv420p -threads 1 \
  -c:a aac -b:a 48k -ac 1 -ar 16000 \
  -fflags +bitexact -flags:v +bitexact -flags:a +bitexact -map_metadata -1 \
  -movflags +faststart \
  video.mp4

ls -l speech.wav image.png video.mp4
