"""What scales and routes traffic: the generator's load leaves the pod as metrics Prometheus can
scrape from the collector, the gpu overlay scales the generator on its queue depth (never on
CPU), servers age their connections out so the gateway re-resolves the headless Services, and the
probes ask readiness and liveness the questions the server answers (README: the runbook)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.grpc_support import REPO_ROOT

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
        assert downward_resource_attributes(c) == {
            "k8s.pod.name": "metadata.name", "k8s.namespace.name": "metadata.namespace"}, service
        assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]) <= 15000, service


def downward_resource_attributes(container: dict) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES of the container as attribute -> the pod field it comes from; each
    $(VAR) must be a variable defined before it (Kubernetes expands only those) from the downward API."""
    env = container["env"]
    position = {v["name"]: i for i, v in enumerate(env)}
    value = env[position["OTEL_RESOURCE_ATTRIBUTES"]]["value"]
    fields = {}
    for pair in value.split(","):
        key, ref = pair.split("=", 1)
        var = re.fullmatch(r"\$\((\w+)\)", ref).group(1)
        assert position[var] < position["OTEL_RESOURCE_ATTRIBUTES"], f"{var} is defined after its use"
        fields[key] = env[position[var]]["valueFrom"]["fieldRef"]["fieldPath"]
    return fields


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_collector_sends_traces_to_a_backend_and_keeps_the_debug_log(overlay):
    """The traces pipeline exports over OTLP to an endpoint the collector's environment sets (a
    ConfigMap an overlay replaces), queued and retried so a slow backend never blocks the services, and
    keeps the debug exporter for a cluster without a backend."""
    docs = render(overlay)
    config = collector_config(docs)
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    assert "debug" in exporters
    (otlp,) = [e for e in exporters if e.split("/")[0] == "otlp"]
    exporter = config["exporters"][otlp]
    collector = pod_spec(by_kind(docs, "Deployment")["otel-collector"])["containers"][0]
    env = env_of(docs, collector)
    for value in (exporter["endpoint"], exporter["tls"]["insecure"]):
        variable = re.fullmatch(r"\$\{env:(\w+)\}", str(value)).group(1)
        assert env.get(variable), f"the collector's environment does not set {variable}"
    host, port = env[re.fullmatch(r"\$\{env:(\w+)\}", exporter["endpoint"]).group(1)].rsplit(":", 1)
    assert host and int(port) > 0
    assert env[re.fullmatch(r"\$\{env:(\w+)\}", str(exporter["tls"]["insecure"])).group(1)] in ("true", "false")
    assert exporter["sending_queue"]["enabled"] and exporter["retry_on_failure"]["enabled"]


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


# --- the external metric's adapter rule -----------------------------------------------------------

ADAPTER_VALUES = K8S_DIR / "monitoring" / "prometheus-adapter-values.yaml"


def service_resource_attributes(container: dict, namespace: str, pod: str, service: str) -> dict[str, str]:
    """The resource attributes a service process reports, as ragtune/telemetry.py builds them from the
    environment the container gets (its downward-API values given), in a process of its own."""
    values = {"metadata.name": pod, "metadata.namespace": namespace}
    attributes = ",".join(f"{k}={values[f]}" for k, f in downward_resource_attributes(container).items())
    code = ("import json; from ragtune.telemetry import configure_telemetry; "
            f"t = configure_telemetry({service!r}); "
            "print(json.dumps(dict(t.meter_provider._sdk_config.resource.attributes)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "OTEL_RESOURCE_ATTRIBUTES": attributes})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prometheus_labels(docs: list[dict], attributes: dict[str, str]) -> set[str]:
    """The labels a series of these resource attributes carries on the collector's Prometheus endpoint:
    the attributes (and what the metrics pipeline's resource processors add), dots to underscores, when
    the exporter converts resource attributes into labels."""
    config = collector_config(docs)
    added = set()
    for name in config["service"]["pipelines"]["metrics"]["processors"]:
        if name.split("/")[0] in ("resource", "attributes"):
            added |= {a["key"] for a in config["processors"][name].get("attributes", []) if a["action"] in ("insert", "upsert")}
    if not config["exporters"]["prometheus"].get("resource_to_telemetry_conversion", {}).get("enabled"):
        return set()
    return {re.sub(r"[^a-zA-Z0-9_]", "_", key) for key in set(attributes) | added}


def adapter_rule_problems(rule: dict, labels: set[str]) -> list[str]:
    """Every label the rule filters, maps or groups by is one the series carries."""
    used = set(re.findall(r"(\w+)\s*!?=~?", rule["seriesQuery"].split("{", 1)[1])) if "{" in rule["seriesQuery"] else set()
    used |= set(rule.get("resources", {}).get("overrides", {}))
    for group in re.findall(r"by\s*\(([^)]*)\)", rule["metricsQuery"]):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    return [f"the rule uses label {label}, which the series do not carry" for label in sorted(used - labels)]


def test_prometheus_adapter_rule_uses_labels_the_series_carry():
    """The documented prometheus-adapter rule serves the generator's queue depth by labels its series
    really carry: the namespace (mapped to the HPA's namespace) from the pod's own resource attributes,
    service_name from the telemetry's, and the HPA's selector among them; the same rule fails against a
    generator without the namespace attribute."""
    docs = render("gpu")
    generator = by_kind(docs, "Deployment")["generator"]
    container = pod_spec(generator)["containers"][0]
    namespace = generator["metadata"]["namespace"]
    attributes = service_resource_attributes(container, namespace, "generator-7d9c-x2k4p", "generator")
    assert attributes["service.name"] == "generator" and attributes["k8s.namespace.name"] == namespace
    labels = prometheus_labels(docs, attributes)
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]
    assert rule["name"]["as"] == "ragtune_generator_queue_depth" in generator_metric_names()
    assert rule["seriesQuery"].startswith("ragtune_generator_queue_depth")
    assert adapter_rule_problems(rule, labels) == []
    namespace_label = next(k for k, v in rule["resources"]["overrides"].items() if v == {"resource": "namespace"})
    assert attributes[namespace_label.replace("_", ".")] == namespace
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["generator"]
    assert set(hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]) <= labels
    without_namespace = {k: v for k, v in attributes.items() if not k.startswith("k8s.namespace")}
    assert adapter_rule_problems(rule, prometheus_labels(docs, without_namespace)) != []
    assert ADAPTER_VALUES.name in (K8S_DIR / "README.md").read_text()
