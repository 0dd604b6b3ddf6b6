"""The recording engine: recorders attached to a model, fed every forward with its place in the turn.

A `Recorder` records one kind of capture. `attach(recording)` hooks the sites it needs through the
`Recording` (`recording.on_output(module, component, receive)` for a module's output,
`recording.on_input(...)` for its inputs); the Recording's ForwardTracker tells each `receive` which
forward is running (component, phase, step, first position, length, input ids), and every recorder
hears `end_forward(forward)` once that forward of the thinker or talker has finished (the place to
move a forward's device tensors to the host in one go). `tables(turn)` gives its tables as column
arrays in the Trace's schema. The Tracer, `generate` (speech codes) and `stream` record only
through recorders; a new capture (any module's activations) is one more Recorder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..context import Forward, ForwardTracker
from ..sites import component_module

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class Turn:
    """What tables need to know of the turn besides the forwards.

    tokenizer: the processor's tokenizer (token text); prompt_length: the thinker's prompt length;
    token_ids: the generated thinker ids (the last is never fed back, yet belongs in the tokens table);
    batch_row: this turn's tables are row `batch_row` of a batched forward (right padded: each
    recorder keeps that row's first `prompt_length` prefill positions); 0 for a forward of one row.
    """

    tokenizer: object
    prompt_length: int | None = None
    token_ids: tuple[int, ...] = ()
    batch_row: int = 0


class Recorder:
    """One kind of capture. Subclasses hook sites in `attach` and build their tables in `tables`."""

    kind = ""
    follows_forwards = True  # needs the ForwardTracker (which forward is running) and end_forward

    def attach(self, recording: Recording) -> None:
        """Hook the sites this recorder needs (through `recording`, which removes the hooks)."""

    def end_forward(self, forward: Forward) -> None:
        """One forward of `forward.component` has finished."""

    def detach(self) -> None:
        """Undo what `attach` changed beyond hooks (the Recording removes the hooks)."""

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        """The recorded tables as column arrays (name -> columns); empty tables are left out."""
        return {}


class Recording:
    """Recorders attached to `model` while open (`with recording:`); reopening records on.

    `thread`: record only forwards run by this thread (a stream's steps), None: any thread.
    """

    def __init__(self, model: torch.nn.Module, recorders, *, thread: int | None = None):
        self.model = model
        self.recorders = list(recorders)
        self.thread = thread
        self.tracker = ForwardTracker(model, thread=thread)
        self._handles: list = []

    def recorder(self, kind: str) -> Recorder | None:
        return next((r for r in self.recorders if r.kind == kind), None)

    # -- attach / detach ------------------------------------------------------------------------------
    def __enter__(self) -> Recording:
        follow = any(r.follows_forwards for r in self.recorders)
        if follow:
            self.tracker.install()
        try:
            for recorder in self.recorders:
                recorder.attach(self)
            for component in ("thinker", "talker") if follow else ():
                module = component_module(self.model, component)
                if module is not None:
                    self.add_handle(module.register_forward_hook(self._ended(component)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.tracker.remove()
        finally:
            for recorder in self.recorders:
                recorder.detach()

    def add_handle(self, handle) -> None:
        self._handles.append(handle)

    def mine(self) -> bool:
        return self.thread is None or threading.get_ident() == self.thread

    def _ended(self, component: str):
        def hook(module, args, output):
            forward = self.tracker.current.get(component)
            if forward is not None and self.mine():
                for recorder in self.recorders:
                    recorder.end_forward(forward)

        return hook

    # -- hooks recorders ask for ----------------------------------------------------------------------
    def on_output(self, module, component: str, receive: Callable) -> None:
        """Call `receive(forward, output)` after each forward of `module` inside `component`."""

        def hook(mod, args, output):
            forward = self.tracker.current.get(component)
            if forward is not None and self.mine():
                receive(forward, output)

        self.add_handle(module.register_forward_hook(hook))

    def on_input(self, module, component: str, receive: Callable) -> None:
        """Call `receive(forward, args)` before each forward of `module` inside `component`."""

        def hook(mod, args):
            forward = self.tracker.current.get(component)
            if forward is not None and self.mine():
                receive(forward, args)

        self.add_handle(module.register_forward_pre_hook(hook))

    # -- what comes back ------------------------------------------------------------------------------
    def tables(self, turn: Turn) -> dict[str, Columns]:
        """Every recorder's tables (name -> column arrays)."""
        out: dict[str, Columns] = {}
        for recorder in self.recorders:
            out.update({k: v for k, v in recorder.tables(self, turn).items() if v is not None})
        return out


def concat_columns(parts: list[Columns]) -> Columns | None:
    """Tables given as column arrays, one after the other (None for no parts)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
