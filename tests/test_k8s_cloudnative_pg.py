"""The CloudNativePG variant (an overlay plus k8s/components/cloudnative-pg): it renders and validates
(the operator's kinds checked by shape: no bundled schema), every client of the database (the
generator too, which reads adapter aliases) moves onto the operator's pooler and Secret, the migration
Job onto the primary, nothing is left that mounts or names postgres-credentials, the operator's pods
are reachable exactly as the clients need, and backups go to object storage."""

from __future__ import annotations

import json
import subprocess
from urllib.parse import urlparse

import kubernetes_validate
import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    CNPG_API,
    CNPG_SECRET_FILES,
    DATABASE_CLIENTS,
    K8S_VERSION,
    OVERLAYS,
    allowed_ingress_sources,
    by_kind,
    cnpg_objects,
    cnpg_pods,
    cnpg_service_names,
    egress_allowed,
    env_of,
    env_problems,
    migration_jobs,
    network_policy_problems,
    probe_problems,
    ragtune_containers,
    reference_problems,
    render_with,
    selector_problems,
)

COMPONENT = ("cloudnative-pg",)
BUNDLED_DATABASE = {("StatefulSet", "postgres"), ("Service", "postgres"), ("CronJob", "postgres-backup"),
                    ("PersistentVolumeClaim", "postgres-backups")}


def render_cnpg(overlay: str) -> list[dict]:
    return render_with(overlay, COMPONENT)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cnpg_variant_renders_and_validates(overlay):
    docs = render_cnpg(overlay)
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith(CNPG_API):
            continue  # the operator's CRDs: no bundled schema; their shape is checked below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: report them all at once
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert errors == []
    operator_kinds = {(d["apiVersion"], d["kind"]) for d in docs if d["apiVersion"].startswith(CNPG_API)}
    assert operator_kinds == {(f"{CNPG_API}v1", k) for k in ("Cluster", "Pooler", "ScheduledBackup")}
    assert not {(d["kind"], d["metadata"]["name"]) for d in docs} & BUNDLED_DATABASE
    assert {d["metadata"].get("namespace") for d in docs if d["apiVersion"].startswith(CNPG_API)} == {"ragtune"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cnpg_variant_keeps_every_cross_reference(overlay):
    """Selectors, references (the operator's app Secret counted as existing), probes, settings and
    NetworkPolicies (the operator's pods counted) all hold."""
    docs = render_cnpg(overlay)
    assert selector_problems(docs) == []
    assert reference_problems(docs) == []
    assert probe_problems(docs) == []
    assert env_problems(docs) == []
    assert network_policy_problems(docs + cnpg_pods(docs)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_database_client_moves_to_the_operators_database(overlay):
    """Each ragtune container with RAGTUNE_DATABASE_URL (the gateway, generator and trainer servers and
    the migration Job) points at a Service the operator creates, for the Cluster's owner and database,
    with the password from the operator's Secret; the servers go through the pooler, the Job straight to
    the primary (its advisory lock needs its own session); nothing names postgres-credentials."""
    docs = render_cnpg(overlay)
    (cluster,) = cnpg_objects(docs, "Cluster").values()
    (pooler,) = cnpg_objects(docs, "Pooler").values()
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    app_secret = f"{cluster['metadata']['name']}-app"
    (job,) = migration_jobs(docs)
    clients = set()
    for w, c, _ in ragtune_containers(docs, init=True, batch=True):
        env = env_of(docs, c, refs=True)
        if "RAGTUNE_DATABASE_URL" not in env:
            continue
        name = w["metadata"]["name"]
        clients.add(name)
        url = urlparse(env["RAGTUNE_DATABASE_URL"])
        assert url.hostname in cnpg_service_names(docs) and url.port == 5432, name
        assert (url.username, url.path.lstrip("/"), url.password) == (initdb["owner"], initdb["database"], None), name
        expected = f"{cluster['metadata']['name']}-rw" if w is job else pooler["metadata"]["name"]
        assert url.hostname == expected, name
        assert env["RAGTUNE_DATABASE_PASSWORD"] == {"secretKeyRef": {"name": app_secret, "key": "password"}}, name
    assert clients == DATABASE_CLIENTS | {job["metadata"]["name"]}
    assert "postgres-credentials" not in json.dumps(docs)
    assert pooler["spec"]["cluster"]["name"] == cluster["metadata"]["name"] and pooler["spec"]["type"] == "rw"
    bouncer = pooler["spec"]["pgbouncer"]
    # psycopg prepares statements it runs often; in transaction mode PgBouncer must track them.
    assert bouncer["poolMode"] == "transaction" and int(bouncer["parameters"]["max_prepared_statements"]) > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operator_pods_admit_exactly_the_clients(overlay):
    """The clients reach the pooler and the Job the primary (their egress and the pods' ingress); the
    retriever does not; the instances admit each other, the pooler and the operator's namespace."""
    docs = render_cnpg(overlay)
    pods = {p["metadata"]["name"]: p for p in cnpg_pods(docs)}
    everything = docs + list(pods.values())
    (cluster_name,) = cnpg_objects(docs, "Cluster")
    (pooler_name,) = cnpg_objects(docs, "Pooler")
    instances, pooler = pods[f"{cluster_name}-instances"], pods[pooler_name]
    deployments = by_kind(docs, "Deployment")
    (job,) = migration_jobs(docs)
    for client in DATABASE_CLIENTS:
        assert egress_allowed(everything, deployments[client], pooler, 5432), client
    assert egress_allowed(everything, job, instances, 5432)
    assert not egress_allowed(everything, deployments["retriever"], pooler, 5432)
    assert allowed_ingress_sources(everything, pooler) == DATABASE_CLIENTS | {job["metadata"]["name"]}
    assert allowed_ingress_sources(everything, instances) >= {pooler_name, f"{cluster_name}-instances",
                                                             "namespace/cnpg-system", job["metadata"]["name"]}
    assert "retriever" not in allowed_ingress_sources(everything, instances)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_database_backs_up_to_object_storage(overlay):
    """WAL archiving and base backups to a bucket, with a retention, credentials from a Secret of the
    render holding the keys named, and a nightly ScheduledBackup of that Cluster."""
    docs = render_cnpg(overlay)
    (cluster,) = cnpg_objects(docs, "Cluster").values()
    (scheduled,) = cnpg_objects(docs, "ScheduledBackup").values()
    backup = cluster["spec"]["backup"]
    store = backup["barmanObjectStore"]
    assert urlparse(store["destinationPath"]).scheme == "s3" and urlparse(store["destinationPath"]).netloc
    assert backup["retentionPolicy"].endswith("d")
    secrets = by_kind(docs, "Secret")
    for ref in store["s3Credentials"].values():
        assert ref["key"] in secrets[ref["name"]]["data"], ref
    assert scheduled["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert scheduled["spec"]["method"] == "barmanObjectStore"
    assert len(scheduled["spec"]["schedule"].split()) == 6  # CloudNativePG's cron has seconds first
    assert cluster["spec"]["instances"] >= 3


def test_component_credentials_are_never_committed():
    for name in CNPG_SECRET_FILES:
        path = f"k8s/components/cloudnative-pg/secrets/{name}"
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT).returncode == 0, path
