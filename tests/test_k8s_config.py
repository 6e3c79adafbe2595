"""What the pods are configured with: environment variables the services' settings classes read
and accept, the sample Secrets, the shared artifact volume and where state lives, Weaviate's
cluster shape, and how the trainers scale."""

from __future__ import annotations

import base64
from pathlib import Path, PurePosixPath

import pytest

from tests.k8s_support import (
    ARTIFACTS_CLAIM,
    OVERLAYS,
    by_kind,
    env_of,
    env_problems,
    manifest_settings,
    pod_spec,
    ragtune_containers,
    render,
    render_base,
    volume_at,
)

# --- environment and settings ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_vars_set_are_read_by_the_services(overlay):
    assert env_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_settings_load_from_the_manifest_env(overlay, monkeypatch):
    """Each ragtune container's settings class accepts the values the manifest sets, binds on all
    interfaces at the port the container declares, and finishes draining before Kubernetes kills it."""
    docs = render(overlay)
    for w, c, service in ragtune_containers(docs):
        settings = manifest_settings(docs, c, service, monkeypatch)
        assert settings.host == "0.0.0.0", w["metadata"]["name"]
        assert settings.port in {p["containerPort"] for p in c["ports"]}, w["metadata"]["name"]
        assert settings.grace_period_s < pod_spec(w)["terminationGracePeriodSeconds"], w["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_internal_services_as_rendered_check_their_callers(overlay, monkeypatch):
    """Each internal service, configured as rendered, passes the start-up check that refuses an exposed port
    with no caller check; the gateway, as rendered, installs no service-identity check on its public port."""
    from ragtune.access import is_internal_service
    from ragtune.server import check_internal_exposure, internal_identity_interceptors
    from ragtune.settings import TLSSettings

    docs = render(overlay)
    names = {"retriever": "ragtune.v1.RetrieverService", "generator": "ragtune.v1.GeneratorService",
             "trainer": "ragtune.v1.TrainerService", "gateway": "ragtune.v1.GatewayService"}
    for w, c, service in ragtune_containers(docs):
        settings = manifest_settings(docs, c, service, monkeypatch)
        internal = is_internal_service([names[service]])
        assert internal == (service != "gateway")
        if internal:
            check_internal_exposure(settings, TLSSettings(), service)
            assert internal_identity_interceptors([names[service]], settings, TLSSettings()), service
        else:
            assert settings.internal_token is not None  # sent to the services, never asked of its own clients


def test_sample_api_keys_secret_loads_in_the_gateway():
    """The placeholder Secret is one the gateway accepts (its bootstrap import into the database),
    mounted where RAGTUNE_GATEWAY_API_KEYS_FILE points."""
    from ragtune.controlplane.api_keys import hash_key, parse_key_entries

    docs = render("cpu")
    gateway = by_kind(docs, "Deployment")["gateway"]
    container = pod_spec(gateway)["containers"][0]
    keys_file = Path(env_of(docs, container)["RAGTUNE_GATEWAY_API_KEYS_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == mount["name"])
    secret = by_kind(docs, "Secret")[volume["secret"]["secretName"]]
    text = base64.b64decode(secret["data"][keys_file.name]).decode()
    (entry,) = parse_key_entries(text, "sample secret")
    assert (entry.sha256, entry.tenant) == (hash_key("rt_demo_replace_me"), "demo")


# --- storage: the shared artifact volume, and no state left in a pod ----------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_artifacts_are_shared_rw_by_trainer_and_gateway_ro_by_generator(overlay):
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    claim = by_kind(docs, "PersistentVolumeClaim")[ARTIFACTS_CLAIM]
    for name, read_only in (("trainer", False), ("gateway", False), ("generator", True)):
        spec = pod_spec(deployments[name])
        volume = next(v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"])
        container = spec["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert bool(mount.get("readOnly")) is read_only and bool(volume["persistentVolumeClaim"].get("readOnly")) is read_only
        env = env_of(docs, container)
        assert env["RAGTUNE_ARTIFACT_ROOT"] == mount["mountPath"] == "/var/lib/ragtune/artifacts", name
        # The registry is <root>/adapters; a separate setting could point trainer and generator apart.
        assert "RAGTUNE_ADAPTER_REGISTRY" not in env, name
    retriever = pod_spec(deployments["retriever"])
    assert not any(v.get("persistentVolumeClaim", {}).get("claimName") == ARTIFACTS_CLAIM for v in retriever["volumes"])
    if overlay == "gpu":  # pods on several nodes share it
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_artifacts_claim_is_read_write_many_in_the_base():
    """Every overlay starts from a ReadWriteMany claim; only the one-node cpu overlay narrows it."""
    claim = by_kind(render_base(), "PersistentVolumeClaim")[ARTIFACTS_CLAIM]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_keeps_no_job_state_in_an_emptydir(overlay, monkeypatch):
    """Jobs are rows in PostgreSQL, and datasets, checkpoints and adapters are files on the shared
    claim, so another trainer can resume a killed one's job; nothing of it is in the pod's scratch."""
    docs = render(overlay)
    trainer = by_kind(docs, "Deployment")["trainer"]
    container = pod_spec(trainer)["containers"][0]
    settings = manifest_settings(docs, container, "trainer", monkeypatch)
    assert settings.database_url.startswith("postgresql"), "job records must not be a SQLite file in the pod"
    for path in (settings.trainer_dir, settings.registry_root):
        volume = volume_at(trainer, container, path)
        assert volume is not None and volume.get("persistentVolumeClaim", {}).get("claimName") == ARTIFACTS_CLAIM, path
    for volume in pod_spec(trainer)["volumes"]:
        if "emptyDir" in volume:
            mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert not any(PurePosixPath(settings.trainer_dir).is_relative_to(m) for m in mounts), volume["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_writes_nothing_into_its_pod_but_tmp(overlay):
    """Evaluation reports go to the artifact volume: the only pod-local volume a gateway has is /tmp,
    so nothing is lost when the autoscaler removes a replica."""
    docs = render(overlay)
    gateway = by_kind(docs, "Deployment")["gateway"]
    for c in pod_spec(gateway)["containers"]:
        local = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volume_at(gateway, c, m["mountPath"])}
        assert local == {"/tmp"}, c["name"]


# --- scaling -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainers_are_interchangeable_workers_one_per_gpu(overlay):
    """Several trainer replicas are fine now that jobs are claimed from the database: the gpu overlay
    runs more than one, each with its own GPU, and a rollout may start a new trainer beside an old one."""
    trainer = by_kind(render(overlay), "Deployment")["trainer"]
    assert trainer["spec"]["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    if overlay == "gpu":  # test_gpus_only_in_the_gpu_overlay: one GPU each
        assert trainer["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weaviate_cluster_settings_agree_with_replicas(overlay):
    docs = render(overlay)
    weaviate = by_kind(docs, "StatefulSet")["weaviate"]
    env = env_of(docs, pod_spec(weaviate)["containers"][0])
    replicas = weaviate["spec"]["replicas"]
    assert int(env["RAFT_BOOTSTRAP_EXPECT"]) == replicas
    assert env["RAFT_JOIN"].split(",") == [f"weaviate-{i}" for i in range(replicas)]
    assert 1 <= int(env["REPLICATION_MINIMUM_FACTOR"]) <= replicas
    assert weaviate["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in pod_spec(weaviate)["containers"][0]["volumeMounts"]
    }
    assert by_kind(docs, "Service")["weaviate-headless"]["spec"]["clusterIP"] == "None"
    if overlay == "gpu":
        assert replicas >= 3 and int(env["REPLICATION_MINIMUM_FACTOR"]) >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_share_their_quota_counters(overlay, monkeypatch):
    """Every gateway replica counts quotas in the one Redis the manifests bring (else each would count alone and
    a tenant would get replicas x its limit), and only the gateways may reach it."""
    docs = render(overlay)
    services = by_kind(docs, "Service")
    redis = by_kind(docs, "Deployment")["redis"]
    port = pod_spec(redis)["containers"][0]["ports"][0]["containerPort"]
    for w, c, service in ragtune_containers(docs):
        settings = manifest_settings(docs, c, service, monkeypatch)
        if service == "gateway":
            url = settings.quota_redis_url.get_secret_value()
            host, _, tail = url.removeprefix("redis://").partition(":")
            assert host in services and int(tail.split("/")[0]) == port == services[host]["spec"]["ports"][0]["port"]
    policy = by_kind(docs, "NetworkPolicy")["redis-from-gateway"]
    sources = [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for rule in policy["spec"]["ingress"]
               for p in rule["from"]]
    assert sources == ["gateway"]
