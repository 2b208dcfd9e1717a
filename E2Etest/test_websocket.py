"""The WebSocket /v1/audio/speech/ws against a live server: every message it does not understand gets an error event
and the socket stays usable (issue 10); the incremental-text form, where text arrives in pieces as an LLM writes it
(issue 13); and the limits on message size and waiting messages."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import wait_for

WAIT = 300          # seconds: an upper bound that only stops a hang (a busy machine is slow, never this slow)


def ws_url(url: str) -> str:
    return url.replace("http", "ws", 1) + "/v1/audio/speech/ws"


def receive_utterance(ws) -> tuple[bytes, dict]:
    """Binary PCM frames until the next text message; -> (audio, that message)."""
    audio = b""
    while isinstance(message := ws.recv(timeout=WAIT), bytes):
        audio += message
    return audio, json.loads(message)


def next_event(ws) -> dict:
    """The next text message, skipping audio frames."""
    while isinstance(message := ws.recv(timeout=WAIT), bytes):
        pass
    return json.loads(message)


def assert_error(ws, *words: str) -> str:
    event = json.loads(ws.recv(timeout=WAIT))
    assert event["event"] == "error", event
    assert all(w in event["detail"] for w in words), event
    return event["detail"]


def assert_usable(ws, speak: bool = False) -> None:
    """The session still answers (an error for an empty input costs no synthesis), and with `speak` still speaks."""
    ws.send(json.dumps({"input": ""}))
    assert json.loads(ws.recv(timeout=WAIT)) == {"event": "error", "detail": "input is required"}
    if speak:
        ws.send(json.dumps({"input": "Hi.", "voice": "nova"}))
        audio, done = receive_utterance(ws)
        assert done == {"event": "done"} and len(audio) > 0


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


# ---- messages the session does not understand (issue 10)
def test_a_binary_frame_gets_an_error_event_and_the_socket_stays_usable(url):
    with connect(ws_url(url)) as ws:
        ws.send(b"\x00\x01binary")
        assert_error(ws, "binary")
        assert_usable(ws, speak=True)


@pytest.mark.parametrize("text", ["null", "[1, 2]", '"hello"', "42", "true"])
def test_json_that_is_not_an_object_gets_an_error_event(url, text):
    with connect(ws_url(url)) as ws:
        ws.send(text)
        assert_error(ws, "JSON object")
        assert_usable(ws)


def test_invalid_json_unknown_events_and_bad_fields_get_error_events(url):
    with connect(ws_url(url)) as ws:
        ws.send("{not json")
        assert_error(ws, "not valid JSON")
        ws.send(json.dumps({"event": "dance"}))
        assert_error(ws, "unknown event", "dance")
        ws.send(json.dumps({"event": 7}))
        assert_error(ws, "event")
        ws.send(json.dumps({"input": "hi", "speed": "fast"}))
        assert_error(ws, "speed")
        ws.send(json.dumps({"input": ["hi"]}))
        assert_error(ws, "input")
        ws.send(json.dumps({"event": "text", "text": "no stream is open"}))
        assert_error(ws, "start")
        assert_usable(ws)


@pytest.mark.parametrize("message", ['{"input": "hi \\ud800 there", "voice": "nova"}',
                                     '{"input": "hi", "voice": "\\udfff"}',
                                     '{"\\ud83d": 1, "input": "hi"}'])
def test_a_lone_surrogate_gets_an_error_event_naming_it(url, message):
    with connect(ws_url(url)) as ws:
        ws.send(message)                            # valid JSON: the escape decodes to a lone surrogate
        assert_error(ws, "surrogate")
        assert_usable(ws)


def test_a_message_over_the_size_limit_gets_an_error_event_and_the_socket_stays_usable(url):
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"input": "x" * 70_000}))          # over WS_MAX_MESSAGE_BYTES (64 KiB), under 1 MiB
        assert_error(ws, "WS_MAX_MESSAGE_BYTES")
        assert_usable(ws, speak=True)


def test_a_message_over_the_frame_limit_closes_the_socket_with_1009(url):
    with connect(ws_url(url), max_size=None) as ws:
        ws.send(json.dumps({"input": "x" * (2 << 20)}))       # 2 MiB: the server never reads it whole
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_waiting_messages_are_bounded_and_the_rest_are_refused(url, http):
    """While an utterance plays, WS_MAX_QUEUED_MESSAGES (8) more wait; the next one is refused with an error event.
    Closing the socket then releases everything: the queue drains and the session ends."""
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"input": "A long utterance that keeps the session busy. " * 4, "voice": "nova"}))
        assert isinstance(ws.recv(timeout=WAIT), bytes)          # it is playing
        for _ in range(8):
            ws.send(json.dumps({"input": "Waiting.", "voice": "nova"}))
        ws.send(json.dumps({"input": "One too many.", "voice": "nova"}))
        assert next_event(ws)["detail"].startswith("too many messages are waiting")
        ws.send(json.dumps({"event": "cancel"}))
        assert next_event(ws) == {"event": "cancelled"}
        assert next_event(ws) == {"event": "done"}                # the first waiting message plays
    wait_for(lambda: http.get("/health").json()["queue_depth"] == 0, "the queue to drain")
    wait_for(lambda: metric(http, "tts_websocket_sessions") == 0, "the session to end")


def test_a_session_ends_when_its_client_goes_away_whatever_it_sent(url, http):
    """The handler of a session never outlives its client: not after a binary frame (which used to kill the
    session's reader and leave the handler waiting forever), not in the middle of an utterance."""
    for payload in (b"\x00binary", json.dumps({"input": "Going away mid-sentence. " * 6, "voice": "nova"})):
        with connect(ws_url(url)) as ws:
            ws.send(payload)
            ws.recv(timeout=WAIT)
        wait_for(lambda: metric(http, "tts_websocket_sessions") == 0, "the session to end")
    wait_for(lambda: http.get("/health").json()["queue_depth"] == 0, "the queue to drain")


def test_stream_messages_that_make_no_sense_get_error_events(url):
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"event": "start", "voice": "nobody"}))
        assert_error(ws, "unknown voice")
        ws.send(json.dumps({"event": "start", "voice": "nova", "speed": 9}))
        assert_error(ws, "speed")
        ws.send(json.dumps({"event": "flush"}))
        assert_error(ws, "open stream")
        ws.send(json.dumps({"event": "start", "voice": "nova"}))
        ws.send(json.dumps({"event": "start", "voice": "nova"}))
        assert_error(ws, "open already")
        ws.send(json.dumps({"event": "text", "text": 42}))
        assert_error(ws, "'text' must be a string")
        ws.send(json.dumps({"event": "text", "text": "x" * 5000}))
        assert_error(ws, "MAX_INPUT_CHARS")
        ws.send(json.dumps({"event": "end"}))              # nothing to speak: done at once
        assert json.loads(ws.recv(timeout=WAIT)) == {"event": "done"}
        ws.send(json.dumps({"event": "text", "text": "after the end"}))
        assert_error(ws, "open stream")
        assert_usable(ws)


