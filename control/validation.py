"""Validation of changes to the desired state, beyond what lb.config's models check on
their own: one VIP against its settings, table limits, routing entries left without their
real, and the paths of problems made relative to the request body that caused them.

Pure functions over configs; every problem is an :class:`~control.errors.Invalid` (422) or
a :class:`~control.errors.Conflict` (409) naming the field."""

from __future__ import annotations

from typing import Any

from control.errors import Conflict, Invalid, NotFound
from control.ids import VipKey
from control.store import DesiredState
from control.tables import vip_label
from lb.config import Config, ConfigError, parse_config

__all__ = ["extra_checks", "find_vip", "check_vip", "check_limits", "with_vips", "with_routing",
           "vip_fields", "same_names", "refuse_dangling"]


def extra_checks(cfg: Config) -> list[tuple[str, str]]:
    """Checks lb.config can't make because they span its model and the health-check one."""
    out = []
    for i, vip in enumerate(cfg.vips):
        hc = vip.healthcheck
        if hc is not None and hc.port_for(vip.port) is None:
            out.append((f"vips[{i}].healthcheck.port", "required: the VIP's port is 0 (any port)"))
    return out


def _relative(problems: list[tuple[str, str]], sub: str | None = None) -> list[tuple[str, str]]:
    """Paths of a one-VIP config (vips[0]...) made relative to the request body; with
    ``sub`` (e.g. 'reals[3]'), relative to that part of the VIP."""
    out = []
    for path, msg in problems:
        if path == "vips":
            path = "reals"  # a limit of the one-VIP config: too many reals in it
        elif path.startswith("vips[0]."):
            path = path[len("vips[0]."):]
        elif path == "vips[0]":
            path = "(body)"
        if sub is not None:
            if path.startswith(sub + "."):
                path = path[len(sub) + 1:]
            elif path == sub:
                path = "(body)"
        out.append((path, msg))
    return out


def _routing_problems(problems: list[tuple[str, str]], section: str, index: int | None
                      ) -> list[tuple[str, str]]:
    """Paths of a whole-config validation made relative to a routing request's body:
    ``quic_servers[3].real`` -> ``[3].real`` (a whole table) or, for the one entry at
    ``index`` (an added entry), ``real``."""
    out = []
    for path, msg in problems:
        if index is not None:
            one = f"{section}[{index}]"
            if path == one:
                path = "(body)"
            elif path.startswith(one + "."):
                path = path[len(one) + 1:]
        elif path == section:
            path = "(body)"
        elif path.startswith(section + "["):
            path = path[len(section):]
        out.append((path, msg))
    return out


def find_vip(state: DesiredState, key: VipKey) -> tuple[int, Any]:
    """(index, VIP) of ``key`` in ``state``; NotFound if absent."""
    for i, v in enumerate(state.config.vips):
        if v.key == key:
            return i, v
    raise NotFound(f"no VIP {vip_label(key)}")


def check_vip(settings: Any, data: Any, sub: str | None = None, what: str = "invalid VIP") -> Any:
    """``data`` (a VIP as a dict) validated as a one-VIP config under ``settings``; the
    problems' paths relative to the request body (to its part ``sub``)."""
    try:
        one = parse_config({"settings": settings, "vips": [data]})
    except ConfigError as e:
        raise Invalid(_relative(e.errors, sub), what) from None
    problems = extra_checks(one)
    if problems:
        raise Invalid(_relative(problems, sub), what)
    return one.vips[0]


def check_limits(settings: Any, vips: list[Any]) -> None:
    """Conflict if ``vips`` need more VIP numbers or real ids than the datapath has."""
    if len(vips) > settings.max_vips:
        raise Conflict(f"vips: {len(vips)} VIPs but settings.max_vips is {settings.max_vips}",
                       [("vips", "table full")])
    n = len({r.address for v in vips for r in v.reals})
    if n > settings.max_reals - 1:
        raise Conflict(f"vips: {n} distinct real addresses but settings.max_reals = "
                       f"{settings.max_reals} allows {settings.max_reals - 1} (ids 1..max_reals-1)",
                       [("reals", "table full")])


def with_vips(base: Config, vips: list[Any]) -> Config:
    """``base`` with other (already validated) VIPs; the routing tables are kept (a change
    that would leave one of their entries without its real is refused by
    :func:`refuse_dangling`)."""
    return Config.model_construct(settings=base.settings, vips=vips, quic_servers=base.quic_servers,
                                  source_routes=base.source_routes)


def with_routing(state: DesiredState, section: str, items: Any, index: int | None, what: str) -> Config:
    """The config of ``state`` with ``section`` replaced by ``items``, validated by
    lb.config as a whole (the VIP models are reused, not re-validated)."""
    cfg = state.config
    data = {"settings": cfg.settings, "vips": list(cfg.vips), "quic_servers": list(cfg.quic_servers),
            "source_routes": list(cfg.source_routes)}
    data[section] = items
    try:
        return parse_config(data)
    except ConfigError as e:
        raise Invalid(_routing_problems(e.errors, section, index), what) from None


def vip_fields(vip: Any) -> dict[str, Any]:
    """A VIP as a dict whose nested models are the (already valid) instances."""
    return {"address": vip.address, "port": vip.port, "protocol": vip.protocol, "hash": vip.hash,
            "flags": list(vip.flags), "reals": list(vip.reals), "healthcheck": vip.healthcheck}


def same_names(old: Config, new: Config) -> bool:
    """Same VIP keys and, per VIP, the same real addresses (weights, flags, health checks
    may differ)? Cheap when most VIP objects are shared between the two configs."""
    if len(old.vips) != len(new.vips) or old.settings.max_reals != new.settings.max_reals \
            or old.settings.max_vips != new.settings.max_vips:
        return False
    before = {v.key: v for v in old.vips}
    for v in new.vips:
        o = before.get(v.key)
        if o is None:
            return False
        if o is not v and [r.address for r in o.reals] != [r.address for r in v.reals]:
            return False
    return True


def refuse_dangling(cfg: Config) -> None:
    """Conflict naming every QUIC server id / source route whose real no VIP has any more
    (the change removed it): the operator removes those entries first."""
    reals = {r.address for v in cfg.vips for r in v.reals}
    problems = [(f"quic_servers[{i}]", f"id {q.id} -> {q.real}") for i, q in enumerate(cfg.quic_servers)
                if q.real not in reals]
    problems += [(f"source_routes[{i}]", f"{r.prefix} -> {r.real}") for i, r in enumerate(cfg.source_routes)
                 if r.real not in reals]
    if problems:
        gone = sorted({m.rsplit(" -> ", 1)[1] for _, m in problems})
        raise Conflict(f"{', '.join(gone)} would no longer be a real of any VIP but "
                       f"{'; '.join(f'{p} ({m})' for p, m in problems)} still point at it: delete those "
                       "entries first (DELETE /v1/quic-servers/ID, /v1/source-routes/PREFIX)", problems)
