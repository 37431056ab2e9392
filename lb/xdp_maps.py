"""The XDP program's helper-free tables, seen from userspace: the VIP index and the
connection table (xdp/maps.h: vip_slots, lb_runtime, conn_sets).

Both live in mmap-able array maps. The VIP index is rebuilt whole from the canonical VIP
set (vip_map) into the half the program is not reading, then switched on with one
aligned 8-byte store to ``lb_runtime.vip_index`` (lb/xdp_tables.py). The connection table
is read and cleared through its mapping.
"""

from __future__ import annotations

import mmap
import secrets
import time

import numpy as np

from lb import constants, layout
from lb.kernel.maps import map_update_batch
from lb.xdp_tables import build_vip_slots

# A half of vip_slots is rewritten only after it has been out of use this long: every
# program run that could still be probing it (microseconds) has ended by then.
HALF_QUIET_S = 0.05


def map_array(fd: int, value_size: int, entries: int) -> tuple[mmap.mmap, np.ndarray]:
    """mmap an mmap-able array map; returns (mapping, uint8 array [entries, value_size]).
    The kernel stores elements round_up(value_size, 8) bytes apart."""
    stride = (value_size + 7) // 8 * 8
    size = stride * entries
    mm = mmap.mmap(fd, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE,
                   mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    raw = np.frombuffer(mm, dtype=np.uint8, count=size).reshape(entries, stride)
    return mm, raw[:, :value_size]


class VipIndex:
    """Writer of vip_slots + lb_runtime.vip_index (and the connection-table seed)."""

    def __init__(self, slots_fd: int, runtime_fd: int, nslots: int) -> None:
        self.nslots = nslots
        self._slots_fd = slots_fd
        self._mm, raw = map_array(runtime_fd, layout.RUNTIME.itemsize, 1)
        self._rt = raw.view(np.uint64).ravel()  # [vip_index, conn_seed, capture]
        self._retired = 0.0  # when the half not live now was last switched off
        if self._rt[1] == 0:  # a new map: choose the connection table's seed once
            self._rt[1] = np.uint64(secrets.randbits(64) | 1)

    @property
    def conn_seed(self) -> int:
        return int(self._rt[1])

    @property
    def live_half(self) -> int:
        return int(self._rt[0]) & 1

    def publish(self, keys: list[bytes], metas: list[bytes]) -> None:
        """Make ``keys`` -> ``metas`` the VIP set the program sees, in one switch."""
        slots, seed = build_vip_slots(keys, metas, self.nslots)
        half = self.live_half ^ 1
        wait = self._retired + HALF_QUIET_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        idx = np.arange(half * self.nslots, (half + 1) * self.nslots, dtype=np.uint32)
        map_update_batch(self._slots_fd, idx, slots)
        self._rt[0] = np.uint64((seed << 32) | half)  # one aligned store
        self._retired = time.monotonic()

    def close(self) -> None:
        self._rt = None
        self._mm.close()


class ConnSets:
    """The set-associative connection table (all CPUs'), through its mappings: entries
    (conn_sets) and the flow keys beside them (conn_keys)."""

    def __init__(self, sets_fd: int, keys_fd: int, ncpus: int, conn_table_size: int) -> None:
        self.sets = ncpus * constants.conn_sets(conn_table_size)
        ways = self.sets * constants.CONN_WAYS
        self._mm, raw = map_array(sets_fd, layout.CONN_ENTRY.itemsize * constants.CONN_WAYS,
                                  self.sets)
        self._ways = raw.reshape(ways, layout.CONN_ENTRY.itemsize)
        self._kmm, self._keys = map_array(keys_fd, layout.FLOW_KEY.itemsize, ways)
        self._real = layout.CONN_ENTRY.fields["real_id"][1]

    def _used(self) -> np.ndarray:
        ids = self._ways[:, self._real:self._real + 4]
        return np.flatnonzero(np.ascontiguousarray(ids).view("<u4").ravel())

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry: (keys as layout.FLOW_KEY, values as layout.CONN_VALUE, atime in
        ns), index-aligned."""
        used = self._used()
        rows = np.ascontiguousarray(self._ways[used]).view(layout.CONN_ENTRY).ravel()
        values = np.zeros(len(rows), dtype=layout.CONN_VALUE)
        values["real_id"] = rows["real_id"]
        values["atime"] = rows["atime"].astype(np.uint64) << np.uint64(constants.CONN_TIME_SHIFT)
        # each entry's key is in its set's conn_keys at the slot in the tag's low 2 bits;
        # copied as bytes, then viewed: a structured copy would leave the padding undefined
        slots = (used // constants.CONN_WAYS) * constants.CONN_WAYS + (rows["tag"] & constants.CONN_KEY_SLOT_MASK).astype(np.int64)
        keys = np.array(self._keys[slots], dtype=np.uint8).view(layout.FLOW_KEY).ravel()
        return keys, values

    def count(self) -> int:
        return int(self._used().size)

    def clear(self) -> int:
        """Empty every way; returns how many entries there were."""
        n = self.count()
        self._ways[:] = 0
        self._keys[:] = 0
        return n

    def close(self) -> None:
        self._ways = self._keys = None
        self._mm.close()
        self._kmm.close()
