"""CPU seconds of the persisters and of PostgreSQL, read from /proc.

psutil is not a dependency; /proc/<pid>/stat has what is needed (utime and
stime in clock ticks). PostgreSQL runs one process per connection, so its
cost is the sum over backends: those connected to the benchmark database,
and the server's shared background processes (WAL writer, checkpointer...)
apart, since the latter also work for other users of a shared server.

Processes are sampled periodically so that a backend that exits during a
phase still counts up to its last sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

PROC = Path("/proc")
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
# /proc/net/tcp state code of a listening socket.
TCP_LISTEN = "0A"


class CpuReport(msgspec.Struct):
    wall_s: float
    persisters_s: dict[str, float]
    postgres_bench_db_s: float
    postgres_background_s: float
    postgres_other_db_s: float
    harness_s: float
    # Busy share of every core of the machine over the window (all users).
    machine_busy_fraction: float


def process_ticks(pid: int) -> int | None:
    """utime + stime of a process, None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _cmdline(pid: str) -> str:
    try:
        raw = (PROC / pid / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def postgres_processes() -> dict[int, str]:
    """Every PostgreSQL process (they rename themselves "postgres: ...")."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            cmdline = _cmdline(entry.name)
            if cmdline.startswith("postgres:") or cmdline.split(" ", 1)[0].endswith("/postgres"):
                found[int(entry.name)] = cmdline
    return found


def postgres_role(cmdline: str, database: str) -> str:
    """ "bench" for a backend of `database`, "other" for other databases'
    backends, "background" for the server's own processes."""
    # Titles read "postgres: [<cluster>: ]<user> <database> <client> <activity>"
    # for backends, where <client> is "host(port)" or "[local]".
    parts = cmdline.split()
    if not parts or parts[0] != "postgres:":
        return "background"  # the postmaster itself
    parts = parts[1:]
    if parts and parts[0].endswith(":"):
        parts = parts[1:]
    if len(parts) >= 3 and (parts[2].endswith(")") or parts[2] == "[local]"):
        return "bench" if parts[1] == database else "other"
    return "background"


def listening_pids(port: int) -> list[int]:
    """Processes holding a TCP socket listening on `port` (any address)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and _holds_socket(entry / "fd", inodes):
            pids.append(int(entry.name))
    return pids


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == TCP_LISTEN:
                inodes.add(fields[9])
    return inodes


def _holds_socket(fd_dir: Path, inodes: set[str]) -> bool:
    try:
        links = list(fd_dir.iterdir())
    except OSError:
        return False
    for link in links:
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    first = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """Counts CPU between `start` and `stop`; call `sample` now and then."""

    def __init__(self, persister_pids: Mapping[str, Iterable[int]], database: str) -> None:
        self._persisters = {name: list(pids) for name, pids in persister_pids.items()}
        self._database = database
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._roles: dict[int, str] = {}
        self._machine_start = (0, 0)
        self._harness_start = 0.0
        self._wall_start = 0.0

    def start(self, now: float) -> None:
        self._wall_start = now
        self._harness_start = _own_cpu_s()
        self._machine_start = machine_ticks()
        self._scan(first=True)

    def sample(self) -> None:
        self._scan(first=False)

    def stop(self, now: float) -> CpuReport:
        self._scan(first=False)
        busy0, total0 = self._machine_start
        busy1, total1 = machine_ticks()
        return CpuReport(
            wall_s=now - self._wall_start,
            persisters_s={name: self._seconds(pids) for name, pids in self._persisters.items()},
            postgres_bench_db_s=self._role_seconds("bench"),
            postgres_background_s=self._role_seconds("background"),
            postgres_other_db_s=self._role_seconds("other"),
            harness_s=_own_cpu_s() - self._harness_start,
            machine_busy_fraction=(busy1 - busy0) / max(1, total1 - total0),
        )

    def _scan(self, first: bool) -> None:
        pids: dict[int, str] = {pid: "persister" for ps in self._persisters.values() for pid in ps}
        for pid, cmdline in postgres_processes().items():
            pids[pid] = postgres_role(cmdline, self._database)
        for pid, role in pids.items():
            ticks = process_ticks(pid)
            if ticks is None:
                continue
            # A process first seen after the start was born inside the window.
            self._first.setdefault(pid, ticks if first else 0)
            self._last[pid] = ticks
            self._roles.setdefault(pid, role)

    def _seconds(self, pids: Iterable[int]) -> float:
        return sum(self._last.get(p, 0) - self._first.get(p, 0) for p in pids) * TICK_S

    def _role_seconds(self, role: str) -> float:
        return self._seconds(p for p, r in self._roles.items() if r == role)


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system
