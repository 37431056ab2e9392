"""``/v1/vips``: list, create, read, change and delete VIPs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from control.api.http import (
    etag,
    if_match,
    json_body,
    json_body_schema,
    page_params,
    paged,
    responses,
)
from control.api.models import VipView
from control.commands import Commands
from control.keys import parse_vip_key
from control.views import Views

__all__ = ["VIP", "vips_router"]

VIP = "/v1/vips/{address}/{port}/{protocol}"


def vips_router(commands: Commands, views: Views) -> APIRouter:
    router = APIRouter(tags=["vips"])

    @router.get("/v1/vips", summary="List VIPs (paged)", responses=responses(None, 422), response_model=list[VipView])
    def list_vips(request: Request, page: tuple[int, int] = Depends(page_params)) -> JSONResponse:
        gen, body = views.at_generation(views.list_vips)
        return paged(request, body, page, etag(gen))

    @router.post("/v1/vips", summary="Create a VIP", status_code=201,
                 openapi_extra=json_body_schema("Vip"), responses={201: {"model": VipView},
                                                                   **responses(None, 409, 412, 422, 503)})
    async def create_vip(request: Request) -> JSONResponse:
        body = await json_body(request)
        key, res = await run_in_threadpool(commands.create_vip, body, if_match(request))
        view = await run_in_threadpool(views.vip_view, key)
        return JSONResponse(view, status_code=201, headers={**etag(res.generation),
                                                            "Location": f"/v1/vips/{key[0]}/{key[1]}/{key[2]}"})

    @router.get(VIP, summary="Get a VIP", responses=responses(VipView, 404, 422))
    def get_vip(address: str, port: str, protocol: str) -> JSONResponse:
        key = parse_vip_key(address, port, protocol)
        gen, view = views.at_generation(views.vip_view, key)
        return JSONResponse(view, headers=etag(gen))

    @router.patch(VIP, summary="Change a VIP's flags, hash or health check",
                  openapi_extra=json_body_schema("VipPatch"), responses=responses(VipView, 404, 409, 412, 422, 503))
    async def patch_vip(address: str, port: str, protocol: str, request: Request) -> JSONResponse:
        key = parse_vip_key(address, port, protocol)
        body = await json_body(request)
        res = await run_in_threadpool(commands.update_vip, key, body, if_match(request))
        return JSONResponse(await run_in_threadpool(views.vip_view, key), headers=etag(res.generation))

    @router.delete(VIP, summary="Delete a VIP", status_code=204, responses=responses(None, 404, 412, 422, 503))
    async def delete_vip(address: str, port: str, protocol: str, request: Request) -> Response:
        key = parse_vip_key(address, port, protocol)
        res = await run_in_threadpool(commands.delete_vip, key, if_match(request))
        return Response(status_code=204, headers=etag(res.generation))

    return router
