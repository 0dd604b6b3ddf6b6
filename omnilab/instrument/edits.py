"""Edits as functions, and set/add at head and expert sites, inside `lab.intervene`.

    double = lambda values, rows: values * 2
    with lab.intervene(edit={"resid.3": double}): ...                        # every forward, every row
    with lab.intervene(edit={"attn.2.z.1": lambda v, rows: 0 * v}, modality="audio"): ...  # one head
    with lab.intervene(set={"expert.1.7": torch.zeros(64)}): ...             # expert 7's output zeroed

`fn(values, rows)` receives the site's tensor for the rows it applies to and returns the new one,
shaped, typed and placed like `values` (anything else is refused by name). `rows` is a DataFrame,
row i describing values[i]: component, phase (prefill | decode), step, pos (in the component's own
sequence), modality, batch (the row of a batched forward); at expert sites also rank and weight (the
router's). `at=` and `modality=` of the intervention choose the rows, as for set/add. Values:

- residual, attention and MLP sites of the thinker, talker and code predictor (resid.L, attn.L,
  mlp.L, talker.resid.L, code_predictor.resid.L, resid_pre.L / resid_mid.L / resid_post.L, and
  ":input" sites): [rows, width];
- heads (attn.L.z): [rows, heads, head_dim]; one head (attn.L.z.H): [rows, head_dim];
- experts (expert.L.E): [routed rows, hidden], the expert's output before the router's weight.

Order, within one `lab.intervene`: the routing interventions (ablate/force/replay) act at the router,
inside the MLP, so before anything at or after that MLP's output; heads and experts are changed
inside their layer, before the layer's output; at one site `set=`, then `add=`, then `edit=` (an
edit sees the patched values); several edits at one site run in the order given (a list of
functions is one site's chain). Nested contexts: the inner one's changes run first at a site. The
hooks run before any recording hook, so a trace records the edited values; the edited tensor is a
new one (the model's own is never written in place), and autograd flows through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import InterventionError
from .patch import resolve_prompt_positions
from .record.tokens import special_tokens
from .sites import Site, find_sites, resolve_sites, site_tensor
from .units import Unit, expert_output, is_unit, resolve_unit

EDITABLE_KINDS = ("residual", "attention", "mlp", "resid_pre", "resid_mid", "resid_post")
EDITABLE_COMPONENTS = ("thinker", "talker", "code_predictor")
INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class Change:
    """One change at one site or unit: mode "set" | "add" (a tensor) or "edit" (a function)."""

    key: str  # as the user named it
    mode: str
    value: torch.Tensor | None = None
    fn: Callable | None = None

    def apply(self, values: torch.Tensor, rows: pd.DataFrame, at: list[int] | None) -> torch.Tensor:
        """The new values of `values` [n, ...] (rows `rows`)."""
        if self.mode == "edit":
            new = self.fn(values, rows)
            _check_result(self.key, values, new)
            return new
        value = self.value.to(values.device, values.dtype)
        if value.ndim == values.ndim - 1:  # one row, everywhere it applies
            new = value.expand_as(values)
            return values + new if self.mode == "add" else new.clone()
        # rows: one per position of at=, or one per prompt position; rows without one are left alone
        pos = rows["pos"].to_numpy()
        prefill = (rows["phase"] == "prefill").to_numpy()
        if at is not None:
            lookup = {p: i for i, p in enumerate(at)}
            index = np.array([lookup.get(int(p), -1) for p in pos])
        else:
            index = np.where(pos < value.shape[0], pos, -1)
        index = np.where(prefill, index, -1)
        hit = np.flatnonzero(index >= 0)
        if not len(hit):
            return values
        where = torch.as_tensor(hit, device=values.device)
        source = value[torch.as_tensor(index[hit], device=values.device)]
        new = values.clone()
        new[where] = values[where] + source if self.mode == "add" else source
        return new


def _check_result(key: str, values: torch.Tensor, new) -> None:
    if not isinstance(new, torch.Tensor):
        raise InterventionError(
            f"edit[{key!r}] returned {type(new).__name__}, not a tensor: return the new values, a tensor "
            f"shaped like `values` {tuple(values.shape)}"
        )
    if new.shape != values.shape:
        raise InterventionError(
            f"edit[{key!r}] returned shape {tuple(new.shape)}; the site's values are "
            f"{tuple(values.shape)}: return a tensor of the same shape (one row per row of `rows`)"
        )
    if new.dtype != values.dtype:
        raise InterventionError(
            f"edit[{key!r}] returned dtype {new.dtype}; the site's values are {values.dtype}: "
            "cast with .to(values.dtype)"
        )
    if new.device != values.device:
        raise InterventionError(
            f"edit[{key!r}] returned a tensor on {new.device}; the site's values are on {values.device}: "
            "move it with .to(values.device)"
        )


def _as_value(key: str, mode: str, value, shape: tuple[int, ...], at) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InterventionError(f"{mode}[{key!r}] is not a tensor ({type(value).__name__})") from error
    if tuple(value.shape) == shape or (value.ndim == len(shape) + 1 and tuple(value.shape[1:]) == shape):
        if value.ndim > len(shape) and at is not None and value.shape[0] != len(at):
            raise InterventionError(
                f"{mode}[{key!r}] has {value.shape[0]} rows but at= names {len(at)} positions: give "
                f"[{len(at)}, {', '.join(map(str, shape))}] or one row {list(shape)}"
            )
        return value.detach()
    raise InterventionError(
        f"{mode}[{key!r}] has shape {tuple(value.shape)}; {key} takes one row {list(shape)} (applied to "
        f"every row) or rows [positions, {', '.join(map(str, shape))}]"
    )


def _edit_fns(key: str, fn) -> list[Callable]:
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    bad = [f for f in fns if not callable(f)]
    if bad or not fns:
        raise InterventionError(
            f"edit[{key!r}] is {type(fn).__name__}; give a function fn(values, rows) -> new values "
            "(or a list of them, applied in order)"
        )
    return fns


class Edits:
    """The edit= functions of one Intervention, and its set=/add= at head and expert sites.

    `set_rest` / `add_rest`: what remains of set= / add= for the site patches (omnilab.instrument.patch).
    """

    def __init__(self, intervention, *, set=None, add=None, edit=None):  # noqa: A002
        self.intervention = intervention
        self.model = intervention.model
        at = intervention.at
        self.set_rest = {k: v for k, v in (set or {}).items() if not is_unit(k)} if set is not None else None
        self.add_rest = {k: v for k, v in (add or {}).items() if not is_unit(k)} if add is not None else None
        self.sites: dict[str, tuple[Site, bool, list[Change]]] = {}  # site name + point -> changes
        self.units: dict[str, tuple[Unit, list[Change]]] = {}
        for mode, spec in (("set", set), ("add", add)):
            if spec is not None and not isinstance(spec, dict):
                raise InterventionError(f"{mode} is {{site: tensor}}; got {type(spec).__name__}")
            for key, value in (spec or {}).items():
                if is_unit(key):
                    unit = resolve_unit(self.model, key)
                    change = Change(key, mode, _as_value(key, mode, value, unit.shape, at))
                    self.units.setdefault(unit.alias, (unit, []))[1].append(change)
        if edit is not None and not isinstance(edit, dict):
            raise InterventionError(f"edit is {{site: fn(values, rows)}}; got {type(edit).__name__}")
        for key, fn in (edit or {}).items():
            fns = _edit_fns(key, fn)
            if is_unit(key):
                unit = resolve_unit(self.model, key)
                self.units.setdefault(unit.alias, (unit, []))[1].extend(
                    Change(key, "edit", fn=f) for f in fns
                )
                continue
            inputs = isinstance(key, str) and key.endswith(INPUT_SUFFIX)
            for site in resolve_sites(self.model, key[: -len(INPUT_SUFFIX)] if inputs else key):
                if site.kind not in EDITABLE_KINDS or site.component not in EDITABLE_COMPONENTS:
                    raise InterventionError(
                        f"edit: {site.alias} is a {site.component} {site.kind} site; edit= works at thinker, "
                        "talker and code predictor residual, attention and MLP sites (resid.L, attn.L, "
                        "mlp.L, talker.resid.L, code_predictor.resid.L ...), heads (attn.L.z) and experts "
                        "(expert.L.E); routers take ablate=/force="
                    )
                point = inputs or getattr(site, "point", "output") == "input"
                slot = self.sites.setdefault(f"{site.name}|{point}", (site, point, []))
                slot[2].extend(Change(key, "edit", fn=f) for f in fns)
        self.prepend = True  # run before other hooks at a site; False: after them (units.capture reads)
        self._special = special_tokens(self.model)  # token ids -> modality
        self._prompt: dict[str, int] = {}
        self._predictor = (0, 1)

    def __bool__(self) -> bool:
        return bool(self.sites or self.units)

    # -- install -----------------------------------------------------------------------------------
    def install(self) -> list:
        """Register the hooks (prepended, so they run before recorders); returns their handles."""
        handles = []
        if any(site.component == "code_predictor" for site, _, _ in self.sites.values()):
            predictor = self.model.talker.code_predictor.model
            handles.append(predictor.register_forward_pre_hook(self._predictor_start, with_kwargs=True))
        for site, point, changes in self.sites.values():
            handles += self._site_hooks(site, point, changes)
        by_module: dict[int, list] = {}
        for unit, changes in self.units.values():
            by_module.setdefault(id(unit.module), []).append((unit, changes))
        for group in by_module.values():
            unit = group[0][0]
            if unit.kind == "heads":
                handles.append(
                    unit.module.register_forward_pre_hook(self._heads_hook(group), prepend=self.prepend)
                )
            else:
                stash: list = []
                handles.append(
                    unit.module.register_forward_pre_hook(
                        self._experts_pre(group, stash), prepend=self.prepend
                    )
                )
                handles.append(
                    unit.module.register_forward_hook(self._experts_post(stash), prepend=self.prepend)
                )
        return handles

    def _predictor_start(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeds = kwargs.get("inputs_embeds")
        start = int(cache.get_seq_length()) if cache is not None else 0
        self._predictor = (start, int(embeds.shape[1]) if embeds is not None else 1)

    def _site_hooks(self, site: Site, point: bool, changes: list[Change]) -> list:
        component = site.component

        def edited(hidden: torch.Tensor) -> torch.Tensor:
            batch, seq = hidden.shape[:2]
            flat = hidden.reshape(batch * seq, *hidden.shape[2:])
            new = self._run(changes, flat, component, batch, seq)
            return hidden if new is flat else new.reshape(hidden.shape)

        if site.kind == "resid_mid":  # the layer's input x + its attention output a: change a
            layer = next(
                s.module
                for s in find_sites(self.model)
                if s.kind == "residual" and s.component == component and s.layer == site.layer
            )
            entering: list = []

            def keep(module, args, kwargs):
                entering[:] = [args[0] if args else kwargs["hidden_states"]]

            def change(module, args, output):
                attn = site_tensor(output)
                mid = entering[0] + attn
                new_mid = edited(mid)
                if new_mid is mid:
                    return None
                new = torch.where(new_mid != mid, new_mid - entering[0], attn)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            return [
                layer.register_forward_pre_hook(keep, prepend=self.prepend, with_kwargs=True),
                layer.self_attn.register_forward_hook(change, prepend=self.prepend),
            ]
        if point:

            def at_input(module, args, kwargs):
                if args:
                    return (edited(args[0]), *args[1:]), kwargs
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": edited(kwargs["hidden_states"])}
                raise InterventionError(f"edit: {site.alias}'s input was not found in its call")

            return [site.module.register_forward_pre_hook(at_input, prepend=self.prepend, with_kwargs=True)]

        def at_output(module, args, output):
            hidden = site_tensor(output)
            new = edited(hidden)
            if new is hidden:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return [site.module.register_forward_hook(at_output, prepend=self.prepend)]

    def _heads_hook(self, group: list):
        unit = group[0][0]

        def hook(module, args):
            x = args[0]  # [batch, seq, heads * head_dim]
            batch, seq = x.shape[:2]
            z = x.reshape(batch * seq, unit.heads, unit.head_dim)
            new = z
            for member, changes in group:  # all heads first, then single heads, as given
                if member.index is None:
                    new = self._run(changes, new, unit.component, batch, seq)
            for member, changes in group:
                if member.index is not None:
                    part = new[:, member.index]
                    changed = self._run(changes, part, unit.component, batch, seq)
                    if changed is not part:
                        new = new.clone()  # never write into the model's tensor (or an edit's view of it)
                        new[:, member.index] = changed
            if new is z:
                return None
            return (new.reshape(x.shape), *args[1:])

        return hook

    def _experts_pre(self, group: list, stash: list):
        experts = group[0][0].module
        component = group[0][0].component

        def hook(module, args):
            stash.clear()
            hidden, index, weights = args[0], args[1], args[2]
            n = hidden.shape[0]
            forward = self.intervention._tracker.current.get(component)
            seq = forward.length if forward is not None and forward.length and n % forward.length == 0 else n
            rows, keep = self._rows(component, n // seq, seq)
            new_weights = weights
            for unit, changes in group:
                token, rank = torch.where(index == unit.index)
                chosen = keep[token.cpu().numpy()]
                if not chosen.any():
                    continue
                pick = torch.as_tensor(np.flatnonzero(chosen), device=token.device)
                token, rank = token[pick], rank[pick]
                weight = weights[token, rank]
                routed = rows.iloc[token.cpu().numpy()].reset_index(drop=True)
                routed["rank"] = rank.cpu().numpy().astype(np.int32)
                routed["weight"] = weight.detach().float().cpu().numpy()
                values = expert_output(experts, hidden[token], unit.index)
                new = values
                for change in changes:
                    new = change.apply(new, routed, self._at(component))
                if new is values:
                    continue
                if new_weights is weights:
                    new_weights = weights.clone()
                new_weights[token, rank] = 0
                stash.append((token, weight, new))
            if new_weights is weights:
                return None
            return (hidden, index, new_weights, *args[3:])

        return hook

    def _experts_post(self, stash: list):
        def hook(module, args, output):
            if not stash:
                return None
            out = output
            for token, weight, new in stash:
                term = (new * weight[:, None].to(new.dtype)).to(out.dtype)
                out = out.index_add(0, token, term)
            stash.clear()
            return out

        return hook

    # -- rows --------------------------------------------------------------------------------------
    def _run(self, changes: list[Change], values: torch.Tensor, component: str, batch: int, seq: int):
        """`values` [batch * seq, ...] with `changes` applied to the rows the intervention chooses."""
        rows, keep = self._rows(component, batch, seq)
        if not keep.any():
            return values
        every = bool(keep.all())
        where = None if every else torch.as_tensor(np.flatnonzero(keep), device=values.device)
        part = values if every else values.index_select(0, where)
        part_rows = rows if every else rows.iloc[np.flatnonzero(keep)].reset_index(drop=True)
        new = part
        at = self._at(component)
        for change in changes:
            new = change.apply(new, part_rows, at)
        if new is part:
            return values
        if every:
            return new
        return values.index_copy(0, where, new)

    def _at(self, component: str) -> list[int] | None:
        at = self.intervention.at
        if at is None:
            return None
        return resolve_prompt_positions(at, self._prompt[component], component)  # noted by _rows

    def _rows(self, component: str, batch: int, seq: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The rows table of the current forward's batch x seq rows, and which of them to change."""
        tracker = self.intervention._tracker
        ids = None
        if component == "code_predictor":
            start = self._predictor[0]
            talker = tracker.current.get("talker")
            phase, step = ("prefill" if start == 0 else "decode"), (talker.step if talker else 0)
        else:
            forward = tracker.current.get(component)
            start = forward.start if forward is not None and forward.length == seq else 0
            phase = forward.phase if forward is not None else "prefill"
            step = forward.step if forward is not None else 0
            if forward is not None:
                ids = forward.batch_input_ids if batch > 1 else forward.input_ids
                if component == "talker":
                    ids = tracker.talker_input_ids if phase == "prefill" else None
        if start == 0:
            self._prompt[component] = seq
        n = batch * seq
        pos = np.tile(np.arange(start, start + seq), batch)
        if component == "code_predictor" or (component == "talker" and phase == "decode"):
            modality = np.full(n, "speech", dtype=object)
        else:
            modality = np.full(n, "text", dtype=object)
            if ids is not None and ids.numel() == n:
                modality = self._special.modality_names(ids.reshape(-1))
        rows = pd.DataFrame(
            {
                "component": component,
                "phase": phase,
                "step": np.full(n, step, dtype=np.int32),
                "pos": pos.astype(np.int32),
                "modality": modality,
                "batch": np.repeat(np.arange(batch, dtype=np.int32), seq),
            }
        )
        keep = np.ones(n, dtype=bool)
        at = self.intervention.at
        if at is not None:
            resolved = resolve_prompt_positions(at, self._prompt.get(component, seq), component)
            keep &= np.isin(pos, resolved) & (phase == "prefill")
        wanted = self.intervention.modality
        if wanted is not None:
            keep &= modality == wanted
        return rows, keep
