"""Routing: each MoE router's top-k experts and weights, its entropy and top-k mass, its logits.

The router hook keeps the outputs on the device during a forward; when the forward ends, all layers
are stacked and moved to the host at once (one softmax, one copy each), so a 48-layer model costs
about what a 4-layer one does per step. What is kept is the router's own output: the top-k it chose
and the weights it gave them (after `norm_topk_prob`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ..context import Forward
from ..sites import find_sites
from .base import Columns, Recorder, Recording, Turn, concat_columns


@dataclass(frozen=True)
class RoutedForward:
    """One forward's routing, all layers: indices and weights [L, n, k]; entropy and mass [L, n]."""

    component: str
    phase: str
    start: int
    layers: np.ndarray  # [L] int16
    indices: np.ndarray
    weights: np.ndarray
    entropy: np.ndarray
    mass: np.ndarray
    logits: np.ndarray | None  # [L, n, E] float16, when asked for
    batch: int = 1  # rows of a batched forward: n is batch x positions, row-major

    def row(self, row: int, length: int | None) -> RoutedForward:
        """Row `row` of a batched forward, its first `length` positions (right padding cut off)."""
        if self.batch == 1:
            return self
        size = self.indices.shape[1] // self.batch
        cut = slice(row * size, row * size + (size if length is None else length))
        return replace(
            self,
            indices=self.indices[:, cut],
            weights=self.weights[:, cut],
            entropy=self.entropy[:, cut],
            mass=self.mass[:, cut],
            logits=None if self.logits is None else self.logits[:, cut],
            batch=1,
        )


class RoutingRecorder(Recorder):
    """Routing of the thinker's and talker's routers (`mlp.gate`); `logits=True` keeps their logits."""

    kind = "routing"

    def __init__(self, *, logits: bool = False):
        self.logits = logits
        self.forwards: list[RoutedForward] = []
        self._pending: dict[str, dict[int, tuple]] = {}

    def attach(self, recording: Recording) -> None:
        self._pending = {}
        for site in find_sites(recording.model):
            if site.kind == "router" and site.component in ("thinker", "talker"):
                recording.on_output(site.module, site.component, self._receive(site.layer))

    def _receive(self, layer: int):
        def receive(forward: Forward, output) -> None:
            logits, weights, indices = output
            self._pending.setdefault(forward.component, {})[layer] = (
                logits.detach(),
                weights.detach(),
                indices.detach(),
            )

        return receive

    def end_forward(self, forward: Forward) -> None:
        found = self._pending.pop(forward.component, None)
        if not found:
            return
        layers = sorted(found)
        logits = torch.stack([found[layer][0] for layer in layers]).float()  # [L, n, E]
        indices = torch.stack([found[layer][2] for layer in layers])
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [L, n]
        mass = probs.gather(-1, indices).sum(-1)
        self.forwards.append(
            RoutedForward(
                forward.component,
                forward.phase,
                forward.start,
                np.asarray(layers, dtype=np.int16),
                indices.to("cpu", torch.int16).numpy(),
                torch.stack([found[layer][1] for layer in layers]).to("cpu", torch.float16).numpy(),
                entropy.cpu().numpy().astype(np.float32),
                mass.cpu().numpy().astype(np.float32),
                logits.to("cpu", torch.float16).numpy() if self.logits else None,
                forward.batch,
            )
        )

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        return routing_tables([f.row(turn.batch_row, turn.prompt_length) for f in self.forwards])

    def last_frame(self) -> pd.DataFrame:
        """The routing rows of the newest forward, as a DataFrame (empty if it routed nothing)."""
        if not self.forwards:
            return pd.DataFrame()
        return pd.DataFrame(routing_tables(self.forwards[-1:])["routing"])


def routing_tables(forwards: list[RoutedForward]) -> dict[str, Columns]:
    """routing, router_stats (and router_logits) of recorded forwards, rows by (component, layer, pos).

    One block per component, as thinker and talker pick different k; a component's forwards are
    joined along positions (every forward runs every layer), so rows come out layer-major.
    """
    out: dict[str, list[Columns]] = {"routing": [], "router_stats": [], "router_logits": []}
    for name in ("thinker", "talker"):
        rows = sorted((f for f in forwards if f.component == name), key=lambda f: f.start)
        if not rows:
            continue
        layers = rows[0].layers
        if any(not np.array_equal(f.layers, layers) for f in rows):
            raise ValueError(f"{name} forwards routed different layers; cannot join them")
        n_layers = len(layers)
        pos = np.concatenate([np.arange(f.start, f.start + f.indices.shape[1], dtype=np.int32) for f in rows])
        phase = np.concatenate([np.full(f.indices.shape[1], f.phase, dtype=object) for f in rows])
        indices = np.concatenate([f.indices for f in rows], axis=1)  # [L, N, k]
        _, n, k = indices.shape
        layer_col = np.repeat(layers, n)
        out["router_stats"].append(
            {
                "component": np.full(n_layers * n, name, dtype=object),
                "layer": layer_col,
                "pos": np.tile(pos, n_layers),
                "phase": np.tile(phase, n_layers),
                "entropy": np.concatenate([f.entropy for f in rows], axis=1).ravel(),
                "topk_mass": np.concatenate([f.mass for f in rows], axis=1).ravel(),
            }
        )
        out["routing"].append(
            {
                "component": np.full(n_layers * n * k, name, dtype=object),
                "layer": np.repeat(layers, n * k),
                "pos": np.tile(np.repeat(pos, k), n_layers),
                "phase": np.tile(np.repeat(phase, k), n_layers),
                "rank": np.tile(np.arange(k, dtype=np.int8), n_layers * n),
                "expert": indices.ravel(),
                "weight": np.concatenate([f.weights for f in rows], axis=1).ravel(),
            }
        )
        if rows[0].logits is not None:
            logits = np.concatenate([f.logits for f in rows], axis=1)  # [L, N, E]
            e = logits.shape[-1]
            out["router_logits"].append(
                {
                    "component": np.full(n_layers * n * e, name, dtype=object),
                    "layer": np.repeat(layers, n * e),
                    "pos": np.tile(np.repeat(pos, e), n_layers),
                    "expert": np.tile(np.arange(e, dtype=np.int16), n_layers * n),
                    "logit": logits.ravel(),
                }
            )
    return {name: concat_columns(parts) for name, parts in out.items() if parts}
