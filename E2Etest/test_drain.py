"""Graceful drain on SIGTERM, against real server processes: readiness turns 503 at once while liveness stays 200,
new synthesis is refused with 503 + Retry-After, every stream in flight (OpenAI SSE, the seed's SSE, raw PCM, the
WebSocket) finishes whole, and the process exits; with a short DRAIN_TIMEOUT the streams still running are cut the
way their protocol ends a failed stream, with no traceback in the log. Each test prints its figures (streams in
flight at SIGTERM, how many finished, time to exit). Everything waits for states, never for wall-clock budgets.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import threading
import time
from typing import Optional

import httpx
import pytest
from test_deployment import make_certificate

from conftest import ROOT, ServerProcess, checkpoint, wait_for

# The machine may be shared and slow: each test may take long, the limit only stops a hang.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
TEXT = "Nothing is lost in a drain."                          # ~6 s of audio from the tiny model
LONG = " ".join(["A stream that outlives the drain is cut, and says so."] * 5)     # ~40 s: outlives a 1 s drain
PROTOCOLS = ("openai_sse", "seed_sse", "raw_pcm", "websocket")


def unready(url: str, verify: bool = True) -> Optional[httpx.Response]:
    """/ready's answer once it is no longer 200 (a drain has begun), else None."""
    r = httpx.get(url + "/ready", timeout=30, verify=verify)
    return r if r.status_code != 200 else None


class Stream(threading.Thread):
    """One streaming client of one protocol, run to the end: the PCM bytes it got and how the stream ended."""

    def __init__(self, url: str, protocol: str, text: str, verify: bool = True):
        super().__init__(daemon=True)
        self.url, self.protocol, self.text, self.verify = url, protocol, text, verify
        self.first_audio = threading.Event()
        self.pcm = b""
        self.ending: Optional[object] = None          # the last event / message, or "eof" for raw audio
        self.error: Optional[BaseException] = None

    def got(self, pcm: bytes) -> None:
        self.pcm += pcm
        if pcm:
            self.first_audio.set()

    def run(self) -> None:
        try:
            getattr(self, self.protocol)()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.first_audio.set()

    def _lines(self, path: str, body: dict):
        with httpx.stream("POST", self.url + path, json=body, timeout=600, verify=self.verify) as r:
            assert r.status_code == 200, r.read()
            yield from (line[6:] for line in r.iter_lines() if line.startswith("data: "))

    def openai_sse(self) -> None:
        body = {"input": self.text, "voice": "alloy", "response_format": "pcm", "stream_format": "sse", "seed": 1}
        for data in self._lines("/v1/audio/speech", body):
            event = json.loads(data)
            if event["type"] == "speech.audio.delta":
                self.got(base64.b64decode(event["audio"]))
            else:
                self.ending = event

    def seed_sse(self) -> None:
        for data in self._lines("/v1/audio/speech/stream", {"input": self.text, "voice": "alloy", "seed": 1}):
            if data.startswith("["):
                self.ending = data
            else:
                self.got(base64.b64decode(data))

    def raw_pcm(self) -> None:
        with httpx.stream("POST", self.url + "/v1/audio/speech/stream/pcm", timeout=600, verify=self.verify,
                          json={"input": self.text, "voice": "alloy", "seed": 1}) as r:
            assert r.status_code == 200, r.read()
            try:
                for chunk in r.iter_raw():
                    self.got(chunk)
            except httpx.RemoteProtocolError:        # the body ended without its last chunk: the stream was cut
                self.ending = "cut"
                return
        self.ending = "eof"

    def websocket(self) -> None:
        from websockets.sync.client import connect

        with connect(self.url.replace("http", "ws", 1) + "/v1/audio/speech/ws") as ws:
            ws.send(json.dumps({"input": self.text, "voice": "alloy", "seed": 1}))
            while isinstance(message := ws.recv(timeout=600), bytes):
                self.got(message)
            self.ending = json.loads(message)


def full_pcm_bytes(text: str) -> int:
    """What a stream of `text` carries when nobody cuts it: the tiny model never ends early (it never samples EOS),
    so every segment speaks its whole token budget, 1920 int16 samples a frame."""
    sys.path.insert(0, str(ROOT))
    import server

    segments = server.split_segments(server.normalize_text(text, "en"), "en", 300)
    return sum(server.token_budget(segment, "en") for segment in segments) * server.SAMPLES_PER_FRAME * 2


def start_streams(url: str, text: str) -> list[Stream]:
    streams = [Stream(url, p, text) for p in PROTOCOLS]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_audio.wait(600), f"{s.protocol}: no audio"
        assert s.error is None, (s.protocol, s.error)
    return streams


def wait_exit(proc: ServerProcess, timeout: float = 300) -> float:
    """Seconds from now until the process has exited (a bound that only stops a hang)."""
    started = time.monotonic()
    proc.proc.wait(timeout)
    return time.monotonic() - started


def clean_log(proc: ServerProcess) -> str:
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "CancelledError" not in log, log[-4000:]
    return log


def in_flight_at_signal(log: str) -> int:
    return int(re.search(r"draining: (\d+) requests in flight", log).group(1))


