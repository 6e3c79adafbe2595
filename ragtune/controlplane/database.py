"""`Database`: one SQLAlchemy engine on the URL in RAGTUNE_DATABASE_URL, transactions that turn a
lost database into UNAVAILABLE, and schema migrations run under a lock so replicas never race."""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url

from ragtune.errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# Any constant works; it only has to be the same for every replica of every version.
_MIGRATION_LOCK_KEY = 0x7261677475_6E65 & 0x7FFFFFFFFFFFFFFF
URL_VARIABLE = "RAGTUNE_DATABASE_URL"


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (restarting, network, locked): the caller may retry."""


def parse_url(url: str, password: str | None = None) -> URL:
    """Validates RAGTUNE_DATABASE_URL; plain postgresql:// means the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise ValueError(f"{URL_VARIABLE}: {url!r} is not a database URL (sqlite:///path or postgresql://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.get_driver_name() != "psycopg":
            raise ValueError(f"{URL_VARIABLE}: use the psycopg driver (postgresql+psycopg://), the one installed")
        if not parsed.database:
            raise ValueError(f"{URL_VARIABLE}: name the database, e.g. postgresql://user@host:5432/ragtune")
    elif backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError(f"{URL_VARIABLE}: SQLite needs a file (sqlite:///path), shared by every process")
    else:
        raise ValueError(f"{URL_VARIABLE}: {backend!r} is not supported; use sqlite:///path or postgresql://...")
    if password:
        parsed = parsed.set(password=password)
    return parsed


def _is_unavailable(error: exc.DBAPIError) -> bool:
    # OperationalError covers refused or dropped connections and SQLite's "database is locked";
    # an invalidated connection is one the server closed under us (a restart).
    return isinstance(error, (exc.OperationalError, exc.InterfaceError)) or error.connection_invalidated


class Database:
    """Thread-safe; share one per process. `transaction()` yields a Connection inside BEGIN..COMMIT."""

    def __init__(self, url: str, password: str | None = None):
        self.url = parse_url(url, password)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            Path(self.url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.engine = create_engine(
                self.url,
                pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not used
                pool_size=5,
                max_overflow=10,
                pool_recycle=1800,
                connect_args={"connect_timeout": 5},
            )

    @classmethod
    def from_settings(cls, settings) -> "Database":
        url = settings.database_url or f"sqlite:///{settings.home / 'controlplane.sqlite3'}"
        password = settings.database_password.get_secret_value() if settings.database_password else None
        return cls(url, password)

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A read-write transaction (on SQLite it queues for the write lock at BEGIN)."""
        with self._mapped_errors():
            with self.engine.begin() as connection:
                yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite a plain BEGIN, so reads (Get, List, Watch polls) never
        wait behind a writer (WAL keeps a consistent snapshot for them)."""
        with self._mapped_errors():
            with self.engine.connect().execution_options(ragtune_read_only=True) as connection:
                with connection.begin():
                    yield connection

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except exc.DBAPIError as error:
            if _is_unavailable(error):
                log.warning("control-plane database unavailable: %s", type(error.orig).__name__)
                raise DatabaseUnavailable("the control-plane database is unavailable; retry shortly") from error
            raise

    def ping(self) -> bool:
        try:
            with self.read() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except DatabaseUnavailable:
            return False

    def migrate(self, wait_s: float = 0.0) -> str:
        """Upgrades the schema to the newest revision, waiting up to wait_s for the database to
        accept connections. Holds an advisory lock (PostgreSQL) or a lock file (SQLite) meanwhile,
        so replicas that start together migrate once. Returns the revision now current."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        deadline = time.monotonic() + wait_s
        while True:
            try:
                connection = self.engine.connect()
                break
            except exc.DBAPIError as error:
                if not _is_unavailable(error) or time.monotonic() >= deadline:
                    raise DatabaseUnavailable(
                        f"{URL_VARIABLE}: cannot connect to {self.display_url}: {type(error.orig).__name__}"
                    ) from error
                time.sleep(1.0)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        with connection, self._migration_lock(connection):
            current = MigrationContext.configure(connection).get_current_revision()
            connection.commit()
            if current is not None and not _known_revision(config, current):
                # A newer release migrated already (a rollout under way, or this pod's release rolled back).
                # Migrations only add (expand/contract), so this release's code runs on the newer schema.
                log.warning("control-plane schema at revision %s, newer than this release knows (head %s): serving"
                            " on it without migrating (%s)", current, _head(config), self.display_url)
                return current
            command.upgrade(config, "head")
            connection.commit()
            revision = MigrationContext.configure(connection).get_current_revision()
            connection.commit()
        log.info("control-plane schema at revision %s (%s)", revision, self.display_url)
        return revision

    @contextmanager
    def _migration_lock(self, connection: Connection) -> Iterator[None]:
        if self.is_sqlite:
            lock_path = Path(self.url.database).expanduser().with_suffix(".migrate.lock")
            with open(lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            connection.commit()

    def dispose(self) -> None:
        self.engine.dispose()


def _known_revision(config, revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory.from_config(config).get_revision(revision) is not None
    except CommandError:  # "Can't locate revision": written by a newer release
        return False


def _head(config) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config).get_current_head() or "none"


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # pysqlite's own transaction handling defers BEGIN; take it over so `begin` below decides.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(connection) -> None:
    # Writers queue on the database lock at BEGIN instead of failing when a read turns into a
    # write; this is what makes claims atomic on SQLite (PostgreSQL uses row locks instead).
    read_only = connection.get_execution_options().get("ragtune_read_only", False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
