"""Tokens and positions: every position a forward fed, with its id and the (t, h, w) ids the model used.

The rotary embedding's pre-hook sees the position ids the model really uses (TM-RoPE, decode
included); the ids come from the ForwardTracker (the talker's prefill from the ids `generate` hands
it). `annotate_tokens` adds what the ids mean — modality, media item, seconds on the TM-RoPE time
axis, frame and text — with the special token ids read from the model's config.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..context import Forward
from ..sites import rotary
from .base import Columns, Recorder, Recording, Turn, concat_columns


@dataclass(frozen=True)
class SpecialTokens:
    """The thinker's media placeholder and block-start ids, from its config."""

    audio: int
    image: int
    video: int
    audio_start: int
    vision_start: int

    @property
    def media(self) -> dict[str, int]:
        return {"audio": self.audio, "image": self.image, "video": self.video}

    # The one place token ids become modalities: every instrument (recorders, interventions, edits,
    # the budget, gradients) asks these.
    def modality_names(self, ids) -> np.ndarray:
        """Each prompt token's modality name, "text" unless it is a media placeholder; `ids` a numpy
        array or tensor of any shape (generated speech is never in a prompt: callers label it)."""
        ids = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        names = np.full(ids.shape, "text", dtype=object)
        for name, token in self.media.items():
            names[ids == token] = name
        return names

    def modality_mask(self, ids: torch.Tensor, modality: str) -> torch.Tensor:
        """Boolean tensor: which of `ids` are `modality`'s tokens ("text": every non-media token;
        "speech": none, since prompts hold no speech)."""
        if modality == "text":
            return ~torch.isin(ids, torch.tensor(list(self.media.values()), device=ids.device))
        if modality == "speech":
            return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        return ids == self.media[modality]


def thinker_config(model):
    thinker = model.thinker if hasattr(model, "thinker") else model
    return thinker.config


def special_tokens(model) -> SpecialTokens:
    """The media token ids of `model` (a full Qwen3-Omni or a thinker), read from its thinker config."""
    config = thinker_config(model)
    return SpecialTokens(
        int(config.audio_token_id),
        int(config.image_token_id),
        int(config.video_token_id),
        int(config.audio_start_token_id),
        int(config.vision_start_token_id),
    )


def position_id_per_seconds(model) -> float:
    """TM-RoPE time positions per second of media (the thinker's `position_id_per_seconds`)."""
    return float(thinker_config(model).position_id_per_seconds)


class TokensRecorder(Recorder):
    """Ids, phase, step and (t, h, w) positions of every position the thinker and talker fed."""

    kind = "positions"

    def __init__(self):
        self.positions: dict[str, dict[int, np.ndarray]] = defaultdict(dict)  # component -> start -> [3, L]
        self.ids: dict[str, dict[int, tuple]] = defaultdict(
            dict
        )  # component -> start -> (phase, step, ids, n)
        self.last: dict[str, int] = {}  # component -> start of its newest forward

    def attach(self, recording: Recording) -> None:
        self._tracker = recording.tracker
        for component in ("thinker", "talker"):
            module = rotary(recording.model, component)
            if module is not None:
                recording.on_input(module, component, self._rotary)

    def _rotary(self, forward: Forward, args) -> None:
        position_ids = args[1] if len(args) > 1 else None
        if position_ids is None:
            return
        pos = position_ids.detach()
        if pos.dim() == 2:  # [B, L]: plain 1-D positions
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        rows = pos[:3, 0] if forward.batch == 1 else pos[:3]  # [3, L], or [3, B, L] when batched
        self.positions[forward.component][forward.start] = rows.to("cpu", torch.int64).numpy()

    def end_forward(self, forward: Forward) -> None:
        ids = forward.input_ids if forward.batch == 1 else forward.batch_input_ids  # [L] or [B, L]
        if forward.component == "talker" and forward.phase == "prefill":
            ids = self._tracker.talker_input_ids
        ids = None if ids is None else ids.detach().cpu().numpy().astype(np.int64)
        self.ids[forward.component][forward.start] = (forward.phase, forward.step, ids, forward.length)
        self.last[forward.component] = forward.start

    def rows(self, component: str, starts=None, *, row: int = 0, length: int | None = None) -> Columns | None:
        """Raw token columns (component, phase, step, pos, token_id, t, h, w) of `component`'s forwards.

        A batched forward gives row `row`'s first `length` positions (all of them when None).
        """
        recorded = self.ids.get(component, {})
        parts = []
        for start in sorted(recorded) if starts is None else starts:
            phase, step, ids, n = recorded[start]
            positions = self.positions[component].get(start)
            if (ids is not None and ids.ndim == 2) or (positions is not None and positions.ndim == 3):
                n = n if length is None else length  # batched, right padded: row `row`'s first n
                ids = ids[row, :n] if ids is not None else None
                positions = positions[:, row, :n] if positions is not None else None
            if ids is None:
                ids = np.full(n, -1, dtype=np.int64)
            if positions is None or positions.shape[-1] != n:
                positions = np.tile(np.arange(start, start + n), (3, 1))
            parts.append(
                {
                    "component": np.full(n, component, dtype=object),
                    "phase": np.full(n, phase, dtype=object),
                    "step": np.full(n, step, dtype=np.int32),
                    "pos": np.arange(start, start + n, dtype=np.int32),
                    "token_id": ids[:n],
                    "t": positions[0],
                    "h": positions[1],
                    "w": positions[2],
                }
            )
        return concat_columns(parts)

    def last_frame(self, component: str) -> pd.DataFrame:
        """The token rows of `component`'s newest forward, as a DataFrame."""
        return pd.DataFrame(self.rows(component, [self.last[component]]))

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        model = recording.model
        special, pps = special_tokens(model), position_id_per_seconds(model)
        parts = []
        for component in ("thinker", "talker"):
            columns = self.rows(component, row=turn.batch_row, length=turn.prompt_length)
            if columns is None:
                continue
            if component == "thinker":
                columns = append_unfed_tokens(columns, turn)
            parts.append(annotate_tokens(columns, component, turn.tokenizer, special, pps))
        tokens = concat_columns(parts)
        return {"tokens": tokens, "spans": spans(tokens)}


