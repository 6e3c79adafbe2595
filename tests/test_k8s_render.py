"""The Kustomize overlays render and validate offline against the Kubernetes schemas, and the
rendered objects' cross-references hold: selectors, ports, probes, ConfigMaps, Secrets, claims,
volumes and the addresses in the services' environment."""

from __future__ import annotations

import copy
from urllib.parse import urlparse

import kubernetes_validate
import pytest

from tests.k8s_support import (
    ARTIFACTS_CLAIM,
    CLUSTER_SCOPED_KINDS,
    K8S_VERSION,
    OVERLAYS,
    allowed_ingress_sources,
    by_kind,
    env_of,
    env_problems,
    network_policy_problems,
    pod_spec,
    probe_problems,
    ragtune_containers,
    reference_problems,
    render,
    selector_problems,
    service_port,
)

# --- rendering and schema validation ----------------------------------------------------------


def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: report them all at once
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert errors == []
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {("Deployment", n) for n in ("gateway", "retriever", "generator", "trainer", "otel-collector")}
    expected |= {("StatefulSet", "weaviate"), ("HorizontalPodAutoscaler", "gateway"), ("HorizontalPodAutoscaler", "retriever")}
    expected |= {("StatefulSet", "postgres"), ("Service", "postgres")}
    expected |= {("PersistentVolumeClaim", ARTIFACTS_CLAIM), ("Namespace", "ragtune")}
    assert expected <= names
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED_KINDS} == {"ragtune"}
    assert not [d for d in docs if d["kind"] in CLUSTER_SCOPED_KINDS and "namespace" in d["metadata"]]


# --- cross-references ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_targets_and_ports_match(overlay):
    assert selector_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_secrets_claims_and_volumes_exist(overlay):
    assert reference_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_served_ports_and_services(overlay):
    assert probe_problems(render(overlay)) == []


def test_checks_catch_broken_references():
    """The cross-reference checks fail when a reference breaks (a check that cannot fail is no check)."""
    docs = render("cpu")
    broken = copy.deepcopy(docs)
    by_kind(broken, "Service")["generator"]["spec"]["selector"] = {"app.kubernetes.io/name": "generater"}
    assert any("Service generator" in p for p in selector_problems(broken))
    broken = copy.deepcopy(docs)
    pod_spec(by_kind(broken, "Deployment")["retriever"])["containers"][0]["ports"][0]["containerPort"] = 50099
    assert any("retriever" in p for p in selector_problems(broken))
    assert any("retriever" in p for p in probe_problems(broken))
    assert any("retriever-from-gateway" in p for p in network_policy_problems(broken))
    broken = copy.deepcopy(docs)
    pod_spec(by_kind(broken, "Deployment")["gateway"])["containers"][0]["env"].append({"name": "RAGTUNE_GATEWAY_NO_SUCH", "value": "1"})
    assert env_problems(broken) == ["gateway: sets RAGTUNE_GATEWAY_NO_SUCH, which gateway does not read"]
    broken = copy.deepcopy(docs)
    trainer = pod_spec(by_kind(broken, "Deployment")["trainer"])
    token = next(v for v in trainer["containers"][0]["env"] if v["name"] == "RAGTUNE_INTERNAL_TOKEN")
    token["valueFrom"]["secretKeyRef"]["key"] = "nope"
    trainer["volumes"] = [v for v in trainer["volumes"] if v["name"] != "artifacts"]
    problems = reference_problems(broken)
    assert any("has no key nope" in p for p in problems) and any("undeclared volume artifacts" in p for p in problems)
    broken = copy.deepcopy(docs)
    by_kind(broken, "NetworkPolicy")["generator-from-gateway"]["spec"]["ingress"][0]["from"] = []
    assert allowed_ingress_sources(broken, by_kind(broken, "Deployment")["generator"]) == {"*"}
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["gateway"])
    pod_spec(deployment)["containers"][0]["readinessProbe"]["grpc"]["servce"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_in_env_name_existing_services(overlay):
    """Downstream addresses, WEAVIATE_URL, the OTLP endpoint and the database URL point at a
    Service and port of the manifest."""
    docs = render(overlay)
    checked = 0
    for w, c, _ in ragtune_containers(docs):
        for var, value in env_of(docs, c).items():
            if var.endswith("_ADDRESS"):
                host, port = value.removeprefix("dns:///").rsplit(":", 1)
            elif var in ("WEAVIATE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "RAGTUNE_DATABASE_URL"):
                url = urlparse(value)
                host, port = url.hostname, url.port
            else:
                continue
            checked += 1
            assert service_port(docs, host, int(port)), f"{w['metadata']['name']}: {var}={value} names no Service port"
    assert checked >= 8  # 3 gateway addresses, WEAVIATE_URL, and 4 OTLP endpoints at least
