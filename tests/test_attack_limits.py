"""Attacks on input size (ragtune/request_limits.py, gateway/http/limits.py): a gRPC message over its method's
limit is refused with RESOURCE_EXHAUSTED naming the limit before it is parsed, and the service goes on serving;
an HTTP body over its route's cap is refused with 413 at once by its Content-Length, or as it arrives when
chunked; an oversize dataset upload leaves no file and no record behind, while one at the limit is stored.
Real trainer and gateway (HTTP front included) on real sockets, over the real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest

from gateway.http.limits import HttpLimitSettings
from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.controlplane import Database
from ragtune.controlplane.api_keys import new_key_entry
from ragtune.controlplane.datasets import DatasetRecords
from ragtune.request_limits import (BUILT_IN_LIMITS, RequestLimits, RequestLimitSettings,
                                    largest_request_bytes)
from ragtune.server import HostSettings, server_options
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2, retriever_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.grpc_support import InProcessServer, free_port

MiB = 1 << 20
TOKEN = "internal-token-for-limit-tests-0123456789"
TENANT = "acme"
UPLOAD_LIMIT = MiB  # the test gateway's RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES
_SERVICES = {"ragtune.v1.GatewayService": gateway_pb2, "ragtune.v1.RetrieverService": retriever_pb2,
             "ragtune.v1.GeneratorService": generator_pb2, "ragtune.v1.TrainerService": trainer_pb2}
_SEND_ANY_SIZE = [("grpc.max_send_message_length", -1)]


def _auth(key: str):
    return (("authorization", f"Bearer {key}"),)


def _raw(channel: grpc.Channel, method: str):
    """A unary call that sends bytes as they are: what a hostile client may put on the wire."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


# ---- the table ----------------------------------------------------------------------------------------------

def test_every_row_names_an_rpc_and_a_service_never_refuses_what_its_gateway_accepted():
    methods = {f"{name}/{m.name}" for name, module in _SERVICES.items()
               for m in module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]].methods}
    assert sorted(set(BUILT_IN_LIMITS) - methods) == [], "limits for RPCs that do not exist"
    limits = RequestLimits(RequestLimitSettings())
    for name in methods:
        service, method = name.split("/")
        if service != "ragtune.v1.GatewayService":
            continue
        for owner in ("ragtune.v1.RetrieverService", "ragtune.v1.TrainerService"):
            if f"{owner}/{method}" in methods:  # the gateway forwards this RPC's inner request to its owner
                assert limits.for_method(f"/{owner}/{method}") >= limits.for_method(f"/{name}"), name
    assert limits.for_method("/ragtune.v1.GatewayService/ListJobs") == MiB  # the small default


def test_the_server_never_buffers_more_than_the_largest_limit_and_operators_can_raise_it():
    options = dict(server_options(HostSettings()))
    assert options["grpc.max_receive_message_length"] == largest_request_bytes() < 32 * MiB
    raised = RequestLimitSettings(max_request_bytes=2 * MiB,
                                  method_max_request_bytes={"/ragtune.v1.TrainerService/CreateJob": 40 * MiB,
                                                            "ragtune.v1.RetrieverService": 3 * MiB})
    limits = RequestLimits(raised)
    assert limits.for_method("/ragtune.v1.TrainerService/CreateJob") == 40 * MiB
    assert limits.for_method("/ragtune.v1.RetrieverService/UpsertDocuments") == 3 * MiB  # the service's entry
    assert limits.for_method("/ragtune.v1.GatewayService/ListJobs") == 2 * MiB
    assert largest_request_bytes(raised) > 40 * MiB
    with pytest.raises(ValueError, match="package.Service/Method"):
        RequestLimitSettings(method_max_request_bytes={"CreateJob": MiB})


