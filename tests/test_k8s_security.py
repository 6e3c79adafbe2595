"""Secure by default: no shared secret ships to production (the gpu overlay renders only with
operator-provided values), every image is fully qualified, Weaviate requires the retriever's API
key, keeps backups and its memory headroom, and pods ask for the disk their scratch volumes use."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    GPU_SECRET_FILES,
    K8S_DIR,
    OVERLAYS,
    PENDING_SETTINGS,
    REQUIRED_SECRETS,
    all_containers,
    by_kind,
    env_of,
    kustomize,
    operator_secrets,
    pod_spec,
    ragtune_containers,
    render,
    render_base,
    settings_class,
    settings_env_names,
    workloads,
)

# --- Secrets -----------------------------------------------------------------------------------


def test_base_ships_no_secret():
    assert [d["metadata"]["name"] for d in render_base() if d["kind"] == "Secret"] == []


def test_gpu_overlay_as_committed_refuses_to_render():
    """Without the operator's files the production overlay does not render (so `kubectl apply -k`
    fails), naming the missing file; git ignores those files, so none can be committed by mistake."""
    with tempfile.TemporaryDirectory() as tmp:
        committed = Path(tmp) / "k8s"  # without whatever secret files this checkout may hold
        shutil.copytree(K8S_DIR, committed, ignore=shutil.ignore_patterns(*GPU_SECRET_FILES))
        proc = kustomize(committed / "overlays" / "gpu")
    assert proc.returncode != 0
    assert re.search(r"secrets/(api-keys\.json|internal-token|postgres-password|weaviate-api-key)", proc.stderr), proc.stderr
    for name in GPU_SECRET_FILES:
        path = f"k8s/overlays/gpu/secrets/{name}"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{path} must be git-ignored"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO_ROOT, capture_output=True)
        assert tracked.returncode != 0, f"{path} is committed"


def secret_values(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
        for d in docs if d["kind"] == "Secret"
    }


def test_gpu_overlay_secrets_come_only_from_the_operator():
    """Every Secret the production overlay deploys holds exactly what the operator provided."""
    provided = operator_secrets()
    values = {name.rsplit("-", 1)[0]: keys for name, keys in secret_values(render("gpu")).items()}
    assert set(values) == set(REQUIRED_SECRETS)
    from_file = {
        "gateway-api-keys": provided["api-keys.json"], "ragtune-internal-token": provided["internal-token"],
        "postgres-credentials": provided["postgres-password"], "weaviate-api-key": provided["weaviate-api-key"],
    }
    for name, key in REQUIRED_SECRETS.items():
        assert values[name] == {key: from_file[name]}, name


def test_cpu_overlay_samples_say_they_are_samples():
    """The laptop overlay's values are marked samples, and none of them can reach the gpu overlay."""
    values = secret_values(render("cpu"))
    assert {n.rsplit("-", 1)[0] for n in values} == set(REQUIRED_SECRETS)
    for name, keys in values.items():
        for value in keys.values():
            assert "replace" in value.lower() and "sample" in value.lower(), name
    gpu = json.dumps(secret_values(render("gpu")))
    assert "sample" not in gpu and "replace" not in gpu


# --- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_fully_qualified(overlay):
    """registry/name:tag (a Docker Hub image spelled docker.io/...), never a bare name a node may
    resolve against whatever registry it is configured with."""
    for w in workloads(render(overlay)):
        for c in all_containers(pod_spec(w)):
            registry = c["image"].split("/")[0]
            assert "." in registry or ":" in registry, f"{w['metadata']['name']}: {c['image']}"
            assert ":" in c["image"].split("/")[-1], f"{c['image']}: no tag"


# --- Weaviate -------------------------------------------------------------------------------------


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)", quantity).groups()
    return float(number) * units[unit]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weaviate_requires_the_retrievers_api_key(overlay):
    docs = render(overlay)
    weaviate = pod_spec(by_kind(docs, "StatefulSet")["weaviate"])["containers"][0]
    env = env_of(docs, weaviate, refs=True)
    assert env["AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED"] == "false"
    assert env["AUTHENTICATION_APIKEY_ENABLED"] == "true"
    key_ref = env["AUTHENTICATION_APIKEY_ALLOWED_KEYS"]["secretKeyRef"]
    assert env["AUTHENTICATION_APIKEY_USERS"] == env["AUTHORIZATION_ADMINLIST_USERS"] == "ragtune-retriever"
    retriever = pod_spec(by_kind(docs, "Deployment")["retriever"])["containers"][0]
    assert env_of(docs, retriever, refs=True)["WEAVIATE_API_KEY"] == {"secretKeyRef": key_ref}


def test_retriever_reads_the_weaviate_api_key():
    """The manifests hand the retriever WEAVIATE_API_KEY; its settings read it (and the Weaviate
    backend passes it as the client's API-key credentials)."""
    assert "WEAVIATE_API_KEY" in settings_env_names(settings_class("retriever"))


OBJECT_STORE_BACKUPS = {"backup-s3": "BACKUP_S3_BUCKET", "backup-gcs": "BACKUP_GCS_BUCKET",
                        "backup-azure": "BACKUP_AZURE_CONTAINER"}


