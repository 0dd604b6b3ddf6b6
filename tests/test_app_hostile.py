"""The served demo under hostile input: each gets a clear, escaped error, and the app keeps serving.

Broken and lying media go through gradio_client's upload and the /reply endpoint as any script
would send them; oversized uploads, path traversal and forged file payloads go as raw HTTP.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest
import soundfile
from conftest_app import DATA, UPLOAD_LIMIT, client, env_folder, make_hostile_files, turn_args

pytest_plugins = ["conftest_app"]  # app_env, served
pytestmark = pytest.mark.usefixtures("app_env")


@pytest.fixture(scope="module")
def files(app_env):
    return make_hostile_files(app_env / "hostile")


@pytest.fixture(scope="module")
def script(served):
    return client(served)


def _refusal(script, *args, api_name="/reply") -> str:
    """The error text the app answers with (the call must fail)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        script.predict(*args, api_name=api_name)
    return str(caught.value)


def _assert_clear(message: str, words: str) -> None:
    """A script's error: the words, as plain text (not HTML-escaped), no traceback, no server path."""
    assert words in message, message
    assert "Traceback" not in message and "&#x27;" not in message and "&lt;" not in message
    assert str(env_folder()) not in message  # no server paths


# (case, slot, file, extra settings, what the message says)
MEDIA_CASES = [
    ("corrupt wav", "audio", "corrupt.wav", {}, "the audio 'corrupt.wav' is truncated or corrupt"),
    ("truncated wav", "audio", "truncated.wav", {}, "the audio 'truncated.wav' is truncated"),
    ("text file named .wav", "audio", "text-named.wav", {}, "is not audio: its content is plain text"),
    ("zero-length audio", "audio", "zero-length.wav", {}, "is empty (0 bytes)"),
    ("wav with no samples", "audio", "no-samples.wav", {}, "holds no samples"),
    (
        "audio over 40 min",
        "audio",
        "41-min.flac",
        {},
        "41.0 min long (from its header); the limit is 40.0 min",
    ),
    ("header claims 30000x30000", "image", "huge-header.png", {}, "900.0 megapixels (from its header)"),
    ("truncated png", "image", "truncated.png", {}, "the image 'truncated.png' is truncated"),
    ("html named .png", "image", "html-named.png", {}, "is not an image: its content is an HTML page"),
    ("video with no frames", "video", "no-frames.mp4", {}, "has no streams at all"),
    ("video of sound only", "video", "sound-only.mp4", {}, "has no video stream, only sound"),
    ("truncated mp4", "video", "truncated.mp4", {}, "the video 'truncated.mp4' is truncated"),
    ("text file named .mp4", "video", "text-named.mp4", {}, "is not a video: its content is plain text"),
    ("video over 40 min", "video", "41-min.mp4", {}, "min long (from its metadata); the limit is 40.0 min"),
    (
        "video's audio asked of a silent video",
        "video",
        "silent.mp4",
        {"video_audio": True},
        "has no audio track",
    ),
    (
        "image in the audio box",
        "audio",
        "huge-header.png",
        {},
        "is an image, not audio; put it in the image box",
    ),
    (
        "audio in the image box",
        "image",
        "truncated.wav",
        {},
        "is audio, not an image; put it in the audio box",
    ),
]


@pytest.mark.parametrize(
    ("case", "slot", "name", "extra", "words"), MEDIA_CASES, ids=[c[0] for c in MEDIA_CASES]
)
def test_bad_media_gets_a_clear_error(script, files, case, slot, name, extra, words):
    from gradio_client import handle_file

    args = turn_args("what is this?", **{slot: handle_file(str(files[name]))}, **extra)
    _assert_clear(_refusal(script, *args), words)


