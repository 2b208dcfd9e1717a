"""Custom voices: consents, voices from a sample or a description, the seed's /clone, persistence, bad input."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import LOGS, ServerProcess, checkpoint, decode, tone

pytestmark = pytest.mark.slow


def encode(pcm: np.ndarray, container: str, codec: str, rate: int = 24000) -> bytes:
    """Write audio with PyAV (an encoder independent of the server's) into any container."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream(codec, rate=rate if codec not in ("libopus",) else 48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                      rate=stream.codec_context.sample_rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return out.getvalue()


def wav(seconds: float, amplitude: float = 0.2) -> bytes:
    return encode(tone(220, seconds=seconds, amplitude=amplitude), "wav", "pcm_s16le")


@contextlib.contextmanager
def stored(data_dir: str) -> Iterator[sqlite3.Connection]:
    """The server's SQLite store, read-only: what a voice left in the database."""
    db = sqlite3.connect(f"file:{Path(data_dir) / 'voices.db'}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture(scope="module")
def data_dir() -> str:
    LOGS.mkdir(exist_ok=True)
    return tempfile.mkdtemp(prefix="voices-data-", dir=LOGS)


@pytest.fixture(scope="module")
def voices_server(data_dir):
    proc = ServerProcess("voices", {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice"), "DATA_DIR": data_dir}).start()
    yield proc
    proc.stop()


@pytest.fixture()
def sdk(voices_server):
    with openai.OpenAI(base_url=voices_server.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture()
def consent(sdk):
    return sdk.audio.voice_consents.create(name="Consent", language="en-US",
                                           recording=("consent.wav", wav(3), "audio/wav"))


def speak(sdk, voice, text="Hello from a cloned voice.", **extra) -> np.ndarray:
    audio = sdk.audio.speech.create(model="tts-1", voice=voice, input=text, response_format="pcm",
                                    extra_body={"seed": 3, **extra}).content
    return decode(audio, "pcm")[0]


def test_consent_lifecycle(sdk):
    first = sdk.audio.voice_consents.create(name="First", language="en-US",
                                            recording=("a.wav", wav(3), "audio/wav"))
    second = sdk.audio.voice_consents.create(name="Second", language="fr-FR",
                                             recording=("b.mp3", encode(tone(220, amplitude=0.2), "mp3", "libmp3lame"),
                                                        "audio/mpeg"))
    assert first.id.startswith("cons_") and first.object == "audio.voice_consent" and first.language == "en-US"
    assert sdk.audio.voice_consents.retrieve(second.id).name == "Second"
    page = sdk.audio.voice_consents.list(limit=1)
    assert len(page.data) == 1 and page.has_more
    ids = [c.id for c in sdk.audio.voice_consents.list(limit=100).data]
    assert first.id in ids and second.id in ids
    after = sdk.audio.voice_consents.list(after=first.id, limit=100).data
    assert first.id not in [c.id for c in after]
    assert sdk.audio.voice_consents.update(second.id, name="Renamed").name == "Renamed"
    deleted = sdk.audio.voice_consents.delete(second.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.audio.voice_consents.retrieve(second.id)


def test_a_voice_from_a_sample_speaks_everywhere_and_survives_a_restart(voices_server, data_dir, sdk, consent):
    voice = sdk.audio.voices.create(name="Alice", consent=consent.id, audio_sample=("s.wav", wav(5), "audio/wav"))
    assert voice.id.startswith("voice_") and voice.type == "audio_sample" and voice.object == "audio.voice"
    by_id = speak(sdk, {"id": voice.id})
    assert by_id.size > 0 and np.array_equal(by_id, speak(sdk, "alice"))       # by name, case-insensitive
    listed = httpx.get(voices_server.url + "/v1/audio/voices").json()["voices"]
    assert any(v["id"] == voice.id and v["kind"] == "custom" for v in listed)

    streamed = b""
    with sdk.audio.speech.with_streaming_response.create(
            model="tts-1", voice={"id": voice.id}, input="Hello from a cloned voice.", response_format="pcm",
            extra_body={"seed": 3, "stream_format": "audio"}) as r:
        for chunk in r.iter_bytes():
            streamed += chunk
    assert np.max(np.abs(decode(streamed, "pcm")[0] - by_id)) <= 4 / 32768
    with httpx.stream("POST", voices_server.url + "/v1/audio/speech/stream",
                      json={"input": "Seed SSE.", "voice": voice.id}, timeout=300) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and base64.b64decode(events[0])
    from websockets.sync.client import connect

    with connect(voices_server.url.replace("http", "ws") + "/v1/audio/speech/ws") as ws:
        ws.send(json.dumps({"input": "Over the socket.", "voice": "Alice"}))
        frames = 0
        while isinstance(message := ws.recv(timeout=300), bytes):
            frames += 1
        assert frames > 0 and json.loads(message) == {"event": "done"}

    voices_server.stop()                              # a restart keeps the voice: same seed, same audio
    voices_server.start()
    with openai.OpenAI(base_url=voices_server.url + "/v1", api_key="x", max_retries=0, timeout=300) as again:
        assert np.array_equal(speak(again, {"id": voice.id}), by_id)
        assert again.audio.voices.delete(voice.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            speak(again, {"id": voice.id})
        with pytest.raises(openai.BadRequestError):
            speak(again, "alice")
    with stored(data_dir) as db:                                       # deleting removes the row and its bytes
        assert db.execute("SELECT count(*) FROM voices WHERE id = ?", (voice.id,)).fetchone() == (0,)


def test_a_sample_with_its_transcript_clones_in_context(sdk, consent, data_dir):
    from safetensors.torch import load

    voice = sdk.audio.voices.create(name="Bob", consent=consent.id, audio_sample=("s.wav", wav(4), "audio/wav"),
                                    extra_body={"ref_text": "This is what the sample says."})
    with stored(data_dir) as db:
        prompt, ref_text = db.execute("SELECT prompt, ref_text FROM voices WHERE id = ?", (voice.id,)).fetchone()
    assert "ref_code" in load(prompt) and ref_text == "This is what the sample says."
    assert speak(sdk, {"id": voice.id}).size > 0


def test_a_voice_designed_from_a_description(sdk):
    voice = sdk.audio.voices.create(name="Storyteller", type="prompt",
                                    prompt="A warm, low voice of an old storyteller, speaking slowly.")
    assert voice.type == "prompt"
    assert speak(sdk, {"id": voice.id}).size > 0


def test_the_seed_clone_endpoint_and_its_prompt_cache(voices_server):
    url = voices_server.url
    reference = wav(4)
    before = httpx.get(url + "/health").json()["voice_cache_hits"]
    audio_cache = []
    for ref_text in ("A reference sentence.", "A reference sentence.", None):
        data = {"input": "Cloned on the fly.", "seed": "1"} | ({"ref_text": ref_text} if ref_text else {})
        r = httpx.post(url + "/v1/audio/speech/clone", files={"file": ("r.wav", reference, "audio/wav")},
                       data=data, timeout=300)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert decode(r.content, "wav")[0].size > 0
        audio_cache.append(r.headers["x-cache"])
    assert httpx.get(url + "/health").json()["voice_cache_hits"] == before + 1   # the repeat was not re-encoded
    assert audio_cache == ["miss", "hit", "miss"]                                 # nor re-synthesized
    r = httpx.post(url + "/v1/audio/speech/clone", files={"file": ("r.wav", b"garbage" * 100, "audio/wav")},
                   data={"input": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


@pytest.mark.parametrize("name, container, codec", [("wav", "wav", "pcm_s16le"), ("mp3", "mp3", "libmp3lame"),
                                                     ("ogg", "ogg", "libvorbis"), ("opus", "ogg", "libopus"),
                                                     ("flac", "flac", "flac"), ("webm", "webm", "libopus"),
                                                     ("m4a", "ipod", "aac")])
def test_common_audio_formats_are_accepted(sdk, name, container, codec):
    import av

    if codec == "libvorbis" and codec not in av.codecs_available:   # FFmpeg's own Vorbis encoder is experimental:
        import soundfile  # libsndfile writes Ogg Vorbis (the server's way)

        out = io.BytesIO()
        soundfile.write(out, tone(220, amplitude=0.2), 24000, format="OGG", subtype="VORBIS")
        data = out.getvalue()
    else:
        data = encode(tone(220, amplitude=0.2), container, codec)
    created = sdk.audio.voice_consents.create(name=name, language="en", recording=(f"r.{name}", data,
                                                                                   "application/octet-stream"))
    assert created.id.startswith("cons_")


def test_bad_input_gets_the_right_status(voices_server, sdk, consent):
    def create(**kw):
        return sdk.audio.voices.create(**{"name": "Bad", "consent": consent.id,
                                          "audio_sample": ("s.wav", wav(4), "audio/wav"), **kw})

    cases = [
        (413, "file_too_large", {"audio_sample": ("big.wav", b"\0" * (10 * 2**20 + 1), "audio/wav")}),
        (400, "invalid_audio", {"audio_sample": ("s.wav", b"RIFF not really" * 50, "audio/wav")}),
        (400, "audio_silent", {"audio_sample": ("s.wav", wav(4, amplitude=0.0), "audio/wav")}),
        (400, "audio_too_short", {"audio_sample": ("s.wav", wav(1.0), "audio/wav")}),
        (400, "audio_too_long", {"audio_sample": ("s.wav", wav(61), "audio/wav")}),
        (404, "consent_not_found", {"consent": "cons_missing"}),
        (409, "voice_name_taken", {"name": "alloy"}),
    ]
    for status, code, overrides in cases:
        with pytest.raises(openai.APIStatusError) as err:
            create(**overrides)
        assert err.value.status_code == status and err.value.body["code"] == code, (code, err.value.message)
    create(name="Taken")
    with pytest.raises(openai.ConflictError):
        create(name="TAKEN")
    with pytest.raises(openai.ConflictError):                 # a consent in use cannot be deleted
        sdk.audio.voice_consents.delete(consent.id)
    with pytest.raises(openai.NotFoundError):
        speak(sdk, {"id": "voice_missing"})
    # A Base model takes no instructions: accepted, not followed (the same audio as without them), and said so.
    styled = sdk.audio.speech.with_raw_response.create(model="tts-1", voice="Taken", input="Hello.",
                                                       response_format="pcm", instructions="Whisper.",
                                                       extra_body={"seed": 3})
    assert "Base model" in styled.headers["x-instructions-ignored"]
    assert np.array_equal(decode(styled.content, "pcm")[0], speak(sdk, "Taken", "Hello."))
    r = httpx.post(voices_server.url + "/v1/audio/voice_consents", data={"name": "x", "language": "not a tag"},
                   files={"recording": ("r.wav", wav(3), "audio/wav")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"
    r = httpx.post(voices_server.url + "/v1/audio/voices", data={"name": "x", "type": "other"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "type"
    r = httpx.post(voices_server.url + "/v1/audio/voices", data={"name": "x", "consent": consent.id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio_sample"
