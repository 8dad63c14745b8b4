"""The CLI's promise: every failure an operator can cause ends with exit
status 1 and one line on stderr, soon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml


def write_config(folder: Path, database_url: str, **extra: object) -> Path:
    config = {
        "database": {"url": database_url, "connect_timeout_s": 2},
        "stream_writers": {"events": ["p1"]},
        "instance_map": {"p1": {"host": "127.0.0.1", "port": 18101}},
        "replication_secret": "s3cret",
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def persister(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    # The suite's own database and Redis (`make test` sets them) would win over the file.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTER_")}
    return subprocess.run(
        [sys.executable, "-m", "persister", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=environ,
    )


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_migrate_gives_up_on_a_silent_database_within_its_connect_timeout(
    tmp_path: Path, silent_server: int
) -> None:
    config = write_config(tmp_path, f"postgresql://postgres@127.0.0.1:{silent_server}/db")
    started = time.monotonic()
    done = persister("migrate", "--config", str(config))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert time.monotonic() - started < 20  # libpq alone would wait 130 s


def test_migrate_names_a_missing_database_name_without_showing_the_password(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "postgresql://postgres:hunter2@127.0.0.1:5432")
    done = persister("migrate", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "persister migrate: database.url names no database (postgresql://host:port/NAME)"
    ]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"log_level": "VERBOSE"}, "log_level must be one of"),
        ({"redis": {"url": "http://127.0.0.1:6379/0"}}, "redis.url must start with"),
        ({"instance_map": {"p1": {"port": 70000}}}, "instance_map.p1.port must be 1-65535"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, extra: dict[str, object], says: str
) -> None:
    config = write_config(tmp_path, "postgresql://postgres@127.0.0.1:5432/db", **extra)
    done = persister("run", "--instance", "p1", "--config", str(config))
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert says in line
