"""The world of the partition test: a test host, private servers, a pool of persisters.

    world = PartitionWorld.build(tmp_path)      # skips the test if it cannot be built
    try:
        world.start_pool()
        ...
    finally:
        world.destroy()                          # processes, Redis, cluster, namespace

One persister ("ns1") runs inside the namespace and reaches PostgreSQL and
Redis at the host end of the veth pair; two ("host1", "host2") run on this
machine over loopback. The namespace's persister listens on its own address,
which the client on this machine reaches over the veth pair. Only loopback
and the two addresses of the pair are ever contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from persister.config import Config, config_from_mapping
from tests.faults import netns
from tests.faults.private_services import (
    PrivatePostgres,
    PrivateRedis,
    die_with_parent,
    free_port,
    postgres_unavailable,
    redis_unavailable,
    remove_stale_clusters,
)

PREFIX = "pwpart"  # namespaces and clusters are <PREFIX><pid of the test process>
REPO = Path(__file__).resolve().parents[2]
SECRET = "partition-test-secret"
CHANNEL = "persister.partition"
NS_WRITER = "ns1"
HOST_WRITERS = ("host1", "host2")
WRITERS = (NS_WRITER, *HOST_WRITERS)
STOP_TIMEOUT_S = 15.0

# The private cluster keeps the server's default TCP settings (Linux: an idle
# connection is probed after two hours), so noticing a partition is left to
# the persister (persister.storage.keepalive). Commit times are kept for the
# stream-promise check.
SERVER_SETTINGS: dict[str, str | int] = {
    "track_commit_timestamp": "on",
    "max_connections": 200,
}


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The suite's own servers must not override the private ones.
    env.pop("PERSISTER_DATABASE_URL", None)
    env.pop("PERSISTER_REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class PersisterProcess:
    name: str
    argv: list[str]
    log_path: Path
    host: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_environment(),
                cwd=REPO,
                preexec_fn=die_with_parent,
            )

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit status (None if never run)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class PartitionWorld:
    tmp: Path
    host: netns.TestHost | None = None
    postgres: PrivatePostgres | None = None
    redis: PrivateRedis | None = None
    persisters: dict[str, PersisterProcess] = field(default_factory=dict)
    config_paths: dict[str, list[str]] = field(default_factory=dict)
    config: Config | None = None  # as seen from this machine
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def build(cls, tmp: Path) -> PartitionWorld:
        reason = netns.unavailable() or postgres_unavailable() or redis_unavailable()
        if reason:
            pytest.skip(reason)
        netns.remove_stale(PREFIX)
        remove_stale_clusters(PREFIX)
        world = cls(tmp)
        try:
            world._build()
        except BaseException:
            world.destroy()
            raise
        return world

    def _build(self) -> None:
        self.host = netns.TestHost.create(PREFIX)
        listen = ["127.0.0.1", self.host.host_addr]
        self.postgres = PrivatePostgres.create(
            PREFIX,
            listen=listen,
            trust=[f"{self.host.host_addr}/{self.host.prefixlen}"],
            settings=SERVER_SETTINGS,
        )
        self.redis = PrivateRedis.start(listen, self.tmp / "redis.log")
        self._write_configs()
        self._migrate()

    @property
    def database_url(self) -> str:
        assert self.postgres is not None
        return self.postgres.url("127.0.0.1", "persister")

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url("127.0.0.1")

    def _write_configs(self) -> None:
        assert self.host is not None and self.postgres is not None and self.redis is not None
        ports = {name: free_port() for name in WRITERS}
        instance_map: dict[str, Any] = {
            NS_WRITER: {"host": self.host.ns_addr, "port": ports[NS_WRITER]},
            **{name: {"host": "127.0.0.1", "port": ports[name]} for name in HOST_WRITERS},
        }
        shared: dict[str, Any] = {
            "database": {"url": self.database_url, "writer_connections": 2,
                         "connect_timeout_s": 2},
            "redis": {"url": self.redis_url, "channel": CHANNEL},
            "replication_secret": SECRET,
            "stream_writers": {"events": list(WRITERS)},
            "instance_map": instance_map,
            "persist": {"retry_after_s": 0.2},
            "shutdown_timeout_s": 10,
        }  # fmt: skip
        # The namespace sees the servers at the host end of the veth pair.
        ns_override = {
            "database": {"url": self.postgres.url(self.host.host_addr, "persister")},
            "redis": {"url": self.redis.url(self.host.host_addr)},
        }
        shared_path, ns_path = self.tmp / "shared.yaml", self.tmp / "ns1.yaml"
        shared_path.write_text(yaml.safe_dump(shared))
        ns_path.write_text(yaml.safe_dump(ns_override))
        self.config = config_from_mapping(shared)
        self.config_paths = {name: [str(shared_path)] for name in HOST_WRITERS}
        self.config_paths[NS_WRITER] = [str(shared_path), str(ns_path)]
        for name in WRITERS:
            argv = [sys.executable, "-m", "persister", "run", "--instance", name]
            for path in self.config_paths[name]:
                argv += ["--config", path]
            if name == NS_WRITER:
                argv = self.host.exec_argv(argv)
            location = instance_map[name]
            self.persisters[name] = PersisterProcess(
                name, argv, self.tmp / f"{name}.log", location["host"], location["port"]
            )

    def _migrate(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "persister", "migrate", "--config", *self.config_paths["host1"]],
            capture_output=True,
            text=True,
            env=child_environment(),
            cwd=REPO,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"persister migrate failed: {done.stderr}")

    async def start_pool(self, timeout_s: float = 30.0) -> None:
        for persister in self.persisters.values():
            persister.start()
        await asyncio.gather(*(self.wait_healthy(name, timeout_s) for name in self.persisters))

    async def healthy(self, name: str, timeout_s: float = 1.0) -> bool:
        persister = self.persisters[name]
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    persister.health_url, timeout=aiohttp.ClientTimeout(total=timeout_s)
                ) as answer,
            ):
                return answer.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def wait_healthy(self, name: str, timeout_s: float) -> float:
        """Seconds until `name` answers /health with 200; fails the test past `timeout_s`."""
        started = time.monotonic()
        persister = self.persisters[name]
        while not await self.healthy(name):
            if persister.process is not None and persister.process.poll() is not None:
                pytest.fail(f"{name} exited with {persister.process.returncode}:\n"
                            f"{persister.log_tail()}")  # fmt: skip
            if time.monotonic() - started > timeout_s:
                pytest.fail(f"{name} not healthy after {timeout_s}s:\n{persister.log_tail()}")
            await asyncio.sleep(0.2)
        return time.monotonic() - started

    def stop_pool(self) -> dict[str, int | None]:
        for name, persister in self.persisters.items():
            if name not in self.exit_codes:
                self.exit_codes[name] = persister.stop()
        return self.exit_codes

    def destroy(self) -> None:
        """Undo everything, in reverse; each step runs whatever the others did."""
        with contextlib.suppress(Exception):
            self.stop_pool()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.postgres is not None:
            self.postgres.drop()
        if self.host is not None:
            self.host.destroy()
