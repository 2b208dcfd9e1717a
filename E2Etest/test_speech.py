"""Buffered POST /v1/audio/speech through the real OpenAI SDK: every format decoded and checked."""

from __future__ import annotations

import re
import struct
import threading

import httpx
import numpy as np
import pytest

from conftest import CLIENT_TIMEOUT, FORMATS, decode, rms, wait_for_idle

TEXT = "Hello there, how are you?"
DECODED_RATE = {"opus": 48000}          # Opus always decodes at 48 kHz
# Codecs add a little at the edges (encoder delay, frame padding); the audio itself must be all there.
TOLERANCE_S = {"mp3": 0.08, "aac": 0.08, "opus": 0.03, "ogg": 0.03, "flac": 0.001, "wav": 0.001, "pcm": 0.001}


def speak(client, fmt: str = "pcm", text: str = TEXT, **extra) -> bytes:
    extra.setdefault("seed", 7)
    params = {k: extra.pop(k) for k in ("speed", "instructions") if k in extra}
    return client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format=fmt,
                                      extra_body=extra, **params).content


@pytest.fixture(scope="module")
def reference(client) -> np.ndarray:
    pcm, _ = decode(speak(client, "pcm"), "pcm")
    return pcm


def test_reference_is_real_audio(reference):
    assert reference.size > 24000 * 0.5                 # the tiny model speaks for its whole token budget
    assert reference.size % 1920 == 0                   # whole codec frames of 80 ms
    assert 0.01 < rms(reference) < 0.9


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_mono_24k_of_the_right_length(client, reference, fmt):
    pcm, rate = decode(speak(client, fmt), fmt)
    assert rate == DECODED_RATE.get(fmt, 24000)
    expected = reference.size / 24000
    assert abs(pcm.size / rate - expected) <= TOLERANCE_S[fmt] + 0.05, (fmt, pcm.size / rate, expected)
    assert rms(pcm) > 0.3 * rms(reference)               # the signal is there, not silence


def test_lossless_formats_carry_the_exact_samples(client, reference):
    for fmt in ("wav", "flac"):
        pcm, _ = decode(speak(client, fmt), fmt)
        np.testing.assert_allclose(pcm, reference, atol=1 / 32768)


def test_buffered_wav_header_has_exact_sizes(http):
    """A whole file (the seed's clients send no model; OpenAI's requests stream): exact sizes in the header."""
    r = http.post("/v1/audio/speech", json={"input": TEXT, "voice": "alloy", "response_format": "wav", "seed": 7})
    data = r.content
    assert r.headers["content-length"] == str(len(data))
    riff_size, = struct.unpack("<I", data[4:8])
    assert data[:4] == b"RIFF" and riff_size == len(data) - 8
    data_size, = struct.unpack("<I", data[data.index(b"data") + 4:][:4])
    assert data_size == len(data) - data.index(b"data") - 8


def test_default_format_is_mp3_like_openai(http):
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy", "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    assert decode(r.content, "mp3")[0].size > 0


@pytest.mark.parametrize("fmt, media", [("mp3", "audio/mpeg"), ("opus", "audio/ogg"), ("aac", "audio/aac"),
                                        ("flac", "audio/flac"), ("wav", "audio/wav"), ("pcm", "audio/pcm")])
def test_content_types_match_openai(http, fmt, media):
    r = http.post("/v1/audio/speech", json={"input": TEXT, "voice": "alloy", "response_format": fmt, "seed": 7})
    assert r.headers["content-type"] == media


@pytest.mark.parametrize("speed", [0.5, 2.0, 4.0])
def test_speed_changes_the_duration(client, reference, speed):
    pcm, _ = decode(speak(client, "pcm", speed=speed), "pcm")
    assert pcm.size / reference.size == pytest.approx(1 / speed, rel=0.05)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 48000])
def test_sample_rate_resamples(client, reference, rate):
    for fmt in ("wav", "pcm"):
        pcm, decoded_rate = decode(speak(client, fmt, sample_rate=rate), fmt, sample_rate=rate)
        assert decoded_rate == rate
        assert pcm.size / rate == pytest.approx(reference.size / 24000, abs=0.01)


def test_same_seed_same_audio_other_seed_other_audio(client, http, reference):
    http.post("/cache/clear")
    again, _ = decode(speak(client, "pcm"), "pcm")
    np.testing.assert_array_equal(again, reference)
    other, _ = decode(speak(client, "pcm", seed=8), "pcm")
    assert other.shape == reference.shape and not np.array_equal(other, reference)


