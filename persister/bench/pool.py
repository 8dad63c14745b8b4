"""A throw-away persister pool for one benchmark run.

A fresh database `persister_bench_<ms>` is migrated, a config is written to
the run's folder, and each instance is started as `python -m persister run`
(the same interpreter as the harness), with its log in the run's folder.
`stop` sends SIGTERM (the persister drains and exits 0) and SIGKILLs only
an instance that outlives the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from persister.bench import databases
from persister.config import Config, load_config

HEALTH_TIMEOUT_S = 30.0
STOP_GRACE_S = 30.0


class PoolStartError(Exception):
    """An instance did not come up; the message quotes its log."""


@dataclass
class PoolSettings:
    server_url: str
    redis_url: str
    instances: int
    folder: Path
    extra_configs: list[str] = field(default_factory=list)


@dataclass
class Instance:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


@dataclass
class BenchPool:
    config: Config
    config_paths: list[str]
    database_name: str
    instances: list[Instance]

    @property
    def pids(self) -> dict[str, list[int]]:
        return {i.name: [i.process.pid] for i in self.instances}

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM every instance, wait for them; return their exit codes."""
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        codes = {}
        for instance in self.instances:
            codes[instance.name] = await _wait_exit(instance.process, STOP_GRACE_S)
            instance.log.close()
        return codes


def free_port() -> int:
    # Racy in principle (the port is free when asked, not when bound), but the
    # instance binds it within a second and its failure would be reported.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(settings: PoolSettings, database_url: str, channel: str) -> Path:
    names = [f"bench{i + 1}" for i in range(settings.instances)]
    raw: dict[str, Any] = {
        "database": {"url": database_url},
        "redis": {"url": settings.redis_url, "channel": channel},
        "replication_secret": secrets.token_urlsafe(24),
        "stream_writers": {"events": names},
        "instance_map": {name: {"host": "127.0.0.1", "port": free_port()} for name in names},
        "log_level": "WARNING",
    }
    path = settings.folder / "pool.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


async def start_pool(settings: PoolSettings) -> BenchPool:
    """Migrate a fresh database and start every instance; wait for /health."""
    settings.folder.mkdir(parents=True, exist_ok=True)
    name = databases.bench_database_name()
    database_url = await databases.create_database(settings.server_url, name)
    # A channel of its own: other pools on the same Redis must not be heard.
    path = write_config(settings, database_url, f"persister.bench.{name}")
    paths = [str(path), *settings.extra_configs]
    config = load_config(paths, environ={})
    instances = [_spawn(settings.folder, paths, n) for n in config.stream_writers.events]
    pool = BenchPool(config, paths, name, instances)
    try:
        await asyncio.gather(*(_wait_healthy(config, i) for i in instances))
    except BaseException:
        await pool.stop()
        # Nobody else knows this database exists: do not leave it behind.
        await databases.drop_database(settings.server_url, name)
        raise
    return pool


def _spawn(folder: Path, config_paths: list[str], name: str) -> Instance:
    log_path = folder / f"{name}.log"
    log = log_path.open("wb")
    command = [sys.executable, "-m", "persister", "run", "--instance", name]
    for path in config_paths:
        command += ["--config", path]
    # The URL overrides in the harness's environment must not redirect the
    # pool away from the database it was just given.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTER_")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Instance(name, process, log_path, log)


async def _wait_healthy(config: Config, instance: Instance) -> None:
    location = config.location(instance.name)
    url = f"http://{location.host}:{location.port}/health"
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if instance.process.poll() is not None:
                raise PoolStartError(
                    _failure(instance, f"exited with {instance.process.returncode}")
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise PoolStartError(_failure(instance, f"not healthy after {HEALTH_TIMEOUT_S:.0f}s"))


def _failure(instance: Instance, what: str) -> str:
    instance.log.flush()
    tail = instance.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    return f"persister {instance.name} {what}; log {instance.log_path}:\n{tail}"


async def _wait_exit(process: subprocess.Popen[bytes], grace_s: float) -> int | None:
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if process.poll() is None:
        process.kill()  # our own child, by its pid
        await asyncio.to_thread(process.wait, 5)
    return process.returncode