# ---- the incremental-text form (issue 13): speech that starts before the text ends
def test_a_stream_speaks_as_its_text_arrives_and_equals_its_segments_spoken_alone(url):
    """The first sentence arrives in pieces and is heard before any more text is sent; the second follows; the
    stream's audio is exactly its two segments spoken as utterances with seeds 7 and 8 (one voice, one sampling)."""
    first, second = "Hi there, my friend.", "Bye now."
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"event": "start", "voice": "nova", "seed": 7}))
        for piece in ("Hi", " there,", " my", " friend.", " "):
            ws.send(json.dumps({"event": "text", "text": piece}))
        audio = ws.recv(timeout=WAIT)
        assert isinstance(audio, bytes)                    # speech started while the rest of the text is unwritten
        for piece in ("Bye", " now."):
            ws.send(json.dumps({"event": "text", "text": piece}))
        ws.send(json.dumps({"event": "end"}))
        rest, done = receive_utterance(ws)
        assert done == {"event": "done"}
        streamed = audio + rest
        alone = []
        for seed, text in ((7, first), (8, second)):
            ws.send(json.dumps({"input": text, "voice": "nova", "seed": seed}))
            pcm, done = receive_utterance(ws)
            assert done == {"event": "done"}
            alone.append(pcm)
    assert streamed == b"".join(alone)


def test_flush_speaks_what_has_arrived_and_cancel_stops_a_stream_at_once(url, http):
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"event": "start", "voice": "nova"}))
        ws.send(json.dumps({"event": "text", "text": "a phrase without an end"}))
        ws.send(json.dumps({"event": "flush"}))
        assert isinstance(ws.recv(timeout=WAIT), bytes)     # flushed text is spoken before the end
        for _ in range(6):
            ws.send(json.dumps({"event": "text", "text": " And one more sentence to keep it busy."}))
        ws.send(json.dumps({"event": "cancel"}))
        assert next_event(ws) == {"event": "cancelled"}
        wait_for(lambda: http.get("/health").json()["queue_depth"] == 0, "the stream's jobs to be released")
        ws.send(json.dumps({"event": "text", "text": "too late"}))
        assert_error(ws, "open stream")                    # the cancelled stream takes no more text
        ws.send(json.dumps({"event": "start", "voice": "nova"}))
        ws.send(json.dumps({"event": "text", "text": "Hi."}))
        ws.send(json.dumps({"event": "end"}))
        audio, done = receive_utterance(ws)
        assert done == {"event": "done"} and len(audio) > 0
