"""Interventions at the router (experts are fused weights) and at the rotary inputs.

    with lab.intervene(ablate={"thinker": {10: [3, 7]}}, modality="audio"): ...   # no audio token reaches 3, 7
    with lab.intervene(force={"talker": {2: [5]}}): ...                            # every token takes expert 5
    with lab.intervene(positions="temporal_only"): ...                              # h = w = t
    with lab.intervene(replay=trace): ...                                           # route exactly as recorded
    with lab.intervene(set={"resid.2": clean}, add={"mlp.1": v}, at=[3, 4]): ...  # patch / steer (patch.py)

A router hook re-selects the top-k from the router's own softmax, with ablated experts excluded,
forced experts included, or the recorded experts taken; the weights are the router's probabilities
of the chosen experts, renormalized where the router renormalizes (`norm_topk_prob`). `set`/`add`
change a site's output (omnilab.instrument.patch says where and with what shapes). Hooks run
before any recording hook, so a trace records what the model really used. Everything is removed
on exit; contexts nest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import InterventionError
from ..trace import MODALITIES
from .context import ForwardTracker
from .edits import Edits
from .patch import apply_patch, build_patches, check_positions, resolve_prompt_positions
from .record.tokens import special_tokens
from .sites import find_sites, rotary


class Intervention:
    """A context manager that changes routing, positions and/or site outputs while it is open."""

    def __init__(
        self,
        lab,
        *,
        ablate: dict | None = None,
        force: dict | None = None,
        modality: str | None = None,
        positions: str | Callable | None = None,
        replay=None,
        set: dict | None = None,  # noqa: A002  (the word a researcher types: lab.intervene(set=...))
        add: dict | None = None,
        edit: dict | None = None,
        at=None,
    ):
        if at is not None and set is None and add is None and edit is None:
            raise InterventionError(
                "at= chooses where set=/add=/edit= apply; give set= or add= (or edit=) with it"
            )
        if not any(x is not None for x in (ablate, force, positions, replay, set, add, edit)):
            raise InterventionError(
                "nothing to do: give ablate=, force=, positions=, replay=, set=, add= or edit="
            )
        if modality is not None and modality not in MODALITIES:
            raise InterventionError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
        if isinstance(positions, str) and positions != "temporal_only":
            raise InterventionError(
                f"unknown positions {positions!r}; use 'temporal_only' or a callable on (t, h, w)"
            )
        self.lab = lab
        self.model = getattr(lab, "model", lab)  # a lab, or a bare Qwen3-Omni model (training uses one)
        self.modality = modality
        self.positions = positions
        self._special = special_tokens(self.model)  # token ids -> modality
        self._routers = {
            (s.component, s.layer): s.module for s in find_sites(self.model) if s.kind == "router"
        }
        self.ablate = self._check(ablate or {}, "ablate")
        self.force = self._check(force or {}, "force")
        self.replay = self._replay_table(replay) if replay is not None else {}
        self.at = check_positions(at)
        self._tracker = ForwardTracker(self.model)
        # edit= (functions), and set=/add= at head and expert sites (attn.L.z, expert.L.E): edits.py
        self.edits = Edits(self, set=set, add=add, edit=edit)
        self.patches = build_patches(self.model, self.edits.set_rest, self.edits.add_rest, self.at)
        self._prompt: dict[str, int] = {}  # component -> its prompt length, noted at its prefill
        self._predictor = 0  # where the code predictor's current forward starts in its sequence
        self._handles: list = []

    def _check(self, spec: dict, what: str) -> dict:
        out = {}
        if not isinstance(spec, dict):
            raise InterventionError(
                f"{what} is {{component: {{layer: [experts]}}}}; got {type(spec).__name__}"
            )
        for component, layers in spec.items():
            if not isinstance(layers, dict):
                raise InterventionError(f"{what}[{component!r}] is {{layer: [experts]}}")
            for layer, experts in layers.items():
                router = self._routers.get((component, int(layer)))
                if router is None:
                    have = sorted(layer for c, layer in self._routers if c == component)
                    raise InterventionError(
                        f"{what}: no {component} router at layer {layer}; "
                        f"{component} has routers at layers {have[0]}..{have[-1]}"
                        if have
                        else f"{what}: this model has no {component} routers"
                    )
                experts = [
                    int(e) for e in (experts if isinstance(experts, (list, tuple, set)) else [experts])
                ]
                bad = [e for e in experts if not 0 <= e < router.num_experts]
                if bad:
                    raise InterventionError(
                        f"{what}: experts {bad} out of range at {component} layer {layer} "
                        f"(0..{router.num_experts - 1})"
                    )
                if what == "force" and len(experts) > router.top_k:
                    raise InterventionError(
                        f"force: {len(experts)} experts at {component} layer {layer}, "
                        f"but each token takes only top-{router.top_k}"
                    )
                out[(component, int(layer))] = experts
        return out

    def _replay_table(self, trace) -> dict:
        routing = trace.routing
        if len(routing) == 0:
            raise InterventionError(
                "replay: the trace has no routing (record it with capture=('routing', ...))"
            )
        table = {}
        for (component, layer), group in routing.groupby(["component", "layer"], sort=False):
            if (component, int(layer)) not in self._routers:
                raise InterventionError(
                    f"replay: the trace has {component} layer {layer}, which this model lacks"
                )
            group = group.sort_values(["pos", "rank"])
            k = int(group["rank"].max()) + 1
            pos = group["pos"].to_numpy()[::k]
            experts = group["expert"].to_numpy().reshape(-1, k)
            table[(component, int(layer))] = dict(zip(pos.tolist(), experts, strict=True))
        return table

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> Intervention:
        self._tracker.install()
        try:
            keys = set(self.ablate) | set(self.force) | set(self.replay)
            for key in keys:
                self._handles.append(
                    self._routers[key].register_forward_hook(self._router_hook(*key), prepend=True)
                )
            self._handles += self.edits.install()  # before the patches: at one site set/add run first
            for patch in self.patches:
                self._handles += self._patch_hooks(patch)
            if any(p.site.component == "code_predictor" for p in self.patches):
                predictor = self.model.talker.code_predictor.model  # its own sequence: where it starts
                self._handles.append(
                    predictor.register_forward_pre_hook(self._predictor_start, with_kwargs=True)
                )
            if self.positions is not None:
                for component in ("thinker", "talker"):
                    module = rotary(self.model, component)
                    if module is not None:
                        self._handles.append(
                            module.register_forward_pre_hook(
                                self._rotary_hook(component), prepend=True, with_kwargs=True
                            )
                        )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracker.remove()

    # -- hooks -----------------------------------------------------------------------------------
    def _rows(self, component: str, n: int) -> torch.Tensor | None:
        """Which of the current forward's `n` rows (batch x length, flattened) the intervention
        applies to (None: all); refuses rather than match nothing when it cannot tell."""
        if self.modality is None:
            return None
        if component == "code_predictor":  # it completes each frame's codes: every row is speech
            return torch.full((n,), self.modality == "speech", dtype=torch.bool)
        forward = self._tracker.current.get(component)
        if forward is None:  # the router ran inside a submodule called directly: no token ids to go by
            raise InterventionError(
                f"modality={self.modality!r} needs each row's token, but this {component} forward was "
                f"not seen: run it through the lab (generate, forward, stream) or call model.{component}(...), "
                "not one of its submodules"
            )
        if component == "talker" and forward.phase == "decode":  # every talker decode row is speech
            return torch.full((n,), self.modality == "speech", dtype=torch.bool)
        ids = forward.input_ids
        if forward.batch > 1 and forward.batch_input_ids is not None:  # rows are [batch * length]
            ids = forward.batch_input_ids
        if component == "talker" and forward.phase == "prefill":
            ids = self._tracker.talker_input_ids
        if ids is None or ids.numel() != n:
            have = "no token ids" if ids is None else f"token ids for {ids.numel()} rows"
            raise InterventionError(
                f"modality={self.modality!r}: this {component} {forward.phase} forward has {n} rows but "
                f"{have}, so which rows are {self.modality} tokens is unknown; run it with input_ids "
                "(through the lab: generate, forward, stream), or leave modality= out"
            )
        # the prompts hold no speech tokens: speech is generated, so a speech mask is all False here
        return self._special.modality_mask(ids.reshape(-1).cpu(), self.modality)

    def _router_hook(self, component: str, layer: int):
        key = (component, layer)

        def hook(module, args, output):
            logits, weights, indices = output
            n, k = indices.shape
            probs = torch.softmax(logits.float(), dim=-1)
            rows = self._rows(component, n)
            rows = torch.ones(n, dtype=torch.bool) if rows is None else rows
            rows = rows.to(logits.device)
            new_indices = indices
            if key in self.ablate or key in self.force:
                score = probs.clone()
                if key in self.ablate:
                    score[:, self.ablate[key]] = torch.where(
                        rows[:, None],
                        torch.full_like(score[:, self.ablate[key]], -1.0),
                        score[:, self.ablate[key]],
                    )
                if key in self.force:
                    score[:, self.force[key]] = torch.where(
                        rows[:, None],
                        torch.full_like(score[:, self.force[key]], 2.0),
                        score[:, self.force[key]],
                    )
                new_indices = torch.topk(score, k, dim=-1).indices
                new_indices = torch.where(rows[:, None], new_indices, indices)
            if key in self.replay:
                new_indices = torch.where(rows[:, None], self._replayed(key, n, indices), new_indices)
            new_weights = probs.gather(-1, new_indices)
            if module.norm_topk_prob:
                new_weights = new_weights / new_weights.sum(-1, keepdim=True)
            return logits, new_weights.to(weights.dtype), new_indices

        return hook

    def _replayed(self, key: tuple[str, int], n: int, indices: torch.Tensor) -> torch.Tensor:
        """The recorded experts [n, k] of this forward's rows; refuses a forward the trace did not record."""
        component, layer = key
        forward = self._tracker.current.get(component)
        if forward is None:
            raise InterventionError(
                f"replay: this {component} layer {layer} router ran in a forward that was not seen, so "
                "its positions are unknown; run it through the lab (generate, forward, stream)"
            )
        if forward.batch != 1:
            raise InterventionError(
                f"replay: a trace records one sequence, and this {component} forward has {forward.batch} "
                "rows; replay it into a forward of one conversation"
            )
        recorded = self.replay[key]
        wanted = [recorded.get(p) for p in range(forward.start, forward.start + n)]
        missing = [forward.start + i for i, w in enumerate(wanted) if w is None]
        if missing:
            have = f"{min(recorded)}..{max(recorded)}" if recorded else "none"
            raise InterventionError(
                f"replay: the trace has no {component} layer {layer} routing at positions "
                f"{missing[0]}..{missing[-1]} (it recorded positions {have}); replay a trace of the same "
                "conversation, generating no more tokens or frames than it did"
            )
        k = indices.shape[1]
        if any(len(w) != k for w in wanted):
            raise InterventionError(
                f"replay: the trace routes {component} layer {layer} to top-{len(wanted[0])}, "
                f"this model to top-{k}"
            )
        return torch.as_tensor(np.stack(wanted), device=indices.device, dtype=indices.dtype)

    def _patch_hooks(self, patch) -> list:
        """Install the hooks that apply `patch`: at a module's output, its input, or resid_mid."""
        component, module = patch.site.component, patch.site.module

        def at_output(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = self._patched(patch, component, hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        def at_input(module, args, kwargs):
            if not args:
                raise InterventionError(
                    f"{patch.mode}: {patch.key} is {patch.site.name}'s input, which came as a keyword; "
                    "patch the previous module's output instead"
                )
            return (self._patched(patch, component, args[0]), *args[1:]), kwargs

        if patch.site.kind == "resid_mid":
            return self._resid_mid_hooks(patch)
        if patch.inputs:
            return [module.register_forward_pre_hook(at_input, prepend=True, with_kwargs=True)]
        return [module.register_forward_hook(at_output, prepend=True)]

    def _resid_mid_hooks(self, patch) -> list:
        """resid_mid = the layer's input x + its attention output a: patched as a' = mid' - x where the
        patch changed mid (elsewhere a itself, so rows left alone stay bit for bit)."""
        component, index = patch.site.component, patch.site.layer
        layer = next(
            s.module
            for s in find_sites(self.model)
            if s.kind == "residual" and s.component == component and s.layer == index
        )
        entering: list[torch.Tensor] = []

        def keep(module, args, kwargs):
            entering[:] = [args[0] if args else kwargs["hidden_states"]]

        def change(module, args, output):
            attn = output[0] if isinstance(output, tuple) else output
            x = entering[0]
            mid = x + attn
            new_mid = self._patched(patch, component, mid)
            if new_mid is mid:
                return None
            new = torch.where(new_mid != mid, new_mid - x, attn)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return [
            layer.register_forward_pre_hook(keep, prepend=True, with_kwargs=True),
            layer.self_attn.register_forward_hook(change, prepend=True),
        ]

    def _predictor_start(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        self._predictor = int(cache.get_seq_length()) if cache is not None else 0

    def _patched(self, patch, component: str, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [batch, seq, width] of the current forward with `patch` applied."""
        forward = self._tracker.current.get(component)
        batch, seq = hidden.shape[:2]
        if component == "code_predictor":  # positions in its own 16-position sequence, per frame
            start = self._predictor
            if start == 0:
                self._prompt[component] = seq
        elif forward is not None:  # a head may see only the forward's last rows (logits_to_keep)
            start = forward.start + forward.length - seq
            if forward.phase == "prefill":
                self._prompt[component] = forward.length
        else:  # a submodule called directly: a sequence of its own, from position 0
            start = 0
            self._prompt[component] = seq
        at = self.at
        if at is not None:
            at = resolve_prompt_positions(at, self._prompt.get(component, seq), component)
        if forward is not None and component != "code_predictor" and seq < forward.length:
            rows = self._rows(component, batch * forward.length)  # of the whole forward: keep the last
            rows = None if rows is None else rows.reshape(batch, forward.length)[:, -seq:]
        else:
            rows = self._rows(component, batch * seq)
        return apply_patch(patch, hidden, start, at, None if rows is None else rows.reshape(batch, seq))

    def _rotary_hook(self, component: str):
        """Rewrite the (t, h, w) position ids the rotary embedding receives (of `modality`'s rows only)."""

        def hook(module, args, kwargs):
            if len(args) >= 2:
                position_ids = args[1]
            elif "position_ids" in kwargs:
                position_ids = kwargs["position_ids"]
            else:
                raise InterventionError(
                    f"positions=: the {component}'s rotary embedding was called without position ids, so "
                    "there is nothing to rewrite (transformers changed how it calls rotary_emb)"
                )
            if position_ids.dim() == 2:  # [batch, seq]: plain positions, the same on every axis
                position_ids = position_ids[None].expand(3, -1, -1)
            t, h, w = position_ids[0], position_ids[1], position_ids[2]
            if self.positions == "temporal_only":
                new = torch.stack([t, t, t])
            else:
                result = self.positions(t, h, w)
                if not (isinstance(result, (tuple, list)) and len(result) == 3):
                    raise InterventionError(
                        "a positions callable returns (t, h, w), each shaped like its input"
                    )
                new = torch.stack(
                    [torch.as_tensor(r, device=t.device, dtype=t.dtype).expand_as(t) for r in result]
                )
            rows = self._rows(component, t.numel())
            if rows is not None:
                new = torch.where(rows.reshape(t.shape).to(t.device)[None], new, position_ids)
            if len(args) >= 2:
                return (args[0], new, *args[2:]), kwargs
            return args, {**kwargs, "position_ids": new}

        return hook
