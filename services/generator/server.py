"""The generator's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import grpc

from ragtune.v1 import generator_pb2, generator_pb2_grpc
from services.generator.settings import GeneratorSettings

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    pass


class GeneratorService:
    """Hosts the generator: opens the store and the embedder on start, closes them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(), server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
