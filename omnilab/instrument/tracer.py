"""The Tracer: record routing, positions, codes, attention and stage timings of every forward.

    with lab.trace(capture=("routing", "positions", "codes", "timings")) as tr:
        reply = lab.generate(conversation)
    tr.trace.routing

Hooks are installed on enter and all removed on exit. Everything recorded is what the model itself
computed: the router's own top-k output, the position ids handed to the rotary embedding, the
codes the talker produced. The recording itself is the engine's (omnilab.instrument.record): one
Recorder per capture kind.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..errors import InterventionError
from ..reply import SAMPLE_RATE
from ..trace import Trace
from .budget import MEMORY_BUDGET_BYTES, check_budget
from .record import (
    TOWERS,
    ActivationsRecorder,
    AttentionRecorder,
    CodesRecorder,
    Recording,
    RoutingRecorder,
    TimingsRecorder,
    TokensRecorder,
    TowerAttentionRecorder,
    Turn,
    attention_settings,
    position_id_per_seconds,
    resolve_requests,
)
from .sites import component_module

TALKER_POSITIONS_NOTE = (
    "the talker's positions ignore use_audio_in_video: transformers' generate does not pass it to the "
    "talker, so in the talker's sequence a video's audio follows its frames (flat) where the "
    "thinker's positions interleave them in time"
)
DEFAULT_CAPTURE = ("routing", "positions", "codes", "timings")
CAPTURES = ("routing", "positions", "codes", "timings", "attention", "logits")


def capture_spec(capture) -> tuple[str, ...]:
    """A capture spec as a tuple of known names: None -> DEFAULT_CAPTURE, a name -> (name,)."""
    capture = tuple(
        DEFAULT_CAPTURE if capture is None else ((capture,) if isinstance(capture, str) else capture)
    )
    unknown = set(capture) - set(CAPTURES)
    if unknown:
        raise InterventionError(f"unknown capture {sorted(unknown)}; choose from {', '.join(CAPTURES)}")
    return capture


def split_capture(capture, sites=()) -> tuple[tuple[str, ...], list[str]]:
    """A capture spec and site patterns as (capture names, site patterns): names of CAPTURES (and the
    named site sets routing, positions, codes) are captures, anything else a site pattern."""
    capture = None if capture is None else ((capture,) if isinstance(capture, str) else tuple(capture))
    sites = [sites] if isinstance(sites, str) else list(sites or ())
    names = [*(capture or ()), *sites]
    patterns = [n for n in names if n not in CAPTURES]
    known = tuple(n for n in names if n in CAPTURES)
    if capture is None and not known:
        known = DEFAULT_CAPTURE
    return known, patterns


def recorders_for(
    model, capture: tuple[str, ...], *, attention_layers=None, heads=None, hooks=True, attention=None
) -> list:
    """The recorders of a capture spec (positions are always recorded: they key the tokens table).

    hooks=False: codes and timings are handed to their recorders by the caller (as a stream does);
    attention: AttentionSettings (or a dict of its fields) for the thinker/talker attention.
    """
    recorders = [TokensRecorder()]
    if "routing" in capture or "logits" in capture:
        recorders.append(RoutingRecorder(logits="logits" in capture))
    if "codes" in capture:
        recorders.append(CodesRecorder(hooks=hooks))
    if "timings" in capture:
        recorders.append(TimingsRecorder(hooks=hooks))
    if "attention" in capture:
        layers = attention_layers or {"thinker": [0]}
        towers = {c: v for c, v in layers.items() if c in TOWERS}
        text = {c: v for c, v in layers.items() if c not in TOWERS}
        if towers:
            recorders.append(TowerAttentionRecorder(model, towers, heads=heads))
        if text:
            recorders.append(AttentionRecorder(model, text, heads=heads, settings=attention))
    return recorders


def active_tracer(lab):
    """The innermost Tracer of `lab` open in this thread, or None (a Tracer records the runs of the
    thread that opened it: another thread's generate is not its run)."""
    stack = getattr(lab, "_tracers", {}).get(threading.get_ident())
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
    """Records what the model does inside while the context is open; its `.trace` (a Trace) after exit.

    One meaning per name: `lab.trace(...)` returns a Tracer (this context); what it recorded is a
    `Trace` (`tracer.trace`). `lab.generate(conv, trace=...)` and `lab.stream(conv, trace=...)` take
    the same thing — False (the default in both: nothing recorded, `Reply.trace` is None), True (the
    default capture, DEFAULT_CAPTURE) or a capture spec (names from CAPTURES) — and attach the Trace
    to the Reply (`Reply.trace`, a `Trace | None`).

    One Tracer records one run (one `generate` or `forward`); a second `generate` or
    `forward` inside it is refused, the first run's record kept.

    capture: names from CAPTURES (positions are always recorded); attention_layers: {component:
    layers} for "attention" (thinker, talker, audio_tower, vision_tower; default the thinker's layer
    0); heads: keep only these heads of each map; attention: AttentionSettings (or a dict of its
    fields: queries, blocks, top_k), what of the thinker/talker attention is kept (by default the
    whole rows of the last prompt token and the generated tokens, and every query's mass per
    modality block).

    sites: site patterns (see `lab.sites()`: "resid.*", "attn.3", "talker.resid.0", "audio_tower",
    "resid.0:input" for a module's input) whose tensors go to `trace.activations` (site key ->
    Activations [rows, width]); the named sets routing, positions, codes mean those captures, and a
    site pattern in `capture` counts as one here. positions: thinker prompt positions to keep (all
    when None); modality: a modality name or names to keep; dtype: what the tensors are stored in
    (the model's own dtype unless asked: dtype=torch.float16 halves a float32 model's capture, and
    a value patched back with set= is then rounded). memory_budget: the bytes this run's captures
    (attention, routing, activations; generated tokens and speech frames included) may hold,
    estimated before the forward; over it the run is refused with a BudgetError (None: no limit).
    Talker and code predictor sites need a run that speaks (`generate` with return_audio): in
    `lab.forward`, or with return_audio=False, asking for them is refused by name.
    """

    def __init__(
        self,
        lab,
        capture=None,
        *,
        attention_layers: dict | None = None,
        heads=None,
        sites=None,
        positions=None,
        modality=None,
        dtype=None,
        attention=None,
        memory_budget: int | None = MEMORY_BUDGET_BYTES,
    ):
        self.lab = lab
        self.model = lab.model
        self.capture, patterns = split_capture(capture, sites)
        self.capture = capture_spec(self.capture)
        self.requests = resolve_requests(self.model, patterns) if patterns else []
        dtype = dtype or next(self.model.parameters()).dtype  # the model's own: lossless by default
        self.activation_options = {"positions": positions, "modality": modality, "dtype": dtype}
        self.attention_layers = attention_layers or {}
        self.heads = heads
        self.attention = attention_settings(attention)
        self.memory_budget = memory_budget
        self.trace: Trace | None = None
        self._entered = False
        recorders_for(  # checks
            self.model, self.capture, attention_layers=attention_layers, heads=heads, attention=self.attention
        )
        _check_modality(modality)

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        if self._entered:
            # A second entry would silently replace (or, nested, interleave with) the first's record.
            raise InterventionError(
                "this Tracer was already entered, and one Tracer records one run; open a new "
                "lab.trace(...) for each run (its .trace after exit is the Trace)"
            )
        self._entered = True
        recorders = recorders_for(
            self.model,
            self.capture,
            attention_layers=self.attention_layers,
            heads=self.heads,
            attention=self.attention,
        )
        if self.requests:
            recorders.append(ActivationsRecorder(self.requests, **self.activation_options))
        self._recording = Recording(self.model, recorders)
        self._prompt = None
        self._reply = None
        self._recording.__enter__()
        self._thread = threading.get_ident()
        stacks = self.lab.__dict__.setdefault("_tracers", {})  # thread id -> its open Tracers
        stacks.setdefault(self._thread, []).append(self)
        return self

    def __exit__(self, *exc) -> None:
        try:
            stacks = self.lab._tracers
            stacks[self._thread].remove(self)
            if not stacks[self._thread]:
                del stacks[self._thread]
        finally:
            self._recording.__exit__()
        self.trace = self._build()

    # -- called by OmniLab.generate ---------------------------------------------------------------
    def begin(
        self,
        inputs,
        gathered,
        *,
        prompt_length: int,
        use_audio_in_video: bool,
        max_new_tokens: int = 0,
        speech_frames: int = 0,
        speaks: bool | None = None,
    ) -> None:
        """Called by the run before its forward: checks, the budget, the prompt's metadata.

        max_new_tokens / speech_frames: the most tokens and frames the run makes (the budget counts
        their rows); speaks: whether the talker runs (False refuses talker sites by name; None:
        not said).
        """
        if self._prompt is not None:
            # Tables key each token by (component, pos): a second run's rows would silently merge
            # with the first's, and meta holds one reply. What was recorded so far stays intact.
            raise InterventionError(
                "this lab.trace() has already recorded a run, and one Tracer records one run (a "
                "second would merge its tokens and routing with the first's); open a new "
                "lab.trace() around each generate or forward, or pass trace=True to generate"
            )
        if self.requests:
            self._check_positions(prompt_length)
        if speaks is False:
            self._check_silent_talker()
        if self.memory_budget is not None:  # before the forward: refused, or it runs
            check_budget(self, inputs, max_new_tokens=max_new_tokens, speech_frames=speech_frames)
        self._prompt = {
            "length": prompt_length,
            "items": gathered.items,
            "use_audio_in_video": use_audio_in_video,
        }

    def end(self, reply) -> None:
        self._reply = reply

    def _check_silent_talker(self) -> None:
        """Talker sites in a run where the talker does not run would come back silently absent."""
        talker = [r.key for r in self.requests if r.site.component in ("talker", "code_predictor")]
        talker += [f"talker attention layers {v}" for c, v in self.attention_layers.items() if c == "talker"]
        if talker:
            raise InterventionError(
                f"{', '.join(talker)} record the talker, which this run does not use (lab.forward, or "
                "generate with return_audio=False runs the thinker only); generate with "
                "return_audio=True to record them, or leave them out"
            )

    def _check_positions(self, prompt_length: int) -> None:
        """The activations' positions lie inside the prompt (checked before the forward)."""
        positions = self.activation_options["positions"]
        if positions is not None:
            outside = sorted({int(p) for p in positions if not 0 <= int(p) < prompt_length})
            if outside:
                shown = ", ".join(map(str, outside[:8])) + (" ..." if len(outside) > 8 else "")
                raise InterventionError(
                    f"positions {shown} lie outside the prompt, which has {prompt_length} positions; "
                    f"choose positions in 0..{prompt_length - 1}"
                )

    # -- the Trace -------------------------------------------------------------------------------
    # Tables are built as column arrays in the schema's dtypes (no DataFrames: a collection pays this
    # per sample, and the store writes the arrays to Arrow directly; DataFrames come on first access).
    def _build(self) -> Trace:
        reply, prompt = self._reply, self._prompt
        turn = Turn(
            self.lab.processor.tokenizer,
            prompt_length=prompt["length"] if prompt else None,
            token_ids=tuple(reply.token_ids) if reply is not None else (),
        )
        return assemble_trace(
            self.lab,
            self._recording,
            turn,
            capture=self.capture,
            text=reply.text if reply is not None else "",
            items=prompt["items"] if prompt else [],
            use_audio_in_video=bool(prompt and prompt["use_audio_in_video"]),
            audio=reply.audio if reply is not None else None,
            spoke=reply is not None and reply.audio is not None,
            modality=self.activation_options["modality"],
        )


def assemble_trace(
    lab,
    recording,
    turn,
    *,
    capture,
    text: str,
    items: list,
    use_audio_in_video: bool,
    audio=None,
    spoke: bool = False,
    modality=None,
    **extra,
) -> Trace:
    """The one place a Trace is assembled: `recording`'s tables for `turn` (one row of a batched
    forward, or a whole turn), its sites' activations joined to the tokens table (only `modality`'s
    rows where given), and the metadata of `trace_meta` (`extra` goes to it: streamed, latency)."""
    tables = recording.tables(turn)
    activations = recorded_activations(recording, turn, tables.get("tokens"), modality=modality)
    meta = trace_meta(
        lab,
        capture=capture,
        text=text,
        items=items,
        use_audio_in_video=use_audio_in_video,
        spoke=spoke,
        **extra,
    )
    return Trace.build(audio=audio, sample_rate=SAMPLE_RATE, meta=meta, activations=activations, **tables)


def recorded_activations(recording, turn, tokens, *, modality=None) -> dict:
    """site key -> Activations of `turn`, rows joined to the tokens table (only `modality`'s rows
    where given: a batched prompt's rows outside it are dropped)."""
    recorder = recording.recorder("activations")
    if recorder is None:
        return {}
    from ..activations import Activations, activation_rows
    from ..trace import COLUMNS

    tokens = tokens or {c: np.empty(0, dtype=d) for c, d in COLUMNS["tokens"].items()}
    names = {r.key: r.site.name for r in recorder.requests}
    wanted = None if modality is None else ({modality} if isinstance(modality, str) else set(modality))
    out = {}
    for key, (keys, values) in recorder.recorded(turn).items():
        rows = activation_rows(keys, tokens)
        if wanted is not None and not rows["modality"].isin(wanted).all():
            keep = rows["modality"].isin(wanted).to_numpy()
            rows, values = rows[keep].reset_index(drop=True), values[torch.as_tensor(keep)]
        out[key] = Activations(key, names[key], rows, values)
    return out


def _check_modality(modality) -> None:
    from ..trace import MODALITIES

    names = [] if modality is None else ([modality] if isinstance(modality, str) else list(modality))
    unknown = [m for m in names if m not in MODALITIES]
    if unknown:
        raise InterventionError(f"unknown modality {unknown}; choose from {', '.join(MODALITIES)}")


def trace_meta(
    lab, *, capture, text: str, items: list, use_audio_in_video: bool, spoke: bool = False, **extra
) -> dict:
    """The metadata of a trace of `lab`: identity, capture spec and per-component routing shape
    (`spoke`: the talker ran, so its positions are in the trace)."""
    return {
        "model_id": lab.model_id,
        "random_weights": lab.random_weights,
        "config_hash": config_hash(lab.model),
        "omnilab_version": __version__,
        "capture": list(capture),
        "position_id_per_seconds": position_id_per_seconds(lab.model),
        "text": text,
        "components": component_meta(lab.model),
        # Media are named by file name only: a trace must not carry the paths of the machine that made it.
        "items": [{**item, "name": Path(str(item["name"])).name} for item in items],
        "use_audio_in_video": bool(use_audio_in_video),
        # Upstream generate hands the talker no use_audio_in_video: its TM-RoPE positions put a
        # video's audio after its frames where the thinker's interleave them. Said, not hidden.
        **(
            {"talker_use_audio_in_video": False, "notes": [TALKER_POSITIONS_NOTE]}
            if use_audio_in_video and spoke
            else {}
        ),
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
