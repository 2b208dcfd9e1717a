"""What voice-agent frameworks need, tried with their own client code against a live server (issue 13): instructions
that the model cannot follow are accepted (several frameworks send one on every call)."""

from __future__ import annotations

import json

from test_websocket import receive_utterance, ws_url
from websockets.sync.client import connect


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
