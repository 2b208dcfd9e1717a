#!/usr/bin/env python3
"""The GPU benchmark of issue 12, in one process: builds the full-size random checkpoint from the real configs
(tools/qwen3-tts-configs; random weights never end a row, so every length is its budget), then measures and writes
JSON to $OUT/gpu_bench.json (or --out):

  steps     ms per decode step at 1/4/16 rows: library-driven (qwen_tts's generate()), static eager, static graphs
  capture   graph capture seconds and graph-pool bytes; decode-cache bytes
  codec     ms of one streaming-decode chunk (STREAM_FIRST_CHUNK_FRAMES, STREAM_CHUNK_FRAMES frames)
  codec_thread  at 1/4/16 rows, codec decode on the model thread vs its own thread (CODEC_THREAD): the model
            thread's ms per step (mean, worst) and the rows' frames and audio seconds per second
  single    one stream at a time, 10 times: first audio p50/p95 and real-time factor, graphs on and off
  streams   16 streams arriving STAGGER seconds apart: audio seconds per second, the worst stream's real-time
            factor, p95 first audio, graphs on and off

On a GPU machine (bench/gpu_wheels.sh prepares what it carries; bench/gpu_run.sh is the command line):
    python3 bench/gpu_bench.py
On any machine, end to end on the tiny checkpoint (what CI-less checking of this script runs):
    .venv/bin/python bench/gpu_bench.py --small
Nothing here asserts on time: it prints and records what it measured. Each phase's figures are flushed to the JSON
as soon as they exist, so a run stopped by its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tools")]

import engine_bench as eb  # noqa: E402
import torch  # noqa: E402

import server  # noqa: E402

SPEECH = "The committee met on Tuesday to review the proposal, and agreed to fund the first phase of the project."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Report:
    """The JSON result, rewritten after every phase."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()
        print(f"== {key}: {json.dumps(value)}", flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))


def build_checkpoint(small: bool) -> str:
    from build_tiny_checkpoints import build_all

    name = "tiny-0.6B-CustomVoice" if small else "random-0.6B-CustomVoice"
    started = time.monotonic()
    [path] = build_all(ROOT / "build" / "checkpoints", [name])
    print(f"checkpoint {path} in {time.monotonic() - started:.1f}s", flush=True)
    return str(path)


def measure_steps(model: str, args: argparse.Namespace, report: Report) -> None:
    """ms per step, library-driven vs static eager vs static graphs; capture cost; one codec chunk."""
    steps, rows_list, results = args.steps, (1, 4, 16), {}
    eager = eb.load(model, args.dtype, 16, args.kv_cache_tokens, graphs=False)
    try:
        results["library_ms"] = {rows: 1000 * eb.median(eb.library_steps(eager, rows, eb.WARM_STEPS + steps)
                                                        [eb.WARM_STEPS:], "seconds") for rows in rows_list}
        results["eager_ms"] = {rows: 1000 * eb.median(eb.static_steps(eager, rows, steps), "seconds")
                               for rows in rows_list}
        counts = eb.static_steps(eager, 1, 2, audit=True)
        results["static_dispatches_per_step"] = counts[-1]["dispatches"]
        codec, chunks = eager.tts.model.speech_tokenizer.model, {}
        for frames in (args.first_chunk_frames, args.chunk_frames):
            decoder = server.StreamingDecoder(codec)
            codes = torch.randint(0, 2048, (frames, 16))
            with torch.inference_mode():
                times = [eb.timed(lambda d=decoder, c=codes: d.decode(c)) for _ in range(6)][1:]
            chunks[frames] = 1000 * statistics.median(times)
        results["codec_chunk_ms"] = chunks
    finally:
        eager.unload()
    report.add("steps", results)
    graphs = eb.load(model, args.dtype, 16, args.kv_cache_tokens, graphs=True)
    try:
        snap = graphs.snapshot()
        report.add("capture", {k: snap[k] for k in ("cuda_graphs", "graph_capture_seconds", "graph_pool_bytes",
                                                     "decode_cache_bytes", "decode_slots", "kv_cache_tokens")})
        if snap["cuda_graphs"] == "captured":
            results["graphs_ms"] = {rows: 1000 * eb.median(eb.static_steps(graphs, rows, steps), "seconds")
                                    for rows in rows_list}
            report.add("steps", results)
        report.add("codec_thread", {"cuda_graphs": snap["cuda_graphs"], **{
            rows: {("own_thread" if threaded else "model_thread"): eb.codec_batch(
                graphs, rows, args.budget, threaded, args.first_chunk_frames, args.chunk_frames)
                for threaded in (False, True)} for rows in rows_list}})
    finally:
        graphs.unload()


