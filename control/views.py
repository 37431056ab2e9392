"""Views: read-only queries of the control plane (VIPs, reals, routing tables, the config,
stats, the connection table, status, health, where a new flow would go). Nothing here
changes the desired state or writes the datapath."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from control.core import Core
from control.datapaths import ConnEntry
from control.errors import NotFound
from control.flows import FlowQuery
from control.ids import VipKey
from control.keys import routing_key
from control.store import DesiredState
from control.tables import DesiredTables, vip_label
from control.validation import find_vip
from lb import constants as C
from lb.config import config_to_dict, dump_config_yaml

__all__ = ["Views"]

SIMULATE_NOTE = ("a new flow, on the current rings (health and drain applied); an established flow "
                 "follows the connection table")


class Views:
    """Read-only queries over ``core``; each takes the core's lock for a consistent read."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._sim_cache: tuple[tuple[int, int], Any] | None = None

    def at_generation(self, query: Callable[..., Any], *args: Any) -> tuple[int, Any]:
        """(generation, query(*args)) read together: an ETag that matches the body."""
        with self.core.lock:
            return self.core.generation, query(*args)

    # --- VIPs and reals ------------------------------------------------------------------------

    def vip_view(self, key: VipKey, state: DesiredState | None = None,
                 tables: DesiredTables | None = None) -> dict[str, Any]:
        with self.core.lock:
            st = state or self.core.state
            tb = tables or self.core.tables
            _, vip = find_vip(st, key)
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
        with self.core.lock:
            st, tb = self.core.state, self.core.tables
            return [self.vip_view(v.key, st, tb) for v in st.config.vips]

    def real_view(self, key: VipKey, address: str) -> dict[str, Any]:
        v = self.vip_view(key)
        for r in v["reals"]:
            if r["address"] == address:
                return {**r, "vip": v["id"]}
        raise NotFound(f"no real {address} in VIP {vip_label(key)}")

    def routing_view(self, section: str, key: Any = None) -> Any:
        """The entries of a routing table with their real ids and whether they are in the
        datapath (``active``: false while the real is down for every VIP it serves);
        with ``key``, that one entry (NotFound if absent)."""
        with self.core.lock:
            st, tb = self.core.state, self.core.tables
            out = []
            for x in getattr(st.config, section):
                if key is not None and routing_key(section, x) != key:
                    continue
                out.append({**x.model_dump(mode="json"), "real_id": st.ids.reals.get(x.real),
                            "active": not (tb is not None and x.real in tb.routed_out)})
        if key is None:
            return out
        if not out:
            raise NotFound(f"no {section} entry {key}")
        return out[0]

    # --- the config ------------------------------------------------------------------------------

    def export_config(self) -> tuple[int, dict[str, Any]]:
        with self.core.lock:
            return self.core.state.generation, config_to_dict(self.core.state.config)

    def export_yaml(self) -> tuple[int, str]:
        with self.core.lock:
            return self.core.state.generation, dump_config_yaml(self.core.state.config)

    # --- counters and status -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        core = self.core
        with core.lock:
            st = core.state
            s = core.port.read_stats()
            conn = core.port.conn_count()
        vips = []
        for v in st.config.vips:
            num = st.ids.vips[v.key]
            vips.append({"vip": vip_label(v.key), "vip_num": num,
                         "packets": int(s.vip[num, C.VIP_STAT_PACKETS]),
                         "bytes": int(s.vip[num, C.VIP_STAT_BYTES])})
        reals = []
        for addr, rid in sorted(st.ids.reals.items(), key=lambda kv: kv[1]):
            reals.append({"real": addr, "real_id": rid, "packets": int(s.real[rid, C.VIP_STAT_PACKETS]),
                          "bytes": int(s.real[rid, C.VIP_STAT_BYTES]),
                          "lru_misses": int(s.real[rid, C.REAL_STAT_LRU_MISS])})
        return {"generation": st.generation, "counters": s.counters, "conn_table": {"entries": conn},
                "vips": vips, "reals": reals}

    def conn_table(self, limit: int) -> dict[str, Any]:
        core = self.core
        with core.lock:
            ids = {rid: a for a, rid in core.state.ids.reals.items()}
            entries: list[ConnEntry] = core.port.conn_entries(limit)
            count = core.port.conn_count()
        return {"entries": count, "datapath": core.port.kind,
                "sample": [{**e.__dict__, "real": ids.get(e.real_id)} for e in entries]}

    def status(self) -> dict[str, Any]:
        core = self.core
        with core.lock:
            st = core.state
            return {
                "datapath": core.port.kind,
                "generation": st.generation,
                "health_version": core.health_version,
                "sizes": core.port.sizes.__dict__,
                "vips": len(st.config.vips),
                "reals": len(st.ids.reals),
                "quic_servers": len(st.config.quic_servers),
                "source_routes": len(st.config.source_routes),
                "dirty": core.dirty,
                "last_reconcile": core.last_reconcile,
                "counters": dict(core.counters),
            }

    def health(self) -> list[dict[str, Any]]:
        """Per (VIP, real) with a health check: the verdict the rings are built with."""
        core = self.core
        with core.lock:
            st, tb = core.state, core.tables
            out = []
            for (key, addr), t in core.targets(st).items():
                out.append({"vip": vip_label(key), "real": addr, "check": t.spec.type, "port": t.port,
                            "state": "up" if core.health.get((key, addr), True) else "down",
                            "all_reals_down": bool(tb and key in tb.all_down),
                            "on_all_down": t.spec.on_all_down})
            return out

    # --- simulate ---------------------------------------------------------------------------------

    def _simulator(self) -> Any:
        """A userspace datapath on the current effective tables (fresh connection table):
        where would a new flow go now? Cached per (generation, health version)."""
        from lb.simulate import UserspaceSimulator

        core = self.core
        with core.lock:
            version = (core.state.generation, core.health_version)
            if self._sim_cache is None or self._sim_cache[0] != version:
                assert core.tables is not None
                self._sim_cache = (version, core.tables.to_datapath_tables())
            tables = self._sim_cache[1]
        return UserspaceSimulator(tables)

    def simulate(self, q: FlowQuery, frame: bytes) -> dict[str, Any]:
        """Where ``frame`` (a packet of the flow ``q``) goes, as a new flow, now."""
        v = self._simulator().run(frame)
        ids = self.core.state.ids
        rid = None
        if v.real is not None:
            rid = ids.reals.get(v.real)
        vip = None
        for cand in ((q.dst, q.dport, q.protocol), (q.dst, 0, q.protocol)):
            if cand in ids.vips:
                vip = vip_label(cand)
                break
        return {"action": v.action, "real": v.real, "real_id": rid, "vip": vip, "note": SIMULATE_NOTE}
