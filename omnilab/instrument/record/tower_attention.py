"""Attention maps of the audio and vision towers, through a recording attention function.

The towers' `output_attentions` returns attention outputs, not maps, and their attention runs one
window (`cu_seqlens` chunk) at a time. So omnilab registers one attention function with
transformers' `AttentionInterface`: for the attention modules asked for it computes the model's own
eager attention (which returns the weights) and keeps the weights; for every other module it calls the
tower's original implementation unchanged. The tower's config points at it only while recording.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
from transformers import AttentionInterface

from ...errors import InterventionError
from ...hf_private import attention_function, attention_implementation, eager_attention, set_config_attention
from .base import Columns, Recorder, Recording, Turn

NAME = "omnilab_recording"
TOWERS = {"audio_tower": "audio_tower", "vision_tower": "visual"}

_lock = threading.Lock()
# The attention function is registered once, by name, for every model: it finds the recorder of the
# module it is called for here (a module nobody records runs its tower's original implementation).
_recorders: dict[int, TowerRecorder] = {}  # id(attention module) -> its recorder
_originals: dict[int, str] = {}  # id(tower config) -> the implementation it had


def _original(module) -> Callable:
    return attention_function(_originals.get(id(module.config), "sdpa"))


def recording_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """An attention function: the model's eager attention, keeping the weights, for recorded modules."""
    recorder = _recorders.get(id(module))
    if recorder is None:
        return _original(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    output, weights = eager_attention(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    recorder.window(weights)
    return output, weights


AttentionInterface.register(NAME, recording_attention)


class TowerRecorder:
    """Collects one attention module's maps: one entry per (tower call, window)."""

    def __init__(self, tower: str, layer: int, heads):
        self.tower, self.layer, self.heads = tower, layer, heads
        self.calls = -1
        self.offset = 0
        self.windows: list[tuple[int, int, int, np.ndarray]] = []  # (call, window, offset, [H, q, k])

    def start_call(self, module, args, kwargs=None) -> None:
        self.calls += 1
        self.offset = 0
        self._window = 0

    def window(self, weights: torch.Tensor) -> None:
        w = weights[0].detach().float().cpu().numpy()  # [H, L, L] within one window
        if self.heads is not None:
            w = w[list(self.heads)]
        self.windows.append((self.calls, self._window, self.offset, w))
        self.offset += w.shape[-1]
        self._window += 1


def tower_modules(model, tower: str) -> list[torch.nn.Module]:
    """The attention module of every layer of `tower` ("audio_tower" or "vision_tower")."""
    thinker = model.thinker if hasattr(model, "thinker") else model
    module = getattr(thinker.model, TOWERS[tower], None)
    if module is None:
        return []
    layers = module.layers if tower == "audio_tower" else module.blocks
    return [layer.self_attn if tower == "audio_tower" else layer.attn for layer in layers]


class TowerAttentionRecorder(Recorder):
    """Attention maps of chosen audio / vision tower layers (`wanted`: tower -> layers); the towers'
    configs point at the recording function while attached and at their own implementation after."""

    kind = "tower_attention"

    def __init__(self, model, wanted: dict[str, list[int]], heads=None):
        self.wanted = {tower: [int(x) for x in layers] for tower, layers in wanted.items()}
        self.heads = heads
        self.recorders: list[TowerRecorder] = []
        self._handles = []
        self._configs = []
        for tower, layers in self.wanted.items():
            modules = tower_modules(model, tower)
            for layer in layers:
                if not 0 <= layer < len(modules):
                    raise InterventionError(
                        f"no attention site: {tower} has {len(modules)} layers; no layer {layer}; see lab.sites()"
                    )

    def attach(self, recording: Recording) -> None:
        heads = self.heads
        for tower, layers in self.wanted.items():
            modules = tower_modules(recording.model, tower)
            for layer in layers:
                module = modules[int(layer)]
                recorder = TowerRecorder(tower, int(layer), heads)
                self.recorders.append(recorder)
                with _lock:
                    _recorders[id(module)] = recorder
                    config = module.config
                    if id(config) not in _originals:
                        _originals[id(config)] = attention_implementation(config)
                        self._configs.append(config)
                        set_config_attention(config, NAME)
                self._handles.append((module, module.register_forward_pre_hook(recorder.start_call)))

    def detach(self) -> None:
        with _lock:
            for module, handle in self._handles:
                handle.remove()
                _recorders.pop(id(module), None)
            for config in self._configs:
                set_config_attention(config, _originals.pop(id(config)))
        self._handles.clear()
        self._configs.clear()

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        rows = self.rows()
        return {"tower_attention": rows} if len(rows["weight"]) else {}

    def rows(self) -> dict[str, np.ndarray]:
        """Columns of the tower_attention table (every recorded head, query and key)."""
        columns = {k: [] for k in ("tower", "layer", "call", "window", "head", "query", "key", "weight")}
        for recorder in self.recorders:
            heads = list(recorder.heads) if recorder.heads is not None else None
            for call, window, offset, w in recorder.windows:
                h, lq, lk = w.shape
                head_ids = np.asarray(heads if heads is not None else range(h))
                hh, qq, kk = np.meshgrid(
                    head_ids, np.arange(lq) + offset, np.arange(lk) + offset, indexing="ij"
                )
                n = hh.size
                columns["tower"].append(np.full(n, recorder.tower, dtype=object))
                columns["layer"].append(np.full(n, recorder.layer))
                columns["call"].append(np.full(n, call))
                columns["window"].append(np.full(n, window))
                columns["head"].append(hh.ravel())
                columns["query"].append(qq.ravel())
                columns["key"].append(kk.ravel())
                columns["weight"].append(w.ravel())
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}