SETTING_CASES = [
    ("empty message", dict(text=""), "the message is empty"),
    ("whitespace message", dict(text="  \n\t "), "the message is empty"),
    ("message too long", dict(text="x" * 10_001), "10,001 characters long; the limit is 10,000"),
    ("unknown speaker", dict(text="hi", voice="Bob"), "unknown speaker 'Bob'"),
    (
        "markup as speaker",
        dict(text="hi", voice="<img src=x onerror=alert(1)>"),
        "unknown speaker '<img",
    ),
    ("max_new_tokens out of range", dict(text="hi", max_new_tokens=10**6), "max_new_tokens is 1000000"),
    ("temperature not a number", dict(text="hi", temperature="hot"), "temperature is 'hot'"),
    ("system prompt too long", dict(text="hi", system="s" * 5000), "the system prompt is 5,000 characters"),
]


@pytest.mark.parametrize(("case", "settings", "words"), SETTING_CASES, ids=[c[0] for c in SETTING_CASES])
def test_bad_settings_get_a_clear_error(script, case, settings, words):
    _assert_clear(_refusal(script, *turn_args(**settings)), words)


def test_streaming_endpoint_refuses_the_same_way(script):
    _assert_clear(_refusal(script, *turn_args(""), api_name="/chat"), "the message is empty")


def test_panels_refuse_an_unknown_component(script):
    _assert_clear(_refusal(script, "<script>", 0, api_name="/routing"), "unknown component '<script>'")


def test_interventions_and_downloads_need_a_turn_first(script):
    _assert_clear(_refusal(script, "thinker", "0: 1", api_name="/ablate"), "send a message first")
    _assert_clear(_refusal(script, api_name="/trace_zip"), "send a message first")
    _assert_clear(
        _refusal(script, 0, "integrated_gradients", 4, api_name="/attribute"), "send a message first"
    )
    _assert_clear(_refusal(script, 4, api_name="/residual_speech"), "send a message first")


def test_an_upload_over_the_size_limit_is_refused(served, files):
    import httpx

    with open(files["oversized.wav"], "rb") as handle:
        response = httpx.post(f"{served}gradio_api/upload", files={"files": ("big.wav", handle, "audio/wav")})
    assert response.status_code == 413
    assert not any(p.name == "big.wav" for p in (env_folder() / "gradio").rglob("*"))


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../../../../../../etc/passwd",
        "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "data/../../../../../../etc/passwd",
    ],
)
def test_the_file_route_serves_no_path_outside_the_cache(served, path):
    import httpx

    for route in ("gradio_api/file=", "gradio_api/file/", "file="):
        response = httpx.get(f"{served}{route}{path}")
        assert response.status_code in (403, 404, 400, 405), (route, path, response.status_code)
        assert "root:" not in response.text


def test_a_forged_file_payload_cannot_read_server_files(served):
    import httpx

    forged = {"path": "/etc/passwd", "orig_name": "passwd.wav", "meta": {"_type": "gradio.FileData"}}
    start = httpx.post(f"{served}gradio_api/call/reply", json={"data": turn_args("hi", audio=forged)})
    assert start.status_code == 200
    event = start.json()["event_id"]
    stream = httpx.get(f"{served}gradio_api/call/reply/{urllib.parse.quote(event)}", timeout=60).text
    assert "event: error" in stream and "root:" not in stream


def test_monitoring_is_off(served):
    import httpx

    for route in ("monitoring", "monitoring/summary", "gradio_api/monitoring"):
        response = httpx.get(f"{served}{route}")
        assert response.status_code in (403, 404), route
        assert "Monitoring URL" not in response.text


def test_a_normal_turn_still_works_afterwards(script):
    from gradio_client import handle_file

    text, wav, chat = script.predict(
        *turn_args("and now a real question", image=handle_file(str(DATA / "image.png"))), api_name="/reply"
    )
    assert text and chat[-1]["role"] == "assistant"
    audio, rate = soundfile.read(wav)
    assert rate == 24_000 and len(audio) > 0
    routing = script.predict("thinker", 0, api_name="/routing")[0]
    assert json.loads(routing["plot"])["data"][0]["type"] == "heatmap"


def test_the_upload_limit_is_the_one_launched_with(served):
    import httpx

    config = httpx.get(f"{served}config").json()
    assert config.get("max_file_size") == UPLOAD_LIMIT


