"""What the deployment tests (tests/test_k8s_*.py) share: the overlays rendered offline, lookups in
the rendered objects, and the cross-reference checks.

No cluster and no Docker engine run here: `kubectl kustomize` renders, `kubernetes-validate`
checks against the bundled schemas of K8S_VERSION, and the rest is read from the rendered
objects, the pydantic-settings classes, the .proto files and the Dockerfiles. Each check returns
a list of problems, so the tests can also prove that it catches breakage.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path, PurePosixPath

import yaml

from tests.grpc_support import REPO_ROOT

K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The Kubernetes release the manifests target; kubernetes-validate bundles its schemas.
K8S_VERSION = "1.34.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# Kinds that live outside any namespace.
CLUSTER_SCOPED_KINDS = {"Namespace", "PriorityClass"}
# Workloads that run to completion (the release's migration, backups): no Service, no probes.
BATCH_KINDS = {"Job", "CronJob"}
# Images built elsewhere, each with the tag form that pins one release of it; every other image
# needs a Dockerfile in the repo.
RELEASE_TAG = r"v?\d+\.\d+\.\d+"
# Every image is fully qualified (registry host first); ragtune's own live under RAGTUNE_REGISTRY.
RAGTUNE_REGISTRY = "ghcr.io/ragtune/"
THIRD_PARTY_IMAGES = {
    "cr.weaviate.io/semitechnologies/weaviate": RELEASE_TAG,
    "docker.io/otel/opentelemetry-collector-contrib": RELEASE_TAG,
    # PostgreSQL numbers its releases major.minor; the suffix pins the Debian base too.
    "docker.io/library/postgres": r"\d+\.\d+-bookworm",
    # The quota counters (k8s/base/redis.yaml): major.minor, and the Debian base.
    "docker.io/library/redis": r"\d+\.\d+-bookworm",
}
# Variables ragtune containers may set that no ragtune settings class reads: the OpenTelemetry
# SDK's and Hugging Face's offline switches. Not VLLM_CPU_KVCACHE_SPACE: the generator overwrites
# it from RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB, so setting it would do nothing.
# K8S_POD_NAME and K8S_NAMESPACE only feed OTEL_RESOURCE_ATTRIBUTES ($(K8S_POD_NAME), ...).
THIRD_PARTY_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME",
    "OTEL_METRIC_EXPORT_INTERVAL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "K8S_POD_NAME", "K8S_NAMESPACE",
}
# Variables the manifests set for a setting another part of the code base has still to read, with
# what it needs (none pending now).
PENDING_SETTINGS: dict[str, dict[str, str]] = {}
# The Secrets every overlay must provide (name -> key), and the files the gpu overlay reads them from.
REQUIRED_SECRETS = {
    "gateway-api-keys": "api-keys.json",
    "ragtune-internal-token": "RAGTUNE_INTERNAL_TOKEN",
    "postgres-credentials": "password",
    "weaviate-api-key": "api-key",
}
GPU_SECRET_FILES = ("api-keys.json", "internal-token", "postgres-password", "weaviate-api-key")
# image name (ragtune/<x>, -gpu variants included) -> (settings class, entry module)
SERVICES = {
    "gateway": ("gateway.settings:GatewaySettings", "gateway"),
    "retriever": ("services.retriever.settings:RetrieverSettings", "services.retriever"),
    "generator": ("services.generator.settings:GeneratorSettings", "services.generator"),
    "trainer": ("services.trainer.settings:TrainerSettings", "services.trainer"),
}
GPU_SERVICES = {"generator", "trainer"}
# The services that keep state in the control-plane database, and the one shared artifact volume.
DATABASE_CLIENTS = {"trainer", "gateway", "generator"}
MIGRATE_COMMAND = ["python", "-m", "ragtune.controlplane", "migrate"]
# app.kubernetes.io/name of the release's migration Job (k8s/base/migrate.yaml) and of the nightly
# pg_dump CronJob (k8s/base/postgres-backup.yaml).
MIGRATION_JOB = "ragtune-migrate"
DATABASE_BACKUP = "postgres-backup"
ARTIFACTS_CLAIM = "ragtune-artifacts"


# --- rendering --------------------------------------------------------------------------------


def kubectl() -> str:
    return str(Path(sys.executable).parent / "kubectl")


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)


@cache
def operator_api_key() -> tuple[str, dict]:
    """The key whose hashed entry operator_secrets() puts in the gpu overlay's keys file, and that entry,
    so a test can call a gateway started from that overlay (tests/test_deployment_as_rendered.py)."""
    from ragtune.controlplane.api_keys import new_key_entry

    return new_key_entry("acme", ["read", "ingest", "train"])


@cache
def operator_secrets() -> dict[str, str]:
    """Throwaway values for the files the gpu overlay requires, as an operator would provide them."""
    _, entry = operator_api_key()
    return {
        "api-keys.json": json.dumps({"keys": [entry]}),
        "internal-token": secrets.token_hex(32),
        "postgres-password": secrets.token_urlsafe(24),
        "weaviate-api-key": secrets.token_urlsafe(24),
    }


# The files components/cloudnative-pg reads its object store's credentials from (git-ignored).
CNPG_SECRET_FILES = ("backup-s3-access-key-id", "backup-s3-secret-access-key")


@cache
def _k8s_with_operator_secrets() -> Path:
    """A copy of k8s/ with the gpu overlay's and the components' secret files written, as a deploy job would."""
    root = Path(tempfile.mkdtemp(prefix="ragtune-k8s-")) / "k8s"
    shutil.copytree(K8S_DIR, root)
    for name, value in operator_secrets().items():
        (root / "overlays" / "gpu" / "secrets" / name).write_text(value)
    for name in CNPG_SECRET_FILES:
        (root / "components" / "cloudnative-pg" / "secrets" / name).write_text(secrets.token_urlsafe(24))
    return root


@cache
def _render(folder: str) -> str:
    root = _k8s_with_operator_secrets() if folder == "overlays/gpu" or folder.startswith("variants/") else K8S_DIR
    proc = kustomize(root / folder)
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return proc.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's objects, a fresh copy each call so a test may break them. The gpu overlay is
    rendered with throwaway operator Secrets (operator_secrets()); as committed it does not render."""
    return [d for d in yaml.safe_load_all(_render(f"overlays/{overlay}")) if d]