# ---- real services ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def suite(tmp_path_factory, postgres_server):
    """A real trainer and a real gateway (gRPC and HTTP) on a fresh PostgreSQL database, with the internal token
    set as k8s/base sets it; the gateway accepts datasets of at most UPLOAD_LIMIT bytes, spooled under `spool`.
    The retriever and generator are down: nothing here reaches them."""
    from tests.database_support import fresh_database

    root = tmp_path_factory.mktemp("limits")
    spool = root / "spool"
    spool.mkdir()
    admin, entry = new_key_entry(TENANT, ["admin"])
    dead = f"127.0.0.1:{free_port()}"
    with fresh_database(postgres_server) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES", str(UPLOAD_LIMIT))
        env.setenv("RAGTUNE_GATEWAY_HTTP_UPLOAD_DIR", str(spool))
        trainer_settings = TrainerSettings(port=0, data_dir=root / "trainer", RAGTUNE_DATABASE_URL=url,
                                           RAGTUNE_INTERNAL_TOKEN=TOKEN)
        with InProcessServer(TrainerService, trainer_settings, "trainer") as trainer:
            settings = GatewaySettings(port=0, http_port=0, api_keys=json.dumps({"keys": [entry]}),
                                       retriever_address=dead, generator_address=dead, trainer_address=trainer.address,
                                       evaluation_workers=0, RAGTUNE_INTERNAL_TOKEN=TOKEN, RAGTUNE_DATABASE_URL=url)
            with InProcessServer(GatewayService, settings, "gateway") as gateway, \
                    grpc.insecure_channel(trainer.address, options=_SEND_ANY_SIZE) as trainer_channel, \
                    grpc.insecure_channel(gateway.address, options=_SEND_ANY_SIZE) as gateway_channel:
                db = Database(url)
                yield SimpleNamespace(
                    key=admin, spool=spool, datasets=root / "trainer" / "datasets", records=DatasetRecords(db),
                    trainer=trainer_pb2_grpc.TrainerServiceStub(trainer_channel), trainer_channel=trainer_channel,
                    gateway=gateway_pb2_grpc.GatewayServiceStub(gateway_channel), gateway_channel=gateway_channel,
                    http_port=gateway.service.http_port)
                db.dispose()


def _stored(suite) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file under the trainer's datasets (its staging folder included) and every dataset record."""
    files = sorted(str(p.relative_to(suite.datasets)) for p in suite.datasets.rglob("*") if p.is_file())
    return files, sorted((r.name, r.sha256) for r in suite.records.list(TENANT))