async def one_stream(engine: server.Engine, model: str, budget: int, args: argparse.Namespace, seed: int) -> dict:
    loop = asyncio.get_running_loop()
    job = server.Job(eb.plan(model, SPEECH, budget, seed), first_chunk_frames=args.first_chunk_frames,
                     chunk_frames=args.chunk_frames, timeout=3600, loop=loop)
    submitted = time.monotonic()
    engine.submit(job)
    first, samples = None, 0
    while True:
        kind, payload = await job.next_event(600)
        if kind == "audio":
            first = first if first is not None else time.monotonic() - submitted
            samples += payload.size
        elif kind == "error":
            raise payload
        else:
            break
    total = time.monotonic() - submitted
    audio = samples / 24000
    return {"first_audio_s": first, "total_s": total, "audio_s": audio, "rtf": audio / total}


def measure_streams(model: str, graphs: bool, args: argparse.Namespace) -> dict:
    settings = server.Settings(model_id=model, dtype=args.dtype, max_batch_size=16, max_queue_depth=0,
                               kv_cache_tokens=args.kv_cache_tokens, cuda_graphs=graphs, torch_compile=False,
                               idle_timeout=0, preload_model=True, stream_first_chunk_frames=args.first_chunk_frames)
    engine = server.Engine(settings, server.Metrics(model))
    engine.start()
    try:
        deadline = time.monotonic() + 900
        while not engine.manager().warmed and engine.manager().state != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)

        async def single() -> list[dict]:
            return [await one_stream(engine, model, args.budget, args, seed) for seed in range(args.single)]

        async def staggered() -> tuple[list[dict], float]:
            started = time.monotonic()

            async def later(i: int) -> dict:
                await asyncio.sleep(i * args.stagger)
                return await one_stream(engine, model, args.budget, args, 100 + i)

            streams = await asyncio.gather(*(later(i) for i in range(args.streams)))
            return list(streams), time.monotonic() - started

        alone = asyncio.run(single())
        together, wall = asyncio.run(staggered())
        firsts = [s["first_audio_s"] for s in alone]
        return {
            "cuda_graphs": engine.manager().snapshot()["cuda_graphs"],
            "single": {"first_audio_p50_s": statistics.median(firsts), "first_audio_p95_s": percentile(firsts, 95),
                       "rtf_p50": statistics.median(s["rtf"] for s in alone), "runs": len(alone),
                       "audio_s_each": alone[0]["audio_s"]},
            "streams": {"count": len(together), "stagger_s": args.stagger,
                        "audio_s_per_s": sum(s["audio_s"] for s in together) / wall,
                        "worst_rtf": min(s["rtf"] for s in together),
                        "first_audio_p95_s": percentile([s["first_audio_s"] for s in together], 95),
                        "first_audio_p50_s": statistics.median(s["first_audio_s"] for s in together)},
        }
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the tiny checkpoint, few steps (any machine)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "build" / "bench")))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    small = args.small
    args.dtype = "bfloat16" if cuda else "float32"
    args.steps, args.budget = (4, 24) if small else (20, 100)          # 100 frames = 8 s of audio a stream
    args.single, args.streams, args.stagger = (3, 4, 0.5) if small else (10, 16, 0.25)
    args.kv_cache_tokens = 256 if small else 512
    args.first_chunk_frames, args.chunk_frames = 4, 16
    report = Report(Path(args.out) / "gpu_bench.json", {
        "torch": torch.__version__, "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "small": small, "dtype": args.dtype, "steps": args.steps, "budget_frames": args.budget})
    started = time.monotonic()
    model = build_checkpoint(small)
    report.add("build_s", round(time.monotonic() - started, 1))
    measure_steps(model, args, report)
    for graphs in ((True, False) if cuda else (False,)):
        report.add(f"serving_graphs_{'on' if graphs else 'off'}", measure_streams(model, graphs, args))
    report.add("total_s", round(time.monotonic() - started, 1))


if __name__ == "__main__":
    main()
