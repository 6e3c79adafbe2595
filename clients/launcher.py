"""`ragtune up`: runs the four services locally as child processes, waits until each is SERVING,
optionally runs the demo, supervises them, and stops them in order (gateway first) on Ctrl-C or
SIGTERM; a second one during the stop kills what is left, so no service outlives the launcher.

Supervision: a service that exits on its own is started again after a backoff (1 s, doubling up
to 30 s; back to 1 s once it has served for a minute), while the others keep serving. A service
that crashes RESTART_LIMIT times in a row without reaching SERVING (a port in use, a broken
install) stops the suite, saying why.

First run creates a local API key (tenant "demo", every scope): its hash goes in
<RAGTUNE_HOME>/gateway/api-keys.json and the key itself in <RAGTUNE_HOME>/dev-api-key (mode 600),
where the CLI finds it. The internal services' token (RAGTUNE_INTERNAL_TOKEN, unless set already) is made
once in <RAGTUNE_HOME>/internal-token (mode 600): the gateway sends it, the other services require it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.cli.client import dev_key_path
from ragtune.tls import sync_channel

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LocalService:
    name: str
    module: str
    prefix: str
    port: int
    health_name: str


SERVICES = (
    LocalService("retriever", "services.retriever", "RAGTUNE_RETRIEVER_", 50052, "ragtune.v1.RetrieverService"),
    LocalService("generator", "services.generator", "RAGTUNE_GENERATOR_", 50053, "ragtune.v1.GeneratorService"),
    LocalService("trainer", "services.trainer", "RAGTUNE_TRAINER_", 50054, "ragtune.v1.TrainerService"),
    LocalService("gateway", "gateway", "RAGTUNE_GATEWAY_", 50051, "ragtune.v1.GatewayService"),
)


def _home() -> Path:
    return Path(os.environ.get("RAGTUNE_HOME", Path("~/.cache/ragtune").expanduser()))


def ensure_dev_key(home: Path) -> Path:
    """Creates the local keys file with one admin key for tenant 'demo' unless one exists."""
    from ragtune.controlplane.api_keys import new_key_entry

    keys_file = home / "gateway" / "api-keys.json"
    if keys_file.exists() and dev_key_path().exists():
        return keys_file
    key, entry = new_key_entry("demo", ["admin"])
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    keys_file.write_text(json.dumps({"keys": [entry]}, indent=2))
    dev_key_path().write_text(key + "\n")
    os.chmod(dev_key_path(), 0o600)
    return keys_file


def ensure_internal_token(home: Path) -> str:
    """The local suite's internal token: made once (mode 600) in <RAGTUNE_HOME>/internal-token, then reused."""
    path = home / "internal-token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def _port(service: LocalService) -> int:
    return int(os.environ.get(f"{service.prefix}PORT", service.port))


HTTP_PORT_ENV = "RAGTUNE_GATEWAY_HTTP_PORT"  # the gateway's OpenAI-compatible HTTP API


def http_port() -> int:
    return int(os.environ.get(HTTP_PORT_ENV, 8080))


def _status(address: str, name: str) -> int | None:
    with sync_channel(address) as channel:  # TLS when the suite runs with RAGTUNE_TLS_* (ragtune/tls.py)
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
        except grpc.RpcError:
            return None


RESTART_INITIAL_BACKOFF_S = 1.0
RESTART_MAX_BACKOFF_S = 30.0
RESTART_STABLE_AFTER_S = 60.0  # serving this long resets the backoff
RESTART_LIMIT = 5  # crashes in a row without reaching SERVING before the suite gives up
STOP_GRACE_S = 60.0  # a service's time to stop after SIGTERM before it is killed (the servers' own grace is 10 s)


@dataclass
class _Watch:
    """What the supervisor knows of one service: its crashes in a row and when it may start again."""

    failures: int = 0
    restart_at: float | None = None
    started_at: float = 0.0
    serving: bool = False


