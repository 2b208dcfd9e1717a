#!/usr/bin/env python3
"""A private PostgreSQL server for tests and benchmarks: Debian's postgresql package, a fresh cluster under a temp
directory, listening on 127.0.0.1 at a free port, stopped and deleted at the end.

    with PostgresCluster() as pg:
        pg.url        # postgresql://tts@127.0.0.1:PORT/tts (trust authentication: loopback only)
        pg.new_database("other")   # another empty database on the same server

PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` user that the package creates.
`.venv/bin/python tools/pg_cluster.py` starts one and waits (Ctrl-C stops it), for trying the server by hand.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional


def postgres_bindir() -> Optional[Path]:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (not on PATH there)."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """initdb + pg_ctl start in a temp directory; the context manager stops it and removes the directory."""

    def __init__(self, user: str = "tts", database: str = "tts"):
        self.user, self.database = user, database
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/install.sh --dev "
                               "does it as root)")
        self.port = free_port()
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{database}"
        self._run_as = "postgres" if os.geteuid() == 0 else None

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, timeout=timeout,
                                user=self._run_as, cwd=self.root, env={**os.environ, "LC_ALL": "C.UTF-8"})
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}\n{self.log()}")
        return result

    def log(self) -> str:
        path = Path(self.root) / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self) -> PostgresCluster:
        self.root = tempfile.mkdtemp(prefix="tts-pg-")
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        data = os.path.join(self.root, "data")
        self._pg("initdb", "-D", data, "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync")
        # fsync off: a test cluster need not survive a power cut, and the machine is shared and slow.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=100"
        self._pg("pg_ctl", "-D", data, "-l", os.path.join(self.root, "server.log"), "-o", options, "-w", "-t", "120",
                 "start")
        self.new_database(self.database)
        return self

    def new_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its URL."""
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        data = os.path.join(self.root, "data")
        try:
            self._pg("pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with PostgresCluster() as pg:
        print(f"DATABASE_URL={pg.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
