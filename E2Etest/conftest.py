"""End-to-end fixtures: real servers on loopback running small random-weight Qwen3-TTS checkpoints.

With TTS_URL set, the default `server` fixture talks to that server instead (E2Etest/run_tests.sh --with-server does
this). Tests that need a server configured differently (API key, tiny queue, broken model...) start their own.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "build" / "checkpoints"
LOGS = Path(__file__).resolve().parent / ".logs"
sys.path.insert(0, str(ROOT / "tools"))

# Every test server runs float32 (exact comparisons between streamed and buffered audio) with a small queue.
BASE_ENV = {"DTYPE": "float32", "LOG_FORMAT": "text", "LOG_LEVEL": "INFO", "PRELOAD_MODEL": "true",
            "MAX_QUEUE_DEPTH": "16", "TORCH_COMPILE": "false",
            "BASE_MODEL_ID": str(CHECKPOINTS / "tiny-0.6B-Base"),
            "VOICE_DESIGN_MODEL_ID": str(CHECKPOINTS / "tiny-1.7B-VoiceDesign")}


def checkpoint(name: str) -> str:
    from build_tiny_checkpoints import build_all

    build_all(CHECKPOINTS)
    return str(CHECKPOINTS / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server.py process on a free loopback port; its log lands in E2Etest/.logs/<name>.log."""

    name: str
    env: dict
    url: str = ""
    proc: Optional[subprocess.Popen] = None

    def start(self, wait_ready: bool = True, timeout: float = 180) -> ServerProcess:
        port = free_port()
        self.url = f"{'https' if self.env.get('SSL_CERTFILE') else 'http'}://127.0.0.1:{port}"   # TLS: Hypercorn
        LOGS.mkdir(exist_ok=True)
        data_dir = tempfile.mkdtemp(prefix=f"{self.name}-data-", dir=LOGS)   # custom voices: fresh unless given
        env = {**os.environ, **BASE_ENV, "HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": data_dir, **self.env}
        env.pop("TTS_URL", None)
        self.log_path = LOGS / f"{self.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - stays open for the life of the process
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = httpx.get(self.url + "/health", timeout=2, verify=False).json()
                if not wait_ready or health["model_state"] in ("ready", "failed"):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The main test server: the tiny 0.6B CustomVoice checkpoint, or the server at TTS_URL."""
    if os.environ.get("TTS_URL"):
        yield ServerProcess("external", {}, url=os.environ["TTS_URL"].rstrip("/"))
        return
    proc = ServerProcess("main", {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice")}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(url: str):
    """The real OpenAI SDK, pointed at the server."""
    from openai import OpenAI

    with OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def start_server(name: str, **env: str) -> ServerProcess:
    return ServerProcess(name, env).start()


# ---- audio checks shared by the tests
def decode(data: bytes, fmt: str, sample_rate: int = 24000) -> tuple[np.ndarray, int]:
    """Decode a response body with an independent decoder: raw PCM by hand, everything else with PyAV."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, sample_rate
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == 1, f"{fmt}: expected mono, got {stream.codec_context.channels}"
        rate = stream.codec_context.sample_rate
        chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
    if not chunks:
        return np.zeros(0, np.float32), rate
    pcm = np.concatenate(chunks)
    if pcm.dtype.kind == "i":                       # s16 or s32 samples: scale to [-1, 1]
        return (pcm / float(2 ** (8 * pcm.dtype.itemsize - 1))).astype(np.float32), rate
    return pcm.astype(np.float32), rate


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
