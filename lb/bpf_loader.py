"""Compile, load, attach and feed the XDP datapath (xdp/balancer.c) with bcc.

``XdpBalancer`` owns one loaded program and its maps:

* sizes (ring size, max VIPs/reals, connection-table size) are compile-time ``-D`` flags
  from :func:`lb.c_header.c_flags`; every other constant and every struct the C side uses
  comes from the generated ``xdp/generated/lb_shared.h``;
* maps can be pinned under a per-instance bpffs directory (``pin_dir``): a restarted
  control plane that loads with the same ``pin_dir`` gets the same maps, counters and
  connection table included;
* tables from :func:`lb.datapath_tables.compile_tables` are written with raw bpf() calls
  (batch updates, and mmaps of the Maglev rings and the down set), never element by
  element from Python for the large ones.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lb import constants, layout
from lb.c_header import c_flags
from lb.datapath_tables import (
    down_set_of,
    prefix_tables,
    prev_ring_tables,
    routing_tables,
)
from lb.kernel.cpus import possible_cpus
from lb.kernel.maps import (
    BPF_F_MMAPABLE,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    map_delete,
    map_info,
    map_keys,
    map_lookup,
    map_update,
    map_update_batch,
    percpu_row_sums,
)
from lb.kernel.objects import BPFFS, obj_get, obj_pin
from lb.kernel.progs import prog_info
from lb.kernel.syscall import KernelError
from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, xdp_attach, xdp_detach
from lb.xdp_maps import ConnSets, VipIndex, map_array
from lb.xdp_tables import conn_set_index

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
PROG_NAME = "balancer_xdp"
# counter maps: pinned with another layout they are replaced (counting from 0), not refused
COUNTER_MAPS = ("stats", "vip_stats", "real_stats")

log = logging.getLogger(__name__)

XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class XdpError(RuntimeError):
    """The XDP program could not be compiled, loaded, attached or fed."""


class XdpAttachError(XdpError):
    """Attaching to (or detaching from) an interface failed."""


class PinnedMapMismatch(XdpError):
    """Maps pinned under pin_dir were made for other sizes or another layout."""


# ---- stats ----------------------------------------------------------------------------

@dataclass(frozen=True)
class BalancerStats:
    """Counters summed over CPUs.

    counters: name (lb.constants.STATS) -> value.
    vip: uint64 [max_vips, 2], columns VIP_STAT_PACKETS / VIP_STAT_BYTES, row = vip_num.
    real: uint64 [max_reals, REAL_STAT_COLUMNS], the same columns and REAL_STAT_LRU_MISS,
    row = real id.
    """

    counters: dict[str, int]
    vip: np.ndarray
    real: np.ndarray


# Map name -> (type, key size, value size, max_entries, flags).
def _map_specs(ring_size: int, max_vips: int, max_reals: int, conn_table_size: int,
               ncpus: int) -> dict[str, tuple[int, int, int, int, int]]:
    cols = max(constants.VIP_STAT_PACKETS, constants.VIP_STAT_BYTES) + 1
    conn_set = layout.CONN_ENTRY.itemsize * constants.CONN_WAYS
    return {
        "vip_map": (BPF_MAP_TYPE_HASH, layout.VIP_KEY.itemsize, layout.VIP_META.itemsize,
                    max_vips, 0),
        "vip_slots": (BPF_MAP_TYPE_ARRAY, 4, layout.VIP_SLOT.itemsize,
                      2 * constants.vip_slots(max_vips), 0),
        "lb_runtime": (BPF_MAP_TYPE_ARRAY, 4, layout.RUNTIME.itemsize, 1, BPF_F_MMAPABLE),
        "vip_addrs": (BPF_MAP_TYPE_HASH, layout.VIP_ADDR_KEY.itemsize, 4, max_vips, 0),
        "vip_prefixes": (BPF_MAP_TYPE_LPM_TRIE, layout.VIP_LPM_KEY.itemsize,
                         layout.VIP_META.itemsize, max_vips, BPF_F_NO_PREALLOC),
        "vip_prefix_addrs": (BPF_MAP_TYPE_LPM_TRIE, layout.VIP_LPM_KEY.itemsize, 4, max_vips,
                             BPF_F_NO_PREALLOC),
        "reals": (BPF_MAP_TYPE_ARRAY, 4, layout.REAL.itemsize, max_reals, 0),
        "down_set": (BPF_MAP_TYPE_ARRAY, 4, layout.DOWN_WORD.itemsize,
                     max_vips * constants.down_row_words(max_reals), BPF_F_MMAPABLE),
        "ch_rings": (BPF_MAP_TYPE_ARRAY, 4, 4, max_vips * ring_size, BPF_F_MMAPABLE),
        "conn_sets": (BPF_MAP_TYPE_ARRAY, 4, conn_set,
                      ncpus * constants.conn_sets(conn_table_size), BPF_F_MMAPABLE),
        "conn_keys": (BPF_MAP_TYPE_ARRAY, 4, layout.FLOW_KEY.itemsize,
                      ncpus * constants.conn_sets(conn_table_size) * constants.CONN_WAYS,
                      BPF_F_MMAPABLE),
        "ctl": (BPF_MAP_TYPE_ARRAY, 4, layout.CTL.itemsize, 1, 0),
        "conn_rates": (BPF_MAP_TYPE_ARRAY, 4, layout.CONN_RATE.itemsize, ncpus, 0),
        "quic_servers": (BPF_MAP_TYPE_HASH, 4, 4, constants.MAX_QUIC_SERVER_IDS, 0),
        "src_routes_v4": (BPF_MAP_TYPE_LPM_TRIE, layout.LPM_V4_KEY.itemsize, 4,
                          constants.MAX_SRC_ROUTES, BPF_F_NO_PREALLOC),
        "src_routes_v6": (BPF_MAP_TYPE_LPM_TRIE, layout.LPM_V6_KEY.itemsize, 4,
                          constants.MAX_SRC_ROUTES, BPF_F_NO_PREALLOC),
        "stats": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8 * constants.N_STATS, 1, 0),
        "vip_stats": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8 * cols, max_vips, 0),
        "real_stats": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8 * constants.REAL_STAT_COLUMNS, max_reals, 0),
        "capture_ring": (BPF_MAP_TYPE_RINGBUF, 0, 0, constants.CAPTURE_RING_BYTES, 0),
        "capture_buckets": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, layout.CAPTURE_BUCKET.itemsize, 1, 0),
        "prev_rings": (BPF_MAP_TYPE_ARRAY, 4, 4, constants.MAX_PREV_RINGS * ring_size, BPF_F_MMAPABLE),
        "prev_ref": (BPF_MAP_TYPE_ARRAY, 4, layout.PREV_REF.itemsize, max_vips, 0),
    }


class XdpBalancer:
    """One loaded balancer_xdp program and its maps.

    Sizes must equal those of the tables later given to :meth:`load_tables`
    (``XdpBalancer.from_tables`` takes them from the tables). With ``pin_dir`` the maps
    live under that bpffs directory and survive this object; a new XdpBalancer with the
    same ``pin_dir`` (and the same sizes, checked) reuses them.
    """

    def __init__(
        self,
        ring_size: int = constants.RING_SIZE,
        max_vips: int = constants.MAX_VIPS,
        max_reals: int = constants.MAX_REALS,
        conn_table_size: int = constants.CONN_TABLE_SIZE,
        *,
        pin_dir: str | os.PathLike[str] | None = None,
        extra_cflags: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.ring_size = ring_size
        self.max_vips = max_vips
        self.max_reals = max_reals
        self.conn_table_size = conn_table_size
        self.ncpus = possible_cpus()
        self.pin_dir = str(pin_dir) if pin_dir is not None else None
        self.extra_cflags = list(extra_cflags)
        self._specs = _map_specs(ring_size, max_vips, max_reals, conn_table_size, self.ncpus)
        self._attached: tuple[str, int, str | None] | None = None  # (ifname, flags, netns)
        self._rings_mm: mmap.mmap | None = None
        self._rings: np.ndarray | None = None
        self._down_mm: mmap.mmap | None = None
        self._down: np.ndarray | None = None  # uint64[max_vips, down_row_words]
        self._prev_mm: mmap.mmap | None = None
        self._prev: np.ndarray | None = None
        if self.pin_dir is not None:
            os.makedirs(self.pin_dir, exist_ok=True)
            self._check_pinned(self.pin_dir)
        t0 = time.monotonic()
        self._bpf, self._fn = self._compile(self.pin_dir)
        self.load_seconds = time.monotonic() - t0
        self._map_rings()
        self._vip_index = VipIndex(self.map_fd("vip_slots"), self.map_fd("lb_runtime"),
                                   constants.vip_slots(max_vips))
        self._conn = ConnSets(self.map_fd("conn_sets"), self.map_fd("conn_keys"), self.ncpus,
                              conn_table_size)

    @classmethod
    def from_tables(cls, tables: Any, **kwargs: Any) -> "XdpBalancer":
        """Load a program sized for ``tables`` and write the tables into its maps."""
        bal = cls(tables.ring_size, tables.max_vips, tables.max_reals, tables.conn_table_size,
                 **kwargs)
        bal.load_tables(tables)
        return bal

    # ---- compile / load ------------------------------------------------------------

    def cflags(self, pin_dir: str | None) -> list[str]:
        return c_flags(ring_size=self.ring_size, max_vips=self.max_vips,
                       max_reals=self.max_reals, conn_table_size=self.conn_table_size,
                       nr_cpus=possible_cpus(), pin_dir=pin_dir) + self.extra_cflags

    def _compile(self, pin_dir: str | None):
        from bcc import BPF  # Debian's python3-bpfcc; imported late so lb imports without it

        text = (XDP_DIR / "balancer.c").read_text()
        try:
            b = BPF(text=text.encode(), cflags=self.cflags(pin_dir))
            fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
        except Exception as e:  # bcc raises bare Exception
            raise XdpError(f"could not compile/load {PROG_NAME}: {e}") from e
        return b, fn

    def _check_pinned(self, pin_dir: str) -> None:
        problems = []
        stale_counters = []
        for name, (mtype, ksz, vsz, entries, flags) in self._specs.items():
            path = os.path.join(pin_dir, name)
            if not os.path.exists(path):
                continue
            fd = obj_get(path)
            try:
                info = map_info(fd)
            finally:
                os.close(fd)
            want = (mtype, ksz, vsz, entries, flags)
            have = (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)
            if want != have and name in COUNTER_MAPS:
                stale_counters.append((path, have, want))
            elif want != have:
                problems.append(f"{name}: pinned (type, key, value, entries, flags) = {have}, "
                                f"this program needs {want}")
        if problems:
            raise PinnedMapMismatch(
                f"maps pinned under {pin_dir} do not fit this program "
                f"(remove them with XdpBalancer.unpin_dir or use another pin_dir): "
                + "; ".join(problems))
        for path, have, want in stale_counters:
            # counters of another layout (an older version's): start them again rather than
            # refuse the forwarding state beside them; a counter reset, as after a reboot
            log.warning("%s: pinned counters have another layout (%s, this program needs %s): "
                        "replaced, counting from 0", path, have, want)
            os.unlink(path)

    def _map_rings(self) -> None:
        """mmap ch_rings, prev_rings and down_set."""
        self._rings_mm, self._rings = self._mmap_u32_rows("ch_rings", self.max_vips)
        self._prev_mm, self._prev = self._mmap_u32_rows("prev_rings", constants.MAX_PREV_RINGS)
        self._down_mm, raw = map_array(self.map_fd("down_set"), layout.DOWN_WORD.itemsize,
                                       self._specs["down_set"][3])
        self._down = raw.view(layout.DOWN_WORD).reshape(self.max_vips,
                                                         constants.down_row_words(self.max_reals))

    def _mmap_u32_rows(self, name: str, rows: int) -> tuple[mmap.mmap, np.ndarray]:
        """mmap a u32 array map of rows x ring_size slots as a [rows, ring_size] view. The
        kernel stores array elements round_up(value_size, 8) bytes apart, so the u32
        slots are every other u32 of the mapping."""
        fd = self.map_fd(name)
        n = rows * self.ring_size
        stride = (4 + 7) // 8 * 8
        size = n * stride
        mm_size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        mm = mmap.mmap(fd, mm_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        words = np.frombuffer(mm, dtype=np.uint32, count=size // 4)
        return mm, words.reshape(rows, self.ring_size, stride // 4)[:, :, 0]

    @property
    def prog_fd(self) -> int:
        return self._fn.fd

    def map_fd(self, name: str) -> int:
        if name not in self._specs:
            raise KeyError(name)
        return self._bpf[name.encode()].map_fd

    def map_ids(self) -> dict[str, int]:
        return {name: map_info(self.map_fd(name)).id for name in self._specs}

    def prog_info(self) -> dict[str, int | str]:
        return prog_info(self.prog_fd)

    # ---- attach / detach / replace ------------------------------------------------

    def attach(self, ifname: str, mode: str = "native", netns: str | None = None) -> None:
        """Attach to ``ifname`` in ``native`` (driver) or ``generic`` (skb) mode, in
        network namespace ``netns`` (a name under /run/netns) or the current one."""
        if mode not in XDP_MODES:
            raise ValueError(f"mode must be one of {sorted(XDP_MODES)}, not {mode!r}")
        flags = XDP_MODES[mode]
        try:
            xdp_attach(ifname, self.prog_fd, flags, netns)
        except KernelError as e:
            if mode == "native" and e.errno == errno.EOPNOTSUPP:
                raise XdpAttachError(
                    f"{ifname}: the driver cannot run XDP in native mode ({e}); "
                    f"attach with mode='generic' instead") from e
            raise XdpAttachError(f"attaching {PROG_NAME} to {ifname} ({mode}): {e}") from e
        self._attached = (ifname, flags, netns)

    def detach(self) -> None:
        if self._attached is None:
            return
        ifname, flags, netns = self._attached
        try:
            xdp_detach(ifname, flags, netns)
        except KernelError as e:
            raise XdpAttachError(f"detaching from {ifname}: {e}") from e
        self._attached = None

    @property
    def attached(self) -> tuple[str, str, str | None] | None:
        """(ifname, mode, netns) or None."""
        if self._attached is None:
            return None
        ifname, flags, netns = self._attached
        mode = "native" if flags == XDP_FLAGS_DRV_MODE else "generic"
        return ifname, mode, netns

    def replace_program(self, extra_cflags: tuple[str, ...] | list[str] | None = None) -> None:
        """Compile and load the program again (e.g. new code or extra cflags) on the same
        maps, and if attached swap it in atomically: the kernel replaces the program
        pointer in one step, no frame sees "no program". Without pin_dir the maps are
        pinned in a temporary bpffs directory just for the reload."""
        if extra_cflags is not None:
            self.extra_cflags = list(extra_cflags)
        old_ids = self.map_ids()
        tmp = None
        pin_dir = self.pin_dir
        if pin_dir is None:
            tmp = os.path.join(BPFFS, f"lbx-replace-{secrets.token_hex(4)}")
            os.mkdir(tmp)
            for name in self._specs:
                obj_pin(self.map_fd(name), os.path.join(tmp, name))
            pin_dir = tmp
        try:
            new_bpf, new_fn = self._compile(pin_dir)
        finally:
            if tmp is not None:
                self.unpin_dir(tmp)
        new_ids = {name: map_info(new_bpf[name.encode()].map_fd).id for name in self._specs}
        if new_ids != old_ids:
            new_bpf.cleanup()
            raise XdpError(f"replacement program got other maps: {old_ids} != {new_ids}")
        if self._attached is not None:
            ifname, flags, netns = self._attached
            try:
                xdp_attach(ifname, new_fn.fd, flags, netns)
            except KernelError as e:
                new_bpf.cleanup()
                raise XdpAttachError(f"replacing the program on {ifname}: {e}") from e
        old = self._bpf
        self._bpf, self._fn = new_bpf, new_fn
        old.cleanup()

    # ---- tables ---------------------------------------------------------------------

    def _check_sizes(self, tables: Any) -> None:
        mine = (self.ring_size, self.max_vips, self.max_reals, self.conn_table_size)
        theirs = (tables.ring_size, tables.max_vips, tables.max_reals, tables.conn_table_size)
        if mine != theirs:
            raise ValueError(f"tables sized (ring, vips, reals, conn) = {theirs}, program "
                             f"loaded for {mine}: load a new XdpBalancer")
        if tables.rings.shape != (self.max_vips, self.ring_size):
            raise ValueError(f"rings shape {tables.rings.shape} != "
                             f"{(self.max_vips, self.ring_size)}")
        if len(tables.reals) != self.max_reals:
            raise ValueError(f"reals has {len(tables.reals)} entries, need {self.max_reals}")
        down = down_set_of(tables)
        if down.shape != (self.max_vips, constants.down_row_words(self.max_reals)):
            raise ValueError(f"down_set shape {down.shape} != "
                             f"{(self.max_vips, constants.down_row_words(self.max_reals))}")
        if len(tables.vip_keys) != len(tables.vip_metas):
            raise ValueError("vip_keys and vip_metas differ in length")

    def load_tables(self, tables: Any) -> None:
        """Write a compiled configuration (lb.datapath_tables.DatapathTables) into the maps.

        Order keeps a live datapath consistent: (VIP, real) pairs leave the down set,
        then reals, rings and ctl, then pairs join the down set (a flow moves off a real
        only once the rings have), then the VIP address set and VIPs (new VIPs appear
        only once their rings are in place), then stale VIPs and addresses are deleted.
        Counters and the connection table are left alone."""
        self._check_sizes(tables)
        assert self._rings is not None and self._down is not None and self._prev is not None
        down = np.asarray(down_set_of(tables), dtype=layout.DOWN_WORD)
        self._down &= down
        reals = as_layout(tables.reals, layout.REAL)
        map_update_batch(self.map_fd("reals"), np.arange(self.max_reals, dtype=np.uint32),
                         reals)
        # previous rings before the refs that name them, both before the rings change
        prev_rings, prev_refs = prev_ring_tables(tables)
        np.copyto(self._prev, prev_rings)
        map_update_batch(self.map_fd("prev_ref"), np.arange(self.max_vips, dtype=np.uint32),
                         prev_refs.astype("<u4"))
        np.copyto(self._rings, np.asarray(tables.rings, dtype=np.uint32))
        np.copyto(self._down, down)
        ctl = as_layout(tables.ctl, layout.CTL)
        map_update(self.map_fd("ctl"), (0).to_bytes(4, "little"), ctl[:1].tobytes())

        addr_fd = self.map_fd("vip_addrs")
        new_addrs = {bytes(k) for k in _records(tables.vip_addr_keys, layout.VIP_ADDR_KEY)}
        one = (1).to_bytes(4, "little")
        for k in new_addrs:
            map_update(addr_fd, k, one)
        vip_fd = self.map_fd("vip_map")
        keys = _records(tables.vip_keys, layout.VIP_KEY)
        metas = _records(tables.vip_metas, layout.VIP_META)
        self._vip_index.publish(keys, metas)
        new_vips = set()
        for k, m in zip(keys, metas):
            map_update(vip_fd, k, m)
            new_vips.add(k)
        for k in map_keys(vip_fd, layout.VIP_KEY.itemsize):
            if k not in new_vips:
                map_delete(vip_fd, k)
        for k in map_keys(addr_fd, layout.VIP_ADDR_KEY.itemsize):
            if k not in new_addrs:
                map_delete(addr_fd, k)
        self.load_prefix_vips(tables)
        quic, src_v4, src_v6 = routing_tables(tables)
        self.sync_map("quic_servers", _id_records(quic["server_id"]), _id_records(quic["real_id"]))
        for name, dtype, routes in (("src_routes_v4", layout.LPM_V4_KEY, src_v4),
                                    ("src_routes_v6", layout.LPM_V6_KEY, src_v6)):
            self.sync_map(name, _records(routes["key"], dtype), _id_records(routes["real_id"]))

    def load_prefix_vips(self, tables: Any) -> None:
        """Make the CIDR VIP tries hold exactly the tables' prefix VIPs: new prefixes in
        vip_prefix_addrs before the VIPs that use them, and removed after (as vip_addrs)."""
        keys, metas, addrs = prefix_tables(tables)
        addr_recs = _records(addrs, layout.VIP_LPM_KEY)
        one = (1).to_bytes(4, "little")
        fd = self.map_fd("vip_prefix_addrs")
        for k in addr_recs:
            map_update(fd, k, one)
        self.sync_map("vip_prefixes", _records(keys, layout.VIP_LPM_KEY),
                      _records(metas, layout.VIP_META))
        self.sync_map("vip_prefix_addrs", addr_recs, [one] * len(addr_recs))

    def sync_map(self, name: str, keys: list[bytes], values: list[bytes]) -> tuple[int, int]:
        """Make map ``name`` hold exactly ``keys`` -> ``values``: write every pair that is
        missing or differs, then delete keys not listed. Returns (written, deleted)."""
        fd = self.map_fd(name)
        present = set(map_keys(fd, self._specs[name][1]))
        written = deleted = 0
        for k, v in zip(keys, values):
            # only an exact key is looked up: in an LPM trie a lookup of a missing prefix
            # would return a shorter prefix's value
            if k not in present or map_lookup(fd, k, len(v)) != v:
                map_update(fd, k, v)
                written += 1
        wanted = set(keys)
        for k in present - wanted:
            map_delete(fd, k)
            deleted += 1
        return written, deleted

    def update_ring(self, vip_num: int, new_ring: np.ndarray) -> int:
        """Write the slots of ring ``vip_num`` that differ from ``new_ring``; returns how
        many were written. Each slot is one aligned 32-bit store (atomic for readers)."""
        if not 0 <= vip_num < self.max_vips:
            raise IndexError(f"vip_num {vip_num} outside 0..{self.max_vips - 1}")
        assert self._rings is not None
        return self._write_slots(self._rings[vip_num], new_ring)

    def _write_slots(self, cur: np.ndarray, new_ring: np.ndarray) -> int:
        """Write the slots of the mapped ring ``cur`` that differ from ``new_ring``."""
        new = np.asarray(new_ring, dtype=np.uint32)
        if new.shape != (self.ring_size,):
            raise ValueError(f"ring has shape {new.shape}, need ({self.ring_size},)")
        changed = np.flatnonzero(cur != new)
        cur[changed] = new[changed]
        return int(changed.size)

    def ring(self, vip_num: int) -> np.ndarray:
        """A copy of ring ``vip_num`` as the datapath sees it."""
        assert self._rings is not None
        return self._rings[vip_num].copy()

    def down_words(self) -> dict[int, int]:
        """The down set's non-zero words: flat index (lb.datapath_tables.down_bit) -> value."""
        assert self._down is not None
        flat = self._down.reshape(-1)
        return {int(i): int(flat[i]) for i in np.flatnonzero(flat)}

    def write_down_word(self, index: int, value: int) -> None:
        """Word ``index`` of the down set := ``value`` (one aligned 64-bit store)."""
        assert self._down is not None
        flat = self._down.reshape(-1)
        if not 0 <= index < flat.size:
            raise IndexError(f"down_set word {index} outside 0..{flat.size - 1}")
        flat[index] = np.uint64(value)

    def prev_ring(self, slot: int) -> np.ndarray:
        """A copy of previous-ring slot ``slot`` (stateless VIPs) as the datapath sees it."""
        assert self._prev is not None
        return self._prev[slot].copy()

    def update_prev_ring(self, slot: int, new_ring: np.ndarray) -> int:
        """Write the slots of previous ring ``slot`` that differ; returns how many."""
        if not 0 <= slot < constants.MAX_PREV_RINGS:
            raise IndexError(f"previous-ring slot {slot} outside 0..{constants.MAX_PREV_RINGS - 1}")
        assert self._prev is not None
        return self._write_slots(self._prev[slot], new_ring)

    def prev_ref(self, vip_num: int) -> int:
        """The prev_ref word of VIP ``vip_num`` (0: no previous ring)."""
        v = map_lookup(self.map_fd("prev_ref"), int(vip_num).to_bytes(4, "little"), 4)
        return int.from_bytes(v, "little") if v is not None else 0

    def set_prev_ref(self, vip_num: int, value: int) -> None:
        """Point VIP ``vip_num`` at its previous rings (one 4-byte write)."""
        if not 0 <= vip_num < self.max_vips:
            raise IndexError(f"vip_num {vip_num} outside 0..{self.max_vips - 1}")
        map_update(self.map_fd("prev_ref"), int(vip_num).to_bytes(4, "little"),
                   int(value).to_bytes(4, "little"))

    # ---- reading back ------------------------------------------------------------------

    def percpu_rows(self, name: str) -> np.ndarray:
        """Counter map ``name`` (per-CPU rows of u64 words) summed over CPUs: uint64[rows,
        words]."""
        return percpu_row_sums(self.map_fd(name), self._specs[name][2] // 8)[1]

    def read_stats(self) -> BalancerStats:
        glob = self.percpu_rows("stats")[0]
        return BalancerStats(
            counters={name: int(glob[i]) for i, name in enumerate(constants.STATS)},
            vip=self.percpu_rows("vip_stats"),
            real=self.percpu_rows("real_stats"),
        )

    def publish_vips(self) -> None:
        """Rebuild the program's VIP index from vip_map (after writing vip_map directly,
        as the control plane's reconciler does)."""
        fd = self.map_fd("vip_map")
        keys = map_keys(fd, layout.VIP_KEY.itemsize)
        metas = [map_lookup(fd, k, layout.VIP_META.itemsize) for k in keys]
        present = [(k, m) for k, m in zip(keys, metas) if m is not None]
        self._vip_index.publish([k for k, _ in present], [m for _, m in present])

    def conn_table_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every connection-table entry: (keys as layout.FLOW_KEY, values as
        layout.CONN_VALUE), index-aligned."""
        return self._conn.entries()

    def conn_set_index(self, flow_key: bytes) -> int:
        """The connection-table set the program uses for a FLOW_KEY (40 bytes)."""
        return conn_set_index(flow_key, self._vip_index.conn_seed, self._conn.sets)

    def conn_table_count(self) -> int:
        """Entries in the connection table (all CPUs)."""
        return self._conn.count()

    def clear_conn_table(self) -> int:
        """Empty the connection table and restart the flood guard's per-CPU counts;
        returns how many entries the table had."""
        fd = self.map_fd("conn_rates")
        zero = bytes(layout.CONN_RATE.itemsize)
        for cpu in range(self.ncpus):
            map_update(fd, cpu.to_bytes(4, "little"), zero)
        return self._conn.clear()

    # ---- lifetime -------------------------------------------------------------------------

    @staticmethod
    def unpin_dir(pin_dir: str) -> None:
        """Remove every pinned map of an instance directory and the directory."""
        if not os.path.isdir(pin_dir):
            return
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)

    def close(self, unpin: bool = False) -> None:
        """Detach, release fds and the ring mapping; with unpin, also remove the pins
        (the maps then die with the last reference)."""
        if self._attached is not None:
            self.detach()
        self._rings = self._prev = self._down = None
        for mm in ("_rings_mm", "_prev_mm", "_down_mm"):
            if getattr(self, mm, None) is not None:
                getattr(self, mm).close()
                setattr(self, mm, None)
        for view in ("_vip_index", "_conn"):
            if getattr(self, view, None) is not None:
                getattr(self, view).close()
                setattr(self, view, None)
        if getattr(self, "_bpf", None) is not None:
            self._bpf.cleanup()
            self._bpf = None
        if unpin and self.pin_dir is not None:
            self.unpin_dir(self.pin_dir)

    def __enter__(self) -> "XdpBalancer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _id_records(ids: Any) -> list[bytes]:
    """u32 ids as 4-byte little-endian records."""
    return [int(i).to_bytes(4, "little") for i in np.asarray(ids).ravel()]


def as_layout(arr: Any, dtype: np.dtype) -> np.ndarray:
    """``arr`` converted to the layout ``dtype`` with every padding byte zero.

    Map keys are compared as bytes, so padding must be written. A plain astype() or
    ascontiguousarray(dtype=...) leaves the gaps of a padded dtype uninitialised, and
    np.concatenate() may already have dropped the explicit offsets (and the
    big-endian port) of the lb.layout dtypes; fields are therefore copied by name."""
    a = np.asarray(arr)
    out = np.zeros(len(a), dtype=dtype)
    for name in dtype.names:
        out[name] = a[name]
    return out


def _records(arr: Any, dtype: np.dtype) -> list[bytes]:
    raw = as_layout(arr, dtype).tobytes()
    size = dtype.itemsize
    return [raw[i * size:(i + 1) * size] for i in range(len(arr))]
