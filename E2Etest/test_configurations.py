"""Servers configured differently: limits, timeouts, API key, idle unload, a model that cannot load, instructions."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from conftest import checkpoint, decode, start_server

pytestmark = pytest.mark.slow
LONG = ("The first sentence is here. The second one follows it. A third sentence makes the text longer. "
        "And a fourth one ends it.")


@pytest.fixture(scope="module")
def limited():
    proc = start_server("limited", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), MAX_QUEUE_DEPTH="1",
                        MAX_INPUT_CHARS="200", SEGMENT_MAX_CHARS="40", IDLE_TIMEOUT="4", AUDIO_CACHE_MAX="0")
    yield proc
    proc.stop()


def test_queue_full_is_503_with_retry_after_and_the_sdk_retries(limited):
    results = {}

    def occupy():
        with httpx.Client(base_url=limited.url, timeout=120) as c:
            results["first"] = c.post("/v1/audio/speech", json={"input": LONG, "voice": "alloy",
                                                                "response_format": "pcm"})

    thread = threading.Thread(target=occupy)
    thread.start()
    deadline = time.monotonic() + 30
    while httpx.get(limited.url + "/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = httpx.post(limited.url + "/v1/audio/speech", json={"input": "Second.", "voice": "alloy"})
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full" and "MAX_QUEUE_DEPTH" in r.json()["error"]["message"]
    # The OpenAI SDK retries a 503 after Retry-After: it gets its audio once the first request is done.
    with openai.OpenAI(base_url=limited.url + "/v1", api_key="x", max_retries=5) as client:
        audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Second.", response_format="pcm")
    assert len(audio.content) > 0
    thread.join()
    assert results["first"].status_code == 200
    assert httpx.get(limited.url + "/health").json()["queue_depth"] == 0


def test_long_input_is_segmented_and_continuous(limited):
    with openai.OpenAI(base_url=limited.url + "/v1", api_key="x", max_retries=3) as client:
        whole = client.audio.speech.create(model="tts-1", voice="alloy", input=LONG, response_format="pcm",
                                           extra_body={"seed": 1}).content
        first = client.audio.speech.create(model="tts-1", voice="alloy", input=LONG.split(". ")[0] + ".",
                                           response_format="pcm", extra_body={"seed": 1}).content
    assert len(whole) > 3 * len(first)                  # four segments, one after the other


def test_input_limit_is_configurable(limited):
    r = httpx.post(limited.url + "/v1/audio/speech", json={"input": "x" * 201, "voice": "alloy"})
    assert r.status_code == 400 and "MAX_INPUT_CHARS" in r.json()["error"]["message"]


def test_idle_unload_and_reload(limited):
    deadline = time.monotonic() + 30
    while httpx.get(limited.url + "/health").json()["model_loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = httpx.get(limited.url + "/health").json()
    assert health["model_loaded"] is False and health["model_state"] == "unloaded"
    r = httpx.post(limited.url + "/v1/audio/speech", json={"input": "Back again.", "voice": "alloy",
                                                           "response_format": "wav"}, timeout=120)
    assert r.status_code == 200 and decode(r.content, "wav")[0].size > 0
    assert httpx.get(limited.url + "/health").json()["model_loaded"] is True


def test_request_timeout_is_504_and_frees_the_model():
    proc = start_server("timeout", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), REQUEST_TIMEOUT="3")
    try:
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": LONG * 2, "voice": "alloy"}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 5
        while (health := httpx.get(proc.url + "/health").json())["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["queue_depth"] == 0 and not health["busy"], health    # the job stopped using the model
        with httpx.stream("POST", proc.url + "/v1/audio/speech/stream/pcm", json={"input": "Hi.", "voice": "alloy"},
                          timeout=60) as r:
            assert r.status_code == 200 and next(r.iter_raw())              # the next request gets the model
    finally:
        proc.stop()


def test_api_key():
    proc = start_server("auth", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), API_KEY="s3cret")
    try:
        assert httpx.get(proc.url + "/health").status_code == 200          # open for health checks
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(proc.url + "/v1/models").status_code == 401
        with openai.OpenAI(base_url=proc.url + "/v1", api_key="wrong", max_retries=0) as client, \
                pytest.raises(openai.AuthenticationError):
            client.models.list()
        with openai.OpenAI(base_url=proc.url + "/v1", api_key="s3cret", max_retries=0) as client:
            assert len(client.audio.speech.create(model="tts-1", voice="alloy", input="hi").content) > 0
        # ElevenLabs' clients (Pipecat, LiveKit Agents) send their key as xi-api-key
        from websockets.exceptions import ConnectionClosed, InvalidStatus
        from websockets.sync.client import connect
        elevenlabs = proc.url.replace("http", "ws", 1) + "/v1/text-to-speech/alloy/multi-stream-input"
        with pytest.raises(InvalidStatus), connect(elevenlabs, additional_headers={"xi-api-key": "wrong"}):
            pass
        with connect(elevenlabs, additional_headers={"xi-api-key": "s3cret"}) as ws:
            ws.send('{"close_socket": true}')
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=120)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    finally:
        proc.stop()


def test_a_model_that_cannot_load_leaves_the_server_up_and_is_retried(tmp_path):
    target = tmp_path / "not-there-yet"
    proc = start_server("broken", MODEL_ID=str(target))
    try:
        health = httpx.get(proc.url + "/health").json()
        assert health["status"] == "degraded" and health["model_state"] == "failed"
        assert "MODEL_ID" in health["model_error"]
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "model_unavailable" and "MODEL_ID" in r.json()["error"]["message"]
        shutil.copytree(checkpoint("tiny-0.6B-CustomVoice"), target)        # the problem gets fixed...
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"}, timeout=120)
        assert r.status_code == 200                                         # ...and the next request loads it
        assert httpx.get(proc.url + "/health").json()["model_state"] == "ready"
    finally:
        proc.stop()


def test_unreachable_hub_explains_what_to_set():
    proc = start_server("offline", MODEL_ID="Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", HF_HUB_OFFLINE="1",
                        HF_HOME="/nonexistent-hf-home")
    try:
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice" in message and "MODEL_ID" in message
    finally:
        proc.stop()


def test_instructions_on_a_model_that_follows_them():
    proc = start_server("instruct", MODEL_ID=checkpoint("tiny-1.7B-CustomVoice"))
    try:
        with openai.OpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0) as client:
            plain = client.audio.speech.create(model="tts-1", voice="vivian", input="Hello.", response_format="pcm",
                                               extra_body={"seed": 5}).content
            styled = client.audio.speech.create(model="tts-1", voice="vivian", input="Hello.", response_format="pcm",
                                                instructions="Whisper, slowly.", extra_body={"seed": 5}).content
        assert len(plain) > 0 and len(styled) > 0
        assert plain != styled                     # the instruction reached the model and changed its output
    finally:
        proc.stop()


def test_voice_design_model_needs_instructions():
    proc = start_server("design", MODEL_ID=checkpoint("tiny-1.7B-VoiceDesign"))
    try:
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "Hello.", "voice": "alloy"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "instructions"
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "Hello.", "voice": "alloy",
                                                            "instructions": "A deep, calm voice.",
                                                            "response_format": "wav"}, timeout=120)
        assert r.status_code == 200 and decode(r.content, "wav")[0].size > 0
    finally:
        proc.stop()
