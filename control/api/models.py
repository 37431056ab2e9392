"""The API's documentation models: the shapes of its responses and of the bodies that
lb.config's models don't describe. Requests are validated by the commands (through
lb.config); responses are checked against these models in tests/test_control_api.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lb.healthcheck_config import HealthCheck

__all__ = ["Problem", "ErrorBody", "VipPatch", "RealPatch", "RealView", "RealOfVip", "VipView", "VipStats",
           "RealStats", "StatsView", "ConnEntryView", "ConnTableView", "HealthView", "SimulateView",
           "ConfigView", "QuicServerView", "SourceRouteView"]


class Problem(BaseModel):
    path: str = Field(description="the field, relative to the request body ('(body)' for the whole body)")
    message: str


class ErrorBody(BaseModel):
    error: str = Field(description="one line naming the fields")
    kind: str = Field(description="invalid | not_found | conflict | precondition_failed | unauthorized | "
                                  "bad_request | too_large | datapath | persist | internal")
    problems: list[Problem]
    request_id: str | None = Field(None, description="5xx only: the id of the log line that tells what failed "
                                                     "(also the X-Request-Id header of every response)")


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
    lru_misses: int = Field(description="connection-table misses that sent a new flow to this real (all VIPs)")


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

