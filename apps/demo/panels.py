"""What the page shows: the banner, the players' audio, the downloads, and the panels' figures of
the last turn (from `omnilab.analysis` and `omnilab.plots`; a note that says what to do when the
turn lacks what a panel shows)."""

from __future__ import annotations

import contextlib
import html
import math
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from omnilab import analysis, plots
from omnilab.errors import ConversationError
from omnilab.lab import RANDOM_WEIGHTS_NOTE, OmniLab
from omnilab.reply import Reply
from omnilab.streaming import format_timings
from omnilab.trace import COMPONENTS

from .session import Session, number, show

NO_TURN = "send a message: this panel shows the last turn"
POSITIONS_HEIGHT = 640  # px: the 3-D TM-RoPE scene
LENS_ROW, LENS_FONT = 48, 11  # px: a logit-lens row and its words
ATTRIBUTION_METHODS = {"integrated_gradients": "Integrated Gradients", "feature_ablation": "feature ablation"}


def banner(lab: OmniLab) -> str:
    """Markdown naming the model; for random-weight presets, what that means and how to load real weights."""
    name = html.escape(lab.model_id)
    talker = "thinker + talker (speaks)" if lab.has_talker else "thinker only (text)"
    text = f"### omnilab · Qwen3-Omni workbench\n**Model:** `{name}` — {talker}"
    if lab.model_id == "organism":
        from omnilab.organism.examples import BANNER

        text += "\n\n" + BANNER
    elif lab.random_weights:
        text += (
            f"\n\n⚠️ This is a {html.escape(RANDOM_WEIGHTS_NOTE)}. Its speech is near-silent "
            "(peak about 1e-6); the players here amplify it so you can hear it (downloads stay raw)."
        )
    return text


def pcm16(audio: np.ndarray, *, amplify: bool = False) -> np.ndarray:
    """Float speech in [-1, 1] as 16-bit samples (what a browser plays without conversion).

    amplify: scale the audio to a 0.5 peak first. Random-weight talkers speak at about 1e-6, which
    16 bits round to silence; the app amplifies the players of the presets (saved WAVs stay raw).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if amplify and audio.size:
        peak = float(np.abs(audio).max())
        if peak > 0:
            audio = audio * (0.5 / peak)
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


# --- the last turn's trace ------------------------------------------------------------------------------


def _trace(session: Session):
    return session.last.reply.trace if session.last is not None else None


def _note(text: str, *titles: str) -> go.Figure | tuple[go.Figure, ...]:
    """A figure that says `text` instead of a chart; one per title when given several."""
    if len(titles) > 1:
        return tuple(_note(text, title) for title in titles)
    fig = go.Figure()
    fig.add_annotation(text=html.escape(text), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=titles[0] if titles else "", xaxis_visible=False, yaxis_visible=False, height=320)
    return fig


def layer_count(trace, component: str) -> int:
    """How many router layers `component` has: from the trace's meta, else from its routing rows."""
    info = (getattr(trace, "meta", None) or {}).get("components", {}).get(component)
    if info:
        return int(info["layers"])
    layers = trace.routing.loc[trace.routing["component"] == component, "layer"] if trace is not None else []
    return int(layers.max()) + 1 if len(layers) else 0


def layer_choices(session: Session, component: str) -> int:
    """How many layers `component` has in the last turn's trace (0 before any turn)."""
    trace = _trace(session)
    return layer_count(trace, component) if trace is not None else 0


def _component(component) -> str:
    if component not in COMPONENTS:
        raise ConversationError(f"unknown component {show(component)}; choose thinker or talker")
    return component


