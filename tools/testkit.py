"""Helpers shared by the unit tests (server_test.py), the E2E tests (E2Etest/) and the benchmarks (bench/), stated
once here. Import with tools/ on sys.path: `from testkit import free_port, tone, wait_for`."""

from __future__ import annotations

import fcntl
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

_T = TypeVar("_T")


def build_checkpoints(out_dir: Path) -> Path:
    """The tiny checkpoints (tools/build_tiny_checkpoints.py) in out_dir, built if they are missing or stale. Test
    processes running side by side (pytest-xdist workers) build them one at a time: the others wait for the lock and
    then find them built."""
    from build_tiny_checkpoints import build_all

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_all(out_dir)
    return out_dir


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tone(freq: float, rate: int = 24000, seconds: float = 3.0, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave, float32 mono."""
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def wait_for(probe: Callable[[], _T], what: str, timeout: float = 300, interval: float = 0.05) -> _T:
    """Poll `probe` until it returns something true, and return that. Tests wait for states this way, never for a
    time: `timeout` is a generous bound that only stops a hang (the machine may be busy), and the error says what
    never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; last seen: {value!r}")
        time.sleep(interval)
