"""Runs what an overlay renders as local processes: each ragtune container's command, arguments and
environment as the kubelet would hand them to the container (ConfigMaps and Secrets resolved, the
downward API, $(VAR) expansion, service links, the image's own ENV and ENTRYPOINT from the Dockerfile),
with the cluster's places mapped to this machine's. Each mapping is one of three kinds, so a test can
name what it changed:

- volumes: every pod volume becomes a folder (a PersistentVolumeClaim one folder shared by every pod
  that mounts it, as a ReadWriteMany volume is; Secrets and ConfigMaps written out as their files), and
  a value naming a path under a mountPath names the same path under that folder;
- Services: `name[.namespace[.svc[.cluster.local]]]:port` in any value becomes the local address that
  stands in for that Service port (a ragtune workload's free local port, or what the caller supplies),
  and a port a ragtune server binds (RAGTUNE_*PORT equal to a containerPort) becomes its free local port;
- the image: paths the image bakes in (/app, /opt/venv, the model cache) become the checkout, this
  virtual environment and the local model cache; the image's empty /data on its read-only root
  filesystem becomes a path below a plain file, where nothing can be written, as in the pod.

A Service this module cannot stand in for, a Secret or ConfigMap key that is missing, or a value taken
from an API it does not know fails loudly: the point is that what the manifests describe is what runs.
"""

from __future__ import annotations

import base64
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.grpc_support import REPO_ROOT, free_port
from tests.k8s_support import by_kind, image_name, pod_labels, pod_spec, selects

# What the Dockerfile's base images (its ARGs PYTHON_IMAGE, python:3.11-slim, and CUDA_IMAGE, nvidia/cuda)
# set before the Dockerfile's own ENV, as far as a process here can tell.
BASE_IMAGE_ENV = {
    "PYTHON_IMAGE": {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    "CUDA_IMAGE": {"PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                           "/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"},
}
# The image's empty folder on its read-only root filesystem (Dockerfile: `mkdir -p /data`).
IMAGE_EMPTY_DIRS = ("/data",)
KUBELET_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
DOCKER_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


# --- the image: ENTRYPOINT, CMD, WORKDIR and ENV from the Dockerfile target that builds it ---------------


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    workdir: str
    env: dict[str, str]


def image_config(image: str) -> ImageConfig:
    """What the container runtime takes from the image the manifest names (the Dockerfile target that
    docker-bake.hcl tags with it): its ENTRYPOINT, CMD, WORKDIR and ENV, the base image's ENV first."""
    from tests.test_k8s_images import built_images, lineage, stages

    target = built_images()[image_name(image)]
    entrypoint: list[str] = []
    cmd: list[str] = []
    workdir = "/"
    stages_in_order = list(reversed(lineage(target)))  # build order: the furthest ancestor first
    base = stages()[stages_in_order[0]]["base"].strip("${}")
    assert base in BASE_IMAGE_ENV, f"{target}: built FROM {base}, whose ENV this test does not know"
    env = dict(BASE_IMAGE_ENV[base])
    for stage in stages_in_order:
        for c in stages()[stage]["commands"]:
            if c.cmd == "ENV":
                for key, value in zip(c.value[::2], c.value[1::2]):
                    env[key] = DOCKER_REFERENCE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)
            elif c.cmd == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / c.value[0])
            elif c.cmd in ("ENTRYPOINT", "CMD"):
                assert c.json, f"{target}: {c.cmd} in shell form; only the exec form runs here"
                if c.cmd == "ENTRYPOINT":
                    entrypoint, cmd = list(c.value), []  # a new ENTRYPOINT drops the inherited CMD
                else:
                    cmd = list(c.value)
    return ImageConfig(entrypoint, cmd, workdir, env)


def image_paths(model_cache: Path) -> dict[str, Path]:
    """The folders the ragtune images bake in (Dockerfile), as this machine has them: the code at /app is
    the checkout, /opt/venv this virtual environment, /opt/ragtune/models the prepared model cache."""
    return {"/app": REPO_ROOT, "/opt/venv": Path(sys.prefix), "/opt/ragtune/models": model_cache}