def routing_figures(session: Session, component="thinker", layer=0) -> tuple[go.Figure, go.Figure, go.Figure]:
    """(routing heatmap, expert load, modality specialization) of `component` at `layer`."""
    component = _component(component)
    layer = int(number(layer, "layer", 0, 10_000, whole=True))
    titles = ("routing", "expert load", "modality specialization")
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, *titles)
    if not (trace.routing["component"] == component).any():
        return _note(f"no {component} routing in this turn", *titles)
    layers = layer_count(trace, component)
    if layer >= layers:
        raise ConversationError(f"layer {layer} is out of range: the {component} has layers 0..{layers - 1}")
    where = dict(component=component, layer=layer)
    info = (trace.meta or {}).get("components", {}).get(component)
    paths = analysis.token_paths(trace, **where, ranks=None)
    return (
        plots.routing_heatmap(paths, layer=layer, num_experts=int(info["num_experts"]) if info else None),
        plots.expert_load_bars(analysis.expert_load(trace, **where), **where),
        plots.specialization_heatmap(analysis.modality_specialization(trace, **where), **where),
    )


def position_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(TM-RoPE positions in 3-D, the tokens on TM-RoPE's time axis with audio/video alignment)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "positions", "timeline")
    layout = analysis.position_layout(trace, component="thinker")
    alignment = analysis.av_alignment(trace, component="thinker")
    cube = plots.positions_3d(layout)
    # At the app's width the scene takes the whole panel, tall enough to turn (plotly's default: a
    # small cube in the middle of a short figure, beside its legend).
    cube.update_layout(
        height=POSITIONS_HEIGHT, margin={"l": 0, "r": 0, "t": 60, "b": 0},
        scene={"domain": {"x": [0, 1], "y": [0, 1]}}, legend={"x": 0.01, "y": 0.98, "xanchor": "left"},
    )  # fmt: skip
    return cube, plots.seconds_timeline(layout, alignment=alignment)


def speech_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(codebook grid: the code of each frame and codebook; the reply's waveform over its spectrogram)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "codebooks", "spectrogram")
    grid = analysis.codebook_grid(trace)
    mel = analysis.mel_spectrogram(trace)
    return (
        plots.codebook_heatmap(grid) if len(grid) else _note("no speech in this turn", "codebooks"),
        plots.spectrogram(mel, analysis.waveform_envelope(trace))
        if len(mel)
        else _note("no speech in this turn", "spectrogram"),
    )


def token_choices(session: Session) -> list[tuple[str, int]]:
    """The last reply's generated thinker tokens as (label, pos) for a picker."""
    trace = _trace(session)
    if trace is None:
        return []
    tokens = trace.tokens
    out = tokens[(tokens["component"] == "thinker") & (tokens["phase"] == "decode")].drop_duplicates("pos")
    return [(f"{int(r.pos)}: {r.text!r}", int(r.pos)) for r in out.itertuples()]


def attention_figures(session: Session, pos=None) -> tuple[go.Figure, go.Figure]:
    """(the last recorded thinker layer's attention map, heads averaged; where the thinker looked while
    producing output token `pos`: the attention row of the query at pos - 1, the step that chose it)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "attention", "attention of a token")
    if trace.attention.empty:
        note = session.last.notice or "attention was not recorded for this turn (tick 'record attention')"
        return _note(note, "attention", "attention of a token")
    layers = sorted(int(x) for x in trace.attention["layer"].unique())
    rows = analysis.attention_map(trace, component="thinker", average_heads=True)
    heatmap = plots.attention_heatmap(rows, layer=layers[-1], head=-1)
    choices = [p for _, p in token_choices(session)]
    if pos is None or pos == "":
        if not choices:
            return heatmap, _note("the reply has no generated tokens", "attention of a token")
        pos = choices[0]
    pos = int(number(pos, "token", 0, 10**7, whole=True))
    picked = rows[rows["query_pos"] == pos - 1]
    if picked.empty:
        return heatmap, _note(f"no attention recorded for the token at pos {pos}", "attention of a token")
    line = go.Figure()
    for layer, group in picked.groupby("layer"):
        line.add_trace(
            go.Scatter(
                x=group["key_pos"],
                y=group["weight"],
                mode="lines",
                name=f"layer {layer}",
                customdata=np.stack(
                    [group["key_modality"].astype(str), group["key_text"].astype(str)], axis=-1
                ),
                hovertemplate="key pos %{x} · %{customdata[0]}<br>%{customdata[1]}<br>weight %{y:.4f}",
            )
        )
    label = trace.tokens.loc[(trace.tokens["component"] == "thinker") & (trace.tokens["pos"] == pos), "text"]
    line.update_layout(
        title=f"attention while producing token {pos} ({(label.iloc[-1] if len(label) else '')!r}), heads averaged",
        xaxis_title="key pos",
        yaxis_title="weight",
        template="plotly_white",
    )
    return heatmap, line


def attribution_text(session: Session) -> str:
    """One line on the attribution shown: its method, target token and convergence ("" before one)."""
    result = session.attribution
    if result is None:
        return ""
    target = result.target
    method = ATTRIBUTION_METHODS.get(result.method, str(result.method))
    text = (
        f"{method} of output token {target['index']} {target['piece']!r} "
        f"(log-probability {float(target['logprob']):.3f}); attributions sum to {float(result.total):.4f}"
    )
    delta = result.delta
    if delta is None or not math.isfinite(float(delta)):
        return text + "; no convergence delta for this method"
    return text + (
        f"; convergence delta {float(delta):.4f} (the sum's gap to the change in log-probability "
        "from the baseline: raise the steps if it is large)"
    )


def attribution_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(attribution over the input tokens, attribution summed by modality) of the last attribution."""
    titles = ("attribution over tokens", "attribution by modality")
    if session.last is None:
        return _note(NO_TURN, *titles)
    if session.attribution is None:
        return _note("pick an output token and a method, then press Explain", *titles)
    result = session.attribution
    return (
        plots.attribution_tokens(result.tokens),
        plots.attribution_modality(analysis.attribution_by_modality(result)),
    )


def lens_figure(session: Session, lens=None) -> go.Figure:
    """The logit lens of the last turn (`jobs.lens_turn`'s frame): layers × its last prompt positions."""
    if session.last is None:
        return _note(NO_TURN, "logit lens")
    if lens is None:
        return _note(
            "press Read the logit lens: each layer of the last turn's prompt, read as tokens", "logit lens"
        )
    tokens = _trace(session).tokens
    prompt = tokens[(tokens["component"] == "thinker") & (tokens["phase"] == "prefill")]
    fig = plots.logit_lens_heatmap(
        lens,
        tokens=dict(zip(prompt["pos"].astype(int), prompt["text"].astype(str), strict=True)),
        title="Logit lens of the last turn: what each layer would say next (last column: the reply)",
    )
    # Readable at the app's width: one row per layer tall enough for its words, words at 11 px.
    layers = int(lens["layer"].nunique())
    fig.update_traces(textfont={"size": LENS_FONT})
    fig.update_layout(height=min(160 + LENS_ROW * layers, 1_600), xaxis_tickangle=-45)
    return fig


def latency_figure(session: Session) -> go.Figure:
    """Seconds spent in each stage of the last turn (preprocessing, thinker, talker, code predictor, code2wav)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "latency")
    timings = trace.timings
    if timings.empty:
        return _note("no timings recorded", "latency")
    fig = go.Figure(
        go.Bar(
            x=timings["seconds"],
            y=timings["stage"],
            orientation="h",
            text=timings["calls"],
            texttemplate="%{x:.3f} s · %{text} calls",
            textposition="auto",
        )
    )
    fig.update_layout(
        title="latency by stage",
        xaxis_title="seconds",
        yaxis={"autorange": "reversed"},
        template="plotly_white",
    )
    return fig


def latency_text(session: Session) -> str:
    """The streamed turn's latency breakdown next to Qwen3-Omni's published figures ("" otherwise)."""
    if session.last is None or session.last.timings is None:
        return ""
    return format_timings(session.last.timings)


def comparison_figures(session: Session, component="thinker") -> tuple[go.Figure, go.Figure, go.Figure]:
    """(original expert load, ablated expert load) at the first ablated layer, and their routing agreement."""
    component = _component(component)
    if session.last is None or session.ablated is None:
        return _note("ablate experts and rerun to compare", "original", "ablated", "routing agreement")
    ablated_layers = sorted(session.ablated.ablate.get(component, {})) if session.ablated.ablate else []
    layer = ablated_layers[0] if ablated_layers else 0
    figures = []
    for name, turn in (("original", session.last), ("ablated", session.ablated)):
        trace = turn.reply.trace
        if not (trace.routing["component"] == component).any():
            figures.append(_note(f"no {component} routing", name))
            continue
        load = analysis.expert_load(trace, component=component, layer=layer)
        title = f"{name}: {component} expert load, layer {layer}"
        figures.append(plots.expert_load_bars(load, layer=layer, component=component, title=title))
    agreement = analysis.routing_agreement(
        session.last.reply.trace, session.ablated.reply.trace, component=component
    )
    figures.append(plots.agreement_lines(agreement, title=f"{component} routing: original vs ablated"))
    return tuple(figures)


FIGURES = (
    "routing expert_load modality_specialization positions timeline codebooks spectrogram attention_map "
    "attention attribution_tokens attribution_modality latency ablation_original ablation_ablated ablation_agreement"
).split()


def all_figures(session: Session, component="thinker", layer=0, pos=None) -> dict[str, go.Figure]:
    """Every panel's figures for the last turn, by name (the names of FIGURES, in that order)."""
    figures = (
        *routing_figures(session, component, layer),
        *position_figures(session),
        *speech_figures(session),
        *attention_figures(session, pos),
        *attribution_figures(session),
        latency_figure(session),
        *comparison_figures(session, component),
    )
    return dict(zip(FIGURES, figures, strict=True))


# --- downloads ----------------------------------------------------------------------------------------------


PARTIAL = ".partial-"  # what a file or folder is named while it is written (never its final name)


@contextlib.contextmanager
def _written_atomically(path: Path):
    """Yield a temporary path beside `path`; once the block ends well, it becomes `path` in one step.

    A server killed while writing leaves at most a `.partial-` file, never a half-written file under
    the name a person downloads (os.replace is atomic within a folder).
    """
    partial = path.with_name(f"{PARTIAL}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_wav(reply: Reply, folder: Path, stem: str = "reply") -> Path | None:
    """The reply's speech as a 16-bit WAV in `folder`, or None when it has none."""
    import soundfile

    if reply.audio is None or len(reply.audio) == 0:
        return None
    path = folder / f"{stem}-{uuid.uuid4().hex[:8]}.wav"
    with _written_atomically(path) as partial:
        soundfile.write(
            partial, np.clip(reply.audio, -1.0, 1.0), reply.sample_rate, subtype="PCM_16", format="WAV"
        )
    return path


def trace_zip(session: Session) -> Path:
    """The last turn's trace as a zip of its Parquet files (with meta.json and the speech)."""
    if session.last is None or session.last.reply.trace is None:
        raise ConversationError("there is no trace to download yet; send a message first")
    folder = session.output_folder()
    directory = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}trace-", dir=folder))
    try:
        session.last.reply.trace.save(directory)
        path = folder / f"trace-{uuid.uuid4().hex[:8]}.zip"
        with (
            _written_atomically(path) as partial,
            zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        ):
            for file in sorted(directory.iterdir()):
                archive.write(file, arcname=f"trace/{file.name}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return path


def figures_html(session: Session, component="thinker", layer=0, pos=None) -> Path:
    """Every figure of the last turn in one self-contained HTML file (plotly.js embedded once)."""
    if session.last is None:
        raise ConversationError("there are no figures to download yet; send a message first")
    figures = all_figures(session, component, layer, pos)
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
        for i, fig in enumerate(figures.values())
    ]
    reply = html.escape(session.last.reply.text)
    model = html.escape(session.last.reply.model_id)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>omnilab turn figures</title></head><body>"
        f"<h2>omnilab · {model}</h2><p>Reply: {reply}</p>" + "".join(parts) + "</body></html>"
    )
    path = session.output_folder() / f"figures-{uuid.uuid4().hex[:8]}.html"
    with _written_atomically(path) as partial:
        partial.write_text(page, encoding="utf-8")
    return path
