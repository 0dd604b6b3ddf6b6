"""Activations: the outputs (or inputs) of any resolved sites, every forward, as tensors [rows, width].

    with lab.trace(sites=["resid.*", "audio_tower"], modality="audio") as tr:
        lab.forward(conversation)
    tr.trace.activations["resid.3"].values      # [rows, width], in the model's dtype unless dtype= says otherwise

A hook at each site takes the site's tensor (`site_tensor`; the vision tower's merged tokens, which
fill the placeholders), keeps the chosen rows, casts them (one copy, the only one on a CPU) and holds
them until the forward ends; `end_forward` then moves the whole forward to the host in one transfer.
The batch dimension is kept while recording; `tables(turn)` gives row `turn.batch_row` (with right
padding only its first `turn.prompt_length` prefill positions).

Rows are keyed like the tokens table: (component, phase, step, pos). Thinker and talker sites key by
their own forward; the code predictor by its own sequence (component "code_predictor", pos in its
16-position sequence, step = the talker step whose codebook 0 it completes, which is the frame); the audio and vision towers (and deepstack mergers) by
the thinker positions of the placeholders they fill, rows in position order (the thinker fills
images before videos; the rows are sorted back into the prompt's order). A pattern ending in ":input" records the module's first input (e.g. "resid.0:input",
the embeddings the first layer reads).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InterventionError
from ..context import Forward
from ..sites import Site, find_sites, resolve_sites, site_tensor, site_width
from .base import Recorder, Recording, Turn
from .tokens import special_tokens

# Sites that run outside the thinker's and talker's forwards, or carry no per-token tensor.
UNRECORDABLE = {"code2wav", "thinker", "talker", "rotary"}
TOWERS = ("audio_tower", "vision_tower")
INPUT_SUFFIX = ":input"
# Below this a forward's tensors go to the host in one transfer (concatenated on the device first);
# above it one by one, so the device never holds a second copy of a large capture.
_ONE_TRANSFER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SiteRequest:
    """One resolved site to record: `key` names it in `trace.activations` ("resid.3", "resid.0:input")."""

    site: Site
    inputs: bool = False

    @property
    def key(self) -> str:
        return self.site.alias + (INPUT_SUFFIX if self.inputs else "")


def resolve_requests(model, patterns) -> list[SiteRequest]:
    """The sites `patterns` name (see `resolve_sites`; a ":input" suffix asks for the input), checked
    to be recordable per token."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    out: dict[str, SiteRequest] = {}
    for pattern in patterns:
        inputs = isinstance(pattern, str) and pattern.endswith(INPUT_SUFFIX)
        for site in resolve_sites(model, pattern[: -len(INPUT_SUFFIX)] if inputs else pattern):
            if site.kind in UNRECORDABLE:
                raise InterventionError(
                    f"site {site.alias!r} ({site.kind}) has no per-token activations to record; record "
                    "its layers instead (resid.*, attn.*, mlp.*, talker.resid.*, codec_head), or use the "
                    "named sets routing, positions, codes"
                )
            if inputs and site.point == "input":
                raise InterventionError(
                    f"site {site.alias!r} is already a module's input ({site.module.__class__.__name__} "
                    f"of {site.name}); name it without {INPUT_SUFFIX!r}"
                )
            request = SiteRequest(site, inputs)
            out[request.key] = request
    return list(out.values())


