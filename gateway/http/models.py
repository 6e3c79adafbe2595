"""GET /v1/models: the base model and the tenant's adapters, as "<name>", "<name>/<version>" and
"<name>@<alias>" (every form a request's `model` accepts)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState
from gateway.http.errors import HttpError
from ragtune.v1 import trainer_pb2


def _model(ident: str, created: int, owner: str, **extra) -> dict:
    return {"id": ident, "object": "model", "created": created, "owned_by": owner, **extra}


async def _all(state: FrontState, request: Request) -> list[dict]:
    budget = state.authorize(request)
    down = state.downstream
    base, adapters = await asyncio.gather(
        state.base_model_name(budget),
        down.trainer.list_adapters(trainer_pb2.ListAdaptersRequest(), budget),
    )
    models = [_model(base, state.created, "ragtune")]
    newest: dict[str, int] = {}
    for a in adapters.adapters:
        if not a.servable:
            continue
        created = a.create_time.seconds or state.created
        models.append(_model(f"{a.name}/{a.version}", created, budget.tenant, root=base, parent=base))
        for alias in a.aliases:
            models.append(_model(f"{a.name}@{alias}", created, budget.tenant, root=base, parent=f"{a.name}/{a.version}"))
        if a.version > newest.get(a.name, 0):
            newest[a.name] = a.version
    for name, version in sorted(newest.items()):
        models.append(_model(name, state.created, budget.tenant, root=base, parent=f"{name}/{version}"))
    return models


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": await _all(request.app.state.front, request)})


async def get_model(request: Request) -> Response:
    wanted = request.path_params["model"]
    for model in await _all(request.app.state.front, request):
        if model["id"] == wanted:
            return JSONResponse(model)
    raise HttpError(404, f"the model '{wanted}' does not exist", "not_found_error", "model_not_found")
