"""The demo's model jobs: a turn (whole or streamed), an ablated rerun, the speech of a few
codebooks, an attribution, the logit lens. Each holds the model's lock (`omnilab.streaming.model_lock`, which
`lab.stream` takes at each step) from start to end: tracers and interventions hook the shared model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from omnilab import analysis
from omnilab.errors import ConversationError, InterventionError, MediaError
from omnilab.instrument.budget import MEMORY_BUDGET_BYTES, describe, estimate_capture_bytes
from omnilab.instrument.units import head_ablation
from omnilab.lab import OmniLab
from omnilab.models.presets import system_prompt
from omnilab.reply import Reply
from omnilab.streaming import model_lock
from omnilab.trace import COMPONENTS

from .heads import parse_heads
from .panels import ATTRIBUTION_METHODS, layer_count
from .session import Session, Settings, Turn, number, show

CAPTURE = ("routing", "positions", "codes", "timings")
MAX_ATTRIBUTION_STEPS = 128
LENS_POSITIONS = 14  # the last prompt positions the lens panel reads: each cell wide enough for its token


def _attention_layers(lab: OmniLab) -> list[int]:
    """The thinker's first and last decoder layers, from the site registry."""
    sites = lab.sites()
    layers = sites.loc[(sites["kind"] == "attention") & (sites["component"] == "thinker"), "layer"]
    return sorted({int(layers.min()), int(layers.max())})


def _capture(lab: OmniLab, settings: Settings, capture: tuple[str, ...] = CAPTURE):
    """The tracer of one model job: `capture`, plus attention of the thinker's first and last layers."""
    if settings.attention:
        return lab.trace(
            capture=(*capture, "attention"), attention_layers={"thinker": _attention_layers(lab)}
        )
    return lab.trace(capture=capture) if capture else contextlib.nullcontext()


def within_budget(
    lab: OmniLab, conversation: list[dict], settings: Settings, budget: int = MEMORY_BUDGET_BYTES
) -> tuple[Settings, str | None]:
    """`settings`, without attention when recording it would pass `budget` bytes, and why (or None).

    The same estimate the library's Tracer checks before its forward (omnilab.instrument.budget),
    with the app's attention settings (the defaults: linear in the prompt); where the library refuses
    a trace over its budget, the app records the turn without attention and says so.
    """
    if not settings.attention:
        return settings, None
    with _upload_errors(conversation):
        inputs = lab.prepare(conversation, use_audio_in_video=settings.generation.use_audio_in_video)
    estimate = estimate_capture_bytes(
        lab, inputs, ("routing", "attention"), {"thinker": _attention_layers(lab)},
        max_new_tokens=settings.generation.max_new_tokens,
    )  # fmt: skip
    if not estimate.over(budget):
        return settings, None
    notice = (
        f"attention was not recorded for this turn: recording it would need {describe(estimate, budget)}; "
        "the rest of the trace was recorded; send a shorter message to see attention"
    )
    return replace(settings, attention=False), notice


def _upload_names(text: str, conversation: list[dict]) -> str:
    """`text` with each upload's server path replaced by how the person knows it ("the image 'cat.png'")."""
    for message in conversation:
        for item in message["content"]:
            kind = item["type"]
            if kind != "text" and isinstance(item[kind], str):
                text = text.replace(item[kind], f"the {kind} '{Path(item[kind]).name}'")
    return text


@contextlib.contextmanager
def _upload_errors(conversation: list[dict]) -> Iterator[None]:
    """Media errors raised while the model job decodes: named as the person knows the upload."""
    try:
        yield
    except MediaError as exc:
        raise MediaError(_upload_names(str(exc), conversation)) from None


def _generate(lab: OmniLab, conversation: list[dict], settings: Settings) -> Reply:
    """One traced generation (call with the model lock held)."""
    with _upload_errors(conversation), _capture(lab, settings) as tracer:
        reply = lab.generate(conversation, **asdict(settings.generation))
    return replace(reply, trace=tracer.trace)


def _conversation(lab: OmniLab, session: Session, system, message: dict) -> list[dict]:
    """The conversation a turn answers; `system` None is the model's own default (presets.system_prompt)."""
    return session.conversation(system_prompt(lab.model_id) if system is None else system, message)


def run_turn(lab: OmniLab, session: Session, message: dict, settings: Settings, system=None) -> Turn:
    """Answer `message` after the session's conversation (not streamed); the session records the turn.

    `system`: the system prompt ("" for none; None: the model's default, `presets.system_prompt`).
    """
    conversation = _conversation(lab, session, system, message)
    with model_lock(lab.model):
        settings, notice = within_budget(lab, conversation, settings, session.memory_budget)
        reply = _generate(lab, conversation, settings)
    turn = Turn(conversation, settings, reply, notice=notice)
    session.record(message, turn)
    return turn


