"""The REST API (FastAPI). Documented in docs/api.md; the OpenAPI document is at
``/openapi.json``.

Request bodies are read as JSON and validated by the controller through lb.config's
models, so the API accepts exactly what a config file accepts and its errors name the
field the same way. Errors are ``{"error": "...", "kind": "...", "problems": [{"path",
"message"}]}`` with 4xx for the caller's fault (422 invalid, 404 unknown, 409 conflict,
412 stale If-Match, 401 missing token) and 5xx for ours (503: a datapath write or the
state file failed and the change was undone).

Every change answers with the new generation in ``ETag``; sending ``If-Match: <gen>``
makes a change conditional on nobody having changed anything since.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from control.errors import ControlError, Invalid
from control.flows import FlowQuery, flow_frame
from control.metrics import CONTENT_TYPE, Metrics
from control.service import (
    Controller,
    parse_prefix,
    parse_quic_id,
    parse_real_address,
    parse_vip_key,
)
from control.tables import vip_label
from lb import constants as C
from lb.config import Config, QuicServer, Real, SourceRoute, Vip
from lb.healthcheck_config import HealthCheck

__all__ = ["create_app", "API_VERSION"]

log = logging.getLogger("lb.api")
API_VERSION = "1"


# --- documentation models (requests are validated by the controller; responses are
# checked against these in tests/test_control_api.py) ---------------------------------------


class Problem(BaseModel):
    path: str = Field(description="the field, relative to the request body ('(body)' for the whole body)")
    message: str


class ErrorBody(BaseModel):
    error: str = Field(description="one line naming the fields")
    kind: str = Field(description="invalid | not_found | conflict | precondition_failed | unauthorized | "
                                  "bad_request | datapath | persist | internal")
    problems: list[Problem]


class VipPatch(BaseModel):
    """Fields of a VIP that can change (address, port and protocol name it)."""

    model_config = ConfigDict(extra="forbid")
    flags: list[str] | None = None
    hash: Literal["maglev", "maglev_v2"] | None = None
    healthcheck: HealthCheck | None = Field(None, description="null removes the health check")


class RealPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: int | None = Field(None, ge=0, le=2**32 - 1)
    drain: bool | None = Field(None, description="true: no new flows (existing ones stay); weight kept")


class RealView(BaseModel):
    address: str
    weight: int
    drained: bool
    healthy: bool | None = Field(description="null if the VIP has no health check")
    effective_weight: int | None = Field(description="weight the ring is built with (0: out of the ring)")
    real_id: int | None


class RealOfVip(RealView):
    vip: str


class VipView(BaseModel):
    id: str = Field(description="address:port/protocol ([v6]:port/protocol)")
    address: str
    port: int
    protocol: str
    hash: str
    flags: list[str]
    healthcheck: HealthCheck | None
    vip_num: int | None
    reals: list[RealView]
    all_reals_down: bool


class VipStats(BaseModel):
    vip: str
    vip_num: int
    packets: int
    bytes: int


class RealStats(BaseModel):
    real: str
    real_id: int
    packets: int
    bytes: int


class StatsView(BaseModel):
    generation: int
    counters: dict[str, int]
    conn_table: dict[str, int]
    vips: list[VipStats]
    reals: list[RealStats]


class ConnEntryView(BaseModel):
    src: str
    dst: str
    sport: int
    dport: int
    protocol: str
    real_id: int
    real: str | None
    atime_ns: int


class ConnTableView(BaseModel):
    entries: int
    datapath: str
    sample: list[ConnEntryView]


class HealthView(BaseModel):
    vip: str
    real: str
    check: str
    port: int
    state: Literal["up", "down"]
    all_reals_down: bool
    on_all_down: str
    consecutive_successes: int | None = None
    consecutive_failures: int | None = None
    last_result: dict[str, Any] | None = None
    probing: bool | None = None
    totals: dict[str, int] | None = None


class SimulateView(BaseModel):
    action: str = Field(description="TX | PASS | DROP")
    real: str | None
    real_id: int | None
    vip: str | None
    note: str


class ConfigView(BaseModel):
    generation: int
    config: dict[str, Any]


_ACTIVE = "false while the real is down (health check) for every VIP it serves: the entry is then " \
          "left out of the datapath and its packets are hashed onto the healthy reals"


class QuicServerView(BaseModel):
    id: int = Field(description="QUIC server id, as the real embeds it in its connection ids")
    real: str
    real_id: int | None
    active: bool = Field(description=_ACTIVE)


class SourceRouteView(BaseModel):
    prefix: str = Field(description="client prefix, canonical (198.18.64.0/24, 2001:db8:5::/48)")
    real: str
    real_id: int | None
    active: bool = Field(description=_ACTIVE)


def _json_body_schema(name: str, array: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "array", "items": ref} if array else ref}}}}


def _responses(model: type[BaseModel] | None, *codes: int) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {}
    if model is not None:
        out[200] = {"model": model}
    for c in codes:
        out[c] = {"model": ErrorBody}
    return out


# --- helpers -----------------------------------------------------------------------------------


def _problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "(body)"
        ctx = e.get("ctx") or {}
        out.append((path, str(ctx["error"]) if e["type"] == "value_error" and "error" in ctx else e["msg"]))
    return out


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise Invalid([("(body)", "required: a JSON object")], "missing body")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise Invalid([("(body)", f"not valid JSON: {e}")], "invalid body") from None


def _if_match(request: Request) -> int | None:
    v = request.headers.get("if-match")
    if v is None:
        return None
    try:
        return int(v.strip().strip('"').removeprefix("W/").strip('"'))
    except ValueError:
        raise Invalid([("If-Match", f"must be a generation number (got {v!r})")], "invalid header") from None


def _etag(gen: int) -> dict[str, str]:
    return {"ETag": f'"{gen}"'}


_IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]}
# What lb.config's plain validators check, for readers of the document (and generators)
_REFINE = {
    ("Vip", "address"): _IP,
    ("Vip", "port"): {"type": "integer", "minimum": 0, "maximum": 65535, "description": "0 = any port"},
    ("Vip", "flags"): {"type": "array", "items": {"type": "string", "enum": list(C.VIP_FLAGS)}},
    ("Real", "address"): _IP,
    ("QuicServer", "id"): {"type": "integer", "minimum": 1, "maximum": C.MAX_QUIC_SERVER_ID},
    ("QuicServer", "real"): _IP,
    ("SourceRoute", "prefix"): {"type": "string", "description": "client prefix ADDRESS/LENGTH, host bits zero"},
    ("SourceRoute", "real"): _IP,
    ("Settings", "gateway_mac"): {"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"},
    ("Settings", "local_addresses"): {"type": "array", "items": _IP},
    ("GueSettings", "source_v4"): {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "null"}]},
    ("GueSettings", "source_v6"): {"anyOf": [{"type": "string", "format": "ipv6"}, {"type": "null"}]},
    ("HealthCheck", "port"): {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "null"}]},
    ("HealthCheck", "rise"): {"type": "integer", "minimum": 1, "maximum": 100},
    ("HealthCheck", "fall"): {"type": "integer", "minimum": 1, "maximum": 100},
    ("HealthCheck", "interval"): {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    ("HealthCheck", "timeout"): {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    ("FlowQuery", "src"): _IP,
    ("FlowQuery", "dst"): _IP,
}


def _refine(schemas: dict[str, Any]) -> None:
    for (model, prop), extra in _REFINE.items():
        props = schemas.get(model, {}).get("properties", {})
        if prop in props:
            keep = {k: v for k, v in props[prop].items() if k in ("title", "default", "description")}
            props[prop] = {**extra, **keep}


def create_app(
    controller: Controller,
    *,
    token: str | None = None,
    metrics: Metrics | None = None,
    health_details: Callable[[], dict[tuple[str, str], dict[str, Any]]] | None = None,
    info: dict[str, Any] | None = None,
) -> FastAPI:
    """The API over ``controller``. With ``token``, every request needs
    ``Authorization: Bearer <token>`` (TCP listeners); without, the listener itself must
    be private (the Unix socket, mode 0600)."""
    app = FastAPI(
        title="lb control plane",
        version=API_VERSION,
        description="VIPs, reals, health, stats and configuration of one load-balancer datapath. "
                    "See docs/api.md.",
    )
    ctl = controller
    metrics = metrics if metrics is not None else Metrics(ctl)
    app.state.controller = ctl
    app.state.metrics = metrics
    info = dict(info or {})

    @app.exception_handler(ControlError)
    async def _control_error(request: Request, exc: ControlError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            loc = [str(p) for p in e["loc"]]
            where = loc[0] if loc else ""
            path = ".".join(loc[1:]) or where
            problems.append({"path": path, "message": e["msg"]})
        msg = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
        return JSONResponse({"error": f"invalid request: {msg}", "kind": "invalid", "problems": problems},
                            status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "kind": "internal",
                             "problems": []}, status_code=500)

    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next: Any) -> Response:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return JSONResponse({"error": "missing or wrong bearer token", "kind": "unauthorized",
                                     "problems": [{"path": "Authorization", "message": "Bearer token required"}]},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    def key_of(address: str, port: str, protocol: str) -> tuple[str, int, str]:
        return parse_vip_key(address, port, protocol)

    VIP = "/v1/vips/{address}/{port}/{protocol}"

    # --- status ----------------------------------------------------------------------------

    @app.get("/v1/status", tags=["status"], summary="Daemon and datapath status")
    def status() -> dict[str, Any]:
        return {**info, **ctl.status()}

    # --- VIPs -----------------------------------------------------------------------------------

    @app.get("/v1/vips", tags=["vips"], summary="List VIPs", responses=_responses(None),
             response_model=list[VipView])
    def list_vips() -> JSONResponse:
        with ctl.lock:
            gen, body = ctl.generation, ctl.list_vips()
        return JSONResponse(body, headers=_etag(gen))

    @app.post("/v1/vips", tags=["vips"], summary="Create a VIP", status_code=201,
              openapi_extra=_json_body_schema("Vip"), responses={201: {"model": VipView},
                                                                 **_responses(None, 409, 412, 422, 503)})
    async def create_vip(request: Request) -> JSONResponse:
        body = await _json(request)
        key, res = await run_in_threadpool(ctl.create_vip, body, _if_match(request))
        view = await run_in_threadpool(ctl.vip_view, key)
        return JSONResponse(view, status_code=201, headers={**_etag(res.generation),
                                                            "Location": f"/v1/vips/{key[0]}/{key[1]}/{key[2]}"})

    @app.get(VIP, tags=["vips"], summary="Get a VIP", responses=_responses(VipView, 404, 422))
    def get_vip(address: str, port: str, protocol: str) -> JSONResponse:
        key = key_of(address, port, protocol)
        with ctl.lock:
            gen, view = ctl.generation, ctl.vip_view(key)
        return JSONResponse(view, headers=_etag(gen))

    @app.patch(VIP, tags=["vips"], summary="Change a VIP's flags, hash or health check",
               openapi_extra=_json_body_schema("VipPatch"), responses=_responses(VipView, 404, 409, 412, 422, 503))
    async def patch_vip(address: str, port: str, protocol: str, request: Request) -> JSONResponse:
        key = key_of(address, port, protocol)
        body = await _json(request)
        res = await run_in_threadpool(ctl.update_vip, key, body, _if_match(request))
        return JSONResponse(await run_in_threadpool(ctl.vip_view, key), headers=_etag(res.generation))

    @app.delete(VIP, tags=["vips"], summary="Delete a VIP", status_code=204,
                responses=_responses(None, 404, 412, 422, 503))
    async def delete_vip(address: str, port: str, protocol: str, request: Request) -> Response:
        key = key_of(address, port, protocol)
        res = await run_in_threadpool(ctl.delete_vip, key, _if_match(request))
        return Response(status_code=204, headers=_etag(res.generation))

    # --- reals -------------------------------------------------------------------------------------

    @app.get(VIP + "/reals", tags=["reals"], summary="List a VIP's reals",
             responses=_responses(None, 404, 422), response_model=list[RealView])
    def list_reals(address: str, port: str, protocol: str) -> JSONResponse:
        key = key_of(address, port, protocol)
        with ctl.lock:
            gen, view = ctl.generation, ctl.vip_view(key)
        return JSONResponse(view["reals"], headers=_etag(gen))

    @app.post(VIP + "/reals", tags=["reals"], summary="Add a real to a VIP", status_code=201,
              openapi_extra=_json_body_schema("Real"),
              responses={201: {"model": RealOfVip}, **_responses(None, 404, 409, 412, 422, 503)})
    async def add_real(address: str, port: str, protocol: str, request: Request) -> JSONResponse:
        key = key_of(address, port, protocol)
        body = await _json(request)
        addr, res = await run_in_threadpool(ctl.add_real, key, body, _if_match(request))
        return JSONResponse(await run_in_threadpool(ctl.real_view, key, addr), status_code=201,
                            headers=_etag(res.generation))

    @app.get(VIP + "/reals/{real}", tags=["reals"], summary="Get one real of a VIP",
             responses=_responses(RealOfVip, 404, 422))
    def get_real(address: str, port: str, protocol: str, real: str) -> JSONResponse:
        key = key_of(address, port, protocol)
        addr = parse_real_address(real)
        with ctl.lock:
            gen, view = ctl.generation, ctl.real_view(key, addr)
        return JSONResponse(view, headers=_etag(gen))

    @app.patch(VIP + "/reals/{real}", tags=["reals"], summary="Set a real's weight, drain or undrain it",
               openapi_extra=_json_body_schema("RealPatch"),
               responses=_responses(RealOfVip, 404, 409, 412, 422, 503))
    async def patch_real(address: str, port: str, protocol: str, real: str, request: Request) -> JSONResponse:
        key = key_of(address, port, protocol)
        addr = parse_real_address(real)
        body = await _json(request)
        res = await run_in_threadpool(ctl.update_real, key, addr, body, _if_match(request))
        return JSONResponse(await run_in_threadpool(ctl.real_view, key, addr), headers=_etag(res.generation))

    @app.delete(VIP + "/reals/{real}", tags=["reals"], summary="Remove a real from a VIP", status_code=204,
                responses=_responses(None, 404, 412, 422, 503))
    async def delete_real(address: str, port: str, protocol: str, real: str, request: Request) -> Response:
        key = key_of(address, port, protocol)
        addr = parse_real_address(real)
        res = await run_in_threadpool(ctl.remove_real, key, addr, _if_match(request))
        return Response(status_code=204, headers=_etag(res.generation))

    # --- QUIC server ids and source routes -------------------------------------------------------------

    def routing_endpoints(section: str, base: str, model: str, view: type[BaseModel], what: str,
                          location: Callable[[Any], str]) -> None:
        """GET/PUT the whole table, POST one entry."""
        tag = base.rsplit("/", 1)[1]

        @app.get(base, tags=[tag], summary=f"List the {what}", response_model=list[view])
        def list_all() -> JSONResponse:
            with ctl.lock:
                gen, body = ctl.generation, ctl.routing_view(section)
            return JSONResponse(body, headers=_etag(gen))

        @app.put(base, tags=[tag], summary=f"Replace the whole table of {what}",
                 openapi_extra=_json_body_schema(model, array=True),
                 responses={200: {"model": list[view]}, **_responses(None, 409, 412, 422, 503)})
        async def replace(request: Request) -> JSONResponse:
            body = await _json(request)
            res = await run_in_threadpool(ctl.replace_routing, section, body, _if_match(request))
            return JSONResponse(await run_in_threadpool(ctl.routing_view, section), headers=_etag(res.generation))

        @app.post(base, tags=[tag], summary=f"Add one of the {what}", status_code=201,
                  openapi_extra=_json_body_schema(model),
                  responses={201: {"model": view}, **_responses(None, 409, 412, 422, 503)})
        async def add(request: Request) -> JSONResponse:
            body = await _json(request)
            key, res = await run_in_threadpool(ctl.add_routing, section, body, _if_match(request))
            return JSONResponse(await run_in_threadpool(ctl.routing_view, section, key), status_code=201,
                                headers={**_etag(res.generation), "Location": location(key)})

    routing_endpoints("quic_servers", "/v1/quic-servers", "QuicServer", QuicServerView,
                      "QUIC server ids (id -> real)", lambda key: f"/v1/quic-servers/{key}")
    routing_endpoints("source_routes", "/v1/source-routes", "SourceRoute", SourceRouteView,
                      "source routes (client prefix -> real)", lambda key: f"/v1/source-routes/{key}")

    def routing_entry(section: str, key: Any) -> JSONResponse:
        with ctl.lock:
            gen, body = ctl.generation, ctl.routing_view(section, key)
        return JSONResponse(body, headers=_etag(gen))

    async def routing_delete(section: str, key: Any, request: Request) -> Response:
        res = await run_in_threadpool(ctl.delete_routing, section, key, _if_match(request))
        return Response(status_code=204, headers=_etag(res.generation))

    QUIC_ID = "/v1/quic-servers/{id}"
    ROUTE = "/v1/source-routes/{address}/{length}"  # the prefix as two segments: 198.18.64.0/24

    @app.get(QUIC_ID, tags=["quic-servers"], summary="Get one QUIC server id",
             responses=_responses(QuicServerView, 404, 422))
    def get_quic_server(id: str) -> JSONResponse:
        return routing_entry("quic_servers", parse_quic_id(id))

    @app.delete(QUIC_ID, tags=["quic-servers"], summary="Delete a QUIC server id", status_code=204,
                responses=_responses(None, 404, 412, 422, 503))
    async def delete_quic_server(id: str, request: Request) -> Response:
        return await routing_delete("quic_servers", parse_quic_id(id), request)

    @app.get(ROUTE, tags=["source-routes"], summary="Get one source route",
             responses=_responses(SourceRouteView, 404, 422))
    def get_source_route(address: str, length: str) -> JSONResponse:
        return routing_entry("source_routes", parse_prefix(f"{address}/{length}"))

    @app.delete(ROUTE, tags=["source-routes"], summary="Delete a source route", status_code=204,
                responses=_responses(None, 404, 412, 422, 503))
    async def delete_source_route(address: str, length: str, request: Request) -> Response:
        return await routing_delete("source_routes", parse_prefix(f"{address}/{length}"), request)

    # --- stats ----------------------------------------------------------------------------------------

    @app.get("/v1/stats", tags=["stats"], summary="All counters: global, per VIP, per real, conn table",
             responses=_responses(StatsView))
    def stats() -> JSONResponse:
        return JSONResponse(ctl.stats())

    @app.get("/v1/stats/global", tags=["stats"], summary="Datapath counters")
    def stats_global() -> dict[str, Any]:
        s = ctl.stats()
        return {"counters": s["counters"], "conn_table": s["conn_table"]}

    @app.get("/v1/stats/vips", tags=["stats"], summary="Packets and bytes per VIP",
             response_model=list[VipStats])
    def stats_vips() -> JSONResponse:
        return JSONResponse(ctl.stats()["vips"])

    @app.get("/v1/stats/reals", tags=["stats"], summary="Packets and bytes per real",
             response_model=list[RealStats])
    def stats_reals() -> JSONResponse:
        return JSONResponse(ctl.stats()["reals"])

    @app.get("/v1/stats/conntable", tags=["stats"], summary="Connection-table size and a sample of entries",
             responses=_responses(ConnTableView, 422))
    def conntable(limit: int = Query(100, ge=0, le=100000, description="entries to list")) -> JSONResponse:
        return JSONResponse(ctl.conn_table(limit))

    # --- health -----------------------------------------------------------------------------------------

    @app.get("/v1/health", tags=["health"], summary="Health-check state of every checked real",
             response_model=list[HealthView])
    def health() -> JSONResponse:
        rows = ctl.health()
        details = health_details() if health_details is not None else {}
        out = []
        for r in rows:
            d = details.get((r["vip"], r["real"]), {})
            out.append({**r, **{k: d[k] for k in ("consecutive_successes", "consecutive_failures",
                                                  "last_result", "probing", "totals") if k in d}})
        return JSONResponse(out)

    # --- simulate -------------------------------------------------------------------------------------

    @app.post("/v1/simulate", tags=["simulate"], summary="Where does this flow go? (a new flow, now)",
              openapi_extra=_json_body_schema("FlowQuery"), responses=_responses(SimulateView, 422))
    async def simulate(request: Request) -> JSONResponse:
        body = await _json(request)
        try:
            q = FlowQuery.model_validate(body)
            frame = flow_frame(q)
        except ValidationError as e:
            raise Invalid(_problems_of(e), "invalid flow") from None
        except ValueError as e:
            raise Invalid([("dst", str(e))], "invalid flow") from None

        def run() -> dict[str, Any]:
            sim = ctl.simulator()
            v = sim.run(frame)
            rid = None
            if v.real is not None:
                rid = ctl.state.ids.reals.get(v.real)
            vip = None
            for cand in ((q.dst, q.dport, q.protocol), (q.dst, 0, q.protocol)):
                if cand in ctl.state.ids.vips:
                    vip = vip_label(cand)
                    break
            note = ("a new flow, on the current rings (health and drain applied); an established flow "
                    "follows the connection table")
            return {"action": v.action, "real": v.real, "real_id": rid, "vip": vip, "note": note}

        return JSONResponse(await run_in_threadpool(run))

    # --- config -----------------------------------------------------------------------------------------

    @app.get("/v1/config", tags=["config"], summary="Export the desired config (JSON, or YAML with ?format=yaml)",
             responses=_responses(ConfigView))
    def export_config(format: Literal["json", "yaml"] = "json") -> Response:  # noqa: A002
        if format == "yaml":
            gen, text = ctl.export_yaml()
            return PlainTextResponse(text, media_type="application/yaml", headers=_etag(gen))
        gen, cfg = ctl.export_config()
        return JSONResponse({"generation": gen, "config": cfg}, headers=_etag(gen))

    @app.put("/v1/config", tags=["config"], summary="Replace the whole config (sizes must stay)",
             openapi_extra=_json_body_schema("Config"), responses=_responses(ConfigView, 409, 412, 422, 503))
    async def put_config(request: Request) -> JSONResponse:
        body = await _json(request)
        res = await run_in_threadpool(ctl.replace_config, body, _if_match(request))
        gen, cfg = ctl.export_config()
        return JSONResponse({"generation": gen, "config": cfg}, headers=_etag(res.generation))

    # --- metrics ----------------------------------------------------------------------------------------

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # --- OpenAPI: the request-body schemas are lb.config's own models --------------------------------

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in (Vip, Real, Config, QuicServer, SourceRoute, VipPatch, RealPatch,
                                         FlowQuery)],
            ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, s in defs.get("$defs", {}).items():
            comps.setdefault(name, s)
        _refine(comps)
        if token is not None:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
