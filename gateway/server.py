"""The gateway's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import grpc

from ragtune.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.settings import GatewaySettings

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    pass


class GatewayService:
    """Hosts the gateway: opens the store and the embedder on start, closes them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: GatewaySettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(), server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
