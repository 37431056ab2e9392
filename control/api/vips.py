"""``/v1/vips``: list, create, read, change and delete VIPs."""

from __future__ import annotations

from collections.abc import Callable

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
from control.ids import VipKey
from control.keys import parse_vip_key
from control.views import Views

__all__ = ["VIP", "VIP_PATHS", "vip_location", "vips_router"]

VIP = "/v1/vips/{address}/{port}/{protocol}"
# A CIDR VIP's prefix takes two segments, as in /v1/source-routes: /v1/vips/198.18.64.0/24/80/tcp
# (198.18.64.0%2F24 as one segment works too). Length and port are integers here, so the
# path never matches an exact VIP's /v1/vips/ADDR/PORT/PROTO/reals.
PREFIX_VIP = "/v1/vips/{address}/{length:int}/{port:int}/{protocol}"


def _exact_key(address: str, port: str, protocol: str) -> VipKey:
    return parse_vip_key(address, port, protocol)


def _prefix_key(address: str, length: int, port: int, protocol: str) -> VipKey:
    return parse_vip_key(f"{address}/{length}", port, protocol)


# (path, the dependency that reads the VIP key from it): every per-VIP route has both
VIP_PATHS: tuple[tuple[str, Callable[..., VipKey]], ...] = ((VIP, _exact_key), (PREFIX_VIP, _prefix_key))


def vip_location(key: VipKey) -> str:
    """The path of a VIP (a CIDR VIP's prefix as two segments)."""
    return f"/v1/vips/{key[0]}/{key[1]}/{key[2]}"


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
                                                            "Location": vip_location(key)})

    for path, key_of in VIP_PATHS:
        _vip_routes(router, commands, views, path, key_of)
    return router


def _vip_routes(router: APIRouter, commands: Commands, views: Views, path: str,
                key_of: Callable[..., VipKey]) -> None:
    """GET, PATCH, DELETE of one VIP at ``path``, its key read by ``key_of``. (``Depends``
    as a default is FastAPI's form; an Annotated one would not resolve ``key_of``, a local,
    under postponed annotations.)"""

    @router.get(path, summary="Get a VIP", responses=responses(VipView, 404, 422))
    def get_vip(key: VipKey = Depends(key_of)) -> JSONResponse:  # noqa: B008
        gen, view = views.at_generation(views.vip_view, key)
        return JSONResponse(view, headers=etag(gen))

    @router.patch(path, summary="Change a VIP's flags, hash or health check",
                  openapi_extra=json_body_schema("VipPatch"), responses=responses(VipView, 404, 409, 412, 422, 503))
    async def patch_vip(request: Request, key: VipKey = Depends(key_of)) -> JSONResponse:  # noqa: B008
        body = await json_body(request)
        res = await run_in_threadpool(commands.update_vip, key, body, if_match(request))
        return JSONResponse(await run_in_threadpool(views.vip_view, key), headers=etag(res.generation))

    @router.delete(path, summary="Delete a VIP", status_code=204, responses=responses(None, 404, 412, 422, 503))
    async def delete_vip(request: Request, key: VipKey = Depends(key_of)) -> Response:  # noqa: B008
        res = await run_in_threadpool(commands.delete_vip, key, if_match(request))
        return Response(status_code=204, headers=etag(res.generation))
