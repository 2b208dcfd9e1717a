"""The decode step measured in process (no server): the library-driven path (qwen_tts's own generate(), as the
engine drove it before the static path) against the server's static path (StaticDecoder), side by side on one
loaded model. Used by `bench.py engine` (CPU, any machine) and bench/gpu_bench.py (eager vs CUDA graphs).

Every figure is per codec frame (one talker step, its 15 code-predictor sub-steps included), in steady state
("views": dispatches that only make a view, which launch no kernel on a GPU):
the first steps of a run (lazy initialisation, the prefill) are left out.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from device_audit import DeviceAudit  # noqa: E402

import server  # noqa: E402

TEXT = "The committee met on Tuesday to review the proposal."
WARM_STEPS = 2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(model_dir: str, dtype: str, slots: int, positions: int, graphs: bool) -> server.ModelManager:
    settings = server.Settings(model_id=model_dir, dtype=dtype, max_batch_size=slots, kv_cache_tokens=positions,
                               cuda_graphs=graphs, torch_compile=False)
    manager = server.ModelManager(model_dir, settings)
    manager.ensure_loaded()
    return manager


# ---- the library-driven path: qwen_tts's generate(), one talker call per frame
def library_steps(manager: server.ModelManager, rows: int, steps: int, audit: bool = False) -> list[dict]:
    """Run the library's own generate() for `rows` texts and `steps` frames; per talker call after the first
    (the prefill): its seconds, and with `audit` its dispatches and host synchronisations."""
    tts, marks = manager.tts, []
    device = manager.tts.model.talker.device
    counter = DeviceAudit() if audit else None

    def mark(*_: Any) -> None:
        synchronize(device)
        marks.append((time.perf_counter(), counter.total_dispatches if counter else 0,
                      counter.total_syncs if counter else 0, counter.views if counter else 0))

    hook = tts.model.talker.register_forward_pre_hook(mark)
    try:
        with torch.inference_mode():
            if counter:
                counter.__enter__()
            try:
                tts.generate_custom_voice(text=[TEXT] * rows, speaker=["vivian"] * rows, language=["english"] * rows,
                                          max_new_tokens=steps + 1, non_streaming_mode=True)
            finally:
                if counter:
                    counter.__exit__(None, None, None)
    finally:
        hook.remove()
    return [{"seconds": b[0] - a[0], "dispatches": b[1] - a[1], "syncs": b[2] - a[2], "views": b[3] - a[3]}
            for a, b in zip(marks[1:], marks[2:], strict=False)]


def plan(model_id: str, text: str, budget: int, seed: int) -> server.SpeechPlan:
    """A one-segment request for vivian in English, as the server would plan it."""
    return server.SpeechPlan(model_id=model_id, text=text, segments=(text,), budgets=(budget,), voice="vivian",
                             speaker="vivian", language="english", instructions=None,
                             sampling=server.Sampling(seed=seed), speed=1.0, sample_rate=server.SAMPLE_RATE,
                             response_format="pcm", normalize=False)


# ---- the static path: DecodeBatch's rows in the StaticDecoder's slots
def static_batch(manager: server.ModelManager, rows: int, budget: int) -> server.DecodeBatch:
    """A DecodeBatch (entered) with `rows` seeded rows prefilled; its jobs' audio goes nowhere."""
    batch = server.DecodeBatch(manager, lambda _: None, lambda _: None).__enter__()
    jobs = [server.Job(plan(manager.model_id, TEXT, budget, seed=i), first_chunk_frames=4, chunk_frames=16,
                       timeout=10**6, loop=None, internal=True) for i in range(rows)]
    batch.add([(job, 0) for job in jobs])
    return batch


