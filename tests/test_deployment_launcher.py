"""The local launcher supervises: a service that dies is started again with backoff while the others
keep serving, one that cannot start at all stops the suite with the reason, and a second Ctrl-C during
the stop leaves no service running. Uses the two light services (retriever and gateway), never the vLLM
generator."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from clients import launcher
from clients.launcher import SERVICES, LocalService, LocalSuite, _status, hurry_on_signals
from tests.grpc_support import free_port

SERVING = 1  # grpc.health.v1 ServingStatus SERVING


@pytest.fixture
def light_suite(tmp_path, monkeypatch):
    for s in SERVICES:
        monkeypatch.setenv(f"{s.prefix}PORT", str(free_port()))
    monkeypatch.setenv("RAGTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("RAGTUNE_GRPC_MAX_CONNECTION_AGE_S", "30")
    monkeypatch.setattr(launcher, "dev_key_path", lambda: tmp_path / "dev-api-key")
    chosen = [s for s in SERVICES if s.name in ("retriever", "gateway")]
    suite = LocalSuite(tmp_path, services=chosen)
    try:
        yield suite
    finally:
        suite.stop()


def address(service: LocalService) -> str:
    return f"127.0.0.1:{launcher._port(service)}"


@pytest.mark.slow  # starts, kills and restarts real services: 24 to 36 s here
def test_a_killed_service_is_restarted_while_the_others_keep_serving(light_suite):
    suite = light_suite
    retriever, gateway = suite.services
    suite.start()
    suite.wait_serving(timeout=300)
    stop = threading.Event()
    errors = []

    def supervise():
        try:
            suite.supervise(stop, interval_s=0.2)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        gateway_pid, old_pid = suite.procs["gateway"].pid, suite.procs["retriever"].pid
        suite.procs["retriever"].kill()
        killed_at = time.monotonic()
        gateway_states = []
        deadline = killed_at + 240
        while True:
            gateway_states.append(_status(address(gateway), gateway.health_name))
            proc = suite.procs["retriever"]
            if proc.pid != old_pid and _status(address(retriever), retriever.health_name) == SERVING:
                break
            assert time.monotonic() < deadline, "the retriever was not serving again in time"
            assert not errors, errors
            time.sleep(0.3)
        back_after = time.monotonic() - killed_at
        assert suite.restarts == {"retriever": 1, "gateway": 0}
        assert suite.procs["gateway"].pid == gateway_pid
        assert set(gateway_states) == {SERVING}, "the gateway stopped serving while the retriever was down"
        print(f"retriever SERVING again {back_after:.1f} s after it was killed")
    finally:
        stop.set()
        supervisor.join(10)
    assert not errors, errors


def test_a_service_that_cannot_start_stops_the_suite(tmp_path, monkeypatch):
    """A service that keeps exiting before it serves is retried with backoff, then reported."""
    monkeypatch.setattr(launcher, "RESTART_INITIAL_BACKOFF_S", 0.05)
    broken = LocalService("broken", "ragtune.no_such_module", "RAGTUNE_BROKEN_", free_port(), "ragtune.v1.Broken")
    suite = LocalSuite(tmp_path, services=[broken])
    monkeypatch.setattr(launcher, "dev_key_path", lambda: tmp_path / "dev-api-key")
    suite.start()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"broken exited with 1 5 times in a row before serving; giving up"):
        suite.supervise(interval_s=0.05)
    assert suite.restarts["broken"] == launcher.RESTART_LIMIT - 1
    # Backoff doubles: 0.05 + 0.1 + 0.2 + 0.4 s at least between the five starts.
    assert time.monotonic() - started >= 0.75


@pytest.mark.slow  # starts, kills and restarts real services: 24 to 36 s here
def test_a_second_ctrl_c_during_the_stop_kills_what_is_left_instead_of_orphaning_it(light_suite, monkeypatch):
    """The services run in sessions of their own, so Ctrl-C reaches only the launcher. A second Ctrl-C
    while it stops them (people press it twice; `timeout` forwards a signal to the group it was also sent
    to) used to interrupt the stop and leave the rest serving with no launcher."""
    suite = light_suite
    suite.start()
    suite.wait_serving(timeout=300)
    retriever = suite.procs["retriever"]
    os.kill(retriever.pid, signal.SIGSTOP)  # a service slow to stop: SIGTERM waits until it runs again
    monkeypatch.setattr(launcher, "STOP_GRACE_S", 120.0)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    second = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        hurry_on_signals(suite)
        second.start()
        started = time.monotonic()
        suite.stop()  # the gateway stops on SIGTERM; the retriever holds the stop until the second Ctrl-C
        took = time.monotonic() - started
    finally:
        second.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert suite.procs["gateway"].returncode == 0
    assert retriever.returncode == -signal.SIGKILL
    assert 3.0 <= took < 60, f"the stop took {took:.1f} s"
    assert all(p.poll() is not None for p in suite.procs.values())