class LocalSuite:
    def __init__(self, home: Path, services: tuple[LocalService, ...] | list[LocalService] = SERVICES):
        self.home = home
        self.services = tuple(services)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = home / "logs"
        self.restarts: dict[str, int] = {s.name: 0 for s in self.services}
        self._env: dict[str, str] = {}
        self._watch: dict[str, _Watch] = {}

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        keys_file = ensure_dev_key(self.home)
        env = {**os.environ, "RAGTUNE_HOME": str(self.home), "PYTHONUNBUFFERED": "1",
               "RAGTUNE_GATEWAY_API_KEYS_FILE": str(keys_file)}
        # The internal services accept only callers holding this token, even on loopback: another local user
        # (or a browser page reaching 127.0.0.1) must not act for a tenant by naming it in the metadata.
        env.setdefault("RAGTUNE_INTERNAL_TOKEN", ensure_internal_token(self.home))
        for s in SERVICES:
            env[f"{s.prefix}PORT"] = str(_port(s))
        env.setdefault("RAGTUNE_GATEWAY_RETRIEVER_ADDRESS", f"127.0.0.1:{_port(SERVICES[0])}")
        env.setdefault("RAGTUNE_GATEWAY_GENERATOR_ADDRESS", f"127.0.0.1:{_port(SERVICES[1])}")
        env.setdefault("RAGTUNE_GATEWAY_TRAINER_ADDRESS", f"127.0.0.1:{_port(SERVICES[2])}")
        env[HTTP_PORT_ENV] = str(http_port())
        self._env = env
        if any(s.name == "gateway" for s in self.services) and _answers(http_port()):
            raise RuntimeError(f"something already listens on 127.0.0.1:{http_port()}; stop it or set {HTTP_PORT_ENV}")
        for s in self.services:
            address = f"127.0.0.1:{_port(s)}"
            if _status(address, "") is not None:
                raise RuntimeError(f"something already answers on {address}; stop it or set {s.prefix}PORT")
            self._spawn(s)
            print(f"started {s.name:<9} on 127.0.0.1:{_port(s)} (log {self.logs / (s.name + '.log')})")

    def _spawn(self, s: LocalService) -> None:
        with open(self.logs / f"{s.name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.procs[s.name] = subprocess.Popen(
                [sys.executable, "-m", s.module], cwd=REPO_ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only the launcher, which stops them in order
            )
        watch = self._watch.setdefault(s.name, _Watch())
        watch.started_at, watch.serving, watch.restart_at = time.monotonic(), False, None

    def supervise_once(self) -> None:
        """One round of supervision: notes services that came up, schedules a restart with backoff for
        each one that exited, and starts those whose backoff has passed. Raises RuntimeError when a
        service keeps crashing before it serves."""
        now = time.monotonic()
        for s in self.services:
            proc, watch = self.procs[s.name], self._watch.setdefault(s.name, _Watch())
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    self._spawn(s)
                    self.restarts[s.name] += 1
                    print(f"restarted {s.name} (restart {self.restarts[s.name]})")
                continue
            code = proc.poll()
            if code is None:
                if not watch.serving and _status(f"127.0.0.1:{_port(s)}", s.health_name) == health_pb2.HealthCheckResponse.SERVING:
                    watch.serving = True
                if watch.serving and now - watch.started_at >= RESTART_STABLE_AFTER_S:
                    watch.failures = 0
                continue
            watch.failures = 1 if watch.serving and now - watch.started_at >= RESTART_STABLE_AFTER_S else watch.failures + 1
            if not watch.serving and watch.failures >= RESTART_LIMIT:
                raise RuntimeError(
                    f"{s.name} exited with {code} {watch.failures} times in a row before serving; giving up"
                    f" (see {self.logs / (s.name + '.log')})"
                )
            delay = min(RESTART_INITIAL_BACKOFF_S * 2 ** (watch.failures - 1), RESTART_MAX_BACKOFF_S)
            watch.restart_at = now + delay
            print(f"{s.name} exited with {code}; restarting in {delay:.1f} s (see {self.logs / (s.name + '.log')})")

    def supervise(self, stop=None, interval_s: float = 0.5) -> None:
        """Supervises until `stop` (a threading.Event) is set; raises when a service cannot be kept up."""
        while stop is None or not stop.is_set():
            self.supervise_once()
            if stop is None:
                time.sleep(interval_s)
            else:
                stop.wait(interval_s)

    def wait_serving(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        pending = {s.name: s for s in self.services}
        started = time.monotonic()
        while pending:
            for name, s in list(pending.items()):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")
                if _status(f"127.0.0.1:{_port(s)}", s.health_name) == health_pb2.HealthCheckResponse.SERVING:
                    print(f"{name:<9} SERVING after {time.monotonic() - started:.0f} s")
                    del pending[name]
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout} s: {', '.join(pending)}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stops the running services in order, the gateway first (so no new work reaches the others), each
        given STOP_GRACE_S to finish what it holds; `hurry` during the stop kills what is left instead."""
        running = [(s.name, p) for s in reversed(self.services) if (p := self.procs.get(s.name)) and p.poll() is None]
        for name, proc in running:
            proc.send_signal(signal.SIGTERM)  # a no-op for one `hurry` already killed
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"stopped {name} (exit {proc.returncode})")

    def hurry(self) -> None:
        """Kills every service still running: a second Ctrl-C while `stop` waits. Interrupting the stop
        instead would leave the services, each in a session of its own, serving with no launcher."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