def static_steps(manager: server.ModelManager, rows: int, steps: int, audit: bool = False) -> list[dict]:
    """`steps` decode steps of the static path for `rows` rows (StaticDecoder.run: the model's work, the frames'
    bookkeeping and codec decode left out); per step its seconds, and with `audit` its dispatches and syncs."""
    decoder, out = manager.decoder, []
    device = decoder.slots.device
    with torch.inference_mode():
        batch = static_batch(manager, rows, steps + WARM_STEPS + 1)
        try:
            for _ in range(steps + WARM_STEPS):
                uniforms = torch.stack([row.draws(16) for row in batch.rows])
                length = max(row.length for row in batch.rows) + 1
                counter = DeviceAudit() if audit else None
                synchronize(device)
                started = time.perf_counter()
                if counter:
                    with counter:
                        decoder.run(rows, length, uniforms)
                else:
                    decoder.run(rows, length, uniforms)
                seconds = time.perf_counter() - started
                for row in batch.rows:
                    row.length += 1
                # the codes' copy to the host is the step's one synchronisation; on a CPU the audit cannot see it
                syncs = (counter.total_syncs if counter else 0) + (device.type == "cpu")
                out.append({"seconds": seconds, "dispatches": counter.total_dispatches if counter else 0,
                            "syncs": syncs, "views": counter.views if counter else 0})
        finally:
            batch.__exit__(None, None, None)
    return out[WARM_STEPS:]


def median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def move_seconds(manager: server.ModelManager, length: int, repeat: int = 20) -> float:
    """One SlotTable.move of a row with `length` cache positions (what a leave costs with compaction)."""
    slots = manager.decoder.slots
    synchronize(slots.device)
    started = time.perf_counter()
    for _ in range(repeat):
        slots.move(1, 0, length)
    synchronize(slots.device)
    slots.free()
    return (time.perf_counter() - started) / repeat


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ---- codec decode on the model thread (inline) vs on its own thread (CodecWorker)
def use_codec_thread(manager: server.ModelManager, threaded: bool) -> None:
    """Give the loaded model a codec worker on its own thread (CODEC_THREAD=true) or inline (false)."""
    manager.codec.stop()
    manager.codec = server.CodecWorker(manager.decoder.slots.device, manager.decoder.slots.count, threaded)


def codec_batch(manager: server.ModelManager, rows: int, budget: int, threaded: bool, first_chunk_frames: int = 4,
                chunk_frames: int = 16) -> dict:
    """`rows` seeded rows of `budget` frames through DecodeBatch, every chunk decoded to PCM, with the codec on the
    model thread or on its own. -> the model thread's ms per step, mean and worst (the step, the rows' bookkeeping,
    and the decode or the hand-over: what delays every row's next frame; the mean spreads each chunk's decode over
    its steps), and the rows' frames (and audio seconds) per second from the first step until the batch is empty,
    its last audio out."""
    use_codec_thread(manager, threaded)
    jobs = [server.Job(plan(manager.model_id, TEXT, budget, seed=i), first_chunk_frames=first_chunk_frames,
                       chunk_frames=chunk_frames, timeout=10**6, loop=None, internal=True) for i in range(rows)]
    samples = [0] * rows
    for i, job in enumerate(jobs):
        emit = job.emit_audio
        job.emit_audio = lambda segment, pcm, i=i, emit=emit: (samples.__setitem__(i, samples[i] + pcm.size),
                                                                 emit(segment, pcm))
    steps = []
    with torch.inference_mode(), server.DecodeBatch(manager, lambda _: None, lambda _: None) as batch:
        batch.add([(job, 0) for job in jobs])
        started = time.perf_counter()
        while batch.rows:
            before = time.perf_counter()
            batch.step()
            steps.append(time.perf_counter() - before)
        wall = time.perf_counter() - started
    assert samples == [budget * server.SAMPLES_PER_FRAME] * rows, "a row's audio is missing"
    measured = steps[WARM_STEPS:] or steps
    return {"step_ms_mean": 1000 * statistics.fmean(measured), "step_ms_max": 1000 * max(measured),
            "frames_per_s": rows * budget / wall,
            "audio_s_per_s": rows * budget * server.SAMPLES_PER_FRAME / server.SAMPLE_RATE / wall}
