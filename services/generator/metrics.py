"""The generator's load as OpenTelemetry metrics: what an autoscaler scales the generator on.

Observable gauges, read when the metric reader collects (every export interval of the OTLP
exporter, 60 s by default; OTEL_METRIC_EXPORT_INTERVAL in milliseconds), so they cost nothing
per request. The collector turns them into Prometheus series (k8s/base/otel-collector-config.yaml,
`prometheus` exporter, no suffixes added):

| instrument | Prometheus series | meaning |
|---|---|---|
| ragtune.generator.queue.depth | ragtune_generator_queue_depth | requests admitted but not in the running batch (waiting in vLLM's queue or being prepared) |
| ragtune.generator.requests.running | ragtune_generator_requests_running | requests in the engine's running batch |
| ragtune.generator.requests.in_flight | ragtune_generator_requests_in_flight | requests admitted (running + queued); the admission limit is max_num_seqs + max_waiting_requests; a request with sampling.n = k counts k, as vLLM runs k sequences |
| ragtune.generator.kv_cache.usage | ragtune_generator_kv_cache_usage | share of the KV cache in use, 0..1 |
| ragtune.generator.engine.healthy | ragtune_generator_engine_healthy | 1 while the engine serves, 0 once it has errored or stopped |

The queue depth is the scaling signal (k8s/overlays/gpu: an HPA on it, never on CPU): requests
that wait are latency a new replica would remove; KV-cache use near 1 says the batch is full.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from services.generator.server import GeneratorService


@dataclass(frozen=True)
class LoadSnapshot:
    queue_depth: int
    running: int
    in_flight: int
    kv_cache_usage: float
    healthy: bool


def snapshot(service: "GeneratorService") -> LoadSnapshot:
    """The generator's load now (zeros before the engine has started)."""
    engine, core = service.engine, service.generator
    if engine is None or core is None:
        return LoadSnapshot(0, 0, 0, 0.0, engine is not None and not engine.errored)
    load = engine.load()
    in_flight = core.in_flight
    running = min(load.running, in_flight)
    return LoadSnapshot(
        queue_depth=max(in_flight - running, 0),
        running=running,
        in_flight=in_flight,
        kv_cache_usage=min(max(load.kv_cache_usage, 0.0), 1.0),
        healthy=not engine.errored,
    )


def register(service: "GeneratorService", meter: metrics.Meter | None = None) -> list:
    """Creates the gauges on `meter` (default: the process's global meter provider) for `service`."""
    meter = meter or metrics.get_meter("ragtune.generator")

    def gauge(name: str, description: str, unit: str, read):
        def callback(options: CallbackOptions):
            yield Observation(read(snapshot(service)))

        return meter.create_observable_gauge(name, callbacks=[callback], description=description, unit=unit)

    return [
        gauge("ragtune.generator.queue.depth", "Requests admitted but not yet in the running batch.", "{request}",
              lambda s: s.queue_depth),
        gauge("ragtune.generator.requests.running", "Requests in the engine's running batch.", "{request}",
              lambda s: s.running),
        gauge("ragtune.generator.requests.in_flight", "Requests admitted (running and queued).", "{request}",
              lambda s: s.in_flight),
        gauge("ragtune.generator.kv_cache.usage", "Share of the KV cache in use (0..1).", "1",
              lambda s: s.kv_cache_usage),
        gauge("ragtune.generator.engine.healthy", "1 while the engine serves, 0 once it errored or stopped.", "1",
              lambda s: int(s.healthy)),
    ]


class PerVersion:
    """Latency and outcome of each request by the adapter version that answered it (canary splits
    compare versions on these: `ragtune.generator.version.duration` with `adapter` and `outcome`)."""

    def __init__(self):
        self._duration = metrics.get_meter("ragtune.generator").create_histogram(
            "ragtune.generator.version.duration", unit="ms",
            description="Request time by the adapter version that answered (empty = base) and outcome")

    @contextmanager
    def measure(self, stream):
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            adapter = stream.adapter.ref if stream.adapter is not None else ""
            self._duration.record((time.perf_counter() - started) * 1000, {"adapter": adapter, "outcome": outcome})
