"""A pool of real `persister run` processes that a reshard run can grow,
shrink, kill and restart (issue 5).

Every instance named in `instance_map` runs from the start, the writer list
of the config only seeds epoch 1: an instance that no map names waits,
owning nothing, as contract section 7 asks of an added writer. Each run has
a fresh database (`persister_bench_<ms>_reshard`, dropped by `close`) and a
Redis channel of its own; every process is a child of this one, stopped by
its pid.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from persister.bench import databases
from persister.bench.pool import free_port
from persister.config import Config, load_config
from persister.sharding import Scheme

HEALTH_TIMEOUT_S = 30.0
STOP_GRACE_S = 20.0


class PoolError(Exception):
    """An instance did not come up or would not stop; the message quotes its log."""


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]


@dataclass
class LivePool:
    config: Config
    config_path: Path
    server_url: str
    database_name: str
    folder: Path
    processes: dict[str, _Process] = field(default_factory=dict)
    # Exit codes of instances that were stopped or killed, in order.
    exits: list[tuple[str, int | None]] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        *,
        server_url: str,
        redis_url: str,
        folder: Path,
        instances: tuple[str, ...],
        writers: tuple[str, ...],
        sharding: Scheme,
        extra: dict[str, Any] | None = None,
    ) -> LivePool:
        """Create and migrate a database, start every instance, wait for /health."""
        folder.mkdir(parents=True, exist_ok=True)
        name = databases.bench_database_name("_reshard")
        database_url = await databases.create_database(server_url, name)
        raw: dict[str, Any] = {
            "database": {"url": database_url},
            "redis": {"url": redis_url, "channel": f"persister.bench.{name}"},
            "replication_secret": secrets.token_urlsafe(24),
            "stream_writers": {"events": list(writers)},
            "sharding": sharding,
            "instance_map": {i: {"host": "127.0.0.1", "port": free_port()} for i in instances},
            "log_level": "WARNING",
            **(extra or {}),
        }
        path = folder / "pool.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        pool = cls(load_config([str(path)], environ={}), path, server_url, name, folder)
        try:
            for instance in instances:
                pool._spawn(instance)
            await asyncio.gather(*(pool.wait_healthy(i) for i in instances))
        except BaseException:
            await pool.close()
            raise
        return pool

    @property
    def database_url(self) -> str:
        return self.config.database.url

    def pid(self, name: str) -> int:
        return self.processes[name].popen.pid

    async def kill(self, name: str) -> None:
        """SIGKILL one instance (our own child, by its pid)."""
        process = self.processes.pop(name)
        process.popen.send_signal(signal.SIGKILL)
        self.exits.append((name, await asyncio.to_thread(process.popen.wait, 10)))
        process.log.close()

    async def restart(self, name: str) -> None:
        """Start a killed or stopped instance again and wait until it is healthy."""
        if name in self.processes:
            raise PoolError(f"{name} is still running")
        self._spawn(name)
        await self.wait_healthy(name)

    async def close(self) -> None:
        """SIGTERM every instance (SIGKILL after the grace period), drop the database."""
        try:
            for process in self.processes.values():
                if process.popen.poll() is None:
                    process.popen.send_signal(signal.SIGTERM)
            for name, process in list(self.processes.items()):
                self.exits.append((name, await _wait_exit(process.popen, STOP_GRACE_S)))
                process.log.close()
            self.processes.clear()
        finally:
            await databases.drop_database(self.server_url, self.database_name)

    def _spawn(self, name: str) -> None:
        log = (self.folder / f"{name}.log").open("ab")  # a restart appends
        command = [sys.executable, "-m", "persister", "run", "--instance", name,
                   "--config", str(self.config_path)]  # fmt: skip
        # URL overrides in our environment must not redirect the pool.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTER_")}
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes[name] = _Process(name, popen, log)

    async def wait_healthy(self, name: str) -> None:
        process = self.processes[name]
        location = self.config.location(name)
        url = f"http://{location.host}:{location.port}/health"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if process.popen.poll() is not None:
                    raise PoolError(self._failure(name, f"exited with {process.popen.returncode}"))
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as answer:
                        if answer.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise PoolError(self._failure(name, f"not healthy after {HEALTH_TIMEOUT_S:.0f} s"))

    def _failure(self, name: str, what: str) -> str:
        path = self.folder / f"{name}.log"
        tail = path.read_text(encoding="utf-8", errors="replace")[-2000:]
        return f"persister {name} {what}; log {path}:\n{tail}"


async def _wait_exit(popen: subprocess.Popen[bytes], grace_s: float) -> int | None:
    deadline = time.monotonic() + grace_s
    while popen.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if popen.poll() is None:
        popen.kill()
        await asyncio.to_thread(popen.wait, 5)
    return popen.returncode
