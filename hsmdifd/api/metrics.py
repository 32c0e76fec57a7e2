"""Prometheus metrics, in a registry of the daemon's own (never the global one, so two
daemons in one test process, or a library that registers its own, never collide).

Counters and histograms are recorded as requests are answered; the gauges that describe
the cluster (queue, members, leases, layers) are read from it at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hsmdif.proto import hsmdif_pb2 as pb

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ClusterView:
    """What the scrape-time gauges read: each a function of the daemon's current state."""

    queued: Callable[[], int]
    in_flight: Callable[[], int]
    model: Callable[[], pb.ModelInfo]
    members_alive: Callable[[], int]
    root_id: Callable[[], str]
    leases_held: Callable[[], int]
    leases_granted: Callable[[], int]


@dataclass
class _Changes:
    """Counts of changes seen between observations (root, engine failures)."""

    root: str | None = None
    root_changes: int = 0
    failed_before: bool = False
    engine_restarts: int = 0


class _ClusterCollector(Collector):
    def __init__(self, view: ClusterView, changes: _Changes) -> None:
        self._view = view
        self._changes = changes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        view, changes = self._view, self._changes
        observe(view, changes)
        yield GaugeMetricFamily(
            "hsmdif_queue_depth", "Requests waiting at the root for the model", view.queued()
        )
        yield GaugeMetricFamily(
            "hsmdif_in_flight", "Requests the root's engine is answering", view.in_flight()
        )
        yield GaugeMetricFamily(
            "hsmdif_members_alive", "Devices this one counts as alive", view.members_alive()
        )
        yield CounterMetricFamily(
            "hsmdif_root_changes", "Times the root moved to another device", changes.root_changes
        )
        yield CounterMetricFamily(
            "hsmdif_engine_restarts",
            "Times the engine process died or failed, so the model was loaded again",
            changes.engine_restarts,
        )
        yield GaugeMetricFamily(
            "hsmdif_leases_held", "RPC leases this root holds on workers", view.leases_held()
        )
        yield GaugeMetricFamily(
            "hsmdif_leases_granted", "RPC leases this device serves", view.leases_granted()
        )
        model = view.model()
        loaded = GaugeMetricFamily(
            "hsmdif_model_loaded", "1 when a model is ready on the root", labels=["model"]
        )
        load_seconds = GaugeMetricFamily(
            "hsmdif_model_load_seconds", "Seconds the loaded model took to load", labels=["model"]
        )
        layers = GaugeMetricFamily(
            "hsmdif_device_layers",
            "Layers of the loaded model each device holds (the output layer counts as one)",
            labels=["device"],
        )
        if model.state == pb.READY:
            name = Path(model.path).stem  # the model's id in the HTTP API
            loaded.add_metric([name], 1)
            load_seconds.add_metric([name], model.load_seconds)
            for share in model.plan.devices:
                layers.add_metric([share.name], share.layers + share.holds_output)
        yield loaded
        yield load_seconds
        yield layers


def observe(view: ClusterView, changes: _Changes) -> None:
    """Count a root change or an engine failure since the last look."""
    root = view.root_id()
    if changes.root is not None and root != changes.root:
        changes.root_changes += 1
    changes.root = root
    failed = view.model().state == pb.FAILED
    if failed and not changes.failed_before:
        changes.engine_restarts += 1
    changes.failed_before = failed


class Metrics:
    def __init__(self, view: ClusterView) -> None:
        self.registry = CollectorRegistry()
        self._view = view
        self._changes = _Changes()
        self.requests = Counter(
            "hsmdif_http_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "hsmdif_prompt_tokens",
            "Prompt tokens read, for answers asked of this device (HTTP or hsmdifctl)",
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "hsmdif_completion_tokens",
            "Tokens generated, for answers asked of this device (HTTP or hsmdifctl)",
            registry=self.registry,
        )
        self.ttft = Histogram(
            "hsmdif_time_to_first_token_seconds",
            "Seconds from a request to its first token, queueing included",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            "hsmdif_decode_tokens_per_second",
            "Decode speed of each answer (tokens after the first over the time after it)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=self.registry,
        )
        self.registry.register(_ClusterCollector(view, self._changes))

    def watch(self) -> None:
        """Look for root changes and engine failures (called often, cheap)."""
        observe(self._view, self._changes)

    def answered(self, stats: pb.GenerateStats, ttft_seconds: float | None) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        if ttft_seconds is not None:
            self.ttft.observe(ttft_seconds)
        if stats.decode_tokens_per_second > 0:
            self.tokens_per_second.observe(stats.decode_tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
