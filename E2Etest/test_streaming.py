"""Streaming on one pipeline: OpenAI audio and SSE streams, the seed's SSE, raw PCM and WebSocket endpoints."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest

from conftest import CLIENT_TIMEOUT, FORMATS, checkpoint, decode, start_server, wait_for, wait_for_idle

TEXT = "Streaming starts before the sentence is finished."


@pytest.fixture(scope="module")
def buffered(http) -> np.ndarray:
    r = http.post("/v1/audio/speech", json={"input": TEXT, "voice": "nova", "response_format": "pcm", "seed": 11})
    return decode(r.content, "pcm")[0]


def assert_same_audio(streamed: np.ndarray, buffered: np.ndarray) -> None:
    """Streaming decodes in small chunks with context, buffered in large ones: the samples agree to 1e-4."""
    assert streamed.shape == buffered.shape
    assert np.max(np.abs(streamed - buffered)) <= 4 / 32768


@pytest.mark.parametrize("fmt", FORMATS)
def test_sdk_streams_every_format(client, buffered, fmt):
    parts = []
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input=TEXT, response_format=fmt,
            extra_body={"stream_format": "audio", "seed": 11}) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        for chunk in response.iter_bytes():
            parts.append(chunk)
    data = b"".join(parts)
    pcm, rate = decode(data, fmt)
    assert abs(pcm.size / rate - buffered.size / 24000) < 0.15
    if fmt in ("pcm", "wav", "flac"):
        assert_same_audio(pcm, buffered)


def test_streamed_wav_has_unknown_sizes(http):
    # Its own seed: the same request streamed before would be a cache hit, sent whole with exact sizes.
    with http.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "nova", "response_format": "wav",
                                                         "stream_format": "audio", "seed": 12}) as r:
        data = r.read()
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", data[data.index(b"data") + 4:][:4])[0] == 0xFFFFFFFF


def test_openai_sse_events(http, buffered):
    with http.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "nova", "response_format": "pcm",
                                                         "stream_format": "sse", "seed": 11}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    pcm = decode(b"".join(base64.b64decode(e["audio"]) for e in deltas), "pcm")[0]
    assert_same_audio(pcm, buffered)


def test_openai_sse_with_mp3_chunks(http):
    with http.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "nova", "response_format": "mp3",
                                                         "stream_format": "sse", "seed": 11}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    mp3 = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert decode(mp3, "mp3")[0].size > 0


def test_seed_sse_contract(http, buffered):
    with http.stream("POST", "/v1/audio/speech/stream", json={"input": TEXT, "voice": "nova", "seed": 11}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        lines = list(r.iter_lines())
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 3
    assert all(line == "" or line.startswith("data: ") for line in lines)   # data line, blank line, ...
    pcm = decode(b"".join(base64.b64decode(d) for d in data[:-1]), "pcm")[0]
    assert_same_audio(pcm, buffered)


def test_seed_pcm_stream_contract(http, buffered):
    with http.stream("POST", "/v1/audio/speech/stream/pcm", json={"input": TEXT, "voice": "nova", "seed": 11}) as r:
        assert r.headers["content-type"] == "application/octet-stream"
        assert (r.headers["x-pcm-sample-rate"], r.headers["x-pcm-bit-depth"], r.headers["x-pcm-channels"]) == \
               ("24000", "16", "1")
        data = r.read()
    assert_same_audio(decode(data, "pcm")[0], buffered)


def test_seed_pcm_stream_at_8k_for_phone_lines(http, buffered):
    with http.stream("POST", "/v1/audio/speech/stream/pcm",
                     json={"input": TEXT, "voice": "nova", "seed": 11, "sample_rate": 8000}) as r:
        assert r.headers["x-pcm-sample-rate"] == "8000"
        data = r.read()
    assert len(data) // 2 / 8000 == pytest.approx(buffered.size / 24000, abs=0.01)


def test_streaming_errors_before_audio_are_http_errors(http):
    for path in ("/v1/audio/speech/stream", "/v1/audio/speech/stream/pcm"):
        r = http.post(path, json={"input": "hi", "voice": "nobody"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "voice"
    assert http.get("/health").json()["queue_depth"] == 0


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/audio/speech/stream", "/v1/audio/speech/stream/pcm"])
def test_a_disconnect_frees_the_queue_slot_and_the_model(url, http, path):
    long_text = " ".join(["This request will be abandoned by its client after the first bytes."] * 4)
    body = {"input": long_text, "voice": "nova", "response_format": "pcm", "stream_format": "audio"}
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c, c.stream("POST", path, json=body) as r:
        chunks = r.iter_raw()                     # keep it: a dropped iterator closes the response
        next(chunks)
        health = http.get("/health").json()
        assert health["queue_depth"] == 1 and health["busy"], health
    wait_for_idle(http)


@pytest.mark.slow
def test_a_client_that_gives_up_before_any_audio_releases_its_queued_request():
    # One row at a time, so the second request really waits in the queue (with a free row it would join at once).
    long_text = " ".join(["With one row, the next request has to wait for this one."] * 12)
    with start_server("one-row", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), MAX_BATCH_SIZE="1") as proc, \
            httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT) as http:
        with http.stream("POST", "/v1/audio/speech/stream/pcm",
                         json={"input": long_text, "voice": "nova", "seed": 1}) as a:
            a_chunks = a.iter_raw()
            next(a_chunks)                                      # A holds the model, for hundreds of frames more
            gives_up = httpx.Timeout(CLIENT_TIMEOUT, read=0.5)          # B waits half a second for audio
            with httpx.Client(base_url=proc.url, timeout=gives_up) as b_client, pytest.raises(httpx.ReadTimeout):
                b_client.post("/v1/audio/speech/stream/pcm", json={"input": "Never mind.", "voice": "nova"})

            def only_a_left() -> dict | None:
                health = http.get("/health").json()
                return health if health["queue_depth"] == 1 else None
            health = wait_for(only_a_left, "the abandoned request to leave the queue")
            assert health["busy"], health                       # only A is left, still running
        wait_for_idle(http)


def test_a_slow_reader_stalls_nobody_and_loses_nothing(url, http):
    """The slow stream is compared with what the server made of it: a streamed answer is kept in the audio cache as
    it was sent, and the same request again is served from there. (Not with the same request made alone: float
    matmuls over a different number of rows can differ in the last bit, and over hundreds of frames that can flip a
    sample; see issue 12's notes.)"""
    long_text = " ".join(["A client that does not read its stream must not hold anyone else up."] * 3)
    request = {"model": "tts-1", "input": long_text, "voice": "nova", "seed": 4, "response_format": "pcm"}
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as slow_client, \
            slow_client.stream("POST", "/v1/audio/speech", json=request) as slow:
        assert slow.headers["x-cache"] == "miss"
        slow_chunks = slow.iter_raw()
        first = next(slow_chunks)                           # then it stops reading for a while
        other = http.post("/v1/audio/speech", json={"input": "I am not waiting for anyone.", "voice": "echo",
                                                      "response_format": "pcm", "stream_format": "audio"})
        assert other.status_code == 200 and len(other.content) > 0     # served while the slow one sat unread
        rest = b"".join(slow_chunks)
    made = http.post("/v1/audio/speech", json=request)
    assert made.headers["x-cache"] == "hit"
    assert first + rest == made.content                     # every byte the server made reached the slow reader
    assert len(made.content) > 2 * 24000 * 2                # and it is the whole long text (seconds of audio)


def test_websocket_utterances_errors_and_reuse(url, buffered):
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/v1/audio/speech/ws") as ws:
        ws.send(json.dumps({"input": ""}))
        assert json.loads(ws.recv()) == {"event": "error", "detail": "input is required"}
        ws.send(json.dumps({"input": "hi", "voice": "nobody"}))
        error = json.loads(ws.recv())
        assert error["event"] == "error" and "unknown voice" in error["detail"]
        ws.send("not json")
        assert json.loads(ws.recv())["event"] == "error"
        for _ in range(2):                                       # the socket stays usable
            ws.send(json.dumps({"input": TEXT, "voice": "nova", "seed": 11}))
            audio = b""
            while isinstance(message := ws.recv(), bytes):
                audio += message
            assert json.loads(message) == {"event": "done"}
            assert_same_audio(decode(audio, "pcm")[0], buffered)


def test_websocket_cancel_stops_the_utterance(url, http):
    from websockets.sync.client import connect

    with connect(url.replace("http", "ws") + "/v1/audio/speech/ws") as ws:
        ws.send(json.dumps({"input": " ".join([TEXT] * 6), "voice": "nova"}))
        assert isinstance(ws.recv(), bytes)                      # audio is flowing
        ws.send(json.dumps({"event": "cancel"}))
        while isinstance(message := ws.recv(), bytes):
            pass
        assert json.loads(message) == {"event": "cancelled"}
        wait_for_idle(http)
        ws.send(json.dumps({"input": "Still here.", "voice": "nova"}))
        while isinstance(message := ws.recv(), bytes):
            pass
        assert json.loads(message) == {"event": "done"}
