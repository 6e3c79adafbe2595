"""The retriever's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import grpc

from ragtune.v1 import retriever_pb2, retriever_pb2_grpc
from services.retriever.settings import RetrieverSettings

SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    pass


class RetrieverService:
    """Hosts the retriever: opens the store and the embedder on start, closes them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: RetrieverSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(RetrieverServicer(), server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
