"""Text through real HTTP: what the server makes of a request's words shows in the audio it returns.

The tiny checkpoints make noise, but deterministic noise: with one seed, two requests give the same audio exactly
when the model got the same tokens (the same normalized text and the same language). So "R$ 29,90" is read as
"vinte e nove reais e noventa centavos" when both give the same audio, and "Hi." is spoken as English when it
sounds like the same request with `language: english` and unlike one with `language: italian`.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import checkpoint, start_server


def speech(http: httpx.Client, text: str, voice: str = "alloy", **extra) -> bytes:
    r = http.post("/v1/audio/speech", json={"model": "tts-1", "input": text, "voice": voice, "response_format": "pcm",
                                           "seed": 7, **extra})
    assert r.status_code == 200, r.text
    assert len(r.content) > 0
    return r.content


# Short texts: the tiny model speaks every request for its whole token budget, which grows with the text.
@pytest.mark.parametrize("language, written, spoken", [
    ("pt", "R$ 29,90", "vinte e nove reais e noventa centavos"),
    ("zh", "拨打110", "拨打幺幺零"),
])
def test_written_text_is_spoken_as_its_reading(http, language, written, spoken):
    assert speech(http, written, language=language) == speech(http, spoken, language=language)


def test_short_text_takes_the_built_in_voices_language(http):
    greeting = speech(http, "Hi.", voice="alloy")                      # ryan: an English speaker
    assert greeting == speech(http, "Hi.", voice="alloy", language="english")
    assert greeting != speech(http, "Hi.", voice="alloy", language="italian")


@pytest.mark.slow
def test_default_language_decides_short_text():
    proc = start_server("default-language", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice"), DEFAULT_LANGUAGE="de")
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            yes = speech(http, "Ja.", voice="alloy")
            assert yes == speech(http, "Ja.", voice="alloy", language="german")
            assert yes != speech(http, "Ja.", voice="alloy", language="english")
            assert speech(http, "Bonjour.", voice="alloy") == speech(http, "Bonjour.", voice="alloy", language="french")
    finally:
        proc.stop()