def append_unfed_tokens(columns: Columns, turn: Turn) -> Columns:
    """Generated tokens that were never fed back (the last one) still belong in the tokens table."""
    if turn.prompt_length is None or not turn.token_ids:
        return columns
    length = turn.prompt_length
    wanted = np.arange(length, length + len(turn.token_ids))
    missing = wanted[~np.isin(wanted, columns["pos"])]
    if len(missing) == 0:
        return columns
    last = int(np.argmax(columns["pos"]))
    offset = missing - columns["pos"][last]
    extra = {
        "component": np.full(len(missing), "thinker", dtype=object),
        "phase": np.full(len(missing), "decode", dtype=object),
        "step": (missing - length + 1).astype(np.int32),
        "pos": missing.astype(np.int32),
        "token_id": np.asarray(turn.token_ids, dtype=np.int64)[missing - length],
        "t": columns["t"][last] + offset,
        "h": columns["h"][last] + offset,
        "w": columns["w"][last] + offset,
    }
    return {c: np.concatenate([v, extra[c]]) for c, v in columns.items()}


def annotate_tokens(
    columns: Columns, component: str, tokenizer, special: SpecialTokens, pps: float
) -> Columns:
    """A component's token columns, sorted by pos, with text, modality, item, seconds and frame added."""
    order = np.argsort(columns["pos"], kind="stable")
    columns = {c: v[order] for c, v in columns.items()}
    ids = columns["token_id"]
    n = len(ids)
    modality = special.modality_names(ids)
    if component == "talker":
        modality[columns["phase"] == "decode"] = "speech"
    # A media item is a run of its modality's tokens inside one <|vision_start|>/<|audio_start|> block.
    block = np.cumsum((ids == special.vision_start) | (ids == special.audio_start))
    item = np.full(n, -1, dtype=np.int32)
    frame_index = np.full(n, -1, dtype=np.int32)
    seconds = np.full(n, np.nan)
    t = columns["t"]
    for kind in ("audio", "image", "video"):
        where = np.flatnonzero(modality == kind)
        if len(where) == 0:
            continue
        blocks = block[where]
        _, item_of = np.unique(blocks, return_inverse=True)
        item[where] = item_of
        for index in np.unique(item_of):
            members = where[item_of == index]
            # In a use_audio_in_video block, audio and video share the block's start time.
            block_members = np.flatnonzero(
                (block == blocks[item_of == index][0]) & np.isin(modality, ["audio", "video", "image"])
            )
            t0 = t[block_members].min()
            seconds[members] = (t[members] - t0) / pps
            if kind == "audio":
                frame_index[members] = np.arange(len(members))
            elif kind == "video":
                _, frame_index[members] = np.unique(t[members], return_inverse=True)
            else:
                frame_index[members] = 0
    if component == "talker":
        speech = modality == "speech"
        frame_index[speech] = columns["step"][speech] - 1
    text = np.full(n, "", dtype=object)
    if component == "thinker":
        # Media placeholders repeat one id hundreds of times: decode each distinct id once.
        unique, inverse = np.unique(ids, return_inverse=True)
        pieces = tokenizer.convert_ids_to_tokens([int(i) for i in unique])
        text = np.array(
            [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces], dtype=object
        )[inverse]
    return {
        **columns,
        "text": text,
        "modality": modality,
        "item": item,
        "seconds": seconds,
        "frame": frame_index,
    }


def spans(tokens: Columns | None) -> Columns | None:
    """Contiguous runs of one modality (and item) in each component's sequence."""
    if tokens is None or len(tokens["pos"]) == 0:
        return None
    parts = []
    components = tokens["component"]
    for component in pd.unique(components):
        mask = components == component
        order = np.argsort(tokens["pos"][mask], kind="stable")
        pos = tokens["pos"][mask][order]
        mods = tokens["modality"][mask][order]
        items = tokens["item"][mask][order]
        change = np.ones(len(pos), dtype=bool)
        change[1:] = (mods[1:] != mods[:-1]) | (items[1:] != items[:-1])
        starts = np.flatnonzero(change)
        ends = np.append(starts[1:], len(pos))
        parts.append(
            {
                "component": np.full(len(starts), component, dtype=object),
                "modality": mods[starts],
                "item": items[starts],
                "start": pos[starts],
                "end": pos[ends - 1] + 1,
            }
        )
    return concat_columns(parts)
