"""A pool of real persister processes that a fault test can kill and restart.

Like `persister.bench.pool`, but each instance can be SIGKILLed, restarted,
armed (see `hooked_persister`) and measured (RSS from /proc) on its own,
and every incarnation is remembered (pid, start time, exit code) for the
checks. All processes are our own children and are ended by pid; `close()`
kills whatever still runs, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from persister.config import Config, load_config
from tests.faults.hooked_persister import FAULT_DIR_ENV
from tests.faults.servers import die_with_parent, free_port

REPO = Path(__file__).resolve().parents[2]
HEALTHY_TIMEOUT_S = 30.0
STOP_GRACE_S = 20.0


@dataclass
class Incarnation:
    pid: int
    started_wall: float
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    exit_code: int | None = None
    hook: str | None = None  # the hook it was armed with, if any


@dataclass
class Member:
    name: str
    incarnations: list[Incarnation] = field(default_factory=list)

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None

    @property
    def running(self) -> bool:
        inc = self.current
        return inc is not None and inc.process.poll() is None


def write_config(
    folder: Path,
    database_url: str,
    redis_url: str,
    names: list[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    raw: dict[str, Any] = {
        "database": {"url": database_url, "writer_connections": 2, "connect_timeout_s": 2},
        "redis": {"url": redis_url, "channel": f"persister.faults.{secrets.token_hex(6)}"},
        "replication_secret": secrets.token_urlsafe(24),
        "stream_writers": {"events": names},
        "instance_map": {name: {"host": "127.0.0.1", "port": free_port()} for name in names},
        "log_level": "INFO",
        "shutdown_timeout_s": 10,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pool.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


class Fleet:
    def __init__(self, folder: Path, config_path: Path, *, hooked: bool = False) -> None:
        self.folder = folder
        self.config_path = config_path
        self.config: Config = load_config([str(config_path)], environ={})
        self.hooked = hooked
        self.members = {name: Member(name) for name in self.config.stream_writers.events}
        self.fault_dir = folder / "faults"
        self.fault_dir.mkdir(parents=True, exist_ok=True)

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def base_url(self, name: str) -> str:
        location = self.config.location(name)
        return f"http://{location.host}:{location.port}"

    def pid(self, name: str) -> int:
        inc = self.members[name].current
        assert inc is not None
        return inc.pid

    # -- lifecycle ---------------------------------------------------------------

    def spawn(self, name: str) -> Incarnation:
        member = self.members[name]
        assert not member.running, f"{name} is already running"
        module = "tests.faults.hooked_persister" if self.hooked else "persister"
        command = [sys.executable, "-m", module, "run", "--instance", name,
                   "--config", str(self.config_path)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTER_")}
        env[FAULT_DIR_ENV] = str(self.fault_dir)
        env["PYTHONPATH"] = str(REPO)
        log = (self.folder / f"{name}.log").open("ab")
        log.write(f"---- incarnation {len(member.incarnations) + 1}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        inc = Incarnation(process.pid, time.time(), process, log)
        member.incarnations.append(inc)
        return inc

    async def start(self, name: str, timeout_s: float = HEALTHY_TIMEOUT_S) -> float:
        """Spawn and wait until /health answers 200; returns the seconds taken."""
        started = time.monotonic()
        self.spawn(name)
        await self.wait_healthy(name, timeout_s)
        return time.monotonic() - started

    async def start_all(self) -> None:
        for name in self.names:
            self.spawn(name)
        await asyncio.gather(*(self.wait_healthy(name) for name in self.names))

    async def wait_healthy(self, name: str, timeout_s: float = HEALTHY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.members[name].running:
                    raise RuntimeError(f"{name} exited during start-up:\n{self.log_tail(name)}")
                if await self.health(name, session) == 200:
                    return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} not healthy after {timeout_s} s:\n{self.log_tail(name)}")

    async def health(self, name: str, session: aiohttp.ClientSession) -> int | None:
        """The /health status, or None when nothing answers within a second."""
        try:
            async with session.get(
                self.base_url(name) + "/health", timeout=aiohttp.ClientTimeout(total=1)
            ) as answer:
                return answer.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    def kill(self, name: str) -> None:
        """SIGKILL the running incarnation (our own child, by its pid)."""
        inc = self.members[name].current
        if inc is not None and inc.process.poll() is None:
            inc.process.send_signal(signal.SIGKILL)

    def arm(self, name: str, hook: str) -> None:
        inc = self.members[name].current
        assert inc is not None and inc.process.poll() is None
        (self.fault_dir / f"{inc.pid}.arm").write_text(hook, encoding="utf-8")
        inc.hook = hook
        inc.process.send_signal(signal.SIGUSR1)

    async def wait_exit(self, name: str, timeout_s: float) -> int | None:
        """The exit code of the current incarnation, or None if it still runs."""
        inc = self.members[name].current
        assert inc is not None
        deadline = time.monotonic() + timeout_s
        while inc.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        inc.exit_code = inc.process.poll()
        return inc.exit_code

    async def stop_all(self, grace_s: float = STOP_GRACE_S) -> dict[str, int | None]:
        """SIGTERM every running instance; SIGKILL those that outlive `grace_s`."""
        for member in self.members.values():
            if member.running:
                assert member.current is not None
                member.current.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, member in self.members.items():
            if member.current is None:
                continue
            codes[name] = await self.wait_exit(name, grace_s)
            if codes[name] is None:
                self.kill(name)
                codes[name] = await self.wait_exit(name, 5)
        return codes

    def close(self) -> None:
        """Kill and reap everything still running; close the logs."""
        for member in self.members.values():
            for inc in member.incarnations:
                if inc.process.poll() is None:
                    inc.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    inc.process.wait(10)
                inc.exit_code = inc.process.returncode
                inc.log.close()

    # -- observations ---------------------------------------------------------------

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.folder / f"{name}.log"
        with contextlib.suppress(OSError):
            return path.read_text(encoding="utf-8", errors="replace")[-chars:]
        return ""

    def log_text(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def memory_kb(self, name: str) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the running incarnation in kB: now and peak."""
        values = {"VmRSS": 0, "VmHWM": 0}
        status = Path(f"/proc/{self.pid(name)}/status").read_text(encoding="utf-8")
        for line in status.splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
        return values["VmRSS"], values["VmHWM"]