def _wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """A bounded wait for state another service changes on its own schedule (no event reaches the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _internal():
    return tenant_metadata(TENANT, TOKEN)


def test_an_oversize_message_to_an_internal_service_is_refused_naming_the_limit(suite):
    before = _stored(suite)
    with pytest.raises(grpc.RpcError) as err:
        _raw(suite.trainer_channel, "/ragtune.v1.TrainerService/ValidateDataset")(
            os.urandom(MiB + 1), metadata=_internal(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "/ragtune.v1.TrainerService/ValidateDataset" in err.value.details()
    assert "at most 1048576 bytes (1 MiB)" in err.value.details() and "1048577" in err.value.details()
    # The same bytes within the limit reach the parser, which refuses them by name, not as UNKNOWN.
    with pytest.raises(grpc.RpcError) as err:
        _raw(suite.trainer_channel, "/ragtune.v1.TrainerService/ValidateDataset")(
            b"\xff" * 64, metadata=_internal(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ragtune.v1.ValidateDatasetRequest" in err.value.details()
    # And the service goes on serving: a normal call gets its normal answer.
    with pytest.raises(grpc.RpcError) as err:
        suite.trainer.ValidateDataset(trainer_pb2.ValidateDatasetRequest(dataset="absent"), metadata=_internal(),
                                      timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _stored(suite) == before


def test_an_oversize_chunk_in_an_upload_stream_stores_nothing(suite):
    before = _stored(suite)

    def stream(chunk: bytes):
        yield trainer_pb2.UploadDatasetRequest(name="oversize-chunk", content=b'{"prompt": "a", "completion": "b"}\n')
        yield trainer_pb2.UploadDatasetRequest(content=chunk)

    with pytest.raises(grpc.RpcError) as err:
        suite.trainer.UploadDataset(stream(b"x" * (2 * MiB + 1)), metadata=_internal(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "/ragtune.v1.TrainerService/UploadDataset" in err.value.details() and "2 MiB" in err.value.details()
    assert _stored(suite) == before  # the staging file of the refused stream is gone, and nothing was recorded
    reply = suite.trainer.UploadDataset(stream(b"y" * MiB), metadata=_internal(), timeout=30)
    assert reply.name == "oversize-chunk" and reply.size_bytes > MiB
    assert ("oversize-chunk", reply.sha256) in _stored(suite)[1]


def test_the_gateway_checks_the_key_then_the_size_and_never_parses_an_oversize_message(suite):
    ask = _raw(suite.gateway_channel, "/ragtune.v1.GatewayService/Ask")
    garbage = b"\xff" * (4 * MiB + 1)  # not protobuf: parsed, it would fail as INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        ask(garbage, timeout=30)  # no key: refused on the metadata alone, before the message is read
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        ask(garbage, metadata=_auth(suite.key), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "/ragtune.v1.GatewayService/Ask" in err.value.details() and "4 MiB" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        ask(b"\xff" * 64, metadata=_auth(suite.key), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = suite.gateway.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_auth(suite.key), timeout=30)
    assert list(listed.evaluations) == []


def test_an_oversize_chunk_forwarded_by_the_gateway_stores_nothing(suite):
    before = _stored(suite)

    def stream(chunk: bytes):
        for request in (trainer_pb2.UploadDatasetRequest(name="forwarded", content=b'{"prompt": "a"}\n'),
                        trainer_pb2.UploadDatasetRequest(content=chunk)):
            yield gateway_pb2.GatewayServiceUploadDatasetRequest(request=request)

    with pytest.raises(grpc.RpcError) as err:
        suite.gateway.UploadDataset(stream(b"x" * (2 * MiB + 1)), metadata=_auth(suite.key), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "/ragtune.v1.GatewayService/UploadDataset" in err.value.details() and "2 MiB" in err.value.details()
    # The trainer's half of the stream is cancelled on its own schedule: its staging file goes with it.
    _wait_until(lambda: _stored(suite) == before, "the trainer drops the cancelled upload")
    reply = suite.gateway.UploadDataset(stream(b"y" * MiB), metadata=_auth(suite.key), timeout=30).response
    assert reply.name == "forwarded" and reply.size_bytes > MiB


# ---- HTTP ---------------------------------------------------------------------------------------------------

def _exchange(port: int, head: str, chunks=(), timeout: float = 30.0) -> tuple[int, dict[str, str], bytes, int]:
    """Sends a request head, then body chunks over a plain socket, stopping once the server answers (a refused
    body is never read to its end); returns the answer's status, headers and body, and the body bytes sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is there already
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < _answer_length(received):
            part = sock.recv(65536)
            if not part:
                break
            received += part
    head_part, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body, sent


def _answer_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n"):
        if line.lower().startswith("content-length:"):
            return len(head) + 4 + int(line.split(":", 1)[1])
    return len(received) + 1  # no length yet: read on


def _head(path: str, key: str, content_type: str, length: int | None) -> str:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n"
            f"content-type: {content_type}\r\n{framing}\r\n\r\n")


def _chunked(pieces):
    for piece in pieces:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _error(body: bytes) -> dict:
    return json.loads(body)["error"]


def test_a_declared_oversize_body_is_refused_at_once(suite):
    cap = HttpLimitSettings().max_inference_body_bytes
    status, headers, body, _ = _exchange(suite.http_port, _head("/v1/chat/completions", suite.key,
                                                                "application/json", 100 * MiB), timeout=10)
    assert status == 413 and headers.get("connection") == "close"  # answered without one byte of the body
    error = _error(body)
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert f"{cap} bytes" in error["message"] and "RAGTUNE_GATEWAY_HTTP_MAX_INFERENCE_BODY_BYTES" in error["message"]


