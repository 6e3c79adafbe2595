"""A real PostgreSQL for the tests: the server at 127.0.0.1:5432 where one runs (CI machines have
one), else one started from the installed PostgreSQL binaries in a temporary folder. Each test
gets a fresh database, dropped afterwards. In CI a missing PostgreSQL fails the tests instead of
skipping them, so the PostgreSQL runs cannot silently disappear."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVER_URL = os.environ.get("RAGTUNE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _connect(url: str):
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True, connect_timeout=3)


def _reachable(url: str) -> bool:
    try:
        _connect(url).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False


class LocalPostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temporary folder, for machines without
    a server, and for the tests that stop and restart the database under running services."""

    def __init__(self, port: int):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries:
            raise RuntimeError("no PostgreSQL binaries (/usr/lib/postgresql/*/bin) on this machine")
        self.bin = Path(binaries[-1]).parent
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="ragtune-pg-"))
        self.data = self.folder / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        # PostgreSQL refuses to run as root: run it as the system's postgres user then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bin / tool), *args], check=True, capture_output=True, cwd=self.folder)

    def start(self, timeout: float = 30.0) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-t", str(int(timeout)),
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.folder}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def server_url_or_skip() -> str:
    if _reachable(SERVER_URL):
        return SERVER_URL
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI and none answers at {SERVER_URL}")
    pytest.skip(f"no PostgreSQL server at {SERVER_URL}")


@contextmanager
def fresh_database(server_url: str):
    """A new, empty database on the server; yields its SQLAlchemy URL and drops it afterwards."""
    name = "ragtune_t_" + uuid.uuid4().hex[:12]
    with _connect(server_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = server_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://")
    finally:
        for _ in range(20):
            try:
                with _connect(server_url) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception:  # noqa: BLE001 - the server may be restarting under a fault test
                time.sleep(0.5)
