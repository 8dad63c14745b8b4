"""`persister run` with fault hooks: `python -m tests.faults.hooked_persister run ...`.

The crash-loop tool starts persisters through this module so that it can
kill one at a chosen point of the write path, not only at a random moment.
It behaves exactly like `python -m persister run` until armed:

    write the hook's name to $PERSISTER_FAULT_DIR/<pid>.arm, send SIGUSR1

and the next time the process reaches that point it writes
`FAULT-HOOK <name>` to its stderr and SIGKILLs itself. Hook points:

    mid_batch       rows written, orderings drawn, COMMIT not yet sent
    mid_commit      a thread SIGKILLs the process 0-3 ms after the batch is
                    written, so the kill lands before, during or just after
                    COMMIT (the server may or may not have committed)
    after_commit    COMMIT returned; nobody answered, nothing published
    before_publish  the next Redis message is about to be published
    deputy          announcing for a dead peer: the peer's fence and
                    position row are taken, the transaction is not committed

Every message the process publishes is also logged, one JSON line each, to
$PERSISTER_FAULT_DIR/publish.<pid>.jsonl (pid, own instance, message
instance, prev, pos, rows, wall time before the publish call), so that
announcements can be told apart by the process that made them.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

HOOKS = ("mid_batch", "mid_commit", "after_commit", "before_publish", "deputy")
FAULT_DIR_ENV = "PERSISTER_FAULT_DIR"

_T = TypeVar("_T")
_armed: str | None = None
_fault_dir = Path(os.environ.get(FAULT_DIR_ENV, "."))


def _on_arm(signum: int, frame: object) -> None:
    global _armed
    try:
        name = (_fault_dir / f"{os.getpid()}.arm").read_text(encoding="utf-8").strip()
    except OSError:
        return
    _armed = name if name in HOOKS else None


def _die(point: str) -> None:
    os.write(2, f"FAULT-HOOK {point} pid={os.getpid()}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def fire(point: str) -> None:
    if _armed == point:
        _die(point)


def _after(point: str, original: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> _T:
        result = await original(*args, **kwargs)
        fire(point)
        return result

    return wrapper


def _replace(owner: Any, name: str, new: Any) -> None:
    setattr(owner, name, new)


def _install_hooks() -> None:
    from persister import liveness
    from persister.replication.publisher import Publisher
    from persister.storage import events_txn, pipeline
    from persister.writer.lane import Lane

    commit_txn = events_txn.commit_txn

    async def write_then_maybe_die(conn: Any, write: Any) -> None:
        if _armed == "mid_batch":
            # The rows are written and the orderings drawn; the COMMIT never leaves.
            await pipeline.round_trip(conn, (write,))
            fire("mid_batch")
        await commit_txn(conn, write)

    _replace(events_txn, "commit_txn", write_then_maybe_die)
    _replace(liveness, "_relay_command_txn", _after("deputy", liveness._relay_command_txn))

    write_batch = Lane._write_batch

    def die_soon() -> None:
        time.sleep(random.uniform(0.0, 0.003))
        _die("mid_commit")

    async def write_batch_then_maybe_die(self: Lane, *args: Any) -> Any:
        result = await write_batch(self, *args)
        if _armed == "mid_commit":
            threading.Thread(target=die_soon, daemon=True).start()
        return result

    _replace(Lane, "_write_batch", write_batch_then_maybe_die)

    acknowledge = Lane._acknowledge

    def acknowledge_after_hook(self: Lane, *args: Any) -> None:
        fire("after_commit")
        acknowledge(self, *args)

    _replace(Lane, "_acknowledge", acknowledge_after_hook)

    send_next = Publisher._send_next
    log_fd = os.open(
        _fault_dir / f"publish.{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )

    async def logged_send_next(self: Publisher) -> None:
        fire("before_publish")
        command = self._outbox.next_command()
        sent_at = time.time()
        await send_next(self)
        line = {
            "pid": os.getpid(), "own": self.instance, "instance": command.instance,
            "prev": command.prev, "pos": command.pos, "rows": len(getattr(command, "rows", ())),
            "t": sent_at,
        }  # fmt: skip
        os.write(log_fd, (json.dumps(line) + "\n").encode())

    _replace(Publisher, "_send_next", logged_send_next)


def main() -> int:
    _fault_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGUSR1, _on_arm)
    _install_hooks()
    from persister.cli import main as persister_main

    return persister_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
