"""The config refuses, naming the key, every value that could only fail later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from persister.config import ConfigError, config_from_mapping, merge


def raw(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "stream_writers": {"events": ["p1"]},
        "instance_map": {"p1": {"host": "127.0.0.1", "port": 18101}},
        "replication_secret": "s3cret",
    }
    return merge(base, overrides)


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_a_port_outside_1_to_65535_is_refused(port: int) -> None:
    with pytest.raises(ConfigError, match=r"instance_map\.p1\.port"):
        config_from_mapping(raw(instance_map={"p1": {"port": port}}))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("persist", "max_body_bytes", -5),
        ("persist", "max_queued_bytes", 0),
        ("persist", "max_queued_events", 0),
        ("persist", "max_events_per_request", 0),
        ("persist", "max_batch_events", 0),
        ("persist", "max_batch_delay_ms", -1),
        ("persist", "retry_after_s", -0.5),
        ("database", "writer_connections", 0),
        ("database", "connect_timeout_s", 0),
    ],
)
def test_a_limit_out_of_range_is_refused_naming_its_key(section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        config_from_mapping(raw(**{section: {key: value}}))


def test_a_negative_shutdown_timeout_is_refused() -> None:
    with pytest.raises(ConfigError, match="shutdown_timeout_s"):
        config_from_mapping(raw(shutdown_timeout_s=-1))


def test_a_queue_too_small_for_the_largest_body_is_refused() -> None:
    # Else a request the body limit lets in would be answered 503 forever.
    with pytest.raises(ConfigError, match="max_queued_bytes must be at least"):
        config_from_mapping(raw(persist={"max_queued_bytes": 1000}))


@pytest.mark.parametrize("level", ["VERBOSE", "trace", ""])
def test_an_unknown_log_level_is_refused(level: str) -> None:
    with pytest.raises(ConfigError, match="log_level must be one of"):
        config_from_mapping(raw(log_level=level))


def test_a_log_level_may_be_written_in_any_case() -> None:
    assert config_from_mapping(raw(log_level="warning")).log_level == "warning"


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "redis"])
def test_a_redis_url_without_a_redis_scheme_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="redis.url must start with"):
        config_from_mapping(raw(redis={"url": url}))


@pytest.mark.parametrize("secret", [" s3cret", "s3cret ", "s3cret\n"])
def test_a_secret_with_surrounding_whitespace_is_refused(secret: str) -> None:
    # HTTP drops it from the Authorization header, so no client could match.
    with pytest.raises(ConfigError, match="whitespace"):
        config_from_mapping(raw(replication_secret=secret))


def test_an_unreadable_or_empty_secret_file_is_a_config_error(tmp_path: Path) -> None:
    missing = config_from_mapping(raw(replication_secret_path=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="cannot read"):
        missing.secret()
    (tmp_path / "empty").write_text("\n")
    empty = config_from_mapping(raw(replication_secret_path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="holds no secret"):
        empty.secret()


def test_every_connection_carries_the_configured_connect_timeout() -> None:
    config = config_from_mapping(raw(database={"url": "postgresql://h/db", "connect_timeout_s": 7}))
    assert conninfo_to_dict(config.database.conninfo())["connect_timeout"] == "7"
    # libpq's minimum is 2 s; a URL's own timeout wins.
    short = config_from_mapping(raw(database={"connect_timeout_s": 0.5}))
    assert conninfo_to_dict(short.database.conninfo())["connect_timeout"] == "2"
    own = config_from_mapping(raw(database={"url": "postgresql://h/db?connect_timeout=9"}))
    assert conninfo_to_dict(own.database.conninfo())["connect_timeout"] == "9"
