"""The HTTP layer as its clients see it: OpenAI's streaming by default and the seed's whole files, request ids and
X-Cache on every path, bounded bodies and slow clients cut off, every field of every endpoint refusing bad values
with a short, clear 400, no secret in the log and no model path in what a client sees."""

from __future__ import annotations

import base64
import json
import select
import socket
import struct
import sys
import threading
import uuid
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest

from conftest import CHECKPOINTS, ROOT, checkpoint, decode, start_server, wait_for

FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm", "ogg"]
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_sizes(data: bytes) -> tuple[int, int]:
    """The RIFF and data sizes of a WAV header."""
    return struct.unpack("<I", data[4:8])[0], struct.unpack("<I", data[data.index(b"data") + 4:][:4])[0]


def tone_wav(seconds: float = 3.0, rate: int = 24000) -> bytes:
    import io

    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * 220 * t), rate, format="WAV")
    return buffer.getvalue()


# ---- OpenAI's streaming semantics, and the seed's clients
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_openai_request_streams_in_every_format_without_asking(http, fmt):
    with http.stream("POST", "/v1/audio/speech", json={"model": "tts-1", "input": f"Streamed by default ({fmt}).",
                                                         "voice": "alloy", "response_format": fmt}) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
        assert r.headers["x-cache"] == "miss"
        data = r.read()
    pcm, rate = decode(data, fmt)
    assert pcm.size / rate > 0.5
    if fmt == "wav":
        assert wav_sizes(data) == (UNKNOWN_SIZE, UNKNOWN_SIZE)


@pytest.mark.parametrize("stream_format", [None, "audio"])
def test_the_first_bytes_arrive_while_the_model_still_speaks(http, stream_format):
    """With or without stream_format: OpenAI streams every answer."""
    request = {"model": "tts-1", "voice": "nova", "response_format": "pcm", "stream_format": stream_format,
               "input": f"The first bytes come long before the last ones ({stream_format}). "
                        "This second sentence keeps the model busy."}         # its own text: never a cache hit
    with http.stream("POST", "/v1/audio/speech", json={k: v for k, v in request.items() if v is not None}) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        health = http.get("/health").json()          # asked after the first bytes, before the end
        rest = b"".join(chunks)
    assert len(first) > 0 and len(rest) > 0
    assert health["queue_depth"] >= 1 and health["busy"], "the first audio came only after generation had ended"


def test_a_cached_stream_is_sent_whole_and_a_wav_then_has_its_exact_sizes(http):
    for fmt in ("wav", "mp3"):
        body = {"model": "tts-1", "input": f"Cache a stream ({fmt}).", "voice": "echo", "response_format": fmt,
                "seed": 5}
        with http.stream("POST", "/v1/audio/speech", json=body) as r:
            streamed = r.read()
            assert r.headers["x-cache"] == "miss" and r.headers["transfer-encoding"] == "chunked"
        again = http.post("/v1/audio/speech", json=body)
        assert again.headers["x-cache"] == "hit" and again.headers["content-length"] == str(len(again.content))
        if fmt == "wav":
            assert wav_sizes(streamed) == (UNKNOWN_SIZE, UNKNOWN_SIZE)
            assert wav_sizes(again.content) == (len(streamed) - 8, len(streamed) - 44)
            assert again.content[44:] == streamed[44:]
        else:
            assert again.content == streamed


