"""The demo app: its handlers called directly, then the served app through gradio_client.

Direct tests call apps/demo's plain functions with the shared tiny lab; served tests launch the app on
127.0.0.1 at a free port and talk to /chat, /reply, /routing, /attribute, /residual_speech and the
downloads as a script would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import plotly.io
import pytest
import soundfile
from conftest_app import (
    DATA,
    FAST,
    SERVED,
    UPLOAD_LIMIT,
    client,
    demo_module,
    free_port,
    shared_lab,
    turn_args,
)

from apps.demo import jobs, panels
from apps.demo import session as sessions
from omnilab.errors import ConversationError, InterventionError, MediaError
from omnilab.options import GenerationOptions
from omnilab.streaming import model_lock
from omnilab.trace import Trace

pytest_plugins = ["conftest_app"]  # app_env, served
pytestmark = pytest.mark.usefixtures("app_env")


@pytest.fixture(scope="module")
def lab():
    return shared_lab()


@pytest.fixture(scope="module")
def turned(lab):
    """A session after one turn with the sample image and audio."""
    session = sessions.Session()
    message = sessions.user_message("what is this?", image=DATA / "image.png", audio=DATA / "speech.wav")
    jobs.run_turn(lab, session, message, sessions.settings(lab, **FAST))
    return session


# --- settings ------------------------------------------------------------------------------------------


def test_settings_accept_what_a_browser_sends(lab):
    checked = sessions.settings(
        lab, speaker="chelsie", speak="true", max_new_tokens=12.0, top_k="5", seed="", temperature="0.5"
    )
    options = checked.generation
    assert isinstance(options, GenerationOptions) and checked.attention is True
    assert (
        options.speaker,
        options.return_audio,
        options.max_new_tokens,
        options.top_k,
        options.seed,
        options.temperature,
    ) == (
        "Chelsie",
        True,
        12,
        5,
        None,
        0.5,
    )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("speaker", "Bob", "unknown speaker 'Bob'"),
        ("max_new_tokens", 0, "max_new_tokens is 0"),
        ("max_new_tokens", 10**9, "from 1 to 1024"),
        ("max_new_tokens", 2.5, "whole number"),
        ("temperature", float("nan"), "temperature is nan"),
        ("top_p", "hot", "top_p is 'hot'"),
        ("do_sample", "maybe", "true or false"),
        ("seed", -1, "seed is -1"),
    ],
)
def test_settings_refuse_bad_settings_by_name(lab, field, value, words):
    with pytest.raises(ConversationError, match=words.replace("(", r"\(")):
        sessions.settings(lab, **{field: value})


def test_settings_refuse_speech_the_model_cannot_make(lab):
    assert sessions.settings(lab, speaker="Aiden").generation.speaker == "Aiden"
    with pytest.raises(
        ConversationError, match="unknown speaker 'Nobody'; this model speaks as Aiden, Chelsie, Ethan"
    ):
        sessions.settings(lab, speaker="Nobody")
    mute = SimpleNamespace(model_id="omnilab/mute", has_talker=False)  # a model without a talker
    with pytest.raises(ConversationError, match="'omnilab/mute' has no talker, so it cannot speak"):
        sessions.settings(mute, speak=True)
    assert sessions.settings(mute, speak=False).generation.return_audio is False


# --- messages --------------------------------------------------------------------------------------------


def test_user_message_puts_media_first_then_text():
    message = sessions.user_message("hi", image=DATA / "image.png", audio=DATA / "speech.wav")
    assert [item["type"] for item in message["content"]] == ["audio", "image", "text"]
    assert message["content"][1]["image"] == str((DATA / "image.png").resolve())


def test_user_message_takes_gradio_payloads():
    payload = {
        "path": str(DATA / "video.mp4"),
        "orig_name": "video.mp4",
        "meta": {"_type": "gradio.FileData"},
    }
    assert sessions.user_message(video=payload)["content"][0]["video"].endswith("video.mp4")
    assert sessions.upload_path({"video": payload, "subtitles": None}) == payload["path"]
    assert sessions.upload_path(None) is None


def test_user_message_refuses_an_empty_message():
    with pytest.raises(ConversationError, match="the message is empty"):
        sessions.user_message("   ")


def test_user_message_refuses_media_in_the_wrong_box():
    with pytest.raises(MediaError, match="is an image, not audio; put it in the image box"):
        sessions.user_message(audio=DATA / "image.png")


def test_user_message_refuses_a_file_by_content_not_name(tmp_path):
    fake = tmp_path / "song.wav"
    fake.write_text("not audio")
    with pytest.raises(MediaError, match="the audio 'song.wav' is not audio: its content is plain text"):
        sessions.user_message(audio=fake)


def test_user_message_names_the_slot_kind_for_unknown_content(tmp_path):
    fake = tmp_path / "photo.png"  # named as an image, put in the audio box, holds text
    fake.write_text("not media at all")
    for slot, wanted in (
        ("audio", "is not audio"),
        ("video", "is not a video"),
        ("image", "is not an image"),
    ):
        with pytest.raises(MediaError, match=f"the {slot} 'photo.png' {wanted}: its content is plain text"):
            sessions.user_message(**{slot: fake})


def test_user_message_refuses_uploads_over_the_limit():
    with pytest.raises(MediaError, match="the limit is"):
        sessions.user_message(audio=DATA / "speech.wav", max_bytes=1000)


def test_user_message_refuses_a_url_payload():
    with pytest.raises(MediaError, match="URL is not accepted"):
        sessions.user_message(image={"path": None, "url": "http://example.com/cat.png"})


def test_error_text_is_escaped_bounded_and_hides_unexpected_errors():
    assert sessions.error_text(MediaError("bad <img src=x onerror=alert(1)>")) == (
        "bad &lt;img src=x onerror=alert(1)&gt;"
    )
    assert len(sessions.error_text(ConversationError("x" * 5000))) <= sessions.MAX_ERROR_CHARS
    hidden = sessions.error_text(KeyError("/secret/path"))
    assert "KeyError" in hidden and "/secret/path" not in hidden


# --- turns -----------------------------------------------------------------------------------------------


def test_a_turn_records_reply_trace_and_history(turned):
    turn = turned.last
    assert turn.reply.text and turn.reply.audio is not None and turn.reply.audio.dtype == np.float32
    assert isinstance(turn.reply.trace, Trace) and len(turn.reply.trace.routing) > 0
    assert [m["role"] for m in turned.messages] == ["user", "assistant"]
    assert turned.chat[0]["content"].startswith("[audio: `speech.wav`]")
    assert turn.conversation[0]["role"] == "system"


def test_a_second_turn_answers_after_the_first(lab, turned):
    session = sessions.Session(messages=list(turned.messages), chat=list(turned.chat))
    turn = jobs.run_turn(
        lab, session, sessions.user_message("and then?"), sessions.settings(lab, speak=False, **FAST)
    )
    assert turn.conversation[1:3] == turned.messages and len(session.messages) == 4
    assert turn.reply.audio is None


@pytest.fixture(scope="module")
def streamed(lab):
    """(updates, session) of one streamed turn with the sample image."""
    session = sessions.Session()
    message = sessions.user_message("stream please", image=DATA / "image.png")
    return list(jobs.stream_turn(lab, session, message, sessions.settings(lab, **FAST))), session


def test_stream_turn_hands_out_the_whole_reply_in_pieces(streamed):
    updates, session = streamed
    turn = updates[-1].turn
    assert turn is not None and all(u.turn is None for u in updates[:-1])
    assert updates[-1].text == turn.reply.text and session.last is turn
    audio = np.concatenate([u.audio for u in updates if u.audio is not None])
    np.testing.assert_array_equal(audio, turn.reply.audio)


def test_a_stream_closed_early_frees_the_model_and_records_nothing(lab):
    session = sessions.Session()
    updates = jobs.stream_turn(lab, session, sessions.user_message("stop me"), sessions.settings(lab, **FAST))
    next(updates)
    updates.close()  # what Gradio does when the browser goes away
    lock = model_lock(lab.model)  # the job's thread let go of it (this thread never held it)
    assert lock.acquire(blocking=False)
    lock.release()
    assert session.last is None and session.messages == []
    assert not getattr(lab, "_tracers", [])


def test_a_stream_advanced_from_several_threads_holds_the_model_lock_until_it_ends(lab):
    session = sessions.Session()
    updates = jobs.stream_turn(lab, session, sessions.user_message("threads"), sessions.settings(lab, **FAST))
    lock, seen = model_lock(lab.model), []
    while not seen or seen[-1] is not None:  # as Gradio does: each step on whichever thread is free
        step = threading.Thread(target=lambda: seen.append(next(updates, None)))
        step.start()
        step.join(timeout=120)
        assert not step.is_alive(), "a step of the stream hung on the model lock"
        if seen[-1] is not None and seen[-1].turn is None:
            assert not lock.acquire(blocking=False)  # held between steps, by the job's own thread
    assert seen[-2].turn is not None and session.last is seen[-2].turn
    assert lock.acquire(blocking=False)
    lock.release()


def test_every_panel_has_data_after_a_streamed_turn(streamed):
    _, session = streamed
    figures = panels.all_figures(session)
    for name in ("routing", "expert_load", "positions", "codebooks", "spectrogram", "attention", "latency"):
        assert len(figures[name].data) > 0, name
    assert "first-packet latency" in panels.latency_text(session)


def test_media_errors_name_the_upload_not_the_server_path(lab, tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((DATA / "image.png").read_bytes()[:900])
    message = sessions.user_message("hi", image=truncated)
    with pytest.raises(MediaError) as caught:
        jobs.run_turn(lab, sessions.Session(), message, sessions.settings(lab, **FAST))
    assert "the image 'cut.png' is truncated" in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_a_failed_turn_leaves_the_session_as_it_was(lab, tmp_path):
    session = sessions.Session()
    broken = tmp_path / "cut.png"
    broken.write_bytes((DATA / "image.png").read_bytes()[:900])
    with pytest.raises(MediaError):
        jobs.run_turn(lab, session, sessions.user_message("hi", image=broken), sessions.settings(lab, **FAST))
    assert session.messages == [] and session.last is None


def test_write_wav_writes_the_reply_speech(turned, tmp_path):
    path = panels.write_wav(turned.last.reply, tmp_path)
    audio, rate = soundfile.read(path)
    assert rate == 24_000 and len(audio) == len(turned.last.reply.audio)


# --- panels ----------------------------------------------------------------------------------------------


def test_routing_figures_show_the_chosen_layer(turned):
    heatmap, load, specialization = panels.routing_figures(turned, "thinker", 1)
    assert all(isinstance(f, go.Figure) for f in (heatmap, load, specialization))
    assert heatmap.data[-1].type == "heatmap" and "layer 1" in heatmap.layout.title.text
    assert len(load.data[0].x) == 16 and "layer 1" in load.layout.title.text  # tiny: 16 thinker experts
    assert set(specialization.data[0].y) >= {"text", "image", "audio"}


def test_routing_figures_refuse_a_layer_out_of_range(turned):
    with pytest.raises(ConversationError, match="layer 9 is out of range: the talker has layers 0..1"):
        panels.routing_figures(turned, "talker", 9)


def test_panels_before_any_turn_say_what_to_do():
    figures = panels.all_figures(sessions.Session())
    assert all(
        "send a message" in f.layout.annotations[0].text for k, f in figures.items() if "ablation" not in k
    )


def test_every_panel_has_data_after_a_turn(turned):
    figures = panels.all_figures(turned)
    for name in (
        "routing",
        "expert_load",
        "positions",
        "timeline",
        "codebooks",
        "spectrogram",
        "attention",
        "latency",
    ):
        assert len(figures[name].data) > 0, name


def test_attention_follows_the_picked_token(turned):
    tokens = panels.token_choices(turned)
    pos = tokens[-1][1]
    figure = panels.attention_figures(turned, pos)[1]
    assert f"token {pos}" in figure.layout.title.text and {t.name for t in figure.data} == {
        "layer 0",
        "layer 3",
    }


def test_residual_speech_resynthesizes_the_reply_from_its_first_codebooks(lab, turned):
    coarse = jobs.residual_speech(lab, turned, 1)
    full = jobs.residual_speech(lab, turned, "16")  # a slider's value may arrive as text
    assert coarse.dtype == np.float32 and full.dtype == np.float32
    assert len(coarse) == len(full) > 0 and not np.allclose(coarse, full)
    np.testing.assert_allclose(full, turned.last.reply.audio, atol=1e-5)  # all 16: the reply itself


@pytest.mark.parametrize(
    ("keep", "words"), [(0, "codebooks to keep is 0"), (17, "from 1 to 16"), ("all", "'all'")]
)
def test_residual_speech_refuses_a_codebook_count_out_of_range(lab, turned, keep, words):
    with pytest.raises(ConversationError, match=words):
        jobs.residual_speech(lab, turned, keep)


def test_residual_speech_needs_a_spoken_reply(lab, turned):
    with pytest.raises(ConversationError, match="send a message first"):
        jobs.residual_speech(lab, sessions.Session(), 4)
    silent = replace(turned.last, reply=replace(turned.last.reply, audio=None, codes=None))
    with pytest.raises(ConversationError, match="the last reply has no speech; tick 'speak the reply'"):
        jobs.residual_speech(lab, sessions.Session(last=silent), 4)


def test_output_tokens_index_the_reply(lab, turned):
    choices = jobs.output_tokens(lab, turned)
    assert [index for _, index in choices] == list(range(len(turned.last.reply.token_ids)))
    assert jobs.output_tokens(lab, sessions.Session()) == []


@pytest.fixture(scope="module")
def explained(lab, turned):
    """A copy of the turned session after Integrated Gradients on its second output token."""
    session = sessions.Session(messages=turned.messages, last=turned.last)
    jobs.attribute_turn(lab, session, 1, "integrated_gradients", 4)
    return session


def test_attribution_explains_the_picked_output_token(explained):
    result = explained.attribution
    assert result.method == "integrated_gradients" and result.target["index"] == 1
    assert result.target["token_id"] == explained.last.reply.token_ids[1]
    assert {"text", "audio", "image"} <= set(result.tokens["modality"])
    text = panels.attribution_text(explained)
    assert text.startswith("Integrated Gradients of output token 1") and "convergence delta" in text


def test_attribution_figures_show_tokens_and_modalities(explained):
    over_tokens, by_modality = panels.attribution_figures(explained)
    assert len(over_tokens.data) > 0 and len(by_modality.data) > 0
    assert not over_tokens.layout.annotations  # a chart, not a note


def test_feature_ablation_has_no_convergence_delta(lab, turned):
    session = sessions.Session(messages=turned.messages, last=turned.last)
    jobs.attribute_turn(lab, session, None, "feature_ablation", 32)
    assert session.attribution.target["index"] == 0  # no pick: the first output token
    assert "no convergence delta for this method" in panels.attribution_text(session)


@pytest.mark.parametrize(
    ("target", "method", "steps", "words"),
    [
        (99, "integrated_gradients", 4, "output token is 99; pass a whole number from 0 to "),
        (-1, "integrated_gradients", 4, "output token is -1; pass a whole number from 0 to "),
        (0, "saliency", 4, "unknown attribution method 'saliency'"),
        (0, "integrated_gradients", 10**6, "steps is 1000000"),
    ],
)
def test_attribution_refuses_bad_requests_by_name(lab, turned, target, method, steps, words):
    with pytest.raises(ConversationError, match=words):
        jobs.attribute_turn(lab, sessions.Session(last=turned.last), target, method, steps)


def test_attribution_needs_a_turn_first(lab):
    with pytest.raises(ConversationError, match="send a message first"):
        jobs.attribute_turn(lab, sessions.Session(), 0)
    assert panels.attribution_text(sessions.Session()) == ""


def test_a_new_turn_drops_the_last_attribution(explained):
    session = sessions.Session(last=explained.last, attribution=explained.attribution)
    session.record(sessions.user_message("again"), explained.last)
    assert session.attribution is None
    assert "press Explain" in panels.attribution_figures(session)[0].layout.annotations[0].text


def test_trace_zip_holds_the_turns_parquet_files(turned, tmp_path):
    with zipfile.ZipFile(panels.trace_zip(turned)) as archive:
        archive.extractall(tmp_path)
    trace = Trace.load(tmp_path / "trace")
    assert trace.meta["text"] == turned.last.reply.text
    assert len(trace.routing) == len(turned.last.reply.trace.routing)


def test_figures_html_is_one_self_contained_page(turned):
    page = panels.figures_html(turned).read_text()
    assert page.count("plotly-graph-div") >= 11 and "Plotly.newPlot" in page


def test_figures_html_includes_the_attribution(explained):
    page = panels.figures_html(explained).read_text()
    assert page.count("Plotly.newPlot") == len(panels.all_figures(explained)) and "press Explain" not in page


def test_downloads_before_any_turn_say_what_to_do():
    with pytest.raises(ConversationError, match="send a message first"):
        panels.trace_zip(sessions.Session())


# --- interventions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0: 3, 7", {0: [3, 7]}), ("1:2; 1:5 6", {1: [2, 5, 6]}), ("*: 4", {0: [4], 1: [4], 2: [4], 3: [4]})],
)
def test_parse_ablation_reads_layer_expert_lists(text, expected):
    assert jobs.parse_ablation(text, "thinker", 4) == {"thinker": expected}


@pytest.mark.parametrize("text", ["", "3", "a: 1", "0:", "0: x"])
def test_parse_ablation_refuses_what_it_cannot_read(text):
    with pytest.raises(InterventionError):
        jobs.parse_ablation(text, "thinker", 4)


def test_ablated_rerun_never_routes_to_the_ablated_experts(lab, turned):
    session = sessions.Session(messages=turned.messages, last=turned.last)
    original, ablated = jobs.ablate_turn(lab, session, "thinker", "0: 1, 2, 3")
    routing = ablated.reply.trace.routing
    at_layer = routing[(routing["component"] == "thinker") & (routing["layer"] == 0)]
    assert not at_layer["expert"].isin([1, 2, 3]).any()
    assert (
        original.reply.trace.routing.query("component == 'thinker' and layer == 0")["expert"]
        .isin([1, 2, 3])
        .any()
    )
    left, right, agreement = panels.comparison_figures(session)
    assert "original" in left.layout.title.text and "ablated" in right.layout.title.text
    first_layer = [t for t in agreement.data if t.name == "thinker agreement"][0]
    assert first_layer.y[0] < 1.0  # layer 0 routes differently once its experts are gone


def test_ablation_needs_a_turn_first(lab):
    with pytest.raises(ConversationError, match="send a message first"):
        jobs.ablate_turn(lab, sessions.Session(), "thinker", "0: 1")


def test_banner_says_random_weights_and_how_to_load_real_ones(lab):
    text = panels.banner(lab)
    assert "omnilab/tiny" in text and "random-weight" in text and "Qwen/Qwen3-Omni-30B-A3B-Instruct" in text


# --- the app object --------------------------------------------------------------------------------------


def test_build_app_exposes_the_script_endpoints(lab):
    app = demo_module().build_app(lab)
    names = {fn.api_name for fn in app.fns.values() if fn.api_visibility == "public"}
    assert {
        "chat",
        "reply",
        "routing",
        "residual_speech",
        "attribute",
        "ablate",
        "trace_zip",
        "figures_html",
    } <= names


def test_launch_keeps_its_safety_settings(lab):
    with pytest.raises(ValueError, match="safe settings"):
        demo_module().launch(lab=lab, server_name="0.0.0.0")


# --- served, through gradio_client -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def script(served):
    return client(served)


def test_served_app_binds_loopback_only(served):
    assert served.startswith("http://127.0.0.1:")


def test_served_app_is_safe_by_default(served):
    app = SERVED[served]
    assert app.share is False and app.enable_monitoring is False and not app.allowed_paths
    assert app.analytics_enabled is False
    assert app._queue.max_size == 16 and app.max_file_size == UPLOAD_LIMIT
    model_jobs = [
        fn
        for fn in app.fns.values()
        if fn.api_name in ("chat", "reply", "ablate", "attribute", "residual_speech")
    ]
    assert len(model_jobs) == 5
    assert {fn.concurrency_id for fn in model_jobs} == {"model"}
    assert all(fn.concurrency_limit == 1 for fn in model_jobs)


@pytest.mark.slow
def test_omnilab_demo_command_serves_the_app_on_loopback(app_env):
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "omnilab.cli", "demo", "--model", "tiny", "--port", str(port)]
    process = subprocess.Popen(command, cwd=app_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and process.poll() is None:
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail(f"omnilab demo did not serve on port {port} (exit code {process.poll()})")
        assert config["title"] == "omnilab · Qwen3-Omni"
        assert any(d.get("api_name") == "reply" for d in config["dependencies"])
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def first_reply(script):
    """The outputs of one /reply turn with the sample audio, image and video."""
    from gradio_client import handle_file

    media = [handle_file(str(DATA / name)) for name in ("speech.wav", "image.png", "video.mp4")]
    return script.predict(*turn_args("describe what you hear and see", *media), api_name="/reply")


@pytest.fixture(scope="module")
def answered(script, first_reply):
    """The client whose session has had that turn (the panels' endpoints show it)."""
    return script


def test_reply_endpoint_answers_audio_image_and_video_with_text_and_a_wav(first_reply):
    text, wav, chat = first_reply
    assert text and chat[-1]["role"] == "assistant"
    audio, rate = soundfile.read(wav)
    assert rate == 24_000 and len(audio) > 0 and open(wav, "rb").read(4) == b"RIFF"


def test_routing_endpoint_returns_plotly_figures(answered):
    heatmap, load, specialization = answered.predict("thinker", 2, api_name="/routing")
    figure = plotly.io.from_json(heatmap["plot"])
    assert heatmap["type"] == "plotly" and figure.data[0].type == "heatmap"
    assert "video" in plotly.io.from_json(specialization["plot"]).data[0].y


def test_trace_zip_endpoint_returns_the_last_turn(answered, tmp_path):
    with zipfile.ZipFile(answered.predict(api_name="/trace_zip")) as archive:
        names = set(archive.namelist())
        meta = json.loads(archive.read("trace/meta.json"))
    assert {"trace/routing.parquet", "trace/tokens.parquet", "trace/codes.parquet"} <= names
    assert {item["modality"] for item in meta["items"]} == {"audio", "image", "video"}


def test_residual_speech_endpoint_returns_a_wav(answered):
    audio, rate = soundfile.read(answered.predict(2, api_name="/residual_speech"))
    assert rate == 24_000 and len(audio) > 0


def test_attribute_endpoint_returns_plotly_figures_and_the_delta(answered):
    over_tokens, by_modality, text = answered.predict(0, "integrated_gradients", 2, api_name="/attribute")
    assert over_tokens["type"] == "plotly" and plotly.io.from_json(over_tokens["plot"]).data
    assert {"audio", "image", "video"} <= set(plotly.io.from_json(by_modality["plot"]).data[0].x)
    assert "output token 0" in text and "convergence delta" in text


def test_figures_html_endpoint_returns_the_page(answered):
    page = open(answered.predict("thinker", 0, None, api_name="/figures_html"), encoding="utf-8").read()
    assert page.startswith("<!doctype html>") and page.count("Plotly.newPlot") >= 11


def test_a_second_turn_continues_the_conversation(answered):
    text, wav, chat = answered.predict(*turn_args("and what happens next?"), api_name="/reply")
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2 and text
    assert "next?" in chat[2]["content"][0]["text"]


def test_chat_endpoint_streams_text_and_speech_for_audio_image_and_video(served):
    from gradio_client import handle_file

    media = [handle_file(str(DATA / name)) for name in ("speech.wav", "image.png", "video.mp4")]
    job = client(served).submit(*turn_args("stream it", *media, max_speech_frames=10), api_name="/chat")
    outputs = list(job)
    assert job.status().success
    texts = [
        chat[-1]["content"][0]["text"] for chat, _ in outputs if chat and chat[-1]["role"] == "assistant"
    ]
    assert len(texts) >= 2 and texts[-1]
    assert any(isinstance(audio, str) and audio.endswith(".m3u8") for _, audio in outputs)


def test_four_clients_at_once_each_get_their_own_reply_and_trace(served, lab, tmp_path):
    prompts = ["alpha", "bravo charlie", "delta echo foxtrot", "golf"]
    results: dict[str, tuple] = {}

    def one(prompt):
        c = client(served)
        text, wav, chat = c.predict(*turn_args(prompt), api_name="/reply")
        results[prompt] = (text, chat, c.predict(api_name="/trace_zip"))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert set(results) == set(prompts)
    for prompt, (text, chat, zipped) in results.items():
        expected = jobs.run_turn(
            lab,
            sessions.Session(),
            sessions.user_message(prompt),
            sessions.settings(lab, seed=0, **FAST),
            system="",
        )
        assert text == expected.reply.text
        assert [m["role"] for m in chat] == ["user", "assistant"] and prompt in chat[0]["content"][0]["text"]
        with zipfile.ZipFile(zipped) as archive:
            archive.extractall(tmp_path / prompt)
        trace = Trace.load(tmp_path / prompt / "trace")
        assert trace.meta["text"] == text
        assert prompt.split()[-1] in "".join(trace.tokens.query("component == 'thinker'")["text"])
    assert len({text for text, _, _ in results.values()}) == len(prompts)


def test_players_amplify_the_near_silent_speech_of_random_weights():
    quiet = np.array([0.0, 1e-6, -2e-6], dtype=np.float32)
    assert not panels.pcm16(quiet).any()  # 16 bits round random-weight speech to silence
    loud = panels.pcm16(quiet, amplify=True)
    assert loud.min() == -16383 and loud[1] == 8191  # scaled to a 0.5 peak, shape kept
    assert not panels.pcm16(np.zeros(3), amplify=True).any()


# --- memory: attention is estimated before a turn and left out over budget ---------------------------------


def test_the_capture_estimate_counts_the_attention_rows_a_trace_records(lab):
    from omnilab.instrument.budget import ATTENTION_ROW_BYTES, estimate_capture_bytes

    conversation = [{"role": "user", "content": [{"type": "text", "text": "count me " * 40}]}]
    inputs = lab.prepare(conversation)
    layers = {"thinker": jobs._attention_layers(lab)}
    estimate = estimate_capture_bytes(lab, inputs, ("routing", "attention"), layers, max_new_tokens=3)
    with lab.trace(capture=("attention",), attention_layers=layers) as tracer:
        reply = lab.generate(conversation, max_new_tokens=3, return_audio=False)
    assert len(reply.token_ids) == 3  # the estimate assumes every new token is made
    rows = len(tracer.trace.attention)
    assert (
        estimate.bytes["attention"] // ATTENTION_ROW_BYTES
        >= rows
        >= 0.95 * estimate.bytes["attention"] // ATTENTION_ROW_BYTES
    )
    assert estimate.tokens == inputs["input_ids"].shape[1] and estimate.bytes["routing"] > 0
    assert estimate.total == sum(estimate.bytes.values())


def test_the_attention_estimate_grows_linearly_by_default_and_with_the_square_for_every_row(lab):
    from omnilab.instrument.budget import estimate_capture_bytes

    layers = {"thinker": [0]}
    small, large = (
        estimate_capture_bytes(lab, n, ("attention",), layers).bytes["attention"] for n in (1000, 4000)
    )
    assert large == 4 * small
    small, large = (
        estimate_capture_bytes(
            lab, n, ("attention",), layers, attention={"queries": "all", "blocks": False}
        ).bytes["attention"]
        for n in (1000, 4000)
    )
    assert large == pytest.approx(16 * small, rel=1e-3)


def test_a_turn_over_the_memory_budget_runs_without_attention_and_says_so(lab):
    session = sessions.Session(memory_budget=10**6)
    message = sessions.user_message("a long question " * 40)
    turn = jobs.run_turn(lab, session, message, sessions.settings(lab, **FAST, attention=True))
    assert turn.reply.text is not None and turn.reply.trace is not None
    assert turn.reply.trace.attention.empty and not turn.settings.attention
    assert "attention was not recorded for this turn" in turn.notice
    assert "prompt tokens" in turn.notice and "the budget is 1.0 MB" in turn.notice  # human units
    note = panels.attention_figures(session)[0].layout.annotations[0].text
    assert "attention was not recorded for this turn" in note


def test_a_streamed_turn_over_the_budget_also_runs_without_attention(lab):
    session = sessions.Session(memory_budget=10**6)
    updates = list(
        jobs.stream_turn(lab, session, sessions.user_message("hello " * 50), sessions.settings(lab, **FAST))
    )
    turn = updates[-1].turn
    assert turn.reply.trace.attention.empty and "attention was not recorded" in turn.notice


def test_a_turn_within_the_budget_records_attention(lab):
    session = sessions.Session()
    turn = jobs.run_turn(lab, session, sessions.user_message("hi"), sessions.settings(lab, **FAST))
    assert not turn.reply.trace.attention.empty and turn.notice is None


# --- uploads go when their session ends -----------------------------------------------------------------


def _fake_upload(name: str, content: bytes) -> str:
    folder = sessions.upload_folder() / f"test-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return str((folder / name).resolve())


def test_a_session_deletes_its_uploads_when_it_ends_and_keeps_shared_ones_until_the_last():
    mine, shared = _fake_upload("mine.png", b"1"), _fake_upload("shared.png", b"2")
    first, second = sessions.Session(), sessions.Session()
    first.hold(sessions.upload_paths({"path": mine}, shared, None))
    second.hold(sessions.upload_paths(shared))
    first.close()
    assert not Path(mine).exists() and not Path(mine).parent.exists()
    assert Path(shared).exists()  # the second session still has it
    sessions.clear(second)
    assert not Path(shared).exists()


def test_a_session_gradio_evicts_at_capacity_deletes_its_uploads_and_downloads():
    """Gradio's StateHolder drops the oldest session past its capacity without calling the State's
    delete callback: the dropped session's files still go."""
    import gc

    import gradio as gr
    from gradio.state_holder import StateHolder

    with gr.Blocks() as blocks:
        state = gr.State(sessions.Session(), delete_callback=sessions.close_session)
    blocks.state_session_capacity = 1
    holder = StateHolder()
    holder.set_blocks(blocks)
    mine, kept = _fake_upload("evicted.png", b"3"), _fake_upload("kept.png", b"4")
    old = holder["old"][state._id]
    old.hold(sessions.upload_paths(mine))
    folder = old.output_folder()
    holder["new"][state._id].hold(sessions.upload_paths(kept))  # past capacity: "old" is evicted
    del old
    gc.collect()
    assert "old" not in holder and not Path(mine).exists() and not folder.exists()
    assert Path(kept).exists()
    holder["new"][state._id].close()
    assert not Path(kept).exists()


def test_a_session_never_deletes_the_apps_own_files_it_sent():
    example = _fake_upload("example.png", b"5")
    sessions.keep([example])  # what build_app does with its examples' files
    session = sessions.Session()
    session.hold(sessions.upload_paths({"path": example}))
    sessions.clear(session)
    assert Path(example).exists() and session.uploads == []


def test_files_outside_the_upload_folder_are_never_held(tmp_path):
    outside = tmp_path / "keep.png"
    outside.write_bytes(b"x")
    session = sessions.Session()
    session.hold(sessions.upload_paths(str(outside), {"path": "/etc/passwd"}, {"url": "http://x"}))
    session.close()
    assert outside.exists() and session.uploads == []


# --- downloads are written atomically; a killed server's downloads go at the next start ----------------------


def test_a_download_that_fails_midway_leaves_no_file(turned, monkeypatch):
    import soundfile as sf

    folder = turned.output_folder()
    before = set(folder.iterdir())

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF half")  # what a kill mid-write would leave
        raise OSError("disk full")

    monkeypatch.setattr(sf, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        panels.write_wav(turned.last.reply, folder)
    monkeypatch.setattr(Trace, "save", lambda self, directory: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        panels.trace_zip(turned)
    assert set(folder.iterdir()) == before  # no partial file, no half-written one under a final name


def test_downloads_appear_only_under_their_final_names(turned):
    paths = [panels.write_wav(turned.last.reply, turned.output_folder()), panels.trace_zip(turned)]
    paths.append(panels.figures_html(turned))
    assert all(p.exists() and not p.name.startswith(panels.PARTIAL) for p in paths)
    assert not [p for p in turned.output_folder().rglob("*") if panels.PARTIAL in p.name]


def test_the_downloads_of_an_ended_server_are_removed_at_start():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = sessions.output_root() / f"pid-{int(dead.stdout)}" / "session-x"
    stale.mkdir(parents=True)
    (stale / f"{panels.PARTIAL}1234-trace-1.zip").write_bytes(b"PK half")
    live = sessions.Session()  # held: a session nobody holds has its files removed (see eviction)
    mine = live.output_folder()
    assert stale.parent in sessions.remove_stale_outputs()
    assert not stale.parent.exists() and mine.exists()
    live.close()
