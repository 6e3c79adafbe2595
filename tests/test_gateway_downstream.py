"""The gateway's downstream policy over real sockets: safe reads are retried by gRPC's own retry
policy on UNAVAILABLE, writes and generations are not, and a dependency that stays down answers
UNAVAILABLE naming it, within the caller's deadline."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.downstream import CallBudget, Downstream, GeneratorClient, RetrieverClient, TrainerClient, service_config
from ragtune.errors import Unavailable
from ragtune.v1 import retriever_pb2, retriever_pb2_grpc


class FlakyRetriever(retriever_pb2_grpc.RetrieverServiceServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then succeeds."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _maybe_fail(self, method: str, context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")

    async def GetCollection(self, request, context):
        await self._maybe_fail("GetCollection", context)
        return retriever_pb2.GetCollectionResponse(collection=retriever_pb2.Collection(name=request.name))

    async def UpsertDocuments(self, request, context):
        await self._maybe_fail("UpsertDocuments", context)
        return retriever_pb2.UpsertDocumentsResponse()


async def _with_retriever(failures: int, attempts: int, body):
    servicer = FlakyRetriever(failures)
    server = grpc.aio.server()
    retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    down = Downstream(f"127.0.0.1:{port}", "127.0.0.1:1", "127.0.0.1:1", internal_token=None,
                      retry_attempts=attempts, retry_backoff_s=0.01)
    try:
        return await body(down, servicer)
    finally:
        await down.close()
        await server.stop(0)


def _budget(seconds: float = 10) -> CallBudget:
    return CallBudget(tenant="t", deadline=time.monotonic() + seconds)


def test_a_safe_read_is_retried_by_the_channel_and_succeeds():
    async def body(down, servicer):
        reply = await down.retriever.get_collection(retriever_pb2.GetCollectionRequest(name="docs"), _budget())
        return reply.collection.name, servicer.calls

    name, calls = asyncio.run(_with_retriever(failures=2, attempts=3, body=body))
    assert name == "docs" and calls == {"GetCollection": 3}


def test_a_write_is_sent_once_and_its_unavailable_names_the_service():
    async def body(down, servicer):
        with pytest.raises(Unavailable) as err:
            await down.retriever.upsert_documents(retriever_pb2.UpsertDocumentsRequest(collection="docs"), _budget())
        return str(err.value), servicer.calls

    message, calls = asyncio.run(_with_retriever(failures=1, attempts=3, body=body))
    assert calls == {"UpsertDocuments": 1} and "the retriever is unavailable" in message


def test_retries_stop_at_the_configured_attempts():
    async def body(down, servicer):
        with pytest.raises(Unavailable):
            await down.retriever.get_collection(retriever_pb2.GetCollectionRequest(name="docs"), _budget())
        return servicer.calls

    assert asyncio.run(_with_retriever(failures=5, attempts=2, body=body)) == {"GetCollection": 2}
    assert asyncio.run(_with_retriever(failures=5, attempts=1, body=body)) == {"GetCollection": 1}


def test_each_method_is_declared_once_with_its_retry_policy():
    import json

    from ragtune.v1 import generator_pb2, retriever_pb2 as r, trainer_pb2

    for client, module in ((RetrieverClient, r), (GeneratorClient, generator_pb2), (TrainerClient, trainer_pb2)):
        declared = {rpc.method for rpc in client.RPCS.values()}
        service = module.DESCRIPTOR.services_by_name[client.service.rsplit(".", 1)[1]]
        assert declared == {m.name for m in service.methods}, client.__name__  # every RPC, none twice
    config = json.loads(service_config(RetrieverClient, 3, 0.1))["methodConfig"][0]
    assert {n["method"] for n in config["name"]} == {"GetCollection", "ListCollections", "Search",
                                                    "GetCollectionStats", "Embed"}
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert GeneratorClient.retried_methods() == ["GetModelInfo", "ListAdapters"]
