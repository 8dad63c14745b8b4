"""`persister pool` and `persister status`: the operator's tools for a whole pool.

The pool is exercised with a stand-in child program (STAND_IN below) that
notes its start and stop in a log file, so these tests need neither
PostgreSQL nor Redis. Status is exercised against small aiohttp servers
that answer /health and /_persist/v1/status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from persister.config import Config, config_from_mapping
from persister.pool import RestartPolicy, persister_command, supervise_pool
from persister.status import (
    HEALTH_PATH,
    STATUS_PATH,
    InstanceStatus,
    InstanceStatusBody,
    StoredPositions,
    exit_status,
    format_status,
    gather_status,
)

REPO = Path(__file__).resolve().parents[2]

STAND_IN = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    name, log, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    def note(what):
        with log.open("a") as f:
            f.write(f"{name} {what} {os.getpid()}\\n")

    def on_sigterm(signum, frame):
        if mode == "stubborn":
            note("ignored-sigterm")
            return
        note("stopped")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    note("started")
    marker = log.with_name(name + ".crashed")
    if mode == "crash-once" and not marker.exists():
        marker.touch()
        sys.exit(3)
    while True:
        time.sleep(0.02)
    """
)

FAST_RESTART = RestartPolicy(initial_delay_s=0.05, max_delay_s=0.2, stable_after_s=5)


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    program = tmp_path / "stand_in.py"
    program.write_text(STAND_IN)
    return program


def stand_in_command(program: Path, log: Path, mode: str = "polite") -> Callable[[str], list[str]]:
    return lambda name: [sys.executable, str(program), name, str(log), mode]


