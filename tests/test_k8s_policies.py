"""Who may talk to whom (NetworkPolicies), and how every pod is locked down and sized."""

from __future__ import annotations

import pytest

from tests.k8s_support import (
    DATABASE_CLIENTS,
    OVERLAYS,
    SERVICES,
    all_containers,
    allowed_ingress_sources,
    by_kind,
    egress_allowed,
    image_name,
    network_policy_problems,
    pod_spec,
    ragtune_containers,
    render,
    workloads,
)

# --- network policies --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_existing_pods_and_ports(overlay):
    assert network_policy_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_the_internal_services(overlay):
    docs = render(overlay)
    deployments, sets = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")
    for internal in ("retriever", "generator", "trainer"):
        assert allowed_ingress_sources(docs, deployments[internal]) == {"gateway"}, internal
    assert allowed_ingress_sources(docs, sets["weaviate"]) == {"retriever", "weaviate"}
    # The services export to it; Prometheus, in its own namespace, scrapes its metrics port.
    assert allowed_ingress_sources(docs, deployments["otel-collector"]) == {
        "gateway", "retriever", "generator", "trainer", "namespace/monitoring"}
    assert allowed_ingress_sources(docs, deployments["gateway"]) == {"*"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_database_clients_reach_postgres(overlay):
    """PostgreSQL accepts connections only from the services that keep state in it, and their
    restricted egress lets them reach it on 5432 while the other services' egress does not."""
    docs = render(overlay)
    postgres = by_kind(docs, "StatefulSet")["postgres"]
    assert allowed_ingress_sources(docs, postgres) == DATABASE_CLIENTS
    deployments = by_kind(docs, "Deployment")
    for service in SERVICES:
        assert egress_allowed(docs, deployments[service], postgres, 5432) is (service in DATABASE_CLIENTS), service
    without = [d for d in docs if d["metadata"]["name"] != "database-clients-egress-to-postgres"]
    assert not egress_allowed(without, deployments["trainer"], postgres, 5432)  # a check that can fail


# --- security and sizing ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_sized(overlay):
    for w in workloads(render(overlay)):
        spec, name = pod_spec(w), w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{name}: {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_the_gpu_overlay(overlay):
    docs = render(overlay)
    gpu_users = {}
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
            if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
                assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu") == 1, w["metadata"]["name"]
                gpu_users[w["metadata"]["name"]] = image_name(c["image"])
    if overlay == "gpu":
        assert gpu_users == {"generator": "ghcr.io/ragtune/generator-gpu", "trainer": "ghcr.io/ragtune/trainer-gpu"}
    else:
        assert gpu_users == {}
        assert not any(image_name(c["image"]).endswith("-gpu") for _, c, _ in ragtune_containers(docs))
