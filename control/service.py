"""The controller: desired state, validation, reconciliation, persistence, health.

Every change follows the same path, under one lock, as one unit:

1. validate the request through lb.config's models (a VIP is checked with
   :func:`lb.config.parse_config` on its own, then against the other VIPs: duplicates
   and table limits; a whole config is parsed whole). Problems name the field of the
   request (:class:`~control.errors.Invalid`, 422) or the conflict (409);
2. number it (:func:`control.ids.allocate`: existing numbers kept) and build the desired
   tables (:func:`control.tables.build_tables`: only changed rings are rebuilt);
3. plan the writes against the datapath's current contents and apply them
   (:mod:`control.reconcile`); a failed write undoes the others (503);
4. save the new desired state atomically; if that fails, undo the writes (503);
5. only then make it current and answer. A request that fails changes nothing.

Health verdicts change the effective weights (not the desired state); they are applied
the same way and saved to ``health.json``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from control.datapaths import ConnEntry
from control.errors import Conflict, DatapathFailure, Invalid, NotFound, PersistFailure, PreconditionFailed
from control.health_probing import Target, TargetKey, target_label
from control.ids import EMPTY, AllocationError, allocate
from control.reconcile import ApplyError, DatapathPort, RollbackError, apply, plan
from control.store import DesiredState, StateError, Store, config_digest
from control.tables import DesiredTables, Sizes, build_tables, vip_label
from lb import constants as C
from lb.config import Config, ConfigError, config_to_dict, dump_config_yaml, parse_config
from lb.config import _canonical_prefix  # the config's own prefix rule, for prefixes in URLs

__all__ = ["Controller", "parse_vip_key", "parse_real_address", "parse_quic_id", "parse_prefix",
           "extra_checks", "ROUTING_SECTIONS"]

log = logging.getLogger("lb.control")

VipKey = tuple[str, int, str]
VIP_PATCHABLE = ("flags", "hash", "healthcheck")
REAL_PATCHABLE = ("weight", "drain")


# --- names in URLs ----------------------------------------------------------------------------


def parse_vip_key(address: str, port: str | int, protocol: str) -> VipKey:
    """(address, port, protocol) from a URL, canonical; Invalid naming the part."""
    problems = []
    try:
        addr = str(ipaddress.ip_address(str(address)))
    except ValueError:
        problems.append(("address", f"not an IPv4 or IPv6 address: {address!r}"))
        addr = str(address)
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(("port", f"must be 0..65535 (got {port!r})"))
        p = -1
    if protocol not in ("tcp", "udp"):
        problems.append(("protocol", f"must be one of: 'tcp', 'udp' (got {protocol!r})"))
    if problems:
        raise Invalid(problems, "invalid VIP in the URL")
    return (addr, p, protocol)


# routing table (config section) -> the field that keys its entries
ROUTING_SECTIONS = {"quic_servers": "id", "source_routes": "prefix"}


def parse_quic_id(text: str | int) -> int:
    """A QUIC server id from a URL; Invalid naming ``id``."""
    try:
        v = int(text)
        if not 1 <= v <= C.MAX_QUIC_SERVER_ID:
            raise ValueError
    except (TypeError, ValueError):
        raise Invalid([("id", f"must be an integer 1..{C.MAX_QUIC_SERVER_ID} (got {text!r})")],
                      "invalid QUIC server id in the URL") from None
    return v


def parse_prefix(text: str) -> str:
    """A client prefix from a URL ('198.18.64.0/24'), canonical; Invalid naming ``prefix``."""
    try:
        return _canonical_prefix(text)
    except ValueError as e:
        raise Invalid([("prefix", str(e))], "invalid prefix in the URL") from None


def _routing_key(section: str, item: Any) -> Any:
    """The key (QUIC id, canonical prefix) of a routing entry, a model or a request body;
    None if the body's key is not valid (the validation reports it)."""
    field = ROUTING_SECTIONS[section]
    v = getattr(item, field) if not isinstance(item, dict) else item.get(field)
    if section == "quic_servers":
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    try:
        return _canonical_prefix(v)
    except ValueError:
        return None


def parse_real_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise Invalid([("real", f"not an IPv4 or IPv6 address: {address!r}")], "invalid real in the URL") from None


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


