"""The datapath's state, one value per XDP map (xdp/maps.h), built once per table load
from :class:`lb.datapath_tables.DatapathTables`: :class:`Maps` is the one argument that carries it
into the batch loop.

Named tuples of arrays and ints, for people; the loop takes :func:`plain` of them (the
same nesting as plain tuples, which numba types in C: ~18 us a call instead of ~110 us
for the named ones) and unpacks it once per batch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lb import constants as C
from lb.datapath.conntable import ConnTable
from lb.datapath.routing import key_insert
from lb.datapath_tables import (
    DatapathTables,
    down_set_of,
    prefix_tables,
    prev_ring_tables,
    routing_tables,
)


class KeyTable(NamedTuple):
    """An open-addressing table of (lo, hi, tail) keys (:func:`routing.key_lookup`)."""

    keys: np.ndarray  # uint64[cap, 3]
    used: np.ndarray  # uint64[cap]; 0 = empty
    mask: int  # cap - 1


class Reals(NamedTuple):
    addr: np.ndarray  # uint8[max_reals, 16]
    family: np.ndarray  # uint8[max_reals]; FAMILY_NONE = no real
    flags: np.ndarray  # uint8[max_reals]; REAL_F_*


class Rings(NamedTuple):
    slots: np.ndarray  # uint32[max_vips, size]: real ids
    size: int
    ch_seed: int  # CH_RINGS_SIZE, the flow hash's seed
    v6_seed: int  # MAX_VIPS, the seed of an IPv6 source's jhash


class Ctl(NamedTuple):
    """The ``ctl`` map's values."""

    gw_mac: np.ndarray  # uint8[6]
    max_frame: int
    mtu: int  # 0: not checked
    encap: int  # ENCAP_IPIP | ENCAP_GUE
    gue_port: int  # host order
    gue_src_v4: np.ndarray  # uint8[4]
    gue_src_v6: np.ndarray  # uint8[16]
    max_conn_rate: int  # new connections per CPU per window; 0: no flood guard
    cidr_vips: int  # 1: some VIP is a CIDR VIP (the prefix lookups run)


class QuicServers(NamedTuple):
    ids: np.ndarray  # int64[n], sorted: server ids
    reals: np.ndarray  # int64[n]: their real ids


class SrcRoutesV4(NamedTuple):
    """Routes grouped by prefix length, longest first: group k is ``[starts[k],
    starts[k+1])`` of length ``lens[k]``, sorted by masked address."""

    lens: np.ndarray  # int64[groups]
    starts: np.ndarray  # int64[groups + 1]
    keys: np.ndarray  # int64[n]: masked addresses, big-endian integers
    reals: np.ndarray  # int64[n]


class SrcRoutesV6(NamedTuple):
    """As :class:`SrcRoutesV4`, addresses as two big-endian uint64 halves."""

    lens: np.ndarray
    starts: np.ndarray
    hi: np.ndarray  # uint64[n]
    lo: np.ndarray  # uint64[n]
    reals: np.ndarray


class PrevRings(NamedTuple):
    """Stateless VIPs' previous rings (xdp/maps.h prev_rings, prev_ref)."""

    rings: np.ndarray  # uint32[MAX_PREV_RINGS, ring_size]: real ids
    refs: np.ndarray  # uint32[max_vips]: layout.PREV_REF as one u32 (prev0 | prev1 << 16)


class PrefixVips(NamedTuple):
    """CIDR VIPs (vip_prefixes, vip_prefix_addrs): hash tables of masked keys, probed
    once per (family, prefix length) group, longest first (:func:`routing.prefix_lookup`).
    A key is (address & mask: lo, hi, tail | prefix length << 32) with the tail of
    :func:`routing.vip_tail` (VIPs) or the family (addresses)."""

    vips: KeyTable
    meta: np.ndarray  # uint32[cap, 2]: (flags, vip_num) by vips index
    addrs: KeyTable
    fam: np.ndarray  # int64[groups]: family of group k
    plen: np.ndarray  # int64[groups]: its address prefix length
    mlo: np.ndarray  # uint64[groups]: its mask, as the address's (lo, hi) table words
    mhi: np.ndarray


