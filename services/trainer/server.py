"""The trainer's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import grpc

from ragtune.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.settings import TrainerSettings

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    pass


class TrainerService:
    """Hosts the trainer: opens the store and the embedder on start, closes them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings):
        self.settings = settings

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(), server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
