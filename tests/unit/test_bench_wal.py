"""The WAL report of a phase: differences of the server's counters."""

from __future__ import annotations

from persister.bench.report import wal_line
from persister.bench.wal import WalCounters, report

BEFORE = WalCounters(
    records=1000, full_page_images=10, bytes=4_000_000, buffers_full=2, checkpoints=7
)
AFTER = WalCounters(
    records=51_000, full_page_images=110, bytes=4_000_000 + 8_192_000, buffers_full=5, checkpoints=8
)


def test_wal_report_is_what_the_server_counted_between_the_two_readings() -> None:
    wal = report(BEFORE, AFTER, events=2000)
    assert wal is not None
    assert (wal.records, wal.full_page_images, wal.buffers_full, wal.checkpoints) == (
        50_000, 100, 3, 1,
    )  # fmt: skip
    assert wal.bytes == 8_192_000
    assert wal.bytes_per_event == 4096


def test_wal_per_event_is_unknown_when_no_event_was_measured() -> None:
    wal = report(BEFORE, AFTER, events=0)
    assert wal is not None and wal.bytes_per_event is None


def test_no_wal_report_when_the_servers_statistics_were_reset_in_the_window() -> None:
    reset = WalCounters(records=20, full_page_images=0, bytes=9000, buffers_full=0, checkpoints=0)
    assert report(BEFORE, reset, events=2000) is None


def test_wal_line_names_the_checkpoints_and_the_share_of_full_page_images() -> None:
    wal = report(BEFORE, AFTER, events=2000)
    assert wal is not None
    line = wal_line(wal)
    assert "4.0 KiB/event" in line
    assert "full-page images ~10%" in line
    assert "1 checkpoint(s) begun" in line
