"""Domain errors and the one mapping from them to gRPC status codes with rich details.

Core logic raises these (no gRPC in it); `ErrorMappingInterceptor` in ragtune.server turns
them into statuses. Anything else becomes INTERNAL with a reference id, never a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ServiceError(Exception):
    """An error a client caused or should know about; `code` says which gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, violations: tuple[FieldViolation, ...] | list[FieldViolation] = (),
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s  # sent as google.rpc.RetryInfo: when a retry may succeed

    def to_status(self) -> grpc.Status:
        details = []
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        details.extend(self.extra_details())
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(proto)

    def extra_details(self) -> list[any_pb2.Any]:
        """Rich status details a subclass adds (packed google.rpc messages)."""
        return []


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str, *more: FieldViolation):
        violations = (FieldViolation(field, description), *more)
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message, violations=violations)

    @classmethod
    def of(cls, violations: list[FieldViolation]) -> "InvalidArgument":
        first, *rest = violations
        return cls(first.field, first.description, *rest)


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class QuotaViolation:
    subject: str  # "tenant:<tenant>" or "key:<key id>"
    description: str  # names the limit, its value and what was used


class QuotaExceeded(ResourceExhausted):
    """A tenant's or key's quota is used up: RESOURCE_EXHAUSTED with google.rpc.QuotaFailure naming the
    subject and the limit, and google.rpc.RetryInfo saying when the quota allows the call again."""

    def __init__(self, violations: tuple[QuotaViolation, ...] | list[QuotaViolation], retry_after_s: float):
        self.quota_violations = tuple(violations)
        message = "quota exceeded: " + "; ".join(f"{v.subject}: {v.description}" for v in self.quota_violations)
        super().__init__(message, retry_after_s=retry_after_s)

    def extra_details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in self.quota_violations
        ])
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


def bad_request_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[FieldViolation]:
    """Reads the google.rpc.BadRequest field violations from a failed call (for clients and tests)."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return found



def quota_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[QuotaViolation]:
    """Reads the google.rpc.QuotaFailure violations from a failed call (for clients and tests)."""
    status = rpc_status.from_call(error)
    found = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            found.extend(QuotaViolation(v.subject, v.description) for v in failure.violations)
    return found


def retry_delay_s(error: grpc.aio.AioRpcError | grpc.RpcError) -> float | None:
    """The google.rpc.RetryInfo delay of a failed call in seconds, or None when it carries none."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