def test_a_request_without_model_gets_the_seeds_whole_wav(http):
    r = http.post("/v1/audio/speech", json={"input": "The seed's clients send no model.", "voice": "alloy"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["content-length"] == str(len(r.content)) and "transfer-encoding" not in r.headers
    assert wav_sizes(r.content) == (len(r.content) - 8, len(r.content) - 44)
    assert decode(r.content, "wav")[0].size > 0


def test_errors_carry_the_seeds_code_and_message_and_the_sdk_still_reads_them(http, client):
    for body, status, code, seed_code in (
            ({"input": "hi", "voice": "nobody"}, 400, "invalid_voice", "UNKNOWN_VOICE"),
            ({"model": "tts-1", "input": "hi", "voice": "nobody"}, 400, "invalid_voice", "UNKNOWN_VOICE"),
            ({"input": "hi", "voice": {"id": "voice_missing"}}, 404, "voice_not_found", "UNKNOWN_VOICE"),
            ({"input": "hi", "voice": "alloy", "speed": 9}, 400, "invalid_value", "INVALID_VALUE"),
            ({"voice": "alloy"}, 400, "missing_required_parameter", "MISSING_REQUIRED_PARAMETER")):
        r = http.post("/v1/audio/speech", json=body)
        assert r.status_code == status, r.text
        answer = r.json()
        assert answer["error"]["code"] == code and answer["code"] == seed_code
        assert answer["message"] == answer["error"]["message"]
    for path in ("/v1/audio/speech/stream", "/v1/audio/speech/stream/pcm"):          # before the first byte
        answer = http.post(path, json={"input": "hi", "voice": "nobody"}).json()
        assert answer["code"] == "UNKNOWN_VOICE" and "unknown voice" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice="nobody", input="hello")
    assert "unknown voice" in err.value.message and err.value.code == "invalid_voice"


# ---- x-request-id and X-Cache
def test_every_response_carries_a_request_id_and_a_sane_one_of_the_clients_is_kept(http):
    answers = [http.get("/health"), http.get("/v1/models"), http.get("/v1/nothing"), http.get("/v1/audio/speech"),
               http.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"}),
               http.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})]
    ids = [r.headers.get("x-request-id") for r in answers]
    assert all(ids) and len(set(ids)) == len(ids), ids
    kept = http.get("/health", headers={"X-Request-ID": "client-42.a:b/c"})
    assert kept.headers["x-request-id"] == "client-42.a:b/c"
    for insane in ("with spaces", "x" * 200, "semi;colon", "é"):
        r = http.get("/health", headers={"X-Request-ID": insane.encode()})
        assert r.headers["x-request-id"] != insane and len(r.headers["x-request-id"]) == 32


def test_a_synthesis_log_line_carries_the_request_id(server, http):
    if not getattr(server, "log_path", None):
        pytest.skip("the server at TTS_URL keeps its log to itself")
    request_id = f"e2e-{uuid.uuid4().hex[:12]}"
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": "Find me in the log.", "voice": "alloy",
                                            "response_format": "pcm"}, headers={"X-Request-ID": request_id})
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    def logged() -> list[str]:                     # the line is written as the stream ends
        lines = [line for line in server.log_path.read_text(errors="replace").splitlines() if request_id in line]
        return [line for line in lines if "speech_stream 200" in line]

    wait_for(logged, f"a 'speech_stream 200' log line with {request_id}")


@pytest.mark.parametrize("path, body", [
    ("/v1/audio/speech", {"model": "tts-1", "stream_format": "sse"}),
    ("/v1/audio/speech", {"model": "tts-1", "stream_format": "audio"}),
    ("/v1/audio/speech", {}),
    ("/v1/audio/speech/stream", {}),
    ("/v1/audio/speech/stream/pcm", {}),
])
def test_x_cache_on_every_synthesis_path(http, path, body):
    with http.stream("POST", path, json={"input": f"Cache header on {path} {sorted(body)}.", "voice": "alloy",
                                         "response_format": "pcm", **body}) as r:
        r.read()
        assert r.status_code == 200 and r.headers["x-cache"] in ("hit", "miss")


# ---- every field of every endpoint, with values of every wrong kind
def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


TEXT_BAD = {"lone surrogate": "\ud800", "NUL": "a\x00b", "number": 5, "list": ["a"], "object": {"a": 1},
            "deeply nested": nested(500), "too long": "x" * 5000}
NUMBER_BAD = {"lone surrogate": "\ud800", "word": "fast", "NaN": float("nan"), "infinity": float("inf"),
              "huge": 10**400, "list": [1], "object": {"a": 1}}
CHOICE_BAD = {"lone surrogate": "\ud800", "unknown": "wma", "number": 5, "list": ["mp3"]}
SPEECH = {"model": "tts-1", "input": "hi", "voice": "alloy"}
SPEECH_FIELDS = {"model": TEXT_BAD, "input": TEXT_BAD, "voice": {**TEXT_BAD, "voice object": {"id": "\udfff"}},
                 "instructions": TEXT_BAD, "instruct": TEXT_BAD, "language": TEXT_BAD, "speed": NUMBER_BAD,
                 "temperature": NUMBER_BAD, "top_p": NUMBER_BAD, "seed": {**NUMBER_BAD, "negative": -1},
                 "sample_rate": NUMBER_BAD, "response_format": CHOICE_BAD, "stream_format": CHOICE_BAD}
