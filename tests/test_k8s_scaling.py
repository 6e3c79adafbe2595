"""What scales and routes traffic: the generator's load leaves the pod as metrics Prometheus can
scrape from the collector, the gpu overlay scales the generator on its queue depth (never on
CPU), servers age their connections out so the gateway re-resolves the headless Services, and the
probes ask readiness and liveness the questions the server answers (README: the runbook)."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s_support import (
    K8S_DIR,
    OVERLAYS,
    by_kind,
    env_of,
    host_settings_env_names,
    manifest_settings,
    pod_spec,
    ragtune_containers,
    render,
)


def collector_config(docs: list[dict]) -> dict:
    return yaml.safe_load(by_kind(docs, "ConfigMap")[_collector_config_name(docs)]["data"]["config.yaml"])


def _collector_config_name(docs: list[dict]) -> str:
    collector = pod_spec(by_kind(docs, "Deployment")["otel-collector"])
    return next(v["configMap"]["name"] for v in collector["volumes"] if "configMap" in v)


def generator_metric_names() -> set[str]:
    """The Prometheus names of the generator's gauges, as the collector publishes them (dots to
    underscores; add_metric_suffixes off)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from services.generator import metrics as generator_metrics
    from services.generator.server import GeneratorService
    from services.generator.settings import GeneratorSettings

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    generator_metrics.register(GeneratorService(GeneratorSettings(port=0)), provider.get_meter("names"))
    data = reader.get_metrics_data()
    provider.shutdown()
    return {m.name.replace(".", "_") for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_collector_serves_metrics_for_prometheus(overlay):
    """The metrics pipeline ends in a Prometheus endpoint on a port the collector's pod and Service
    expose, with one series per pod (resource attributes as labels) and stable names."""
    docs = render(overlay)
    config = collector_config(docs)
    assert "prometheus" in config["service"]["pipelines"]["metrics"]["exporters"]
    exporter = config["exporters"]["prometheus"]
    port = int(exporter["endpoint"].rsplit(":", 1)[1])
    assert exporter["resource_to_telemetry_conversion"]["enabled"] is True
    assert exporter["add_metric_suffixes"] is False
    collector = pod_spec(by_kind(docs, "Deployment")["otel-collector"])["containers"][0]
    assert port in {p["containerPort"] for p in collector["ports"]}
    assert port in {p["port"] for p in by_kind(docs, "Service")["otel-collector"]["spec"]["ports"]}
    for w, c, service in ragtune_containers(docs):
        env = env_of(docs, c)
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == "k8s.pod.name=$(K8S_POD_NAME)", service
        names = [v["name"] for v in c["env"]]
        assert names.index("K8S_POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), service  # $(...) needs it first
        assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]) <= 15000, service


def test_gpu_overlay_scales_the_generator_on_queue_depth_never_cpu():
    docs = render("gpu")
    generator = by_kind(docs, "Deployment")["generator"]
    assert "replicas" not in generator["spec"], "the autoscaler owns the count"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["generator"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "generator"}
    assert hpa["spec"]["minReplicas"] >= 2
    metrics = hpa["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["External"], "never CPU (or any resource) for a GPU-bound engine"
    metric = metrics[0]["external"]["metric"]
    assert metric["name"] == "ragtune_generator_queue_depth" and metric["name"] in generator_metric_names()
    assert metric["selector"]["matchLabels"] == {"service_name": "generator"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_generator_exports_queue_depth_running_and_kv_cache():
    assert {
        "ragtune_generator_queue_depth", "ragtune_generator_requests_running", "ragtune_generator_kv_cache_usage",
    } <= generator_metric_names()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_age_connections_so_the_gateway_re_resolves(overlay, monkeypatch):
    """Every ragtune server closes connections after RAGTUNE_GRPC_MAX_CONNECTION_AGE_S (read by the
    server host), the gateway reaches the internal services through headless Services by dns:///."""
    from ragtune.server import HostSettings

    docs = render(overlay)
    assert "RAGTUNE_GRPC_MAX_CONNECTION_AGE_S" in host_settings_env_names()
    for w, c, service in ragtune_containers(docs):
        env = env_of(docs, c)
        manifest_settings(docs, c, service, monkeypatch)  # sets the container's environment
        assert HostSettings().max_connection_age_s == float(env["RAGTUNE_GRPC_MAX_CONNECTION_AGE_S"]) <= 60, service
    gateway = pod_spec(by_kind(docs, "Deployment")["gateway"])["containers"][0]
    services = by_kind(docs, "Service")
    for name in ("retriever", "generator", "trainer"):
        address = env_of(docs, gateway)[f"RAGTUNE_GATEWAY_{name.upper()}_ADDRESS"]
        assert address.startswith("dns:///") and services[name]["spec"]["clusterIP"] == "None", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_asks_the_named_service_and_liveness_the_server(overlay):
    """Readiness = the named service's health (NOT_SERVING while starting, draining, or when the
    service says it cannot serve, e.g. a dead vLLM engine); liveness = the server's "" health,
    NOT_SERVING only when the service cannot recover without a restart."""
    for w, c, service in ragtune_containers(render(overlay)):
        named = f"ragtune.v1.{service.capitalize()}Service"
        assert c["readinessProbe"]["grpc"].get("service") == named, service
        assert c["startupProbe"]["grpc"].get("service") == named, service
        assert c["livenessProbe"]["grpc"].get("service", "") == "", service


def test_readme_has_the_runbook():
    text = (K8S_DIR / "README.md").read_text()
    for heading in (
        "First deploy", "Rotating keys and the internal token", "Adding a GPU node", "Restoring Weaviate from a backup",
        "Reading one trace across the services", "How traffic reaches new replicas", "Autoscaling the generator",
        "Health: readiness and liveness", "What is not checked here",
    ):
        assert f"### {heading}" in text or f"## {heading}" in text, heading
