"""``/v1/vips/.../reals``: a VIP's reals: list, add, read, change (weight, drain), remove."""

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
from control.api.models import RealOfVip, RealView
from control.api.vips import VIP_PATHS
from control.commands import Commands
from control.ids import VipKey
from control.keys import parse_real_address
from control.views import Views

__all__ = ["reals_router"]


def reals_router(commands: Commands, views: Views) -> APIRouter:
    router = APIRouter(tags=["reals"])
    for vip_path, key_of in VIP_PATHS:
        _real_routes(router, commands, views, vip_path, key_of)
    return router


def _real_routes(router: APIRouter, commands: Commands, views: Views, vip_path: str,
                 key_of: Callable[..., VipKey]) -> None:
    """The reals of the VIP at ``vip_path`` (its key read by ``key_of``)."""
    reals_path = vip_path + "/reals"
    real_path = reals_path + "/{real}"

    @router.get(reals_path, summary="List a VIP's reals (paged)", responses=responses(None, 404, 422),
                response_model=list[RealView])
    def list_reals(request: Request, key: VipKey = Depends(key_of),  # noqa: B008
                   page: tuple[int, int] = Depends(page_params)) -> JSONResponse:  # noqa: B008
        gen, view = views.at_generation(views.vip_view, key)
        return paged(request, view["reals"], page, etag(gen))

    @router.post(reals_path, summary="Add a real to a VIP", status_code=201, openapi_extra=json_body_schema("Real"),
                 responses={201: {"model": RealOfVip}, **responses(None, 404, 409, 412, 422, 503)})
    async def add_real(request: Request, key: VipKey = Depends(key_of)) -> JSONResponse:  # noqa: B008
        body = await json_body(request)
        addr, res = await run_in_threadpool(commands.add_real, key, body, if_match(request))
        return JSONResponse(await run_in_threadpool(views.real_view, key, addr), status_code=201,
                            headers=etag(res.generation))

    @router.get(real_path, summary="Get one real of a VIP", responses=responses(RealOfVip, 404, 422))
    def get_real(real: str, key: VipKey = Depends(key_of)) -> JSONResponse:  # noqa: B008
        addr = parse_real_address(real)
        gen, view = views.at_generation(views.real_view, key, addr)
        return JSONResponse(view, headers=etag(gen))

    @router.patch(real_path, summary="Set a real's weight, drain or undrain it",
                  openapi_extra=json_body_schema("RealPatch"),
                  responses=responses(RealOfVip, 404, 409, 412, 422, 503))
    async def patch_real(real: str, request: Request, key: VipKey = Depends(key_of)) -> JSONResponse:  # noqa: B008
        addr = parse_real_address(real)
        body = await json_body(request)
        res = await run_in_threadpool(commands.update_real, key, addr, body, if_match(request))
        return JSONResponse(await run_in_threadpool(views.real_view, key, addr), headers=etag(res.generation))

    @router.delete(real_path, summary="Remove a real from a VIP", status_code=204,
                   responses=responses(None, 404, 412, 422, 503))
    async def delete_real(real: str, request: Request, key: VipKey = Depends(key_of)) -> Response:  # noqa: B008
        addr = parse_real_address(real)
        res = await run_in_threadpool(commands.remove_real, key, addr, if_match(request))
        return Response(status_code=204, headers=etag(res.generation))