@dataclass(frozen=True)
class Update:
    """One step of a streamed turn: the reply text so far, new speech samples, the turn when done."""

    text: str
    audio: np.ndarray | None = None  # float32 at 24 kHz: the samples new since the last update
    turn: Turn | None = None


def _stream_job(lab: OmniLab, conversation, settings: Settings, opened: list) -> Iterator:
    """`lab.stream`'s events under the model lock; `opened` receives the attention tracer (or None)."""
    events = lab.stream(conversation, **asdict(settings.generation), trace=True)
    with (
        model_lock(lab.model),
        _upload_errors(conversation),
        _capture(lab, settings, capture=()) as tracing,
        contextlib.closing(events),
    ):
        opened.append(tracing)
        yield from events


def stream_turn(
    lab: OmniLab, session: Session, message: dict, settings: Settings, system=None
) -> Iterator[Update]:
    """Answer `message` through `OmniLab.stream`, yielding text and speech as they are made.

    The last update carries the Turn; its trace is the stream's own (routing, positions, codes, the
    latency breakdown), with attention added when asked for. Every step of the job runs on one
    thread of its own, which holds the model lock until the stream ends or this generator is closed
    (a browser that goes away closes it): Gradio advances a generator on any of its worker threads,
    and the lock belongs to the thread that took it.
    """
    conversation = _conversation(lab, session, system, message)
    settings, notice = within_budget(lab, conversation, settings, session.memory_budget)
    opened: list = []
    job = _stream_job(lab, conversation, settings, opened)
    text, done = "", None
    with ThreadPoolExecutor(1, thread_name_prefix="omnilab-stream") as thread:
        try:
            for event in iter(lambda: thread.submit(next, job, None).result(), None):
                if event.kind == "text":
                    text += event.text
                    yield Update(text)
                elif event.kind == "audio" and event.audio is not None and len(event.audio):
                    yield Update(text, audio=event.audio)
                elif event.kind == "done":
                    done = event
        finally:
            thread.submit(job.close).result()
    tracer = opened[0] if opened else None
    if done is None or done.reply is None:
        raise ConversationError("the stream ended without a reply; send the message again")
    trace = done.trace if done.trace is not None else done.reply.trace
    if tracer is not None and trace is not None:
        capture = [*trace.meta.get("capture", []), "attention"]
        attention = tracer.trace.tables["attention"]
        trace = replace(
            trace, tables={**trace.tables, "attention": attention}, meta={**trace.meta, "capture": capture}
        )
    turn = Turn(conversation, settings, replace(done.reply, trace=trace), timings=done.timings, notice=notice)
    session.record(message, turn)
    yield Update(turn.reply.text, turn=turn)


# --- interventions -----------------------------------------------------------------------------------------


def parse_ablation(spec, component: str, layers: int) -> dict:
    """'2: 3, 7; 0: 1' -> {component: {2: [3, 7], 0: [1]}}; '*: 5' ablates expert 5 in every layer.

    Ranges are checked by the intervention itself; this checks the shape of the text.
    """
    if component not in COMPONENTS:
        raise InterventionError(f"unknown component {show(component)}; choose thinker or talker")
    if not isinstance(spec, str) or not spec.strip():
        raise InterventionError(
            "say which experts to ablate as 'layer: expert, expert; ...' (e.g. '0: 3, 7' or '*: 5' for every layer)"
        )
    if len(spec) > 2_000:
        raise InterventionError(
            "the ablation is longer than 2,000 characters; ablate fewer experts at a time"
        )
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        layer_text, sep, experts_text = part.partition(":")
        if not sep:
            raise InterventionError(f"{show(part)} is not 'layer: experts'; write e.g. '0: 3, 7'")
        try:
            targets = range(layers) if layer_text.strip() == "*" else [int(layer_text)]
            experts = [int(e) for e in experts_text.replace(" ", ",").split(",") if e.strip()]
        except ValueError:
            raise InterventionError(
                f"{show(part)}: layers and experts are whole numbers (or '*' for every layer)"
            ) from None
        if not experts:
            raise InterventionError(f"{show(part)} names no experts; write e.g. '0: 3, 7'")
        for layer in targets:
            out.setdefault(layer, [])
            out[layer] += [e for e in experts if e not in out[layer]]
    if not out:
        raise InterventionError("the ablation names no layers; write e.g. '0: 3, 7'")
    return {component: out}


