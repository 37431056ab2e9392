"""``/v1/config``: export the whole desired config (JSON or YAML) or replace it."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from control.api.http import etag, if_match, json_body, json_body_schema, responses
from control.api.models import ConfigView
from control.commands import Commands
from control.views import Views

__all__ = ["config_router"]


def config_router(commands: Commands, views: Views) -> APIRouter:
    router = APIRouter(tags=["config"])

    @router.get("/v1/config", summary="Export the desired config (JSON, or YAML with ?format=yaml)",
                responses={200: {"model": ConfigView, "content": {"application/yaml": {  # the config file
                    "schema": {"$ref": "#/components/schemas/Config"}}}}, **responses(None, 422)})
    def export_config(format: Literal["json", "yaml"] = "json") -> Response:  # noqa: A002
        if format == "yaml":
            gen, text = views.export_yaml()
            return PlainTextResponse(text, media_type="application/yaml", headers=etag(gen))
        gen, cfg = views.export_config()
        return JSONResponse({"generation": gen, "config": cfg}, headers=etag(gen))

    @router.put("/v1/config", summary="Replace the whole config (sizes must stay)",
                openapi_extra=json_body_schema("Config"), responses=responses(ConfigView, 409, 412, 422, 503))
    async def put_config(request: Request) -> JSONResponse:
        body = await json_body(request)
        res = await run_in_threadpool(commands.replace_config, body, if_match(request))
        gen, cfg = views.export_config()
        return JSONResponse({"generation": gen, "config": cfg}, headers=etag(res.generation))

    return router
