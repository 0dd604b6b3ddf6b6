"""Attention of chosen thinker / talker layers, recorded at a cost linear in tokens.

The model keeps its own attention implementation (sdpa): nothing it computes changes. A forward hook
on each recorded `self_attn` takes the hidden states and rotary embeddings it was given, recomputes
the queries and keys the module's own way (its q_proj/k_proj, q_norm/k_norm and transformers'
rotary embedding), keeps the keys of the sequence so far, and computes attention probabilities a
chunk of query rows at a time (causal softmax in float32, as eager attention does). Of each chunk
it keeps only the reductions asked for (AttentionSettings), in float16:

- "row": the whole causal row of the chosen queries (default: the last prompt row, which chose the
  first generated token, and every generated row);
- "block": every query's attention mass on each key block (a run of one modality in the sequence);
- "top_k": every query's k strongest keys.

Peak memory: the kept rows, one chunk of scores (`chunk_bytes`) and the keys of the recorded layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InterventionError
from ...hf_private import rotary
from ...trace import MODALITIES
from ..context import Forward
from ..sites import component_module, find_sites
from .base import Columns, Recorder, Recording, Turn
from .tokens import special_tokens

REDUCTIONS = ("row", "block", "top_k")


@dataclass(frozen=True)
class AttentionSettings:
    """What of each recorded layer's attention is kept.

    queries: "last" (the last prompt row and every generated row), "all" (every row: quadratic, for
    short prompts) or positions; blocks: every query's mass per key block; top_k: every query's k
    strongest keys (0: none); chunk_bytes: the float32 scores computed at once.
    """

    queries: str | tuple[int, ...] = "last"
    blocks: bool = True
    top_k: int = 0
    chunk_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if isinstance(self.queries, str) and self.queries not in ("last", "all"):
            raise InterventionError(
                f"attention queries {self.queries!r} is not known; pass 'last', 'all' or query positions"
            )
        if int(self.top_k) < 0:
            raise InterventionError(f"attention top_k must be 0 or more; got {self.top_k}")


def attention_settings(settings) -> AttentionSettings:
    """AttentionSettings from None (the defaults), a dict of its fields or AttentionSettings."""
    if settings is None:
        return AttentionSettings()
    if isinstance(settings, AttentionSettings):
        return settings
    if isinstance(settings, dict):
        unknown = set(settings) - set(AttentionSettings.__dataclass_fields__)
        if unknown:
            raise InterventionError(
                f"unknown attention settings {sorted(unknown)}; choose from queries, blocks, top_k, chunk_bytes"
            )
        queries = settings.get("queries", "last")
        if not isinstance(queries, str):
            settings = {**settings, "queries": tuple(int(q) for q in queries)}
        return AttentionSettings(**settings)
    raise InterventionError(
        f"attention settings must be a dict or AttentionSettings; got {type(settings).__name__}"
    )


class _Layer:
    """The keys seen so far by one recorded attention module, and the rows it kept."""

    def __init__(self, component: str, layer: int):
        self.component, self.layer = component, layer
        self.keys: torch.Tensor | None = None  # [kv_heads, positions, head_dim], after the rotary embedding
        self.parts: list[dict[str, np.ndarray]] = []


class AttentionRecorder(Recorder):
    """The attention of each chosen `self_attn` ({component: layers}); `heads` keeps only those heads;
    `settings` (AttentionSettings) says which reductions are kept."""

    kind = "attention"

    def __init__(self, model, wanted: dict[str, list[int]], heads=None, settings=None):
        self.wanted = sorted({(c, int(layer)) for c, layers in wanted.items() for layer in layers})
        self.heads = None if heads is None else [int(h) for h in heads]
        self.settings = attention_settings(settings)
        self.layers: dict[tuple[str, int], _Layer] = {}
        self.modality: dict[str, list[np.ndarray]] = {}  # component -> modality codes of its positions
        found = {(s.component, s.layer) for s in find_sites(model) if s.kind == "attention"}
        missing = set(self.wanted) - found
        if missing:
            raise InterventionError(f"no attention site for {sorted(missing)}; see lab.sites()")
        for component in {c for c, _ in self.wanted}:
            if component not in ("thinker", "talker") or component_module(model, component) is None:
                raise InterventionError(
                    f"attention capture covers thinker, talker, audio_tower and vision_tower layers; "
                    f"got {component!r}"
                )
        self._special = special_tokens(model)  # token ids -> modality

    def attach(self, recording: Recording) -> None:
        sites = {(s.component, s.layer): s for s in find_sites(recording.model) if s.kind == "attention"}
        components = {c for c, _ in self.wanted}
        for component in components:
            module = component_module(recording.model, component)
            # Runs before the layers' hooks of the same forward: the modality of its positions.
            recording.add_handle(module.register_forward_pre_hook(self._positions(recording, component)))
        for component, layer in self.wanted:
            state = self.layers[(component, layer)] = _Layer(component, layer)
            hook = self._receive(recording, state)
            recording.add_handle(
                sites[(component, layer)].module.register_forward_hook(hook, with_kwargs=True)
            )

    # -- hooks ----------------------------------------------------------------------------------------
    def _positions(self, recording: Recording, component: str):
        def hook(module, args):
            forward = recording.tracker.current.get(component)
            if forward is None or not recording.mine():
                return
            codes = np.zeros(forward.length, dtype=np.int8)  # text
            if forward.input_ids is not None and component == "thinker":
                names = self._special.modality_names(forward.input_ids)
                codes[:] = [MODALITIES.index(name) for name in names.reshape(-1)]
            elif component == "talker" and forward.phase == "decode":
                codes[:] = MODALITIES.index("speech")
            if forward.start == 0:
                self.modality[component] = []
            self.modality.setdefault(component, []).append(codes)

        return hook

    def _receive(self, recording: Recording, state: _Layer):
        def hook(module, args, kwargs, output):
            forward = recording.tracker.current.get(state.component)
            if forward is None or not recording.mine():
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                self._record(module, state, forward, hidden, cos, sin)

        return hook

    # -- the computation ------------------------------------------------------------------------------
    def _record(self, module, state: _Layer, forward: Forward, hidden, cos, sin) -> None:
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        # `.forward` directly: hooks other recorders put on these modules must not hear this replay.
        query = module.q_norm.forward(module.q_proj.forward(hidden).view(shape)).transpose(1, 2)
        key = module.k_norm.forward(module.k_proj.forward(hidden).view(shape)).transpose(1, 2)
        query, key = rotary(query, key, cos, sin)
        key = key[0].detach()
        if forward.start == 0 or state.keys is None:
            state.keys = key
        else:
            state.keys = torch.cat([state.keys, key], dim=1)
        keys = state.keys
        total = keys.shape[1]
        if total != forward.start + forward.length:
            raise InterventionError(
                f"attention of {state.component} layer {state.layer}: {total} keys recorded for a forward "
                f"ending at position {forward.start + forward.length}; record one run per lab.trace()"
            )
        heads = list(range(query.shape[1])) if self.heads is None else self.heads
        groups = module.num_key_value_groups
        query = query[0, heads].float()  # [H, L, D]
        keys = keys[[h // groups for h in heads]].float()  # [H, K, D]
        chosen = self._chosen(forward)
        blocks = self._blocks(state.component, total) if self.settings.blocks else None
        chunk = max(1, self.settings.chunk_bytes // (4 * len(heads) * total))
        head_ids = np.asarray(heads, dtype=np.int16)
        for first in range(0, forward.length, chunk):
            rows = slice(first, min(first + chunk, forward.length))
            pos = torch.arange(forward.start + rows.start, forward.start + rows.stop, device=keys.device)
            scores = torch.matmul(query[:, rows], keys.transpose(1, 2)) * module.scaling
            future = torch.arange(total, device=keys.device)[None, :] > pos[:, None]  # causal
            scores.masked_fill_(future[None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            del scores
            self._keep(state, probs, pos.cpu().numpy(), head_ids, chosen, blocks)

    def _chosen(self, forward: Forward) -> np.ndarray:
        """Positions of this forward whose whole row is kept."""
        pos = np.arange(forward.start, forward.start + forward.length)
        queries = self.settings.queries
        if queries == "all":
            return pos
        if queries == "last":
            return pos if forward.phase == "decode" else pos[-1:]
        return pos[np.isin(pos, np.asarray(queries, dtype=np.int64))]

    def _blocks(self, component: str, total: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(block of each key, block starts, block ends): runs of one modality in the sequence."""
        codes = np.concatenate(self.modality.get(component) or [np.zeros(0, np.int8)])
        codes = np.concatenate([codes, np.zeros(max(0, total - len(codes)), np.int8)])[:total]
        change = np.flatnonzero(np.diff(codes)) + 1
        starts = np.concatenate([[0], change]).astype(np.int32)
        ends = np.concatenate([change, [total]]).astype(np.int32)
        index = np.repeat(np.arange(len(starts)), ends - starts)
        return torch.from_numpy(index), starts, ends

    def _keep(self, state: _Layer, probs, pos: np.ndarray, heads: np.ndarray, chosen, blocks) -> None:
        """The reductions of one chunk of rows (probs [H, rows, keys])."""
        h = len(heads)
        for i in np.flatnonzero(np.isin(pos, chosen)):
            q = int(pos[i])
            weight = probs[:, i, : q + 1].to(torch.float16).cpu().numpy()
            keys = np.arange(q + 1, dtype=np.int32)
            state.parts.append(
                _part(
                    "row", np.repeat(heads, q + 1), q, np.tile(keys, h), np.tile(keys + 1, h), weight.ravel()
                )
            )
        if blocks is not None:
            index, starts, ends = blocks
            mass = torch.zeros(h, len(pos), len(starts), device=probs.device)
            mass = mass.index_add_(2, index.to(probs.device), probs).cpu()
            hh, qq, bb = np.meshgrid(np.arange(h), np.arange(len(pos)), np.arange(len(starts)), indexing="ij")
            seen = starts[bb] <= pos[qq]  # blocks that start after the query get no mass
            state.parts.append(
                _part(
                    "block",
                    heads[hh[seen]],
                    pos[qq[seen]],
                    starts[bb[seen]],
                    np.minimum(ends[bb[seen]], pos[qq[seen]] + 1),
                    mass.numpy()[seen].astype(np.float16),
                )
            )
        k = min(int(self.settings.top_k), probs.shape[-1])
        if k:
            values, keys = (t.cpu() for t in torch.topk(probs, k, dim=-1))
            keys = keys.numpy().astype(np.int32)
            hh, qq, _ = np.meshgrid(np.arange(h), np.arange(len(pos)), np.arange(k), indexing="ij")
            seen = keys <= pos[qq]  # a short prefix has fewer than k keys
            state.parts.append(
                _part(
                    "top_k", heads[hh[seen]], pos[qq[seen]], keys[seen], keys[seen] + 1,
                    values.numpy()[seen].astype(np.float16),
                )
            )  # fmt: skip

    def detach(self) -> None:
        for state in self.layers.values():
            state.keys = None  # the keys are only needed while forwards run
        self.modality = {}

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        total = sum(len(part["weight"]) for state in self.layers.values() for part in state.parts)
        if not total:
            return {}
        # Filled in place, each part dropped once copied: the peak is the table plus one part.
        out = {c: np.empty(total, dtype=d) for c, d in _COLUMNS.items()}
        at = 0
        for state in self.layers.values():
            parts, state.parts = state.parts[::-1], []
            while parts:
                part = parts.pop()
                rows = slice(at, at + len(part["weight"]))
                out["component"][rows] = state.component
                out["layer"][rows] = state.layer
                out["reduction"][rows] = part["reduction"]
                for name in ("head", "query_pos", "key_pos", "key_end", "weight"):
                    out[name][rows] = part[name]
                at = rows.stop
        return {"attention": out}


_COLUMNS = {
    "component": object,
    "layer": np.int16,
    "head": np.int16,
    "query_pos": np.int32,
    "key_pos": np.int32,
    "weight": np.float16,
    "reduction": object,
    "key_end": np.int32,
}


def _part(reduction, heads, query_pos, key_pos, key_end, weight) -> dict:
    n = len(weight)
    return {
        "reduction": reduction,
        "head": np.asarray(heads, dtype=np.int16),
        "query_pos": np.broadcast_to(np.asarray(query_pos, dtype=np.int32), (n,)).copy(),
        "key_pos": np.asarray(key_pos, dtype=np.int32),
        "key_end": np.asarray(key_end, dtype=np.int32),
        "weight": np.asarray(weight, dtype=np.float16),
    }
