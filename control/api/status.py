"""``/v1/status`` (the daemon and its datapath) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from control.metrics import CONTENT_TYPE, Metrics
from control.views import Views

__all__ = ["status_router", "metrics_router"]


def status_router(views: Views, info: dict[str, Any]) -> APIRouter:
    """``info``: what the daemon adds about itself (interface, pid, state directory...)."""
    router = APIRouter(tags=["status"])

    @router.get("/v1/status", summary="Daemon and datapath status")
    def status() -> dict[str, Any]:
        return {**info, **views.status()}

    return router


def metrics_router(metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router
