"""Who may talk to whom (NetworkPolicies), how every pod is locked down and sized, and who yields
to whom when the cluster is full (PriorityClasses)."""

from __future__ import annotations

import pytest

from tests.k8s_support import (
    DATABASE_BACKUP,
    manifest_settings,
    DATABASE_CLIENTS,
    OVERLAYS,
    SERVICES,
    all_containers,
    allowed_ingress_sources,
    by_kind,
    egress_allowed,
    image_name,
    migration_jobs,
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
    """PostgreSQL accepts connections only from the services that keep state in it, the release's
    migration Job and the nightly dump, and their restricted egress lets them reach it on 5432 while
    the other services' egress does not."""
    docs = render(overlay)
    postgres = by_kind(docs, "StatefulSet")["postgres"]
    (job,) = migration_jobs(docs)
    assert allowed_ingress_sources(docs, postgres) == DATABASE_CLIENTS | {job["metadata"]["name"], DATABASE_BACKUP}
    for runner in (job, by_kind(docs, "CronJob")[DATABASE_BACKUP]):
        assert egress_allowed(docs, runner, postgres, 5432), runner["metadata"]["name"]
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


# --- who yields when the cluster is full --------------------------------------------------------

SERVING_CLASS, TRAINING_CLASS = "ragtune-serving", "ragtune-training"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_preempts_training(overlay):
    """Every workload names a PriorityClass the overlay ships: the trainer the lower one, which never
    preempts anything itself; everything on the serving path (and the stores and Jobs it needs) the
    higher one, so a generator that needs a GPU evicts a trainer instead of waiting."""
    docs = render(overlay)
    classes = by_kind(docs, "PriorityClass")
    serving, training = classes[SERVING_CLASS], classes[TRAINING_CLASS]
    assert serving["value"] > training["value"] > 0
    assert serving.get("preemptionPolicy", "PreemptLowerPriority") == "PreemptLowerPriority"
    assert training["preemptionPolicy"] == "Never"
    assert not any(c.get("globalDefault") for c in classes.values()), "other tenants' pods keep their priority"
    for w in workloads(docs):
        name = w["metadata"]["name"]
        assert pod_spec(w)["priorityClassName"] == (TRAINING_CLASS if name == "trainer" else SERVING_CLASS), name


# --- GPU nodes that fit the settings ------------------------------------------------------------

# NVIDIA GPU Feature Discovery's node labels (the GPU operator runs it).
GPU_PRESENT = "nvidia.com/gpu.present"
COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"


def required_node_terms(spec: dict) -> list[dict[str, dict]]:
    """The pod's required node selection as terms (ORed) of key -> expression (ANDed); nodeSelector
    entries are added to every term."""
    affinity = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = [{e["key"]: e for e in term.get("matchExpressions", [])} for term in affinity.get("nodeSelectorTerms", [])] or [{}]
    for key, value in spec.get("nodeSelector", {}).items():
        for term in terms:
            term.setdefault(key, {"key": key, "operator": "In", "values": [value]})
    return terms


def min_compute_major(term: dict[str, dict]) -> int:
    expr = term.get(COMPUTE_MAJOR)
    if expr is None:
        return 0
    if expr["operator"] == "Gt":
        return int(expr["values"][0]) + 1
    if expr["operator"] == "In":
        return min(int(v) for v in expr["values"])
    return 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pods_land_on_gpus_that_fit_their_dtype(overlay, monkeypatch):
    """Pods that ask for a GPU require a node with one; a generator running bfloat16 requires GPUs of
    compute capability 8.0 or newer (vLLM refuses bfloat16 below), in every term of its node affinity."""
    docs = render(overlay)
    for w in workloads(docs):
        spec = pod_spec(w)
        if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in spec["containers"]):
            for term in required_node_terms(spec):
                assert term.get(GPU_PRESENT, {}).get("values") == ["true"], w["metadata"]["name"]
    generator = by_kind(docs, "Deployment")["generator"]
    dtype = manifest_settings(docs, pod_spec(generator)["containers"][0], "generator", monkeypatch).dtype
    if dtype == "bfloat16":
        assert all(min_compute_major(t) >= 8 for t in required_node_terms(pod_spec(generator)))
    assert (dtype == "float32") is (overlay == "cpu")


def test_bfloat16_without_a_gpu_model_rule_is_refused():
    docs = render("gpu")
    spec = pod_spec(by_kind(docs, "Deployment")["generator"])
    del spec["affinity"]
    assert min(min_compute_major(t) for t in required_node_terms(spec)) < 8
