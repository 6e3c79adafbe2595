"""The database's backup and restore, tried here on a real PostgreSQL as the manifests and the runbook
do them: the migration Job's command (as rendered) creates the schema, the suite's records are
written through the control plane, the nightly CronJob's own script dumps the database, the database
is dropped, the runbook's pg_restore brings it back, and the suite finds its keys, aliases and jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.controlplane.api_keys import ApiKeyStore, hash_key
from ragtune.controlplane.database import Database
from ragtune.controlplane.jobs import JobStore
from tests.database_support import _connect, fresh_database, server_url_or_skip
from tests.grpc_support import REPO_ROOT
from tests.k8s_support import DATABASE_BACKUP, by_kind, env_of, migration_jobs, pod_spec, render


def _tool(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def _libpq_env(url: str) -> dict[str, str]:
    """What the CronJob's PG* variables name, for the local server (the manifest's own are the Service's)."""
    parsed = urlparse(url)
    return {"PGHOST": parsed.hostname, "PGPORT": str(parsed.port or 5432), "PGUSER": parsed.username or "postgres",
            "PGDATABASE": parsed.path.lstrip("/")}


def test_restore_drill_on_a_real_database(tmp_path):
    server = server_url_or_skip()
    for tool in ("pg_dump", "pg_restore", "bash"):
        _tool(tool)
    docs = render("cpu")
    (job,) = migration_jobs(docs)
    (migrate,) = pod_spec(job)["containers"]
    backup = pod_spec(by_kind(docs, "CronJob")[DATABASE_BACKUP])["containers"][0]
    with fresh_database(server) as url:
        # 1. The migration Job, as rendered: its command, its environment, the local database.
        job_env = {k: v for k, v in env_of(docs, migrate).items() if v is not None}
        proc = subprocess.run(migrate["command"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **job_env, "RAGTUNE_DATABASE_URL": url,
                                   "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
        assert proc.returncode == 0, proc.stderr

        # 2. The suite's records.
        database = Database(url)
        key, _ = ApiKeyStore(database).create("acme", ["read"], name="drill")
        AliasStore(database).set("acme", "support-bot", "prod", [Target(version=3, weight=100)], actor="drill")
        created, _ = JobStore(database).create("acme", {"dataset": "drill.jsonl"})
        database.dispose()

        # 3. The CronJob's own script, its BACKUP_DIR on a temporary folder, libpq at the local server.
        env = env_of(docs, backup)
        script = backup["command"][-1]
        dump_env = {**os.environ, **{k: v for k, v in env.items() if v is not None and not k.startswith("PG")},
                    **_libpq_env(url), "BACKUP_DIR": str(tmp_path), "BACKUP_KEEP": "2"}
        older = [tmp_path / "ragtune-20200101T021700Z.dump", tmp_path / "ragtune-20210101T021700Z.dump"]
        for path in older:  # earlier nights' dumps: the retention keeps the newest two
            path.write_bytes(b"an earlier night")
        proc = subprocess.run([*backup["command"][:-1], script], capture_output=True, text=True, timeout=120,
                              env=dump_env)
        assert proc.returncode == 0, proc.stderr
        dumps = sorted(tmp_path.glob("ragtune-*.dump"))
        assert dumps[0] == older[1] and len(dumps) == 2, dumps
        assert not list(tmp_path.glob(".*.partial")), list(tmp_path.iterdir())

        # 4. Drop and re-create the database (the runbook's dropdb --force / createdb).
        name = urlparse(url).path.lstrip("/")
        with _connect(server) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        with _connect(url) as fresh:
            tables = fresh.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            assert tables.fetchone()[0] == 0, "the drill must start from an empty database"

        # 5. Restore the newest dump as the runbook does, and find the records.
        proc = subprocess.run(["pg_restore", f"--dbname={name}", "--no-owner", "--exit-on-error", str(dumps[-1])],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **_libpq_env(url)})
        assert proc.returncode == 0, proc.stderr
        database = Database(url)
        try:
            assert any(k.sha256 == hash_key(key) for k in ApiKeyStore(database).active())
            assert AliasStore(database).get("acme", "support-bot", "prod").targets == (Target(version=3, weight=100),)
            assert JobStore(database).get(created.id, "acme").spec == {"dataset": "drill.jsonl"}
            # The restored schema is current: the Job has nothing left to do.
            proc = subprocess.run(migrate["command"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **job_env, "RAGTUNE_DATABASE_URL": url,
                                       "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
            assert proc.returncode == 0, proc.stderr
        finally:
            database.dispose()