def test_identical_requests_hit_the_cache_and_every_parameter_is_in_the_key(http):
    body = {"input": "Cache me.", "voice": "nova", "response_format": "wav", "seed": 3}
    first = http.post("/v1/audio/speech", json=body)
    second = http.post("/v1/audio/speech", json=body)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.content == second.content
    for change in ({"temperature": 0.5}, {"top_p": 0.5}, {"sample_rate": 16000}, {"speed": 1.5}, {"seed": 4},
                   {"voice": "echo"}, {"language": "french"}, {"response_format": "flac"}):
        r = http.post("/v1/audio/speech", json={**body, **change})
        assert r.status_code == 200 and r.headers["x-cache"] == "miss", change


@pytest.mark.parametrize("voice", ["alloy", "ALLOY", "Uncle Fu", "uncle-fu", "ono_anna", "cedar", "marin"])
def test_voice_names_are_case_insensitive_and_aliases_work(client, voice):
    audio = client.audio.speech.create(model="tts-1", voice=voice, input="Hi.", response_format="pcm",
                                       extra_body={"seed": 1}).content
    assert len(audio) > 0


@pytest.mark.parametrize("language", ["en", "English", "french", "de-DE", "zh", "sichuan_dialect", "auto"])
def test_languages_by_name_code_and_dialect(client, language):
    audio = client.audio.speech.create(model="tts-1", voice="eric", input="Bonjour.", response_format="pcm",
                                       extra_body={"seed": 1, "language": language}).content
    assert len(audio) > 0


def test_greedy_and_top_p(client):
    greedy_a = speak(client, "pcm", temperature=0, seed=1)
    greedy_b = speak(client, "pcm", temperature=0, seed=2)
    assert greedy_a == greedy_b                           # greedy decoding ignores the seed
    assert len(speak(client, "pcm", top_p=0.5, temperature=0.7)) > 0


def test_seed_field_instruct_alias_and_unknown_fields_are_accepted(http):
    r = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "response_format": "pcm",
                                           "seed": 1, "instruct": "", "some_future_field": True})
    assert r.status_code == 200


def test_health_answers_while_a_synthesis_runs(url, http):
    long_text = " ".join(["A longer text keeps the model busy while health is asked meanwhile."] * 3)
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c, \
            c.stream("POST", "/v1/audio/speech", json={"input": long_text, "voice": "alloy", "response_format": "pcm",
                                                       "stream_format": "audio"}) as r:
        chunks = r.iter_raw()                     # keep it: a dropped iterator closes the response
        next(chunks)                              # the synthesis runs: hundreds of frames are still to come
        health = http.get("/health").json()
        rest = b"".join(chunks)
    assert r.status_code == 200 and len(rest) > 0
    assert health["status"] == "ok" and health["busy"], "/health did not answer while the synthesis was running"


def batch_count(http) -> float:
    metrics = http.get("/metrics").text
    return float(re.search(r"^tts_batch_size_count (\S+)$", metrics, re.M).group(1))


def test_batching_changes_speed_not_audio(url, http):
    body = {"input": "Batch me, please.", "voice": "nova", "response_format": "pcm", "seed": 21}
    http.post("/cache/clear")
    alone = http.post("/v1/audio/speech", json=body).content
    http.post("/cache/clear")
    others = [{"input": "A different request.", "voice": "echo", "response_format": "pcm", "temperature": 0.5},
              {"input": "Yet another.", "voice": "sohee", "response_format": "wav", "seed": 3, "top_p": 0.7}]
    results: dict = {}

    def send(name, b):
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c:
            results[name] = c.post("/v1/audio/speech", json=b)

    wait_for_idle(http)
    before = batch_count(http)
    # A long request keeps one batch running (one segment of hundreds of frames) while the three arrive and join it.
    keeper = {"input": "This one long sentence keeps a batch running " + "and running " * 12 + "until it is dropped.",
              "voice": "alloy", "response_format": "pcm", "stream_format": "audio"}
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c, c.stream("POST", "/v1/audio/speech",
                                                                           json=keeper) as kept:
        kept_chunks = kept.iter_raw()            # keep it: a dropped iterator closes the response
        next(kept_chunks)
        threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate([body, *others])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wait_for_idle(http)                          # the keeper's client is gone: its row stopped, the batch ended
    assert all(r.status_code == 200 for r in results.values())
    assert batch_count(http) - before == 1, "the three requests did not share the running batch"
    assert results[0].content == alone


def test_concurrent_requests_all_succeed_and_release_their_slots(url, http):
    results = []

    def one(i):
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c:
            results.append(c.post("/v1/audio/speech", json={"input": f"Request number {i}.", "voice": "nova",
                                                            "response_format": "wav"}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 4
    assert all(decode(r.content, "wav")[0].size > 0 for r in results)
    assert http.get("/health").json()["queue_depth"] == 0
