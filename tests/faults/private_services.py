"""A PostgreSQL cluster and a Redis of the test's own, reachable from its test hosts.

The machine's PostgreSQL and Redis listen on loopback only and are shared
with other tests running at the same time, so a fault test must neither
reconfigure nor stop them. It starts private ones instead:

    pg = PrivatePostgres.create("pwpart", listen=["127.0.0.1", "10.200.3.1"],
                                trust="10.200.3.0/30", settings={...})
    pg.url("10.200.3.1", "persister")     # as seen from the namespace
    redis = PrivateRedis.start(["127.0.0.1", "10.200.3.1"], log_path)

Debian's postgresql-common makes the cluster (`pg_createcluster`), so it
needs root and the server package; `postgres_unavailable()` says why not.
`drop()`/`stop()` are idempotent, and `remove_stale_clusters` drops the
clusters of test runs that died before their finalizers ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

COMMAND_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1
PG_ETC = Path("/etc/postgresql")


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback and any address)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def die_with_parent() -> None:
    """Popen's preexec_fn: SIGKILL this child when the test process dies, even by SIGKILL.

    Call Popen from the main thread: the signal follows the *thread* that forked.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postgres_version() -> str | None:
    """The newest server major version installed, e.g. "15"."""
    base = Path("/usr/lib/postgresql")
    versions = sorted(
        (p.name for p in base.glob("*") if (p / "bin" / "postgres").exists()),
        key=lambda v: [int(x) for x in v.split(".") if x.isdigit()],
    )
    return versions[-1] if versions else None


def postgres_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "creating a PostgreSQL cluster needs root"
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian's postgresql-common)"
    if postgres_version() is None:
        return "no PostgreSQL server under /usr/lib/postgresql"
    return None


def redis_unavailable() -> str | None:
    return None if shutil.which("redis-server") else "redis-server is not installed"


def remove_stale_clusters(prefix: str) -> list[str]:
    """Drop clusters `<prefix><pid>` whose test process is gone."""
    removed = []
    for version_dir in PG_ETC.glob("*"):
        for cluster in version_dir.glob(f"{prefix}*"):
            match = re.fullmatch(rf"{re.escape(prefix)}(\d+)", cluster.name)
            if match and not _pid_alive(int(match.group(1))):
                PrivatePostgres(version_dir.name, cluster.name, 0).drop()
                removed.append(cluster.name)
    return removed


@dataclass
class PrivatePostgres:
    version: str
    name: str
    port: int

    @classmethod
    def create(
        cls,
        prefix: str,
        *,
        listen: Sequence[str],
        trust: Sequence[str],
        settings: Mapping[str, str | int],
    ) -> PrivatePostgres:
        """Cluster `<prefix><pid>`, started, trusting local users and `trust` networks."""
        version = postgres_version()
        assert version is not None
        cluster = cls(version, f"{prefix}{os.getpid()}", free_port())
        try:
            _run([
                "pg_createcluster", version, cluster.name, "-p", str(cluster.port),
                "--start-conf=manual", "--", "--auth=trust",
            ])  # fmt: skip
            conf = {
                "listen_addresses": "'" + ",".join(listen) + "'",
                "ssl": "off",
                # A throwaway cluster: durability across an OS crash is not tested here.
                "fsync": "off",
                "full_page_writes": "off",
                **{k: str(v) for k, v in settings.items()},
            }
            cluster.etc.joinpath("conf.d").mkdir(exist_ok=True)
            cluster.etc.joinpath("conf.d", "zz-test.conf").write_text(
                "".join(f"{k} = {v}\n" for k, v in conf.items())
            )
            with cluster.etc.joinpath("pg_hba.conf").open("a") as hba:
                for network in trust:
                    hba.write(f"host all all {network} trust\n")
            _run(["pg_ctlcluster", version, cluster.name, "start"])
        except BaseException:
            cluster.drop()
            raise
        return cluster

    @property
    def etc(self) -> Path:
        return PG_ETC / self.version / self.name

    @property
    def log_path(self) -> Path:
        return Path(f"/var/log/postgresql/postgresql-{self.version}-{self.name}.log")

    def url(self, host: str, database: str) -> str:
        return f"postgresql://postgres@{host}:{self.port}/{database}"

    def drop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            _run(["pg_ctlcluster", self.version, self.name, "stop", "-m", "immediate"])
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            _run(["pg_dropcluster", self.version, self.name])
        # Our conf.d file keeps pg_dropcluster from removing the folder.
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.rmtree(Path("/var/lib/postgresql") / self.version / self.name, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


@dataclass
class PrivateRedis:
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, bind: Sequence[str], log_path: Path, timeout_s: float = 10.0) -> PrivateRedis:
        port = free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    *bind,
                    "--port",
                    str(port),
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(log_path.parent),
                ],  # fmt: skip
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        redis = cls(port, process)
        deadline = time.monotonic() + timeout_s
        while not redis.answers():
            if process.poll() is not None or time.monotonic() > deadline:
                redis.stop()
                raise RuntimeError(f"redis-server did not start; see {log_path}")
            time.sleep(0.05)
        return redis

    def url(self, host: str) -> str:
        return f"redis://{host}:{self.port}/0"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
