"""Attention maps of chosen thinker / talker layers (eager attention while recording)."""

from __future__ import annotations

import numpy as np

from ...errors import InterventionError
from ...hf_private import attention_implementation
from ..context import Forward
from ..sites import component_module, find_sites
from .base import Columns, Recorder, Recording, Turn, concat_columns


class AttentionRecorder(Recorder):
    """The weights of each chosen `self_attn` ({component: layers}); `heads` keeps only those heads.

    Attention weights exist only with eager attention: the language model is switched to it while
    attached and back to its own implementation after.
    """

    kind = "attention"

    def __init__(self, model, wanted: dict[str, list[int]], heads=None):
        self.wanted = sorted({(c, int(layer)) for c, layers in wanted.items() for layer in layers})
        self.heads = heads
        self.maps: list[tuple] = []  # (component, layer, start, [(head, [Lq, Lk])])
        self._saved: dict[str, tuple] = {}
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

    def attach(self, recording: Recording) -> None:
        model = recording.model
        for component in {c for c, _ in self.wanted}:
            module = component_module(model, component)
            text_model = module.model.language_model if component == "thinker" else module.model
            self._saved[component] = (text_model, attention_implementation(text_model.config))
            text_model.set_attn_implementation("eager")
        sites = {(s.component, s.layer): s for s in find_sites(model) if s.kind == "attention"}
        for component, layer in self.wanted:
            recording.on_output(sites[(component, layer)].module, component, self._receive(layer))

    def _receive(self, layer: int):
        def receive(forward: Forward, output) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                return
            w = weights[0].detach().float().cpu().numpy()  # [H, Lq, Lk]
            heads = range(w.shape[0]) if self.heads is None else self.heads
            self.maps.append((forward.component, layer, forward.start, [(h, w[h]) for h in heads]))

        return receive

    def detach(self) -> None:
        for text_model, implementation in self._saved.values():
            text_model.set_attn_implementation(implementation)
        self._saved = {}

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        parts = []
        for component, layer, start, heads in self.maps:
            for head, weights in heads:
                lq, lk = weights.shape
                q, k = np.meshgrid(np.arange(start, start + lq), np.arange(lk), indexing="ij")
                parts.append(
                    {
                        "component": np.full(lq * lk, component, dtype=object),
                        "layer": np.full(lq * lk, layer, dtype=np.int16),
                        "head": np.full(lq * lk, head, dtype=np.int16),
                        "query_pos": q.ravel(),
                        "key_pos": k.ravel(),
                        "weight": weights.ravel(),
                    }
                )
        table = concat_columns(parts)
        return {"attention": table} if table is not None else {}