# --- the kubelet: the environment and command a container gets ---------------------------------------------


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: a defined variable is replaced, `$$` is a literal `$`, an undefined
    reference stays as written."""
    return KUBELET_REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def _field_ref(workload: dict, pod_name: str, path: str) -> str:
    """The downward API, as one pod of `workload` named `pod_name` on this machine sees it."""
    metadata = workload["metadata"]
    simple = {"metadata.name": pod_name, "metadata.namespace": metadata.get("namespace", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "spec.nodeName": "localhost",
              "spec.serviceAccountName": pod_spec(workload).get("serviceAccountName", "default")}
    if path in simple:
        return simple[path]
    found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if found:
        template = workload["spec"]["template"]["metadata"] if "template" in workload["spec"] else metadata
        return template.get(found.group(1), {}).get(found.group(2), "")
    raise AssertionError(f"{metadata['name']}: the downward API field {path} is not known to this test")


def container_env(docs: list[dict], workload: dict, container: dict, links: dict[str, str]) -> dict[str, str]:
    """The variables the kubelet sets: service links (lowest precedence), then envFrom, then env in order,
    each value $(VAR)-expanded against what is defined before it. A missing ConfigMap, Secret or key that
    is not optional fails, as the pod would (CreateContainerConfigError)."""
    config_maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    where = f"{workload['metadata']['name']}/{container['name']}"
    pod_name = f"{workload['metadata']['name']}-local"
    env: dict[str, str] = {}

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        objects = config_maps if kind == "ConfigMap" else secrets
        if name not in objects:
            assert optional, f"{where}: {kind} {name} does not exist"
            return None
        return dict(objects[name].get("data") or {}) if kind == "ConfigMap" else secret_data(objects[name])

    for ref in container.get("envFrom", []):
        kind, body = ("ConfigMap", ref["configMapRef"]) if "configMapRef" in ref else ("Secret", ref["secretRef"])
        data = source(kind, body["name"], body.get("optional", False)) or {}
        env.update({ref.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        scope = {**links, **env}
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), scope)
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            env[var["name"]] = _field_ref(workload, pod_name, ref["fieldRef"]["fieldPath"])
            continue
        kind, body = ("ConfigMap", ref["configMapKeyRef"]) if "configMapKeyRef" in ref else (
            ("Secret", ref["secretKeyRef"]) if "secretKeyRef" in ref else (None, None))
        assert kind is not None, f"{where}: {var['name']} takes its value from {ref}, not known to this test"
        data = source(kind, body["name"], body.get("optional", False))
        if data is None or body["key"] not in data:
            assert data is None and body.get("optional", False), f"{where}: {kind} {body['name']} has no key {body['key']}"
            continue
        env[var["name"]] = data[body["key"]]
    return {**links, **env}


def service_links(docs: list[dict], addresses: dict[tuple[str, int], str]) -> dict[str, str]:
    """The variables the kubelet adds for every Service with a cluster IP in the namespace (enableServiceLinks
    defaults to true): GATEWAY_SERVICE_HOST, GATEWAY_PORT=tcp://..., and so on, at the local stand-ins."""
    links: dict[str, str] = {}
    for name, svc in by_kind(docs, "Service").items():
        if svc["spec"].get("clusterIP") == "None":
            continue
        prefix = name.upper().replace("-", "_")
        for i, port in enumerate(svc["spec"]["ports"]):
            host, local = addresses[(name, port["port"])].rsplit(":", 1)
            proto = port.get("protocol", "TCP")
            if i == 0:
                links.update({f"{prefix}_SERVICE_HOST": host, f"{prefix}_SERVICE_PORT": local,
                              f"{prefix}_PORT": f"{proto.lower()}://{host}:{local}"})
            if "name" in port:
                links[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = local
            base = f"{prefix}_PORT_{port['port']}_{proto}"
            links.update({base: f"{proto.lower()}://{host}:{local}", f"{base}_PROTO": proto.lower(),
                          f"{base}_PORT": local, f"{base}_ADDR": host})
    return links


# --- the places: volumes, Services and the image's paths ---------------------------------------------------


@dataclass
class LocalPlaces:
    """Where the cluster's places are on this machine, under one temporary folder `root`."""

    root: Path
    image_paths: dict[str, Path]
    # (workload name, containerPort) -> the free local port that server binds instead
    server_ports: dict[tuple[str, int], int] = field(default_factory=dict)
    # (Service name, port) -> "host:port" that stands in for it
    addresses: dict[tuple[str, int], str] = field(default_factory=dict)

    def __post_init__(self):
        # A plain file: nothing can be made below it, not even by root, as on a read-only root filesystem.
        self.root.mkdir(parents=True, exist_ok=True)
        read_only = self.root / "read-only-root-filesystem"
        read_only.touch()
        for path in IMAGE_EMPTY_DIRS:
            self.image_paths.setdefault(path, read_only / path.strip("/"))

    def pod_folder(self, workload: dict) -> Path:
        return self.root / "pods" / workload["metadata"]["name"]

    def volume_folders(self, docs: list[dict], workload: dict) -> dict[str, Path]:
        """volume name -> its folder, made and filled (Secrets and ConfigMaps as their files)."""
        folders = {}
        secrets, config_maps = by_kind(docs, "Secret"), by_kind(docs, "ConfigMap")
        for volume in pod_spec(workload).get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                folder = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in volume:
                folder = self.pod_folder(workload) / "volumes" / name
            elif "secret" in volume or "configMap" in volume:
                folder = self.pod_folder(workload) / "volumes" / name
                if "secret" in volume:
                    body, data = volume["secret"], secret_data(secrets[volume["secret"]["secretName"]])
                else:
                    body, data = volume["configMap"], dict(config_maps[volume["configMap"]["name"]].get("data") or {})
                items = body.get("items") or [{"key": k, "path": k} for k in data]
                folder.mkdir(parents=True, exist_ok=True)
                for item in items:
                    (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (folder / item["path"]).write_text(data[item["key"]])
            else:
                raise AssertionError(f"{workload['metadata']['name']}: volume {name} is of a kind this test cannot map")
            folder.mkdir(parents=True, exist_ok=True)
            folders[name] = folder
        return folders

    def mounts(self, docs: list[dict], workload: dict, container: dict) -> dict[str, Path]:
        """mountPath -> the local folder for each of the container's mounts."""
        folders = self.volume_folders(docs, workload)
        return {m["mountPath"]: folders[m["name"]] / m.get("subPath", "") for m in container.get("volumeMounts", [])}

    def local_path(self, value: str, mounts: dict[str, Path]) -> str:
        """A container path as the local path that holds the same thing: under the deepest mount, else
        under the image path it lies in, else unchanged."""
        path = PurePosixPath(value)
        for table in (mounts, self.image_paths):
            above = [p for p in table if path.is_relative_to(p)]
            if above:
                deepest = max(above, key=lambda p: len(PurePosixPath(p).parts))
                return str(Path(table[deepest]) / path.relative_to(deepest))
        return value

    def local_value(self, value: str, mounts: dict[str, Path]) -> str:
        """Paths (and colon-separated lists of them: PATH, LD_PRELOAD) mapped; Service addresses mapped."""
        parts = value.split(":")
        if value.startswith("/") and all(p.startswith("/") for p in parts if p):
            return ":".join(self.local_path(p, mounts) if p else p for p in parts)
        for (service, port), address in self.addresses.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(service)}(\.[a-z0-9-]+(\.svc(\.cluster\.local)?)?)?:{port}(?!\d)",
                           address, value)
        return value


