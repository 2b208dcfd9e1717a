"""What voice-agent frameworks need, tried with their own client code against a live server (issue 13): instructions
that the model cannot follow are accepted (several frameworks send one on every call); Pipecat's OpenAI and ElevenLabs
TTS services and LiveKit Agents' ElevenLabs plugin get speech (the frameworks run in a virtual environment of their
own, built here on first use); ElevenLabs' stream-input WebSockets speak incremental text."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_websocket import WAIT, receive_utterance, ws_url
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import ROOT, decode, rms

CLIENTS = Path(__file__).resolve().parent / "clients"
AGENTS_VENV = ROOT / "build" / "venv-agents"


def ignored_instructions(http) -> float:
    """tts_instructions_ignored_total for the CustomVoice model (absent until the first one: 0)."""
    name = 'tts_instructions_ignored_total{kind="custom_voice"} '
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


# ---- instructions a model cannot follow: accepted, not followed, and said so
def test_instructions_the_model_cannot_follow_are_accepted_and_said_so(client, http):
    before = ignored_instructions(http)
    styled = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="nova", input="Hi.", response_format="pcm", extra_body={"seed": 21},
        instructions="You will receive partial sentences. Speak warmly.")
    assert styled.status_code == 200
    assert "0.6B CustomVoice models cannot follow instructions" in styled.headers["x-instructions-ignored"]
    plain = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.",
                                                         response_format="pcm", extra_body={"seed": 21})
    assert "x-instructions-ignored" not in plain.headers
    assert plain.content == styled.content                  # not followed: the same audio as without them
    assert ignored_instructions(http) == before + 1


def test_the_websocket_says_so_in_its_done_event(url):
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"input": "Hi.", "voice": "nova", "instructions": "Speak warmly."}))
        audio, done = receive_utterance(ws)
        assert len(audio) > 0 and done["event"] == "done" and "0.6B" in done["instructions_ignored"]
        ws.send(json.dumps({"event": "start", "voice": "nova", "instructions": "Speak warmly."}))
        ws.send(json.dumps({"event": "text", "text": "Hi."}))
        ws.send(json.dumps({"event": "end"}))
        audio, done = receive_utterance(ws)
        assert len(audio) > 0 and done["event"] == "done" and "0.6B" in done["instructions_ignored"]
        ws.send(json.dumps({"input": "Hi.", "voice": "nova"}))
        assert receive_utterance(ws)[1] == {"event": "done"}


# ---- the frameworks' own clients: Pipecat's services in a Pipecat pipeline, LiveKit Agents' plugin
@pytest.fixture(scope="session")
def agents_python() -> str:
    """The Python of the frameworks' virtual environment: built on first use (a few minutes), then kept until
    clients/requirements-agents.txt changes. A lock keeps parallel test runs from building it twice."""
    requirements = CLIENTS / "requirements-agents.txt"
    want = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python, stamp = AGENTS_VENV / "bin" / "python", AGENTS_VENV / ".installed"
    AGENTS_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(AGENTS_VENV.parent / ".venv-agents.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == want):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(AGENTS_VENV)], check=True, timeout=WAIT)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                            str(requirements)], check=True, timeout=1800)
            stamp.write_text(want)
    return str(python)


def run_client(python: str, script: str, args: list[str], tmp_path: Path) -> dict:
    """Run clients/<script> KIND URL OUT SENTENCE... (args without OUT); -> what it printed, with its audio decoded
    (s16le mono) as "pcm"."""
    out = tmp_path / "audio.pcm"
    done = subprocess.run([python, str(CLIENTS / script), *args[:2], str(out), *args[2:]],
                          capture_output=True, text=True, timeout=2 * WAIT)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["pcm"] = decode(out.read_bytes(), "pcm")[0]
    return result


def spoken_alone(http, text: str) -> np.ndarray:
    """The server's own answer for `text` (the tiny model speaks every segment's whole token budget, so lengths are
    the same whatever the sampling)."""
    r = http.post("/v1/audio/speech", json={"input": text, "voice": "nova", "response_format": "pcm"})
    assert r.status_code == 200
    return decode(r.content, "pcm")[0]


PIPECAT_TEXT = ["Hello there.", "This is a test of the pipeline."]
# LiveKit's sentence tokenizer sends sentences of 20 characters or more, and the first once it has seen 10 more.
AGENT_TEXT = ["Hello there, this is the first one.", "And here comes the second."]


def test_pipecat_openai_service_gets_streamed_speech(agents_python, url, http, tmp_path):
    """Pipecat's OpenAITTSService (its request plus "stream_format": "audio"): 24 kHz PCM, the length of the same
    request sent directly, and its first audio came while the server was still synthesizing."""
    result = run_client(agents_python, "pipecat_tts.py", ["openai", url, *PIPECAT_TEXT, "--stream-format"], tmp_path)
    assert result["errors"] == [] and result["sample_rate"] == 24000
    assert result["pcm"].size == spoken_alone(http, " ".join(PIPECAT_TEXT)).size and rms(result["pcm"]) > 0
    assert result["first_audio_while_synthesizing"] is True


def test_pipecat_openai_service_unchanged_gets_its_first_audio_while_the_server_synthesizes(agents_python, url,
                                                                                           tmp_path):
    """Pipecat's OpenAITTSService as it ships (no stream_format): every answer streams, so its first audio comes while
    the server still synthesizes (other text than the test above: that answer is in the audio cache, sent whole)."""
    text = ["Good evening.", "The pipeline speaks again, unchanged."]
    result = run_client(agents_python, "pipecat_tts.py", ["openai", url, *text], tmp_path)
    assert result["errors"] == [] and result["pcm"].size > 0
    assert result["first_audio_while_synthesizing"] is True


def test_pipecat_elevenlabs_service_speaks_an_llms_tokens_as_they_come(agents_python, url, http, tmp_path):
    """Pipecat's ElevenLabsTTSService on /v1/text-to-speech/nova/multi-stream-input: the first audio comes before the
    rest of the tokens are sent; each sentence is one segment (the lengths of the two spoken alone); the words come
    back from the alignment, as Pipecat adds them to the conversation."""
    result = run_client(agents_python, "pipecat_tts.py", ["elevenlabs", url, *AGENT_TEXT], tmp_path)
    assert result["errors"] == [] and result["sample_rate"] == 24000
    assert result["first_audio_before_text_end"] is True
    assert result["pcm"].size == sum(spoken_alone(http, text).size for text in AGENT_TEXT) and rms(result["pcm"]) > 0
    assert result["spoken"] == " ".join(AGENT_TEXT).split()


def test_livekit_elevenlabs_plugin_speaks_an_llms_tokens_as_they_come(agents_python, url, http, tmp_path):
    """LiveKit Agents' elevenlabs.TTS stream (multi-stream-input, auto_mode, a flush per sentence): first audio
    before the rest of the text is pushed, each sentence one segment, the words back in its timed transcript."""
    result = run_client(agents_python, "livekit_tts.py", ["elevenlabs", url, *AGENT_TEXT], tmp_path)
    assert result["errors"] == [] and result["sample_rate"] == 24000
    assert result["first_audio_before_text_end"] is True
    assert result["pcm"].size == sum(spoken_alone(http, text).size for text in AGENT_TEXT) and rms(result["pcm"]) > 0
    assert result["spoken"] == " ".join(AGENT_TEXT).split()


# ---- ElevenLabs' stream-input protocols with a plain WebSocket client
def elevenlabs_url(url: str, voice: str = "nova", path: str = "multi-stream-input", **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"model_id": "eleven_flash_v2_5", **query}.items())
    return f"{url.replace('http', 'ws', 1)}/v1/text-to-speech/{voice}/{path}?{params}"


def receive_context(ws) -> tuple[bytes, list[dict], list[dict]]:
    """Messages until isFinal; -> (audio, alignments, the other messages)."""
    audio, alignments, others = b"", [], []
    while not (message := json.loads(ws.recv(timeout=WAIT))).get("isFinal"):
        if message.get("audio"):
            audio += base64.b64decode(message["audio"])
        elif "alignment" in message:
            alignments.append(message)
        else:
            others.append(message)
    return audio, alignments, others


def test_multi_stream_input_speaks_a_context_and_ends_it(url, http):
    with connect(elevenlabs_url(url, output_format="pcm_24000")) as ws:
        ws.send(json.dumps({"text": " ", "voice_settings": {"stability": 0.5, "speed": 1.0}, "context_id": "c1"}))
        ws.send(json.dumps({"text": "Hello ", "context_id": "c1"}))
        ws.send(json.dumps({"text": "there.", "context_id": "c1", "flush": True}))   # a flush: its own segment
        ws.send(json.dumps({"text": "", "context_id": "c1"}))                     # a keep-alive
        ws.send(json.dumps({"text": "Bye", "context_id": "c1"}))
        ws.send(json.dumps({"text": " now.", "context_id": "c1"}))
        ws.send(json.dumps({"context_id": "c1", "flush": True}))
        ws.send(json.dumps({"context_id": "c1", "close_context": True}))
        audio, alignments, others = receive_context(ws)
        assert others == []
        assert [m["contextId"] for m in alignments] == ["c1", "c1"]
        assert ["".join(m["alignment"]["chars"]) for m in alignments] == ["Hello there. ", "Bye now. "]
        pcm = decode(audio, "pcm")[0]
        lengths = [spoken_alone(http, "Hello there.").size, spoken_alone(http, "Bye now.").size]
        assert pcm.size == sum(lengths)
        for message, samples in zip(alignments, lengths, strict=True):                # times span each segment
            timing = message["alignment"]
            assert timing["charStartTimesMs"][-1] + timing["charDurationsMs"][-1] == round(samples / 24)
        ws.send(json.dumps({"context_id": "c1", "close_context": True}))              # closed already: no error
        ws.send(json.dumps({"close_socket": True}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_stream_input_speaks_one_context_in_mp3_and_closes(url):
    with connect(elevenlabs_url(url, path="stream-input", output_format="mp3_44100_128")) as ws:
        ws.send(json.dumps({"text": " ", "voice_settings": {"speed": 1.1}}))
        ws.send(json.dumps({"text": "Hi there. "}))
        ws.send(json.dumps({"text": ""}))                                         # the end of the text
        audio, alignments, others = receive_context(ws)
        assert others == [] and len(alignments) == 1
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    pcm, rate = decode(audio, "mp3")
    assert rate == 44100 and rms(pcm) > 0


@pytest.mark.parametrize("query, words", [({"output_format": "ulaw_8000"}, "output_format"),
                                          ({"enable_ssml_parsing": "true"}, "SSML")])
def test_a_connection_it_cannot_serve_gets_an_error_and_1008(url, query, words):
    with connect(elevenlabs_url(url, **query)) as ws:
        error = json.loads(ws.recv(timeout=WAIT))
        assert words in error["message"] and error["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_an_unknown_voice_is_refused_naming_the_valid_ones(url):
    with connect(elevenlabs_url(url, voice="21m00Tcm4TlvDq8ikWAM")) as ws:
        error = json.loads(ws.recv(timeout=WAIT))
        assert "unknown voice" in error["message"] and "nova" in error["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=WAIT)


def test_messages_it_cannot_use_get_error_messages_and_the_socket_stays(url):
    with connect(elevenlabs_url(url)) as ws:
        for message in (b"binary", "[1]", json.dumps({"text": 5, "context_id": "a"}),
                        json.dumps({"context_id": "a"}), json.dumps({"text": "x", "context_id": ""}),
                        json.dumps({"text": "hi", "context_id": "a", "voice_settings": {"speed": 99}})):
            ws.send(message)
            assert json.loads(ws.recv(timeout=WAIT))["error"], message
        for i in range(5):
            ws.send(json.dumps({"text": " ", "context_id": f"c{i}"}))              # five contexts, none speaking
        ws.send(json.dumps({"text": " ", "context_id": "c5"}))
        error = json.loads(ws.recv(timeout=WAIT))
        assert error["error"] == "max_active_conversations" and error["contextId"] == "c5"
        ws.send(json.dumps({"context_id": "c0", "close_context": True}))
        assert json.loads(ws.recv(timeout=WAIT)) == {"isFinal": True, "contextId": "c0"}