def test_a_chunked_oversize_body_is_refused_as_it_arrives(suite):
    cap = HttpLimitSettings().max_inference_body_bytes
    total = 64 * MiB
    pieces = (b" " * (64 * 1024) for _ in range(total // (64 * 1024)))
    status, headers, body, sent = _exchange(
        suite.http_port, _head("/v1/chat/completions", suite.key, "application/json", None), _chunked(pieces))
    assert status == 413 and f"{cap} bytes" in _error(body)["message"]
    assert sent < total  # refused while the body was still arriving, not after it was all read


def test_a_deeply_nested_body_is_a_400_not_a_crash(suite):
    reply = httpx.post(f"http://127.0.0.1:{suite.http_port}/v1/chat/completions", content=b"[" * 100_000,
                       headers={"authorization": f"Bearer {suite.key}", "content-type": "application/json"},
                       timeout=30)
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]["message"]


def _dataset(size: int) -> bytes:
    """A JSONL dataset of exactly `size` bytes: whole example lines, the last one padded."""
    line = b'{"prompt": "What is two plus two?", "completion": "Four."}\n'
    prefix, suffix = b'{"prompt": "p", "completion": "', b'"}\n'
    whole = (size - len(prefix) - len(suffix)) // len(line)
    return line * whole + prefix + b"x" * (size - whole * len(line) - len(prefix) - len(suffix)) + suffix


def _multipart(dataset: bytes, boundary: str = "limits-boundary") -> tuple[list[bytes], str]:
    opening = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
               f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n"
               "content-type: application/jsonl\r\n\r\n").encode()
    pieces = [opening, *(dataset[i:i + 64 * 1024] for i in range(0, len(dataset), 64 * 1024)),
              f"\r\n--{boundary}--\r\n".encode()]
    return pieces, f"multipart/form-data; boundary={boundary}"


def test_an_upload_at_the_limit_is_stored_and_its_spool_removed(suite):
    dataset = _dataset(UPLOAD_LIMIT)
    assert len(dataset) == UPLOAD_LIMIT
    reply = httpx.post(f"http://127.0.0.1:{suite.http_port}/v1/files", headers={"authorization": f"Bearer {suite.key}"},
                       files={"file": ("train.jsonl", dataset)}, data={"purpose": "fine-tune"}, timeout=60)
    assert reply.status_code == 200, reply.text
    digest = hashlib.sha256(dataset).hexdigest()
    assert reply.json()["id"] == f"file-{digest[:24]}" and reply.json()["bytes"] == UPLOAD_LIMIT
    assert (reply.json()["id"], digest) in _stored(suite)[1]
    assert list(suite.spool.iterdir()) == []


def test_a_chunked_upload_over_the_limit_stores_nothing(suite):
    before = _stored(suite)
    pieces, content_type = _multipart(_dataset(UPLOAD_LIMIT + 1))
    status, headers, body, _ = _exchange(suite.http_port, _head("/v1/files", suite.key, content_type, None),
                                         _chunked(pieces))
    assert status == 413 and headers.get("connection") == "close"
    assert f"{UPLOAD_LIMIT} bytes" in _error(body)["message"]
    assert "RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES" in _error(body)["message"]
    assert list(suite.spool.iterdir()) == [] and _stored(suite) == before


def test_a_declared_oversize_upload_is_refused_at_once_and_stores_nothing(suite):
    before = _stored(suite)
    _, content_type = _multipart(b"")
    status, headers, body, _ = _exchange(suite.http_port, _head("/v1/files", suite.key, content_type, 100 * MiB),
                                         timeout=10)
    assert status == 413 and headers.get("connection") == "close"
    assert "RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES" in _error(body)["message"]
    assert list(suite.spool.iterdir()) == [] and _stored(suite) == before


def test_an_upload_with_the_wrong_purpose_first_is_refused_before_its_file_is_stored(suite):
    before = _stored(suite)
    pieces, content_type = _multipart(_dataset(4096))
    pieces[0] = pieces[0].replace(b"fine-tune", b"assistants")
    length = sum(len(p) for p in pieces)
    status, _, body, _ = _exchange(suite.http_port, _head("/v1/files", suite.key, content_type, length), pieces)
    assert status == 400 and _error(body)["param"] == "purpose"
    assert list(suite.spool.iterdir()) == [] and _stored(suite) == before
