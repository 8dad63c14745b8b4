"""The lane queueing model (bench/lane_model.py) that bench/README.md quotes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

MODEL_PATH = Path(__file__).parents[2] / "bench" / "lane_model.py"


@pytest.fixture(scope="module")
def lane_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lane_model", MODEL_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lane_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_lone_request_takes_one_transaction(lane_model: ModuleType) -> None:
    model = lane_model.Model(rate_events_per_s=20.0, a_ms=3.0, b_ms=0.07, duration_s=120.0)
    for policy in ("static", "pooled", "one-lane"):
        ordered = lane_model.latencies_ms(model, policy)
        assert len(ordered) > 20
        assert lane_model.quantile(ordered, 0.5) == pytest.approx(3.0 + 0.07 * 50)


def test_under_load_requests_queue_and_pooled_lanes_queue_least(lane_model: ModuleType) -> None:
    model = lane_model.Model(rate_events_per_s=10900.0, a_ms=3.0, b_ms=0.07, duration_s=30.0)
    p99 = {
        policy: lane_model.quantile(lane_model.latencies_ms(model, policy), 0.99)
        for policy in ("static", "pooled", "one-lane")
    }
    assert p99["pooled"] < p99["static"] < p99["one-lane"]
    assert p99["static"] > 2 * (3.0 + 0.07 * 50)