CONSENT = {"name": "Alice", "language": "en-US"}
VOICE = {"type": "prompt", "name": "walker-voice", "prompt": "A calm voice.", "language": "en"}
CASES = (
    [(path, SPEECH, field, kind, value) for path in ("/v1/audio/speech", "/v1/audio/speech/stream",
                                                    "/v1/audio/speech/stream/pcm")
     for field, bad in SPEECH_FIELDS.items() for kind, value in bad.items()]
    + [("/v1/audio/voice_consents", CONSENT, field, kind, value) for field in ("name", "language")
       for kind, value in TEXT_BAD.items()]
    + [("/v1/audio/voices", VOICE, field, kind, value)
       for field in ("type", "name", "prompt", "language", "script_hint") for kind, value in TEXT_BAD.items()]
    + [("/v1/audio/voices", {"type": "audio_sample", "name": "walker-voice"}, "consent", kind, value)
       for kind, value in TEXT_BAD.items()])


def test_bad_values_in_every_field_get_a_short_400_naming_the_field_and_the_connection_lives_on(http):
    failures = []
    for path, base, field, kind, value in CASES:       # json.dumps: escapes "\ud800", writes NaN and Infinity
        r = http.post(path, content=json.dumps({**base, field: value}), headers={"content-type": "application/json"})
        stream = r.extensions.get("network_stream")
        health = http.get("/health")
        problems = []
        if r.status_code not in (400, 404, 413):
            problems.append(f"status {r.status_code}")
        elif r.status_code == 400 and (r.json()["error"]["param"] not in (field, None)
                                       or field not in r.json()["error"]["message"]):
            problems.append(f"does not name {field}: {r.json()['error']}")
        if len(r.content) > 1500:
            problems.append(f"{len(r.content)} bytes of error")
        if r.json().get("code") is None or set(r.json()["error"]) != {"message", "type", "param", "code"}:
            problems.append("not the envelope")
        if health.status_code != 200 or health.extensions.get("network_stream") is not stream:
            problems.append("the keep-alive connection was dropped")
        if problems:
            failures.append(f"{path} {field}={kind}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert http.get("/health").json()["queue_depth"] == 0


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/audio/voices/%ED%A0%80"), ("DELETE", "/v1/audio/voices/" + "x" * 5000),
    ("GET", "/v1/audio/voice_consents/%00"), ("GET", "/v1/models/" + "m" * 5000),
    ("GET", "/v1/audio/voice_consents?limit=abc"), ("GET", "/v1/audio/voice_consents?limit=" + "9" * 500),
    ("GET", "/" + "p" * 5000)])
def test_bad_paths_and_queries_get_short_errors(http, method, path):
    r = http.request(method, path)
    assert r.status_code in (400, 404) and len(r.content) < 1500 and r.json()["error"]["message"]


def test_bodies_that_are_not_what_they_claim_get_a_400(http):
    for path in ("/v1/audio/speech", "/v1/audio/voice_consents", "/v1/audio/voices"):
        for content, content_type in ((b'{"input": "\xff\xfe"}', "application/json"),
                                      (b"[" * 100_000, "application/json"),
                                      (b'{"input": "hi"}', "text/plain"), (b"\x00\x01\x02", "multipart/form-data")):
            r = http.post(path, content=content, headers={"content-type": content_type})
            assert r.status_code == 400 and len(r.content) < 1500, (path, content[:20], r.text)


