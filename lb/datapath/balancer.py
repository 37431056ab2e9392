"""The batch loop (xdp/balancer.c): docs/datapath.md row by row, frame by frame.

As in balancer.c, this module orchestrates: parsing, checksums, ICMP, encapsulation and
the lookups live in their modules. Every frame ends in exactly one outcome counter:
:func:`process_frame` returns it with the action, and :func:`process_batch` counts it
(single exit, as ``balancer_xdp``). Every helper is ``inline="always"``, so the loop
compiles to one function; its machine code is cached on disk (:mod:`.jitcache`).
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath import conntable
from lb.datapath.encap import encapsulate
from lb.datapath.icmp import echo_reply, too_big
from lb.datapath.jitcache import cached_njit
from lb.datapath.parsing import addr_words, be16, copy, icmp_inner
from lb.datapath.quic import quic_server_id
from lb.datapath.routing import key_lookup, quic_real, ring_real, src_route_v4, src_route_v6, vip_tail


class Packet(NamedTuple):
    """What the parsers found (balancer.c's ``struct pkt_desc``): offsets into the frame
    and the flow, taken from the inner header for an ICMP error."""

    l3: int  # IP header (after L2 and an 802.1Q tag)
    l4: int  # L4 header of the packet itself
    pkt_len: int  # the IP packet, as its length field says
    vlan: bool
    family: int
    tos: int
    proto: int  # the flow's protocol
    src_off: int  # the flow's client address
    dst_lo: np.uint64  # the flow's VIP address as table words (parsing.addr_words)
    dst_hi: np.uint64
    sport: int  # the flow's ports, host order
    dport: int
    syn: bool
    icmp_err: bool


@nb.njit(inline="always")
def pass_frame(p, n, out, stat):
    """The frame leaves unchanged: (action, output length, real id, outcome counter)."""
    copy(out, 0, p, 0, n)
    return C.XDP_PASS, n, 0, stat


@nb.njit(inline="always")
def forward(pkt, p, n, out, m, fk, now, stats, vip_stats, real_stats):
    """Rows 14-21: VIP lookup, real selection, then local delivery, too-big or
    encapsulation. Returns (action, output length, real id, outcome counter)."""
    family, proto, sport, dport = pkt.family, pkt.proto, pkt.sport, pkt.dport
    dlo, dhi = pkt.dst_lo, pkt.dst_hi
    vi = key_lookup(m.vips, dlo, dhi, vip_tail(dport, proto, family))
    if vi < 0:
        vi = key_lookup(m.vips, dlo, dhi, vip_tail(0, proto, family))
        if vi < 0:
            return pass_frame(p, n, out, C.STAT_PASS_NOT_VIP)  # row 14
        # a port-0 VIP ignores the destination port, unless it hashes on it
        if (np.int64(m.vip_meta[vi, 0]) & C.F_DPORT_ONLY) == 0:
            dport = 0
    vflags = np.int64(m.vip_meta[vi, 0])
    vip_num = np.int64(m.vip_meta[vi, 1])
    vip_stats[vip_num, C.VIP_STAT_PACKETS] += 1
    vip_stats[vip_num, C.VIP_STAT_BYTES] += n
    if vflags & C.F_NO_SRC_PORT:
        sport = 0

    slo, shi = addr_words(p, pkt.src_off, family)
    # ports word = the 4 wire bytes [sport][dport] read little-endian (Katran's flow.ports)
    ports = ((sport >> 8) | ((sport & 0xFF) << 8) | ((dport >> 8) << 16) | ((dport & 0xFF) << 24))
    fk[0] = slo
    fk[1] = shi
    fk[2] = dlo
    fk[3] = dhi
    fk[4] = np.uint64(ports) | (np.uint64(proto) << np.uint64(32)) | (np.uint64(family) << np.uint64(40))
    reals = m.reals
    real_id = 0
    # 0. QUIC: the server id in the connection id names the real
    if (vflags & C.F_QUIC) and proto == C.IPPROTO_UDP and not pkt.icmp_err:
        qid = quic_server_id(p, pkt.l4 + C.UDP_HLEN, pkt.l3 + pkt.pkt_len - pkt.l4 - C.UDP_HLEN)
        if qid == 0:
            stats[C.STAT_QUIC_FALLBACK] += 1
        else:
            rid = quic_real(m.quic, qid)
            if rid >= 0 and reals.family[rid] != C.FAMILY_NONE:
                real_id = rid
                stats[C.STAT_QUIC_ROUTED] += 1
            else:
                stats[C.STAT_QUIC_UNKNOWN] += 1
    # 1. the connection table; a QUIC-routed packet neither reads nor writes it
    ct = m.conn
    use_lru = (vflags & C.F_LRU_BYPASS) == 0 and real_id == 0
    bucket = 0
    tag = np.uint64(0)
    if use_lru:
        bucket, tag = conntable.slot(ct, fk)
        if not (proto == C.IPPROTO_TCP and pkt.syn):  # a SYN always re-hashes
            w = conntable.find(ct, bucket, tag, fk)
            if w >= 0:
                cand = np.int64(ct.ent[bucket, w, conntable.E_REAL])
                age = now - np.int64(ct.ent[bucket, w, conntable.E_ATIME])
                fresh = proto != C.IPPROTO_UDP or age <= C.LRU_UDP_TIMEOUT_NS
                if reals.family[cand] != C.FAMILY_NONE and fresh:
                    real_id = cand
                    conntable.touch(ct, bucket, w)
                    if proto == C.IPPROTO_UDP:
                        ct.ent[bucket, w, conntable.E_ATIME] = np.uint64(now)
        if real_id != 0:
            stats[C.STAT_LRU_HIT] += 1
        else:
            stats[C.STAT_LRU_MISS] += 1
    if real_id == 0:
        # 2. source routing, else the ring
        if vflags & C.F_SRC_ROUTING:
            if family == C.FAMILY_V4:
                real_id = src_route_v4(m.src_v4, p, pkt.src_off)
            else:
                real_id = src_route_v6(m.src_v6, p, pkt.src_off)
            if real_id != 0 and reals.family[real_id] == C.FAMILY_NONE:
                real_id = 0  # the longest match's real is gone: the ring
            if real_id != 0:
                stats[C.STAT_SRC_ROUTED] += 1
        if real_id == 0:
            real_id = ring_real(m.rings, vip_num, p, family, pkt.src_off, slo, ports, dport,
                                (vflags & C.F_DPORT_ONLY) != 0)
            if real_id == 0 or reals.family[real_id] == C.FAMILY_NONE:
                return C.XDP_DROP, 0, 0, C.STAT_DROP_NO_REAL  # row 15
        if use_lru and not pkt.icmp_err:
            conntable.insert(ct, bucket, tag, fk, real_id, now)

    # local delivery needs no encapsulation, so it is decided first
    rfam = reals.family[real_id]
    if (vflags & C.F_LOCAL) and (reals.flags[real_id] & C.REAL_F_LOCAL):
        real_stats[real_id, C.VIP_STAT_PACKETS] += 1
        real_stats[real_id, C.VIP_STAT_BYTES] += n
        copy(out, 0, p, 0, n)
        return C.XDP_PASS, n, real_id, C.STAT_PASS_LOCAL  # row 17
    ctl = m.ctl
    gue = ctl.encap == C.ENCAP_GUE
    if family == C.FAMILY_V6 and rfam == C.FAMILY_V4 and not gue:
        return C.XDP_DROP, 0, 0, C.STAT_DROP_ENCAP_FAILED  # row 16
    overhead = ((C.ENCAP_IPV4_OVERHEAD if rfam == C.FAMILY_V4 else C.ENCAP_IPV6_OVERHEAD)
                + (C.UDP_HLEN if gue else 0))
    if ctl.mtu != 0 and pkt.pkt_len + overhead > ctl.mtu:
        quote = C.ICMP_TOO_BIG_QUOTE_V4 if family == C.FAMILY_V4 else C.ICMP_TOO_BIG_QUOTE_V6
        if (pkt.icmp_err or pkt.pkt_len < quote
                or (family == C.FAMILY_V4 and (be16(p, pkt.l3 + 6) & C.IP_DF) == 0)):
            return C.XDP_DROP, 0, 0, C.STAT_DROP_TOO_BIG  # row 21
        return C.XDP_TX, too_big(p, out, pkt.l3, family, overhead, ctl.mtu), 0, C.STAT_TX_ICMP_TOO_BIG  # row 20
    olen = encapsulate(p, n, out, pkt.l3, pkt.vlan, family, pkt.pkt_len, pkt.tos, pkt.src_off, sport,
                       rfam, reals.addr, real_id, ctl)
    real_stats[real_id, C.VIP_STAT_PACKETS] += 1
    real_stats[real_id, C.VIP_STAT_BYTES] += n
    if pkt.icmp_err:
        stats[C.STAT_ICMP_ERROR_FORWARDED] += 1  # row 19
    return C.XDP_TX, olen, real_id, C.STAT_TX_ENCAP  # row 18


@nb.njit(inline="always")
def process_frame(p, n, out, m, fk, now, stats, vip_stats, real_stats):
    """One frame: rows 1-13 here, rows 14-21 in :func:`forward`. Returns (action, output
    length, real id, outcome counter)."""
    # ---- L2
    if n < C.ETH_HLEN:
        return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 1
    eth_type = be16(p, 12)
    l3 = C.ETH_HLEN
    vlan = False
    if eth_type == C.ETH_P_8021Q:
        if n < C.ETH_HLEN + C.VLAN_HLEN:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 1
        vlan = True
        eth_type = be16(p, 16)
        l3 = C.ETH_HLEN + C.VLAN_HLEN
    avail = n - l3

    # ---- L3 sanity and "is this for a VIP address?"
    if eth_type == C.ETH_P_IP:
        family = C.FAMILY_V4
        if avail < 20 or (p[l3] >> 4) != 4 or (p[l3] & 0xF) < 5:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 3
        ihl = np.int64(p[l3] & 0xF)
        pkt_len = be16(p, l3 + 2)
        if pkt_len < ihl * 4 or pkt_len > avail:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 3
        src_off = l3 + 12
        dst_off = l3 + 16
        proto = np.int64(p[l3 + 9])
        tos = np.int64(p[l3 + 1])
    elif eth_type == C.ETH_P_IPV6:
        family = C.FAMILY_V6
        if avail < 40 or (p[l3] >> 4) != 6:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 4
        pkt_len = be16(p, l3 + 4) + 40
        if pkt_len > avail:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 4
        ihl = 10  # 40 bytes, in IPv4 IHL units
        src_off = l3 + 8
        dst_off = l3 + 24
        proto = np.int64(p[l3 + 6])
        tos = ((np.int64(p[l3]) & 0xF) << 4) | (np.int64(p[l3 + 1]) >> 4)
    else:
        return pass_frame(p, n, out, C.STAT_PASS_NOT_IP)  # row 2

    dlo, dhi = addr_words(p, dst_off, family)
    if key_lookup(m.vip_addrs, dlo, dhi, np.uint64(family)) < 0:
        return pass_frame(p, n, out, C.STAT_PASS_NOT_VIP)  # row 5

    # ---- checks that apply to VIP addresses only
    if n > m.ctl.max_frame:
        return C.XDP_DROP, 0, 0, C.STAT_DROP_OVERSIZE  # row 6
    if family == C.FAMILY_V4:
        if ihl != 5:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_IP_OPTIONS  # row 7
        if be16(p, l3 + 6) & (C.IP_MF | C.IP_OFFSET_MASK):
            return C.XDP_DROP, 0, 0, C.STAT_DROP_FRAGMENT  # row 8
    elif proto == C.IPPROTO_FRAGMENT:
        return C.XDP_DROP, 0, 0, C.STAT_DROP_FRAGMENT  # row 8

    l4 = l3 + ihl * 4
    pend = l3 + pkt_len
    syn = False
    icmp_err = False
    if proto == C.IPPROTO_TCP:
        if l4 + 20 > pend:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 9
        syn = (p[l4 + 13] & C.TCP_FLAG_SYN) != 0
        sport = be16(p, l4)
        dport = be16(p, l4 + 2)
    elif proto == C.IPPROTO_UDP:
        if l4 + 8 > pend:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 9
        sport = be16(p, l4)
        dport = be16(p, l4 + 2)
    elif proto == (C.IPPROTO_ICMP if family == C.FAMILY_V4 else C.IPPROTO_ICMPV6):
        if l4 + 8 > pend:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 9
        itype = p[l4]
        if (family == C.FAMILY_V4 and itype == C.ICMP_ECHO_REQUEST) or (
            family == C.FAMILY_V6 and itype == C.ICMPV6_ECHO_REQUEST
        ):
            return C.XDP_TX, echo_reply(p, n, out, l3, l4, family), 0, C.STAT_TX_ICMP_ECHO_REPLY  # row 11
        if not ((family == C.FAMILY_V4 and itype == C.ICMP_DEST_UNREACH) or (
            family == C.FAMILY_V6 and (itype == C.ICMPV6_DEST_UNREACH or itype == C.ICMPV6_PKT_TOOBIG)
        )):
            return pass_frame(p, n, out, C.STAT_PASS_NOT_VIP)  # row 13
        # the flow of the packet the error is about, swapped: its destination is our client
        proto, src_off, dst_off, il4 = icmp_inner(p, l4, pend, family)
        if proto < 0:
            return C.XDP_DROP, 0, 0, C.STAT_DROP_MALFORMED  # row 12
        icmp_err = True
        sport = be16(p, il4 + 2)
        dport = be16(p, il4)
        dlo, dhi = addr_words(p, dst_off, family)
    else:
        return pass_frame(p, n, out, C.STAT_PASS_NOT_VIP)  # row 10
    return forward(Packet(l3, l4, pkt_len, vlan, family, tos, proto, src_off, dlo, dhi, sport, dport,
                          syn, icmp_err),
                   p, n, out, m, fk, now, stats, vip_stats, real_stats)


@cached_njit
def process_batch(frames, lengths, outs, out_lens, actions, real_ids, maps, now, stats, vip_stats, real_stats):
    """Process ``frames[i, :lengths[i]]`` in order, as docs/datapath.md says, against
    ``maps`` (:class:`lb.datapath.maps.Maps`; its connection table is updated).

    Per frame: ``actions[i]``, the output frame in ``outs[i, :out_lens[i]]`` (TX and PASS)
    and the chosen ``real_ids[i]``; counters are incremented in ``stats``, ``vip_stats``,
    ``real_stats``.
    """
    fk = np.zeros(5, dtype=np.uint64)  # the flow key, as 5 words
    for i in range(frames.shape[0]):
        action, out_len, real_id, stat = process_frame(frames[i], lengths[i], outs[i], maps, fk, now,
                                                       stats, vip_stats, real_stats)
        stats[C.STAT_RX_PACKETS] += 1
        stats[stat] += 1
        actions[i] = action
        out_lens[i] = out_len
        real_ids[i] = real_id
