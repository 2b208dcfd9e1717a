"""LiveKit Agents' ElevenLabs TTS plugin against a live server, its streaming synthesis as an agent runs it.

Runs in the frameworks' own virtual environment (requirements-agents.txt; E2Etest/test_agents.py builds it and reads
what this prints):

    livekit_tts.py elevenlabs BASE_URL OUT.pcm SENTENCE...

elevenlabs.TTS(base_url=BASE_URL/v1) streams over /v1/text-to-speech/nova/multi-stream-input: the tokens of the
first sentence and the 10 characters after it (LiveKit's sentence tokenizer sends a sentence once it has seen that
much more) are pushed, then the rest only once the first audio has arrived (speech before the text ends).
Prints one JSON line: sample_rate, audio_bytes, first_audio_before_text_end, spoken (the words of its timed
transcript), errors.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
from livekit.agents import APIConnectOptions
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.plugins import elevenlabs

# Seconds: only stops a hang. LiveKit's own timeouts (10 s for audio after text, then retries) are set to it too: on
# a loaded test machine the tiny model can take longer than that for its first audio.
WAIT = 600


async def main(base_url: str, out: str, sentences: list[str]) -> None:
    audio, spoken, errors = bytearray(), [], []
    sample_rate = 0
    first_audio = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        tts = elevenlabs.TTS(api_key="unused", base_url=base_url + "/v1", voice_id="nova", encoding="pcm_24000",
                             http_session=session)
        stream = tts.stream(conn_options=APIConnectOptions(max_retry=0, timeout=WAIT))

        async def consume() -> None:
            nonlocal sample_rate
            async for event in stream:
                audio.extend(bytes(event.frame.data))
                sample_rate = event.frame.sample_rate
                spoken.extend(str(word).strip() for word in event.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, []))
                first_audio.set()

        consumer = asyncio.create_task(consume())
        tokens = [f" {word}" if i else word for i, word in enumerate(" ".join(sentences).split())]
        head = len(sentences[0].split())
        while head < len(tokens) and len("".join(tokens[len(sentences[0].split()):head])) < 10:
            head += 1
        for token in tokens[:head]:
            stream.push_text(token)
        try:
            await asyncio.wait_for(first_audio.wait(), WAIT)
            first_audio_before_text_end = True
        except asyncio.TimeoutError:
            first_audio_before_text_end = False
        for token in tokens[head:]:
            stream.push_text(token)
        stream.end_input()
        try:
            await asyncio.wait_for(consumer, WAIT)
        except Exception as exc:  # noqa: BLE001 - reported, the test reads it
            errors.append(f"{type(exc).__name__}: {exc}")
        await stream.aclose()
        await tts.aclose()
    with open(out, "wb") as f:
        f.write(audio)
    print(json.dumps({"sample_rate": sample_rate, "audio_bytes": len(audio),
                      "first_audio_before_text_end": first_audio_before_text_end,
                      "spoken": [word for word in spoken if word], "errors": errors}))


if __name__ == "__main__":
    if sys.argv[1] != "elevenlabs":
        sys.exit("usage: livekit_tts.py elevenlabs BASE_URL OUT.pcm SENTENCE...")
    asyncio.run(main(sys.argv[2].rstrip("/"), sys.argv[3], sys.argv[4:]))
