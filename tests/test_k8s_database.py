"""The control-plane database: the PostgreSQL the base runs, its Secret, and the services that
use it (trainer, gateway, generator), each migrating the schema in an init container before it starts."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    DATABASE_CLIENTS,
    MIGRATE_COMMAND,
    OVERLAYS,
    by_kind,
    env_of,
    pod_spec,
    ragtune_containers,
    reference_problems,
    render,
    service_port,
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
    for w, c, _ in ragtune_containers(docs, init=True):
        db = database_env(docs, c)
        if not db:
            continue
        clients += 1
        url = urlparse(db["RAGTUNE_DATABASE_URL"])
        assert url.scheme == "postgresql+psycopg" and url.password is None, "the password comes from the Secret"
        assert (url.username, url.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_DB"])
        assert url.hostname == service["metadata"]["name"] and service_port(docs, url.hostname, url.port)
        assert db["RAGTUNE_DATABASE_PASSWORD"] == {"secretKeyRef": password}, w["metadata"]["name"]
    assert clients == 2 * len(DATABASE_CLIENTS)  # each client's server and its migrate init container


def test_sample_database_password_is_marked_as_a_sample():
    docs = render("cpu")
    postgres = pod_spec(by_kind(docs, "StatefulSet")["postgres"])["containers"][0]
    ref = env_of(docs, postgres, refs=True)["POSTGRES_PASSWORD"]["secretKeyRef"]
    value = base64.b64decode(by_kind(docs, "Secret")[ref["name"]]["data"][ref["key"]]).decode()
    assert "sample" in value and "replace" in value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_database_clients_migrate_in_an_init_container(overlay):
    """Every pod that uses the database (the trainer, the gateway and the generator, no other) upgrades the schema
    in a `migrate` init container of its own image, with the same database settings and the same
    hardening, and its server does not migrate again."""
    docs = render(overlay)
    users = {w["metadata"]["name"] for w, c, _ in ragtune_containers(docs, init=True) if database_env(docs, c)}
    assert users == DATABASE_CLIENTS
    deployments = by_kind(docs, "Deployment")
    for name in DATABASE_CLIENTS:
        spec = pod_spec(deployments[name])
        (main,) = spec["containers"]
        (migrate,) = [c for c in spec.get("initContainers", []) if c["name"] == "migrate"]
        assert migrate["command"] == MIGRATE_COMMAND, name
        assert migrate["image"] == main["image"], name
        assert database_env(docs, migrate) == database_env(docs, main), name
        assert migrate["securityContext"] == main["securityContext"], name
        assert env_of(docs, main)["RAGTUNE_DATABASE_MIGRATE"] == "false", name
        assert env_of(docs, migrate).get("RAGTUNE_DATABASE_MIGRATE", "true") != "false", name


def test_init_containers_references_are_checked():
    """A broken reference in an init container is caught like one in a container."""
    broken = render("cpu")
    migrate = pod_spec(by_kind(broken, "Deployment")["trainer"])["initContainers"][0]
    password = next(v for v in migrate["env"] if v["name"] == "RAGTUNE_DATABASE_PASSWORD")
    password["valueFrom"]["secretKeyRef"]["key"] = "nope"
    assert any("has no key nope" in p for p in reference_problems(broken))


def test_migrate_command_exists():
    """The init containers' command is one the shared ragtune package (in every image) understands."""
    proc = subprocess.run(
        [sys.executable, *MIGRATE_COMMAND[1:], "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--wait" in proc.stdout, proc.stderr
