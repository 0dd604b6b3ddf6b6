"""The Tracer: record routing, positions, codes, attention and stage timings of every forward.

    with lab.trace(capture=("routing", "positions", "codes", "timings")) as tr:
        reply = lab.generate(conversation)
    tr.trace.routing

Hooks are installed on enter and all removed on exit. Everything recorded is what the model itself
computed: the router's own top-k output, the position ids handed to the rotary embedding, the
codes the talker produced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._version import __version__
from ..errors import InterventionError
from ..trace import Columns, Trace
from .context import ForwardTracker
from .sites import component_module, find_sites, rotary
from .tower_attention import TOWERS, TowerAttention

DEFAULT_CAPTURE = ("routing", "positions", "codes", "timings")
CAPTURES = ("routing", "positions", "codes", "timings", "attention", "logits")
# The stages of a turn, in the order they first run (the names of the timings table).
STAGES = (
    "thinker_prefill",
    "thinker_decode",
    "talker_prefill",
    "talker_decode",
    "code_predictor",
    "code2wav",
)
AUDIO_ID, IMAGE_ID, VIDEO_ID = 151675, 151655, 151656
VISION_START_ID, AUDIO_START_ID = 151652, 151669


def active_tracer(lab):
    """The innermost open Tracer of `lab`, or None."""
    stack = getattr(lab, "_tracers", None)
    return stack[-1] if stack else None


def config_hash(model) -> str:
    """A short stable hash of the model's config (identifies the architecture a trace came from).

    Computed once per model: serializing the config costs ~10 ms, paid on every trace otherwise.
    """
    cached = getattr(model, "_omnilab_config_hash", None)
    if cached is None:
        text = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
        cached = hashlib.sha256(text.encode()).hexdigest()[:16]
        model._omnilab_config_hash = cached
    return cached


class Tracer:
    """Records what the model does inside while the context is open; `.trace` after exit."""

    def __init__(self, lab, capture=None, *, attention_layers: dict | None = None, heads=None):
        capture = tuple(
            DEFAULT_CAPTURE if capture is None else ((capture,) if isinstance(capture, str) else capture)
        )
        unknown = set(capture) - set(CAPTURES)
        if unknown:
            raise InterventionError(f"unknown capture {sorted(unknown)}; choose from {', '.join(CAPTURES)}")
        if "attention" in capture and not attention_layers:
            attention_layers = {"thinker": [0]}
        self.lab = lab
        self.model = lab.model
        self.capture = capture
        self.attention_layers = attention_layers or {}
        self.heads = heads
        self.trace: Trace | None = None
        self._handles: list = []
        self._tracker = ForwardTracker(self.model)
        self._reset()

    def _reset(self) -> None:
        self._routing = []  # (component, layer, Forward, indices, weights, entropy, mass, logits|None)
        self._positions = defaultdict(dict)  # component -> start -> [3, L] int64
        self._ids = defaultdict(dict)  # component -> start -> (phase, step, ids | None, length)
        self._codes: list[np.ndarray] = []
        self._attention = []
        self._towers = None
        self._tower_rows = None
        self._times = defaultdict(float)
        self._calls = defaultdict(int)
        self._t0 = {}
        self._prompt = None  # set by begin()
        self._reply = None

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        self._reset()
        self._tracker.install()
        self._install()
        if not hasattr(self.lab, "_tracers"):
            self.lab._tracers = []
        self.lab._tracers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.lab._tracers.remove(self)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._tracker.remove()
            self._restore_attention()
        self.trace = self._build()

    # -- called by OmniLab.generate ---------------------------------------------------------------
    def begin(self, inputs, gathered, *, prompt_length: int, use_audio_in_video: bool) -> None:
        self._prompt = {
            "length": prompt_length,
            "items": gathered.items,
            "use_audio_in_video": use_audio_in_video,
        }

    def end(self, reply) -> None:
        self._reply = reply

    # -- hooks -------------------------------------------------------------------------------
    def _install(self) -> None:
        sites = find_sites(self.model)
        if "routing" in self.capture or "logits" in self.capture:
            for site in sites:
                if site.kind == "router" and site.component in ("thinker", "talker"):
                    self._handles.append(
                        site.module.register_forward_hook(self._router_hook(site.component, site.layer))
                    )
        # Positions key the tokens table, so they are recorded whatever the capture (one small copy per forward).
        for component in ("thinker", "talker"):
            module = rotary(self.model, component)
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._rotary_hook(component)))
        for component in ("thinker", "talker"):
            module = component_module(self.model, component)
            if module is not None:
                self._handles.append(module.register_forward_hook(self._ids_hook(component)))
        if "codes" in self.capture and getattr(self.model, "has_talker", False):
            self._handles.append(self.model.talker.register_forward_hook(self._codes_hook))
        if "timings" in self.capture:
            self._install_timers()
        if "attention" in self.capture:
            self._install_attention(sites)

    def _router_hook(self, component: str, layer: int):
        keep_logits = "logits" in self.capture

        def hook(module, args, output):
            logits, weights, indices = output
            forward = self._tracker.current.get(component)
            if forward is None:
                return
            with torch.no_grad():
                probs = torch.softmax(logits.float(), dim=-1)
                entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
                mass = probs.gather(-1, indices).sum(-1)
            self._routing.append(
                (
                    component,
                    layer,
                    forward.start,
                    forward.phase,
                    indices.detach().to("cpu", torch.int16).numpy(),
                    weights.detach().to("cpu", torch.float16).numpy(),
                    entropy.cpu().numpy().astype(np.float32),
                    mass.cpu().numpy().astype(np.float32),
                    logits.detach().to("cpu", torch.float16).numpy() if keep_logits else None,
                )
            )

        return hook

    def _rotary_hook(self, component: str):
        def hook(module, args):
            position_ids = args[1] if len(args) > 1 else None
            forward = self._tracker.current.get(component)
            if position_ids is None or forward is None:
                return
            pos = position_ids.detach()
            if pos.dim() == 2:  # [B, L]: plain 1-D positions
                pos = pos.unsqueeze(0).expand(3, -1, -1)
            self._positions[component][forward.start] = pos[:3, 0].to("cpu", torch.int64).numpy()

        return hook

    def _ids_hook(self, component: str):
        def hook(module, args, output):
            forward = self._tracker.current.get(component)
            if forward is None:
                return
            ids = forward.input_ids
            if component == "talker" and forward.phase == "prefill":
                ids = self._tracker.talker_input_ids
            ids = None if ids is None else ids.detach().cpu().numpy().astype(np.int64)
            self._ids[component][forward.start] = (forward.phase, forward.step, ids, forward.length)

        return hook

    def _codes_hook(self, module, args, output):
        codes = output.hidden_states[-1] if output.hidden_states is not None else None
        if codes is not None:
            self._codes.append(codes[0].detach().cpu().numpy().astype(np.int64))

    def _install_timers(self) -> None:
        def timed(stage_of, module):
            def pre(mod, args, kwargs):
                self._t0[id(mod)] = time.perf_counter()

            def post(mod, args, kwargs, output):
                elapsed = time.perf_counter() - self._t0.pop(id(mod), time.perf_counter())
                stage = stage_of()
                self._times[stage] += elapsed
                self._calls[stage] += 1

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))

        for component in ("thinker", "talker"):
            module = component_module(self.model, component)
            if module is not None:
                timed(lambda c=component: f"{c}_{self._tracker.current[c].phase}", module)
        if getattr(self.model, "has_talker", False):
            timed(lambda: "code_predictor", self.model.talker.code_predictor)
            timed(lambda: "code2wav", self.model.code2wav)

    # -- attention (opt-in) -------------------------------------------------------------------------
    def _install_attention(self, sites) -> None:
        self._saved_attn = {}
        towers = {c: [int(x) for x in layers] for c, layers in self.attention_layers.items() if c in TOWERS}
        if towers:
            try:
                self._towers = TowerAttention(self.model, towers, heads=self.heads)
            except IndexError as exc:
                raise InterventionError(f"no attention site: {exc}; see lab.sites()") from None
        wanted = {
            (c, int(layer))
            for c, layers in self.attention_layers.items()
            if c not in TOWERS
            for layer in layers
        }
        found = {(s.component, s.layer): s for s in sites if s.kind == "attention"}
        missing = wanted - set(found)
        if missing:
            raise InterventionError(f"no attention site for {sorted(missing)}; see lab.sites()")
        for component in {c for c, _ in wanted}:
            module = component_module(self.model, component) if component in ("thinker", "talker") else None
            if module is None:
                raise InterventionError(
                    f"attention capture covers thinker, talker, audio_tower and vision_tower layers; "
                    f"got {component!r}"
                )
            text_model = module.model.language_model if component == "thinker" else module.model
            self._saved_attn[component] = (text_model, text_model.config._attn_implementation)
            text_model.set_attn_implementation("eager")
        for component, layer in sorted(wanted):
            self._handles.append(
                found[(component, layer)].module.register_forward_hook(self._attention_hook(component, layer))
            )

    def _attention_hook(self, component: str, layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            forward = self._tracker.current.get(component)
            if weights is None or forward is None:
                return
            w = weights[0].detach().float().cpu().numpy()  # [H, Lq, Lk]
            heads = range(w.shape[0]) if self.heads is None else self.heads
            self._attention.append((component, layer, forward.start, [(h, w[h]) for h in heads]))

        return hook

    def _restore_attention(self) -> None:
        towers = getattr(self, "_towers", None)
        if towers is not None:
            towers.remove()
            self._tower_rows = towers.rows()
            self._towers = None
        for text_model, implementation in getattr(self, "_saved_attn", {}).values():
            text_model.set_attn_implementation(implementation)
        self._saved_attn = {}

    # -- tables ----------------------------------------------------------------------------------
    # Tables are built as column arrays in the schema's dtypes (no DataFrames: a collection pays this
    # per sample, and the store writes the arrays to Arrow directly; DataFrames come on first access).
    def _build(self) -> Trace:
        tokens = self._tokens_table()
        tables = {"tokens": tokens, "spans": _spans(tokens)}
        if self._routing:
            tables.update(self._routing_tables())
        if self._codes:
            codes = np.stack(self._codes)
            frames, books = np.meshgrid(np.arange(codes.shape[0]), np.arange(codes.shape[1]), indexing="ij")
            tables["codes"] = {"frame": frames.ravel(), "codebook": books.ravel(), "code": codes.ravel()}
        if self._attention:
            tables["attention"] = self._attention_table()
        if self._tower_rows is not None and len(self._tower_rows["weight"]):
            tables["tower_attention"] = {
                name: np.asarray(values) for name, values in self._tower_rows.items()
            }
        if "timings" in self.capture:
            tables["timings"] = self._timings_table()
        reply = self._reply
        meta = trace_meta(
            self.lab,
            capture=self.capture,
            text=reply.text if reply is not None else "",
            items=self._prompt["items"] if self._prompt else [],
            use_audio_in_video=bool(self._prompt and self._prompt["use_audio_in_video"]),
        )
        audio = reply.audio if reply is not None else None
        return Trace.build(audio=audio, sample_rate=24_000, meta=meta, **tables)

    def _tokens_table(self) -> Columns:
        parts = []
        for component in ("thinker", "talker"):
            rows = self._ids.get(component, {})
            if not rows:
                continue
            ids, phase, step, pos, t, h, w = [], [], [], [], [], [], []
            for start in sorted(rows):
                ph, st, row_ids, length = rows[start]
                if row_ids is None:
                    row_ids = np.full(length, -1, dtype=np.int64)
                positions = self._positions[component].get(start)
                if positions is None:
                    positions = np.tile(np.arange(start, start + length), (3, 1))
                ids.append(row_ids[:length])
                phase.append(np.full(length, ph, dtype=object))
                step.append(np.full(length, st, dtype=np.int32))
                pos.append(np.arange(start, start + length, dtype=np.int32))
                t.append(positions[0]), h.append(positions[1]), w.append(positions[2])
            columns = {
                "component": None,
                "phase": np.concatenate(phase),
                "step": np.concatenate(step),
                "pos": np.concatenate(pos),
                "token_id": np.concatenate(ids),
                "t": np.concatenate(t),
                "h": np.concatenate(h),
                "w": np.concatenate(w),
            }
            if component == "thinker":
                columns = self._append_unfed_tokens(columns)
            columns["component"] = np.full(len(columns["pos"]), component, dtype=object)
            parts.append(_annotate(columns, component, self.lab.processor.tokenizer, _pps(self.model)))
        return concat_columns(parts)

    def _append_unfed_tokens(self, columns: Columns) -> Columns:
        """Generated tokens that were never fed back (the last one) still belong in the trace."""
        reply = self._reply
        if reply is None or self._prompt is None:
            return columns
        length = self._prompt["length"]
        wanted = np.arange(length, length + len(reply.token_ids))
        missing = wanted[~np.isin(wanted, columns["pos"])]
        if len(missing) == 0:
            return columns
        last = int(np.argmax(columns["pos"]))
        offset = missing - columns["pos"][last]
        extra = {
            "component": None,
            "phase": np.full(len(missing), "decode", dtype=object),
            "step": (missing - length + 1).astype(np.int32),
            "pos": missing.astype(np.int32),
            "token_id": np.asarray(reply.token_ids, dtype=np.int64)[missing - length],
            "t": columns["t"][last] + offset,
            "h": columns["h"][last] + offset,
            "w": columns["w"][last] + offset,
        }
        return {c: None if c == "component" else np.concatenate([v, extra[c]]) for c, v in columns.items()}

    def _routing_tables(self) -> dict[str, Columns]:
        # Concatenate the per-forward arrays once per table. Records sorted by (component, layer,
        # start) give rows sorted by (component, layer, pos): a forward's positions are contiguous.
        # One block per component, as thinker and talker pick different k.
        records = sorted(self._routing, key=lambda r: (r[0] != "thinker", r[1], r[2]))
        stats, routing = [], []
        for name in ("thinker", "talker"):
            rows = [r for r in records if r[0] == name]
            if not rows:
                continue
            n_of = [r[4].shape[0] for r in rows]
            block = {
                "component": np.full(sum(n_of), name, dtype=object),
                "layer": np.repeat(np.array([r[1] for r in rows], dtype=np.int16), n_of),
                "pos": np.concatenate(
                    [np.arange(r[2], r[2] + n, dtype=np.int32) for r, n in zip(rows, n_of, strict=True)]
                ),
                "phase": np.repeat(np.array([r[3] for r in rows], dtype=object), n_of),
                "entropy": np.concatenate([r[6] for r in rows]),
                "topk_mass": np.concatenate([r[7] for r in rows]),
            }
            k = rows[0][4].shape[1]
            stats.append(block)
            routing.append(
                {
                    **{c: np.repeat(block[c], k) for c in ("component", "layer", "pos", "phase")},
                    "rank": np.tile(np.arange(k, dtype=np.int8), len(block["pos"])),
                    "expert": np.concatenate([r[4] for r in rows]).ravel(),
                    "weight": np.concatenate([r[5] for r in rows]).ravel(),
                }
            )
        out = {"router_stats": concat_columns(stats), "routing": concat_columns(routing)}
        logits = []
        for name, layer_, start, _, _, _, _, _, raw in records:
            if raw is None:
                continue
            n, e = raw.shape
            logits.append(
                {
                    "component": np.full(n * e, name, dtype=object),
                    "layer": np.full(n * e, layer_, dtype=np.int16),
                    "pos": np.repeat(np.arange(start, start + n, dtype=np.int32), e),
                    "expert": np.tile(np.arange(e, dtype=np.int16), n),
                    "logit": raw.ravel(),
                }
            )
        if logits:
            out["router_logits"] = concat_columns(logits)
        return out

    def _attention_table(self) -> Columns:
        parts = []
        for component, layer, start, heads in self._attention:
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
        return concat_columns(parts)

    def _timings_table(self) -> Columns:
        # The code predictor runs between talker forwards (while preparing the next step's inputs),
        # so the stages do not nest and each is its own time.
        times = dict(self._times)
        stages = [s for s in STAGES if s in times]
        return {
            "stage": np.array(stages, dtype=object),
            "seconds": np.array([times[s] for s in stages], dtype=np.float64),
            "calls": np.array([self._calls[s] for s in stages], dtype=np.int32),
        }


def trace_meta(lab, *, capture, text: str, items: list, use_audio_in_video: bool, **extra) -> dict:
    """The metadata of a trace of `lab`: identity, capture spec and per-component routing shape."""
    return {
        "model_id": lab.model_id,
        "random_weights": lab.random_weights,
        "config_hash": config_hash(lab.model),
        "omnilab_version": __version__,
        "capture": list(capture),
        "position_id_per_seconds": _pps(lab.model),
        "text": text,
        "components": component_meta(lab.model),
        # Media are named by file name only: a trace must not carry the paths of the machine that made it.
        "items": [{**item, "name": Path(str(item["name"])).name} for item in items],
        "use_audio_in_video": bool(use_audio_in_video),
        **extra,
    }


def component_meta(model) -> dict:
    """Layers, experts and top-k of the thinker and (when present) the talker."""
    out = {}
    for component in ("thinker", "talker"):
        module = component_module(model, component)
        if module is None:
            continue
        text_config = module.config.text_config if hasattr(module.config, "text_config") else module.config
        out[component] = {
            "layers": int(text_config.num_hidden_layers),
            "num_experts": int(text_config.num_experts),
            "top_k": int(text_config.num_experts_per_tok),
        }
    return out


def _pps(model) -> float:
    thinker = model.thinker if hasattr(model, "thinker") else model
    return float(thinker.config.position_id_per_seconds)


def concat_columns(parts: list[Columns]) -> Columns | None:
    """Tables given as column arrays, one after the other (None for no parts)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _annotate(columns: Columns, component: str, tokenizer, pps: float) -> Columns:
    """A component's token columns, sorted by pos, with text, modality, item, seconds and frame added."""
    order = np.argsort(columns["pos"], kind="stable")
    columns = {c: v[order] for c, v in columns.items()}
    ids = columns["token_id"]
    n = len(ids)
    modality = np.full(n, "text", dtype=object)
    modality[ids == AUDIO_ID] = "audio"
    modality[ids == IMAGE_ID] = "image"
    modality[ids == VIDEO_ID] = "video"
    if component == "talker":
        modality[columns["phase"] == "decode"] = "speech"
    # A media item is a run of its modality's tokens inside one <|vision_start|>/<|audio_start|> block.
    block = np.cumsum((ids == VISION_START_ID) | (ids == AUDIO_START_ID))
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


def _spans(tokens: Columns | None) -> Columns | None:
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
