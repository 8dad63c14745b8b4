"""`persister pool` with real `persister run` children, end to end through the client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psycopg
import yaml

from persister.client import PersisterClient
from persister.config import load_config
from persister.matrix.builder import build_pdu
from persister.status import format_status, gather_status

INSTANCES = ("persister1", "persister2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, database_url: str, redis_url: str, channel: str) -> Path:
    config = {
        "database": {"url": database_url},
        "redis": {"url": redis_url, "channel": channel},
        "replication_secret": "pool-secret",
        "stream_writers": {"events": list(INSTANCES)},
        "instance_map": {name: {"port": free_port()} for name in INSTANCES},
        "shutdown_timeout_s": 10,
    }
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(line) for line in out.split()}


async def wait_healthy(ports: list[int], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        for port in ports:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"port {port} never became healthy"
                await asyncio.sleep(0.2)


async def persist_one_event_per_room(config_path: Path, rooms: int) -> list[int]:
    config = load_config([str(config_path)])
    orderings = []
    async with PersisterClient.from_config(config) as client:
        for i in range(rooms):
            room_id = f"!pool{i}:example.org"
            _, pdu = build_pdu(
                "10",
                room_id,
                "@a:example.org",
                "m.room.message",
                {"body": "hi", "msgtype": "m.text"},
                [],
                [],
                1,
            )
            answer = await client.persist(room_id, "10", [{"pdu": pdu}])
            orderings.append(answer.results[0].stream_ordering)
    return orderings


async def test_pool_restarts_a_killed_persister_and_stops_all_on_sigterm(
    tmp_path: Path, database_url: str, redis_url: str, redis_channel: str
) -> None:
    config_path = write_config(tmp_path, database_url, redis_url, redis_channel)
    ports = [
        spec["port"] for spec in yaml.safe_load(config_path.read_text())["instance_map"].values()
    ]
    env = {**os.environ, "PERSISTER_DATABASE_URL": database_url}
    pool = subprocess.Popen(
        [sys.executable, "-m", "persister", "pool", "--config", str(config_path)], env=env
    )
    try:
        await wait_healthy(ports)
        assert len(await persist_one_event_per_room(config_path, 10)) == 10
        first = children(pool.pid)
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await wait_healthy(ports)
        assert victim not in children(pool.pid) and len(children(pool.pid)) == 2
        # Every room, the killed persister's included, takes writes again.
        assert len(await persist_one_event_per_room(config_path, 10)) == 10
        statuses = await gather_status(load_config([str(config_path)]))
        assert all(s.reachable for s in statuses), format_status(statuses)
    finally:
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT instance_name) FROM events")
        assert stored.fetchone() == (20, 2)
