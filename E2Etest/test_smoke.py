"""Fast checks that run no synthesis: health, listings, validation, errors in the OpenAI envelope."""

from __future__ import annotations

import re

import openai
import pytest

pytestmark = pytest.mark.smoke

OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar"]
QWEN_SPEAKERS = ["vivian", "serena", "uncle_fu", "dylan", "eric", "ryan", "aiden", "ono_anna", "sohee"]


def assert_envelope(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_health_has_the_seed_fields(http):
    body = http.get("/health").json()
    for key, kind in {"status": str, "model_loaded": bool, "cuda": bool, "queue_depth": int, "max_queue_depth": int,
                      "voices": list, "audio_cache_size": int, "audio_cache_max": int, "voice_cache_size": int,
                      "voice_cache_max": int, "voice_cache_hits": int}.items():
        assert isinstance(body[key], kind), key
    assert body["status"] == "ok"
    assert body["model_loaded"] is True          # the test server preloads
    assert "tiny-0.6B-CustomVoice" in body["model_id"]
    assert set(QWEN_SPEAKERS + OPENAI_VOICES) <= set(body["voices"])


def test_models_list_and_retrieve_with_the_sdk(client):
    ids = [m.id for m in client.models.list().data]
    assert "tts-1" in ids and "gpt-4o-mini-tts" in ids
    assert any("tiny-0.6B-CustomVoice" in i for i in ids)
    assert client.models.retrieve("tts-1").id == "tts-1"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_voices_listing_in_the_open_webui_shape(http):
    voices = http.get("/v1/audio/voices").json()["voices"]
    by_id = {v["id"]: v for v in voices}
    assert set(QWEN_SPEAKERS + OPENAI_VOICES) == set(by_id)
    assert all(isinstance(v["name"], str) and v["name"] for v in voices)
    assert by_id["alloy"]["speaker"] == "ryan" and by_id["sohee"]["language"] == "ko"


@pytest.mark.parametrize("body, param, code", [
    ({"model": "tts-1", "voice": "alloy"}, "input", "missing_required_parameter"),
    ({"model": "tts-1", "input": "   ", "voice": "alloy"}, "input", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "nobody"}, "voice", "invalid_voice"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 0}, "speed", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "speed": 4.5}, "speed", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "response_format": "wma"}, "response_format", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "stream_format": "video"}, "stream_format", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "language": "klingon"}, "language", "unsupported_language"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "temperature": -1}, "temperature", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "top_p": 0}, "top_p", "invalid_value"),
    ({"model": "tts-1", "input": "hi", "voice": "alloy", "sample_rate": 1000}, "sample_rate", "invalid_value"),
    ({"model": "tts-1", "input": "x" * 4097, "voice": "alloy"}, "input", "string_above_max_length"),
])
def test_bad_requests_get_400_in_the_openai_envelope(http, body, param, code):
    error = assert_envelope(http.post("/v1/audio/speech", json=body), 400, param, code)
    assert error["type"] == "invalid_request_error"
    assert http.get("/health").json()["queue_depth"] == 0   # nothing was queued, nothing leaked


def test_unknown_voice_message_lists_the_valid_voices(http):
    error = assert_envelope(http.post("/v1/audio/speech", json={"input": "hi", "voice": "Nobody"}), 400, "voice")
    for name in QWEN_SPEAKERS + OPENAI_VOICES:
        assert name in error["message"]


def test_unknown_custom_voice_id_is_404(http):
    assert_envelope(http.post("/v1/audio/speech", json={"input": "hi", "voice": {"id": "voice_missing"}}), 404,
                    "voice", "voice_not_found")


def test_invalid_json_and_wrong_types(http):
    r = http.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope(r, 400, code="invalid_json")
    assert_envelope(http.post("/v1/audio/speech", json={"input": 5, "voice": "alloy"}), 400, "input")
    assert_envelope(http.post("/v1/audio/speech", json=["input"]), 400)


def test_the_sdk_raises_bad_request_with_the_message(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice="nobody", input="hello")
    assert "unknown voice" in err.value.message


def test_unknown_path_and_method_use_the_envelope(http):
    assert_envelope(http.get("/v1/nothing"), 404, code="not_found")
    assert_envelope(http.get("/v1/audio/speech"), 405, code="method_not_allowed")


def test_metrics_are_prometheus_text(http):
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("tts_requests_total", "tts_time_to_first_audio_seconds", "tts_model_loaded",
                 "tts_inference_duration_seconds", "tts_queue_depth", "tts_batch_size", "tts_batch_rows"):
        assert name in r.text


def test_refused_requests_are_counted(http):
    def invalid_voice_count() -> float:
        pattern = r'^tts_errors_total\{code="invalid_voice",path="/v1/audio/speech",status="400"\} (\S+)$'
        found = re.search(pattern, http.get("/metrics").text, re.M)
        return float(found.group(1)) if found else 0.0

    before = invalid_voice_count()
    http.post("/v1/audio/speech", json={"input": "hi", "voice": "nobody"})
    assert invalid_voice_count() == before + 1


def test_cache_clear_reports_counts(http):
    body = http.post("/cache/clear").json()
    assert isinstance(body["audio_cleared"], int) and isinstance(body["voice_cleared"], int)
