"""End-to-end fixtures: real servers on loopback running small random-weight Qwen3-TTS checkpoints.

How the tests here are written (keep new ones in line):
- Share servers. `server` (and `url`, `http`, `client` on it) is the session's main server: the tiny 0.6B
  CustomVoice checkpoint with the default settings; use it whenever they will do. A configuration that several tests
  need is one module- or session-scoped fixture (`limited` in test_configurations.py). Only a configuration that no
  other test can share gets a server of its own, started in a `with start_server(...)` block, which stops it
  whatever happens.
- Wait for states, never for time: `wait_for(probe, what)` polls with a generous bound that only stops a hang (the
  machine may be busy; CI shares it), `wait_for_idle(http)` until the queue is empty and the model idle. Clients get
  CLIENT_TIMEOUT. No assertion on how long something took (bench/bench.py measures that).
- Markers (pytest.ini): `smoke` needs no synthesis; `slow` starts servers of its own or synthesizes long audio.

With TTS_URL set, the `server` fixture talks to that server instead (E2Etest/run_tests.sh without --with-server).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "build" / "checkpoints"
LOGS = Path(__file__).resolve().parent / ".logs"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from server import FORMATS  # noqa: E402,F401 - the one list of response formats, for the tests to import from here
from testkit import build_checkpoints, free_port, tone, wait_for  # noqa: E402,F401 - shared, re-exported

# Every test server runs float32 (exact comparisons between streamed and buffered audio) with a small queue. One
# PyTorch thread each: several servers and test processes share the CPUs, and OpenMP threads that spin-wait for a
# busy core slow everything down (measured here on a loaded machine; the output is the same).
BASE_ENV = {"DTYPE": "float32", "LOG_FORMAT": "text", "LOG_LEVEL": "INFO", "PRELOAD_MODEL": "true",
            "MAX_QUEUE_DEPTH": "16", "TORCH_COMPILE": "false", "OMP_NUM_THREADS": "1",
            "BASE_MODEL_ID": str(CHECKPOINTS / "tiny-0.6B-Base"),
            "VOICE_DESIGN_MODEL_ID": str(CHECKPOINTS / "tiny-1.7B-VoiceDesign")}
CLIENT_TIMEOUT = 600      # seconds: a bound that only stops a hang, for every HTTP client of the tests
START_TIMEOUT = 600       # seconds for a server to load and warm up its model
# Under pytest-xdist each worker starts its own servers: their logs are <name>-gw0.log, <name>-gw1.log, ...
WORKER_SUFFIX = f"-{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else ""


def checkpoint(name: str) -> str:
    return str(build_checkpoints(CHECKPOINTS) / name)


@dataclass
class ServerProcess:
    """A server.py process on a free loopback port; its log lands in E2Etest/.logs/<name>.log. A context manager:
    `with ServerProcess(...).start() as proc:` stops it at the end of the block."""

    name: str
    env: dict
    url: str = ""
    proc: Optional[subprocess.Popen] = None

    def start(self, wait_ready: bool = True, timeout: float = START_TIMEOUT) -> ServerProcess:
        port = free_port()
        self.url = f"{'https' if self.env.get('SSL_CERTFILE') else 'http'}://127.0.0.1:{port}"   # TLS: Hypercorn
        LOGS.mkdir(exist_ok=True)
        data_dir = tempfile.mkdtemp(prefix=f"{self.name}-data-", dir=LOGS)   # custom voices: fresh unless given
        env = {**os.environ, **BASE_ENV, "HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": data_dir, **self.env}
        env.pop("TTS_URL", None)
        self.log_path = LOGS / f"{self.name}{WORKER_SUFFIX}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - stays open for the life of the process
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                state = httpx.get(self.url + "/health", timeout=10, verify=False).json()["model_state"]
            except httpx.HTTPError:
                return False
            return not wait_ready or state in ("ready", "failed")

        try:
            wait_for(up, f"server {self.name} to load its model", timeout=timeout, interval=0.2)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.log()}") from None
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=CLIENT_TIMEOUT, verify=False).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(name: str, **env: str) -> ServerProcess:
    """A server of its own for a configuration no other test shares: `with start_server("auth", API_KEY=...) as p:`."""
    return ServerProcess(name, env).start()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The main test server: the tiny 0.6B CustomVoice checkpoint with default settings, or the server at TTS_URL."""
    if os.environ.get("TTS_URL"):
        yield ServerProcess("external", {}, url=os.environ["TTS_URL"].rstrip("/"))
        return
    with start_server("main", MODEL_ID=checkpoint("tiny-0.6B-CustomVoice")) as proc:
        yield proc


@pytest.fixture(scope="session")
def url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(url: str):
    """The real OpenAI SDK, pointed at the server."""
    from openai import OpenAI

    with OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=CLIENT_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c:
        yield c


def wait_for_idle(http: httpx.Client) -> dict:
    """Wait until the server's queue is empty and its model idle; return /health then."""
    def idle() -> Optional[dict]:
        health = http.get("/health").json()
        return health if health["queue_depth"] == 0 and not health["busy"] else None
    return wait_for(idle, "an empty queue and an idle model")


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
