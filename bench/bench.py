#!/usr/bin/env python3
"""Benchmarks of a live server (not tests: nothing here asserts on time). Each scenario starts its own server
process with the settings it compares, so a figure and its baseline come from the same run on the same machine.

    .venv/bin/python bench/bench.py core     [--model DIR]   # startup, load, request latency, /health during work
    .venv/bin/python bench/bench.py stream   [--model DIR]   # time to first audio and total, streamed vs buffered
    .venv/bin/python bench/bench.py load     [--model DIR]   # throughput and TTFA vs concurrency, batched vs serial
    .venv/bin/python bench/bench.py arrivals [--model DIR]   # staggered arrivals: continuous vs static vs serial
    .venv/bin/python bench/bench.py overload [--model DIR]   # 200 requests from 50 clients, MAX_QUEUE_DEPTH=8
    .venv/bin/python bench/bench.py voices   [--model DIR]   # clone-prompt cost; the store on SQLite vs PostgreSQL
    .venv/bin/python bench/bench.py engine   [--model DIR]   # the decode step in process: library-driven vs static
    .venv/bin/python bench/bench.py codec    [--model DIR]   # codec decode on the model thread vs its own thread
    .venv/bin/python bench/bench.py firstbyte [--model DIR]  # no stream_format: OpenAI's request (streamed) vs seed's
    .venv/bin/python bench/bench.py upload --baseline OLD/server.py  # a 60-minute FLAC upload: server memory and time
    .venv/bin/python bench/bench.py incremental [--rate 30]  # text at an LLM's pace: stream vs per sentence vs whole

--model defaults to the tiny checkpoint; build/checkpoints/random-0.6B-CustomVoice (tools/build_tiny_checkpoints.py
--full-size) has the real 0.6B cost. --url measures a server that is already running instead (core and stream).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "bench"))
from testkit import free_port  # noqa: E402

TINY = ROOT / "build" / "checkpoints" / "tiny-0.6B-CustomVoice"
SHORT = "Hello! How are you doing today?"
LONG = ("The committee met on Tuesday to review the proposal. After a long discussion, the members agreed to fund "
        "the first phase of the project, and asked for a detailed budget before the next meeting.")
BYTES_PER_SECOND = 48000   # 24 kHz int16 mono


@contextmanager
def running_server(env: dict, wait_for: str = "health", script: Path = ROOT / "server.py",
                   pid: Optional[list] = None) -> Iterator[tuple[str, float, float]]:
    """Start a server.py (this one unless `script`); yield (url, seconds until /health answered, seconds until the
    model was ready); its process id is appended to `pid` when given."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_FORMAT": "text", "LOG_LEVEL": "WARNING",
                **env}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - lives with the process
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    if pid is not None:
        pid.append(proc.pid)
    up = ready = None
    try:
        while time.monotonic() - started < 1800:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{Path(log.name).read_text()[-3000:]}")
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                up = up or time.monotonic() - started
                if wait_for == "health" or health["model_state"] in ("ready", "failed"):
                    ready = time.monotonic() - started if health["model_state"] == "ready" else None
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        yield url, up, ready
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(log.name)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def timed_request(client: httpx.AsyncClient, body: dict, path: str = "/v1/audio/speech") -> dict:
    """One request, streamed or not: status, time to first byte, total time, seconds of audio (PCM bodies)."""
    started = time.monotonic()
    first = None
    size = 0
    async with client.stream("POST", path, json=body) as r:
        async for chunk in r.aiter_raw():
            if chunk and first is None:
                first = time.monotonic() - started
            size += len(chunk)
        status = r.status_code
        retry_after = r.headers.get("retry-after")
    total = time.monotonic() - started
    return {"status": status, "ttfa": first if first is not None else total, "total": total,
            "audio_s": size / BYTES_PER_SECOND if status == 200 else 0.0, "retry_after": retry_after}


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ---- scenarios
async def health_during(url: str, body: dict) -> tuple[list[float], dict]:
    """Latency of /health sampled every 20 ms while one synthesis runs."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        work = asyncio.create_task(timed_request(client, body))
        samples = []
        await asyncio.sleep(0.05)
        while not work.done():
            t = time.monotonic()
            await client.get("/health")
            samples.append(time.monotonic() - t)
            await asyncio.sleep(0.02)
        return samples, await work


def scenario_core(args: argparse.Namespace) -> None:
    env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "false", "AUDIO_CACHE_MAX": "0", **args.env}
    with running_server(env) as (url, up, _):
        t = time.monotonic()
        first = httpx.post(url + "/v1/audio/speech", json={"input": SHORT, "voice": "alloy",
                                                           "response_format": "pcm"}, timeout=1800)
        first_total = time.monotonic() - t
        health = httpx.get(url + "/health").json()
        latencies = []
        for i in range(args.repeat):
            t = time.monotonic()
            r = httpx.post(url + "/v1/audio/speech", json={"input": SHORT, "voice": "alloy", "response_format": "wav",
                                                           "seed": i}, timeout=1800)
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - t)
        audio_s = (len(first.content)) / BYTES_PER_SECOND
        samples, work = asyncio.run(health_during(url, {"input": LONG, "voice": "alloy", "response_format": "pcm"}))
    rows = [
        ["process start -> /health answers", fmt(up), "s"],
        ["model load (first request, from /health load_seconds)", fmt(health.get("load_seconds")), "s"],
        ["first request, load + warm-up + synthesis", fmt(first_total), "s"],
        [f"short request ({len(SHORT)} chars, {audio_s:.2f}s audio, wav), p50 of {args.repeat}",
         fmt(statistics.median(latencies)), "s"],
        ["  same, min / max", f"{fmt(min(latencies))} / {fmt(max(latencies))}", "s"],
        [f"/health during a {work['total']:.1f}s synthesis, p50 ({len(samples)} samples)",
         fmt(statistics.median(samples) * 1000, 1), "ms"],
        ["  same, p95 / max", f"{fmt(pct(samples, 95) * 1000, 1)} / {fmt(max(samples) * 1000, 1)}", "ms"],
    ]
    table(f"core: {args.model} ({health.get('device')}, {health.get('dtype')})", ["measure", "value", "unit"], rows)


def scenario_stream(args: argparse.Namespace) -> None:
    env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0", **args.env}

    async def measure(url: str) -> list[list]:
        rows = []
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            await timed_request(client, {"input": SHORT, "voice": "alloy", "response_format": "pcm"})  # warm
            for name, text in (("short", SHORT), ("long", LONG)):
                results = {}
                for mode, extra in (("buffered", {}), ("streamed", {"stream_format": "audio"})):
                    runs = [await timed_request(client, {"input": text, "voice": "alloy", "response_format": "pcm",
                                                         "seed": i, **extra}) for i in range(args.repeat)]
                    results[mode] = runs
                b, s = results["buffered"], results["streamed"]
                audio = statistics.median(r["audio_s"] for r in s)
                s_ttfa = statistics.median(r["ttfa"] for r in s)
                s_total = statistics.median(r["total"] for r in s)
                rows.append([name, len(text), f"{audio:.2f}", fmt(statistics.median(r["ttfa"] for r in b)),
                             fmt(statistics.median(r["total"] for r in b)), fmt(s_ttfa), fmt(s_total),
                             f"{100 * s_ttfa / s_total:.1f}%", f"{audio / s_total:.2f}"])
        return rows

    with running_server(env, wait_for="ready") as (url, _, _):
        rows = asyncio.run(measure(url))
    table(f"stream: {args.model}, median of {args.repeat} runs (seconds; RTF = audio s / wall s)",
          ["input", "chars", "audio_s", "buf_first", "buf_total", "str_first", "str_total", "first/total", "RTF"],
          rows)


def scenario_load(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    async def measure(url: str, concurrency: int) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            bodies = [{"input": f"{SHORT} Request {i}.", "voice": "alloy", "response_format": "pcm",
                       "stream_format": "audio"} for i in range(concurrency * args.rounds)]
            started = time.monotonic()
            results = []
            for r in range(args.rounds):
                batch = bodies[r * concurrency:(r + 1) * concurrency]
                results += await asyncio.gather(*(timed_request(client, b) for b in batch))
            wall = time.monotonic() - started
        ok = [r for r in results if r["status"] == 200]
        return {"throughput": sum(r["audio_s"] for r in ok) / wall, "p50": pct([r["ttfa"] for r in ok], 50),
                "p95": pct([r["ttfa"] for r in ok], 95), "errors": len(results) - len(ok)}

    rows = []
    for label, batch in (("batched", str(args.batch)), ("serial", "1")):
        env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0", "MAX_BATCH_SIZE": batch,
               "MAX_QUEUE_DEPTH": "0", **args.env}
        with running_server(env, wait_for="ready") as (url, _, _):
            asyncio.run(measure(url, 1))  # warm
            for c in concurrencies:
                m = asyncio.run(measure(url, c))
                rows.append([label, batch, c, f"{m['throughput']:.2f}", fmt(m["p50"]), fmt(m["p95"]), m["errors"]])
    table(f"load: {args.model}, {args.rounds} rounds per concurrency (throughput = audio s per wall s)",
          ["mode", "MAX_BATCH_SIZE", "clients", "throughput", "ttfa_p50", "ttfa_p95", "errors"], rows)
    by_key = {(r[0], r[2]): float(r[3]) for r in rows}
    for c in concurrencies:
        print(f"  concurrency {c}: batched / serial throughput = {by_key[('batched', c)] / by_key[('serial', c)]:.2f}x")


def scenario_arrivals(args: argparse.Namespace) -> None:
    """Clients that send their next request as soon as the previous one ends (no rounds), short and long inputs
    mixed, so requests keep arriving while others generate: continuous batching against static batching
    (CONTINUOUS_BATCHING=false: a request waits for the running batch to finish) and the serial server."""
    clients = max(int(c) for c in args.concurrency.split(","))

    async def measure(url: str) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            async def one_client(i: int) -> list[dict]:
                results = []
                for k in range(args.rounds):
                    text = (SHORT, LONG)[(i + k) % 2]
                    body = {"input": f"{text} ({i}.{k})", "voice": "alloy", "response_format": "pcm",
                            "stream_format": "audio"}
                    results.append({**await timed_request(client, body), "short": text == SHORT})
                return results

            started = time.monotonic()
            results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in rs]
            wall = time.monotonic() - started
        ok = [r for r in results if r["status"] == 200]
        short = [r["ttfa"] for r in ok if r["short"]]
        return {"throughput": sum(r["audio_s"] for r in ok) / wall, "p50": pct([r["ttfa"] for r in ok], 50),
                "p95": pct([r["ttfa"] for r in ok], 95), "short_p95": pct(short, 95),
                "total_p50": pct([r["total"] for r in ok], 50), "errors": len(results) - len(ok)}

    rows = []
    for label, extra in (("continuous", {"MAX_BATCH_SIZE": str(args.batch)}),
                         ("static", {"MAX_BATCH_SIZE": str(args.batch), "CONTINUOUS_BATCHING": "false"}),
                         ("serial", {"MAX_BATCH_SIZE": "1"})):
        env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0", "MAX_QUEUE_DEPTH": "0",
               **extra, **args.env}
        with running_server(env, wait_for="ready") as (url, _, _):
            m = asyncio.run(measure(url))
            rows.append([label, extra["MAX_BATCH_SIZE"], f"{m['throughput']:.2f}", fmt(m["p50"]), fmt(m["p95"]),
                         fmt(m["short_p95"]), fmt(m["total_p50"]), m["errors"]])
    table(f"arrivals: {args.model}, {clients} clients x {args.rounds} requests each, short and long inputs "
          "alternating (throughput = audio s per wall s; times in s)",
          ["mode", "MAX_BATCH_SIZE", "throughput", "ttfa_p50", "ttfa_p95", "short_ttfa_p95", "total_p50", "errors"],
          rows)


def scenario_overload(args: argparse.Namespace) -> None:
    env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "MAX_QUEUE_DEPTH": "8", "AUDIO_CACHE_MAX": "0",
           **args.env}

    async def run(url: str) -> tuple[list[dict], list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=100)) as client:
            queue = list(range(200))
            results: list[dict] = []
            health_latency: list[float] = []

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    results.append(await timed_request(client, {"input": f"Request {i}.", "voice": "alloy",
                                                                "response_format": "pcm"}))

            async def watch() -> None:
                while queue or len(results) < 200:
                    t = time.monotonic()
                    await client.get("/health", timeout=10)
                    health_latency.append(time.monotonic() - t)
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            await asyncio.gather(*(worker() for _ in range(50)))
            watcher.cancel()
            return results, health_latency

    with running_server(env, wait_for="ready") as (url, _, _):
        started = time.monotonic()
        results, health = asyncio.run(run(url))
        wall = time.monotonic() - started
        final = httpx.get(url + "/health").json()
    statuses: dict = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    with_retry = sum(1 for r in results if r["status"] in (429, 503) and r["retry_after"])
    table("overload: 200 requests from 50 concurrent clients, MAX_QUEUE_DEPTH=8", ["measure", "value"], [
        ["wall time", f"{wall:.1f}s"], ["statuses", statuses],
        ["503/429 carrying Retry-After", f"{with_retry} of {statuses.get(503, 0) + statuses.get(429, 0)}"],
        ["5xx other than 503", sum(v for k, v in statuses.items() if k >= 500 and k != 503)],
        ["/health p50 / max during the run", f"{pct(health, 50) * 1000:.1f} / {max(health) * 1000:.1f} ms"],
        ["queue depth after the run", final["queue_depth"]],
    ])


def scenario_voices(args: argparse.Namespace) -> None:
    """Cloning costs: computing a voice prompt from a 10 s reference, and speech with a cached prompt."""
    import io

    import numpy as np
    import soundfile

    base = args.base or str(Path(args.model).parent / Path(args.model).name.replace("CustomVoice", "Base"))
    t = np.arange(24000 * 10) / 24000
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))), 24000,
                    format="WAV")
    reference = buffer.getvalue()
    env = {"MODEL_ID": args.model, "BASE_MODEL_ID": base, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0",
           "DATA_DIR": tempfile.mkdtemp(prefix="bench-voices-"), **args.env}
    rows = []
    with running_server(env, wait_for="ready") as (url, _, _), httpx.Client(base_url=url, timeout=1800) as c:
        def clone(ref_text: Optional[str]) -> float:
            started = time.monotonic()
            data = {"input": SHORT, "seed": "1", "response_format": "pcm"} | ({"ref_text": ref_text} if ref_text
                                                                               else {})
            r = c.post("/v1/audio/speech/clone", files={"file": ("r.wav", reference, "audio/wav")}, data=data)
            assert r.status_code == 200, r.text
            return time.monotonic() - started

        rows.append(["/clone, first call: Base model load + x-vector prompt + speech", fmt(clone(None))])
        for mode, text in (("x-vector", None), ("in-context", "A reference sentence that the sample says.")):
            c.post("/cache/clear")
            computed = clone(text)
            cached = statistics.median(clone(text) for _ in range(args.repeat))
            rows.append([f"/clone {mode}: prompt computed + speech", fmt(computed)])
            rows.append([f"/clone {mode}: prompt cached + speech (p50 of {args.repeat})", fmt(cached)])
            rows.append([f"  -> computing a {mode} prompt from 10 s of audio", fmt(computed - cached)])
        def builtin() -> float:
            started = time.monotonic()
            r = c.post("/v1/audio/speech", json={"input": SHORT, "voice": "alloy", "seed": 1,
                                                 "response_format": "pcm"})
            assert r.status_code == 200, r.text
            return time.monotonic() - started

        rows.append([f"built-in voice, same text (p50 of {args.repeat})",
                     fmt(statistics.median(builtin() for _ in range(args.repeat)))])
    table(f"voices: {args.model} + {base} ({len(SHORT)} chars; seconds)", ["measure", "seconds"], rows)
    store_latency(args, env, reference)


def store_latency(args: argparse.Namespace, env: dict, reference: bytes) -> None:
    """The voice store on SQLite (DATA_DIR) and on PostgreSQL (DATABASE_URL, a private server started here), side by
    side: create (prompt computed + row written), look up, speak (the row looked up, the prompt cached or read from
    the store), delete. p50 of --repeat rounds, in milliseconds."""
    sys.path.insert(0, str(ROOT / "tools"))
    from pg_cluster import PostgresCluster

    def measure(url: str) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {}

        def timed(name: str, method: str, path: str, **kw) -> httpx.Response:
            started = time.monotonic()
            r = c.request(method, path, **kw)
            times.setdefault(name, []).append(time.monotonic() - started)
            assert r.status_code == 200, r.text
            return r

        with httpx.Client(base_url=url, timeout=1800) as c:
            consent = timed("consent create", "POST", "/v1/audio/voice_consents",
                            data={"name": "c", "language": "en-US"}, files={"recording": ("c.wav", reference)}).json()
            speech = {"input": SHORT, "seed": 1, "response_format": "pcm"}
            for i in range(args.repeat + 1):                  # round 0 loads the Base model: not counted
                voice = timed("voice create (prompt + row)", "POST", "/v1/audio/voices",
                              data={"name": f"v{i}", "consent": consent["id"]},
                              files={"audio_sample": ("s.wav", reference)}).json()
                timed("voice lookup (GET)", "GET", f"/v1/audio/voices/{voice['id']}")
                timed("voice list (GET)", "GET", "/v1/audio/voices")
                timed("speak, prompt cached", "POST", "/v1/audio/speech", json={**speech, "voice": voice["id"]})
                c.post("/cache/clear")
                timed("speak, prompt from the store", "POST", "/v1/audio/speech",
                      json={**speech, "voice": voice["id"]})
                timed("voice delete", "DELETE", f"/v1/audio/voices/{voice['id']}")
        return {name: values[1:] if len(values) > 1 else values for name, values in times.items()}

    results = {}
    with running_server({**env, "DATA_DIR": tempfile.mkdtemp(prefix="bench-sqlite-")}, wait_for="ready") as (url, _, _):
        results["SQLite"] = measure(url)
    with PostgresCluster() as pg, running_server({**env, "DATABASE_URL": pg.url}, wait_for="ready") as (url, _, _):
        results["PostgreSQL"] = measure(url)
    names = list(results["SQLite"])
    table(f"voice store, SQLite vs PostgreSQL (p50 of {args.repeat}, ms)", ["operation", *results],
          [[name, *(f"{statistics.median(r[name]) * 1000:.1f}" for r in results.values())] for name in names])


def scenario_engine(args: argparse.Namespace) -> None:
    """Per frame: operator dispatches and host synchronisations of the library-driven step (qwen_tts's generate())
    and of the static step, then ms per step at 1, 4 and 16 rows, on --model and (when built) the full-size
    checkpoint, with fewer steps there. Also what a row leaving costs: a compacting move vs the wider step a free
    list would run."""
    import engine_bench as eb

    full = ROOT / "build" / "checkpoints" / "random-0.6B-CustomVoice"
    models = [(args.model, args.steps)] + ([(str(full), args.full_steps)] if full.is_dir() and args.full_steps else [])
    counts, timings, leaves = [], [], []
    for model, steps in models:
        name = Path(model).name
        manager = eb.load(model, args.dtype, 16, args.kv_cache_tokens, graphs=False)
        try:
            old = eb.library_steps(manager, 1, WARM + steps, audit=True)[WARM:]
            new = eb.static_steps(manager, 1, max(2, steps // 2), audit=True)
            counts.append([name, *(f"{eb.median(records, key):.0f}" for records in (old, new)
                                   for key in ("dispatches", "views", "syncs"))])
            for rows in (1, 4, 16):
                old = eb.library_steps(manager, rows, WARM + steps)[WARM:]
                new = eb.static_steps(manager, rows, steps)
                timings.append([name, rows, fmt(eb.median(old, "seconds") * 1000, 1),
                                fmt(eb.median(new, "seconds") * 1000, 1)])
            four, eight = (eb.median(eb.static_steps(manager, rows, steps), "seconds") for rows in (4, 8))
            length = min(500, args.kv_cache_tokens)
            leaves.append([name, fmt(eb.move_seconds(manager, length) * 1000, 2), fmt(four * 1000, 1),
                           fmt(eight * 1000, 1)])
        finally:
            manager.unload()
    table("engine: per frame, steady state (1 row)",
          ["model", "library: dispatches", "of them views", "host syncs", "static: dispatches", "of them views",
           "host syncs"], counts)
    table(f"engine: ms per decode step (median; {args.dtype}, torch threads {__import__('torch').get_num_threads()})",
          ["model", "rows", "library-driven", "static"], timings)
    table("engine: a row leaving -- compaction moves the last row into the hole; a free list instead steps over "
          "every slot up to the highest live one",
          ["model", f"move of {min(500, args.kv_cache_tokens)} positions, ms", "step: 4 rows in slots 0-3, ms",
           "step: 4 live rows spread over 8 slots, ms"], leaves)


def scenario_codec(args: argparse.Namespace) -> None:
    """Codec decode on the model thread (CODEC_THREAD=false, as before) vs on its own thread, on one loaded model,
    alternating: the model thread's ms per step (mean, worst) and the rows' throughput, at 1 and 4 rows."""
    import engine_bench as eb

    manager = eb.load(args.model, args.dtype, 4, args.kv_cache_tokens, graphs=False)
    results: dict = {(rows, threaded): [] for rows in (1, 4) for threaded in (False, True)}
    try:
        for _ in range(args.repeat):
            for rows in (1, 4):
                for threaded in (False, True):
                    results[rows, threaded].append(eb.codec_batch(manager, rows, args.codec_frames, threaded))
    finally:
        manager.unload()
    table(f"codec: decode on the model thread vs its own thread ({Path(args.model).name}, {args.dtype}, "
          f"{args.codec_frames} frames a row, chunks 4 then 16, median of {args.repeat})",
          ["rows", "codec", "model thread ms/step, mean", "worst", "rows' frames/s", "audio s/s"],
          [[rows, "own thread" if threaded else "model thread",
            *(fmt(statistics.median(r[key] for r in runs), 1) for key in ("step_ms_mean", "step_ms_max",
                                                                         "frames_per_s", "audio_s_per_s"))]
           for (rows, threaded), runs in results.items()])


WARM = 2


TEN_SECONDS = "The weather today is mild, with a light breeze from the west."   # 127 frames: 10.2 s on the tiny model


def scenario_firstbyte(args: argparse.Namespace) -> None:
    """POST /v1/audio/speech without stream_format, a 10-second utterance: an OpenAI request (`model` given), which
    now streams, beside the seed's request (no `model`), which gets the whole file as every request did before;
    alternating on one server, so both come from the same run."""
    env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0", **args.env}
    modes = (("whole file (no model: before)", {}), ("streamed (model: now)", {"model": "tts-1"}))

    async def measure(url: str) -> list[list]:
        rows = []
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            await timed_request(client, {"input": SHORT, "voice": "alloy", "response_format": "pcm"})  # warm
            for audio_format in ("pcm", "mp3"):
                runs: dict[str, list[dict]] = {name: [] for name, _ in modes}
                for i in range(args.repeat):
                    for name, extra in modes:
                        body = {"input": TEN_SECONDS, "voice": "alloy", "response_format": audio_format, "seed": i}
                        runs[name].append(await timed_request(client, {**body, **extra}))
                for name, _ in modes:
                    first = statistics.median(r["ttfa"] for r in runs[name])
                    total = statistics.median(r["total"] for r in runs[name])
                    audio = statistics.median(r["audio_s"] for r in runs[name]) if audio_format == "pcm" else None
                    rows.append([audio_format, name, fmt_or_dash(audio), fmt(first), fmt(total),
                                 f"{100 * first / total:.1f}%"])
        return rows

    with running_server(env, wait_for="ready") as (url, _, _):
        rows = asyncio.run(measure(url))
    table(f"firstbyte: {args.model}, {len(TEN_SECONDS)} characters, median of {args.repeat} runs (seconds)",
          ["format", "request", "audio_s", "first_byte", "total", "first/total"], rows)


def fmt_or_dash(x: Optional[float]) -> str:
    return fmt(x, 2) if x is not None else "-"


def sixty_minute_flac() -> bytes:
    """Issue 10's decompression bomb: 60 minutes of 48 kHz mono (a constant) in a FLAC of a few hundred KB."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    output = io.BytesIO()
    with av.open(output, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=48000, layout="mono")
        second = np.full((1, 48000), 8000, np.int16)
        for start in range(0, 48000 * 3600, 48000):
            frame = av.AudioFrame.from_ndarray(second, format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return output.getvalue()


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def scenario_upload(args: argparse.Namespace) -> None:
    """The 60-minute FLAC sent to /v1/audio/speech/clone: the server's peak memory while it answers, and the time to
    its answer, for this server.py and (--baseline) another, e.g. `git show main:server.py > /tmp/main/server.py`."""
    bomb = sixty_minute_flac()
    base = args.base or str(Path(args.model).parent / Path(args.model).name.replace("CustomVoice", "Base"))
    env = {"MODEL_ID": args.model, "BASE_MODEL_ID": base, "PRELOAD_MODEL": "false", **args.env}
    rows = []
    for label, script in (("this server.py", ROOT / "server.py"), ("baseline", args.baseline)):
        if script is None:
            continue
        pid: list[int] = []
        env["DATA_DIR"] = tempfile.mkdtemp(prefix="bench-upload-")
        with running_server(env, script=Path(script), pid=pid) as (url, _, _):
            before_rss, before_peak = memory_kib(pid[0], "VmRSS"), memory_kib(pid[0], "VmHWM")
            started = time.monotonic()
            r = httpx.post(url + "/v1/audio/speech/clone", files={"file": ("bomb.flac", bomb, "audio/flac")},
                           data={"input": SHORT}, timeout=1800)
            seconds = time.monotonic() - started
            peak, after = memory_kib(pid[0], "VmHWM"), memory_kib(pid[0], "VmRSS")
        rows.append([label, r.status_code, (r.json().get("error") or {}).get("code", "-"), f"{seconds:.2f}",
                     f"{max(peak, before_peak) / 1024 - before_rss / 1024:.0f}", f"{(after - before_rss) / 1024:.0f}"])
    table(f"upload: a {len(bomb) / 1024:.0f} KiB FLAC that decodes to 60 minutes, POST /v1/audio/speech/clone",
          ["server", "status", "code", "answer_s", "peak_MiB_above_idle", "kept_MiB_after"], rows)


REPLY = ("Sure! The weather in Paris today is mild, with a light breeze from the west. Expect some clouds in the "
         "evening. Tomorrow looks sunnier, so it may be the better day for the gardens.")


def llm_tokens(text: str) -> list[str]:
    """Text cut the way an LLM writes it: words with their leading space, punctuation apart."""
    import re

    return re.findall(r"\s*\w+|\s*[^\w\s]+", text)


def playback(arrivals: list[tuple[float, float]]) -> dict:
    """Audio arriving as (time, seconds of audio) played from its first arrival: how long playback waited for audio
    (stalls after the first audio), as a listener would hear it."""
    start, played_until, stalls = arrivals[0][0], arrivals[0][0], []
    for at, seconds in arrivals:
        if at > played_until + 1e-3 and at > start:
            stalls.append(at - played_until)
        played_until = max(played_until, at) + seconds
    return {"stalls": len(stalls), "stall_s": sum(stalls), "max_stall": max(stalls, default=0.0)}


async def incremental_run(url: str, mode: str, tokens: list[str], rate: float, seed: int) -> dict:
    """One reply, written at `rate` tokens/s, spoken by one of: stream (the incremental form), per-sentence (one
    utterance per sentence as it completes, queued on the socket), whole (one utterance once all text is there)."""
    import json

    from websockets.asyncio.client import connect

    sentence_end = next(i for i, t in enumerate(tokens) if t.strip() in (".", "!", "?"))
    arrivals: list[tuple[float, float]] = []
    async with connect(url.replace("http", "ws", 1) + "/v1/audio/speech/ws", max_size=None) as ws:
        started = time.monotonic()
        sent: dict[int, float] = {}

        async def write() -> None:
            if mode == "stream":
                await ws.send(json.dumps({"event": "start", "voice": "alloy", "seed": seed}))
            sentence = ""
            for i, token in enumerate(tokens):
                await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
                sent[i] = time.monotonic()
                if mode == "stream":
                    await ws.send(json.dumps({"event": "text", "text": token}))
                sentence += token
                if mode == "per-sentence" and token.strip() in (".", "!", "?"):
                    await ws.send(json.dumps({"input": sentence.strip(), "voice": "alloy", "seed": seed}))
                    sentence = ""
            if mode == "stream":
                await ws.send(json.dumps({"event": "end"}))
            elif mode == "whole":
                await ws.send(json.dumps({"input": "".join(tokens).strip(), "voice": "alloy", "seed": seed}))
            elif sentence.strip():
                await ws.send(json.dumps({"input": sentence.strip(), "voice": "alloy", "seed": seed}))

        writer = asyncio.create_task(write())
        expected_done = 1 if mode != "per-sentence" else sum(t.strip() in (".", "!", "?") for t in tokens)
        done = 0
        while done < expected_done:
            message = await ws.recv()
            if isinstance(message, bytes):
                arrivals.append((time.monotonic(), len(message) / BYTES_PER_SECOND))
            elif json.loads(message).get("event") == "done":
                done += 1
            else:
                raise RuntimeError(message)
        await writer
        total = time.monotonic() - started
    return {"after_sentence": arrivals[0][0] - sent[sentence_end], "first": arrivals[0][0] - started,
            "text_done": sent[len(tokens) - 1] - started, "total": total,
            "audio_s": sum(a for _, a in arrivals), **playback(arrivals)}


def scenario_incremental(args: argparse.Namespace) -> None:
    """A reply written at an LLM's pace (--rate tokens/s) over the WebSocket: the incremental-text stream against
    one utterance per sentence and the whole text sent at once (the baseline), on one server."""
    tokens = llm_tokens(REPLY)
    env = {"MODEL_ID": args.model, "PRELOAD_MODEL": "true", "AUDIO_CACHE_MAX": "0", **args.env}
    modes = ("stream", "per-sentence", "whole")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with running_server(env, wait_for="ready") as (url, _, _):
        asyncio.run(incremental_run(url, "whole", llm_tokens(SHORT), 1000, 0))          # warm
        for i in range(args.repeat):                    # the modes take turns: a drifting load hits them alike
            for mode in modes:
                runs[mode].append(asyncio.run(incremental_run(url, mode, tokens, args.rate, i)))
    rows = []
    for mode in modes:
        def med(key: str, mode: str = mode) -> float:
            return statistics.median(r[key] for r in runs[mode])

        rows.append([mode, fmt(med("after_sentence")), fmt(med("first")), fmt(med("text_done")), fmt(med("total")),
                     f"{med('audio_s'):.2f}", f"{med('audio_s') / (med('total') - med('first')):.2f}",
                     f"{med('stalls'):g}", fmt(med("stall_s")), fmt(med("max_stall"))])
    table(f"incremental: {args.model}, a {len(REPLY)}-character reply as {len(tokens)} tokens at {args.rate:g} "
          f"tokens/s, median of {args.repeat} runs (seconds; stalls: playback waiting for audio after the first)",
          ["mode", "sentence1_end->audio", "first_audio", "text_written", "total", "audio_s", "rtf", "stalls",
           "stall_s", "max_stall"], rows)
    print("  rtf: audio seconds per wall second after the first audio; below 1 the model cannot keep up and playback "
          "stalls whatever the protocol")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["core", "stream", "load", "arrivals", "overload", "voices", "engine",
                                             "codec", "firstbyte", "upload", "incremental"])
    parser.add_argument("--model", default=str(TINY))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base", help="voices: the Base model (default: --model with CustomVoice -> Base)")
    parser.add_argument("--baseline", help="upload: a server.py to compare with (e.g. main's)")
    parser.add_argument("--rate", type=float, default=30.0, help="incremental: tokens per second the LLM writes")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server, repeatable")
    parser.add_argument("--steps", type=int, default=12, help="engine: steps measured per figure")
    parser.add_argument("--full-steps", type=int, default=3, help="engine: steps on the full-size model (0: skip)")
    parser.add_argument("--dtype", default="float32", help="engine: the model's dtype")
    parser.add_argument("--kv-cache-tokens", type=int, default=256, help="engine: KV_CACHE_TOKENS")
    parser.add_argument("--codec-frames", type=int, default=100, help="codec: frames each row generates")
    args = parser.parse_args()
    args.env = dict(kv.split("=", 1) for kv in args.env)
    {"core": scenario_core, "stream": scenario_stream, "load": scenario_load, "arrivals": scenario_arrivals,
     "overload": scenario_overload, "voices": scenario_voices, "engine": scenario_engine, "codec": scenario_codec,
     "firstbyte": scenario_firstbyte, "upload": scenario_upload,
     "incremental": scenario_incremental}[args.scenario](args)


if __name__ == "__main__":
    main()
