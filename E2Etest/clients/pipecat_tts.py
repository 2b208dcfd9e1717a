"""Pipecat's own TTS services against a live server, in a Pipecat pipeline, as a voice agent would run them.

Runs in the frameworks' own virtual environment (pipecat-ai pins soundfile, soxr and protobuf apart from the server's;
see requirements-agents.txt and E2Etest/test_agents.py, which builds it and reads what this prints):

    pipecat_tts.py openai     BASE_URL OUT.pcm SENTENCE... [--stream-format]
    pipecat_tts.py elevenlabs BASE_URL OUT.pcm SENTENCE...

openai: OpenAITTSService speaks the sentences as one TTSSpeakFrame. When the first audio frame reaches the end of the
pipeline, /health is asked whether the server is still synthesizing (first audio before synthesis ends).
--stream-format adds "stream_format": "audio" to the request body (an httpx hook; Pipecat sends none) for servers that
buffer answers without it.
elevenlabs: ElevenLabsTTSService (the multi-stream-input WebSocket) gets the sentences as an LLM's tokens; the tokens
of the sentences after the first are pushed only once the first audio has arrived (speech before the text ends).

Prints one JSON line: sample_rate, audio_bytes, first_audio_while_synthesizing (openai) or
first_audio_before_text_end (elevenlabs), spoken (the TTSTextFrame words), errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

# Seconds: only stops a hang. Pipecat's own audio timer (stop_frame_timeout_s, 3 s: a context with no audio for that
# long is over) is set to it too: on a loaded test machine the tiny model can take longer than that between chunks.
WAIT = 600


class Collector(FrameProcessor):
    """Keeps what reaches it: audio and words going downstream, errors going upstream."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url
        self.audio = bytearray()
        self.sample_rate = 0
        self.spoken: list[str] = []
        self.errors: list[str] = []
        self.first_audio = asyncio.Event()
        self.stopped = asyncio.Event()
        self.synthesizing_at_first_audio: bool | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, ErrorFrame):
            self.errors.append(str(frame.error))
        elif isinstance(frame, TTSAudioRawFrame):
            if not self.first_audio.is_set():
                self.synthesizing_at_first_audio = await asyncio.to_thread(self._synthesizing)
                self.first_audio.set()
            self.audio += frame.audio
            self.sample_rate = frame.sample_rate
        elif isinstance(frame, TTSTextFrame):
            self.spoken.append(frame.text)
        elif isinstance(frame, TTSStoppedFrame):
            self.stopped.set()
        await self.push_frame(frame, direction)

    def _synthesizing(self) -> bool:
        with urllib.request.urlopen(self.base_url + "/health", timeout=60) as r:
            return json.load(r)["queue_depth"] > 0


def stream_format_client():
    """The SDK's own kind of HTTP client, whose requests to /audio/speech carry "stream_format": "audio"."""
    import httpx2  # the HTTP library of this openai version
    from openai import DefaultAsyncHttpxClient

    class AddStreamFormat(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            if request.url.path.endswith("/audio/speech"):
                body = {**json.loads(request.content), "stream_format": "audio"}
                headers = [(k, v) for k, v in request.headers.items() if k.lower() != "content-length"]
                request = httpx2.Request(request.method, request.url, headers=headers,
                                         content=json.dumps(body).encode())
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return DefaultAsyncHttpxClient(transport=AddStreamFormat())


async def main(kind: str, base_url: str, out: str, sentences: list[str], stream_format: bool) -> None:
    errors_upstream = Collector(base_url)       # ErrorFrames travel upstream, to the processor before the service
    collector = Collector(base_url)
    if kind == "openai":
        from pipecat.services.openai.tts import OpenAITTSService

        tts = OpenAITTSService(api_key="sk-test", base_url=base_url + "/v1", stop_frame_timeout_s=WAIT,
                               http_client=stream_format_client() if stream_format else None,
                               settings=OpenAITTSService.Settings(voice="nova", model="tts-1"))
    else:
        from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

        tts = ElevenLabsTTSService(api_key="unused", url=base_url.replace("http", "ws", 1), stop_frame_timeout_s=WAIT,
                                   settings=ElevenLabsTTSService.Settings(voice="nova", model="eleven_flash_v2_5"))
    task = PipelineTask(Pipeline([errors_upstream, tts, collector]), enable_rtvi=False, idle_timeout_secs=WAIT,
                        params=PipelineParams(audio_out_sample_rate=24000))
    runner = asyncio.create_task(PipelineRunner(handle_sigint=False).run(task))
    first_audio_before_text_end = None
    if kind == "openai":
        await task.queue_frames([TTSSpeakFrame(" ".join(sentences))])
    else:
        # An LLM's tokens: the first sentence and the first word after it (Pipecat's sentence aggregator looks one
        # character past a period before it sends the sentence), then, once audio has come, the rest.
        tokens = [f" {word}" if i else word for i, word in enumerate(" ".join(sentences).split())]
        head = len(sentences[0].split()) + 1
        await task.queue_frames([LLMFullResponseStartFrame(), *map(LLMTextFrame, tokens[:head])])
        try:
            await asyncio.wait_for(collector.first_audio.wait(), WAIT)
            first_audio_before_text_end = True
        except asyncio.TimeoutError:
            first_audio_before_text_end = False
        await task.queue_frames([*map(LLMTextFrame, tokens[head:]), LLMFullResponseEndFrame()])
    await asyncio.wait_for(collector.stopped.wait(), WAIT)
    await task.queue_frames([EndFrame()])
    await asyncio.wait_for(runner, WAIT)
    with open(out, "wb") as f:
        f.write(collector.audio)
    print(json.dumps({"sample_rate": collector.sample_rate, "audio_bytes": len(collector.audio),
                      "first_audio_while_synthesizing": collector.synthesizing_at_first_audio,
                      "first_audio_before_text_end": first_audio_before_text_end,
                      "spoken": collector.spoken, "errors": errors_upstream.errors + collector.errors}))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(args[0], args[1].rstrip("/"), args[2], args[3:], "--stream-format" in sys.argv))
