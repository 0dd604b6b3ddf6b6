"""The demo's layout and wiring: Gradio components, and events that call the plain functions of
`session`, `jobs` and `panels` (which run without Gradio or a browser).

Why one file (over 500 lines): Gradio wires an event only inside the `gr.Blocks` context where its
components were made, so the page's components and their events live in one `build` closure; every
piece of logic it calls is in `session`, `jobs` and `panels`, tested without Gradio.

Safe by default: binds 127.0.0.1, no share link, uploads capped, one model job at a time behind a
bounded queue, monitoring and analytics off, no extra served paths, one `gr.State` per session.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

import omnilab  # noqa: E402
from omnilab.errors import OmnilabError  # noqa: E402
from omnilab.lab import SAMPLE_RATE, OmniLab  # noqa: E402
from omnilab.models.presets import system_prompt  # noqa: E402
from omnilab.options import GenerationOptions  # noqa: E402
from omnilab.trace import COMPONENTS  # noqa: E402

from . import heads, jobs, panels  # noqa: E402
from . import session as sessions  # noqa: E402
from .serve import DEFAULT_MODEL  # noqa: E402
from .session import RANGES  # noqa: E402

log = logging.getLogger("omnilab.app")

MAX_FILE_SIZE = sessions.MAX_UPLOAD_BYTES
QUEUE_SIZE = 16
SESSION_SECONDS = 3600
MODEL_JOBS = "model"  # one concurrency group for every event that runs the model
# The settings of /chat and /reply, after text, audio, image, video, use the video's audio, system prompt:
SETTINGS = ("speaker", "speak", "max_new_tokens", "max_speech_frames", "do_sample", "temperature", "top_p",
            "top_k", "seed", "attention")  # fmt: skip
# The parameters of /chat and /reply as the API page and gradio_client name them, in order:
TURN_PARAMETERS = ("text", "audio", "image", "video", "use_video_audio", "system", "voice", "speak",
                   "max_new_tokens", "max_speech_frames", "do_sample", "temperature", "top_p", "top_k", "seed",
                   "record_attention")  # fmt: skip


def _user_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, OmnilabError):
        log.info("refused: %s", exc)
    else:
        log.exception("unexpected error in a handler")
    return gr.Error(sessions.error_text(exc, escape=False), print_exception=False)


def _from_script(request) -> bool:
    """Whether the request came from gradio_client (which sends `x-gradio-user: api`), not a browser."""
    request = request[0] if isinstance(request, list) and request else request
    headers = getattr(request, "headers", None) or {}
    return str(headers.get("x-gradio-user", "")).lower() in ("api", "mcp")


def _refuse_urls(value) -> None:
    """Refuse any file payload whose path is a URL (Gradio would fetch it before the app sees it)."""
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and ("://" in path or path.strip().lower().startswith("data:")):
            raise gr.Error(
                "a file given as a URL is not accepted (the app fetches nothing); "
                "upload the file itself (gradio_client.handle_file with a local path does)",
                print_exception=False,
            )
        for item in value.values():
            _refuse_urls(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _refuse_urls(item)


class _Blocks(gr.Blocks):
    """gr.Blocks that refuses URL file payloads before Gradio fetches them, gives Gradio's own refusals
    a message (not `{"error": null}`), and escapes error text for browsers only (scripts get it plain)."""

    async def process_api(self, block_fn, inputs, state=None, request=None, *args, **kwargs):
        try:
            _refuse_urls(inputs)
            return await super().process_api(block_fn, inputs, state, request, *args, **kwargs)
        except gr.Error as error:
            if not _from_script(request):
                error.message = html.escape(str(error.message), quote=True)
            raise
        except Exception as exc:  # Gradio's own checks of the payload, before or after the handler
            log.warning("refused by Gradio: %s: %s", type(exc).__name__, exc)
            message = (
                f"the app could not take this request ({type(exc).__name__} while Gradio read or wrote "
                "its values); send each input as the API page shows (files through gradio_client.handle_file)"
            )
            raise gr.Error(message, print_exception=False) from None


def _end_session(app: gr.Blocks, state: gr.State, request: gr.Request) -> None:
    """When a browser (or gradio_client) disconnects, its session's files go (Gradio would keep the
    state an hour after the tab closes, and its uploads for the server's life)."""
    held = app.server_app.state_holder.session_data.get(request.session_hash) if app.server_app else None
    sessions.close_session(held.state_data.get(state._id) if held is not None else None)


