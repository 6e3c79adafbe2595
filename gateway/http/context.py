"""What every HTTP request shares with a gRPC call: the API key -> tenant and scope (the gateway's
KeyRing), the deadline as a CallBudget, the downstream channels, and reading a JSON body."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from gateway.auth import KeyRing, Scope
from gateway.authorization import AdmitAll
from gateway.downstream import CallBudget, Downstream
from gateway.settings import GatewaySettings
from ragtune.errors import InvalidArgument
from ragtune.v1 import generator_pb2

# The header a client may bound its request with, in seconds (the gRPC deadline's counterpart).
_TIMEOUT_HEADERS = ("x-request-timeout",)


@dataclass
class FrontState:
    """The collaborators the routes use; built once by GatewayService.start()."""

    settings: GatewaySettings
    keys: KeyRing
    downstream: Downstream
    chat: Any  # the gateway's chat pipeline: chat(conversation, budget), stream(conversation, budget)
    admission: Any = field(default_factory=AdmitAll)  # quotas and fair share (gateway/authorization.py)
    base_model: str = ""  # cached from the generator's GetModelInfo
    created: int = field(default_factory=lambda: int(time.time()))

    def authorize(self, request: Request, *more_scopes: Scope) -> CallBudget:
        """The call's budget for the principal the route's access check admitted (gateway/http/app.py, from the
        table in ragtune/access.py); `more_scopes` are what this request's content needs besides."""
        principal = request.state.principal
        for scope in more_scopes:
            principal.require(scope)
        default = self.settings.default_timeout_s
        remaining = default
        for name in _TIMEOUT_HEADERS:
            value = request.headers.get(name)
            if value:
                try:
                    remaining = float(value)
                except ValueError:
                    raise InvalidArgument(name, "must be a number of seconds") from None
                if remaining <= 0:
                    raise InvalidArgument(name, "must be a positive number of seconds")
                break
        return CallBudget(principal.tenant, time.monotonic() + min(remaining, default * 10), actor=principal.key_id)

    async def base_model_name(self, budget: CallBudget) -> str:
        if not self.base_model:
            info = await self.downstream.generator.get_model_info(generator_pb2.GetModelInfoRequest(), budget)
            self.base_model = info.base_model
        return self.base_model

    async def adapter_of(self, model: Any, budget: CallBudget) -> str:
        """The adapter a `model` names ("" for the base model): the base model's name, an adapter's
        "<name>", "<name>/<version>" or "<name>@<alias>"."""
        if not isinstance(model, str) or not model.strip():
            raise InvalidArgument("model", "is required: the base model's name or an adapter (see GET /v1/models)")
        if model == await self.base_model_name(budget):
            return ""
        return model


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object. Its size is already capped by the route (gateway/http/limits.py), which refuses
    it with 413 while it arrives; what is left to refuse here is what does not parse."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise InvalidArgument("body", f"is not valid JSON ({exc})") from None
    except RecursionError:  # a few KiB of "[[[[..." exhaust the parser's stack: a 400, not a 500
        raise InvalidArgument("body", "is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    return body


def check_fields(body: dict[str, Any], known: set[str], unsupported: dict[str, str] | None = None) -> None:
    """Refuses fields this front does not know, naming them, as OpenAI does ("Unrecognized request argument")."""
    unsupported = unsupported or {}
    for name, value in body.items():
        if name in unsupported and value not in (None, [], {}, False):
            raise InvalidArgument(name, unsupported[name])
        if name not in known and name not in unsupported:
            raise InvalidArgument(name, "unrecognized request argument")


def number(body: dict[str, Any], name: str, kind: type = float, lo: float | None = None, hi: float | None = None):
    """body[name] as `kind`, or None when absent; a wrong type or range is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise InvalidArgument(name, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidArgument(name, f"must be between {lo} and {hi}, not {value}")
    return kind(value)


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be true or false, not {value!r}")
    return value


def string(body: dict[str, Any], name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidArgument(name, "is required")
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, not {type(value).__name__}")
    return value