def service_address(docs: list[dict], places: LocalPlaces, service: str, port_name: str) -> str:
    """The local address standing in for the Service's port of that name (e.g. gateway, grpc)."""
    port = next(p["port"] for p in by_kind(docs, "Service")[service]["spec"]["ports"] if p.get("name") == port_name)
    return places.addresses[(service, port)]


def map_services(docs: list[dict], places: LocalPlaces, ragtune_workloads: list[dict],
                 stand_ins: dict[str, dict[int, str]]) -> None:
    """Fills places.server_ports (a free port for each containerPort of the ragtune workloads) and
    places.addresses (each Service port: the port of the ragtune workload it selects, else the caller's
    stand-in for that Service). A Service neither covers fails: the test must say what stands in for it."""
    for w in ragtune_workloads:
        for c in pod_spec(w)["containers"]:
            for p in c.get("ports", []):
                places.server_ports[(w["metadata"]["name"], p["containerPort"])] = free_port()
    for name, svc in by_kind(docs, "Service").items():
        targets = [w for w in ragtune_workloads if selects(svc["spec"].get("selector"), pod_labels(w))]
        for port in svc["spec"]["ports"]:
            if targets:
                target = port.get("targetPort", port["port"])
                workload = targets[0]
                if isinstance(target, str):  # a named port
                    target = next(p["containerPort"] for c in pod_spec(workload)["containers"]
                                  for p in c.get("ports", []) if p.get("name") == target)
                local = places.server_ports[(workload["metadata"]["name"], target)]
                places.addresses[(name, port["port"])] = f"127.0.0.1:{local}"
            else:
                assert name in stand_ins and port["port"] in stand_ins[name], (
                    f"Service {name} port {port['port']}: nothing stands in for it on this machine; name a stand-in")
                places.addresses[(name, port["port"])] = stand_ins[name][port["port"]]