def ablate_turn(lab: OmniLab, session: Session, component: str, spec) -> tuple[Turn, Turn]:
    """Rerun the session's last turn with experts ablated; returns (original, ablated)."""
    if session.last is None:
        raise ConversationError("there is no turn to rerun yet; send a message first")
    last = session.last
    ablate = parse_ablation(spec, component, layer_count(last.reply.trace, component))
    with model_lock(lab.model), lab.intervene(ablate=ablate):
        reply = _generate(lab, last.conversation, last.settings)
    session.ablated = Turn(last.conversation, last.settings, reply, ablate=ablate)
    return last, session.ablated


def ablate_heads_turn(lab: OmniLab, session: Session, spec) -> tuple[Turn, Turn]:
    """Rerun the session's last turn with the thinker's attention heads in `spec` zeroed ('1: 0, 3' =
    layer 1, heads 0 and 3) through `lab.intervene(set=head_ablation(...))`; returns (original, ablated)
    for the experts' side-by-side compare. An unknown layer or head is refused by name."""
    if session.last is None:
        raise ConversationError("there is no turn to rerun yet; send a message first")
    last = session.last
    zeroed = head_ablation(lab, parse_heads(spec))
    with model_lock(lab.model), lab.intervene(set=zeroed):
        reply = _generate(lab, last.conversation, last.settings)
    session.ablated = Turn(last.conversation, last.settings, reply)
    return last, session.ablated


# --- what the reply is made of -----------------------------------------------------------------------------


def residual_speech(lab: OmniLab, session: Session, keep=4) -> np.ndarray:
    """The last reply's speech re-synthesized from codebooks 0..keep-1 only (float32 at 24 kHz).

    Codebook 0 carries the coarse content and each later codebook a finer residual; listening to
    the first few shows what each adds. code2wav runs on the model, so this is a model job.
    """
    if session.last is None:
        raise ConversationError("there is no speech to re-synthesize yet; send a message first")
    reply = session.last.reply
    if reply.codes is None or len(reply.codes) == 0:
        raise ConversationError(
            "the last reply has no speech; tick 'speak the reply' and send a message, then listen"
        )
    codebooks = int(np.asarray(reply.codes).shape[1])
    keep = int(number(keep, "codebooks to keep", 1, codebooks, whole=True))
    with model_lock(lab.model):
        return analysis.residual_audio(lab, reply, keep=keep)


def output_tokens(lab: OmniLab, session: Session) -> list[tuple[str, int]]:
    """The last reply's generated thinker tokens as (label, index into the reply) for a picker."""
    if session.last is None:
        return []
    decode = lab.processor.tokenizer.decode
    return [(f"{i}: {decode([int(t)])!r}", i) for i, t in enumerate(session.last.reply.token_ids)]


def attribute_turn(
    lab: OmniLab, session: Session, target=None, method="integrated_gradients", steps=32
) -> analysis.Attribution:
    """Attribute output token `target` (an index into the last reply) to every input token.

    Runs `omnilab.analysis.attribute` on the last turn's conversation, explaining the reply it gave
    (not a new one); the session keeps the result for the panels and the figures download.
    """
    if session.last is None:
        raise ConversationError("there is no reply to explain yet; send a message first")
    if method not in ATTRIBUTION_METHODS:
        raise ConversationError(
            f"unknown attribution method {show(method)}; choose {' or '.join(ATTRIBUTION_METHODS)}"
        )
    steps = int(number(steps, "steps", 2, MAX_ATTRIBUTION_STEPS, whole=True))
    last = session.last
    count = len(last.reply.token_ids)
    if count == 0:
        raise ConversationError("the last reply has no generated tokens to explain; send a message")
    if target is None or (isinstance(target, str) and not target.strip()):
        target = 0
    target = number(target, "output token", 0, count - 1, whole=True)
    with model_lock(lab.model), _upload_errors(last.conversation):
        session.attribution = analysis.attribute(
            lab,
            last.conversation,
            target=int(target),
            method=method,
            steps=steps,
            use_audio_in_video=last.settings.generation.use_audio_in_video,
            reply=last.reply,
        )
    return session.attribution


def lens_turn(lab: OmniLab, session: Session, positions: int = LENS_POSITIONS):
    """The thinker's logit lens (`omnilab.analysis.logit_lens`, top token) over the last `positions`
    positions of the last turn's prompt: its last column is the reply's first token."""
    if session.last is None:
        raise ConversationError("there is no turn to read yet; send a message first")
    last = session.last
    with model_lock(lab.model), _upload_errors(last.conversation):
        return analysis.logit_lens(
            lab, last.conversation, last=positions, top=1,
            use_audio_in_video=last.settings.generation.use_audio_in_video,
        )  # fmt: skip