def weaviate_backup_problems(docs: list[dict]) -> list[str]:
    """Weaviate backs up through exactly one backup module: to object storage (a bucket every replica
    reaches) whenever it runs more than one replica, since a backup spread over per-pod volumes cannot
    be restored elsewhere; to a filesystem only on one replica, and then on a claim of its own."""
    statefulset = by_kind(docs, "StatefulSet")["weaviate"]
    container = pod_spec(statefulset)["containers"][0]
    env = env_of(docs, container, refs=True)
    modules = [m for m in str(env.get("ENABLE_MODULES", "")).split(",") if m.startswith("backup-")]
    if len(modules) != 1:
        return [f"weaviate: backup modules {modules}, not exactly one"]
    (module,) = modules
    if module in OBJECT_STORE_BACKUPS:
        bucket = env.get(OBJECT_STORE_BACKUPS[module])
        return [] if isinstance(bucket, str) and bucket else [f"weaviate: {module} without a bucket"]
    if module != "backup-filesystem":
        return [f"weaviate: unknown backup module {module}"]
    if statefulset["spec"]["replicas"] > 1:
        return [f"weaviate: {statefulset['spec']['replicas']} replicas back up to per-pod filesystems"]
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mount = next((m for m in container["volumeMounts"] if m["mountPath"] == env.get("BACKUP_FILESYSTEM_PATH")), None)
    if mount is None or mount["name"] not in claims or mount["name"] == "data":
        return ["weaviate: filesystem backups not on a claim of their own"]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weaviate_memory_backups_and_volume_ownership(overlay):
    """GOMEMLIMIT at 85 % of the memory limit (Weaviate's docs: 80-90 %), backups where they can be
    restored from, and no recursive chown of the volumes on each start."""
    docs = render(overlay)
    statefulset = by_kind(docs, "StatefulSet")["weaviate"]
    container = pod_spec(statefulset)["containers"][0]
    env = env_of(docs, container)
    limit = memory_mib(container["resources"]["limits"]["memory"])
    assert env["GOMEMLIMIT"].endswith("MiB")
    assert abs(float(env["GOMEMLIMIT"].removesuffix("MiB")) - 0.85 * limit) <= 1, (env["GOMEMLIMIT"], limit)
    assert weaviate_backup_problems(docs) == []
    assert pod_spec(statefulset)["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_weaviate_backs_up_to_object_storage_in_the_base_and_on_several_replicas():
    """The base (every site's start) and the several-replica gpu overlay back up to a bucket, with no
    per-pod backup volume and credentials that may come from workload identity instead of a Secret;
    the one-replica laptop overlay keeps a filesystem volume. The check fails on what it forbids."""
    for docs in (render_base(), render("gpu")):
        weaviate = by_kind(docs, "StatefulSet")["weaviate"]
        env = env_of(docs, pod_spec(weaviate)["containers"][0], refs=True)
        assert env["ENABLE_MODULES"] == "backup-s3" and env["BACKUP_S3_BUCKET"]
        assert [t["metadata"]["name"] for t in weaviate["spec"]["volumeClaimTemplates"]] == ["data"]
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[var]["secretKeyRef"]["optional"] is True, var
    assert "backup-filesystem" in env_of(render("cpu"), pod_spec(by_kind(render("cpu"), "StatefulSet")["weaviate"])["containers"][0])["ENABLE_MODULES"]
    broken = render("gpu")
    config = next(c for n, c in by_kind(broken, "ConfigMap").items() if n.startswith("weaviate-backup"))
    config["data"]["ENABLE_MODULES"] = "backup-filesystem"
    config["data"]["BACKUP_FILESYSTEM_PATH"] = "/var/lib/weaviate-backups"
    assert any("per-pod filesystems" in p for p in weaviate_backup_problems(broken))


# --- scratch space ------------------------------------------------------------------------------


def quantity_gib(quantity: str) -> float:
    return memory_mib(quantity) / 1024


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_large_scratch_volumes_are_requested_as_ephemeral_storage(overlay):
    """A container whose disk-backed emptyDirs may hold 1 GiB or more requests that much
    ephemeral-storage, so the scheduler places it on a node with the disk (instead of an eviction
    later)."""
    checked = 0
    for w in workloads(render(overlay)):
        for c in pod_spec(w)["containers"]:
            size = 0.0
            volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}  # claims are not scratch
            for m in c.get("volumeMounts", []):
                empty = volumes.get(m["name"], {}).get("emptyDir")
                if empty is not None and empty.get("medium") != "Memory":
                    size += quantity_gib(empty.get("sizeLimit", "0Gi"))
            if size >= 1:
                checked += 1
                requested = c["resources"]["requests"].get("ephemeral-storage")
                assert requested and quantity_gib(requested) >= size, f"{w['metadata']['name']}: {size} GiB of emptyDir"
    assert checked >= 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ragtune_pods_get_the_internal_token_from_a_secret(overlay):
    docs = render(overlay)
    for w, c, service in ragtune_containers(docs):
        ref = env_of(docs, c, refs=True)["RAGTUNE_INTERNAL_TOKEN"]
        assert ref == {"secretKeyRef": {"name": ref["secretKeyRef"]["name"], "key": "RAGTUNE_INTERNAL_TOKEN"}}, service
