"""Draining and rolling without errors, as the manifests configure it: every stream in flight when a
generator or a gateway gets SIGTERM may run to the longest deadline the gateway grants and still
finish inside the pod's termination grace; the gateway leaves the endpoints before it stops accepting
(preStop); the generator rolls without going below its serving count."""

from __future__ import annotations

import time

import pytest

from tests.k8s_support import OVERLAYS, by_kind, manifest_settings, pod_spec, render

# Endpoint controllers, kube-proxy and cloud load balancers take a few seconds to drop a terminating pod.
ENDPOINT_PROPAGATION_S = 5


class _ClientWithoutDeadline:
    """A call context whose client set a deadline far beyond anything the gateway grants."""

    def time_remaining(self) -> float:
        return 1e9


def longest_gateway_call_s(gateway_settings) -> float:
    """The longest a call through the gateway may run: the deadline its own CallBudget grants a client
    that asks for more (gateway/downstream.py)."""
    from gateway.downstream import CallBudget

    before = time.monotonic()
    budget = CallBudget.from_context(_ClientWithoutDeadline(), "tenant", gateway_settings.default_timeout_s)
    return round(budget.deadline - before, 3)  # the clock moved a few microseconds meanwhile


def _container(docs: list[dict], name: str) -> dict:
    return next(c for c in pod_spec(by_kind(docs, "Deployment")[name])["containers"] if c["name"] == name)


def _settings(docs: list[dict], name: str, monkeypatch):
    return manifest_settings(docs, _container(docs, name), name, monkeypatch)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generator_drains_the_longest_generation(overlay, monkeypatch):
    """The generator's drain (RAGTUNE_GENERATOR_GRACE_PERIOD_S, as its settings read it) covers the
    longest generation the gateway allows, and the pod's termination grace covers the drain."""
    docs = render(overlay)
    longest = longest_gateway_call_s(_settings(docs, "gateway", monkeypatch))
    assert longest < 3600, "the gateway's deadline cap bounds every generation"
    drain = _settings(docs, "generator", monkeypatch).grace_period_s
    termination = pod_spec(by_kind(docs, "Deployment")["generator"])["terminationGracePeriodSeconds"]
    assert longest <= drain < termination, (longest, drain, termination)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_leaves_the_endpoints_before_it_drains(overlay, monkeypatch):
    """The gateway sleeps in preStop (the kubelet's own sleep action: no binary in the image) while the
    endpoints drop it, then drains its gRPC calls for the longest call it grants and its HTTP streams,
    all inside its termination grace."""
    docs = render(overlay)
    gateway = _container(docs, "gateway")
    sleep = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= ENDPOINT_PROPAGATION_S
    settings = _settings(docs, "gateway", monkeypatch)
    termination = pod_spec(by_kind(docs, "Deployment")["gateway"])["terminationGracePeriodSeconds"]
    assert longest_gateway_call_s(settings) <= settings.grace_period_s
    assert sleep + max(settings.grace_period_s, settings.http_grace_s) < termination


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generator_rolls_without_going_below_its_count(overlay):
    """A new generator loads its model and turns ready before an old one drains: one surge pod, none
    unavailable; its PodDisruptionBudget still lets a node drain take one at a time."""
    docs = render(overlay)
    strategy = by_kind(docs, "Deployment")["generator"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert by_kind(docs, "PodDisruptionBudget")["generator"]["spec"]["maxUnavailable"] == 1


def test_drain_checks_can_fail(monkeypatch):
    """A generator grace shorter than the gateway's deadline cap is refused."""
    docs = render("cpu")
    env = _container(docs, "generator")["env"]
    next(v for v in env if v["name"] == "RAGTUNE_GENERATOR_GRACE_PERIOD_S")["value"] = "30"
    longest = longest_gateway_call_s(_settings(docs, "gateway", monkeypatch))
    assert _settings(docs, "generator", monkeypatch).grace_period_s < longest