def _named(defaults: dict):
    """Name a `*args` handler's parameters, with their defaults (the API page and gradio_client show them)."""

    def name(fn):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        fn.__signature__ = inspect.Signature(
            [inspect.Parameter(n, kind, default=v) for n, v in defaults.items()]
        )
        return fn

    return name


def _guard(fn):
    """`fn` (a function or a generator function) whose failures become a gr.Error with escaped text."""

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except Exception as exc:
            raise _user_error(exc) from None

    @functools.wraps(fn)
    def stream(*args):
        try:
            yield from fn(*args)
        except Exception as exc:
            raise _user_error(exc) from None

    return stream if inspect.isgeneratorfunction(fn) else call


def system_info(lab: OmniLab) -> str:
    """What the settings say under the system prompt: whose default it is, and its limit."""
    limit = f"up to {sessions.MAX_SYSTEM_CHARS:,} characters"
    if system_prompt(lab.model_id):
        return f"{lab.model_id}'s default: Qwen's own; {limit}"
    return f"{lab.model_id}'s default: none (it was trained without a system prompt); {limit}"


def _file_paths(value) -> list[str]:
    """The `path` of every FileData in a processed example value (nested dicts and lists)."""
    if isinstance(value, dict):
        own = [value["path"]] if isinstance(value.get("path"), str) else []
        return own + [
            p for item in value.values() if isinstance(item, (dict, list)) for p in _file_paths(item)
        ]
    if isinstance(value, list):
        return [p for item in value for p in _file_paths(item)]
    return []


def keep_example_files(examples: gr.Examples) -> list[str]:
    """Make the files of `examples` the app's own (Gradio serves its copies from its upload folder):
    read-only, and never deleted by a session that sends them (`session.keep`). Returns their paths."""
    paths = _file_paths(list(examples.non_none_processed_examples.values()))
    for path in paths:
        os.chmod(path, 0o444)
    sessions.keep(paths)
    return paths


def _session(value) -> sessions.Session:
    return value if isinstance(value, sessions.Session) else sessions.Session()


