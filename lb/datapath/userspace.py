"""The Python face of the userspace datapath: one instance per CPU, tables in, batches
of frames through :func:`lb.datapath.balancer.process_batch`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lb import constants as C
from lb.datapath.balancer import process_batch
from lb.datapath.conntable import new_conn_table
from lb.datapath.maps import Maps, build_maps, plain
from lb.datapath_tables import DatapathTables


@dataclass
class BatchResult:
    """What one batch did: per frame action, output frame and real id; counter deltas."""

    actions: np.ndarray  # uint8[n], kernel xdp_action values
    out: np.ndarray  # uint8[n, stride + ENCAP_MAX_OVERHEAD]
    out_lens: np.ndarray  # int64[n]; 0 for DROP
    real_ids: np.ndarray  # uint32[n]; 0 when no real was chosen
    stats: np.ndarray  # int64[N_STATS] deltas
    vip_stats: np.ndarray | None  # int64[max_vips, 2] deltas (None: not collected)
    real_stats: np.ndarray | None  # int64[max_reals, REAL_STAT_COLUMNS] deltas (None: not collected)

    def output(self, i: int) -> bytes:
        """Output frame ``i`` (the unchanged input for PASS, empty for DROP)."""
        return self.out[i, : self.out_lens[i]].tobytes()


class UserspaceDatapath:
    """One instance = one CPU's datapath: its own connection table, shared-nothing.

    ``maps`` (:class:`lb.datapath.maps.Maps`) is its state, rebuilt by :meth:`load_tables`;
    ``state`` is the same as :func:`process_batch` takes it (lb/userspace_io.py passes it
    to its own loop).
    """

    def __init__(self, tables: DatapathTables):
        self.conn = new_conn_table(tables.conn_table_size, C.CONN_TABLE_WAYS)
        # Counters are int64: numba turns uint64 += int into a float64 round trip (~75 ns).
        self.stats = np.zeros(C.N_STATS, dtype=np.int64)
        self.load_tables(tables)

    def load_tables(self, tables: DatapathTables) -> None:
        """Replace VIPs, reals, rings and control values; the connection table stays."""
        self.tables = tables
        self.maps: Maps = build_maps(tables, self.conn)
        self.state = plain(self.maps)
        if not hasattr(self, "vip_stats") or self.vip_stats.shape[0] != tables.max_vips:
            self.vip_stats = np.zeros((tables.max_vips, 2), dtype=np.int64)
            self.real_stats = np.zeros((tables.max_reals, C.REAL_STAT_COLUMNS), dtype=np.int64)

    def process(self, frames: np.ndarray, lengths: np.ndarray, now: int, deltas: bool = True) -> BatchResult:
        """Process a batch: ``frames`` uint8[n, stride], ``lengths`` int64[n] (<= stride).

        With ``deltas=False`` the per-VIP and per-real counters go straight into the
        cumulative arrays and the result carries only the global deltas (cheaper for
        small batches: no max_reals-sized arrays per call).
        """
        n, stride = frames.shape
        lengths = np.asarray(lengths, dtype=np.int64)
        if n and (lengths.min() < 0 or lengths.max() > stride):
            raise ValueError("frame lengths must be within 0..stride")
        out = np.empty((n, stride + C.ENCAP_MAX_OVERHEAD), dtype=np.uint8)
        out_lens = np.zeros(n, dtype=np.int64)
        actions = np.zeros(n, dtype=np.uint8)
        real_ids = np.zeros(n, dtype=np.uint32)
        stats = np.zeros(C.N_STATS, dtype=np.int64)
        vip_stats = np.zeros_like(self.vip_stats) if deltas else self.vip_stats
        real_stats = np.zeros_like(self.real_stats) if deltas else self.real_stats
        process_batch(frames, lengths, out, out_lens, actions, real_ids, self.state, int(now),
                      stats, vip_stats, real_stats)
        self.stats += stats
        if deltas:
            self.vip_stats += vip_stats
            self.real_stats += real_stats
        return BatchResult(actions, out, out_lens, real_ids, stats,
                           vip_stats if deltas else None, real_stats if deltas else None)

    def process_frames(self, frames: list[bytes], now: int) -> BatchResult:
        """Convenience: process a list of frames (bytes) in order."""
        stride = max([len(f) for f in frames] + [1])
        buf = np.zeros((len(frames), stride), dtype=np.uint8)
        for i, f in enumerate(frames):
            buf[i, : len(f)] = np.frombuffer(f, dtype=np.uint8)
        return self.process(buf, np.array([len(f) for f in frames], dtype=np.int64), now)

    def stats_dict(self) -> dict[str, int]:
        """Cumulative global counters by name."""
        return {name: int(self.stats[i]) for i, name in enumerate(C.STATS)}

    def conn_table_size(self) -> int:
        """Entries currently in the connection table."""
        return int(np.count_nonzero(self.conn.tags))