@pytest.fixture
def draining_server():
    servers: list[ServerProcess] = []

    def start(name: str, **env: str) -> ServerProcess:
        env = {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice"), "MAX_BATCH_SIZE": "4", "AUDIO_CACHE_MAX": "0",
               "REQUEST_TIMEOUT": "3600", **env}                 # an upper bound that only stops a hang
        proc = ServerProcess(name, env).start(timeout=1200)     # a busy machine loads slowly
        servers.append(proc)
        return proc

    yield start
    for proc in servers:
        proc.stop()


def test_sigterm_lets_every_stream_in_flight_finish_whole_then_exits(draining_server):
    srv = draining_server("drain", DRAIN_TIMEOUT="1200")        # an upper bound that only stops a hang
    full = full_pcm_bytes(TEXT)
    streams = start_streams(srv.url, TEXT)

    srv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    ready = wait_for(lambda: unready(srv.url), "/ready to turn 503 after SIGTERM", interval=0.02)
    running_when_unready = sum(not s.ending for s in streams)
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200        # liveness is untouched
    refused = httpx.post(srv.url + "/v1/audio/speech", json={"input": "Too late.", "voice": "alloy"}, timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"

    for s in streams:
        s.join(1500)
        assert s.error is None, (s.protocol, s.error)
        assert len(s.pcm) == full, (s.protocol, len(s.pcm), full)             # every sample, nothing cut
    endings = {s.protocol: s.ending for s in streams}
    assert endings["openai_sse"]["type"] == "speech.audio.done" and endings["seed_sse"] == "[DONE]"
    assert endings["websocket"] == {"event": "done"} and endings["raw_pcm"] == "eof"
    exit_seconds = time.monotonic() - signalled + wait_exit(srv)
    assert srv.proc.returncode in (0, -signal.SIGTERM)
    log = clean_log(srv)
    assert in_flight_at_signal(log) >= len(streams) and "Application shutdown complete" in log
    print(f"\ndrain: {len(streams)} streams in flight at SIGTERM ({running_when_unready} still running when /ready "
          f"answered 503), {len(streams)} finished whole, 1 new request refused with 503; exit "
          f"{exit_seconds:.1f}s after SIGTERM")


def test_what_outlives_the_drain_timeout_ends_as_its_protocol_ends_a_failed_stream(draining_server):
    srv = draining_server("drain-cut", DRAIN_TIMEOUT="1")
    streams = start_streams(srv.url, LONG)
    srv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    for s in streams:
        s.join(1500)
        assert s.error is None, (s.protocol, s.error)
    exit_seconds = time.monotonic() - signalled + wait_exit(srv)
    endings = {s.protocol: s.ending for s in streams}
    assert endings["openai_sse"]["type"] == "error" and endings["openai_sse"]["error"]["code"] == "shutting_down"
    assert endings["seed_sse"] == "[ERROR] the server is shutting down"
    assert endings["websocket"] == {"event": "error", "detail": "the server is shutting down"}
    assert endings["raw_pcm"] == "cut"                # raw audio ends without its last chunk: an incomplete body
    full = full_pcm_bytes(LONG)
    assert all(0 < len(s.pcm) < full for s in streams), [(len(s.pcm), full) for s in streams]     # cut, not whole
    log = clean_log(srv)
    assert "still running after DRAIN_TIMEOUT=1s" in log and "Application shutdown complete" in log
    print(f"\ndrain cut: {in_flight_at_signal(log)} in flight at SIGTERM, 0 finished within DRAIN_TIMEOUT=1s, "
          f"{len(streams)} ended with their protocol's error; exit {exit_seconds:.1f}s after SIGTERM")


def test_hypercorn_drains_too(draining_server, tmp_path):
    """HTTPS (Hypercorn): the same drain through its shutdown trigger, a stream finishing over TLS."""
    cert, key = make_certificate(tmp_path, "drain")
    srv = draining_server("drain-tls", DRAIN_TIMEOUT="1200", SSL_CERTFILE=str(cert), SSL_KEYFILE=str(key))
    stream = Stream(srv.url, "openai_sse", TEXT, verify=False)
    stream.start()
    assert stream.first_audio.wait(600) and stream.error is None
    srv.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: unready(srv.url, verify=False), "/ready to turn 503 after SIGTERM", interval=0.02)
    with httpx.Client(http2=True, verify=False, timeout=60) as h2:          # refused over HTTP/2 as well
        refused = h2.post(srv.url + "/v1/audio/speech", json={"input": "Too late.", "voice": "alloy"})
    assert refused.http_version == "HTTP/2" and refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down" and "connection" not in refused.headers
    stream.join(1500)
    assert stream.error is None and stream.ending["type"] == "speech.audio.done"
    wait_exit(srv)
    assert srv.proc.returncode == 0 and in_flight_at_signal(clean_log(srv)) >= 1


def test_a_server_killed_while_idle_exits_at_once(draining_server):
    """Nothing in flight: the drain is over as soon as it starts."""
    srv = draining_server("drain-idle", DRAIN_TIMEOUT="1200")
    srv.proc.send_signal(signal.SIGTERM)
    wait_exit(srv)
    log = clean_log(srv)
    assert in_flight_at_signal(log) == 0 and "drained in" in log and "Application shutdown complete" in log