def build_app(lab: OmniLab, *, max_upload_bytes: int = MAX_FILE_SIZE) -> gr.Blocks:
    """The demo's Blocks for `lab` (not launched)."""
    preset, speaks, given = lab.random_weights, lab.has_talker, GenerationOptions()
    default = dict(zip(TURN_PARAMETERS, ("", None, None, None, False, system_prompt(lab.model_id), given.speaker, speaks,
                   32 if preset else 256, 24 if preset else 2048, given.do_sample, given.temperature, given.top_p,
                   given.top_k, 0, preset), strict=True))  # fmt: skip

    def player(audio):
        return None if audio is None else (SAMPLE_RATE, panels.pcm16(audio, amplify=preset))

    def turn_inputs(session, text, audio, image, video, use_audio_in_video, system, *values):
        """(message, settings, system prompt) of a turn, checked (raw Gradio payloads: nothing decoded yet).

        The session holds the uploads first (refused ones too): they are deleted when it ends.
        """
        session.hold(sessions.upload_paths(audio, image, video))
        message = sessions.user_message(
            text, audio=audio, image=image, video=video, max_bytes=max_upload_bytes
        )
        given = dict(zip(SETTINGS, values, strict=True), use_audio_in_video=use_audio_in_video)
        return message, sessions.settings(lab, **given), system

    @_guard
    @_named({**default, "session": None})
    def chat(*args):
        *values, state = args
        session = _session(state)
        message, checked, system = turn_inputs(session, *values)
        pending = session.chat + [{"role": "user", "content": sessions.chat_text(message)}]
        for update in jobs.stream_turn(lab, session, message, checked, system):
            shown = (
                session.chat
                if update.turn
                else [*pending, {"role": "assistant", "content": update.text or "…"}]
            )
            if update.turn is not None and update.turn.notice:
                gr.Warning(update.turn.notice)
            yield shown, gr.skip() if update.audio is None else player(update.audio), session

    @_guard
    @_named({**default, "session": None})
    def reply(*args):
        *values, state = args
        session = _session(state)
        turn = jobs.run_turn(lab, session, *turn_inputs(session, *values))
        if turn.notice:
            gr.Warning(turn.notice)
        wav = panels.write_wav(turn.reply, session.output_folder())
        return turn.reply.text, str(wav) if wav else None, session.chat, session

    def clamp(session, component, layer) -> tuple[int, gr.Slider]:
        count = panels.layer_choices(session, component)
        layer = min(int(layer or 0), max(count - 1, 0))
        return layer, gr.Slider(maximum=max(count - 1, 1), value=layer)

    @_guard
    def show_panels(state, component, layer, token):
        session = _session(state)
        layer, slider = clamp(session, component, layer)
        tokens = panels.token_choices(session)
        outputs = jobs.output_tokens(lab, session)
        wav = panels.write_wav(session.last.reply, session.output_folder()) if session.last else None
        shown = {
            **panels.all_figures(session, component, layer, None),
            "layer": slider,
            "token": gr.Dropdown(choices=tokens, value=tokens[0][1] if tokens else None),
            "attribution_token": gr.Dropdown(choices=outputs, value=outputs[0][1] if outputs else None),
            "attribution_text": panels.attribution_text(session),
            "residual_audio": None,
            "reply_wav": str(wav) if wav else None,
            "latency_text": panels.latency_text(session),
            "lens": panels.lens_figure(session),  # a new turn's lens is read on request
        }
        return tuple(shown[name] for name in panel_out)

    @_guard
    def component_changed(state, component, layer):
        session = _session(state)
        layer, slider = clamp(session, component, layer)
        return (*panels.routing_figures(session, component, layer), slider)

    @_guard
    def residual(state, keep):
        return player(jobs.residual_speech(lab, _session(state), keep))

    @_guard
    def explain(state, target, method, steps):
        session = _session(state)
        jobs.attribute_turn(lab, session, target, method, steps)
        return (*panels.attribution_figures(session), panels.attribution_text(session))

    @_guard
    def ablate(state, component, spec):
        session = _session(state)
        original, ablated = (turn.reply for turn in jobs.ablate_turn(lab, session, component, spec))
        speech = (original.text, player(original.audio), ablated.text, player(ablated.audio))
        return (*speech, *panels.comparison_figures(session, component))

    @_guard
    def heads_shown(state):
        table, figure, spec = heads.heads_view(_session(state))
        return figure, table, spec

    @_guard
    def ablate_heads(state, spec):
        session = _session(state)
        original, ablated = (turn.reply for turn in jobs.ablate_heads_turn(lab, session, spec))
        speech = (original.text, player(original.audio), ablated.text, player(ablated.audio))
        return (*speech, *panels.comparison_figures(session, "thinker"))

    @_guard
    def lens(state):
        session = _session(state)
        return panels.lens_figure(session, jobs.lens_turn(lab, session))

    def clear(state):
        return sessions.clear(_session(state)), [], None, "", None, None, None

    with _Blocks(title="omnilab · Qwen3-Omni", analytics_enabled=False) as app:
        session = gr.State(sessions.Session(), time_to_live=SESSION_SECONDS, delete_callback=sessions.close_session)  # fmt: skip
        gr.Markdown(panels.banner(lab), elem_id="banner")

        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot")
                speech = gr.Audio(
                    label="Reply speech (streamed)", streaming=True, autoplay=True, interactive=False,
                    elem_id="speech",
                )  # fmt: skip
                with gr.Row():
                    text = gr.Textbox(
                        label="Message", placeholder="Ask about what you upload…", scale=5, elem_id="message",
                        info=f"up to {sessions.MAX_MESSAGE_CHARS:,} characters (a longer message is refused, not cut)",
                    )  # fmt: skip
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear_button = gr.Button("Clear", scale=1, elem_id="clear")
                with gr.Row():
                    audio_in = gr.Audio(
                        label="Audio (file or microphone)", sources=["upload", "microphone"], type="filepath",
                        elem_id="audio-in",
                    )  # fmt: skip
                    image_in = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="image-in")  # fmt: skip
                    with gr.Column():
                        video_in = gr.Video(label="Video", sources=["upload"], elem_id="video-in")
                        video_audio = gr.Checkbox(label="use the video's audio", value=False)
                if lab.model_id == "organism":  # the questions it can answer, one click away
                    from omnilab.organism.examples import examples

                    rows = examples(tempfile.mkdtemp(prefix="omnilab-organism-examples-"))
                    offered = gr.Examples(
                        [
                            [r["text"], r["image"], r["audio"], r["video"], r["use_audio_in_video"]]
                            for r in rows
                        ],
                        inputs=[text, image_in, audio_in, video_in, video_audio],
                        example_labels=[f"{r['task']}: {r['text']}" for r in rows],
                        label="Examples (the evaluation draw: not held out by construction, may repeat training inputs)",
                    )
                    keep_example_files(offered)
            with gr.Column(scale=1):
                with gr.Accordion("Settings", open=True):
                    system = gr.Textbox(
                        label="System prompt", value=default["system"], lines=3, elem_id="system",
                        placeholder="none", info=system_info(lab),
                    )  # fmt: skip
                    voice = gr.Dropdown(
                        label="Voice", choices=lab.speakers or [given.speaker], value=given.speaker
                    )
                    speak = gr.Checkbox(label="speak the reply", value=speaks, interactive=speaks)
                    max_new_tokens = gr.Slider(
                        *RANGES["max_new_tokens"],
                        value=default["max_new_tokens"],
                        step=1,
                        label="max new tokens",
                    )
                    max_speech_frames = gr.Slider(
                        *RANGES["max_speech_frames"], value=default["max_speech_frames"], step=1,
                        label="max speech frames (12.5 per second)",
                    )  # fmt: skip
                    do_sample = gr.Checkbox(label="sample (otherwise greedy)", value=given.do_sample)
                    temperature = gr.Slider(
                        *RANGES["temperature"], value=given.temperature, step=0.01, label="temperature"
                    )
                    top_p = gr.Slider(*RANGES["top_p"], value=given.top_p, step=0.01, label="top p")
                    top_k = gr.Slider(*RANGES["top_k"], value=given.top_k, step=1, label="top k")
                    seed = gr.Number(label="seed", value=0, precision=0)
                    attention = gr.Checkbox(
                        label="record attention (first and last thinker layer)",
                        value=default["record_attention"],
                    )
                with gr.Accordion("Reply as a file", open=False):
                    reply_text = gr.Textbox(label="Reply text", interactive=False)
                    reply_wav = gr.File(label="Reply speech (WAV)", interactive=False)

        gr.Markdown("### The last turn, from its trace")
        with gr.Tabs():
            with gr.Tab("Routing"):
                with gr.Row():
                    component = gr.Radio(list(COMPONENTS), value="thinker", label="component")
                    layer = gr.Slider(0, 1, value=0, step=1, label="layer")
                routing_plot = gr.Plot(label="routing", elem_id="routing-plot")
                with gr.Row():
                    load_plot = gr.Plot(label="expert load")
                    modality_plot = gr.Plot(label="modality specialization")
            with gr.Tab("Positions"):
                positions_plot = gr.Plot(label="TM-RoPE positions", elem_id="positions-plot")
                timeline_plot = gr.Plot(label="timeline")
            with gr.Tab("Speech"):
                codebook_plot = gr.Plot(label="codebooks")
                spectrogram_plot = gr.Plot(label="spectrogram")
                with gr.Row():
                    keep = gr.Slider(1, 16, value=1, step=1, label="keep codebooks 0..n-1 (n)", scale=3)
                    listen = gr.Button("Re-synthesize and listen", scale=1, elem_id="listen")
                residual_audio = gr.Audio(
                    label="speech from the kept codebooks", interactive=False, elem_id="residual-audio"
                )
            with gr.Tab("Attention"):
                token = gr.Dropdown(label="output token", choices=[], value=None)
                attention_row_plot = gr.Plot(label="attention while producing the token")
                attention_map_plot = gr.Plot(label="attention map")
            with gr.Tab("Attribution"):
                with gr.Row():
                    attribution_token = gr.Dropdown(label="output token to explain", choices=[], value=None)
                    method = gr.Radio(
                        [(label, name) for name, label in panels.ATTRIBUTION_METHODS.items()],
                        value="integrated_gradients", label="method",
                    )  # fmt: skip
                    steps = gr.Slider(
                        2, jobs.MAX_ATTRIBUTION_STEPS, value=32, step=1, label="steps (Integrated Gradients)",
                        elem_id="attribution-steps",
                    )  # fmt: skip
                    explain_button = gr.Button("Explain", elem_id="explain")
                attribution_text = gr.Textbox(
                    label="target and convergence", interactive=False, elem_id="attribution-text"
                )
                attribution_tokens_plot = gr.Plot(label="attribution over tokens", elem_id="attribution-plot")
                attribution_modality_plot = gr.Plot(label="attribution by modality")
            with gr.Tab("Logit lens"):
                lens_button = gr.Button("Read the logit lens of the last turn", elem_id="lens")
                lens_plot = gr.Plot(label="logit lens", elem_id="lens-plot")
            with gr.Tab("Latency"):
                latency_plot = gr.Plot(label="latency")
                latency_text = gr.Code(label="streamed latency breakdown", language=None, interactive=False)
            with gr.Tab("Interventions"):
                with gr.Row():
                    ablate_component = gr.Radio(list(COMPONENTS), value="thinker", label="component")
                    ablate_spec = gr.Textbox(
                        label="experts to ablate", placeholder="layer: experts; … e.g. 0: 3, 7 or *: 5"
                    )
                    ablate_button = gr.Button("Ablate and rerun the last turn")
                with gr.Row():
                    with gr.Column():
                        original_text = gr.Textbox(label="original reply", interactive=False)
                        original_audio = gr.Audio(label="original speech", interactive=False)
                        original_plot = gr.Plot(label="original routes")
                    with gr.Column():
                        ablated_text = gr.Textbox(label="ablated reply", interactive=False)
                        ablated_audio = gr.Audio(label="ablated speech", interactive=False)
                        ablated_plot = gr.Plot(label="ablated routes")
                agreement_plot = gr.Plot(label="routing agreement")
            with gr.Tab("Heads"):
                heads_button = gr.Button("Show the heads of the last turn", elem_id="heads")
                heads_plot = gr.Plot(label="attention mass per head: audio and image", elem_id="heads-plot")
                heads_table = gr.Dataframe(label="heads", interactive=False, elem_id="heads-table")
                with gr.Row():
                    heads_spec = gr.Textbox(
                        label="heads to ablate (thinker)", placeholder="layer: heads; … e.g. 1: 0, 3",
                        info="filled with the head that puts the most mass on audio", elem_id="heads-spec",
                    )  # fmt: skip
                    heads_ablate_button = gr.Button(
                        "Ablate heads and rerun the last turn", elem_id="ablate-heads"
                    )
                with gr.Row():
                    with gr.Column():
                        heads_original_text = gr.Textbox(label="original reply", interactive=False)
                        heads_original_audio = gr.Audio(label="original speech", interactive=False)
                        heads_original_plot = gr.Plot(label="original routes")
                    with gr.Column():
                        heads_ablated_text = gr.Textbox(label="ablated reply", interactive=False)
                        heads_ablated_audio = gr.Audio(label="ablated speech", interactive=False)
                        heads_ablated_plot = gr.Plot(label="ablated routes")
                heads_agreement_plot = gr.Plot(label="routing agreement")
            with gr.Tab("Download"):
                with gr.Row():
                    zip_button = gr.Button("Trace (zip of Parquet files)")
                    html_button = gr.Button("Figures (HTML)")
                download = gr.File(label="download", interactive=False)

        turn_in = [text, audio_in, image_in, video_in, video_audio, system, voice, speak, max_new_tokens,
                   max_speech_frames, do_sample, temperature, top_p, top_k, seed, attention, session]  # fmt: skip
        panel_out = {
            "routing": routing_plot, "expert_load": load_plot, "modality_specialization": modality_plot,
            "positions": positions_plot, "timeline": timeline_plot, "codebooks": codebook_plot,
            "spectrogram": spectrogram_plot, "residual_audio": residual_audio, "attention": attention_row_plot,
            "attention_map": attention_map_plot, "attribution_tokens": attribution_tokens_plot,
            "attribution_modality": attribution_modality_plot, "attribution_text": attribution_text,
            "attribution_token": attribution_token, "latency": latency_plot, "latency_text": latency_text,
            "ablation_original": original_plot, "ablation_ablated": ablated_plot, "ablation_agreement": agreement_plot,
            "layer": layer, "token": token, "reply_wav": reply_wav, "lens": lens_plot,
        }  # fmt: skip
        panel_in, panels_out = [session, component, layer, token], list(panel_out.values())
        private = {"api_visibility": "private"}
        # Payloads reach `session.user_message` and `session.settings` raw (preprocess=False): uploads are
        # checked by content before anything decodes them, and every setting is checked there.
        raw = {"preprocess": False}
        job = {**raw, "concurrency_id": MODEL_JOBS, "concurrency_limit": 1}  # one model job at a time
        for trigger, visibility in ((send.click, "public"), (text.submit, "private")):
            trigger(
                chat, turn_in, [chatbot, speech, session], api_name="chat", api_visibility=visibility, **job
            ).success(
                lambda: ("", None, None, None), None, [text, audio_in, image_in, video_in], queue=False, **private
            ).then(show_panels, panel_in, panels_out, **private)  # fmt: skip
        gr.Button(visible=False).click(
            reply, turn_in, [reply_text, reply_wav, chatbot, session], api_name="reply", **job
        ).success(show_panels, panel_in, panels_out, **private)  # fmt: skip
        routing_out = [routing_plot, load_plot, modality_plot]
        layer.release(_guard(panels.routing_figures), panel_in[:3], routing_out, api_name="routing", **raw)
        component.change(component_changed, panel_in[:3], [*routing_out, layer], **raw, **private)
        token.change(
            _guard(panels.attention_figures), [session, token], [attention_map_plot, attention_row_plot],
            api_name="attention", **raw,
        )  # fmt: skip
        for name, figures, outputs in (
            ("positions", panels.position_figures, [positions_plot, timeline_plot]),
            ("speech", panels.speech_figures, [codebook_plot, spectrogram_plot]),
            ("latency", panels.latency_figure, [latency_plot]),
        ):
            gr.Button(visible=False).click(_guard(figures), [session], outputs, api_name=name)
        listen.click(residual, [session, keep], [residual_audio], api_name="residual_speech", **job)
        explain_button.click(
            explain, [session, attribution_token, method, steps],
            [attribution_tokens_plot, attribution_modality_plot, attribution_text], api_name="attribute", **job,
        )  # fmt: skip
        ablate_button.click(
            ablate, [session, ablate_component, ablate_spec],
            [original_text, original_audio, ablated_text, ablated_audio, original_plot, ablated_plot, agreement_plot],
            api_name="ablate", **job,
        )  # fmt: skip
        lens_button.click(lens, [session], [lens_plot], api_name="logit_lens", **job)
        heads_button.click(heads_shown, [session], [heads_plot, heads_table, heads_spec], api_name="heads")
        heads_ablate_button.click(
            ablate_heads, [session, heads_spec],
            [heads_original_text, heads_original_audio, heads_ablated_text, heads_ablated_audio,
             heads_original_plot, heads_ablated_plot, heads_agreement_plot],
            api_name="ablate_heads", **job,
        )  # fmt: skip
        zip_button.click(
            _guard(lambda s: str(panels.trace_zip(_session(s)))), [session], [download], api_name="trace_zip"
        )
        html_button.click(
            _guard(lambda s, c, la, t: str(panels.figures_html(_session(s), c, la, t))), panel_in, [download],
            api_name="figures_html", **raw,
        )  # fmt: skip
        app.load(show_panels, panel_in, panels_out, **private)

        def end_session(request: gr.Request) -> None:
            _end_session(app, session, request)

        app.unload(end_session)
        clear_button.click(
            clear, [session], [session, chatbot, speech, text, audio_in, image_in, video_in], api_name="clear",
            queue=False,
        ).then(show_panels, panel_in, panels_out, **private)  # fmt: skip
    return app


