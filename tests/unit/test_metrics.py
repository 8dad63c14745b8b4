"""The metric names and labels that dashboards and alerts rely on.

A renamed metric breaks a dashboard silently, so every name, type and
label set is pinned here; change this table only together with
docs/operators.md.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from persister.metrics import CONTENT_TYPE, Metrics, type_class

# family name (as the parser reports it) -> (type, labels besides `le`)
PINNED = {
    "persister_events_persisted": ("counter", {"instance", "type_class"}),
    "persister_batch_events": ("histogram", {"instance"}),
    "persister_persist_latency_seconds": ("histogram", {"instance"}),
    "persister_queue_depth_events": ("gauge", {"instance"}),
    "persister_stream_position": ("gauge", {"instance"}),
    "persister_forward_extremities": ("histogram", {"instance"}),
    "persister_db_transaction_seconds": ("histogram", {"instance"}),
    "persister_requests": ("counter", {"instance", "status"}),
    "persister_batches": ("counter", {"instance", "round_trips"}),
}


def samples(metrics: Metrics) -> list[Sample]:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def fed() -> Metrics:
    metrics = Metrics("persister1", process_metrics=False)
    metrics.batch_committed(3, {"message": 2, "state": 1}, 0.02, [1, 2])
    metrics.request_finished(200, 0.05)
    metrics.set_queue_depth(7)
    metrics.set_position(1240)
    return metrics


def test_exactly_the_pinned_persister_metrics_are_exported_with_their_types_and_labels():
    text = fed().render().decode()
    # `*_created` (creation timestamps, prometheus_client's default) are not ours to pin.
    families = {
        f.name: f
        for f in text_string_to_metric_families(text)
        if f.name.startswith("persister_") and not f.name.endswith("_created")
    }
    assert set(families) == set(PINNED)
    for name, (kind, labels) in PINNED.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)


def test_counters_are_exposed_with_total_suffix():
    names = {s.name for s in samples(fed())}
    assert "persister_events_persisted_total" in names
    assert "persister_requests_total" in names


def test_every_sample_carries_the_instance_name():
    persister_samples = [s for s in samples(fed()) if s.name.startswith("persister_")]
    assert persister_samples
    assert {s.labels["instance"] for s in persister_samples} == {"persister1"}


def test_batch_committed_counts_events_by_type_class_and_observes_the_batch():
    metrics = fed()
    metrics.batch_committed(1, {"other": 1}, 0.01, [4])
    total = "persister_events_persisted_total"
    assert value(metrics, total, instance="persister1", type_class="message") == 2
    assert value(metrics, total, instance="persister1", type_class="state") == 1
    assert value(metrics, total, instance="persister1", type_class="other") == 1
    assert value(metrics, "persister_batch_events_count", instance="persister1") == 2
    assert value(metrics, "persister_batch_events_sum", instance="persister1") == 4
    assert value(metrics, "persister_db_transaction_seconds_sum", instance="persister1") == 0.03
    assert value(metrics, "persister_forward_extremities_count", instance="persister1") == 3
    assert value(metrics, "persister_forward_extremities_sum", instance="persister1") == 7


def test_type_class_series_exist_before_the_first_event():
    metrics = Metrics("p", process_metrics=False)
    total = "persister_events_persisted_total"
    for cls in ("message", "state", "other"):
        assert value(metrics, total, instance="p", type_class=cls) == 0


def test_unknown_type_class_is_refused_to_keep_label_values_bounded():
    with pytest.raises(ValueError, match="m.room.message"):
        Metrics("p", process_metrics=False).batch_committed(1, {"m.room.message": 1}, 0.01, [])


def test_requests_are_counted_by_status_and_only_successes_time_the_latency():
    metrics = fed()
    metrics.request_finished(421, 0.001)
    metrics.request_finished(503, 0.001)
    metrics.request_finished(200, 0.15)
    requests = "persister_requests_total"
    assert value(metrics, requests, instance="persister1", status="200") == 2
    assert value(metrics, requests, instance="persister1", status="421") == 1
    assert value(metrics, requests, instance="persister1", status="503") == 1
    latency = "persister_persist_latency_seconds"
    assert value(metrics, f"{latency}_count", instance="persister1") == 2
    assert value(metrics, f"{latency}_sum", instance="persister1") == pytest.approx(0.2)


def test_gauges_hold_the_latest_queue_depth_and_position():
    metrics = fed()
    metrics.set_queue_depth(0)
    metrics.set_position(1300)
    assert value(metrics, "persister_queue_depth_events", instance="persister1") == 0
    assert value(metrics, "persister_stream_position", instance="persister1") == 1300


def test_no_position_is_exported_before_one_is_announced():
    names = {s.name for s in samples(Metrics("p", process_metrics=False))}
    assert "persister_stream_position" not in names
    assert "persister_queue_depth_events" in names


def test_several_instances_in_one_process_do_not_share_series():
    first, second = Metrics("a"), Metrics("b")
    first.set_position(10)
    second.set_position(20)
    assert value(first, "persister_stream_position", instance="a") == 10
    assert value(second, "persister_stream_position", instance="b") == 20


def test_process_metrics_are_included_by_default():
    names = {s.name for s in samples(Metrics("p"))}
    assert "process_cpu_seconds_total" in names


def test_render_is_prometheus_text_format():
    assert CONTENT_TYPE.startswith("text/plain; version=")
    assert fed().render().startswith(b"# HELP ")


@pytest.mark.parametrize(
    ("event_type", "state_key", "expected"),
    [
        ("m.room.message", None, "message"),
        ("m.room.encrypted", None, "message"),
        ("m.sticker", None, "message"),
        ("m.room.member", "@a:x", "state"),
        ("m.room.message", "", "state"),  # a state key, even empty, makes it state
        ("m.reaction", None, "other"),
        ("m.room.redaction", None, "other"),
    ],
)
def test_type_class_of_events(event_type, state_key, expected):
    assert type_class(event_type, state_key) == expected
