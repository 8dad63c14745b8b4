"""The live progress line on stderr (rewritten in place on a terminal)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from persister.bench.stats import PhaseRecorder

# Off a terminal (CI logs, files) a line every this many seconds is enough.
PLAIN_INTERVAL_S = 5.0


class Progress:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last_plain = 0.0

    def update(self, phase: str, recorder: PhaseRecorder, total_events: int, now: float) -> None:
        if not self._tty and now - self._last_plain < PLAIN_INTERVAL_S:
            return
        self._last_plain = now
        events, p99 = recorder.recent(now)
        warm = "warm-up " if now < recorder.measured_from else ""
        p99_text = "-" if math.isnan(p99) else f"{p99:.1f}ms"
        line = (
            f"[{phase}] {warm}{now - recorder.started:5.1f}s  {events:>7} events/s  "
            f"p99 {p99_text:>8}  acked {total_events:>9}  "
            f"errors {sum(recorder.errors.values())}"
        )
        if self._tty:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def message(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K")
        self._stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._stream.flush()