# The optional Kustomize components (k8s/components) a site adds next to an overlay; the TLS variant
# is an overlay with both.
TLS_COMPONENTS = ("tls", "cert-manager")


@cache
def _variant(overlay: str, components: tuple[str, ...]) -> str:
    """Writes a site's kustomization (the overlay plus the components) into the copy of k8s/."""
    folder = _k8s_with_operator_secrets() / "variants" / "-".join((overlay, *components))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"../../overlays/{overlay}"],
        "components": [f"../../components/{c}" for c in components],
    }))
    return f"variants/{folder.name}"


def render_with(overlay: str, components: tuple[str, ...] = TLS_COMPONENTS) -> list[dict]:
    """The overlay with Kustomize components added, as a site's own kustomization would."""
    return [d for d in yaml.safe_load_all(_render(_variant(overlay, components))) if d]


def render_base() -> list[dict]:
    """The base's objects: what every overlay, a site's included, starts from."""
    return [d for d in yaml.safe_load_all(_render("base")) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_template(workload: dict) -> dict:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def pod_spec(workload: dict) -> dict:
    return pod_template(workload)["spec"]


def pod_labels(workload: dict) -> dict:
    return pod_template(workload)["metadata"].get("labels", {})


def serving_workloads(docs: list[dict]) -> list[dict]:
    """The workloads that serve (Deployments, StatefulSets, DaemonSets): not the Jobs and CronJobs."""
    return [w for w in workloads(docs) if w["kind"] not in BATCH_KINDS]


def migration_jobs(docs: list[dict]) -> list[dict]:
    """The Jobs that migrate the control-plane schema (k8s/base/migrate.yaml)."""
    return [w for w in workloads(docs) if w["kind"] == "Job" and pod_labels(w).get("app.kubernetes.io/name") == MIGRATION_JOB]


def all_containers(spec: dict) -> list[dict]:
    """A pod spec's init containers, then its containers."""
    return spec.get("initContainers", []) + spec["containers"]


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
    return re.sub(r"(@sha256:[0-9a-f]+|:[^/:]+)$", "", re.sub(r"@sha256:[0-9a-f]+$", "", image))


def is_ragtune_image(image: str) -> bool:
    return image_name(image).startswith(RAGTUNE_REGISTRY)


def image_service(image: str) -> str:
    """ghcr.io/ragtune/generator-gpu:0.1.0 -> generator."""
    return image_name(image).removeprefix(RAGTUNE_REGISTRY).removesuffix("-gpu")


def ragtune_containers(docs: list[dict], init: bool = False, batch: bool = False):
    """(workload, container, service) for every container of a serving workload running a ragtune
    image; with `init`, the init containers too (they run the same image, so the same settings class);
    with `batch`, the Jobs' and CronJobs' containers too (the migration Job runs the gateway's image)."""
    for w in workloads(docs) if batch else serving_workloads(docs):
        for c in all_containers(pod_spec(w)) if init else pod_spec(w)["containers"]:
            if is_ragtune_image(c["image"]):
                yield w, c, image_service(c["image"])


def volume_at(workload: dict, container: dict, path: Path | str) -> dict | None:
    """The pod volume that holds `path` in `container` (the deepest mount above it), or None when
    the path is on the container's own filesystem."""
    path = PurePosixPath(path)
    mounts = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    return next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])


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
    for w in serving_workloads(docs):
        if not selects(w["spec"]["selector"], pod_labels(w)):
            problems.append(f"{w['kind']} {w['metadata']['name']}: selector does not match its own pod template")
    return problems


