"""The TLS variant of the deployment (an overlay plus k8s/components/tls and
k8s/components/cert-manager) renders, validates, mounts each service's certificate Secret
read-only, sets the RAGTUNE_TLS_* variables the services read, keeps the probes working, and
leaves the plain overlays untouched."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from ragtune.server import HostSettings
from ragtune.settings import TLSSettings
from tests.k8s_support import (
    CLUSTER_SCOPED_KINDS,
    K8S_VERSION,
    MTLS_VAR,
    OVERLAYS,
    by_kind,
    certificates,
    env_of,
    env_problems,
    manifest_settings,
    network_policy_problems,
    pod_labels,
    pod_spec,
    probe_problems,
    ragtune_containers,
    reference_problems,
    render,
    render_with,
    selector_problems,
    selects,
    tls_problems,
)

CERT_MANAGER_KINDS = {"Certificate", "Issuer"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_variant_renders_and_validates(overlay):
    docs = render_with(overlay)
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue  # a CRD: no bundled schema; its shape is checked by tls_problems
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: report them all at once
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert errors == []
    cert_manager = [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    assert {d["apiVersion"] for d in cert_manager} == {"cert-manager.io/v1"}
    assert {d["kind"] for d in cert_manager} == CERT_MANAGER_KINDS
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED_KINDS} == {"ragtune"}
    assert {c["spec"]["secretName"] for c in certificates(docs).values()} >= {
        f"ragtune-tls-{s}" for s in ("gateway", "retriever", "generator", "trainer")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_variant_keeps_every_cross_reference(overlay):
    docs = render_with(overlay)
    assert selector_problems(docs) == []
    assert reference_problems(docs) == []
    assert probe_problems(docs) == []
    assert env_problems(docs) == []
    assert network_policy_problems(docs) == []
    assert tls_problems(docs) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_load_their_tls_settings_from_the_manifests(overlay, monkeypatch):
    docs = render_with(overlay)
    for _, container, service in ragtune_containers(docs):
        manifest_settings(docs, container, service, monkeypatch)  # the service's own settings still load
        tls, host = TLSSettings(), HostSettings()
        assert str(tls.cert_file).startswith("/etc/ragtune/tls/") and tls.key_file and tls.ca_file
        assert tls.client_cert_file and tls.client_key_file
        assert (tls.client_ca_file is not None) == (service != "gateway"), service
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert host.health_port == ports["health"] != ports["grpc"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_network_policy_opens_the_plaintext_health_port(overlay):
    """The health port is for the kubelet (from the node); default-deny keeps other pods off it."""
    docs = render_with(overlay)
    policies = by_kind(docs, "NetworkPolicy").values()
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)  # default deny
    for workload, container, _ in ragtune_containers(docs):
        health = next(p["containerPort"] for p in container["ports"] if p.get("name") == "health")
        for policy in policies:
            spec = policy["spec"]
            if spec["podSelector"] and not selects(spec["podSelector"], pod_labels(workload)):
                continue
            for rule in spec.get("ingress", []):
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports and health not in ports and "health" not in ports, policy["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_plain_overlays_stay_plaintext(overlay):
    """TLS is opt-in: without the component no container reads a certificate and probes use the service port."""
    docs = render(overlay)
    for _, container, _ in ragtune_containers(docs):
        assert not [v for v in env_of(docs, container) if v.startswith("RAGTUNE_TLS_")]
        assert container["readinessProbe"]["grpc"]["port"] == container["ports"][0]["containerPort"]
    assert certificates(docs) == {}


def _service_container(docs: list[dict], name: str) -> dict:
    return next(c for c in pod_spec(by_kind(docs, "Deployment")[name])["containers"] if c["name"] == name)


def test_tls_checks_catch_breakage():
    docs = render_with("cpu")
    broken = copy.deepcopy(docs)
    mount = next(m for m in _service_container(broken, "retriever")["volumeMounts"] if m["name"] == "tls")
    mount["readOnly"] = False
    assert any("mounted writable" in p for p in tls_problems(broken))

    broken = copy.deepcopy(docs)
    trainer = _service_container(broken, "trainer")
    trainer["env"] = [v for v in trainer["env"] if v["name"] != MTLS_VAR]
    assert any(f"trainer/trainer: {MTLS_VAR} is not set" in p for p in tls_problems(broken))

    broken = copy.deepcopy(docs)
    certificates(broken)["ragtune-tls-generator"]["spec"]["dnsNames"] = ["generator.example"]
    assert any("the gateway dials generator" in p for p in tls_problems(broken))

    broken = copy.deepcopy(docs)
    _service_container(broken, "gateway")["readinessProbe"]["grpc"]["port"] = 50051
    assert any("gateway/gateway: readinessProbe does not ask the plaintext health port" in p
               for p in tls_problems(broken))

    broken = [d for d in copy.deepcopy(docs) if d["kind"] != "Certificate" or "gateway" not in d["metadata"]["name"]]
    assert any("no Certificate writes Secret ragtune-tls-gateway" in p for p in tls_problems(broken))
    assert any("Secret ragtune-tls-gateway does not exist" in p for p in reference_problems(broken))