def hurry_on_signals(suite: LocalSuite) -> None:
    """From now on Ctrl-C and SIGTERM hurry the suite's stop (see LocalSuite.hurry) rather than interrupt it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: suite.hurry())


def _answers(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def isolated_suite(prefix: str) -> tuple["LocalSuite", str]:
    """A suite in a fresh temporary RAGTUNE_HOME on free ports (for benchmarks and examples that
    must not collide with services already running); returns it with the gateway's address."""
    import socket
    import tempfile

    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["RAGTUNE_HOME"] = str(home)
    for s in SERVICES:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ[f"{s.prefix}PORT"] = str(sock.getsockname()[1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ[HTTP_PORT_ENV] = str(sock.getsockname()[1])
    for s in SERVICES[:3]:
        os.environ[f"RAGTUNE_GATEWAY_{s.name.upper()}_ADDRESS"] = f"127.0.0.1:{_port(s)}"
    # The suite's internal token, in this process too: benchmarks that call a service directly send it.
    os.environ["RAGTUNE_INTERNAL_TOKEN"] = ensure_internal_token(home)
    return LocalSuite(home), f"127.0.0.1:{_port(SERVICES[-1])}"


def run_up(demo: bool = False, exit_after: bool = False) -> int:
    suite = LocalSuite(_home())

    def on_signal(signum, frame):
        hurry_on_signals(suite)  # before the stop starts: a second signal must not interrupt it
        raise KeyboardInterrupt

    # SIGINT explicitly too: a launcher started in the background by a shell inherits SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        suite.start()
        suite.wait_serving()
        print(f"\nragtune is up: gateway at 127.0.0.1:{_port(SERVICES[-1])}, API key in {dev_key_path()}")
        print(f"OpenAI-compatible HTTP API at http://127.0.0.1:{http_port()}/v1 (same API key)")
        if demo:
            from clients.cli.demo import run_demo

            run_demo(f"127.0.0.1:{_port(SERVICES[-1])}", dev_key_path().read_text().strip())
        if exit_after:
            return 0
        print("Serving; press Ctrl-C to stop. A service that exits is restarted.")
        try:
            suite.supervise()
        except RuntimeError as exc:
            print(f"stopping: {exc}")
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        hurry_on_signals(suite)
        suite.stop()