def reference_problems(docs: list[dict]) -> list[str]:
    """ConfigMaps, Secrets, claims and keys that pods use exist; every mount names a declared volume."""
    problems = []
    existing = {kind: by_kind(docs, kind) for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    # cert-manager writes each Certificate's Secret (kubernetes.io/tls: tls.crt, tls.key, ca.crt).
    for cert in certificates(docs).values():
        existing["Secret"].setdefault(cert["spec"]["secretName"], {"data": dict.fromkeys(TLS_SECRET_KEYS, "")})
    # CloudNativePG writes each Cluster's application Secret, <cluster>-app.
    for cluster in cnpg_objects(docs, "Cluster").values():
        existing["Secret"].setdefault(f"{cluster['metadata']['name']}-app", {"data": dict.fromkeys(CNPG_APP_SECRET_KEYS, "")})

    def need(kind: str, name: str, key: str | None, where: str, optional: bool = False) -> None:
        obj = existing[kind].get(name)
        if obj is None and optional:
            return  # the pod starts without it (e.g. credentials a workload identity may replace)
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
        for c in all_containers(spec):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: mounts undeclared volume {m['name']}")
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", source["configMapRef"]["name"], None, where, source["configMapRef"].get("optional", False))
                if "secretRef" in source:
                    need("Secret", source["secretRef"]["name"], None, where, source["secretRef"].get("optional", False))
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in ref:
                        need(kind, ref[field]["name"], ref[field]["key"], where, ref[field].get("optional", False))
    return problems


def probe_problems(docs: list[dict]) -> list[str]:
    problems = []
    served = proto_services()
    for w in serving_workloads(docs):
        for c in pod_spec(w)["containers"]:
            ports = {p["containerPort"] for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
            where = f"{w['metadata']['name']}/{c['name']}"
            ours = is_ragtune_image(c["image"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    if ours or kind != "startupProbe":  # ragtune services load models before serving
                        problems.append(f"{where}: no {kind}")
                    continue
                if "exec" in probe:  # a command in the container (pg_isready): no port to check
                    if not probe["exec"].get("command"):
                        problems.append(f"{where}: {kind} runs no command")
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
                namespace = (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                if "namespaceSelector" in peer and "podSelector" not in peer and namespace:
                    sources.add(f"namespace/{namespace}")  # every pod of that one other namespace
                elif "podSelector" not in peer or "namespaceSelector" in peer or "ipBlock" in peer:
                    sources.add("*")
                else:
                    sources |= {w["metadata"]["name"] for w in selected(docs, peer["podSelector"])}
    return sources


def egress_allowed(docs: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether the policies let `source` open connections to `target` on `port` (pods of this
    namespace: a peer with a namespaceSelector or an ipBlock is taken to be elsewhere)."""
    applying = [
        p for p in by_kind(docs, "NetworkPolicy").values()
        if "Egress" in p["spec"].get("policyTypes", [])
        and (p["spec"]["podSelector"] == {} or selects(p["spec"]["podSelector"], pod_labels(source)))
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("egress", []):
            port_ok = not rule.get("ports") or any(p["port"] == port for p in rule["ports"])
            peer_ok = not rule.get("to") or any(
                "podSelector" in peer and "namespaceSelector" not in peer
                and selects(peer["podSelector"], pod_labels(target))
                for peer in rule["to"]
            )
            if port_ok and peer_ok:
                return True
    return False


def env_of(docs: list[dict], container: dict, refs: bool = False) -> dict[str, str | dict | None]:
    """Every variable the container gets (env and envFrom), with its literal value; a value taken
    from elsewhere (valueFrom, an envFrom Secret) is None, or with `refs` its valueFrom."""
    config_maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str | dict | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            env.update({k: {"secretRef": name} if refs else None for k in secrets[name].get("data", {})})
    for var in container.get("env", []):
        env[var["name"]] = var["valueFrom"] if refs and "valueFrom" in var else var.get("value")
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


def manifest_settings(docs: list[dict], container: dict, service: str, monkeypatch):
    """The service's settings as the container would load them: only the manifest's variables
    (a value from a Secret or the downward API reads "placeholder")."""
    for var in [v for v in os.environ if v.startswith(("RAGTUNE_", "WEAVIATE_"))]:
        monkeypatch.delenv(var)
    for var, value in env_of(docs, container).items():
        monkeypatch.setenv(var, "placeholder" if value is None else value)
    return settings_class(service)()


def host_settings_env_names() -> set[str]:
    """What ragtune.server.HostSettings and ragtune.settings.TLSSettings read: the gRPC server's own
    settings and TLS, the same in every service."""
    from ragtune.server import HostSettings
    from ragtune.settings import TLSSettings

    return settings_env_names(HostSettings) | settings_env_names(TLSSettings)


def env_problems(docs: list[dict]) -> list[str]:
    """Every variable a ragtune container (init containers included) sets is one its service (or the
    server host every service runs on) reads. Third-party containers (Weaviate, PostgreSQL, the
    collector) are not ragtune settings."""
    problems = []
    for w, c, service in ragtune_containers(docs, init=True, batch=True):
        read = settings_env_names(settings_class(service)) | host_settings_env_names()
        read |= set(PENDING_SETTINGS.get(service, {}))
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


def service_port(docs: list[dict], host: str, port: int) -> bool:
    svc = by_kind(docs, "Service").get(host.split(".")[0])
    return svc is not None and any(p["port"] == port for p in svc["spec"]["ports"])


# --- TLS (k8s/components/tls with k8s/components/cert-manager) ---------------------------------

TLS_SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
# What every ragtune container reads under TLS; the internal services also require client certificates.
TLS_FILE_VARS = ("RAGTUNE_TLS_CERT_FILE", "RAGTUNE_TLS_KEY_FILE", "RAGTUNE_TLS_CA_FILE",
                 "RAGTUNE_TLS_CLIENT_CERT_FILE", "RAGTUNE_TLS_CLIENT_KEY_FILE")
MTLS_VAR = "RAGTUNE_TLS_CLIENT_CA_FILE"


def certificates(docs: list[dict]) -> dict[str, dict]:
    """cert-manager Certificates by name."""
    return {d["metadata"]["name"]: d for d in docs
            if d["kind"] == "Certificate" and d["apiVersion"].startswith("cert-manager.io/")}


def downstream_hosts(docs: list[dict]) -> dict[str, str]:
    """service -> the host the gateway dials it at (RAGTUNE_GATEWAY_<SERVICE>_ADDRESS, dns:///host:port)."""
    gateway = next(c for _, c, s in ragtune_containers(docs) if s == "gateway")
    env = env_of(docs, gateway)
    return {s: re.sub(r"^dns:///", "", str(env[f"RAGTUNE_GATEWAY_{s.upper()}_ADDRESS"])).rsplit(":", 1)[0]
            for s in ("retriever", "generator", "trainer")}


def tls_problems(docs: list[dict]) -> list[str]:
    """Under TLS every ragtune service: mounts a Secret read-only that a Certificate (or the operator)
    provides, points each RAGTUNE_TLS_* file variable into that mount at a key the Secret has, the
    internal services require client certificates, certificates name the hosts the gateway dials,
    and the probes ask the plaintext health port the service opens."""
    problems = []
    certs = {c["spec"]["secretName"]: c for c in certificates(docs).values()}
    hosts = downstream_hosts(docs)
    for w, c, service in ragtune_containers(docs):
        where = f"{w['metadata']['name']}/{c['name']}"
        env = env_of(docs, c)
        mounted: set[str] = set()
        for var in (*TLS_FILE_VARS, *((MTLS_VAR,) if service != "gateway" else ())):
            path = env.get(var)
            if not isinstance(path, str):
                problems.append(f"{where}: {var} is not set")
                continue
            volume = volume_at(w, c, path)
            if volume is None or "secret" not in volume:
                problems.append(f"{where}: {var}={path} is not in a mounted Secret")
                continue
            secret = volume["secret"]["secretName"]
            mounted.add(secret)
            if PurePosixPath(path).name not in TLS_SECRET_KEYS:
                problems.append(f"{where}: {var}={path} names no key of Secret {secret}")
            mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
            if not mount.get("readOnly"):
                problems.append(f"{where}: the TLS Secret {secret} is mounted writable")
            if volume["secret"].get("defaultMode", 0o644) & 0o007:
                problems.append(f"{where}: the TLS Secret {secret}'s files are readable by others (defaultMode)")
        if service == "gateway" and MTLS_VAR in env:
            problems.append(f"{where}: the gateway's public port must not require client certificates")
        for secret in mounted:
            cert = certs.get(secret)
            if cert is None:
                problems.append(f"{where}: no Certificate writes Secret {secret}")
                continue
            usages = set(cert["spec"].get("usages", []))
            if not {"server auth", "client auth"} <= usages:
                problems.append(f"Certificate {cert['metadata']['name']}: usages {sorted(usages)}"
                                " lack server or client auth")
            if service in hosts and hosts[service] not in cert["spec"].get("dnsNames", []):
                problems.append(f"Certificate {cert['metadata']['name']}: the gateway dials {hosts[service]},"
                                f" not among its dnsNames")
        health = env.get("RAGTUNE_GRPC_HEALTH_PORT")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind, {})
            if "grpc" not in probe or str(probe["grpc"]["port"]) != str(health):
                problems.append(f"{where}: {kind} does not ask the plaintext health port"
                                f" (RAGTUNE_GRPC_HEALTH_PORT={health}); the kubelet's gRPC probe cannot speak TLS")
    for cert in certificates(docs).values():
        issuer = cert["spec"]["issuerRef"]
        if issuer.get("kind", "Issuer") == "Issuer" and issuer["name"] not in {
                d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}:
            problems.append(f"Certificate {cert['metadata']['name']}: Issuer {issuer['name']} does not exist")
    return problems


# --- CloudNativePG (k8s/components/cloudnative-pg) ------------------------------------------------

CNPG_API = "postgresql.cnpg.io/"
# What the operator writes into <cluster>-app for the Cluster's owner.
CNPG_APP_SECRET_KEYS = ("username", "password", "host", "port", "dbname", "uri", "jdbc-uri", "pgpass")


def cnpg_objects(docs: list[dict], kind: str) -> dict[str, dict]:
    """CloudNativePG objects of one kind (Cluster, Pooler, ScheduledBackup) by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind and d["apiVersion"].startswith(CNPG_API)}


def cnpg_pods(docs: list[dict]) -> list[dict]:
    """The pods the operator runs for each Cluster (its instances: PostgreSQL 5432, status 8000) and
    each Pooler (PgBouncer 5432), as workloads with the labels the operator gives them, so the
    NetworkPolicy checks can see them."""
    pods = []
    for name, cluster in cnpg_objects(docs, "Cluster").items():
        labels = {**cluster["spec"].get("inheritedMetadata", {}).get("labels", {}), "cnpg.io/cluster": name}
        pods.append(_operator_workload(f"{name}-instances", labels, (5432, 8000)))
    for name, pooler in cnpg_objects(docs, "Pooler").items():
        labels = {**pooler["spec"].get("template", {}).get("metadata", {}).get("labels", {}), "cnpg.io/poolerName": name}
        pods.append(_operator_workload(name, labels, (5432,)))
    return pods


def _operator_workload(name: str, labels: dict, ports: tuple[int, ...]) -> dict:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [{"name": "operator-managed", "image": "operator-managed",
                                "ports": [{"containerPort": p} for p in ports]}]}}}}


def cnpg_service_names(docs: list[dict]) -> set[str]:
    """The Services the operator creates: <cluster>-rw/-ro/-r and one per Pooler (its name)."""
    names = set(cnpg_objects(docs, "Pooler"))
    for cluster in cnpg_objects(docs, "Cluster"):
        names |= {f"{cluster}-rw", f"{cluster}-ro", f"{cluster}-r"}
    return names