def default_dtype(model) -> torch.dtype:
    """float16, or the model's own dtype where it is already 16-bit (bfloat16 stays bfloat16)."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


@dataclass
class _Chunk:
    component: str
    phase: str
    step: int
    pos: np.ndarray  # [n] positions of the recorded rows
    values: torch.Tensor  # [B, n, width] (towers: [n, width]) on the host after end_forward
    call: int = 0  # towers: the n-th call of that tower in the turn


class ActivationsRecorder(Recorder):
    """The tensors at `requests` (SiteRequests), for `positions` (thinker prompt positions) and
    `modality` (names), cast to `dtype`."""

    kind = "activations"

    def __init__(self, requests: list[SiteRequest], *, positions=None, modality=None, dtype=None):
        self.requests = list(requests)
        self.positions = None if positions is None else np.unique(np.asarray(list(positions), np.int64))
        self.modality = (
            None if modality is None else ({modality} if isinstance(modality, str) else set(modality))
        )
        self.dtype = dtype
        self.chunks: dict[str, list[_Chunk]] = defaultdict(list)
        self._pending: list[tuple[str, _Chunk]] = []
        self._calls: dict[str, int] = defaultdict(int)
        self._predictor: tuple[int, int] = (0, 0)  # (start, length) of the code predictor's forward
        self._prefill_ids: np.ndarray | None = None

    def attach(self, recording: Recording) -> None:
        model = recording.model
        self.dtype = self.dtype or default_dtype(model)
        self._special = special_tokens(model)
        for request in self.requests:
            site = request.site
            component = "talker" if site.component == "code_predictor" else site.component
            component = "thinker" if component in TOWERS else component
            receive = self._receive(request)
            if request.inputs or site.point == "input":
                recording.on_input(site.module, component, _first_input(request, receive))
            else:
                recording.on_output(site.module, component, receive)
        towers = {r.site.component for r in self.requests if r.site.component in TOWERS}
        for tower in towers:
            module = next(s.module for s in _find(model, tower))
            recording.on_input(module, "thinker", lambda f, args, t=tower: self._count(t))
        if any(r.site.component == "code_predictor" for r in self.requests):
            predictor = model.talker.code_predictor.model
            recording.add_handle(predictor.register_forward_pre_hook(self._predictor_start, with_kwargs=True))

    def _count(self, tower: str) -> None:
        self._calls[tower] += 1

    def _predictor_start(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeds = kwargs.get("inputs_embeds")
        start = int(cache.get_seq_length()) if cache is not None else 0
        self._predictor = (start, int(embeds.shape[1]) if embeds is not None else 1)

    # -- in the forward: select, cast, hold ---------------------------------------------------------
    def _receive(self, request: SiteRequest):
        site = request.site

        def receive(forward: Forward, output) -> None:
            if site.kind == "vision_tower" and not request.inputs:
                x = output.pooler_output if hasattr(output, "pooler_output") else site_tensor(output)
            else:
                x = site_tensor(output)
            x = x.detach()
            if site.component in TOWERS:
                values = _cast(x.reshape(-1, x.shape[-1]), self.dtype)
                chunk = _Chunk(
                    "thinker", "prefill", 0, np.empty(0, np.int64), values, self._calls[site.component]
                )
                self._pending.append((request.key, chunk))
                return
            if site.component == "code_predictor":
                start, length = self._predictor
                component, phase, step = "code_predictor", "prefill" if start == 0 else "decode", forward.step
            else:
                start, length = forward.start, forward.length
                component, phase, step = forward.component, forward.phase, forward.step
            if x.dim() == 2:  # routers flatten batch and sequence
                x = x.reshape(-1, length, x.shape[-1])
            keep = self._keep(forward, component, start, x.shape[1])
            pos = np.arange(start, start + x.shape[1])
            if keep is not None:
                pos = pos[keep]
                x = x.index_select(1, torch.as_tensor(keep, device=x.device))
            if len(pos) == 0:
                return
            chunk = _Chunk(component, phase, step, pos, _cast(x, self.dtype))
            self._pending.append((request.key, chunk))

        return receive

    def _keep(self, forward: Forward, component: str, start: int, length: int) -> np.ndarray | None:
        """Indices of the forward's rows to record (None: all)."""
        keep = None
        if component == "thinker" and self.positions is not None:
            keep = np.flatnonzero(np.isin(np.arange(start, start + length), self.positions))
        if self.modality is not None:
            modality = self._row_modality(forward, component, length)
            if modality is not None:
                mask = np.isin(modality, list(self.modality))
                keep = np.flatnonzero(mask) if keep is None else keep[mask[keep]]
        return keep

    def _row_modality(self, forward: Forward, component: str, length: int) -> np.ndarray | None:
        if component != "thinker":
            speech = component == "code_predictor" or forward.phase == "decode"
            return np.full(length, "speech" if speech else "text", dtype=object) if speech else None
        if forward.input_ids is None or len(forward.input_ids) != length:
            return None
        ids = forward.input_ids.cpu().numpy()
        modality = np.full(length, "text", dtype=object)
        for name, token in self._special.media.items():
            modality[ids == token] = name
        return modality

    def end_forward(self, forward: Forward) -> None:
        """Move the finished forward's tensors to the host, one transfer per forward."""
        if forward.component == "thinker" and forward.phase == "prefill" and forward.input_ids is not None:
            self._prefill_ids = forward.input_ids.cpu().numpy()
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = pending[0][1].values.device
        size = sum(c.values.numel() * c.values.element_size() for _, c in pending)
        if device.type != "cpu" and size > _ONE_TRANSFER_BYTES:  # one copy each: no second device buffer
            for _, chunk in pending:
                chunk.values = chunk.values.cpu()
        elif device.type != "cpu":
            flat = torch.cat([c.values.reshape(-1) for _, c in pending]).cpu()
            offset = 0
            for _, chunk in pending:
                n = chunk.values.numel()
                chunk.values = flat[offset : offset + n].view(chunk.values.shape)
                offset += n
        for key, chunk in pending:
            self.chunks[key].append(chunk)

    # -- after the turn ------------------------------------------------------------------------------
    def recorded(self, turn: Turn) -> dict[str, tuple[dict, torch.Tensor]]:
        """key -> (row columns component, phase, step, pos; values [rows, width]) for row `turn.batch_row`."""
        out = {}
        for request in self.requests:
            chunks = self.chunks.get(request.key, [])
            if not chunks:
                continue
            if request.site.component in TOWERS:
                columns, values = self._tower_rows(request.site, chunks)
            else:
                columns, values = self._rows(chunks, turn)
            if len(columns["pos"]):
                out[request.key] = (columns, values)
        return out

    def _rows(self, chunks: list[_Chunk], turn: Turn):
        parts, tensors = [], []
        for chunk in chunks:
            values = chunk.values[min(turn.batch_row, chunk.values.shape[0] - 1)]
            pos = chunk.pos
            if chunk.component == "thinker" and chunk.phase == "prefill" and turn.prompt_length is not None:
                inside = pos < turn.prompt_length  # right padding: only this row's own prompt
                if not inside.all():
                    pos, values = pos[inside], values[torch.as_tensor(np.flatnonzero(inside))]
            parts.append((chunk.component, chunk.phase, chunk.step, pos))
            tensors.append(values)
        columns = {
            "component": np.concatenate([np.full(len(p), c, dtype=object) for c, _, _, p in parts]),
            "phase": np.concatenate([np.full(len(p), ph, dtype=object) for _, ph, _, p in parts]),
            "step": np.concatenate([np.full(len(p), s, dtype=np.int32) for _, _, s, p in parts]),
            "pos": np.concatenate([p for *_, p in parts]).astype(np.int32),
        }
        return columns, tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    def _tower_rows(self, site: Site, chunks: list[_Chunk]):
        """Tower rows at the thinker positions of the placeholders they fill, in fill order."""
        ids = self._prefill_ids if self._prefill_ids is not None else np.empty(0, np.int64)
        if site.component == "audio_tower":
            slots = [np.flatnonzero(ids == self._special.audio)]
        else:  # images fill first, then videos (one vision call each)
            slots = [np.flatnonzero(ids == t) for t in (self._special.image, self._special.video)]
            slots = [s for s in slots if len(s)]
        values = chunks[0].values if len(chunks) == 1 else torch.cat([c.values for c in chunks])
        pos = np.concatenate(slots) if slots else np.empty(0, np.int64)
        if len(pos) != values.shape[0]:  # batched prompts: placeholders of other rows; keep the order
            pos = np.full(values.shape[0], -1, dtype=np.int64)
        keep = np.ones(len(pos), dtype=bool)
        if self.positions is not None:
            keep &= np.isin(pos, self.positions)
        order = np.flatnonzero(keep)
        if len(pos) and (pos >= 0).all():  # images fill first, then videos: rows in position order
            order = order[np.argsort(pos[order], kind="stable")]
        if not np.array_equal(order, np.arange(len(pos))):
            pos, values = pos[order], values[torch.as_tensor(order)]
        n = len(pos)
        columns = {
            "component": np.full(n, "thinker", dtype=object),
            "phase": np.full(n, "prefill", dtype=object),
            "step": np.zeros(n, dtype=np.int32),
            "pos": pos.astype(np.int32),
        }
        return columns, values


