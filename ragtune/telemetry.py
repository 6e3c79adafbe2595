"""OpenTelemetry tracing and metrics, and structured (JSON) logs carrying trace ids.

Exporting over OTLP happens only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the exporter
reads the standard OTEL_* variables itself). Nothing here runs at import time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanProcessor

_SECRET_KEYS = ("authorization", "api_key", "token", "secret", "password")


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the current trace and span ids when inside a span."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = f"{ctx.trace_id:032x}"
            entry["span_id"] = f"{ctx.span_id:016x}"
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = "***" if any(s in key.lower() for s in _SECRET_KEYS) else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@dataclass
class Telemetry:
    """The providers one service process set up; `shutdown` flushes them."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    processors: list[SpanProcessor] = field(default_factory=list)

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def configure_telemetry(service: str) -> Telemetry:
    """Installs global tracer and meter providers for this process, unless one is installed already
    (tests install their own with an in-memory exporter before starting servers in-process)."""
    resource = Resource.create({"service.name": service, "service.namespace": "ragtune"})
    telemetry = Telemetry()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=resource)
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
            provider.add_span_processor(processor)
            telemetry.processors.append(processor)
        trace.set_tracer_provider(provider)
        telemetry.tracer_provider = provider
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        readers = []
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        telemetry.meter_provider = meter_provider
    return telemetry


def server_interceptors() -> list:
    """The OpenTelemetry interceptor that joins incoming W3C trace context and opens a server span. Health checks
    are left out: they are not work worth a span (probes and client-side health checking watch them all the time),
    and the instrumentation iterates a streaming handler's result, which grpc's health servicer's `Watch` returns
    as a coroutine, so instrumented it answered UNKNOWN to every client-side health watch."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def client_interceptors() -> list:
    """Interceptors for aio channels that open client spans and inject W3C trace context."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())
