"""Commands: every change to the desired state, validated and applied as one unit.

Every change follows the same path, under the core's lock:

1. validate the request through lb.config's models (a VIP is checked with
   :func:`lb.config.parse_config` on its own, then against the other VIPs: duplicates
   and table limits; a whole config is parsed whole; :mod:`control.validation`).
   Problems name the field of the request (:class:`~control.errors.Invalid`, 422) or the
   conflict (409);
2. number it (:func:`control.ids.allocate`: existing numbers kept) and build the desired
   tables (:func:`control.tables.build_tables`: only changed rings are rebuilt);
3. plan the writes against the datapath's current contents and apply them
   (:meth:`control.core.Core.write`); a failed write undoes the others (503);
4. save the new desired state atomically; if that fails, undo the writes (503);
5. only then make it current and answer. A request that fails changes nothing.

The clock that times a change is handed in (:class:`Commands` reads none of its own).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from control.core import Core
from control.errors import Conflict, Invalid, NotFound, PersistFailure, PreconditionFailed
from control.ids import AllocationError, VipKey, allocate
from control.keys import ROUTING_SECTIONS, routing_key
from control.store import DesiredState
from control.tables import vip_label
from control.validation import (
    check_limits,
    check_vip,
    extra_checks,
    find_vip,
    refuse_dangling,
    same_names,
    vip_fields,
    with_routing,
    with_vips,
)
from lb.config import Config, ConfigError, parse_config

__all__ = ["Commands", "ChangeResult", "VIP_PATCHABLE", "REAL_PATCHABLE"]

log = logging.getLogger("lb.control")

VIP_PATCHABLE = ("flags", "hash", "healthcheck")
REAL_PATCHABLE = ("weight", "drain")
Make = Callable[[DesiredState], tuple[Config, frozenset]]  # current state -> (new config, new drained)


@dataclass(frozen=True)
class ChangeResult:
    generation: int
    writes: dict[str, int]  # the plan's summary
    seconds: float


def _counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Count a change request that is refused or fails (metrics: lb_control_changes_total)."""

    @functools.wraps(fn)
    def wrapper(self: Commands, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            with self.core.lock:
                self.core.counters["changes_failed"] += 1
            raise

    return wrapper


class Commands:
    """The changes to the desired state of ``core``; each all-or-nothing. ``clock``
    (seconds, monotonic) times them for the log and :class:`ChangeResult`."""

    def __init__(self, core: Core, clock: Callable[[], float]) -> None:
        self.core = core
        self.clock = clock

    def _commit(self, make: Make, what: str, if_match: int | None = None) -> ChangeResult:
        core = self.core
        with core.lock:
            t0 = self.clock()
            if if_match is not None and if_match != core.state.generation:
                raise PreconditionFailed(f"generation is {core.state.generation}, not {if_match}")
            old = core.state
            cfg, drained = make(old)
            refuse_dangling(cfg)
            s = cfg.settings
            if same_names(old.config, cfg):
                ids = old.ids  # no VIP or real address came or went: every number stays
            else:
                try:
                    ids = allocate(old.ids, [v.key for v in cfg.vips],
                                   [r.address for v in cfg.vips for r in v.reals], s.max_vips, s.max_reals)
                except AllocationError as e:
                    raise Conflict(str(e)) from None
            new = DesiredState(cfg, ids, drained, old.generation + 1, old.seed_digest)
            tables = core.build(new, core.tables)
            # the stateless VIPs' previous rings go with the change into the store
            new = replace(new, ring_history=tables.history)
            summary = core.write(tables, core.tables)
            if core.store is not None:
                try:
                    core.store.save(new)
                except OSError as e:
                    core.undo_to(core.tables)
                    raise PersistFailure(f"saving the state failed, change undone: {e}") from e
            prev_tables = core.tables
            core.state, core.tables = new, tables
            core.announce_settings()
            core.counters["changes"] += 1
            core.log_all_down(prev_tables, tables)
            seconds = self.clock() - t0
            log.info("generation %d: %s (%s; %.1f ms)", new.generation, what,
                     ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no writes", seconds * 1e3)
            return ChangeResult(new.generation, summary, seconds)

    # --- VIPs ---------------------------------------------------------------------------------

    @_counted
    def create_vip(self, body: Any, if_match: int | None = None) -> tuple[VipKey, ChangeResult]:
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid VIP")
        created: list[VipKey] = []

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            s = st.config.settings
            vip = check_vip(s, body)
            if any(v.key == vip.key for v in st.config.vips):
                raise Conflict(f"VIP {vip_label(vip.key)} exists", [("address", "VIP exists")])
            vips = [*st.config.vips, vip]
            check_limits(s, vips)
            created.append(vip.key)
            return with_vips(st.config, vips), st.drained

        res = self._commit(make, f"VIP {body.get('address')} created", if_match)
        return created[0], res

    @_counted
    def update_vip(self, key: VipKey, patch: Any, if_match: int | None = None) -> ChangeResult:
        if not isinstance(patch, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid VIP change")
        unknown = [k for k in patch if k not in VIP_PATCHABLE]
        if unknown:
            raise Invalid([(str(k), f"unknown or unchangeable key; can change: {', '.join(VIP_PATCHABLE)} "
                                    "(address, port and protocol name the VIP: delete and create instead)")
                           for k in unknown], "invalid VIP change")

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = find_vip(st, key)
            data = {**vip_fields(vip), **patch}
            new = check_vip(st.config.settings, data, what="invalid VIP change")
            vips = list(st.config.vips)
            vips[i] = new
            return with_vips(st.config, vips), st.drained

        return self._commit(make, f"VIP {vip_label(key)} changed ({', '.join(patch)})", if_match)

    @_counted
    def delete_vip(self, key: VipKey, if_match: int | None = None) -> ChangeResult:
        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, _ = find_vip(st, key)
            vips = [v for j, v in enumerate(st.config.vips) if j != i]
            return with_vips(st.config, vips), frozenset(d for d in st.drained if d[0] != key)

        return self._commit(make, f"VIP {vip_label(key)} deleted", if_match)

    # --- reals ----------------------------------------------------------------------------------

    @_counted
    def add_real(self, key: VipKey, body: Any, if_match: int | None = None) -> tuple[str, ChangeResult]:
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid real")
        added: list[str] = []

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = find_vip(st, key)
            try:
                addr = str(ipaddress.ip_address(body.get("address")))
            except ValueError:
                addr = None  # reported by the validation below
            if addr is not None and any(r.address == addr for r in vip.reals):
                raise Conflict(f"real {addr} is already in VIP {vip_label(key)}", [("address", "exists")])
            data = vip_fields(vip)
            j = len(data["reals"])
            data["reals"] = [*data["reals"], body]
            new = check_vip(st.config.settings, data, sub=f"reals[{j}]", what="invalid real")
            addr = new.reals[j].address
            vips = list(st.config.vips)
            vips[i] = new
            check_limits(st.config.settings, vips)
            added.append(addr)
            return with_vips(st.config, vips), st.drained

        res = self._commit(make, f"real {body.get('address')} added to {vip_label(key)}", if_match)
        return added[0], res

    @_counted
    def update_real(self, key: VipKey, address: str, patch: Any, if_match: int | None = None) -> ChangeResult:
        if not isinstance(patch, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid real change")
        unknown = [k for k in patch if k not in REAL_PATCHABLE]
        problems = [(str(k), f"unknown or unchangeable key; can change: {', '.join(REAL_PATCHABLE)}")
                    for k in unknown]
        if "drain" in patch and not isinstance(patch["drain"], bool):
            problems.append(("drain", f"must be true or false (got {patch['drain']!r})"))
        if problems:
            raise Invalid(problems, "invalid real change")

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = find_vip(st, key)
            j = next((j for j, r in enumerate(vip.reals) if r.address == address), None)
            if j is None:
                raise NotFound(f"no real {address} in VIP {vip_label(key)}")
            vips = list(st.config.vips)
            if "weight" in patch:
                data = vip_fields(vip)
                data["reals"] = list(data["reals"])
                data["reals"][j] = {"address": address, "weight": patch["weight"]}
                vips[i] = check_vip(st.config.settings, data, sub=f"reals[{j}]", what="invalid real change")
            drained = st.drained
            if "drain" in patch:
                drained = drained | {(key, address)} if patch["drain"] else drained - {(key, address)}
            return with_vips(st.config, vips), frozenset(drained)

        return self._commit(make, f"real {address} of {vip_label(key)} changed "
                                  f"({', '.join(f'{k}={v}' for k, v in patch.items())})", if_match)

    @_counted
    def remove_real(self, key: VipKey, address: str, if_match: int | None = None) -> ChangeResult:
        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = find_vip(st, key)
            if not any(r.address == address for r in vip.reals):
                raise NotFound(f"no real {address} in VIP {vip_label(key)}")
            data = vip_fields(vip)
            data["reals"] = [r for r in vip.reals if r.address != address]
            vips = list(st.config.vips)
            vips[i] = check_vip(st.config.settings, data)
            return with_vips(st.config, vips), st.drained - {(key, address)}

        return self._commit(make, f"real {address} removed from {vip_label(key)}", if_match)

    # --- the whole config -----------------------------------------------------------------------

    @_counted
    def replace_config(self, data: Any, if_match: int | None = None) -> ChangeResult:
        def make(st: DesiredState) -> tuple[Config, frozenset]:
            try:
                cfg = parse_config(data)
            except ConfigError as e:
                raise Invalid(e.errors, "invalid config") from None
            problems = extra_checks(cfg)
            if problems:
                raise Invalid(problems, "invalid config")
            old = st.config.settings
            fixed = [(f"settings.{name}", f"cannot change while running ({getattr(old, name)} -> "
                                          f"{getattr(cfg.settings, name)}): the datapath is sized for it")
                     for name in ("ring_size", "max_vips", "max_reals", "conn_table_size")
                     if getattr(old, name) != getattr(cfg.settings, name)]
            if fixed:
                raise Conflict("settings that size the datapath differ: " + "; ".join(m for _, m in fixed),
                               fixed)
            pairs = {(v.key, r.address) for v in cfg.vips for r in v.reals}
            return cfg, frozenset(d for d in st.drained if d in pairs)

        return self._commit(make, "config replaced", if_match)

    # --- QUIC server ids and source routes -------------------------------------------------------

    @_counted
    def replace_routing(self, section: str, body: Any, if_match: int | None = None) -> ChangeResult:
        """PUT a whole routing table (``quic_servers`` or ``source_routes``)."""
        if not isinstance(body, list):
            raise Invalid([("(body)", "must be a JSON array of entries")], f"invalid {section}")

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            return with_routing(st, section, body, None, f"invalid {section}"), st.drained

        return self._commit(make, f"{section} replaced ({len(body)} entries)", if_match)

    @_counted
    def add_routing(self, section: str, body: Any, if_match: int | None = None) -> tuple[Any, ChangeResult]:
        """POST one entry; returns its key (QUIC id / canonical prefix)."""
        field = ROUTING_SECTIONS[section]
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], f"invalid {section} entry")
        key = routing_key(section, body)

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            items = list(getattr(st.config, section))
            if key is not None and any(routing_key(section, x) == key for x in items):
                raise Conflict(f"{section}: {field} {key} exists", [(field, "exists")])
            return with_routing(st, section, [*items, body], len(items), f"invalid {section} entry"), st.drained

        res = self._commit(make, f"{section} entry {body.get(field)} -> {body.get('real')} added", if_match)
        return key, res

    @_counted
    def delete_routing(self, section: str, key: Any, if_match: int | None = None) -> ChangeResult:
        """DELETE the entry keyed ``key`` (parse_quic_id / parse_prefix)."""

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            items = getattr(st.config, section)
            keep = [x for x in items if routing_key(section, x) != key]
            if len(keep) == len(items):
                raise NotFound(f"no {section} entry {key}")
            return st.config.model_copy(update={section: keep}), st.drained

        return self._commit(make, f"{section} entry {key} deleted", if_match)
