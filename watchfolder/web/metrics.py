"""Prometheus metrics for ``GET /metrics``, read from the store at scrape time.

Nothing is counted in memory: the API may run in another process than the
workers and watchers, so every figure comes from the shared store when
Prometheus asks for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from ..status import sink_view, target_view, watcher_view, worker_view

log = logging.getLogger(__name__)


class StoreCollector:
    """A prometheus-client collector over a :class:`~watchfolder.store.JobStore`."""

    def __init__(self, config, store) -> None:
        self.config = config
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("watchfolder_store_up", "1 when the job store answered this scrape")
        try:
            metrics = list(self._collect(time.time()))
        except Exception:  # a scrape must say the store is down, not fail with 500
            log.exception("metrics: reading the store failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _collect(self, now: float) -> Iterator[Metric]:
        store = self.store
        jobs = GaugeMetricFamily("watchfolder_jobs", "Jobs in each state", labels=["state"])
        for state, n in sorted(store.counts().items()):
            jobs.add_metric([state], n)
        yield jobs

        oldest = store.oldest_queued_at()
        yield GaugeMetricFamily(
            "watchfolder_oldest_queued_age_seconds",
            "Age of the oldest job waiting to run (0 when none waits)",
            value=0.0 if oldest is None else max(0.0, now - oldest),
        )

        totals = store.totals()
        yield SummaryMetricFamily(
            "watchfolder_job_duration_seconds",
            "Time from first start to success of succeeded jobs",
            count_value=int(totals["succeeded"]),
            sum_value=float(totals["seconds"]),
        )
        yield CounterMetricFamily(
            "watchfolder_imported_bytes", "Bytes of succeeded jobs", value=float(totals["bytes"])
        )

        events = CounterMetricFamily("watchfolder_watcher_events", "Filesystem events seen", labels=["watcher"])
        rescans = CounterMetricFamily("watchfolder_watcher_rescans", "Full rescans done", labels=["watcher"])
        healthy = GaugeMetricFamily("watchfolder_watcher_healthy", "1 when the watcher is healthy", labels=["watcher"])
        for c in store.components("watcher"):
            w = watcher_view(c, unhealthy_after=self.config.notify.watcher_unhealthy_after, now=now)
            name = str(w["name"])
            events.add_metric([name], float(w["events"] or 0))
            rescans.add_metric([name], float(w["rescans"] or 0))
            healthy.add_metric([name], 1.0 if w["healthy"] else 0.0)
        yield events
        yield rescans
        yield healthy

        by_health = {"healthy": 0, "unhealthy": 0, "stopped": 0}
        for c in store.components("worker"):
            w = worker_view(c, heartbeat_seconds=self.config.workers.heartbeat_seconds, now=now)
            key = "stopped" if w["state"] == "stopped" else ("healthy" if w["healthy"] else "unhealthy")
            by_health[key] += 1
        workers = GaugeMetricFamily("watchfolder_workers", "Workers by health", labels=["health"])
        for key, n in by_health.items():
            workers.add_metric([key], n)
        yield workers

        paused = GaugeMetricFamily(
            "watchfolder_importer_paused", "1 while the importer target is paused (back-pressure)", labels=["target"]
        )
        running = GaugeMetricFamily(
            "watchfolder_importer_running", "Imports running against the target", labels=["target"]
        )
        for c in store.components("target"):
            t = target_view(c, now=now)
            paused.add_metric([str(t["target"])], 1.0 if t["paused"] else 0.0)
            running.add_metric([str(t["target"])], float(t.get("running") or 0))
        yield paused
        yield running

        last = store.last_event_id()
        yield GaugeMetricFamily("watchfolder_events_last_id", "Id of the newest event", value=float(last))
        behind = GaugeMetricFamily(
            "watchfolder_event_sink_lag", "Events not yet delivered to the sink", labels=["sink"]
        )
        failing = GaugeMetricFamily(
            "watchfolder_event_sink_failing", "1 while deliveries to the sink fail (2: disabled)", labels=["sink"]
        )
        for s in store.sinks():
            v = sink_view(s, now=now)
            behind.add_metric([v["name"]], float(max(0, last - v["last_id"])))
            failing.add_metric([v["name"]], {"ok": 0.0, "failing": 1.0, "disabled": 2.0}[v["state"]])
        yield behind
        yield failing

        outbox = GaugeMetricFamily("watchfolder_outbox_mails", "Mails in the outbox by state", labels=["state"])
        for state, n in sorted(store.outbox_counts().items()):
            outbox.add_metric([state], n)
        yield outbox


def make_registry(config, store) -> CollectorRegistry:
    """A registry of its own (not the global one), so several apps can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(config, store))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The metrics in Prometheus text format."""
    return generate_latest(registry)


__all__ = ["StoreCollector", "make_registry", "exposition"]
