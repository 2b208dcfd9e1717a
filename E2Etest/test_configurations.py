"""Servers configured differently: limits, timeouts, API key, idle unload, a model that cannot load, instructions."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from conftest import CLIENT_TIMEOUT, checkpoint, decode, start_server, wait_for, wait_for_idle

pytestmark = pytest.mark.slow
LONG = ("The first sentence is here. The second one follows it. A third sentence makes the text longer. "
        "And a fourth one ends it.")


@pytest.fixture(scope="module")
def limited():
    """One row at a time and one request in the queue: a request of several segments keeps it full for a while."""
    with start_server("limited", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), MAX_QUEUE_DEPTH="1",
                      MAX_BATCH_SIZE="1", MAX_INPUT_CHARS="200", SEGMENT_MAX_CHARS="40", IDLE_TIMEOUT="4",
                      AUDIO_CACHE_MAX="0") as proc:
        yield proc


def test_queue_full_is_503_with_retry_after_and_the_sdk_retries(limited):
    statuses: list[int] = []
    with httpx.Client(base_url=limited.url, timeout=CLIENT_TIMEOUT) as c, \
            c.stream("POST", "/v1/audio/speech", json={"input": LONG, "voice": "alloy", "response_format": "pcm",
                                                       "stream_format": "audio"}) as first:
        first_chunks = first.iter_raw()               # keep it: a dropped iterator closes the response
        head = next(first_chunks)                     # the first request holds the only queue slot, generating
        r = c.post("/v1/audio/speech", json={"input": "Second.", "voice": "alloy"})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and "MAX_QUEUE_DEPTH" in r.json()["error"]["message"]
        # The OpenAI SDK retries a 503 after Retry-After: it gets its audio once the first request is done.
        hooks = {"response": [lambda response: statuses.append(response.status_code)]}
        with httpx.Client(timeout=CLIENT_TIMEOUT, event_hooks=hooks) as sdk_http, \
                openai.OpenAI(base_url=limited.url + "/v1", api_key="x", max_retries=10, http_client=sdk_http) as sdk:
            audio = sdk.audio.speech.create(model="tts-1", voice="alloy", input="Second.", response_format="pcm")
        assert len(audio.content) > 0
        assert statuses[0] == 503 and statuses[-1] == 200, statuses   # refused while the first one ran, then served
        rest = b"".join(first_chunks)
        assert first.status_code == 200 and len(head + rest) > 0
        wait_for_idle(c)


def test_long_input_is_segmented_and_continuous(limited):
    with sdk(limited.url) as client:
        whole = client.audio.speech.create(model="tts-1", voice="alloy", input=LONG, response_format="pcm",
                                           extra_body={"seed": 1}).content
        first = client.audio.speech.create(model="tts-1", voice="alloy", input=LONG.split(". ")[0] + ".",
                                           response_format="pcm", extra_body={"seed": 1}).content
    assert len(whole) > 3 * len(first)                  # four segments, one after the other


def test_input_limit_is_configurable(limited):
    r = httpx.post(limited.url + "/v1/audio/speech", json={"input": "x" * 201, "voice": "alloy"},
                   timeout=CLIENT_TIMEOUT)
    assert r.status_code == 400 and "MAX_INPUT_CHARS" in r.json()["error"]["message"]


def test_idle_unload_and_reload(limited):
    wait_for(lambda: not limited.health()["model_loaded"], "the idle model to be unloaded (IDLE_TIMEOUT=4)")
    health = limited.health()
    assert health["model_loaded"] is False and health["model_state"] == "unloaded"
    r = httpx.post(limited.url + "/v1/audio/speech", json={"input": "Back again.", "voice": "alloy",
                                                           "response_format": "wav"}, timeout=CLIENT_TIMEOUT)
    assert r.status_code == 200 and decode(r.content, "wav")[0].size > 0
    assert limited.health()["model_loaded"] is True


# One row, and a timeout that an input of MAX_INPUT_CHARS (thousands of frames, one after the other) always exceeds,
# while a short request's first audio comes long before it even on a busy machine.
TIMEOUT_S = 20


def test_request_timeout_is_504_and_frees_the_model():
    with start_server("timeout", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), REQUEST_TIMEOUT=str(TIMEOUT_S),
                      MAX_BATCH_SIZE="1") as proc, httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT) as http:
        r = http.post("/v1/audio/speech", json={"input": (LONG + " ") * 32, "voice": "alloy"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert f"REQUEST_TIMEOUT={TIMEOUT_S}s" in r.json()["error"]["message"]
        wait_for_idle(http)                                                  # the job stopped using the model
        with http.stream("POST", "/v1/audio/speech/stream/pcm", json={"input": "Hi.", "voice": "alloy"}) as r:
            assert r.status_code == 200 and next(r.iter_raw())              # the next request gets the model


def sdk(url: str, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=CLIENT_TIMEOUT)


def test_api_key():
    with start_server("auth", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), API_KEY="s3cret") as proc, \
            httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT) as http:
        assert http.get("/health").status_code == 200                      # open for health checks
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post("/v1/audio/speech", json={"input": "hi", "voice": "alloy"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        with sdk(proc.url, "wrong") as client, pytest.raises(openai.AuthenticationError):
            client.models.list()
        with sdk(proc.url, "s3cret") as client:
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


def test_a_model_that_cannot_load_leaves_the_server_up_and_is_retried(tmp_path):
    target = tmp_path / "not-there-yet"
    with start_server("broken", MODEL_ID=str(target)) as proc, \
            httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT) as http:
        health = http.get("/health").json()
        assert health["status"] == "degraded" and health["model_state"] == "failed"
        assert "MODEL_ID" in health["model_error"]
        r = http.post("/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "model_unavailable" and "MODEL_ID" in r.json()["error"]["message"]
        shutil.copytree(checkpoint("tiny-0.6B-CustomVoice"), target)        # the problem gets fixed...
        r = http.post("/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
        assert r.status_code == 200                                         # ...and the next request loads it
        assert http.get("/health").json()["model_state"] == "ready"


def test_unreachable_hub_explains_what_to_set():
    with start_server("offline", MODEL_ID="Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", HF_HUB_OFFLINE="1",
                      HF_HOME="/nonexistent-hf-home") as proc:
        r = httpx.post(proc.url + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"}, timeout=CLIENT_TIMEOUT)
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice" in message and "MODEL_ID" in message


def test_instructions_on_a_model_that_follows_them():
    with start_server("instruct", MODEL_ID=checkpoint("tiny-1.7B-CustomVoice")) as proc, sdk(proc.url) as client:
        plain = client.audio.speech.create(model="tts-1", voice="vivian", input="Hello.", response_format="pcm",
                                           extra_body={"seed": 5}).content
        styled = client.audio.speech.create(model="tts-1", voice="vivian", input="Hello.", response_format="pcm",
                                            instructions="Whisper, slowly.", extra_body={"seed": 5}).content
        assert len(plain) > 0 and len(styled) > 0
        assert plain != styled                     # the instruction reached the model and changed its output


def test_voice_design_model_needs_instructions():
    with start_server("design", MODEL_ID=checkpoint("tiny-1.7B-VoiceDesign")) as proc, \
            httpx.Client(base_url=proc.url, timeout=CLIENT_TIMEOUT) as http:
        r = http.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alloy"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "instructions"
        r = http.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alloy",
                                                "instructions": "A deep, calm voice.", "response_format": "wav"})
        assert r.status_code == 200 and decode(r.content, "wav")[0].size > 0