# --- one container, ready to start -------------------------------------------------------------------------


@dataclass
class LocalContainer:
    workload: str
    container: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    # containerPort -> local port
    ports: dict[int, int]
    readiness: dict | None


def local_container(docs: list[dict], workload: dict, container: dict, places: LocalPlaces) -> LocalContainer:
    """The container as a local process: the image's ENV under the kubelet's variables, the command
    (container command/args, else the image's ENTRYPOINT/CMD) with $(VAR) expanded, every path and
    Service address mapped, the ports it binds moved to their free local ports."""
    name = workload["metadata"]["name"]
    image = image_config(container["image"])
    mounts = places.mounts(docs, workload, container)
    # The runtime sets HOSTNAME to the pod's name, under the image's ENV and the kubelet's variables.
    env = {"HOSTNAME": f"{name}-local", **image.env,
           **container_env(docs, workload, container, service_links(docs, places.addresses))}
    ports = {p: local for (w, p), local in places.server_ports.items() if w == name}
    for var, value in env.items():
        if var.endswith("PORT") and value.isdigit() and int(value) in ports:
            value = str(ports[int(value)])  # a port this server binds
        env[var] = places.local_value(value, mounts)
    services = {svc for svc, _ in places.addresses}
    unmapped = [f"{var}={value}" for var, value in env.items() for svc in services
                if re.search(rf"(?<![\w.-]){re.escape(svc)}(\.[a-z0-9-]+)*:\d", value)]
    assert not unmapped, f"{name}: names a Service at a port it does not serve: {unmapped}"
    if "LD_PRELOAD" in env:  # the image's system libraries that are not installed here are left out
        env["LD_PRELOAD"] = ":".join(p for p in env["LD_PRELOAD"].split(":") if p and Path(p).exists())
    if "/tmp" in mounts:  # the pod's /tmp is a volume; tempfile follows TMPDIR here
        env["TMPDIR"] = str(mounts["/tmp"])
    if "command" in container:
        argv = list(container["command"]) + list(container.get("args", []))
    else:
        argv = image.entrypoint + list(container.get("args", image.cmd))
    argv = [expand(a, env) for a in argv]
    argv = [places.local_value(a, mounts) for a in argv]
    program = shutil.which(argv[0], path=env.get("PATH")) if "/" not in argv[0] else argv[0]
    assert program, f"{name}: {argv[0]} is not on the container's PATH ({env.get('PATH')})"
    if Path(program).parent == Path(sys.executable).parent and Path(program).name.startswith("python"):
        program = sys.executable  # the image's /opt/venv/bin/python: this virtual environment's
    cwd = Path(places.local_path(container.get("workingDir", image.workdir), mounts))
    assert cwd.is_dir(), f"{name}: the working directory {cwd} does not exist here"
    return LocalContainer(name, container["name"], [program, *argv[1:]], cwd, env, ports,
                          container.get("readinessProbe"))