class Maps(NamedTuple):
    """Everything the batch loop reads, and the connection table it writes."""

    vips: KeyTable  # (dst, port, proto, family)
    vip_meta: np.ndarray  # uint32[cap, 2]: (flags, vip_num) by vips index
    vip_addrs: KeyTable  # (dst, family)
    reals: Reals
    down_set: np.ndarray  # uint64[max_vips, down_row_words]: (VIP, real) pairs held down
    rings: Rings
    ctl: Ctl
    quic: QuicServers
    src_v4: SrcRoutesV4
    src_v6: SrcRoutesV6
    prefixes: PrefixVips
    conn: ConnTable
    prev: PrevRings


def plain(maps: tuple) -> tuple:
    """``maps`` with every named tuple in it turned into a plain one, recursively."""
    return tuple(plain(v) if isinstance(v, tuple) else v for v in maps)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def addr_words(addr: np.ndarray, family: int) -> tuple[np.uint64, np.uint64]:
    """(lo, hi) 64-bit table words of a 16-byte address (the bytes read little-endian;
    an IPv4 address is its first 4 bytes), as :func:`parsing.addr_words` reads the wire."""
    raw = bytes(np.asarray(addr, dtype=np.uint8))
    if family == C.FAMILY_V4:
        return np.uint64(int.from_bytes(raw[:4], "little")), np.uint64(0)
    return np.uint64(int.from_bytes(raw[:8], "little")), np.uint64(int.from_bytes(raw[8:16], "little"))


def _vip_tables(tables: DatapathTables) -> tuple[KeyTable, np.ndarray, KeyTable]:
    cap = pow2_at_least(max(2, 2 * len(tables.vip_keys)))
    vips = KeyTable(np.zeros((cap, 3), dtype=np.uint64), np.zeros(cap, dtype=np.uint64), cap - 1)
    meta = np.zeros((cap, 2), dtype=np.uint32)
    for key, m in zip(tables.vip_keys, tables.vip_metas):
        fam = int(key["family"])
        lo, hi = addr_words(key["addr"], fam)
        tail = np.uint64(int(key["port"]) | (int(key["proto"]) << 16) | (fam << 24))
        i = key_insert(vips.keys, vips.used, vips.mask, lo, hi, tail)
        meta[i] = (m["flags"], m["vip_num"])
    acap = pow2_at_least(max(2, 2 * len(tables.vip_addr_keys)))
    addrs = KeyTable(np.zeros((acap, 3), dtype=np.uint64), np.zeros(acap, dtype=np.uint64), acap - 1)
    for key in tables.vip_addr_keys:
        fam = int(key["family"])
        lo, hi = addr_words(key["addr"], fam)
        key_insert(addrs.keys, addrs.used, addrs.mask, lo, hi, np.uint64(fam))
    return vips, meta, addrs


