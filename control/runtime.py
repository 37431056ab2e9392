"""The runtime: start-up, full reconciles and health verdicts; with the health runner
(:mod:`control.health_probing`) that feeds it, the only part of the control plane that
reads the clock (commands and views get none of their own).

:meth:`Runtime.open` brings up a :class:`~control.core.Core` from the saved state (or the
config file) and reconciles the datapath onto it with the fewest writes;
:meth:`Runtime.set_health` is where the health checks' verdicts land (the touched rings
are rebuilt and written, and the verdicts saved to ``health.json``);
:meth:`Runtime.keep_reconciled` is the daemon's loop that repairs a datapath left dirty
by a failed rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from control.core import Core
from control.errors import DatapathFailure
from control.health_probing import Target, TargetKey, target_label
from control.ids import EMPTY, allocate
from control.reconcile import ApplyError, DatapathPort, apply, plan
from control.ring_history import next_expiry
from control.store import DesiredState, StateError, Store, config_digest
from control.validation import extra_checks
from lb.config import Config, ConfigError

__all__ = ["Runtime", "initial_state"]

log = logging.getLogger("lb.control")


def initial_state(store: Store | None, seed: Config | None, from_config: bool = False,
                  loaded: DesiredState | None = None) -> tuple[DesiredState, bool]:
    """(the state to start from, whether it is new): the persisted state, or ``seed`` if
    there is none (or with ``from_config``). ``loaded``: the state already read from
    ``store`` by the caller."""
    if loaded is not None:
        state = None if from_config else loaded
    else:
        state = None if (store is None or from_config) else store.load()
    if state is None:
        if seed is None:
            raise StateError("no saved state and no config to start from")
        problems = extra_checks(seed)
        if problems:
            raise StateError(str(ConfigError(problems)))
        ids = allocate(EMPTY, [v.key for v in seed.vips], [r.address for v in seed.vips for r in v.reals],
                       seed.settings.max_vips, seed.settings.max_reals)
        return DesiredState(seed, ids, frozenset(), 1, config_digest(seed)), True
    if seed is not None:
        digest = config_digest(seed)
        if digest not in (state.seed_digest, config_digest(state.config)):
            log.warning("the config file differs from the saved state (generation %d); the saved "
                        "state wins. Apply the file with `lbctl config apply FILE` or restart "
                        "with --from-config", state.generation)
    return state, False


class Runtime:
    """Reconciles ``core`` with its datapath and applies health verdicts to it.
    ``clock`` (seconds, monotonic) times reconciles; the commands get it from here."""

    def __init__(self, core: Core, clock: Callable[[], float] = time.perf_counter) -> None:
        self.core = core
        self.clock = clock

    @classmethod
    def open(cls, port: DatapathPort, store: Store | None, seed: Config | None = None,
             from_config: bool = False, loaded: DesiredState | None = None) -> Runtime:
        """The persisted state (or ``seed``; see :func:`initial_state`) reconciled onto
        ``port`` with the fewest writes, and saved if it is new."""
        state, fresh = initial_state(store, seed, from_config, loaded)
        runtime = cls(Core(port, state, store, store.load_health() if store is not None else {}))
        runtime.reconcile()
        if fresh and store is not None:
            store.save(state)
        return runtime

    # --- reconciling -----------------------------------------------------------------------------

    def reconcile(self) -> dict[str, Any]:
        """Compare every table and ring with the desired contents and write the
        differences (start-up, and after a failed rollback)."""
        core = self.core
        with core.lock:
            t0 = self.clock()
            tables = core.build(core.state, prev=None)
            p = plan(core.port, tables, None)
            try:
                done = apply(p, core.port)
            except ApplyError as e:
                core.counters["rollbacks"] += 1
                raise DatapathFailure(f"reconciling the datapath failed: {e}") from e
            core.tables = tables
            core.dirty = False
            core.announce_settings()
            core.counters["ring_slots_written"] += done.summary["ring_slots"]
            core.last_reconcile = {"generation": core.state.generation, "writes": done.summary,
                                   "rings_checked": p.rings_checked,
                                   "seconds": round(self.clock() - t0, 6)}
            log.info("reconciled generation %d: %s", core.state.generation,
                     ", ".join(f"{k} {v}" for k, v in done.summary.items() if v) or "nothing to write")
            return core.last_reconcile

    def reconcile_if_dirty(self) -> bool:
        with self.core.lock:
            if not self.core.dirty:
                return False
            self.reconcile()
            return True

    def adopt(self, state: DesiredState) -> None:
        """Make ``state`` (written by another balancer to a shared store) the desired
        state and reconcile fully onto it."""
        with self.core.lock:
            self.core.state = state
            self.core.dirty = True
            self.reconcile()

    async def keep_reconciled(self, stop: asyncio.Event, period: float = 5.0) -> None:
        """Until ``stop``: every ``period`` seconds, reconcile fully if a failed rollback
        left the datapath dirty (failures are logged and retried)."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period)
            if self.core.dirty:
                try:
                    await asyncio.to_thread(self.reconcile_if_dirty)
                except Exception as e:  # noqa: BLE001 - keep trying
                    log.error("reconcile failed, will retry: %s", e)
            try:
                await asyncio.to_thread(self.expire_prev_rings)
            except Exception as e:  # noqa: BLE001 - keep trying
                log.error("dropping expired previous rings failed, will retry: %s", e)

    def expire_prev_rings(self) -> bool:
        """Drop the stateless VIPs' previous rings whose settings.second_chance_s is over
        (rebuild and write the tables); True if any went."""
        core = self.core
        with core.lock:
            cur = core.tables
            due = next_expiry(cur.history) if cur is not None else None
            if cur is None or due is None or due > core.wall_clock():
                return False
            tables = core.build(core.state, cur)
            core.write(tables, cur)
            core.tables = tables
            return True

    # --- health (the sink of control.health.HealthRunner) -----------------------------------------

    def health_targets(self) -> tuple[int, dict[TargetKey, Target], dict[TargetKey, bool]]:
        with self.core.lock:
            st = self.core.state
            return st.generation, self.core.targets(st), dict(self.core.health)

    def set_health(self, changes: Mapping[TargetKey, bool], reasons: Mapping[TargetKey, str] | None = None
                   ) -> dict[str, int] | None:
        """New verdicts from the health checks: rebuild the touched rings and write them."""
        reasons = reasons or {}
        core = self.core
        with core.lock:
            changed = {k: up for k, up in changes.items() if core.health.get(k, True) != up}
            core.health.update(changes)
            targets = core.targets(core.state)
            for k, up in changed.items():
                if k not in targets:
                    continue
                core.counters["health_transitions"] += 1
                msg = "health: %s is %s: %s"
                (log.info if up else log.warning)(msg, target_label(k), "up" if up else "down",
                                                  reasons.get(k, "set"))
                for cb in core.on_health:
                    cb(k, up, reasons.get(k, ""))
            if core.store is not None:
                try:
                    core.store.save_health(core.health.items())
                except OSError as e:
                    log.error("saving health.json failed (verdicts are kept in memory): %s", e)
            if not any(k in targets for k in changed):
                return None
            core.health_version += 1
            tables = core.build(core.state, core.tables)
            try:
                summary = core.write(tables, core.tables)
            except DatapathFailure:
                core.dirty = True  # the verdicts stand; retried by reconcile_if_dirty
                raise
            prev, core.tables = core.tables, tables
            core.log_all_down(prev, tables)
            return summary
