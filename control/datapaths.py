"""Datapath ports: what the reconciler writes to, and where stats come from.

* :class:`MemoryPort` keeps the tables in memory (numpy arrays in lb.layout formats).
  It is the test double for the reconciler (with fault injection) and the base of
* :class:`UserspacePort`, which feeds those tables to the numba datapath
  (:class:`lb.datapath.UserspaceDatapath`) after every unit of writes, without packet
  I/O (``lbctl serve --datapath userspace --no-packet-io``: tests, dry runs);
* :class:`UserspaceIoPort`, the same on a real interface through
  :class:`lb.userspace_io.UserspaceBalancer` (hosts without XDP);
* :class:`XdpPort` writes the BPF maps of an :class:`lb.bpf_loader.XdpBalancer`:
  element updates for VIPs, reals and the routing maps (QUIC server ids, source-route
  LPM tries), the mmap'ed ring array for slots and the mmap'ed down set for its words.

Every port can describe its current contents (the :class:`~control.reconcile.DatapathView`
half), so the reconciler can diff against what is really there, e.g. pinned maps left by
a previous daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from control.reconcile import (
    DeleteEntry,
    DeleteVip,
    DeleteVipAddr,
    Op,
    PutEntry,
    PutVip,
    PutVipAddr,
    ResetCounters,
    WriteCtl,
    WriteDownWord,
    WritePrevRef,
    WritePrevRing,
    WriteReal,
    WriteRing,
)
from control.tables import (
    ROUTING_TABLES,
    Sizes,
    is_prefix_record,
    routing_arrays,
    vip_arrays,
)
from lb import constants as C
from lb import layout
from lb.datapath_tables import DatapathTables, empty_down_set

__all__ = ["FAULT_RING_WRITE_DELAY", "ConnEntry", "MemoryPort", "Stats", "UserspaceIoPort", "UserspacePort",
           "XdpPort", "fault_ring_write_delay"]

log = logging.getLogger("lb.datapath")

# Test-only fault injection (tests/test_faults_daemon_kill.py): seconds to sleep in the
# middle of every ring write, between its first and second half of slots, so that a
# SIGKILL can be aimed at a reconcile that has half-written a ring. Read once, where a
# port is made (the edge), never by the packet path; unset or 0 in production.
FAULT_RING_WRITE_DELAY = "LB_FAULT_RING_WRITE_DELAY"


def fault_ring_write_delay() -> float:
    """The injected delay in seconds (0.0: none); logs a warning when one is set."""
    raw = os.environ.get(FAULT_RING_WRITE_DELAY, "")
    try:
        delay = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{FAULT_RING_WRITE_DELAY}={raw!r}: expected seconds") from None
    if delay < 0:
        raise ValueError(f"{FAULT_RING_WRITE_DELAY}={raw!r}: must not be negative")
    if delay:
        log.warning("fault injection: every ring write sleeps %.2f s half-way (%s)", delay,
                    FAULT_RING_WRITE_DELAY)
    return delay


def _write_ring(op: WriteRing, write: Callable[[np.ndarray, np.ndarray], None], delay: float,
                kind: str) -> None:
    """``write(slots, values)`` for the op's slots; with an injected ``delay``, the first
    half first, then a logged sleep, then all of them."""
    half = op.slots.size // 2
    if delay and half:
        write(op.slots[:half], op.new[:half])
        log.warning("fault injection: ring %d half written (%s, %d of %d slots), sleeping %.2f s",
                    op.vip_num, kind, half, op.slots.size, delay)
        time.sleep(delay)
    write(op.slots, op.new)

COLS = max(C.VIP_STAT_PACKETS, C.VIP_STAT_BYTES) + 1  # per VIP
REAL_COLS = C.REAL_STAT_COLUMNS  # per real: the same two and connection-table misses
# entries each routing map holds (as sized in lb.bpf_loader / xdp/maps.h)
ROUTING_CAPACITY = {"quic_servers": C.MAX_QUIC_SERVER_IDS, "src_routes_v4": C.MAX_SRC_ROUTES,
                    "src_routes_v6": C.MAX_SRC_ROUTES}


@dataclass(frozen=True)
class Stats:
    """Cumulative counters. vip: int[max_vips, 2] by vip_num, columns C.VIP_STAT_PACKETS /
    C.VIP_STAT_BYTES; real: int[max_reals, C.REAL_STAT_COLUMNS] by real id, the same
    columns and C.REAL_STAT_LRU_MISS."""

    counters: dict[str, int]
    vip: np.ndarray
    real: np.ndarray


@dataclass(frozen=True)
class ConnEntry:
    """One connection-table entry."""

    src: str
    dst: str
    sport: int
    dport: int
    protocol: str
    real_id: int
    atime_ns: int


class MemoryPort:
    """Tables in memory, with the BPF maps' limits (the VIP hash maps refuse a new key
    beyond max_vips entries, the routing maps beyond ROUTING_CAPACITY). ``fail`` (a
    predicate on an op) makes :meth:`apply` raise, to test rollback; ``writes`` lists the
    ops applied."""

    kind = "memory"

    def __init__(self, sizes: Sizes, fail: Callable[[Op], bool] | None = None) -> None:
        self.sizes = sizes
        self.vips: dict[bytes, bytes] = {}
        self.addrs: set[bytes] = set()
        self.reals = np.zeros(sizes.max_reals, dtype=layout.REAL)
        self.ctl = bytes(layout.CTL.itemsize)
        self.routing: dict[str, dict[bytes, bytes]] = {name: {} for name in ROUTING_TABLES}
        # lazily zero pages: costs memory only for the rows in use
        self.rings = np.zeros((sizes.max_vips, sizes.ring_size), dtype=np.uint32)
        self.down = empty_down_set(sizes.max_vips, sizes.max_reals)  # written in place, as rings
        self.prev_rings = np.zeros((C.MAX_PREV_RINGS, sizes.ring_size), dtype=np.uint32)
        self.prev_ref_words = np.zeros(sizes.max_vips, dtype=np.uint32)
        self.vip_stats = np.zeros((sizes.max_vips, COLS), dtype=np.int64)
        self.real_stats = np.zeros((sizes.max_reals, REAL_COLS), dtype=np.int64)
        self.fail = fail
        self.writes: list[Op] = []
        self.commits = 0
        self.ring_write_delay = fault_ring_write_delay()

    # view
    def vip_entries(self) -> dict[bytes, bytes]:
        return dict(self.vips)

    def vip_addr_entries(self) -> set[bytes]:
        return set(self.addrs)

    def real_entries(self) -> dict[int, bytes]:
        used = np.flatnonzero(self.reals["family"])
        return {int(i): self.reals[i : i + 1].tobytes() for i in used}

    def ctl_entry(self) -> bytes:
        return self.ctl

    def ring(self, vip_num: int) -> np.ndarray:
        return self.rings[vip_num].copy()

    def routing_entries(self, table: str) -> dict[bytes, bytes]:
        return dict(self.routing[table])

    def down_words(self) -> dict[int, int]:
        flat = self.down.reshape(-1)
        return {int(i): int(flat[i]) for i in np.flatnonzero(flat)}

    def prev_ring(self, slot: int) -> np.ndarray:
        return self.prev_rings[slot].copy()

    def prev_refs(self) -> dict[int, int]:
        return {int(i): int(self.prev_ref_words[i]) for i in np.flatnonzero(self.prev_ref_words)}

    # writes
    def apply(self, op: Op) -> None:
        if self.fail is not None and self.fail(op):
            raise OSError(f"injected failure on {type(op).__name__}")
        if isinstance(op, WriteReal):
            self.reals[op.real_id] = np.frombuffer(op.new, dtype=layout.REAL)[0]
        elif isinstance(op, WriteCtl):
            self.ctl = op.new
        elif isinstance(op, WriteRing):
            _write_ring(op, self.rings[op.vip_num].__setitem__, self.ring_write_delay, self.kind)
        elif isinstance(op, PutVipAddr):
            if op.key not in self.addrs and len(self.addrs) >= self.sizes.max_vips:
                raise OSError(errno.E2BIG, "vip_addrs is full")  # as the kernel's hash map
            self.addrs.add(op.key)
        elif isinstance(op, DeleteVipAddr):
            self.addrs.discard(op.key)
        elif isinstance(op, PutVip):
            if op.key not in self.vips and len(self.vips) >= self.sizes.max_vips:
                raise OSError(errno.E2BIG, "vip_map is full")
            self.vips[op.key] = op.new
        elif isinstance(op, DeleteVip):
            self.vips.pop(op.key, None)
        elif isinstance(op, PutEntry):
            entries = self.routing[op.table]
            if op.key not in entries and len(entries) >= ROUTING_CAPACITY[op.table]:
                raise OSError(errno.E2BIG, f"{op.table} is full")
            entries[op.key] = op.new
        elif isinstance(op, DeleteEntry):
            self.routing[op.table].pop(op.key, None)
        elif isinstance(op, WriteDownWord):
            self.down.reshape(-1)[op.index] = np.uint64(op.new)
        elif isinstance(op, ResetCounters):
            (self.vip_stats if op.table == "vip" else self.real_stats)[op.index] = 0
        elif isinstance(op, WritePrevRing):
            self.prev_rings[op.slot, op.slots] = op.new
        elif isinstance(op, WritePrevRef):
            self.prev_ref_words[op.vip_num] = op.new
        else:  # pragma: no cover
            raise TypeError(f"unknown op {op!r}")
        self.writes.append(op)

    def commit(self) -> None:
        self.commits += 1

    def to_datapath_tables(self) -> DatapathTables:
        s = self.sizes
        return DatapathTables(
            ring_size=s.ring_size, max_vips=s.max_vips, max_reals=s.max_reals,
            conn_table_size=s.conn_table_size, **vip_arrays(self.vips, self.addrs),
            reals=np.frombuffer(bytearray(self.reals.tobytes()), dtype=layout.REAL),
            rings=self.rings,
            ctl=np.frombuffer(bytearray(self.ctl), dtype=layout.CTL, count=1),
            **routing_arrays(self.routing), prev_rings=self.prev_rings, prev_refs=self.prev_ref_words,
            down_set=self.down)

    # stats
    def read_stats(self) -> Stats:
        return Stats({name: 0 for name in C.STATS}, self.vip_stats.copy(), self.real_stats.copy())

    def conn_count(self) -> int:
        return 0

    def conn_entries(self, limit: int) -> list[ConnEntry]:
        return []


class UserspacePort(MemoryPort):
    """The numba datapath, fed from the in-memory tables at every commit. The
    connection table and counters live in the datapath object and survive reloads."""

    kind = "userspace"

    def __init__(self, sizes: Sizes, fail: Callable[[Op], bool] | None = None) -> None:
        super().__init__(sizes, fail)
        from lb.datapath import UserspaceDatapath

        self.dp = UserspaceDatapath(self.to_datapath_tables())
        self.vip_stats = self.dp.vip_stats  # one set of counters: the datapath's
        self.real_stats = self.dp.real_stats

    def commit(self) -> None:
        super().commit()
        self.dp.load_tables(self.to_datapath_tables())

    def read_stats(self) -> Stats:
        return Stats(self.dp.stats_dict(), self.dp.vip_stats.copy(), self.dp.real_stats.copy())

    def conn_count(self) -> int:
        return self.dp.conn_table_size()


class UserspaceIoPort(MemoryPort):
    """The numba datapath on a real interface (:class:`lb.userspace_io.UserspaceBalancer`:
    AF_PACKET ring in, frames out of the same interface). Ring slots and down-set words
    are written in place in the arrays its loop reads (aligned 32-/64-bit stores, as with
    XDP); VIP, real and control changes take effect at :meth:`commit`, between two
    batches. Its connection table and counters live in the process: a restart starts them
    afresh."""

    kind = "userspace"

    def __init__(self, sizes: Sizes, ifname: str, netns: str | None = None,
                 fail: Callable[[Op], bool] | None = None, **kw: Any) -> None:
        super().__init__(sizes, fail)
        from lb.userspace_io import UserspaceBalancer

        self.bal = UserspaceBalancer(self.to_datapath_tables(), ifname, netns, **kw)
        self.vip_stats = self.bal.dp.vip_stats  # one set of counters: the loop's
        self.real_stats = self.bal.dp.real_stats

    def start(self) -> None:
        self.bal.start()

    def stop(self) -> None:
        self.bal.stop()

    def commit(self) -> None:
        super().commit()
        self.bal.update_tables(self.to_datapath_tables())

    def read_stats(self) -> Stats:
        counters = self.bal.stats()
        return Stats({name: int(counters.get(name, 0)) for name in C.STATS}, self.bal.vip_stats(),
                     self.bal.real_stats())

    def conn_count(self) -> int:
        return self.bal.dp.conn_table_size()


def _addr(raw: np.ndarray, family: int) -> str:
    from lb.datapath_tables import addr_from16

    return str(addr_from16(raw, family))


_PROTO = {C.IPPROTO_TCP: "tcp", C.IPPROTO_UDP: "udp"}


class XdpPort:
    """The maps of a loaded :class:`lb.bpf_loader.XdpBalancer`."""

    kind = "xdp"

    def __init__(self, bal: Any) -> None:
        from lb.kernel import maps as B

        self._B = B
        self.bal = bal
        self.sizes = Sizes.of(bal)
        self._one = (1).to_bytes(4, "little")
        # vip_map writes not yet in the program's VIP index: a run of Put/DeleteVip is
        # published in one switch, before the next other write (so the reconciler's
        # order still holds) or at commit
        self._vips_unpublished = False
        self.ring_write_delay = fault_ring_write_delay()

    def _publish_vips(self) -> None:
        if self._vips_unpublished:
            self.bal.publish_vips()
            self._vips_unpublished = False

    def _fd(self, name: str) -> int:
        return self.bal.map_fd(name)

    # view
    def _hash_entries(self, name: str, ksz: int, vsz: int) -> dict[bytes, bytes]:
        """A hash map's entries in one BPF_MAP_LOOKUP_BATCH (a few for big maps)."""
        keys, values, n = self._B.map_lookup_batch(self._fd(name), ksz, vsz, chunk=1024)
        return {keys[i * ksz:(i + 1) * ksz]: values[i * vsz:(i + 1) * vsz] for i in range(n)}

    def _trie_entries(self, name: str, ksz: int, vsz: int) -> dict[bytes, bytes]:
        """An LPM trie's entries. Tries have no batch operations: walk the keys, and look
        each up by its exact key (which a trie answers with that key's own value)."""
        fd = self._fd(name)
        out = {}
        for k in self._B.map_keys(fd, ksz):
            v = self._B.map_lookup(fd, k, vsz)
            if v is not None:
                out[k] = v
        return out

    def vip_entries(self) -> dict[bytes, bytes]:
        """Exact VIPs (vip_map) and CIDR VIPs (vip_prefixes), told apart by key size."""
        return {**self._hash_entries("vip_map", layout.VIP_KEY.itemsize, layout.VIP_META.itemsize),
                **self._trie_entries("vip_prefixes", layout.VIP_LPM_KEY.itemsize, layout.VIP_META.itemsize)}

    def vip_addr_entries(self) -> set[bytes]:
        return (set(self._hash_entries("vip_addrs", layout.VIP_ADDR_KEY.itemsize, 4))
                | set(self._trie_entries("vip_prefix_addrs", layout.VIP_LPM_KEY.itemsize, 4)))

    def real_entries(self) -> dict[int, bytes]:
        keys, values, n = self._B.map_lookup_batch(self._fd("reals"), 4, layout.REAL.itemsize)
        ids = np.frombuffer(keys, dtype="<u4", count=n)
        recs = np.frombuffer(values, dtype=layout.REAL, count=n)
        size = layout.REAL.itemsize
        return {int(ids[i]): values[i * size : (i + 1) * size]
                for i in np.flatnonzero(recs["family"])}

    def ctl_entry(self) -> bytes:
        v = self._B.map_lookup(self._fd("ctl"), (0).to_bytes(4, "little"), layout.CTL.itemsize)
        return v if v is not None else bytes(layout.CTL.itemsize)

    def ring(self, vip_num: int) -> np.ndarray:
        return self.bal.ring(vip_num)

    def down_words(self) -> dict[int, int]:
        return self.bal.down_words()

    def prev_ring(self, slot: int) -> np.ndarray:
        return self.bal.prev_ring(slot)

    def prev_refs(self) -> dict[int, int]:
        keys, values, n = self._B.map_lookup_batch(self._fd("prev_ref"), 4, 4)
        nums = np.frombuffer(keys, dtype="<u4", count=n)
        words = np.frombuffer(values, dtype="<u4", count=n)
        return {int(nums[i]): int(words[i]) for i in np.flatnonzero(words)}

    def routing_entries(self, table: str) -> dict[bytes, bytes]:
        if table == "quic_servers":  # a hash map: one batch lookup
            return self._hash_entries(table, 4, 4)
        key_size = (layout.LPM_V4_KEY if table == "src_routes_v4" else layout.LPM_V6_KEY).itemsize
        return self._trie_entries(table, key_size, 4)

    # writes
    def apply(self, op: Op) -> None:
        B = self._B
        if isinstance(op, (PutVip, DeleteVip)) and is_prefix_record(op.key):
            # a CIDR VIP: one element of the vip_prefixes trie, seen by the next packet
            if isinstance(op, PutVip):
                B.map_update(self._fd("vip_prefixes"), op.key, op.new)
            else:
                B.map_delete(self._fd("vip_prefixes"), op.key)
            return
        if isinstance(op, PutVip):
            B.map_update(self._fd("vip_map"), op.key, op.new)
            self._vips_unpublished = True
            return
        if isinstance(op, DeleteVip):
            B.map_delete(self._fd("vip_map"), op.key)
            self._vips_unpublished = True
            return
        self._publish_vips()
        if isinstance(op, WriteReal):
            B.map_update(self._fd("reals"), op.real_id.to_bytes(4, "little"), op.new)
        elif isinstance(op, WriteCtl):
            B.map_update(self._fd("ctl"), (0).to_bytes(4, "little"), op.new)
        elif isinstance(op, WriteRing):
            def write(slots: np.ndarray, values: np.ndarray, num: int = op.vip_num) -> None:
                ring = self.bal.ring(num)
                ring[slots] = values
                self.bal.update_ring(num, ring)

            _write_ring(op, write, self.ring_write_delay, self.kind)
        elif isinstance(op, PutVipAddr):
            B.map_update(self._fd(self._addr_map(op.key)), op.key, self._one)
        elif isinstance(op, DeleteVipAddr):
            B.map_delete(self._fd(self._addr_map(op.key)), op.key)
        elif isinstance(op, PutEntry):
            B.map_update(self._fd(op.table), op.key, op.new)
        elif isinstance(op, DeleteEntry):
            B.map_delete(self._fd(op.table), op.key)
        elif isinstance(op, WriteDownWord):
            self.bal.write_down_word(op.index, op.new)
        elif isinstance(op, ResetCounters):
            fd = self._fd("vip_stats" if op.table == "vip" else "real_stats")
            cols = COLS if op.table == "vip" else REAL_COLS
            B.map_update(fd, op.index.to_bytes(4, "little"), bytes(8 * cols * self.bal.ncpus))
        elif isinstance(op, WritePrevRing):
            ring = self.bal.prev_ring(op.slot)
            ring[op.slots] = op.new
            self.bal.update_prev_ring(op.slot, ring)
        elif isinstance(op, WritePrevRef):
            self.bal.set_prev_ref(op.vip_num, op.new)
        else:  # pragma: no cover
            raise TypeError(f"unknown op {op!r}")

    @staticmethod
    def _addr_map(key: bytes) -> str:
        return "vip_prefix_addrs" if is_prefix_record(key) else "vip_addrs"

    def commit(self) -> None:
        self._publish_vips()

    # stats
    def read_stats(self) -> Stats:
        s = self.bal.read_stats()
        return Stats(dict(s.counters), s.vip.astype(np.int64), s.real.astype(np.int64))

    def conn_count(self) -> int:
        return self.bal.conn_table_count()

    def conn_entries(self, limit: int) -> list[ConnEntry]:
        keys, values = self.bal.conn_table_entries()
        out = []
        for k, v in zip(keys[:limit], values[:limit], strict=True):
            fam = int(k["family"])
            out.append(ConnEntry(_addr(k["src"], fam), _addr(k["dst"], fam), int(k["sport"]),
                                 int(k["dport"]), _PROTO.get(int(k["proto"]), str(int(k["proto"]))),
                                 int(v["real_id"]), int(v["atime"])))
        return out
