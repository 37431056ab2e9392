"""Stateless VIPs' hop lists (xdp/hoplist.h; docs/datapath.md, "Stateless VIPs").

A stateless VIP's TCP segment goes to the ring's real with the reals its previous rings
pick for the same ring position (newest first, distinct, the real's family) as a GUE
variant-0 hop list, when there are two or more of them. The outer UDP checksum is filled
without reading the payload: the inner packet's sum is its IP header's plus the negated
pseudo-header sum of its TCP segment (what a segment with a valid checksum sums to).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath.csum import csum_fold, sum16


@nb.njit(inline="always")
def hoplist_bytes(count, family):
    """Bytes of the GUE header and a hop list of ``count`` addresses (no UDP header)."""
    return C.GUE_HLEN + C.GUE_HOPLIST_HLEN + count * (4 if family == C.FAMILY_V4 else 16)


@nb.njit(inline="always")
def _same_addr(real_addr, a, b):
    for k in range(16):
        if real_addr[a, k] != real_addr[b, k]:
            return False
    return True


@nb.njit(inline="always")
def prev_ring_hops(hops, prev_rings, prev_refs, vip_num, pos, real_addr, real_family, family):
    """Add the previous rings' reals at ring position ``pos`` to ``hops`` (real ids;
    ``hops[0]`` holds the ring's real, of ``family``); returns how many ``hops`` holds."""
    count = 1
    refs = np.int64(prev_refs[vip_num])
    if refs == 0:
        return count
    for k in range(C.PREV_RINGS_PER_VIP):
        s = (refs >> (16 * k)) & 0xFFFF
        if s == 0 or s > C.MAX_PREV_RINGS:
            continue
        cand = np.int64(prev_rings[s - 1, pos])
        if cand == 0 or cand >= real_family.shape[0] or real_family[cand] != family:
            continue
        dup = False
        for j in range(count):  # (xdp/balancer.c compares the ids first: the same result)
            if _same_addr(real_addr, hops[j], cand):
                dup = True
        if dup or count >= C.GUE_MAX_HOPS:
            continue
        hops[count] = cand
        count += 1
    return count


@nb.njit(inline="always")
def inner_sum(p, l3, pkt_len, family):
    """The inner packet's part of the outer UDP checksum (unfolded)."""
    if family == C.FAMILY_V4:
        s = sum16(p, l3, 20)
        ps = sum16(p, l3 + 12, 8) + C.IPPROTO_TCP + ((pkt_len - 20) & 0xFFFF)
    else:
        s = sum16(p, l3, 40)
        ps = sum16(p, l3 + 8, 32) + ((pkt_len - 40) & 0xFFFF) + C.IPPROTO_TCP
    return s + ((~csum_fold(ps)) & 0xFFFF)


@nb.njit(inline="always")
def write_hoplist(out, o, ip_off, udp_off, hops, count, real_addr, rfam, inner_family, isum):
    """Write the GUE header and hop list at ``out[o]`` (the outer IP header at ``ip_off``
    and the UDP header at ``udp_off`` are written, checksum 0) and fill the UDP checksum.
    Returns the offset after the hop list."""
    glen = hoplist_bytes(count, rfam)
    out[o] = (glen - C.GUE_HLEN) // 4
    out[o + 1] = C.IPPROTO_IPIP if inner_family == C.FAMILY_V4 else C.IPPROTO_IPV6
    out[o + 2] = 0
    out[o + 3] = 0
    out[o + 4] = C.GUE_HOPLIST_TYPE >> 8
    out[o + 5] = C.GUE_HOPLIST_TYPE & 0xFF
    out[o + 6] = 1  # next_hop: the real after hops[0], which gets this packet
    out[o + 7] = count
    alen = 4 if rfam == C.FAMILY_V4 else 16
    h = o + C.GUE_HLEN + C.GUE_HOPLIST_HLEN
    for i in range(count):
        for k in range(alen):
            out[h + i * alen + k] = real_addr[hops[i], k]
    end = h + count * alen
    s = isum + sum16(out, o, end - o) + sum16(out, udp_off, 8)
    if rfam == C.FAMILY_V4:
        s += sum16(out, ip_off + 12, 8)
    else:
        s += sum16(out, ip_off + 8, 32)
    s += C.IPPROTO_UDP + ((np.int64(out[udp_off + 4]) << 8) | np.int64(out[udp_off + 5]))
    c = (~csum_fold(s)) & 0xFFFF
    if c == 0:
        c = 0xFFFF  # 0 would mean "no checksum"
    out[udp_off + 6] = c >> 8
    out[udp_off + 7] = c & 0xFF
    return end