def launch(
    model: str = DEFAULT_MODEL,
    port: int = 7860,
    *,
    lab: OmniLab | None = None,
    max_file_size: int = MAX_FILE_SIZE,
    queue_size: int = QUEUE_SIZE,
    **kw,
) -> gr.Blocks:
    """Load `model` (or use `lab`), build the app and serve it on 127.0.0.1:`port`.

    Extra keyword arguments go to `Blocks.launch` (e.g. prevent_thread_lock=True, quiet=True);
    the safety settings (host, share, monitoring, served paths) cannot be overridden here.
    """
    fixed = {"server_name", "share", "enable_monitoring", "allowed_paths", "max_file_size", "mcp_server"}
    if fixed & set(kw):
        raise ValueError(f"launch() keeps {sorted(fixed & set(kw))} at their safe settings")
    lab = lab if lab is not None else omnilab.load(model)
    for folder in sessions.remove_stale_outputs():
        log.info("removed the downloads of an ended server: %s", folder)
    app = build_app(lab, max_upload_bytes=max_file_size)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    kw.setdefault("show_error", False)
    kw.setdefault("state_session_capacity", 256)
    app.launch(
        server_name="127.0.0.1", server_port=port, share=False, max_file_size=max_file_size,
        enable_monitoring=False, allowed_paths=None, mcp_server=False, ssr_mode=False, pwa=False,
        footer_links=["api"], **kw,
    )  # fmt: skip
    return app
