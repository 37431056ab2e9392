"""The ``healthcheck`` section of a VIP: what to probe, how often, when to change state.

Part of the config model: :class:`lb.config.Vip` carries it as an optional field, so
this module depends on pydantic only (lb.config imports it). The control plane runs the
probes (control/health_probing.py). The models follow
lb.config's conventions: unknown keys are errors, numbers must be numbers, range
errors show both ends (``must be 1..100 (got 0)``), and lb.config's error converter
turns every problem into ``vips[i].healthcheck.<field>: <message>``.

Example::

    healthcheck:
      type: http          # tcp | http | udp
      port: 8080          # default: the VIP's port (required if the VIP's port is 0)
      interval: 2         # seconds between probes of one real
      timeout: 1          # seconds; <= interval
      rise: 2             # consecutive successes that bring a down real back
      fall: 3             # consecutive failures that take an up real out of the ring
      http: {path: /healthz, expect_status: [200], host: www.example.org}
      on_all_down: fail_open   # fail_open (keep every real, default) | drop
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainValidator, model_validator

__all__ = ["HealthCheck", "HttpCheck", "UdpCheck", "MAX_INTERVAL", "MAX_PAYLOAD"]

MAX_INTERVAL = 3600.0  # seconds; longer than this is not a health check
MAX_PAYLOAD = 1400  # bytes of a UDP probe or of an expected response substring

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def int_range(lo: int, hi: int) -> AfterValidator:
    """A range check whose message shows both ends: ``must be 0..65535 (got 70000)``
    (lb.config uses it too)."""

    def check(v: int) -> int:
        if not lo <= v <= hi:
            raise ValueError(f"must be {lo}..{hi} (got {v})")
        return v

    return AfterValidator(check)


def _seconds(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        shown = repr(v) if isinstance(v, str) else type(v).__name__
        raise ValueError(f"must be a number of seconds (got {shown})")
    if not 0 < v <= MAX_INTERVAL or v != v:
        raise ValueError(f"must be a number of seconds in (0, {MAX_INTERVAL:g}] (got {v!r})")
    return float(v)


def _http_path(v: str) -> str:
    if not v.startswith("/") or any(c in v for c in " \r\n\t"):
        raise ValueError(f"must start with '/' and contain no spaces or line breaks (got {v!r})")
    if len(v) > 1024:
        raise ValueError("must be at most 1024 characters")
    return v


def _http_host(v: str | None) -> str | None:
    if v is not None and (not v or any(c in v for c in " \r\n\t/")):
        raise ValueError(f"must be a host name without spaces or '/' (got {v!r})")
    return v


def _statuses(v: list[int]) -> list[int]:
    if not v:
        raise ValueError("must list at least one status")
    for s in v:
        if not 100 <= s <= 599:
            raise ValueError(f"HTTP statuses must be 100..599 (got {s})")
    if len(set(v)) != len(v):
        raise ValueError("lists a status twice")
    return v


def _payload(v: str) -> str:
    if len(v.encode()) > MAX_PAYLOAD:
        raise ValueError(f"must be at most {MAX_PAYLOAD} bytes (UTF-8)")
    return v


Seconds = Annotated[float, PlainValidator(_seconds, json_schema_input_type=float)]


class HttpCheck(BaseModel):
    """HTTP/1.0 GET ``path``; success is a response whose status is in ``expect_status``."""

    model_config = _STRICT

    path: Annotated[str, AfterValidator(_http_path)] = "/"
    host: Annotated[str | None, AfterValidator(_http_host)] = None  # Host header; default: the real's address
    expect_status: Annotated[list[int], AfterValidator(_statuses)] = [200]


class UdpCheck(BaseModel):
    """Send ``send`` (UTF-8) in one datagram; success is a reply within the timeout that
    contains ``expect`` (any reply if ``expect`` is not set)."""

    model_config = _STRICT

    send: Annotated[str, AfterValidator(_payload)] = ""
    expect: Annotated[str | None, AfterValidator(lambda v: v if v is None else _payload(v))] = None


class HealthCheck(BaseModel):
    """How the reals of one VIP are probed and when they change state."""

    model_config = _STRICT

    type: Literal["tcp", "http", "udp"]
    port: Annotated[int, int_range(1, 65535)] | None = None  # default: the VIP's port
    interval: Seconds = 2.0
    timeout: Seconds = 1.0
    rise: Annotated[int, int_range(1, 100)] = 2
    fall: Annotated[int, int_range(1, 100)] = 3
    http: HttpCheck | None = None  # type http only; default HttpCheck()
    udp: UdpCheck | None = None  # type udp only; default UdpCheck()
    on_all_down: Literal["fail_open", "drop"] = "fail_open"

    @model_validator(mode="after")
    def _check(self) -> HealthCheck:
        if self.timeout > self.interval:
            raise ValueError(f"timeout ({self.timeout:g} s) must be <= interval ({self.interval:g} s)")
        if self.http is not None and self.type != "http":
            raise ValueError(f"'http' settings given but type is {self.type!r}")
        if self.udp is not None and self.type != "udp":
            raise ValueError(f"'udp' settings given but type is {self.type!r}")
        return self

    def port_for(self, vip_port: int) -> int | None:
        """The port probed on each real: ``port``, else the VIP's port (None if both are 0/unset)."""
        return self.port if self.port is not None else (vip_port or None)

    @property
    def http_settings(self) -> HttpCheck:
        return self.http or HttpCheck()

    @property
    def udp_settings(self) -> UdpCheck:
        return self.udp or UdpCheck()