def test_uploads_that_are_not_files_or_not_audio_get_a_400(http):
    consent = {"name": "Alice", "language": "en-US"}
    for files, data in (({}, {**consent, "recording": "just text"}),
                        ({"recording": ("r.wav", b"not audio" * 100, "audio/wav")}, consent),
                        ({"recording": ("r.wav", b"", "audio/wav")}, consent)):
        r = http.post("/v1/audio/voice_consents", files=files or None, data=data)
        assert r.status_code == 400 and r.json()["error"]["param"] == "recording", r.text
    r = http.post("/v1/audio/speech/clone", files={"file": ("r.wav", b"RIFF\x00", "audio/wav")}, data={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio"


# ---- what a client sees of the server's files
def test_no_file_system_path_of_a_model_in_what_clients_see(server, http):
    if not getattr(server, "log_path", None):
        pytest.skip("the server at TTS_URL may run a hub model")
    answers = [http.get("/health"), http.get("/ready"), http.get("/v1/models"), http.get("/v1/models/nope"),
               http.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"})]
    for r in answers:
        for path in (str(CHECKPOINTS), "build/checkpoints", str(ROOT)):
            assert path not in r.text, (r.url, r.text[:300])
    assert http.get("/health").json()["model_id"] == "tiny-0.6B-CustomVoice"
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "tiny-0.6B-CustomVoice" in ids and http.get("/v1/models/tiny-0.6B-CustomVoice").status_code == 200


# ---- a server with an API key, short read timeout and tight request timeout
GUARDED_KEY = "s3cret-key"
LATE_INPUT_CHARS = 20000
LONG = ("A sentence to make a long reading of, one after the other, so that the stream outlives its time limit. "
        * (LATE_INPUT_CHARS // 104))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    missing_base = tmp_path_factory.mktemp("models") / "missing-Base"
    proc = start_server("guarded", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), API_KEY=GUARDED_KEY,
                        READ_TIMEOUT="2", REQUEST_TIMEOUT="30", MAX_INPUT_CHARS=str(LATE_INPUT_CHARS),
                        BASE_MODEL_ID=str(missing_base))
    proc.missing_base = missing_base
    yield proc
    proc.stop()


@pytest.fixture()
def authorized(guarded):
    with httpx.Client(base_url=guarded.url, timeout=120, headers={"Authorization": f"Bearer {GUARDED_KEY}"}) as c:
        yield c


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def read_answer(sock: socket.socket, limit: float = 60) -> bytes:
    """Everything the server sends until it closes the connection (at most `limit` seconds)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:      # closed with unread bytes of ours in its buffer: a reset after the answer
        pass
    return data


def trickle(sock: socket.socket, data: bytes, every: float = 0.2) -> bytes:
    """Send data a byte at a time until the server answers; return the answer (b"" if it never did)."""
    for i in range(len(data)):
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            return read_answer(sock)
        sock.sendall(data[i:i + 1])
    return b""


def test_headers_sent_byte_by_byte_are_cut_off_with_a_408(guarded):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 200 + b"\r\n"
    with socket.create_connection(address(guarded.url)) as sock:
        answer = trickle(sock, request)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"READ_TIMEOUT=2s" in answer and b'"code":"REQUEST_TIMEOUT"' in answer


def test_a_connection_that_sends_nothing_is_closed(guarded):
    with socket.create_connection(address(guarded.url)) as sock:
        assert read_answer(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_sent_byte_by_byte_is_cut_off_with_a_408(guarded):
    body = json.dumps({"input": "hi", "voice": "alloy"}).encode() + b" " * 400
    request = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GUARDED_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(address(guarded.url)) as sock:
        sock.sendall(request)
        answer = trickle(sock, body)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"the request body did not arrive within READ_TIMEOUT=2s" in answer
    assert b"connection: close" in answer.lower()


def test_oversized_headers_get_a_431_also_on_a_kept_alive_connection(guarded):
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    with socket.create_connection(address(guarded.url)) as sock:
        sock.sendall(big)                                   # in one piece: the server reads it in one go
        assert read_answer(sock).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(address(guarded.url)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(head.split(b"\r\n\r\n", 1)[1]) < length:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(big)                                   # the second request of the connection
        assert read_answer(sock).startswith(b"HTTP/1.1 431 ")


def test_a_json_body_over_the_limit_is_a_413_naming_it(authorized):
    body = {"model": "tts-1", "input": "hi " * 200_000, "voice": "alloy"}
    r = authorized.post("/v1/audio/speech", json=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "MAX_INPUT_CHARS=20000" in r.json()["error"]["message"] and str(12 * 24096 + 16384) in r.text
    chunked = authorized.post("/v1/audio/speech", content=iter([json.dumps(body).encode()]),
                              headers={"content-type": "application/json"})   # no Content-Length: chunked
    assert chunked.status_code == 413 and chunked.json()["code"] == "REQUEST_TOO_LARGE"


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams_in(guarded):
    """The 413 comes as soon as the body passes the upload limit (11 MiB), not after the 40 MiB the client would
    send: it is read as it arrives, never whole."""
    head = (f"POST /v1/audio/speech/clone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GUARDED_KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    part = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
    chunk = b"\0" * 65536
    sent, answer = 0, b""
    with socket.create_connection(address(guarded.url)) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        while sent < 40 * 2**20:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answer = read_answer(sock)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                answer = read_answer(sock)
                break
            sent += len(chunk)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert sent < 30 * 2**20, f"the server read {sent / 2**20:.0f} MiB before it answered"
    assert b"the limit of an upload" in answer


def test_the_key_opens_everything_but_health_and_ready_which_are_open(guarded, authorized):
    sys.path.insert(0, str(ROOT))
    import server as server_module

    assert server_module.ApiKeyMiddleware.OPEN_PATHS == ("/health", "/ready", "/")
    assert server_module.ApiKeyMiddleware.OPEN_PREFIXES == ("/static/",)
    readme = (ROOT / "README.md").read_text()
    assert "every endpoint but `/health`, `/ready` and the web page's files requires" in readme
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.get(guarded.url + "/ready").status_code in (200, 503)           # open: not 401
    for page in ("/", "/static/app.js"):          # the page asks for the key itself
        assert httpx.get(guarded.url + page).status_code == 200
    for path in ("/v1/models", "/metrics", "/v1/audio/voices"):
        assert httpx.get(guarded.url + path).status_code == 401
        assert authorized.get(path).status_code == 200


def test_api_keys_are_percent_decoded_and_never_written_to_the_log(guarded):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = guarded.url.replace("http://", "ws://") + "/v1/audio/speech/ws"
    with pytest.raises(InvalidStatus):
        connect(ws_url + "?api_key=wrong-key-4711").close()
    encoded = GUARDED_KEY.replace("3", "%33").replace("-", "%2D")      # s%33cret%2Dkey is s3cret-key
    with connect(ws_url + f"?api_key={encoded}") as ws:
        ws.send(json.dumps({"input": "   "}))
        assert json.loads(ws.recv())["event"] == "error"
    def log_with_the_paths() -> str:
        text = guarded.log_path.read_text(errors="replace")
        return text if "api_key=[hidden]" in text else ""

    log = wait_for(log_with_the_paths, "uvicorn to log the WebSocket paths")
    for secret in ("wrong-key-4711", encoded, GUARDED_KEY):
        assert secret not in log


def test_no_model_path_in_errors_health_or_ready(guarded, authorized):
    r = authorized.post("/v1/audio/speech/clone", files={"file": ("r.wav", tone_wav(), "audio/wav")},
                        data={"input": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert "missing-Base" in r.json()["error"]["message"]
    for text in (r.text, httpx.get(guarded.url + "/health").text, httpx.get(guarded.url + "/ready").text):
        assert str(guarded.missing_base.parent) not in text and str(CHECKPOINTS) not in text


def test_a_failure_after_the_first_byte_ends_each_stream_as_its_protocol_says(guarded):
    """REQUEST_TIMEOUT=30 s: the first audio comes within seconds, the whole reading would take many minutes, so
    the timeout strikes mid-stream. Raw audio is cut (no last chunk: the client sees a truncated body), OpenAI's SSE
    ends with an error event, the seed's SSE with [ERROR]."""
    results: dict = {}
    headers = {"Authorization": f"Bearer {GUARDED_KEY}"}

    def read(name: str, path: str, body: dict) -> None:
        with httpx.Client(base_url=guarded.url, timeout=300, headers=headers) as c, \
                c.stream("POST", path, json={"input": LONG, "voice": "alloy", **body}) as r:
            results[name] = {"status": r.status_code, "parts": [], "error": None}
            try:
                for part in r.iter_raw():
                    results[name]["parts"].append(part)
            except httpx.HTTPError as exc:
                results[name]["error"] = exc

    readers = [threading.Thread(target=read, args=args) for args in (
        ("raw", "/v1/audio/speech", {"model": "tts-1", "response_format": "pcm"}),
        ("sse", "/v1/audio/speech", {"model": "tts-1", "response_format": "pcm", "stream_format": "sse"}),
        ("seed", "/v1/audio/speech/stream", {}))]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join(300)
    assert all(r["status"] == 200 and r["parts"] for r in results.values()), \
        {k: (v["status"], len(v["parts"])) for k, v in results.items()}
    assert isinstance(results["raw"]["error"], httpx.RemoteProtocolError), results["raw"]["error"]
    events = [line[6:] for line in b"".join(results["sse"]["parts"]).decode().splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert results["sse"]["error"] is None and last["type"] == "error" and last["error"]["code"] == "timeout"
    assert last["code"] == "TIMEOUT" and "REQUEST_TIMEOUT=30" in last["error"]["message"]
    assert len(base64.b64decode(json.loads(events[0])["audio"])) > 0
    seed_events = [line[6:] for line in b"".join(results["seed"]["parts"]).decode().splitlines()
                   if line.startswith("data: ")]
    assert seed_events[-1].startswith("[ERROR] ") and "REQUEST_TIMEOUT" in seed_events[-1]
    assert httpx.get(guarded.url + "/health").json()["queue_depth"] == 0
