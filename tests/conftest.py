"""Shared test fixtures: the servers of this run, databases and Redis channels.

The URLs come from PERSISTER_DATABASE_URL / PERSISTER_REDIS_URL (`make test`
sources them from .data/services.env); without them, persister.devservices
finds the local servers or starts embedded ones, and stops at the end of the
session whatever it had to start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from persister import devservices

pytest_plugins = ["tests.fixtures.db", "tests.fixtures.redis", "tests.fixtures.persister"]


@pytest.fixture(scope="session")
def services() -> Iterator[devservices.Services]:
    database_url = os.environ.get(devservices.DATABASE_ENV)
    redis_url = os.environ.get(devservices.REDIS_ENV)
    if database_url and redis_url:
        yield devservices.Services(database_url, redis_url)
        return
    found = devservices.up()
    yield found
    devservices.down(only=found.started)
