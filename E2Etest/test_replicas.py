"""Several replicas, for real on one machine: a PostgreSQL server started here (tools/pg_cluster.py), two server
replicas on the tiny checkpoint sharing it (DATABASE_URL), and HAProxy in front (least connections, health checks
on /ready, retries of refused and 503 requests on the other replica; `X-Replica` names the replica that answered).

Through the balancer: a voice created once speaks on both replicas and, deleted, is a 404 on both (the prompt cache
of the other replica does not keep it alive); one name created on both replicas at once gives one voice and one 409;
a replica that gets SIGTERM while requests keep coming loses none of them and finishes its stream in flight.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_drain import TEXT, full_pcm_bytes
from test_voices import wav

from conftest import LOGS, ServerProcess, checkpoint, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]   # the bound only stops a hang on a slow machine
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CONFIG = """
global
    maxconn 512
    log stdout format raw local0 info      # one line per request in haproxy.log: a lost one says how it ended
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 30m
    timeout server 30m
    timeout check 60s          # a slow /ready on a busy machine is no failure; a draining 503 is one at once
    retries 3
    option redispatch 1
    # A 503 from a replica that is draining (or whose queue is full) is sent before any work: safe to replay.
    retry-on conn-failure empty-response 503
frontend tts
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance leastconn
    option httpchk GET /ready
    http-check expect status 200
    default-server inter 300ms fastinter 100ms downinter 500ms fall 1 rise 2
    http-response set-header X-Replica %[srv_name]
{servers}
"""


class Balancer:
    """HAProxy in the foreground, its configuration and log under E2Etest/.logs."""

    def __init__(self, replicas: dict[str, ServerProcess]):
        if not os.access(HAPROXY, os.X_OK):
            if os.environ.get("CI"):
                pytest.fail("haproxy is not installed")
            pytest.skip("haproxy is not installed (scripts/install.sh --dev installs it as root)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server {name} {r.url.removeprefix('http://')} check" for name, r in replicas.items())
        LOGS.mkdir(exist_ok=True)
        self.config = LOGS / "haproxy.cfg"
        self.config.write_text(HAPROXY_CONFIG.format(port=self.port, servers=servers))
        self.log = open(LOGS / "haproxy.log", "w")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_for(self, names: set[str], timeout: float = 1200) -> None:
        """Until every replica in `names` has answered /ready through the balancer."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while seen < names:
            assert self.proc.poll() is None, (LOGS / "haproxy.log").read_text()
            assert time.monotonic() < deadline, f"replicas seen through the balancer: {seen}"
            try:
                r = httpx.get(self.url + "/ready", timeout=30)
                if r.status_code == 200:
                    seen.add(r.headers["x-replica"])
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Balancer, dict[str, ServerProcess]]]:
    from pg_cluster import PostgresCluster, postgres_bindir

    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed")
        pytest.skip("PostgreSQL is not installed (scripts/install.sh --dev installs it as root)")
    with PostgresCluster() as pg:
        env = {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice"), "DATABASE_URL": pg.url, "AUDIO_CACHE_MAX": "0",
               "DRAIN_TIMEOUT": "1200", "MAX_BATCH_SIZE": "4", "IDLE_TIMEOUT": "0",
               "REQUEST_TIMEOUT": "3600"}                    # upper bounds that only stop a hang
        replicas = {name: ServerProcess(f"replica-{name}", env) for name in ("r1", "r2")}
        try:
            for replica in replicas.values():        # loading together; the balancer waits for both to be ready
                replica.start(wait_ready=False)
            balancer = Balancer(replicas)
            try:
                balancer.wait_for(set(replicas))
                yield balancer, replicas
            finally:
                balancer.stop()
        finally:
            for replica in replicas.values():
                replica.stop()


def speak(url: str, voice: object) -> httpx.Response:
    return httpx.post(url + "/v1/audio/speech", timeout=1200, json={"input": "Hi.", "voice": voice,
                                                                    "response_format": "pcm", "seed": 2})


def create_voice(url: str, name: str, consent_id: str) -> httpx.Response:
    return httpx.post(url + "/v1/audio/voices", timeout=1200, data={"name": name, "consent": consent_id},
                      files={"audio_sample": ("s.wav", wav(3), "audio/wav")})


