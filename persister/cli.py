"""The `persister` command: one console script, one subcommand per job.

Every failure an operator can cause (bad config, unreachable database or
Redis, port in use) ends with exit status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import psycopg
from redis.exceptions import RedisError

from persister.config import Config, load_config
from persister.errors import PersisterError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persister", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("migrate", "bring the database to the current schema"),
        ("run", "serve one persister instance"),
        ("pool", "run every instance of stream_writers.events as child processes"),
        ("status", "print each instance's position, lag and queue"),
        ("reshard", "change the writer pool or pin rooms, while it runs"),
    ]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "--config",
            action="append",
            required=True,
            metavar="FILE",
            help="config file; repeat to layer files, later ones win",
        )
        if name == "run":
            cmd.add_argument("--instance", help="instance name (or instance_name in config)")
        if name == "reshard":
            _reshard_arguments(cmd)
    return parser


def _reshard_arguments(cmd: argparse.ArgumentParser) -> None:
    what = cmd.add_mutually_exclusive_group(required=True)
    what.add_argument("--writers", help="the new writer list, comma-separated, in shard order")
    what.add_argument(
        "--pin", nargs=2, metavar=("ROOM_ID", "INSTANCE"), help="place one room on one instance"
    )
    what.add_argument("--unpin", metavar="ROOM_ID", help="return a pinned room to placement")
    what.add_argument("--show", action="store_true", help="print the map in force")


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _migrate(args: argparse.Namespace, config: Config) -> int:
    from persister.storage.migrate import migrate

    applied = await migrate(config.database.conninfo())
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


async def _run(args: argparse.Namespace, config: Config) -> int:
    from persister.server import resolve_instance, serve

    await serve(config, resolve_instance(config, args.instance))
    return 0


async def _pool(args: argparse.Namespace, config: Config) -> int:
    from persister.pool import run_pool

    return await run_pool(args.config, config)


async def _status(args: argparse.Namespace, config: Config) -> int:
    from persister.status import exit_status, format_status, gather_status

    statuses = await gather_status(config)
    print(format_status(statuses))
    return exit_status(statuses)


async def _reshard(args: argparse.Namespace, config: Config) -> int:
    from persister.reshard import reshard_main

    print(await reshard_main(config, args.writers, args.pin, args.unpin, args.show))
    return 0


Command = Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {
    "migrate": _migrate,
    "run": _run,
    "pool": _pool,
    "status": _status,
    "reshard": _reshard,
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # The harness has its own options (it may start its own pool).
        from persister.bench.harness import main as bench_main

        return bench_main(arguments[1:])
    args = _parser().parse_args(arguments)
    try:
        config = load_config(args.config)
        _setup_logging(config)
        return _run_async(COMMANDS[args.command](args, config))
    except PersisterError as exc:
        return _fail(args.command, exc.message)
    except psycopg.errors.UndefinedTable as exc:
        return _fail(args.command, f"{exc}; run `persister migrate` first")
    except psycopg.Error as exc:
        return _fail(args.command, f"database error: {exc}")
    except (RedisError, OSError) as exc:
        return _fail(args.command, f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return 130


def _fail(command: str, message: str) -> int:
    # One line, even when a driver's message spans several.
    print(f"persister {command}: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


if __name__ == "__main__":
    sys.exit(main())