def _vip_fields(vip: Any) -> dict[str, Any]:
    """A VIP as a dict whose nested models are the (already valid) instances."""
    return {"address": vip.address, "port": vip.port, "protocol": vip.protocol, "hash": vip.hash,
            "flags": list(vip.flags), "reals": list(vip.reals), "healthcheck": vip.healthcheck}


def _same_names(old: Config, new: Config) -> bool:
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


def _refuse_dangling(cfg: Config) -> None:
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


def _counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Count a change request that is refused or fails (metrics: lb_control_changes_total)."""

    @functools.wraps(fn)
    def wrapper(self: Controller, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            with self.lock:
                self.counters["changes_failed"] += 1
            raise

    return wrapper


@dataclass(frozen=True)
class ChangeResult:
    generation: int
    writes: dict[str, int]  # the plan's summary
    seconds: float


class Controller:
    """Owns the desired state and the datapath port. Thread-safe (one lock)."""

    def __init__(self, port: DatapathPort, state: DesiredState, store: Store | None = None,
                 health: Mapping[TargetKey, bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if Sizes.of(state.config.settings) != port.sizes:
            raise StateError(f"the state's sizes {Sizes.of(state.config.settings)} differ from the "
                             f"datapath's {port.sizes}")
        self.port = port
        self.store = store
        self.state = state
        self.clock = clock
        self.lock = threading.RLock()
        self._health: dict[TargetKey, bool] = dict(health or {})
        self.health_version = 0
        self.tables: DesiredTables | None = None
        self.dirty = True  # the datapath may differ from self.tables: reconcile fully
        self.last_reconcile: dict[str, Any] | None = None
        self.counters: dict[str, int] = {"changes": 0, "changes_failed": 0, "health_transitions": 0,
                                         "ring_slots_written": 0, "rollbacks": 0}
        self.on_health: list[Callable[[TargetKey, bool, str], None]] = []
        # called with the settings whenever the datapath was written with settings other
        # than the last ones announced (the tunnel prober follows settings.encap / gue)
        self.on_settings: list[Callable[[Any], None]] = []
        self._announced: Any = None
        self._targets_cache: tuple[DesiredState, dict[TargetKey, Target]] | None = None
        self._sim_cache: tuple[tuple[int, int], Any] | None = None

    # --- start-up ---------------------------------------------------------------------------

    @classmethod
    def open(cls, port: DatapathPort, store: Store | None, seed: Config | None = None,
             from_config: bool = False, loaded: DesiredState | None = None) -> Controller:
        """The persisted state (or ``seed`` if there is none, or with ``from_config``),
        reconciled onto ``port`` with the fewest writes. ``loaded``: the state already
        read from ``store`` by the caller."""
        if loaded is not None:
            state = None if from_config else loaded
        else:
            state = None if (store is None or from_config) else store.load()
        fresh = state is None
        if state is None:
            if seed is None:
                raise StateError("no saved state and no config to start from")
            problems = extra_checks(seed)
            if problems:
                raise StateError(str(ConfigError(problems)))
            ids = allocate(EMPTY, [v.key for v in seed.vips], [r.address for v in seed.vips for r in v.reals],
                           seed.settings.max_vips, seed.settings.max_reals)
            state = DesiredState(seed, ids, frozenset(), 1, config_digest(seed))
        elif seed is not None:
            digest = config_digest(seed)
            if digest not in (state.seed_digest, config_digest(state.config)):
                log.warning("the config file differs from the saved state (generation %d); the saved "
                            "state wins. Apply the file with `lbctl config apply FILE` or restart "
                            "with --from-config", state.generation)
        ctl = cls(port, state, store, store.load_health() if store is not None else {})
        ctl.reconcile()
        if fresh and store is not None:
            store.save(state)
        return ctl

    def reconcile(self) -> dict[str, Any]:
        """Compare every table and ring with the desired contents and write the
        differences (start-up, and after a failed rollback)."""
        with self.lock:
            t0 = time.perf_counter()
            tables = self._build(self.state, prev=None)
            p = plan(self.port, tables, None)
            try:
                done = apply(p, self.port)
            except ApplyError as e:
                self.counters["rollbacks"] += 1
                raise DatapathFailure(f"reconciling the datapath failed: {e}") from e
            self.tables = tables
            self.dirty = False
            self._announce_settings()
            self.counters["ring_slots_written"] += done.summary["ring_slots"]
            self.last_reconcile = {"generation": self.state.generation, "writes": done.summary,
                                   "rings_checked": p.rings_checked,
                                   "seconds": round(time.perf_counter() - t0, 6)}
            log.info("reconciled generation %d: %s", self.state.generation,
                     ", ".join(f"{k} {v}" for k, v in done.summary.items() if v) or "nothing to write")
            return self.last_reconcile

    # --- the one path every change takes -----------------------------------------------------

    def _down(self, state: DesiredState) -> set[TargetKey]:
        targets = self._targets(state)
        return {k for k, up in self._health.items() if not up and k in targets}

    def _build(self, state: DesiredState, prev: DesiredTables | None) -> DesiredTables:
        try:
            return build_tables(state.config, state.ids, state.drained, self._down(state), prev)
        except ValueError as e:  # e.g. more reals than ring slots
            raise Invalid([("reals", str(e))], "cannot build the rings") from None

    def _apply_tables(self, tables: DesiredTables, prev: DesiredTables | None) -> dict[str, int]:
        """Write the differences between the datapath and ``tables``; rolls back on failure."""
        if self.dirty or prev is None:
            nums = names = None
        else:
            nums = [n for n, r in tables.rings.items() if prev.rings.get(n) is not r]
            names = [n for n, t in tables.routing.items() if prev.routing.get(n) is not t]
        p = plan(self.port, tables, nums, names)
        try:
            done = apply(p, self.port)
        except RollbackError as e:
            self.dirty = True
            self.counters["rollbacks"] += 1
            log.error("datapath write failed and could not be undone; will reconcile fully: %s", e)
            raise DatapathFailure(f"writing the datapath failed: {e}") from e
        except ApplyError as e:
            self.counters["rollbacks"] += 1
            log.error("datapath write failed, undone: %s", e)
            raise DatapathFailure(f"writing the datapath failed (nothing changed): {e}") from e
        self.counters["ring_slots_written"] += done.summary["ring_slots"]
        return done.summary

    def _commit(self, make: Callable[[DesiredState], tuple[Config, frozenset]], what: str,
                if_match: int | None = None) -> ChangeResult:
        with self.lock:
            t0 = time.perf_counter()
            if if_match is not None and if_match != self.state.generation:
                raise PreconditionFailed(f"generation is {self.state.generation}, not {if_match}")
            old = self.state
            cfg, drained = make(old)
            _refuse_dangling(cfg)
            s = cfg.settings
            if _same_names(old.config, cfg):
                ids = old.ids  # no VIP or real address came or went: every number stays
            else:
                try:
                    ids = allocate(old.ids, [v.key for v in cfg.vips],
                                   [r.address for v in cfg.vips for r in v.reals], s.max_vips, s.max_reals)
                except AllocationError as e:
                    raise Conflict(str(e)) from None
            new = DesiredState(cfg, ids, drained, old.generation + 1, old.seed_digest)
            tables = self._build(new, self.tables)
            summary = self._apply_tables(tables, self.tables)
            if self.store is not None:
                try:
                    self.store.save(new)
                except OSError as e:
                    self._undo_to(self.tables)
                    raise PersistFailure(f"saving the state failed, change undone: {e}") from e
            prev_tables = self.tables
            self.state, self.tables = new, tables
            self._announce_settings()
            self.counters["changes"] += 1
            self._log_all_down(prev_tables, tables)
            seconds = time.perf_counter() - t0
            log.info("generation %d: %s (%s; %.1f ms)", new.generation, what,
                     ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no writes", seconds * 1e3)
            return ChangeResult(new.generation, summary, seconds)

    def _announce_settings(self) -> None:
        """Tell ``on_settings`` about the settings now in the datapath, if they differ from
        the last ones told. A failing callback is logged: the change itself stands."""
        settings = self.state.config.settings
        if settings is self._announced or settings == self._announced:
            return
        self._announced = settings
        for cb in self.on_settings:
            try:
                cb(settings)
            except Exception as e:  # noqa: BLE001 - a listener's failure is not the change's
                log.error("applying the new settings to %s failed: %s", getattr(cb, "__qualname__", cb), e)

    def _undo_to(self, tables: DesiredTables | None) -> None:
        if tables is None:
            return
        try:
            apply(plan(self.port, tables, None), self.port)
        except ApplyError as e:
            self.dirty = True
            log.error("undoing a change after a failed save failed: %s", e)

    def reconcile_if_dirty(self) -> bool:
        with self.lock:
            if not self.dirty:
                return False
            self.reconcile()
            return True

    # --- validation helpers -----------------------------------------------------------------

    def _find(self, state: DesiredState, key: VipKey) -> tuple[int, Any]:
        for i, v in enumerate(state.config.vips):
            if v.key == key:
                return i, v
        raise NotFound(f"no VIP {vip_label(key)}")

    def _check_vip(self, settings: Any, data: Any, sub: str | None = None, what: str = "invalid VIP") -> Any:
        try:
            one = parse_config({"settings": settings, "vips": [data]})
        except ConfigError as e:
            raise Invalid(_relative(e.errors, sub), what) from None
        problems = extra_checks(one)
        if problems:
            raise Invalid(_relative(problems, sub), what)
        return one.vips[0]

    @staticmethod
    def _limits(settings: Any, vips: list[Any]) -> None:
        if len(vips) > settings.max_vips:
            raise Conflict(f"vips: {len(vips)} VIPs but settings.max_vips is {settings.max_vips}",
                           [("vips", "table full")])
        n = len({r.address for v in vips for r in v.reals})
        if n > settings.max_reals - 1:
            raise Conflict(f"vips: {n} distinct real addresses but settings.max_reals = "
                           f"{settings.max_reals} allows {settings.max_reals - 1} (ids 1..max_reals-1)",
                           [("reals", "table full")])

    @staticmethod
    def _config(base: Config, vips: list[Any]) -> Config:
        """``base`` with other (already validated) VIPs; the routing tables are kept (a
        change that would leave one of their entries without its real is refused in
        :meth:`_commit`)."""
        return Config.model_construct(settings=base.settings, vips=vips, quic_servers=base.quic_servers,
                                      source_routes=base.source_routes)

    # --- VIPs ---------------------------------------------------------------------------------

    @_counted
    def create_vip(self, body: Any, if_match: int | None = None) -> tuple[VipKey, ChangeResult]:
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid VIP")
        created: list[VipKey] = []

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            s = st.config.settings
            vip = self._check_vip(s, body)
            if any(v.key == vip.key for v in st.config.vips):
                raise Conflict(f"VIP {vip_label(vip.key)} exists", [("address", "VIP exists")])
            vips = [*st.config.vips, vip]
            self._limits(s, vips)
            created.append(vip.key)
            return self._config(st.config, vips), st.drained

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
            i, vip = self._find(st, key)
            data = {**_vip_fields(vip), **patch}
            new = self._check_vip(st.config.settings, data, what="invalid VIP change")
            vips = list(st.config.vips)
            vips[i] = new
            return self._config(st.config, vips), st.drained

        return self._commit(make, f"VIP {vip_label(key)} changed ({', '.join(patch)})", if_match)

    @_counted
    def delete_vip(self, key: VipKey, if_match: int | None = None) -> ChangeResult:
        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, _ = self._find(st, key)
            vips = [v for j, v in enumerate(st.config.vips) if j != i]
            return self._config(st.config, vips), frozenset(d for d in st.drained if d[0] != key)

        return self._commit(make, f"VIP {vip_label(key)} deleted", if_match)

    # --- reals ----------------------------------------------------------------------------------

    @_counted
    def add_real(self, key: VipKey, body: Any, if_match: int | None = None) -> tuple[str, ChangeResult]:
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], "invalid real")
        added: list[str] = []

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = self._find(st, key)
            try:
                addr = str(ipaddress.ip_address(body.get("address")))
            except ValueError:
                addr = None  # reported by the validation below
            if addr is not None and any(r.address == addr for r in vip.reals):
                raise Conflict(f"real {addr} is already in VIP {vip_label(key)}", [("address", "exists")])
            data = _vip_fields(vip)
            j = len(data["reals"])
            data["reals"] = [*data["reals"], body]
            new = self._check_vip(st.config.settings, data, sub=f"reals[{j}]", what="invalid real")
            addr = new.reals[j].address
            vips = list(st.config.vips)
            vips[i] = new
            self._limits(st.config.settings, vips)
            added.append(addr)
            return self._config(st.config, vips), st.drained

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
            i, vip = self._find(st, key)
            j = next((j for j, r in enumerate(vip.reals) if r.address == address), None)
            if j is None:
                raise NotFound(f"no real {address} in VIP {vip_label(key)}")
            vips = list(st.config.vips)
            if "weight" in patch:
                data = _vip_fields(vip)
                data["reals"] = list(data["reals"])
                data["reals"][j] = {"address": address, "weight": patch["weight"]}
                vips[i] = self._check_vip(st.config.settings, data, sub=f"reals[{j}]",
                                          what="invalid real change")
            drained = st.drained
            if "drain" in patch:
                drained = drained | {(key, address)} if patch["drain"] else drained - {(key, address)}
            return self._config(st.config, vips), frozenset(drained)

        return self._commit(make, f"real {address} of {vip_label(key)} changed "
                                  f"({', '.join(f'{k}={v}' for k, v in patch.items())})", if_match)

    @_counted
    def remove_real(self, key: VipKey, address: str, if_match: int | None = None) -> ChangeResult:
        def make(st: DesiredState) -> tuple[Config, frozenset]:
            i, vip = self._find(st, key)
            if not any(r.address == address for r in vip.reals):
                raise NotFound(f"no real {address} in VIP {vip_label(key)}")
            data = _vip_fields(vip)
            data["reals"] = [r for r in vip.reals if r.address != address]
            vips = list(st.config.vips)
            vips[i] = self._check_vip(st.config.settings, data)
            return self._config(st.config, vips), st.drained - {(key, address)}

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

    @staticmethod
    def _with_routing(st: DesiredState, section: str, items: Any, index: int | None, what: str) -> Config:
        """The current config with ``section`` replaced by ``items``, validated by
        lb.config as a whole (the VIP models are reused, not re-validated)."""
        data = {"settings": st.config.settings, "vips": list(st.config.vips),
                "quic_servers": list(st.config.quic_servers), "source_routes": list(st.config.source_routes)}
        data[section] = items
        try:
            return parse_config(data)
        except ConfigError as e:
            raise Invalid(_routing_problems(e.errors, section, index), what) from None

    @_counted
    def replace_routing(self, section: str, body: Any, if_match: int | None = None) -> ChangeResult:
        """PUT a whole routing table (``quic_servers`` or ``source_routes``)."""
        if not isinstance(body, list):
            raise Invalid([("(body)", "must be a JSON array of entries")], f"invalid {section}")

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            return self._with_routing(st, section, body, None, f"invalid {section}"), st.drained

        return self._commit(make, f"{section} replaced ({len(body)} entries)", if_match)

    @_counted
    def add_routing(self, section: str, body: Any, if_match: int | None = None) -> tuple[Any, ChangeResult]:
        """POST one entry; returns its key (QUIC id / canonical prefix)."""
        field = ROUTING_SECTIONS[section]
        if not isinstance(body, dict):
            raise Invalid([("(body)", "must be a JSON object")], f"invalid {section} entry")
        key = _routing_key(section, body)

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            items = list(getattr(st.config, section))
            if key is not None and any(_routing_key(section, x) == key for x in items):
                raise Conflict(f"{section}: {field} {key} exists", [(field, "exists")])
            return self._with_routing(st, section, [*items, body], len(items),
                                      f"invalid {section} entry"), st.drained

        res = self._commit(make, f"{section} entry {body.get(field)} -> {body.get('real')} added", if_match)
        return key, res

    @_counted
    def delete_routing(self, section: str, key: Any, if_match: int | None = None) -> ChangeResult:
        """DELETE the entry keyed ``key`` (parse_quic_id / parse_prefix)."""

        def make(st: DesiredState) -> tuple[Config, frozenset]:
            items = getattr(st.config, section)
            keep = [x for x in items if _routing_key(section, x) != key]
            if len(keep) == len(items):
                raise NotFound(f"no {section} entry {key}")
            return st.config.model_copy(update={section: keep}), st.drained

        return self._commit(make, f"{section} entry {key} deleted", if_match)

    def routing_view(self, section: str, key: Any = None) -> Any:
        """The entries of a routing table with their real ids and whether they are in the
        datapath (``active``: false while the real is down for every VIP it serves);
        with ``key``, that one entry (NotFound if absent)."""
        with self.lock:
            st, tb = self.state, self.tables
            out = []
            for x in getattr(st.config, section):
                if key is not None and _routing_key(section, x) != key:
                    continue
                out.append({**x.model_dump(mode="json"), "real_id": st.ids.reals.get(x.real),
                            "active": not (tb is not None and x.real in tb.routed_out)})
        if key is None:
            return out
        if not out:
            raise NotFound(f"no {section} entry {key}")
        return out[0]

    # --- health -----------------------------------------------------------------------------------

    def _targets(self, state: DesiredState) -> dict[TargetKey, Target]:
        """Health-check targets of ``state`` (cached for the current state object)."""
        cache = self._targets_cache
        if cache is not None and cache[0] is state:
            return cache[1]
        out: dict[TargetKey, Target] = {}
        for vip in state.config.vips:
            hc = vip.healthcheck
            if hc is None:
                continue
            port = hc.port_for(vip.port)
            for r in vip.reals:
                out[(vip.key, r.address)] = Target((vip.key, r.address), hc, port, state.ids.reals[r.address],
                                                   vip.address, vip.port)
        self._targets_cache = (state, out)
        return out

    def health_targets(self) -> tuple[int, dict[TargetKey, Target], dict[TargetKey, bool]]:
        with self.lock:
            st = self.state
            return st.generation, self._targets(st), dict(self._health)

    def set_health(self, changes: Mapping[TargetKey, bool], reasons: Mapping[TargetKey, str] | None = None
                   ) -> dict[str, int] | None:
        """New verdicts from the health checks: rebuild the touched rings and write them."""
        reasons = reasons or {}
        with self.lock:
            changed = {k: up for k, up in changes.items() if self._health.get(k, True) != up}
            self._health.update(changes)
            targets = self._targets(self.state)
            for k, up in changed.items():
                if k not in targets:
                    continue
                self.counters["health_transitions"] += 1
                msg = "health: %s is %s: %s"
                (log.info if up else log.warning)(msg, target_label(k), "up" if up else "down",
                                                  reasons.get(k, "set"))
                for cb in self.on_health:
                    cb(k, up, reasons.get(k, ""))
            if self.store is not None:
                try:
                    self.store.save_health(self._health.items())
                except OSError as e:
                    log.error("saving health.json failed (verdicts are kept in memory): %s", e)
            if not any(k in targets for k in changed):
                return None
            self.health_version += 1
            tables = self._build(self.state, self.tables)
            try:
                summary = self._apply_tables(tables, self.tables)
            except DatapathFailure:
                self.dirty = True  # the verdicts stand; retried by reconcile_if_dirty
                raise
            prev, self.tables = self.tables, tables
            self._log_all_down(prev, tables)
            return summary

    def _log_all_down(self, prev: DesiredTables | None, new: DesiredTables) -> None:
        before = prev.all_down if prev is not None else frozenset()
        vips = {v.key: v for v in self.state.config.vips}
        for key in new.all_down - before:
            vip = vips.get(key)
            mode = vip.healthcheck.on_all_down if vip is not None and vip.healthcheck else "fail_open"
            if mode == "fail_open":
                log.error("all reals of %s are down: failing open (keeping every real in the ring)",
                          vip_label(key))
            else:
                log.error("all reals of %s are down: dropping its traffic (on_all_down: drop)", vip_label(key))
        for key in before - new.all_down:
            if key in vips:
                log.warning("%s has a healthy real again", vip_label(key))

    # --- reading ---------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.state.generation

    def vip_view(self, key: VipKey, state: DesiredState | None = None,
                 tables: DesiredTables | None = None) -> dict[str, Any]:
        with self.lock:
            st = state or self.state
            tb = tables or self.tables
            _, vip = self._find(st, key)
            targets = {t.address: t for t in (tb.targets.get(key, ()) if tb else ())}
            reals = []
            for r in vip.reals:
                t = targets.get(r.address)
                reals.append({
                    "address": r.address, "weight": r.weight,
                    "drained": (key, r.address) in st.drained,
                    "healthy": None if t is None else t.up,
                    "effective_weight": None if t is None else t.effective,
                    "real_id": st.ids.reals.get(r.address),
                })
            d = vip.model_dump(mode="json", exclude={"reals"})
            d.update({"id": vip_label(key), "vip_num": st.ids.vips.get(key), "reals": reals,
                      "all_reals_down": bool(tb and key in tb.all_down)})
            return d

    def list_vips(self) -> list[dict[str, Any]]:
        with self.lock:
            st, tb = self.state, self.tables
            return [self.vip_view(v.key, st, tb) for v in st.config.vips]

    def real_view(self, key: VipKey, address: str) -> dict[str, Any]:
        v = self.vip_view(key)
        for r in v["reals"]:
            if r["address"] == address:
                return {**r, "vip": v["id"]}
        raise NotFound(f"no real {address} in VIP {vip_label(key)}")

    def export_config(self) -> tuple[int, dict[str, Any]]:
        with self.lock:
            return self.state.generation, config_to_dict(self.state.config)

    def export_yaml(self) -> tuple[int, str]:
        with self.lock:
            return self.state.generation, dump_config_yaml(self.state.config)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            st = self.state
            s = self.port.read_stats()
            conn = self.port.conn_count()
        vips = []
        for v in st.config.vips:
            num = st.ids.vips[v.key]
            vips.append({"vip": vip_label(v.key), "vip_num": num,
                         "packets": int(s.vip[num, C.VIP_STAT_PACKETS]),
                         "bytes": int(s.vip[num, C.VIP_STAT_BYTES])})
        reals = []
        for addr, rid in sorted(st.ids.reals.items(), key=lambda kv: kv[1]):
            reals.append({"real": addr, "real_id": rid, "packets": int(s.real[rid, C.VIP_STAT_PACKETS]),
                          "bytes": int(s.real[rid, C.VIP_STAT_BYTES])})
        return {"generation": st.generation, "counters": s.counters, "conn_table": {"entries": conn},
                "vips": vips, "reals": reals}

    def conn_table(self, limit: int) -> dict[str, Any]:
        with self.lock:
            ids = {rid: a for a, rid in self.state.ids.reals.items()}
            entries: list[ConnEntry] = self.port.conn_entries(limit)
            count = self.port.conn_count()
        return {"entries": count, "datapath": self.port.kind,
                "sample": [{**e.__dict__, "real": ids.get(e.real_id)} for e in entries]}

    def status(self) -> dict[str, Any]:
        with self.lock:
            st = self.state
            return {
                "datapath": self.port.kind,
                "generation": st.generation,
                "health_version": self.health_version,
                "sizes": self.port.sizes.__dict__,
                "vips": len(st.config.vips),
                "reals": len(st.ids.reals),
                "quic_servers": len(st.config.quic_servers),
                "source_routes": len(st.config.source_routes),
                "dirty": self.dirty,
                "last_reconcile": self.last_reconcile,
                "counters": dict(self.counters),
            }

    def health(self) -> list[dict[str, Any]]:
        """Per (VIP, real) with a health check: the verdict the rings are built with."""
        with self.lock:
            st, tb = self.state, self.tables
            out = []
            for (key, addr), t in self._targets(st).items():
                out.append({"vip": vip_label(key), "real": addr, "check": t.spec.type, "port": t.port,
                            "state": "up" if self._health.get((key, addr), True) else "down",
                            "all_reals_down": bool(tb and key in tb.all_down),
                            "on_all_down": t.spec.on_all_down})
            return out

    # --- simulate ---------------------------------------------------------------------------------

    def simulator(self) -> Any:
        """A userspace datapath on the current effective tables (fresh connection table):
        where would a new flow go now? Cached per (generation, health version)."""
        from lb.simulate import UserspaceSimulator

        with self.lock:
            version = (self.state.generation, self.health_version)
            if self._sim_cache is None or self._sim_cache[0] != version:
                assert self.tables is not None
                self._sim_cache = (version, self.tables.to_datapath_tables())
            tables = self._sim_cache[1]
        return UserspaceSimulator(tables)
