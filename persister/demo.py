"""`make demo`: a pool of two persisters, a short load through the client.

It does what an operator would: write a shared config, `persister migrate`,
`persister pool`, wait for `/health`, then the load harness pushes a
Matrix-like workload through `persister.client` against that pool and prints
its table (events/s, latency, stream lag, ratio to a bare COPY of the same
rows). The pool is stopped with SIGTERM at the end, as systemd would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from persister import devservices
from persister.bench.databases import create_database, drop_database
from persister.bench.harness import main as bench_main

# A "persister_bench_" name: the harness's drop refuses to touch any other database.
DEMO_DB = "persister_bench_demo"
INSTANCES = ("persister1", "persister2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(folder: Path, database_url: str, redis_url: str) -> Path:
    config = {
        "database": {"url": database_url},
        "redis": {"url": redis_url, "channel": f"persister.demo.{os.getpid()}"},
        "replication_secret": "demo-secret",
        "stream_writers": {"events": list(INSTANCES)},
        "instance_map": {name: {"host": "127.0.0.1", "port": _free_port()} for name in INSTANCES},
        "log_level": "WARNING",
    }
    path = folder / "shared.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _persister(*args: str) -> list[str]:
    return [sys.executable, "-m", "persister", *args]


def _wait_healthy(config_path: Path, timeout_s: float = 30.0) -> None:
    ports = [
        spec["port"]
        for spec in yaml.safe_load(config_path.read_text(encoding="utf-8"))["instance_map"].values()
    ]
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: persister on port {port} did not become healthy")
            time.sleep(0.2)


def main() -> int:
    services = devservices.up()
    # The demo's config names its own database; these (set by `make`) would
    # win over it in the pool and the harness and send them to the shared one.
    for name in ("PERSISTER_DATABASE_URL", "PERSISTER_REDIS_URL"):
        os.environ.pop(name, None)
    folder = devservices.data_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    asyncio.run(drop_database(services.database_url, DEMO_DB))
    database_url = asyncio.run(create_database(services.database_url, DEMO_DB))
    config = _write_config(folder, database_url, services.redis_url)
    print(f"demo: config {config}, database {DEMO_DB}")
    subprocess.run(_persister("migrate", "--config", str(config)), check=True)
    pool = subprocess.Popen(_persister("pool", "--config", str(config)))
    try:
        _wait_healthy(config)
        print("demo: pool of 2 persisters healthy; pushing a short load through the client")
        return bench_main([
            "--config", str(config), "--duration", "8", "--warmup", "2", "--rooms", "200",
            "--events", "200000", "--batch", "50", "--message-bytes", "1024",
            "--ceiling-seconds", "2", "--out", str(folder / "result"),
        ])  # fmt: skip
    finally:
        pool.send_signal(signal.SIGTERM)
        code = pool.wait(timeout=60)
        print(f"demo: pool stopped (exit {code})")


if __name__ == "__main__":
    sys.exit(main())
