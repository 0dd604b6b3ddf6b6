"""Which forward is running: component, phase, step and the positions it covers; the model's lock.

Recorders at inner modules (routers, rotary embeddings) need to know where the rows they see sit
in the component's sequence. A pre-hook on the thinker and on the talker notes, for every forward,
the cache length before it (the first position), the number of new positions, and the input ids.

`model_lock(model)` is the one lock of a model: `lab.forward`, `lab.generate`, each step of a
stream and the patching sweep's swap of the text model's layers hold it, so two threads never run
(or rearrange) one model at once. It is re-entrant: a thread holding it may call the lab again.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from .sites import component_module

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The lock of `model` (one per model, made on first use; re-entrant)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@dataclass
class Forward:
    component: str
    phase: str  # prefill | decode
    step: int  # 0 for prefill, then 1, 2, ... per decode forward
    start: int  # position of the first new row in the component's sequence
    length: int  # number of new rows
    input_ids: torch.Tensor | None  # [length] (thinker ids, or the talker's codebook-0 ids), or None
    batch: int = 1  # rows of a batched forward (batched collection); router rows are [batch * length]
    batch_input_ids: torch.Tensor | None = None  # [batch, length]: every row's thinker ids, when batch > 1


@dataclass
class ForwardTracker:
    """Keeps the current Forward of each component while its hooks are installed."""

    model: torch.nn.Module
    current: dict[str, Forward] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    talker_input_ids: torch.Tensor | None = None
    thread: int | None = None  # follow only forwards run by this thread (None: any)
    _handles: list = field(default_factory=list)

    def install(self) -> ForwardTracker:
        for component in ("thinker", "talker"):
            module = component_module(self.model, component)
            if module is not None:
                self._handles.append(
                    module.register_forward_pre_hook(self._pre_hook(component), with_kwargs=True)
                )
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, component: str):
        def hook(module, args, kwargs):
            if self.thread is not None and threading.get_ident() != self.thread:
                return
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            start = int(cache.get_seq_length()) if cache is not None else 0
            length = int(input_ids.shape[1]) if input_ids is not None else int(embeds.shape[1])
            if component == "talker" and kwargs.get("talker_input_ids") is not None:
                self.talker_input_ids = kwargs["talker_input_ids"][0]
            if start == 0:
                self.steps[component] = 0
                phase = "prefill"
            else:
                self.steps[component] = self.steps.get(component, 0) + 1
                phase = "decode"
            ids = (
                input_ids[0].detach()
                if input_ids is not None
                and component == "thinker"
                or (input_ids is not None and phase == "decode")
                else None
            )
            batch = int((input_ids if input_ids is not None else embeds).shape[0])
            rows = input_ids.detach() if batch > 1 and ids is not None else None
            self.current[component] = Forward(
                component, phase, self.steps[component], start, length, ids, batch, rows
            )

        return hook
