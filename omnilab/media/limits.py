"""The limits every loader reads at call time; set them through `omnilab.media` (e.g. `media.MAX_AUDIO_SECONDS`)."""

SAMPLE_RATE = 16000
"""Rate of every waveform omnilab returns (Qwen3-Omni's audio encoder runs at 16 kHz)."""
MAX_AUDIO_SECONDS = 40 * 60
"""Longest audio accepted: 40 min, about what fits Qwen3-Omni's context."""
MIN_AUDIO_SAMPLES = 201
"""Shortest audio accepted, in samples at 16 kHz (12.6 ms): the Whisper feature extractor's STFT
reflect-pads n_fft // 2 = 200 samples on each side, which needs more input than that."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image accepted, in pixels, checked from the header before any pixel is decoded."""
MAX_VIDEO_FRAMES = 768
"""Most frames a video may give after sampling at `fps`."""
MAX_VIDEO_SECONDS = 40 * 60
"""Longest video accepted: 40 min."""
MAX_FILE_BYTES = 2 * 1024**3
"""Largest file `check_file` accepts by default: 2 GiB."""
