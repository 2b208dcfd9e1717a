#!/usr/bin/env python3
"""Integration check of a running server, with a pass/fail line per check (not pytest).

    TTS_URL=http://localhost:8000 python test_tts.py       # API_KEY too, when the server has one

Exit status 1 when any check fails.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import httpx

URL = os.environ.get("TTS_URL", "http://localhost:8000").rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ['API_KEY']}"} if os.environ.get("API_KEY") else {}
TEXT = "The quick brown fox jumps over the lazy dog."
CHECKS: list[tuple[str, Callable[[httpx.Client], str]]] = []


def check(name: str) -> Callable[[Callable[[httpx.Client], str]], Callable]:
    """Register a check; main() runs them in order."""
    def register(fn: Callable[[httpx.Client], str]) -> Callable:
        CHECKS.append((name, fn))
        return fn
    return register


def run(name: str, fn: Callable[[httpx.Client], str], results: list[tuple[str, bool, str]]) -> None:
    started = time.monotonic()
    try:
        with httpx.Client(base_url=URL, headers=HEADERS, timeout=300) as client:
            detail = fn(client) or ""
        results.append((name, True, detail))
        print(f"PASS  {name:<45} {time.monotonic() - started:6.2f}s  {detail}")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
        results.append((name, False, str(exc)))
        print(f"FAIL  {name:<45} {time.monotonic() - started:6.2f}s  {type(exc).__name__}: {exc}")
        if os.environ.get("VERBOSE"):
            traceback.print_exc()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def wav_seconds(data: bytes) -> float:
    import soundfile

    audio, rate = soundfile.read(io.BytesIO(data))
    expect(audio.ndim == 1, f"expected mono, got shape {audio.shape}")
    return len(audio) / rate


@check("health")
def _(c: httpx.Client) -> str:
    body = c.get("/health").json()
    for key in ("status", "model_loaded", "queue_depth", "voices", "audio_cache_size"):
        expect(key in body, f"missing {key}")
    return f"model {body['model_id']} loaded={body['model_loaded']}"


@check("models list")
def _(c: httpx.Client) -> str:
    data = c.get("/v1/models").json()["data"]
    expect(any(m["id"] == "tts-1" for m in data), "tts-1 not listed")
    return f"{len(data)} models"


@check("voices list")
def _(c: httpx.Client) -> str:
    voices = c.get("/v1/audio/voices").json()["voices"]
    expect(len(voices) >= 9, f"only {len(voices)} voices")
    return f"{len(voices)} voices"


for fmt in ("wav", "mp3", "opus", "aac", "flac", "pcm", "ogg"):
    @check(f"speech {fmt}")
    def _(c: httpx.Client, fmt: str = fmt) -> str:
        r = c.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy",
                                             "response_format": fmt})
        expect(r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}")
        expect(len(r.content) > 1000, f"only {len(r.content)} bytes")
        extra = f", {wav_seconds(r.content):.2f}s" if fmt == "wav" else ""
        return f"{len(r.content)} bytes{extra}"


@check("speed 2.0 halves the duration")
def _(c: httpx.Client) -> str:
    body = {"input": TEXT, "voice": "nova", "response_format": "wav", "seed": 1}
    normal = wav_seconds(c.post("/v1/audio/speech", json=body).content)
    fast = wav_seconds(c.post("/v1/audio/speech", json={**body, "speed": 2.0}).content)
    expect(abs(fast / normal - 0.5) < 0.05, f"{normal:.2f}s -> {fast:.2f}s")
    return f"{normal:.2f}s -> {fast:.2f}s"


@check("streamed audio (stream_format=audio)")
def _(c: httpx.Client) -> str:
    started, first = time.monotonic(), None
    size = 0
    with c.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "alloy", "response_format": "wav",
                                                     "stream_format": "audio"}) as r:
        expect(r.status_code == 200, f"HTTP {r.status_code}")
        for chunk in r.iter_raw():
            first = first or time.monotonic() - started
            size += len(chunk)
    expect(size > 1000, "no audio")
    return f"first bytes after {first:.2f}s, {size} bytes in {time.monotonic() - started:.2f}s"


@check("OpenAI SSE (stream_format=sse)")
def _(c: httpx.Client) -> str:
    with c.stream("POST", "/v1/audio/speech", json={"input": TEXT, "voice": "alloy", "response_format": "mp3",
                                                     "stream_format": "sse"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    expect(events and events[-1]["type"] == "speech.audio.done", "no speech.audio.done event")
    return f"{len(events) - 1} deltas, usage {events[-1]['usage']}"


@check("seed SSE /v1/audio/speech/stream")
def _(c: httpx.Client) -> str:
    with c.stream("POST", "/v1/audio/speech/stream", json={"input": TEXT, "voice": "alloy"}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    expect(data and data[-1] == "[DONE]", f"last event {data[-1:]}")
    pcm = sum(len(base64.b64decode(d)) for d in data[:-1])
    return f"{len(data) - 1} chunks, {pcm / 48000:.2f}s of PCM"


@check("seed PCM /v1/audio/speech/stream/pcm")
def _(c: httpx.Client) -> str:
    with c.stream("POST", "/v1/audio/speech/stream/pcm", json={"input": TEXT, "voice": "alloy"}) as r:
        expect(r.headers.get("x-pcm-sample-rate") == "24000", "missing X-PCM-Sample-Rate")
        data = r.read()
    expect(len(data) % 2 == 0 and len(data) > 0, f"{len(data)} bytes")
    return f"{len(data) / 48000:.2f}s of PCM"


@check("WebSocket /v1/audio/speech/ws")
def _(c: httpx.Client) -> str:
    from websockets.sync.client import connect

    ws_url = URL.replace("http", "ws", 1) + "/v1/audio/speech/ws"
    with connect(ws_url, additional_headers=HEADERS) as ws:
        ws.send(json.dumps({"input": TEXT, "voice": "alloy"}))
        size = 0
        while isinstance(message := ws.recv(timeout=300), bytes):
            size += len(message)
        expect(json.loads(message) == {"event": "done"}, f"ended with {message}")
    return f"{size / 48000:.2f}s of PCM"


@check("errors: unknown voice, empty input, bad speed")
def _(c: httpx.Client) -> str:
    for body, param in (({"input": "hi", "voice": "nobody"}, "voice"), ({"input": " ", "voice": "alloy"}, "input"),
                        ({"input": "hi", "voice": "alloy", "speed": 0}, "speed")):
        r = c.post("/v1/audio/speech", json=body)
        expect(r.status_code == 400 and r.json()["error"]["param"] == param, f"{body}: HTTP {r.status_code}")
    return "400 with the right param each time"


@check("cache: a repeated request is a hit")
def _(c: httpx.Client) -> str:
    body = {"input": "Cache check.", "voice": "alloy", "response_format": "wav", "seed": 99}
    c.post("/v1/audio/speech", json=body)
    r = c.post("/v1/audio/speech", json=body)
    expect(r.headers.get("x-cache") == "hit", f"X-Cache {r.headers.get('x-cache')}")
    return "hit"


@check("metrics")
def _(c: httpx.Client) -> str:
    r = c.get("/metrics")
    expect(r.status_code == 200 and "tts_requests_total" in r.text, f"HTTP {r.status_code}")
    return f"{len(r.text.splitlines())} lines"


def main() -> int:
    results: list[tuple[str, bool, str]] = []
    for name, fn in CHECKS:
        run(name, fn, results)
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed against {URL}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
