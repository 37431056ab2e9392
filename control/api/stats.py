"""``/v1/stats``: datapath counters, per VIP, per real, the connection table; and
``/v1/health``: the health-check state of every checked real."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from control.api.http import page_params, paged, responses
from control.api.models import ConnTableView, HealthView, RealStats, StatsView, VipStats
from control.views import Views

__all__ = ["stats_router", "health_router", "HealthDetails"]

# the health runner's per-target details, keyed (VIP label, real address)
HealthDetails = Callable[[], dict[tuple[str, str], dict[str, Any]]]
_DETAILS = ("consecutive_successes", "consecutive_failures", "last_result", "probing", "totals")


def stats_router(views: Views) -> APIRouter:
    router = APIRouter(tags=["stats"])

    @router.get("/v1/stats", summary="All counters: global, per VIP, per real, conn table",
                responses=responses(StatsView))
    def stats() -> JSONResponse:
        return JSONResponse(views.stats())

    @router.get("/v1/stats/global", summary="Datapath counters")
    def stats_global() -> dict[str, Any]:
        s = views.stats()
        return {"counters": s["counters"], "conn_table": s["conn_table"]}

    @router.get("/v1/stats/vips", summary="Packets and bytes per VIP (paged)", response_model=list[VipStats],
                responses=responses(None, 422))
    def stats_vips(request: Request, page: tuple[int, int] = Depends(page_params)) -> JSONResponse:
        return paged(request, views.stats()["vips"], page)

    @router.get("/v1/stats/reals", summary="Packets and bytes per real (paged)", response_model=list[RealStats],
                responses=responses(None, 422))
    def stats_reals(request: Request, page: tuple[int, int] = Depends(page_params)) -> JSONResponse:
        return paged(request, views.stats()["reals"], page)

    @router.get("/v1/stats/conntable", summary="Connection-table size and a sample of entries",
                responses=responses(ConnTableView, 422))
    def conntable(limit: int = Query(100, ge=0, le=100000, description="entries to list")) -> JSONResponse:
        return JSONResponse(views.conn_table(limit))

    return router


def health_router(views: Views, details: HealthDetails | None) -> APIRouter:
    """``details``: the health runner's counters and last results, merged into each row."""
    router = APIRouter(tags=["health"])

    @router.get("/v1/health", summary="Health-check state of every checked real (paged)",
                response_model=list[HealthView], responses=responses(None, 422))
    def health(request: Request, page: tuple[int, int] = Depends(page_params)) -> JSONResponse:
        rows = views.health()
        more = details() if details is not None else {}
        out = []
        for r in rows:
            d = more.get((r["vip"], r["real"]), {})
            out.append({**r, **{k: d[k] for k in _DETAILS if k in d}})
        return paged(request, out, page)

    return router
