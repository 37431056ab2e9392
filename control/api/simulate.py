"""``/v1/simulate``: where would a new flow go now (the current rings, health and drain
applied)?"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from control.api.http import json_body, json_body_schema, problems_of, responses
from control.api.models import SimulateView
from control.errors import Invalid
from control.flows import FlowQuery, flow_frame
from control.views import Views

__all__ = ["simulate_router"]


def simulate_router(views: Views) -> APIRouter:
    router = APIRouter(tags=["simulate"])

    @router.post("/v1/simulate", summary="Where does this flow go? (a new flow, now)",
                 openapi_extra=json_body_schema("FlowQuery"), responses=responses(SimulateView, 422))
    async def simulate(request: Request) -> JSONResponse:
        body = await json_body(request)
        try:
            q = FlowQuery.model_validate(body)
            frame = flow_frame(q)
        except ValidationError as e:
            raise Invalid(problems_of(e), "invalid flow") from None
        except ValueError as e:
            raise Invalid([("dst", str(e))], "invalid flow") from None
        return JSONResponse(await run_in_threadpool(views.simulate, q, frame))

    return router
