"""Fault tests come in two forms: a SHORT one that `make test` and CI run
(the whole of issue 7's items 1-4 in about 100 s), and a LONG one, marked
`slow`, that runs only when asked for:

    .venv/bin/python -m pytest tests/faults                        # short forms
    .venv/bin/python -m pytest tests/faults -m slow -s             # long forms, figures printed
    PERSISTER_FAULTS_LONG=1 .venv/bin/python -m pytest tests/faults -s   # both

A test has its forms as `pytest.param(..., id="short")` and
`pytest.param(..., id="long", marks=pytest.mark.slow)`; the hook below skips
the long ones otherwise. Private servers (`private_postgres`,
`private_redis`) skip the test, naming the missing tool, where they cannot
be had.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.servers import PrivatePostgres, PrivateRedis

LONG_ENV = "PERSISTER_FAULTS_LONG"
HERE = Path(__file__).parent


def _long_forms_wanted(config: pytest.Config) -> bool:
    return os.environ.get(LONG_ENV) == "1" or "slow" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _long_forms_wanted(config):
        return
    skip = pytest.mark.skip(reason=f"long form: run with -m slow or {LONG_ENV}=1")
    for item in items:
        if HERE in Path(str(item.path)).parents and item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this session's own, with commit timestamps on;
    tests may restart it or end its backends. Dropped at the end."""
    from tests.faults.crash_loop import CLUSTER_SETTINGS

    if reason := PrivatePostgres.unavailable_reason():
        pytest.skip(reason)
    cluster = PrivatePostgres.create(CLUSTER_SETTINGS)
    try:
        yield cluster
    finally:
        cluster.drop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis of this test's own that it may stop and start again."""
    if reason := PrivateRedis.unavailable_reason():
        pytest.skip(reason)
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