def _first_input(request: SiteRequest, receive):
    """`receive(forward, the module's first input)`; a module called without one is refused by name."""

    def on_input(forward: Forward, args) -> None:
        if not args:
            raise InterventionError(
                f"site {request.key!r}: {request.site.name} was called with its input as a keyword, so "
                "its input cannot be recorded here; record the previous module's output instead"
            )
        receive(forward, args[0])

    return on_input


def _find(model, component: str) -> list[Site]:
    return [s for s in find_sites(model) if s.kind == component]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, always a copy of its own (a hooked tensor may be reused by the model)."""
    return x.to(dtype) if x.dtype != dtype else x.clone()


# -- what a capture will cost, before it runs ------------------------------------------------------
# The talker's prompt: the user's turns (at most the thinker's prompt) and 9 positions of its own
# assistant head (transformers' `_get_talker_assistant_parts`: 3 + 4 pads + bos + the first text).
TALKER_ASSISTANT_POSITIONS = 9


def estimate_bytes(
    model,
    requests: list[SiteRequest],
    input_ids,
    *,
    positions=None,
    modality=None,
    dtype=None,
    max_new_tokens: int = 0,
    speech_frames: int = 0,
) -> int:
    """Bytes the run's activations will hold on the host: rows x width x element size per site.

    Rows: thinker sites, the prompt's after `positions` and `modality`, and one per generated token fed
    back (`max_new_tokens` - 1; none when `positions` limits them to the prompt); towers, their
    placeholders'; talker sites, at most the talker's prompt (the thinker's prompt and its own head)
    and one per talker step (`speech_frames` + 1); code predictor sites, its codebooks per frame.
    """
    dtype = dtype or default_dtype(model)
    element = torch.empty(0, dtype=dtype).element_size()
    ids = np.asarray(input_ids.detach().cpu())
    modality_of = special_tokens(model).modality_names(ids)
    wanted = None if modality is None else ({modality} if isinstance(modality, str) else set(modality))
    selected = np.ones(ids.shape, dtype=bool)
    if positions is not None:
        selected &= np.isin(np.arange(ids.shape[-1]), list(positions))
    if wanted is not None:
        selected &= np.isin(modality_of, list(wanted))
    generated = max(int(max_new_tokens) - 1, 0)  # the last token is never fed back
    if positions is not None or (wanted is not None and "text" not in wanted):
        generated = 0
    frames = int(speech_frames)
    steps = frames + 1 if frames else 0
    talker_prompt = (ids.shape[-1] + TALKER_ASSISTANT_POSITIONS) if frames else 0
    if wanted is not None:
        talker_prompt = talker_prompt if wanted - {"speech"} else 0
        steps = steps if "speech" in wanted else 0
    codebooks = _codebooks(model)
    total = 0
    for request in requests:
        site = request.site
        if site.component == "thinker":
            rows = int(selected.sum()) + generated
        elif site.component == "audio_tower":
            rows = int((selected & (modality_of == "audio")).sum())
        elif site.component == "vision_tower":
            rows = int((selected & np.isin(modality_of, ["image", "video"])).sum())
        elif site.component == "talker":
            rows = talker_prompt + steps
        elif site.component == "code_predictor":
            rows = frames * codebooks if wanted is None or "speech" in wanted else 0
        else:
            rows = 0
        total += rows * (site_width(model, site) or 0) * element
    return int(total)


def _codebooks(model) -> int:
    talker = getattr(model, "talker", None)
    return int(talker.config.num_code_groups) if talker is not None else 0