# (case, endpoint, arguments, what the message says): panels that run the model, after a turn
PANEL_CASES = [
    (
        "markup as attribution method",
        "/attribute",
        (0, "<b>x</b>", 4),
        "unknown attribution method '<b>",
    ),
    (
        "output token out of range",
        "/attribute",
        (10**6, "integrated_gradients", 4),
        "output token is 1000000",
    ),
    (
        "output token not a number",
        "/attribute",
        ("first", "feature_ablation", 4),
        "output token is 'first",
    ),
    ("attribution steps out of range", "/attribute", (0, "integrated_gradients", 10**6), "steps is 1000000"),
    ("no codebooks kept", "/residual_speech", (0,), "codebooks to keep is 0"),
    ("more codebooks than the codec has", "/residual_speech", (17,), "from 1 to 16"),
    ("codebook count as markup", "/residual_speech", ("<i>",), "codebooks to keep is '<i>"),
]


@pytest.fixture(scope="module")
def answered(served):
    """A client of its own whose session has one spoken turn with the sample image."""
    from gradio_client import handle_file

    own = client(served)
    own.predict(*turn_args("look", image=handle_file(str(DATA / "image.png"))), api_name="/reply")
    return own


@pytest.mark.parametrize(("case", "endpoint", "args", "words"), PANEL_CASES, ids=[c[0] for c in PANEL_CASES])
def test_bad_panel_requests_get_a_clear_error(answered, case, endpoint, args, words):
    _assert_clear(_refusal(answered, *args, api_name=endpoint), words)


def test_the_panels_still_answer_afterwards(answered):
    audio, rate = soundfile.read(answered.predict(3, api_name="/residual_speech"))
    assert rate == 24_000 and len(audio) > 0
    text = answered.predict(0, "feature_ablation", 4, api_name="/attribute")[2]
    assert "feature ablation of output token 0" in text
    reply, _, chat = answered.predict(*turn_args("one more", speak=False), api_name="/reply")
    assert reply and len(chat) == 4


# --- the API for scripts ------------------------------------------------------------------------------


def _raw_call(served: str, api_name: str, data: list, headers: dict | None = None) -> str:
    """The event stream of one call made as raw HTTP (as a browser's fetch would, without gradio_client)."""
    import httpx

    start = httpx.post(f"{served}gradio_api/call/{api_name}", json={"data": data}, headers=headers or {})
    assert start.status_code == 200, start.text
    event = urllib.parse.quote(start.json()["event_id"])
    return httpx.get(f"{served}gradio_api/call/{api_name}/{event}", headers=headers or {}, timeout=120).text


def test_the_turn_endpoints_name_their_parameters(script):
    from apps.demo.layout import TURN_PARAMETERS

    api = script.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/chat", "/reply"):
        names = [p["parameter_name"] for p in api[endpoint]["parameters"]]
        assert names == list(TURN_PARAMETERS), (endpoint, names)
    assert TURN_PARAMETERS[:5] == ("text", "audio", "image", "video", "use_video_audio")


def test_a_script_may_pass_turn_parameters_by_name(script):
    text, _, chat = script.predict(text="by name", speak=False, max_new_tokens=3, api_name="/reply")
    assert chat[-2]["content"][0]["text"] == "by name" and chat[-1]["role"] == "assistant"


def test_a_browser_gets_error_text_escaped_and_a_script_plain(served, script):
    markup = "<img src=x onerror=alert(1)>"
    stream = _raw_call(served, "reply", turn_args("hi", voice=markup))
    assert "event: error" in stream and "unknown speaker &#x27;&lt;img src=x" in stream, stream
    assert "<img" not in stream
    assert "unknown speaker '<img src=x" in _refusal(script, *turn_args("hi", voice=markup))


