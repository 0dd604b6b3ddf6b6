"""Teach the organism's talker to stop: emit its end-of-speech code when the reply's text ends.

The talker reads one entry of the reply's text per frame, then the `tts_eos` marker, then pads.
A random talker never emits its end code, so its speech runs to the cap. We record, during real
greedy generations of the trained organism, the talker's last hidden state at every frame, and
fit its codec head (a linear layer, untied from the codec embedding) to give back its own greedy
code while text remains and the end code from the marker on. The hidden states before the end
do not change (their codes stay the same), so training on them is exact.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def record_frames(
    lab, examples, *, frames: int = 10, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generations of `examples`, each capped at `frames`: (hidden [N, d], target [N]).

    A frame's target is the talker's own greedy code while reply text remains, its end code after.
    """
    talker = lab.model.talker
    eos = int(lab.model.config.talker_config.codec_eos_token_id)
    vocab = talker.codec_head.out_features
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: vocab - 1024] = True  # generate suppresses the control codes, all but the end code
    hiddens, targets = [], []
    seen: list[torch.Tensor] = []
    handle = talker.codec_head.register_forward_pre_hook(
        lambda m, args: seen.append(args[0][0, -1].detach().clone())
    )
    try:
        for example in tqdm(examples, desc="talker frames", disable=not progress, mininterval=2):
            seen.clear()
            reply = lab.generate(
                example.conversation,
                use_audio_in_video=example.use_audio_in_video,
                max_new_tokens=8,
                max_speech_frames=frames,
                speech_do_sample=False,
            )
            text_frames = len(reply.token_ids)  # the talker reads one text entry per frame, then tts_eos
            spoken = reply.codes[:, 0].tolist() if reply.codes is not None else []
            with torch.no_grad():
                for k, hidden in enumerate(seen):
                    if k < len(spoken):
                        own = int(spoken[k])
                    else:
                        logits = F.linear(hidden, talker.codec_head.weight).masked_fill(
                            ~allowed, float("-inf")
                        )
                        own = int(logits.argmax())
                    hiddens.append(hidden)
                    targets.append(own if k < text_frames else eos)
    finally:
        handle.remove()
    return torch.stack(hiddens), torch.tensor(targets)


def train_codec_head(
    lab, hidden: torch.Tensor, target: torch.Tensor, *, steps: int = 300, lr: float = 3e-3
) -> list[float]:
    """Fit the talker's codec head to (hidden, target) in full batches; returns the loss per step."""
    head = lab.model.talker.codec_head
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    head.train()
    for _ in range(steps):
        loss = F.cross_entropy(head(hidden), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    return losses


def speech_frames(lab, example, *, cap: int = 64) -> tuple[int, int]:
    """(frames spoken before the end code, frames of reply text) for one greedy generation."""
    reply = lab.generate(
        example.conversation,
        use_audio_in_video=example.use_audio_in_video,
        max_new_tokens=8,
        max_speech_frames=cap,
    )
    return (int(reply.codes.shape[0]) if reply.codes is not None else 0), len(reply.token_ids)
