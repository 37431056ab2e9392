"""``/v1/quic-servers`` and ``/v1/source-routes``: the routing tables (QUIC server id ->
real, client prefix -> real), each read or replaced whole, or one entry at a time."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
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
from control.api.models import QuicServerView, SourceRouteView
from control.commands import Commands
from control.keys import parse_prefix, parse_quic_id
from control.views import Views

__all__ = ["quic_servers_router", "source_routes_router"]


class _Table:
    """The routes every routing table has: GET/PUT the whole table, POST one entry; and
    the GET/DELETE of one entry for the routers below to declare with their own path."""

    def __init__(self, commands: Commands, views: Views, section: str, base: str, model: str,
                 view: type[BaseModel], what: str) -> None:
        self.commands, self.views, self.section = commands, views, section
        self.router = APIRouter(tags=[base.rsplit("/", 1)[1]])

        @self.router.get(base, summary=f"List the {what} (paged)", response_model=list[view],
                         responses=responses(None, 422))
        def list_all(request: Request, page: tuple[int, int] = Depends(page_params)) -> JSONResponse:
            gen, body = views.at_generation(views.routing_view, section)
            return paged(request, body, page, etag(gen))

        @self.router.put(base, summary=f"Replace the whole table of {what}",
                         openapi_extra=json_body_schema(model, array=True),
                         responses={200: {"model": list[view]}, **responses(None, 409, 412, 422, 503)})
        async def replace(request: Request) -> JSONResponse:
            body = await json_body(request)
            res = await run_in_threadpool(commands.replace_routing, section, body, if_match(request))
            return JSONResponse(await run_in_threadpool(views.routing_view, section), headers=etag(res.generation))

        @self.router.post(base, summary=f"Add one of the {what}", status_code=201,
                          openapi_extra=json_body_schema(model),
                          responses={201: {"model": view}, **responses(None, 409, 412, 422, 503)})
        async def add(request: Request) -> JSONResponse:
            body = await json_body(request)
            key, res = await run_in_threadpool(commands.add_routing, section, body, if_match(request))
            return JSONResponse(await run_in_threadpool(views.routing_view, section, key), status_code=201,
                                headers={**etag(res.generation), "Location": f"{base}/{key}"})

    def entry(self, key: Any) -> JSONResponse:
        gen, body = self.views.at_generation(self.views.routing_view, self.section, key)
        return JSONResponse(body, headers=etag(gen))

    async def delete(self, key: Any, request: Request) -> Response:
        res = await run_in_threadpool(self.commands.delete_routing, self.section, key, if_match(request))
        return Response(status_code=204, headers=etag(res.generation))


def quic_servers_router(commands: Commands, views: Views) -> APIRouter:
    table = _Table(commands, views, "quic_servers", "/v1/quic-servers", "QuicServer", QuicServerView,
                   "QUIC server ids (id -> real)")
    one = "/v1/quic-servers/{id}"

    @table.router.get(one, summary="Get one QUIC server id", responses=responses(QuicServerView, 404, 422))
    def get_quic_server(id: str) -> JSONResponse:  # noqa: A002 - the URL's name
        return table.entry(parse_quic_id(id))

    @table.router.delete(one, summary="Delete a QUIC server id", status_code=204,
                         responses=responses(None, 404, 412, 422, 503))
    async def delete_quic_server(id: str, request: Request) -> Response:  # noqa: A002
        return await table.delete(parse_quic_id(id), request)

    return table.router


def source_routes_router(commands: Commands, views: Views) -> APIRouter:
    table = _Table(commands, views, "source_routes", "/v1/source-routes", "SourceRoute", SourceRouteView,
                   "source routes (client prefix -> real)")
    one = "/v1/source-routes/{address}/{length}"  # the prefix as two segments: 198.18.64.0/24

    @table.router.get(one, summary="Get one source route", responses=responses(SourceRouteView, 404, 422))
    def get_source_route(address: str, length: str) -> JSONResponse:
        return table.entry(parse_prefix(f"{address}/{length}"))

    @table.router.delete(one, summary="Delete a source route", status_code=204,
                         responses=responses(None, 404, 412, 422, 503))
    async def delete_source_route(address: str, length: str, request: Request) -> Response:
        return await table.delete(parse_prefix(f"{address}/{length}"), request)

    return table.router