def test_gradio_level_refusals_carry_a_message(served):
    forged = {"path": "/etc/passwd", "orig_name": "passwd.wav", "meta": {"_type": "gradio.FileData"}}
    stream = _raw_call(served, "reply", turn_args("hi", audio=forged), {"x-gradio-user": "api"})
    error = stream.split("event: error", 1)[1]
    assert "data: null" not in error and "could not take this request" in error, stream
    assert "root:" not in stream


def test_the_message_box_says_its_limit_and_cuts_nothing(served):
    import httpx

    config = httpx.get(f"{served}config").json()
    box = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "message")
    assert box["props"].get("max_length") is None  # the browser would cut a paste there, silently
    assert "10,000 characters" in box["props"]["info"]


@pytest.fixture
def watched_server():
    """A local HTTP server on 127.0.0.1 in a thread; yields (its URL, the paths it was asked for)."""
    import http.server
    import threading

    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            body = (DATA / "speech.wav").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fetches_local_urls(monkeypatch):
    """Gradio's downloader, made to fetch 127.0.0.1 too (it refuses internal addresses): so the local
    server stands in for a public one, and a request reaching it means Gradio would fetch a public URL."""
    import gradio.processing_utils as processing

    async def unprotected(url: str, cache_dir: str) -> str:
        return processing.unsafe_download(url, cache_dir)

    monkeypatch.setattr(processing, "async_ssrf_protected_download", unprotected)


def test_the_stand_in_for_a_public_url_is_fetched_when_gradio_downloads_it(
    watched_server, fetches_local_urls
):
    import gradio.processing_utils as processing
    from gradio_client.utils import synchronize_async

    url, asked = watched_server
    synchronize_async(
        processing.async_ssrf_protected_download, f"{url}/speech.wav", str(env_folder() / "tmp")
    )
    assert asked == ["/speech.wav"]  # so the test below would see a fetch


@pytest.mark.parametrize("slot", ["audio", "image", "video"])
def test_a_url_in_a_file_payload_is_refused_before_any_fetch(
    served, script, watched_server, fetches_local_urls, slot
):
    url, asked = watched_server
    payload = {"path": f"{url}/speech.wav", "url": None, "meta": {"_type": "gradio.FileData"}}
    if slot == "video":
        payload = {"video": payload, "subtitles": None}
    stream = _raw_call(served, "reply", turn_args("hi", **{slot: payload}), {"x-gradio-user": "api"})
    assert "event: error" in stream and "a file given as a URL is not accepted" in stream, stream
    _assert_clear(
        _refusal(script, *turn_args("hi", **{slot: payload})), "a file given as a URL is not accepted"
    )
    assert asked == []  # the server never fetched it


# --- uploads go when their session ends -----------------------------------------------------------------


def _uploaded(name: str) -> list:
    return [p for p in (env_folder() / "gradio").rglob(name) if p.is_file()]


def _gone_within(name: str, seconds: float = 30) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while _uploaded(name) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _uploaded(name)


@pytest.mark.parametrize("end", ["disconnect", "clear"])
def test_a_sessions_uploads_are_deleted_when_it_ends(served, tmp_path, end):
    import uuid

    from gradio_client import handle_file

    name = f"mine-{uuid.uuid4().hex[:8]}.png"
    (tmp_path / name).write_bytes((DATA / "image.png").read_bytes() + uuid.uuid4().bytes)  # unique content
    own = client(served)
    own.predict(*turn_args("look", image=handle_file(str(tmp_path / name)), speak=False), api_name="/reply")
    assert _uploaded(name), "the upload should be on the server while its session lives"
    if end == "clear":
        own.predict(api_name="/clear")
    else:
        own.close()  # the heartbeat ends, as when a browser tab closes
    assert _gone_within(name), _uploaded(name)
    if end == "clear":
        own.close()


def test_a_refused_upload_is_deleted_when_its_session_ends(served, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "refused-named.png").write_text("not an image at all")
    own = client(served)
    _refusal(own, *turn_args("look", image=handle_file(str(tmp_path / "refused-named.png"))))
    assert _uploaded("refused-named.png")
    own.close()
    assert _gone_within("refused-named.png")