def notes(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [(line.split()[0], line.split()[1]) for line in log.read_text().splitlines()]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pids(log: Path, what: str) -> list[int]:
    return [
        int(line.split()[2]) for line in log.read_text().splitlines() if line.split()[1] == what
    ]


async def run_pool_until(
    commands: Mapping[str, Sequence[str]],
    condition: Callable[[], bool],
    **kwargs: Any,
) -> float:
    """Run the pool until `condition`, stop it, return how long stopping took."""
    stop = asyncio.Event()
    pool = asyncio.create_task(supervise_pool(commands, stop, **kwargs))
    await until(condition)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(pool, 10)
    return time.monotonic() - started


# -- the supervisor ---------------------------------------------------------------


def test_child_command_is_this_python_running_persister_with_every_config_file():
    command = persister_command(["/etc/p/shared.yaml", "/etc/p/workers/p1.yaml"])
    assert command("p1") == [
        sys.executable, "-m", "persister", "run",
        "--config", "/etc/p/shared.yaml", "--config", "/etc/p/workers/p1.yaml",
        "--instance", "p1",
    ]  # fmt: skip


async def test_pool_starts_one_child_per_instance_and_stops_each_with_sigterm(stand_in, tmp_path):
    log = tmp_path / "log"
    command = stand_in_command(stand_in, log)
    commands = {name: command(name) for name in ("p1", "p2", "p3")}

    await run_pool_until(commands, lambda: len(notes(log)) == 3, policy=FAST_RESTART)

    assert sorted(notes(log)) == sorted(
        [(n, w) for n in ("p1", "p2", "p3") for w in ("started", "stopped")]
    )
    assert not any(pid_alive(pid) for pid in pids(log, "started"))


async def test_child_that_dies_is_restarted_after_a_backoff_with_a_log_line(
    stand_in, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="persister.pool")
    log = tmp_path / "log"
    commands = {"p1": stand_in_command(stand_in, log, "crash-once")("p1")}

    await run_pool_until(
        commands, lambda: notes(log).count(("p1", "started")) == 2, policy=FAST_RESTART
    )

    assert notes(log) == [("p1", "started"), ("p1", "started"), ("p1", "stopped")]
    assert "instance=p1 exited with code 3" in caplog.text
    assert re.search(r"restarting in \d+\.\d+s", caplog.text)


async def test_child_ignoring_sigterm_is_killed_after_the_shutdown_timeout(stand_in, tmp_path):
    log = tmp_path / "log"
    commands = {"p1": stand_in_command(stand_in, log, "stubborn")("p1")}

    took = await run_pool_until(
        commands, lambda: bool(notes(log)), policy=FAST_RESTART, shutdown_timeout_s=0.5
    )

    assert 0.5 <= took < 3
    assert notes(log) == [("p1", "started"), ("p1", "ignored-sigterm")]
    assert not pid_alive(pids(log, "started")[0])


async def test_second_stop_request_kills_without_waiting_for_the_timeout(stand_in, tmp_path):
    log = tmp_path / "log"
    stop, kill = asyncio.Event(), asyncio.Event()
    commands = {"p1": stand_in_command(stand_in, log, "stubborn")("p1")}
    pool = asyncio.create_task(
        supervise_pool(commands, stop, kill=kill, policy=FAST_RESTART, shutdown_timeout_s=60)
    )
    await until(lambda: bool(notes(log)))
    stop.set()
    await until(lambda: ("p1", "ignored-sigterm") in notes(log))
    kill.set()
    await asyncio.wait_for(pool, 5)
    assert not pid_alive(pids(log, "started")[0])


async def test_child_that_cannot_be_started_is_retried_without_stopping_the_pool(
    stand_in, tmp_path, caplog
):
    log = tmp_path / "log"
    commands = {
        "broken": [str(tmp_path / "no-such-program")],
        "p1": stand_in_command(stand_in, log)("p1"),
    }
    await run_pool_until(
        commands, lambda: "restarting" in caplog.text and bool(notes(log)), policy=FAST_RESTART
    )
    assert "instance=broken cannot start" in caplog.text
    assert notes(log) == [("p1", "started"), ("p1", "stopped")]


# -- run_pool as a process: real signals -------------------------------------------

POOL_MAIN = textwrap.dedent(
    """
    import asyncio, logging, sys
    from persister.config import load_config
    from persister.pool import run_pool

    program, log, config_path = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO)
    config = load_config([config_path])
    command = lambda name: [sys.executable, program, name, log, "polite"]
    pool = run_pool([config_path], config, command=command)
    try:  # the loop `persister pool` runs on when uvloop is installed
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(pool))
    sys.exit(uvloop.run(pool))
    """
)


def write_config(path: Path, writers: Sequence[str]) -> None:
    lines = ["replication_secret: s", "stream_writers:", f"  events: [{', '.join(writers)}]"]
    lines.append("instance_map:")
    lines += [f"  {w}: {{host: 127.0.0.1, port: {18200 + i}}}" for i, w in enumerate(writers)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_pool_process_stops_every_child_on_signal_and_exits_0(stand_in, tmp_path, signum):
    log, config = tmp_path / "log", tmp_path / "shared.yaml"
    write_config(config, ["p1", "p2"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pool = subprocess.Popen(
        [sys.executable, "-c", POOL_MAIN, str(stand_in), str(log), str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await until(lambda: len(notes(log)) == 2)
        pool.send_signal(signum)
        _, stderr = await asyncio.to_thread(pool.communicate, timeout=10)
    finally:
        if pool.poll() is None:
            pool.kill()
    assert pool.returncode == 0, stderr
    assert sorted(notes(log)) == [
        ("p1", "started"), ("p1", "stopped"), ("p2", "started"), ("p2", "stopped"),
    ]  # fmt: skip
    assert f"{signal.Signals(signum).name}: stopping every instance" in stderr


# -- persister status -------------------------------------------------------------


class FakeInstance:
    """Answers /health and /_persist/v1/status; events_persisted grows per call."""

    def __init__(self, name: str, position: int, sequence: int, growth: int) -> None:
        self.body = InstanceStatusBody(name, position, 12, 40, 1000, sequence)
        self.growth = growth
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(HEALTH_PATH, self._health)
        app.router.add_get(STATUS_PATH, self._status)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _status(self, request: web.Request) -> web.Response:
        answer = self.body
        self.body = InstanceStatusBody(
            answer.instance, answer.position, answer.queued_events, answer.rooms_owned,
            answer.events_persisted + self.growth, answer.sequence,
        )  # fmt: skip
        return web.json_response(
            {f: getattr(answer, f) for f in InstanceStatusBody.__struct_fields__}
        )


def pool_config(ports: dict[str, int]) -> Config:
    return config_from_mapping(
        {
            "replication_secret": "s",
            "stream_writers": {"events": list(ports)},
            "instance_map": {n: {"host": "127.0.0.1", "port": p} for n, p in ports.items()},
        }
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def two_instances():
    started = [FakeInstance("p1", 1240, 1250, 50), FakeInstance("p2", 1200, 1245, 0)]
    for instance in started:
        await instance.start()
    yield started
    for instance in started:
        assert instance.runner is not None
        await instance.runner.cleanup()


async def test_status_reports_position_lag_queue_rooms_and_events_per_second(two_instances):
    p1, p2 = two_instances
    config = pool_config({"p1": p1.port, "p2": p2.port})

    one, two = await gather_status(config, interval_s=0.2, database=None)

    assert (one.instance, one.reachable, one.position, one.position_source) == (
        "p1", True, 1240, "live",
    )  # fmt: skip
    assert (one.queued_events, one.rooms_owned) == (12, 40)
    assert one.sequence == two.sequence == 1250  # the highest any instance reports
    assert (one.lag, two.lag) == (10, 50)
    assert one.events_per_s is not None and 50 < one.events_per_s <= 250  # 50 per >= 0.2s
    assert two.events_per_s == 0


async def test_status_of_a_silent_instance_shows_its_stored_position_and_why(two_instances):
    p1, _ = two_instances
    config = pool_config({"p1": p1.port, "p3": free_port()})

    async def stored(_: Config) -> StoredPositions:
        return StoredPositions({"p1": 1100, "p3": 1180}, sequence=1300)

    one, three = await gather_status(config, interval_s=0, database=stored)

    assert one.position == 1240 and one.position_source == "live"
    assert (three.reachable, three.position, three.position_source) == (False, 1180, "stored")
    assert three.sequence == 1300 and three.lag == 120
    assert three.error is not None and "127.0.0.1" in three.error
    assert three.events_per_s is None and three.queued_events is None


async def test_status_exits_1_when_an_instance_does_not_answer(two_instances):
    p1, p2 = two_instances
    up = await gather_status(
        pool_config({"p1": p1.port, "p2": p2.port}), interval_s=0, database=None
    )
    assert exit_status(up) == 0
    one_down = await gather_status(
        pool_config({"p1": p1.port, "p3": free_port()}), interval_s=0, database=None
    )
    assert exit_status(one_down) == 1


async def test_status_names_an_unreadable_database_on_silent_instances():
    config = pool_config({"p1": free_port()})

    async def broken(_: Config) -> StoredPositions:
        raise OSError("connection refused")

    [row] = await gather_status(config, interval_s=0, database=broken)
    assert row.position is None
    assert row.error is not None and "database: connection refused" in row.error


def test_format_status_prints_summary_table_and_notes():
    rows = [
        InstanceStatus("p1", "127.0.0.1:18101", True, 1240, "live", 1250, 10, 12, 40, 250.0),
        InstanceStatus("p2", "127.0.0.1:18102", False, 1180, "stored", 1250, 70,
                       error="connection refused"),
    ]  # fmt: skip
    text = format_status(rows)
    lines = text.splitlines()
    assert lines[0] == "events stream: sequence at 1250, complete up to 1180; 1/2 writers up"
    assert lines[1].split() == ["INSTANCE", "ADDRESS", "UP", "POSITION", "LAG", "QUEUED",
                                "ROOMS", "EVENTS/S"]  # fmt: skip
    assert lines[2].split() == ["p1", "127.0.0.1:18101", "yes", "1240", "10", "12", "40", "250.0"]
    assert lines[3].split() == ["p2", "127.0.0.1:18102", "NO", "1180*", "70", "-", "-", "-"]
    assert lines[4].startswith("* position read from stream_positions")
    assert lines[5] == "p2: connection refused"


def test_format_status_says_unknown_when_a_position_is_missing():
    rows = [InstanceStatus("p1", "h:1", False)]
    assert "complete up to unknown; 0/1 writers up" in format_status(rows)
