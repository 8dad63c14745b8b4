"""`persister pool`: run every writer of the pool as child processes.

Production runs one systemd unit per instance (contrib/systemd); this is the
same arrangement for a laptop, a demo or a load run: one command starts each
instance of `stream_writers.events`, restarts one that dies (with backoff,
as systemd's Restart=always would), and on SIGTERM or SIGINT stops them all
the way systemd would: SIGTERM, then SIGKILL for any instance still running
after the shutdown timeout. A second SIGTERM or SIGINT kills at once.

Children get their own session (and so their own process group) so that a
Ctrl-C in the terminal reaches only the pool, which then stops the children
in order, instead of every process at once. The price: if the pool itself
is SIGKILLed, its children keep running; stop them by pid. (A session
rather than `process_group=0`: uvloop, which the CLI uses when installed,
does not take that argument.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from persister.config import Config

logger = logging.getLogger(__name__)

# A child drains within its own shutdown_timeout_s; this margin lets it
# finish exiting before the pool reaches for SIGKILL.
KILL_GRACE_S = 5.0

CommandFor = Callable[[str], Sequence[str]]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A child that ran this long was healthy: its next crash restarts fast again.
    stable_after_s: float = 10.0


@dataclass(slots=True)
class _Stopping:
    """The pool's shutdown requests: `stop` once, then `kill` if asked twice."""

    stop: asyncio.Event
    kill: asyncio.Event

    def request(self, signame: str) -> None:
        if self.stop.is_set():
            logger.warning("%s again: killing every instance now", signame)
            self.kill.set()
        else:
            logger.info("%s: stopping every instance", signame)
            self.stop.set()


def persister_command(config_paths: Sequence[str]) -> CommandFor:
    """`python -m persister run --config ... --instance NAME`, same interpreter."""

    def command(instance: str) -> list[str]:
        argv = [sys.executable, "-m", "persister", "run"]
        for path in config_paths:
            argv += ["--config", path]
        return [*argv, "--instance", instance]

    return command


class _Supervisor:
    """Keeps one instance running until the pool stops."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        stopping: _Stopping,
        policy: RestartPolicy,
        shutdown_timeout_s: float,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stopping = stopping
        self.policy = policy
        self.shutdown_timeout_s = shutdown_timeout_s
        self.starts = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.policy.initial_delay_s
        while not self.stopping.stop.is_set():
            started = loop.time()
            code = await self._run_once()
            if code is None or self.stopping.stop.is_set():
                return
            ran_s = loop.time() - started
            if ran_s >= self.policy.stable_after_s:
                delay = self.policy.initial_delay_s
            logger.warning(
                "instance=%s exited with code %d after %.1fs; restarting in %.1fs",
                self.name, code, ran_s, delay,
            )  # fmt: skip
            if await _set_within(self.stopping.stop, delay):
                return
            delay = min(self.policy.max_delay_s, delay * 2)

    async def _run_once(self) -> int | None:
        """The child's exit code, or None once the pool stopped it."""
        try:
            child = await asyncio.create_subprocess_exec(*self.argv, start_new_session=True)
        except OSError as exc:
            logger.error("instance=%s cannot start %s: %s", self.name, self.argv[0], exc)
            return 127  # what a shell says for "command not found"
        self.starts += 1
        logger.info("instance=%s started pid=%d", self.name, child.pid)
        exited = asyncio.ensure_future(child.wait())
        if not await _first_of(exited, self.stopping.stop):
            return exited.result()
        await self._terminate(child, exited)
        return None

    async def _terminate(
        self, child: asyncio.subprocess.Process, exited: asyncio.Future[int]
    ) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        kill_now = asyncio.ensure_future(self.stopping.kill.wait())
        try:
            either: set[asyncio.Future[Any]] = {exited, kill_now}
            await asyncio.wait(
                either,
                timeout=self.shutdown_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            kill_now.cancel()
        if not exited.done():
            logger.warning(
                "instance=%s pid=%d still running; sending SIGKILL", self.name, child.pid
            )
            # The whole group: whatever the child started dies with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        code = await exited
        logger.info("instance=%s pid=%d stopped with code %d", self.name, child.pid, code)


async def _first_of(exited: asyncio.Future[int], stop: asyncio.Event) -> bool:
    """Wait for the child to exit or the pool to stop; True if the pool stopped."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        either: set[asyncio.Future[Any]] = {exited, stopped}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    return not exited.done()


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def supervise_pool(
    commands: Mapping[str, Sequence[str]],
    stop: asyncio.Event,
    *,
    kill: asyncio.Event | None = None,
    policy: RestartPolicy | None = None,
    shutdown_timeout_s: float = 30.0,
) -> None:
    """Run one child per entry of `commands` until `stop` is set, then stop them.

    `kill`, once set during the shutdown, skips what is left of the timeout.
    """
    stopping = _Stopping(stop, kill or asyncio.Event())
    supervisors = [
        _Supervisor(name, argv, stopping, policy or RestartPolicy(), shutdown_timeout_s)
        for name, argv in commands.items()
    ]
    await asyncio.gather(*(s.run() for s in supervisors))


async def run_pool(
    config_paths: Sequence[str],
    config: Config,
    *,
    command: CommandFor | None = None,
    policy: RestartPolicy | None = None,
) -> int:
    """`persister pool`: serve until SIGTERM or SIGINT, stop every child, return 0."""
    command_for = command or persister_command(config_paths)
    commands = {name: command_for(name) for name in config.stream_writers.events}
    stopping = _Stopping(asyncio.Event(), asyncio.Event())
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, stopping.request, signal.Signals(signum).name)
    logger.info("starting %d instances: %s", len(commands), ", ".join(commands))
    try:
        await supervise_pool(
            commands,
            stopping.stop,
            kill=stopping.kill,
            policy=policy,
            shutdown_timeout_s=config.shutdown_timeout_s + KILL_GRACE_S,
        )
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    logger.info("every instance stopped")
    return 0