def _netmask16(family: int, plen: int) -> np.ndarray:
    """The netmask of a prefix length as a 16-byte table address."""
    bits = 32 if family == C.FAMILY_V4 else 128
    mask = ((1 << bits) - (1 << (bits - plen))).to_bytes(bits // 8, "big")
    return np.frombuffer(mask.ljust(16, b"\0"), dtype=np.uint8)


def _prefix_vips(tables: DatapathTables) -> PrefixVips:
    """The CIDR VIP tables of ``tables`` (maps.PrefixVips)."""
    keys, metas, addr_keys = prefix_tables(tables)
    groups: set[tuple[int, int]] = set()

    def table(recs: np.ndarray, ports: bool) -> tuple[KeyTable, list[int]]:
        cap = pow2_at_least(max(2, 2 * len(recs)))
        t = KeyTable(np.zeros((cap, 3), dtype=np.uint64), np.zeros(cap, dtype=np.uint64), cap - 1)
        idx = []
        for k in recs:
            fam = int(k["family"])
            plen = int(k["prefixlen"]) - C.VIP_LPM_KEY_HEAD_BITS
            groups.add((fam, plen))
            lo, hi = addr_words(k["addr"], fam)  # stored masked (host bits zero)
            tail = int(k["port"]) | (int(k["proto"]) << 16) | (fam << 24) if ports else fam
            idx.append(key_insert(t.keys, t.used, t.mask, lo, hi, np.uint64(tail | (plen << 32))))
        return t, idx

    vips, idx = table(keys, True)
    meta = np.zeros((vips.mask + 1, 2), dtype=np.uint32)
    for i, m in zip(idx, metas):
        meta[i] = (m["flags"], m["vip_num"])
    addrs, _ = table(addr_keys, False)
    order = sorted(groups, key=lambda g: -g[1])  # longest first
    masks = [addr_words(_netmask16(f, n), f) for f, n in order]
    return PrefixVips(vips, meta, addrs, np.array([f for f, _ in order], dtype=np.int64),
                      np.array([n for _, n in order], dtype=np.int64),
                      np.array([m[0] for m in masks], dtype=np.uint64),
                      np.array([m[1] for m in masks], dtype=np.uint64))


def _lpm_groups(prefixlens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order routes by prefix length, longest first: (order, lengths, starts) where the
    routes of ``lengths[k]`` are ``order[starts[k]:starts[k+1]]``."""
    lens = np.asarray(prefixlens, dtype=np.int64)
    distinct = np.unique(lens)[::-1].copy()
    order_parts, starts = [], [0]
    for length in distinct:
        idx = np.flatnonzero(lens == length)
        order_parts.append(idx)
        starts.append(starts[-1] + len(idx))
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    return order, distinct, np.array(starts, dtype=np.int64)


def _src_routes_v4(routes: np.ndarray) -> SrcRoutesV4:
    """Source routes (layout.SRC_ROUTE_V4) as sorted per-length groups for a longest-prefix
    match by binary search."""
    addr = routes["key"]["addr"].astype(np.int64)
    keys = (addr[:, 0] << 24) | (addr[:, 1] << 16) | (addr[:, 2] << 8) | addr[:, 3] if len(routes) else np.zeros(0, np.int64)
    order, lens, starts = _lpm_groups(routes["key"]["prefixlen"])
    keys, reals = keys[order], routes["real_id"].astype(np.int64)[order]
    for k in range(len(lens)):
        g = slice(starts[k], starts[k + 1])
        o = np.argsort(keys[g], kind="stable")
        keys[g], reals[g] = keys[g][o], reals[g][o]
    return SrcRoutesV4(lens, starts, np.ascontiguousarray(keys), np.ascontiguousarray(reals))


def _src_routes_v6(routes: np.ndarray) -> SrcRoutesV6:
    """As :func:`_src_routes_v4` for IPv6, sorted by (hi, lo) within each group."""
    raw = np.ascontiguousarray(routes["key"]["addr"]).reshape(len(routes), 16)
    hi = raw[:, :8].copy().view(">u8").ravel().astype(np.uint64)
    lo = raw[:, 8:].copy().view(">u8").ravel().astype(np.uint64)
    order, lens, starts = _lpm_groups(routes["key"]["prefixlen"])
    hi, lo, reals = hi[order], lo[order], routes["real_id"].astype(np.int64)[order]
    for k in range(len(lens)):
        g = slice(starts[k], starts[k + 1])
        o = np.lexsort((lo[g], hi[g]))
        hi[g], lo[g], reals[g] = hi[g][o], lo[g][o], reals[g][o]
    return SrcRoutesV6(lens, starts, np.ascontiguousarray(hi), np.ascontiguousarray(lo),
                       np.ascontiguousarray(reals))


def build_maps(tables: DatapathTables, conn: ConnTable) -> Maps:
    """The maps of ``tables``, around the connection table ``conn`` (kept across loads)."""
    vips, vip_meta, vip_addrs = _vip_tables(tables)
    ctl = tables.ctl[0]
    quic, src_v4, src_v6 = routing_tables(tables)
    order = np.argsort(quic["server_id"], kind="stable")  # for a binary search
    return Maps(
        vips, vip_meta, vip_addrs,
        Reals(np.ascontiguousarray(tables.reals["addr"]), np.ascontiguousarray(tables.reals["family"]),
              np.ascontiguousarray(tables.reals["flags"])),
        np.ascontiguousarray(down_set_of(tables), dtype=np.uint64),
        Rings(tables.rings, tables.ring_size, C.ch_rings_size(tables.max_vips, tables.ring_size),
              tables.max_vips),
        Ctl(np.array(ctl["gw_mac"], dtype=np.uint8), int(ctl["max_frame"]), int(ctl["mtu"]),
            int(ctl["encap"]), int(ctl["gue_port"]), np.array(ctl["gue_src_v4"], dtype=np.uint8),
            np.array(ctl["gue_src_v6"], dtype=np.uint8), int(ctl["max_conn_rate"]), int(ctl["cidr_vips"])),
        QuicServers(np.ascontiguousarray(quic["server_id"][order], dtype=np.int64),
                    np.ascontiguousarray(quic["real_id"][order], dtype=np.int64)),
        _src_routes_v4(src_v4), _src_routes_v6(src_v6), _prefix_vips(tables), conn,
        PrevRings(*prev_ring_tables(tables)),
    )