@pytest.fixture(scope="module")
def consent_id(cluster) -> str:
    balancer, _ = cluster
    r = httpx.post(balancer.url + "/v1/audio/voice_consents", data={"name": "Consent", "language": "en-US"},
                   files={"recording": ("c.wav", wav(3), "audio/wav")}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_voice_made_through_the_balancer_speaks_on_both_replicas_and_is_deleted_from_both(cluster, consent_id):
    balancer, replicas = cluster
    created = create_voice(balancer.url, "Everywhere", consent_id)
    assert created.status_code == 200, created.text
    voice_id = created.json()["id"]
    answered: set[str] = set()
    for _ in range(20):                                   # leastconn spreads sequential requests over both
        r = speak(balancer.url, {"id": voice_id})
        assert r.status_code == 200 and len(r.content) > 0, r.text
        answered.add(r.headers["x-replica"])
        if answered == set(replicas):
            break
    assert answered == set(replicas)
    for replica in replicas.values():                     # and each replica directly, by name too
        assert speak(replica.url, "everywhere").status_code == 200

    deleted = httpx.delete(balancer.url + f"/v1/audio/voices/{voice_id}", timeout=600)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    for name, replica in replicas.items():                # both had its prompt cached: neither serves it now
        r = speak(replica.url, {"id": voice_id})
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found", (name, r.text)
        assert httpx.get(replica.url + f"/v1/audio/voices/{voice_id}", timeout=60).status_code == 404
        assert speak(replica.url, "everywhere").status_code == 400                  # unknown name
    print(f"\nreplicas: voice created on {created.headers['x-replica']}, spoken on {sorted(answered)}, deleted on "
          f"{deleted.headers['x-replica']}, 404 on both")


def test_one_name_created_on_both_replicas_at_once_gives_one_voice_and_one_conflict(cluster, consent_id):
    balancer, replicas = cluster
    for attempt in range(5):                              # until the two requests land on different replicas
        name = f"Twin{attempt}"
        barrier = threading.Barrier(2)
        results: list[httpx.Response] = []

        def create(voice_name: str, barrier: threading.Barrier, results: list) -> None:
            barrier.wait()
            results.append(create_voice(balancer.url, voice_name, consent_id))

        threads = [threading.Thread(target=create, args=(name, barrier, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
        conflict = next(r for r in results if r.status_code == 409)
        assert conflict.json()["error"]["code"] == "voice_name_taken"
        if {r.headers["x-replica"] for r in results} == set(replicas):
            break
    else:
        pytest.fail("the balancer never sent the two creates to different replicas")
    listed = [v for v in httpx.get(balancer.url + "/v1/audio/voices", timeout=60).json()["voices"]
              if v.get("kind") == "custom" and v["name"] == name]
    assert len(listed) == 1
    print(f"\nreplicas: {name!r} created on both at once: 200 from "
          f"{next(r for r in results if r.status_code == 200).headers['x-replica']}, 409 from "
          f"{conflict.headers['x-replica']}")


class Traffic(threading.Thread):
    """A client sending one request after another through the balancer until told to stop; every status kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.statuses, self.replicas = url, [], []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                r = speak(self.url, "alloy")
                self.statuses.append(r.status_code)
                self.replicas.append(r.headers.get("x-replica"))
            except httpx.HTTPError as exc:
                self.statuses.append(repr(exc))


def test_sigterm_to_one_replica_loses_no_request_and_its_stream_finishes_whole(cluster):
    balancer, replicas = cluster
    pcm, ending, first_audio, replica_of_stream = b"", None, threading.Event(), []

    def stream() -> None:
        nonlocal pcm, ending
        body = {"input": TEXT, "voice": "alloy", "response_format": "pcm", "stream_format": "sse", "seed": 1}
        with httpx.stream("POST", balancer.url + "/v1/audio/speech", json=body, timeout=1200) as r:
            replica_of_stream.append(r.headers["x-replica"])
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "speech.audio.delta":
                        pcm += base64.b64decode(event["audio"])
                        first_audio.set()
                    else:
                        ending = event
        first_audio.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    assert first_audio.wait(1200) and replica_of_stream
    leaving = replicas[replica_of_stream[0]]
    traffic = [Traffic(balancer.url) for _ in range(2)]
    for t in traffic:
        t.start()
    wait_for(lambda: sum(len(t.statuses) for t in traffic) >= 2, "requests to flow before the signal", interval=0.1)
    before = sum(len(t.statuses) for t in traffic)
    signalled = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    leaving.proc.wait(1800)
    exit_seconds = time.monotonic() - signalled
    during = sum(len(t.statuses) for t in traffic) - before
    wait_for(lambda: sum(len(t.statuses) for t in traffic) >= before + during + 2,
             "requests to go on flowing after the replica left", interval=0.1)
    for t in traffic:
        t.stopping.set()
    for t in traffic:
        t.join(1200)
    streamer.join(1200)

    statuses = [s for t in traffic for s in t.statuses]
    lost = [(i, s) for i, s in enumerate(statuses) if s != 200]
    assert statuses and not lost, (len(statuses), lost)                    # none lost: every one 200
    assert ending is not None and ending["type"] == "speech.audio.done"
    assert len(pcm) == full_pcm_bytes(TEXT)                                 # the stream in flight, whole
    log = Path(leaving.log_path).read_text(errors="replace")
    assert "Traceback" not in log and "draining:" in log
    served = {name: sum(1 for t in traffic for r in t.replicas if r == name) for name in replicas}
    print(f"\nreplicas: SIGTERM to {replica_of_stream[0]} with 1 stream and 2 clients in flight; "
          f"{len(statuses)} requests ({during} completed while it drained), all 200 {served}; its stream finished "
          f"whole; it exited {exit_seconds:.1f}s after SIGTERM")
