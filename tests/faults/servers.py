"""Private PostgreSQL and Redis servers that a fault test may stop, restart or
kill without touching the shared ones other engineers' tests run against.

PostgreSQL is a Debian cluster made with `pg_createcluster` (needs root and
postgresql-common); Redis is `redis-server` on a free port with nothing kept
on disk. Both listen on 127.0.0.1 only. `unavailable_reason()` says why a
server cannot be had here, so that fixtures skip with that reason.

Everything created is named `pfault_<pid>_<hex>`; a cluster whose creating
process is gone (a test run that was SIGKILLed before its clean-up) is
dropped the next time a cluster is created.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

PR_SET_PDEATHSIG = 1
PG_VERSION = "15"
CLUSTER_PREFIX = "pfault_"
COMMAND_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 30.0


def die_with_parent() -> None:
    """`preexec_fn` for our servers and persisters: SIGKILL them when the
    thread that started them dies, so that even a SIGKILLed test run leaves
    no process behind. (Start them from the event loop's thread, not from a
    worker thread that may end first.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


# -- PostgreSQL -------------------------------------------------------------------


@dataclass
class PrivatePostgres:
    """One private cluster; `url(db)` reaches it over TCP on 127.0.0.1."""

    name: str
    port: int
    version: str = PG_VERSION
    settings: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def unavailable_reason() -> str | None:
        for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster", "pg_lsclusters"):
            if shutil.which(tool) is None:
                return (
                    f"{tool} not found (Debian's postgresql-common is needed for a private cluster)"
                )
        if os.geteuid() != 0:
            return "pg_createcluster needs root to make a private cluster"
        if not Path(f"/usr/lib/postgresql/{PG_VERSION}/bin/postgres").exists():
            return f"PostgreSQL {PG_VERSION} server binaries are not installed"
        return None

    @classmethod
    def create(cls, settings: dict[str, str] | None = None) -> PrivatePostgres:
        drop_orphaned_clusters()
        cluster = cls(
            f"{CLUSTER_PREFIX}{os.getpid()}_{secrets.token_hex(3)}", free_port(), PG_VERSION,
            {"listen_addresses": "127.0.0.1", **(settings or {})},
        )  # fmt: skip
        done = _run(
            "pg_createcluster", cluster.version, cluster.name, "-p", str(cluster.port),
            "--", "--auth=trust",
        )  # fmt: skip
        try:
            if done.returncode != 0:
                raise RuntimeError(f"pg_createcluster failed: {done.stderr.strip()[-2000:]}")
            # Debian's postgresql.conf includes conf.d/; quoted values here
            # are read as PostgreSQL means them.
            lines = [f"{key} = '{value}'" for key, value in cluster.settings.items()]
            conf = Path(f"/etc/postgresql/{cluster.version}/{cluster.name}/conf.d/faults.conf")
            conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
            cluster.start()
        except BaseException:
            cluster.drop()
            raise
        cluster.wait_ready()
        return cluster

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until it accepts connections; raises after `timeout_s`."""
        started = time.monotonic()
        while not self.answers():
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"cluster {self.name} not ready after {timeout_s} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-m", mode)

    def start(self) -> None:
        self._ctl("start")

    def restart(self, mode: str = "fast") -> None:
        self._ctl("restart", "-m", mode)

    def _ctl(self, action: str, *options: str) -> None:
        done = _run("pg_ctlcluster", self.version, self.name, action, "--", *options)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctlcluster {action} failed: {done.stderr.strip()[-2000:]}")

    def drop(self) -> None:
        _run("pg_dropcluster", "--stop", self.version, self.name)


def drop_orphaned_clusters() -> list[str]:
    """Drop `pfault_<pid>_*` clusters whose creating process no longer exists."""
    listing = _run("pg_lsclusters", "--no-header")
    dropped = []
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        match = re.fullmatch(rf"{CLUSTER_PREFIX}(\d+)_[0-9a-f]+", parts[1])
        if match is None or _process_exists(int(match.group(1))):
            continue
        _run("pg_dropcluster", "--stop", parts[0], parts[1])
        dropped.append(parts[1])
    return dropped


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- Redis ------------------------------------------------------------------------


class PrivateRedis:
    """`redis-server` on its own port; `stop()` and `start()` keep the port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable_reason() -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server not found on PATH (apt-get install redis-server)"
        return None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        """Start it and wait until it answers PING; returns the seconds that took."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--dir", str(self.folder),
                ],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )  # fmt: skip
        started = time.monotonic()
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"redis-server not answering after {READY_TIMEOUT_S} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to clients, like a crash) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # our own child, by its pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
