"""What the control plane's commands, views and runtime share, and the one path that
writes the datapath.

:class:`Core` holds the desired state, the health verdicts, the effective tables last
written and the datapath port, under one lock. It does no validation and reads no clock:
:mod:`control.commands` changes the desired state through it, :mod:`control.views`
reads it, :mod:`control.runtime` feeds it health verdicts and reconciles.

Health verdicts change the effective weights (not the desired state); the rings are
rebuilt from the desired state and the verdicts together (:meth:`Core.build`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from control.errors import DatapathFailure, Invalid
from control.health_probing import Target, TargetKey
from control.reconcile import ApplyError, DatapathPort, RollbackError, apply, plan
from control.ring_history import merge, next_history, prev_ring_tables
from control.store import DesiredState, StateError, Store
from control.tables import DesiredTables, Sizes, build_tables, ring_of, vip_label

__all__ = ["Core"]

log = logging.getLogger("lb.control")


class Core:
    """The desired state, the health verdicts and the datapath port. Thread-safe: every
    reader and writer holds :attr:`lock`."""

    def __init__(self, port: DatapathPort, state: DesiredState, store: Store | None = None,
                 health: Mapping[TargetKey, bool] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if Sizes.of(state.config.settings) != port.sizes:
            raise StateError(f"the state's sizes {Sizes.of(state.config.settings)} differ from the "
                             f"datapath's {port.sizes}")
        self.port = port
        self.store = store
        self.state = state
        self.lock = threading.RLock()
        self.health: dict[TargetKey, bool] = dict(health or {})  # the verdicts, True: up
        self.health_version = 0  # bumped whenever the verdicts change the rings
        self.tables: DesiredTables | None = None  # the effective tables last written
        self.dirty = True  # the datapath may differ from self.tables: reconcile fully
        self.last_reconcile: dict[str, Any] | None = None
        self.counters: dict[str, int] = {"changes": 0, "changes_failed": 0, "health_transitions": 0,
                                         "ring_slots_written": 0, "rollbacks": 0,
                                         "prev_rings_dropped_early": 0, "prev_rings_no_slot": 0}
        # stateless VIPs' previous rings expire by this clock (seconds since the epoch: the
        # history is persisted and shared); injected so tests need not wait
        self.wall_clock = wall_clock
        self.on_health: list[Callable[[TargetKey, bool, str], None]] = []
        # called with the settings whenever the datapath was written with settings other
        # than the last ones announced (the tunnel prober follows settings.encap / gue)
        self.on_settings: list[Callable[[Any], None]] = []
        self._announced: Any = None
        self._targets_cache: tuple[DesiredState, dict[TargetKey, Target]] | None = None

    @property
    def generation(self) -> int:
        return self.state.generation

    def targets(self, state: DesiredState) -> dict[TargetKey, Target]:
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
                # a CIDR VIP is probed at its prefix's first address
                out[(vip.key, r.address)] = Target((vip.key, r.address), hc, port, state.ids.reals[r.address],
                                                   str(vip.ip), vip.port)
        self._targets_cache = (state, out)
        return out

    def build(self, state: DesiredState, prev: DesiredTables | None) -> DesiredTables:
        """The effective tables of ``state`` under the current verdicts; only the rings
        that differ from ``prev``'s are rebuilt."""
        targets = self.targets(state)
        down = {k for k, up in self.health.items() if not up and k in targets}
        try:
            tables = build_tables(state.config, state.ids, state.drained, down, prev)
        except ValueError as e:  # e.g. more reals than ring slots
            raise Invalid([("reals", str(e))], "cannot build the rings") from None
        return self._with_prev_rings(state, tables, prev if prev is not None else self.tables)

    def _with_prev_rings(self, state: DesiredState, tables: DesiredTables, ref: DesiredTables | None
                         ) -> DesiredTables:
        """``tables`` with the stateless VIPs' previous rings (control.ring_history): a ring
        that differs from ``ref``'s (the tables in the datapath) is kept for
        settings.second_chance_s. The state's stored history counts when ``ref`` was not
        built from it (start-up, a state adopted from the fleet)."""
        base = ref.history if ref is not None else {}
        if ref is None or ref.generation != state.generation:
            base = merge(base, state.ring_history)
        now = self.wall_clock()
        history, dropped = next_history(base, ref.parts if ref is not None else None, tables.parts,
                                        now, state.config.settings.second_chance_s)
        if not history and (ref is None or not ref.prev.rings):
            return dataclasses.replace(tables, generation=state.generation)
        prev = prev_ring_tables(history, tables.vip_nums, tables.real_ids, tables.sizes.ring_size,
                                ref.prev if ref is not None else None, ring_of)
        for key in dropped:
            self.counters["prev_rings_dropped_early"] += 1
            log.warning("%s: a third ring change inside settings.second_chance_s: its oldest previous"
                        " ring is dropped early; connections begun under it whose real no ring keeps"
                        " may break", vip_label(key))
        for key in prev.skipped:
            self.counters["prev_rings_no_slot"] += 1
            log.error("%s: no free previous-ring slot (%d in use): its ring change is not softened;"
                      " connections whose real changed may break", vip_label(key), len(prev.rings))
        return dataclasses.replace(tables, history=history, prev=prev, generation=state.generation)

    def write(self, tables: DesiredTables, prev: DesiredTables | None) -> dict[str, int]:
        """Write the differences between the datapath and ``tables`` (only the rings and
        routing tables that differ from ``prev``'s, unless dirty); rolls back on failure."""
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

    def undo_to(self, tables: DesiredTables | None) -> None:
        """Put ``tables`` back into the datapath (after a failed save); dirty if that fails."""
        if tables is None:
            return
        try:
            apply(plan(self.port, tables, None), self.port)
        except ApplyError as e:
            self.dirty = True
            log.error("undoing a change after a failed save failed: %s", e)

    def announce_settings(self) -> None:
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

    def log_all_down(self, prev: DesiredTables | None, new: DesiredTables) -> None:
        """Log the VIPs whose reals all went down, or came back, between two tables."""
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
