"""The deployment runs as rendered: each overlay's own configuration, started here.

Every ragtune workload's container (and the release's migration Job) runs as a local process with the
command, arguments and environment the manifests give it (tests/local_deployment.py: ConfigMaps and
Secrets resolved, the cpu overlay's samples and the gpu overlay's throwaway operator values; the
image's ENTRYPOINT and ENV from the Dockerfile). What differs is only where things are, each named here:

- volumes are folders under one temporary folder, the artifact claim ONE folder every pod shares (as
  the ReadWriteMany volume is); the image's /app, /opt/venv and model cache are the checkout, this venv
  and the prepared model cache (RAGTUNE_MODEL_CACHE, else ~/.cache/ragtune/models);
- Services are local addresses: the ragtune services free ports (the servers' RAGTUNE_*_PORT and the
  clients' addresses alike), redis the local Redis (db REDIS_DB instead of the manifest's 0, so other
  users of that server are untouched), postgres a fresh database on the local server (its user too:
  the server trusts local users and has no role `ragtune`; the manifest's password variable stays,
  trust ignores it), otel-collector an unused local port: exports fail (the OTLP exporter logs a
  warning and drops them; the services never wait on it), and Weaviate likewise unless WEAVIATE_URL
  names a live one;
- OVERRIDES: the settings this machine cannot honour (GPU-only ones, and Weaviate), each with its reason.

Then the release runs: the migration Job's command first, then the four services, each waited on
through its readiness probe's gRPC health service. A gRPC client, the `openai` client and the CLI run
the demo through the gateway with the overlay's key: ingest wiki100 articles, Ask with citations, a chat
completion with the `ragtune` extension, a 2-step fine-tune, the new adapter answering. Every process
then gets SIGTERM and must exit 0. A configuration the manifests describe that a process refuses fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from sqlalchemy.engine import make_url

from clients.cli.demo import DEMO_QUESTION, jeopardy_style_dataset
from clients.samples import wiki100_articles
from ragtune.models import BASE_MODEL_NAME, default_model_cache
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, retriever_pb2
from tests.database_support import fresh_database
from tests.grpc_support import free_port, wait_serving
from tests.k8s_support import OVERLAYS, migration_jobs, operator_api_key, pod_spec, ragtune_containers, render
from tests.local_deployment import (
    LocalContainer,
    LocalPlaces,
    image_paths,
    local_container,
    map_services,
    service_address,
)

pytestmark = pytest.mark.slow

# The key each overlay's gateway-api-keys Secret holds the hash of: the cpu overlay's sample (tenant demo:
# read, ingest, train), and the throwaway one the gpu overlay is rendered with (tests/k8s_support.py).
API_KEYS = {"cpu": lambda: "rt_demo_replace_me", "gpu": lambda: operator_api_key()[0]}
REDIS_DB = 14  # test_attack_quotas uses 15
# The few articles ingested: "Animal" answers DEMO_QUESTION in one sentence.
ARTICLES = ("Anatomy", "Animal", "Architecture")
COLLECTION = "wiki"
ADAPTER = "rendered-style"
# What this machine cannot run as rendered: (service, variable) -> (value, why), per overlay. Nothing else is
# changed beyond the mappings of places in the module docstring (the -gpu images' CUDA virtual environment
# is this CPU one, as their /opt/venv).
NO_WEAVIATE: dict[tuple[str, str], tuple[str, str]] = {} if os.environ.get("WEAVIATE_URL") else {
    ("retriever", "RAGTUNE_RETRIEVER_BACKEND"): (
        "lancedb", "no Weaviate server can run on these machines (DESIGN.md); set WEAVIATE_URL to a live one "
        "and the rendered weaviate backend runs against it instead"),
}
OVERRIDES: dict[str, dict[tuple[str, str], tuple[str, str]]] = {
    "cpu": NO_WEAVIATE,  # no GPU-only setting
    "gpu": {
        **NO_WEAVIATE,
        ("generator", "RAGTUNE_GENERATOR_DTYPE"): (
            "float32", "bfloat16 is the GPU's fast path; on this CPU it runs about 5x slower than float32"),
        ("generator", "RAGTUNE_GENERATOR_ENFORCE_EAGER"): (
            "true", "compiled mode pays for CUDA graphs on a GPU; on this CPU it only adds minutes to the start"),
    },
}
START_TIMEOUT_S = 600  # vLLM on 2 shared cores
STOP_TIMEOUT_S = 120


def _redis_or_fail() -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=2).flushdb()
    except redis.RedisError:
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI and none answers at 127.0.0.1:6379")
        pytest.skip("no Redis at 127.0.0.1:6379")


def stand_ins(database_url: str) -> dict[str, dict[int, str]]:
    """What stands in for each Service that is not a ragtune workload: port -> local address."""
    database = make_url(database_url)
    unused = f"127.0.0.1:{free_port()}"  # nothing listens: the telemetry exports fail and are dropped
    found = {
        "postgres": {5432: f"{database.host}:{database.port or 5432}"},
        "redis": {6379: "127.0.0.1:6379"},
        "otel-collector": {4317: unused, 4318: unused, 8889: unused},
        "weaviate": {8080: unused, 50051: unused},
        "weaviate-headless": {port: unused for port in (7946, 7947, 8300, 8301)},
    }
    if os.environ.get("WEAVIATE_URL"):
        live = urlparse(os.environ["WEAVIATE_URL"])
        grpc_port = os.environ.get("RAGTUNE_RETRIEVER_WEAVIATE_GRPC_PORT", "50051")
        found["weaviate"] = {8080: f"{live.hostname}:{live.port or 80}", 50051: f"{live.hostname}:{grpc_port}"}
    return found


def on_this_machine(process: LocalContainer, service: str, database_url: str, overlay: str) -> None:
    """The local servers' own details (the fresh database's name and user, the Redis db), then OVERRIDES."""
    fresh = make_url(database_url)
    for var, value in process.env.items():
        if value.startswith("postgresql"):
            url = make_url(value)
            assert (url.host, url.port) == (fresh.host, fresh.port), f"{process.workload}: {var} not mapped: {value}"
            process.env[var] = url.set(database=fresh.database, username=fresh.username).render_as_string(False)
        elif value.startswith("redis://"):
            url = urlparse(value)
            assert url.netloc.endswith("127.0.0.1:6379"), f"{process.workload}: {var} not mapped: {value}"
            process.env[var] = url._replace(path=f"/{REDIS_DB}").geturl()
    for (target, var), (value, _) in OVERRIDES[overlay].items():
        if target == service:
            assert var in process.env, f"OVERRIDES names {var}, which {service}'s manifest does not set"
            process.env[var] = value


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else ["(no log)"]
    return f"--- {log.name} ---\n" + "\n".join(text[-lines:])


def _start(process: LocalContainer, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        # A session of its own, like a container: a failed test can kill what it spawned (vLLM's engine).
        return subprocess.Popen(process.command, cwd=process.cwd, env=process.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _ready(process: LocalContainer, proc: subprocess.Popen) -> None:
    """Waits as the kubelet's readiness probe does: grpc.health.v1 for the probe's service on its port."""
    probe = process.readiness["grpc"]
    wait_serving(f"127.0.0.1:{process.ports[probe['port']]}", probe.get("service", ""), timeout=START_TIMEOUT_S,
                 proc=proc)


def _cli(gateway: str, key: str, *args: str, timeout: float = 600) -> str:
    ragtune = Path(sys.executable).parent / "ragtune"
    run = subprocess.run([str(ragtune), "--gateway", gateway, "--api-key", key, *args],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"ragtune {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def run_demo(gateway: str, http: str, key: str, tmp_path: Path) -> None:
    auth = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.CreateCollection(gateway_pb2.GatewayServiceCreateCollectionRequest(
            request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name=COLLECTION))),
            metadata=auth, timeout=120)
        articles = [(t, x) for t, x in wiki100_articles() if t in ARTICLES]
        upserted = stub.UpsertDocuments(gateway_pb2.GatewayServiceUpsertDocumentsRequest(
            request=retriever_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=[
                retriever_pb2.Document(id=title, text=text) for title, text in articles])),
            metadata=auth, timeout=600).response
        assert upserted.upserted == len(ARTICLES) and upserted.chunks > 0
        question = gateway_pb2.AskQuestion(question=DEMO_QUESTION, collection=COLLECTION)
        question.sampling.max_tokens = 48
        reply = stub.Ask(gateway_pb2.AskRequest(question=question), metadata=auth, timeout=300)
        assert reply.answer.strip() and "Animal" in {c.document_id for c in reply.context}, reply
        assert "Animal" in {c.document_id for c in reply.citations}, f"no citation of Animal for {reply.answer!r}"

    from openai import OpenAI

    client = OpenAI(base_url=f"http://{http}/v1", api_key=key, max_retries=0, timeout=300)
    chat = client.chat.completions.create(
        model=BASE_MODEL_NAME, messages=[{"role": "user", "content": DEMO_QUESTION}], max_tokens=32,
        extra_body={"ragtune": {"collection": COLLECTION}})
    rag = chat.model_extra["ragtune"]
    assert chat.choices[0].message.content.strip()
    assert "Animal" in {c["document_id"] for c in rag["context"]}, rag
    assert "Animal" in {c["document_id"] for c in rag["citations"]}, (chat.choices[0].message.content, rag)

    dataset = jeopardy_style_dataset(tmp_path / "rendered-style.jsonl", examples=16)
    watched = _cli(gateway, key, "finetune", "create", "--name", ADAPTER, "--dataset", str(dataset), "--max-steps", "2",
                   "--batch-size", "2", "--max-seq-len", "128", "--watch")
    assert "JOB_STATE_SUCCEEDED" in watched and f"{ADAPTER}/1" in watched, watched
    answered = _cli(gateway, key, "ask", DEMO_QUESTION, "-c", COLLECTION, "--adapter", ADAPTER, "--no-stream")
    assert "] Animal chunk" in answered, answered
    listed = _cli(gateway, key, "adapters", "list")
    assert f"{ADAPTER}/1" in listed, listed
    loaded = next(line for line in listed.splitlines() if line.startswith("loaded in the generator:"))
    assert ADAPTER in loaded, listed  # the generator served the answer above with the new adapter


@pytest.fixture
def cluster_root():
    """The folders standing in for the volumes: a short path, since vLLM makes its ZeroMQ unix sockets in
    the pod's /tmp volume and a socket's path must fit in 107 bytes (pytest's tmp_path does not)."""
    root = Path(tempfile.mkdtemp(prefix="rt-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_runs_as_rendered_and_serves_the_demo(overlay, tmp_path, cluster_root, postgres_server):
    """The release's migration, then the four services as the overlay configures them, the demo through
    the gateway (gRPC, OpenAI HTTP, CLI), and a clean exit on SIGTERM."""
    _redis_or_fail()
    docs = render(overlay)
    services = list(ragtune_containers(docs))
    assert sorted(s for _, _, s in services) == ["gateway", "generator", "retriever", "trainer"]
    (job,) = migration_jobs(docs)
    places = LocalPlaces(cluster_root, image_paths(default_model_cache()))
    with fresh_database(postgres_server) as database_url:
        map_services(docs, places, [w for w, _, _ in services], stand_ins(database_url))
        migrate = local_container(docs, job, pod_spec(job)["containers"][0], places)
        on_this_machine(migrate, "migrate", database_url, overlay)
        log = tmp_path / "migrate.log"
        with open(log, "wb") as out:
            code = subprocess.run(migrate.command, cwd=migrate.cwd, env=migrate.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=360).returncode
        assert code == 0, f"the migration Job's command exited {code}\n{_tail(log)}"

        running: dict[str, tuple[LocalContainer, subprocess.Popen, Path]] = {}
        try:
            for workload, container, service in services:
                process = local_container(docs, workload, container, places)
                on_this_machine(process, service, database_url, overlay)
                log = tmp_path / f"{service}.log"
                running[service] = (process, _start(process, log), log)
            for process, proc, _ in running.values():
                _ready(process, proc)
            gateway = service_address(docs, places, "gateway", "grpc")
            http = service_address(docs, places, "gateway", "http")
            run_demo(gateway, http, API_KEYS[overlay](), tmp_path)

            for _, proc, _ in running.values():
                proc.send_signal(signal.SIGTERM)  # as the kubelet does to the container's first process
            deadline = time.monotonic() + STOP_TIMEOUT_S
            codes = {}
            for service, (_, proc, _) in running.items():
                try:
                    codes[service] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    codes[service] = None
            failed = {s: c for s, c in codes.items() if c != 0}
            assert not failed, f"exit codes after SIGTERM (None: still running after {STOP_TIMEOUT_S} s): {failed}\n" \
                + "\n".join(_tail(running[s][2]) for s in failed)
        except BaseException:
            print("\n".join(_tail(log) for _, _, log in running.values()), file=sys.stderr)
            raise
        finally:
            for _, proc, _ in running.values():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session (vLLM's engine)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
            _redis_or_fail()  # empties the test's Redis db again
