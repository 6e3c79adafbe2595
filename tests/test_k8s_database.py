"""The control-plane database: the PostgreSQL the base runs, its Secret, the services that use it
(trainer, gateway, generator), the one Job per release that migrates its schema before the rollout (no
serving pod migrates or waits on the database to start), and its nightly pg_dump."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    DATABASE_BACKUP,
    DATABASE_CLIENTS,
    MIGRATE_COMMAND,
    OVERLAYS,
    all_containers,
    by_kind,
    env_of,
    manifest_settings,
    migration_jobs,
    pod_labels,
    pod_spec,
    ragtune_containers,
    reference_problems,
    render,
    serving_workloads,
    service_port,
    workloads,
)


def database_env(docs: list[dict], container: dict) -> dict:
    """How the container finds the database: its RAGTUNE_DATABASE_* variables but the migrate switch,
    with literal values and valueFrom references."""
    return {
        k: v for k, v in env_of(docs, container, refs=True).items()
        if k.startswith("RAGTUNE_DATABASE_") and k != "RAGTUNE_DATABASE_MIGRATE"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_runs_with_its_volume_service_and_secret(overlay):
    """One PostgreSQL pod as the image's own user, its data in a subfolder of its claim, health from
    pg_isready, reached through the `postgres` Service; the clients' URL names that Service, its
    user and database, and their password is the server's, from the same Secret key."""
    docs = render(overlay)
    postgres = by_kind(docs, "StatefulSet")["postgres"]
    spec = pod_spec(postgres)
    (container,) = spec["containers"]
    assert postgres["spec"]["replicas"] == 1
    assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == 999
    env = env_of(docs, container, refs=True)
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert PurePosixPath(env["PGDATA"]).parent == PurePosixPath(mount["mountPath"])
    for kind in ("readinessProbe", "livenessProbe"):
        assert container[kind]["exec"]["command"][0] == "pg_isready", kind
    service = by_kind(docs, "Service")[postgres["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]

    password = env["POSTGRES_PASSWORD"]["secretKeyRef"]
    secret = by_kind(docs, "Secret")[password["name"]]
    value = base64.b64decode(secret["data"][password["key"]]).decode()
    assert value == value.strip() and value, "a trailing newline would become part of the password"
    clients = 0
    for w, c, _ in ragtune_containers(docs, init=True, batch=True):
        db = database_env(docs, c)
        if not db:
            continue
        clients += 1
        url = urlparse(db["RAGTUNE_DATABASE_URL"])
        assert url.scheme == "postgresql+psycopg" and url.password is None, "the password comes from the Secret"
        assert (url.username, url.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
        assert url.hostname == service["metadata"]["name"] and service_port(docs, url.hostname, url.port)
        assert db["RAGTUNE_DATABASE_PASSWORD"] == {"secretKeyRef": password}, w["metadata"]["name"]
    assert clients == len(DATABASE_CLIENTS) + 1  # each client's server, and the migration Job
    backup = pod_spec(by_kind(docs, "CronJob")[DATABASE_BACKUP])["containers"][0]
    backup_env = env_of(docs, backup, refs=True)
    assert (backup_env["PGHOST"], backup_env["PGUSER"], backup_env["PGDATABASE"]) == (
        service["metadata"]["name"], env["POSTGRES_USER"], env["POSTGRES_DB"])
    assert backup_env["PGPASSWORD"] == {"secretKeyRef": password}


def test_sample_database_password_is_marked_as_a_sample():
    docs = render("cpu")
    postgres = pod_spec(by_kind(docs, "StatefulSet")["postgres"])["containers"][0]
    ref = env_of(docs, postgres, refs=True)["POSTGRES_PASSWORD"]["secretKeyRef"]
    value = base64.b64decode(by_kind(docs, "Secret")[ref["name"]]["data"][ref["key"]]).decode()
    assert "sample" in value and "replace" in value


def _job_command(job: dict) -> list[str]:
    (container,) = pod_spec(job)["containers"]
    return container["command"] + container.get("args", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schema_is_migrated_by_one_job_per_release_never_by_serving_pods(overlay, monkeypatch):
    """No serving pod migrates (no init container, RAGTUNE_DATABASE_MIGRATE=false as its settings read
    it), so an older image never meets a revision it does not know and no pod waits on the database;
    exactly one Job runs `migrate`, on the gateway's image and the clients' database settings, named
    after its release, bounded in retries and time, and cleaned up."""
    docs = render(overlay)
    for w in serving_workloads(docs):
        for c in pod_spec(w).get("initContainers", []):
            assert c["name"] != "migrate" and MIGRATE_COMMAND[2] not in " ".join(c.get("command", [])), w["metadata"]["name"]
    runners = [w for w in workloads(docs) for c in all_containers(pod_spec(w))
               if (c.get("command", []) + c.get("args", []))[:4] == MIGRATE_COMMAND]
    (job,) = migration_jobs(docs)
    assert runners == [job], [w["metadata"]["name"] for w in runners]
    users = {w["metadata"]["name"] for w, c, _ in ragtune_containers(docs) if database_env(docs, c)}
    assert users == DATABASE_CLIENTS
    (migrate,) = pod_spec(job)["containers"]
    gateway = pod_spec(by_kind(docs, "Deployment")["gateway"])["containers"][0]
    assert migrate["image"] == gateway["image"], "the release's image, one that carries the control plane"
    tag = migrate["image"].rsplit(":", 1)[1].split("@")[0]
    assert job["metadata"]["name"] == f"ragtune-migrate-{tag.replace('.', '-')}"
    assert job["metadata"]["labels"]["app.kubernetes.io/version"] == tag
    assert env_of(docs, migrate).get("RAGTUNE_DATABASE_MIGRATE", "true") != "false"
    for w, c, service in ragtune_containers(docs):
        if w["metadata"]["name"] in DATABASE_CLIENTS:
            assert database_env(docs, c) == database_env(docs, migrate), w["metadata"]["name"]
            assert env_of(docs, c)["RAGTUNE_DATABASE_MIGRATE"] == "false", w["metadata"]["name"]
            assert manifest_settings(docs, c, service, monkeypatch).database_migrate is False, w["metadata"]["name"]
    spec = job["spec"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert 1 <= spec["backoffLimit"] <= 10 and spec["activeDeadlineSeconds"] <= 3600
    assert 0 < spec["ttlSecondsAfterFinished"] <= 86400
    assert "--wait" in _job_command(job), "rides out a database that is still starting"
    assert pod_spec(job)["securityContext"]["runAsUser"] == pod_spec(by_kind(docs, "Deployment")["gateway"])["securityContext"]["runAsUser"]


ARGO_WAVE = "argocd.argoproj.io/sync-wave"
RELEASE_STEP = "ragtune.dev/release-step"


def _wave(doc: dict) -> int:
    return int(doc["metadata"].get("annotations", {}).get(ARGO_WAVE, "0"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_runs_before_the_rollout(overlay):
    """Argo CD runs the Job as a Sync hook in a wave before every workload, after what it reads;
    `kubectl apply -l ragtune.dev/release-step=migrate` applies exactly the Job and what it reads (the
    Namespace, its ConfigMaps, Secrets and PriorityClass), no serving workload."""
    docs = render(overlay)
    (job,) = migration_jobs(docs)
    notes = job["metadata"]["annotations"]
    assert notes["argocd.argoproj.io/hook"] == "Sync"  # not PreSync: the ConfigMaps it reads come with the sync
    assert notes["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    for w in serving_workloads(docs):
        assert _wave(w) > _wave(job), w["metadata"]["name"]
        assert RELEASE_STEP not in w["metadata"].get("labels", {}), w["metadata"]["name"]
    (container,) = pod_spec(job)["containers"]
    needed = {("Namespace", "ragtune"), ("PriorityClass", pod_spec(job)["priorityClassName"])}
    needed |= {("ConfigMap", s["configMapRef"]["name"]) for s in container["envFrom"]}
    needed |= {("Secret", v["valueFrom"]["secretKeyRef"]["name"]) for v in container["env"] if "valueFrom" in v}
    released = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"].get("labels", {}).get(RELEASE_STEP) == "migrate"}
    assert needed | {("Job", job["metadata"]["name"])} <= released
    for kind, name in needed:
        assert _wave(by_kind(docs, kind)[name]) <= _wave(job), (kind, name)
    assert not {k for k, _ in released} & {"Deployment", "StatefulSet", "DaemonSet", "CronJob"}


def test_migration_job_references_are_checked():
    """A broken reference in the Job is caught like one in a server."""
    broken = render("cpu")
    (job,) = migration_jobs(broken)
    password = next(v for v in pod_spec(job)["containers"][0]["env"] if v["name"] == "RAGTUNE_DATABASE_PASSWORD")
    password["valueFrom"]["secretKeyRef"]["key"] = "nope"
    assert any("has no key nope" in p for p in reference_problems(broken))


def test_migrate_command_exists():
    """The Job's command is one the shared ragtune package (in every image) understands."""
    (job,) = migration_jobs(render("cpu"))
    command = _job_command(job)
    proc = subprocess.run(
        [sys.executable, *command[1:4], "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--wait" in proc.stdout, proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_is_dumped_nightly_with_retention(overlay):
    """The bundled PostgreSQL is dumped every night onto a claim of its own (not the database's), one
    run at a time, the newest BACKUP_KEEP dumps kept, by the server's own image, and PostgreSQL admits it."""
    docs = render(overlay)
    cron = by_kind(docs, "CronJob")[DATABASE_BACKUP]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"] == "Etc/UTC"
    (container,) = pod_spec(cron)["containers"]
    postgres = by_kind(docs, "StatefulSet")["postgres"]
    assert container["image"] == pod_spec(postgres)["containers"][0]["image"], "pg_dump of the server's version"
    env = env_of(docs, container)
    script = container["command"][-1]
    assert "pg_dump --format=custom" in script and "pg_restore --list" in script and "BACKUP_KEEP" in script
    assert int(env["BACKUP_KEEP"]) >= 7
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["BACKUP_DIR"])
    volume = next(v for v in pod_spec(cron)["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")
    assert claim not in {t["metadata"]["name"] for t in postgres["spec"]["volumeClaimTemplates"]}
    assert pod_labels(cron)["app.kubernetes.io/name"] == DATABASE_BACKUP
