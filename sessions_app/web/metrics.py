"""Prometheus metrics: the stats of `/sessions/` as gauges and counters, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sessions_app.web.stats import session_stats


def census_families(census: dict[str, Any]) -> Iterator[Metric]:
    """Yield the last census as two histograms: sessions by pending bytes and by idle age."""
    for name, key, bound, text in (
        ("sessions_pending_bytes", "by_pending_bytes", "le", "Live sessions by pending bytes"),
        ("sessions_idle_seconds", "by_idle_seconds", "lt", "Live sessions by seconds idle"),
    ):
        cumulative, buckets = 0, []
        for bucket in census[key]:
            cumulative += bucket["sessions"]
            if bucket[bound] is not None:
                buckets.append((f"{float(bucket[bound]):g}", cumulative))
        buckets.append(("+Inf", cumulative))
        total = census["pending_bytes_total"] if key == "by_pending_bytes" else None
        yield HistogramMetricFamily(name, text + " (last census)", buckets=buckets, sum_value=total)


def metric_families(
    stats: dict[str, Any],
    max_sessions: int,
    heap_bytes: int | None,
    stalled_partitions: frozenset[int] = frozenset(),
) -> Iterator[Metric]:
    """Yield the metric families for one `/sessions/` stats dict."""
    live = GaugeMetricFamily(
        "sessions_live", "Live sessions held by this worker", labels=["partition"]
    )
    for partition, count in stats["live_sessions_by_partition"].items():
        live.add_metric([partition], count)
    yield live
    yield GaugeMetricFamily("sessions_max", "SESSIONS_MAX_SESSIONS", value=max_sessions)
    yield GaugeMetricFamily("sessions_usage_ratio", "Live sessions / cap", value=stats["usage"])
    yield GaugeMetricFamily(
        "sessions_capacity_alarm",
        "1 while the capacity alarm is raised",
        value=1 if stats["alarm"]["state"] == "raised" else 0,
    )
    for name, value in stats["totals"].items():
        yield CounterMetricFamily(
            f"sessions_{name.removeprefix('sessions_')}",
            f"Total {name.replace('_', ' ')}",
            value=value,
        )
    yield GaugeMetricFamily(
        "sessions_process_rss_bytes", "Resident set size", value=stats["process_rss_bytes"]
    )
    for name, value in stats["rocksdb"].items():
        yield GaugeMetricFamily(f"sessions_rocksdb_{name}", f"RocksDB {name}", value=value)
    standby_lag = GaugeMetricFamily(
        "sessions_standby_lag",
        "Changelog records a standby replica has yet to apply",
        labels=["partition"],
    )
    for partition, values in stats["standbys"].items():
        if values["lag"] is not None:
            standby_lag.add_metric([partition], values["lag"])
    yield standby_lag
    partitions = stats["partitions"]
    for name, key, text in (
        ("sessions_consumer_lag", "lag", "Input records after the group's committed offset"),
        ("sessions_consumer_committed_offset", "committed_offset", "The group's committed offset"),
        ("sessions_consumer_end_offset", "end_offset", "The input partition's end offset"),
        ("sessions_partition_fragments_per_second", "fragments_per_second", "Fragments/s, 1 min"),
        ("sessions_partition_seconds_since_progress", "seconds_since_progress", "Since progress"),
    ):
        family = GaugeMetricFamily(name, text, labels=["partition"])
        for partition, values in partitions.items():
            if values[key] is not None:
                family.add_metric([partition], values[key])
        yield family
    stalled = GaugeMetricFamily(
        "sessions_partition_stalled",
        "1 while the partition's stall alarm is raised",
        labels=["partition"],
    )
    for partition in partitions:
        stalled.add_metric([partition], 1 if int(partition) in stalled_partitions else 0)
    yield stalled
    yield GaugeMetricFamily(
        "sessions_store_refuses_writes",
        "1 once the session store has refused a write",
        value=0 if stats["store"] is None else 1,
    )
    yield GaugeMetricFamily(
        "sessions_event_loop_max_stall_ms",
        "Longest event-loop stall",
        value=stats["event_loop"]["max_stall_ms"],
    )
    if heap_bytes is not None:
        yield GaugeMetricFamily(
            "sessions_python_heap_bytes",
            "Python heap size at the last heapy snapshot",
            value=heap_bytes,
        )


class SessionsCollector:
    """A Prometheus collector over one worker's state."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        yield from metric_families(
            session_stats(app),
            app.settings.max_sessions,
            app.heap_snapshots.last_size(),
            frozenset(app.partition_monitor.stalls.stalled),
        )
        if app.census.last is not None:  # a scrape never takes a census: it costs seconds
            yield from census_families(app.census.last)


def exposition(app: Any) -> bytes:
    """Return the worker's metrics in Prometheus' text format."""
    return generate_latest(SessionsCollector(app))
