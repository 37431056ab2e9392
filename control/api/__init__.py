"""The REST API (FastAPI). Documented in docs/api.md; the OpenAPI document is at
``/openapi.json``.

One router per resource (:mod:`.vips`, :mod:`.reals`, :mod:`.routing`, :mod:`.stats`,
:mod:`.config`, :mod:`.simulate`, :mod:`.status`), assembled by :func:`create_app` with
the error handlers and the bearer-token check.

Request bodies are read as JSON and validated by the commands through lb.config's
models, so the API accepts exactly what a config file accepts and its errors name the
field the same way. Errors are ``{"error": "...", "kind": "...", "problems": [{"path",
"message"}]}`` with 4xx for the caller's fault (422 invalid, 404 unknown, 409 conflict,
412 stale If-Match, 401 missing token, 413 body over the cap) and 5xx for ours (503: a
datapath write or the state file failed and the change was undone; 500: a bug). A 5xx
says what failed in a fixed sentence and ``request_id``; the exception itself goes to the
log under that id (:mod:`.guards` gives every request one, in ``X-Request-Id``). List
endpoints are paged (``?limit=`` up to 1000, ``?offset=``).

Every change answers with the new generation in ``ETag``; sending ``If-Match: <gen>``
makes a change conditional on nobody having changed anything since.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from control.api.config import config_router
from control.api.guards import (
    MAX_BODY_BYTES,
    REQUEST_ID_HEADER,
    RequestGuard,
    request_id,
)
from control.api.openapi import openapi_document
from control.api.reals import reals_router
from control.api.routing import quic_servers_router, source_routes_router
from control.api.simulate import simulate_router
from control.api.stats import HealthDetails, health_router, stats_router
from control.api.status import metrics_router, status_router
from control.api.vips import vips_router
from control.errors import ControlError, SystemError_
from control.metrics import Metrics
from control.plane import ControlPlane

__all__ = ["API_VERSION", "create_app"]

log = logging.getLogger("lb.api")
API_VERSION = "1"


def _server_error(request: Request, status: int, kind: str, public: str, exc: BaseException, detail: str
                  ) -> JSONResponse:
    """A 5xx: the exception goes to the log under the request id; the caller gets the id
    and ``public``, never exception text."""
    rid = request_id(request)
    log.error("request %s: %s %s failed (%s): %s", rid, request.method, request.url.path, kind, detail,
              exc_info=(type(exc), exc, exc.__traceback__))
    return JSONResponse({"error": public, "kind": kind, "problems": [], "request_id": rid},
                        status_code=status, headers={REQUEST_ID_HEADER: rid})


async def _control_error(request: Request, exc: ControlError) -> JSONResponse:
    if isinstance(exc, SystemError_):
        return _server_error(request, exc.status, exc.kind, exc.public, exc, exc.message)
    return JSONResponse(exc.to_json(), status_code=exc.status)


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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own answers (no route matches the path, e.g. a CIDR VIP's port that is
    # not a number; method not allowed) in the API's error body, as every other refusal
    kind = "not_found" if exc.status_code == 404 else "invalid"
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}", "kind": kind,
                         "problems": []}, status_code=exc.status_code, headers=exc.headers)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # runs in Starlette's outermost middleware, outside RequestGuard: the header is set here
    return _server_error(request, 500, "internal", SystemError_.public, exc, f"{type(exc).__name__}: {exc}")


def _require_bearer(app: FastAPI, token: str) -> None:
    """Refuse (401) every request without ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            return JSONResponse({"error": "missing or wrong bearer token", "kind": "unauthorized",
                                 "problems": [{"path": "Authorization", "message": "Bearer token required"}]},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


def create_app(
    plane: ControlPlane,
    *,
    token: str | None = None,
    metrics: Metrics | None = None,
    health_details: HealthDetails | None = None,
    info: dict[str, Any] | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The API over ``plane``'s commands and views. With ``token``, every request needs
    ``Authorization: Bearer <token>`` (TCP listeners); without, the listener itself must
    be private (the Unix socket, mode 0600). Bodies over ``max_body`` bytes: 413."""
    app = FastAPI(
        title="lb control plane",
        version=API_VERSION,
        description="VIPs, reals, health, stats and configuration of one load-balancer datapath. "
                    "See docs/api.md.",
    )
    app.add_exception_handler(ControlError, _control_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)
    if token is not None:
        _require_bearer(app, token)
    app.add_middleware(RequestGuard, max_body=max_body)  # outermost: before the token check

    commands, views = plane.commands, plane.views
    for router in (status_router(views, dict(info or {})), vips_router(commands, views),
                   reals_router(commands, views), quic_servers_router(commands, views),
                   source_routes_router(commands, views), stats_router(views), health_router(views, health_details),
                   simulate_router(views), config_router(commands, views),
                   metrics_router(metrics if metrics is not None else Metrics(plane.core))):
        app.include_router(router)
    app.openapi = lambda: openapi_document(app, bearer=token is not None)  # type: ignore[method-assign]
    return app
