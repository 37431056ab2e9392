"""The batch loop (xdp/balancer.c): docs/datapath.md row by row, frame by frame.

As in balancer.c, this module orchestrates: parsing, checksums, ICMP, encapsulation and
the lookups live in their modules, and "row N" comments name the docs/datapath.md row a
frame ends in. Every helper is ``inline="always"``, so the loop compiles to one function
(its machine code cached on disk, :mod:`.jitcache`). The frame logic is the loop body
itself and the helpers take arrays, never a tuple of them: a call per frame with this
many arrays costs more than the logic (~300 ns), and so does a tuple of arrays passed
into inlined code (a reference-count update per array per pass).
"""

from __future__ import annotations

import numpy as np

from lb import constants as C
from lb.datapath import conntable
from lb.datapath.csum import ipv4_csum
from lb.datapath.encap import gue_sport, gue_udp_csum
from lb.datapath.hoplist import hoplist_bytes, inner_sum, prev_ring_hops, write_hoplist
from lb.datapath.icmp import echo_reply, too_big
from lb.datapath.jitcache import cached_njit
from lb.datapath.parsing import addr_words, be16, copy, icmp_inner, zero
from lb.datapath.quic import quic_server_id
from lb.datapath.routing import (
    flow_hash,
    key_lookup,
    prefix_lookup,
    quic_real,
    real_down_for,
    src_route_v4,
    src_route_v6,
    vip_tail,
)


@cached_njit
def process_batch(  # noqa: C901 - one loop body mirrors the one XDP entry point
    frames, lengths, outs, out_lens, actions, real_ids, maps, now, stats, vip_stats, real_stats,
):
    """Process ``frames[i, :lengths[i]]`` in order, as docs/datapath.md says, against
    ``maps`` (:func:`lb.datapath.maps.plain` of a :class:`~lb.datapath.maps.Maps`; its
    connection table is updated).

    Per frame: ``actions[i]``, the output frame in ``outs[i, :out_lens[i]]`` (TX and PASS)
    and the chosen ``real_ids[i]``; counters are incremented in ``stats``, ``vip_stats``,
    ``real_stats`` (``REAL_STAT_COLUMNS`` columns).
    """
    ((vip_keys, vip_used, vip_mask), vip_meta, (va_keys, va_used, va_mask),
     (real_addr, real_family, real_flags), down_set, (rings, ring_size, ch_seed, v6_seed),
     (gw_mac, max_frame, mtu, encap, gue_port, gue_src_v4, gue_src_v6, max_conn_rate, cidr_vips),
     (quic_ids, quic_reals),
     (lpm4_lens, lpm4_starts, lpm4_keys, lpm4_reals), (lpm6_lens, lpm6_starts, lpm6_hi, lpm6_lo, lpm6_reals),
     ((pv_keys, pv_used, pv_mask), pv_meta, (pa_keys, pa_used, pa_mask), pg_fam, pg_len, pg_mlo, pg_mhi),
     (ct_tags, ct_ent, ct_mask, clock, ct_rate), (prev_rings, prev_refs)) = maps
    gue = encap == C.ENCAP_GUE
    fk = np.zeros(5, dtype=np.uint64)  # the flow key, as 5 words
    hops = np.zeros(C.GUE_MAX_HOPS, dtype=np.int64)  # a stateless VIP's hop list, real ids
    for i in range(frames.shape[0]):
        p = frames[i]
        n = lengths[i]
        out = outs[i]
        stats[C.STAT_RX_PACKETS] += 1
        # ---- L2
        if n < C.ETH_HLEN:
            stats[C.STAT_DROP_MALFORMED] += 1  # row 1
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        eth_type = be16(p, 12)
        l3 = C.ETH_HLEN
        vlan = False
        if eth_type == C.ETH_P_8021Q:
            if n < C.ETH_HLEN + C.VLAN_HLEN:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            vlan = True
            eth_type = be16(p, 16)
            l3 = C.ETH_HLEN + C.VLAN_HLEN
        avail = n - l3

        # ---- L3 sanity and "is this for a VIP address?"
        if eth_type == C.ETH_P_IP:
            family = C.FAMILY_V4
            if avail < 20 or (p[l3] >> 4) != 4 or (p[l3] & 0xF) < 5:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 3
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            ihl = np.int64(p[l3] & 0xF)
            pkt_len = be16(p, l3 + 2)
            if pkt_len < ihl * 4 or pkt_len > avail:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 3
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            src_off = l3 + 12
            dst_off = l3 + 16
            proto = np.int64(p[l3 + 9])
            tos = np.int64(p[l3 + 1])
        elif eth_type == C.ETH_P_IPV6:
            family = C.FAMILY_V6
            if avail < 40 or (p[l3] >> 4) != 6:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 4
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            pkt_len = be16(p, l3 + 4) + 40
            if pkt_len > avail:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 4
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            ihl = 10  # 40 bytes, in IPv4 IHL units
            src_off = l3 + 8
            dst_off = l3 + 24
            proto = np.int64(p[l3 + 6])
            tos = ((np.int64(p[l3]) & 0xF) << 4) | (np.int64(p[l3 + 1]) >> 4)
        else:
            stats[C.STAT_PASS_NOT_IP] += 1  # row 2
            copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        dlo, dhi = addr_words(p, dst_off, family)
        if (key_lookup(va_keys, va_used, va_mask, dlo, dhi, np.uint64(family)) < 0
                and (cidr_vips == 0 or prefix_lookup(pa_keys, pa_used, pa_mask, pg_fam, pg_len, pg_mlo,
                                                     pg_mhi, family, dlo, dhi, family) < 0)):
            stats[C.STAT_PASS_NOT_VIP] += 1  # row 5
            copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        # ---- checks that apply to VIP addresses only
        if n > max_frame:
            stats[C.STAT_DROP_OVERSIZE] += 1  # row 6
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        if family == C.FAMILY_V4:
            if ihl != 5:
                stats[C.STAT_DROP_IP_OPTIONS] += 1  # row 7
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            if be16(p, l3 + 6) & (C.IP_MF | C.IP_OFFSET_MASK):
                stats[C.STAT_DROP_FRAGMENT] += 1  # row 8
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
        elif proto == C.IPPROTO_FRAGMENT:
            stats[C.STAT_DROP_FRAGMENT] += 1  # row 8
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue

        # ---- L4: the flow (src, dst, sport, dport, proto); for an ICMP error, the inner one
        l4 = l3 + ihl * 4
        pend = l3 + pkt_len
        is_icmp_err = False
        syn = False
        if proto == C.IPPROTO_TCP:
            if l4 + 20 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 9
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            sport = be16(p, l4)
            dport = be16(p, l4 + 2)
            syn = (p[l4 + 13] & C.TCP_FLAG_SYN) != 0
        elif proto == C.IPPROTO_UDP:
            if l4 + 8 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 9
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            sport = be16(p, l4)
            dport = be16(p, l4 + 2)
        elif proto == (C.IPPROTO_ICMP if family == C.FAMILY_V4 else C.IPPROTO_ICMPV6):
            if l4 + 8 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 9
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            itype = p[l4]
            if (family == C.FAMILY_V4 and itype == C.ICMP_ECHO_REQUEST) or (
                family == C.FAMILY_V6 and itype == C.ICMPV6_ECHO_REQUEST
            ):
                stats[C.STAT_TX_ICMP_ECHO_REPLY] += 1  # row 11
                actions[i], out_lens[i], real_ids[i] = C.XDP_TX, echo_reply(p, n, out, l3, l4, family), 0
                continue
            if not ((family == C.FAMILY_V4 and itype == C.ICMP_DEST_UNREACH) or (
                family == C.FAMILY_V6 and (itype == C.ICMPV6_DEST_UNREACH or itype == C.ICMPV6_PKT_TOOBIG)
            )):
                stats[C.STAT_PASS_NOT_VIP] += 1  # row 13
                copy(out, 0, p, 0, n)
                actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
                continue
            # the flow of the packet the error is about, swapped: its destination is our client
            proto, src_off, dst_off, il4 = icmp_inner(p, l4, pend, family)
            if proto < 0:
                stats[C.STAT_DROP_MALFORMED] += 1  # row 12
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            is_icmp_err = True
            sport = be16(p, il4 + 2)
            dport = be16(p, il4)
            dlo, dhi = addr_words(p, dst_off, family)
        else:
            stats[C.STAT_PASS_NOT_VIP] += 1  # row 10
            copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        # ---- VIP lookup: exact, longest prefix; then both again with port 0
        vi = key_lookup(vip_keys, vip_used, vip_mask, dlo, dhi, vip_tail(dport, proto, family))
        by_prefix = False
        if vi < 0 and cidr_vips != 0:
            vi = prefix_lookup(pv_keys, pv_used, pv_mask, pg_fam, pg_len, pg_mlo, pg_mhi, family,
                               dlo, dhi, vip_tail(dport, proto, family))
            by_prefix = vi >= 0
        if vi < 0:
            vi = key_lookup(vip_keys, vip_used, vip_mask, dlo, dhi, vip_tail(0, proto, family))
            if vi < 0 and cidr_vips != 0:
                vi = prefix_lookup(pv_keys, pv_used, pv_mask, pg_fam, pg_len, pg_mlo, pg_mhi, family,
                                   dlo, dhi, vip_tail(0, proto, family))
                by_prefix = vi >= 0
            if vi < 0:
                stats[C.STAT_PASS_NOT_VIP] += 1  # row 14
                copy(out, 0, p, 0, n)
                actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
                continue
            # a port-0 VIP ignores the destination port, unless it hashes on it
            if (np.int64(pv_meta[vi, 0] if by_prefix else vip_meta[vi, 0]) & C.F_DPORT_ONLY) == 0:
                dport = 0
        if by_prefix:
            stats[C.STAT_VIP_PREFIX_MATCHED] += 1
            vflags = np.int64(pv_meta[vi, 0])
            vip_num = np.int64(pv_meta[vi, 1])
        else:
            vflags = np.int64(vip_meta[vi, 0])
            vip_num = np.int64(vip_meta[vi, 1])
        vip_stats[vip_num, C.VIP_STAT_PACKETS] += 1
        vip_stats[vip_num, C.VIP_STAT_BYTES] += n
        if vflags & C.F_NO_SRC_PORT:
            sport = 0

        # ---- real selection
        slo, shi = addr_words(p, src_off, family)
        # ports word = the 4 wire bytes [sport][dport] read little-endian (Katran's flow.ports)
        ports = ((sport >> 8) | ((sport & 0xFF) << 8) | ((dport >> 8) << 16) | ((dport & 0xFF) << 24))
        fk[0] = slo
        fk[1] = shi
        fk[2] = dlo
        fk[3] = dhi
        fk[4] = np.uint64(ports) | (np.uint64(proto) << np.uint64(32)) | (np.uint64(family) << np.uint64(40))
        real_id = 0
        from_ring = False
        ring_pos = 0
        # 0. QUIC: the server id in the connection id names the real
        if (vflags & C.F_QUIC) and proto == C.IPPROTO_UDP and not is_icmp_err:
            qid = quic_server_id(p, l4 + C.UDP_HLEN, pend - l4 - C.UDP_HLEN)
            if qid == 0:
                stats[C.STAT_QUIC_FALLBACK] += 1
            else:
                rid = quic_real(quic_ids, quic_reals, qid)
                if rid >= 0 and real_family[rid] != C.FAMILY_NONE:
                    real_id = rid
                    stats[C.STAT_QUIC_ROUTED] += 1
                    if (vflags & C.F_LRU_BYPASS) == 0:
                        # Katran's: the routed real goes into the connection table, so a
                        # later packet of the flow without a usable id stays on it
                        bucket, tag = conntable.slot(ct_mask, fk)
                        clock[0] += 1
                        w = conntable.find(ct_tags, ct_ent, bucket, tag, fk)
                        if w < 0:
                            # a new entry is a new connection: not written over the flood rate
                            if conntable.flood(ct_rate, max_conn_rate, now):
                                stats[C.STAT_FLOOD_NEW_CONNS] += 1
                            else:
                                conntable.insert(ct_tags, ct_ent, bucket, tag, fk, real_id, now, clock[0])
                                stats[C.STAT_QUIC_CONN_WRITTEN] += 1
                        else:
                            ct_ent[bucket, w, conntable.E_STAMP] = clock[0]
                            if ct_ent[bucket, w, conntable.E_REAL] != np.uint64(real_id):
                                ct_ent[bucket, w, conntable.E_REAL] = np.uint64(real_id)  # atime kept
                                stats[C.STAT_QUIC_CONN_WRITTEN] += 1
                else:
                    stats[C.STAT_QUIC_UNKNOWN] += 1
        # 1. the connection table; a QUIC-routed packet neither reads nor writes it, nor
        #    does a stateless VIP's
        use_lru = (vflags & (C.F_LRU_BYPASS | C.F_STATELESS)) == 0 and real_id == 0
        bucket = 0
        tag = np.uint64(0)
        if use_lru:
            bucket, tag = conntable.slot(ct_mask, fk)
            if not (proto == C.IPPROTO_TCP and syn):  # a SYN always re-hashes
                w = conntable.find(ct_tags, ct_ent, bucket, tag, fk)
                if w >= 0:
                    cand = np.int64(ct_ent[bucket, w, conntable.E_REAL])
                    age = now - np.int64(ct_ent[bucket, w, conntable.E_ATIME])
                    fresh = proto != C.IPPROTO_UDP or age <= C.LRU_UDP_TIMEOUT_NS
                    if real_family[cand] != C.FAMILY_NONE and fresh:
                        if proto == C.IPPROTO_UDP:
                            ct_ent[bucket, w, conntable.E_ATIME] = np.uint64(now)
                        # a real the health checks took down for this VIP: UDP, and TCP
                        # where the VIP asks, re-hash (the entry is rewritten below); the
                        # down set is read only behind the real's hint
                        if (real_flags[cand] & C.REAL_F_DOWN) and (
                                proto == C.IPPROTO_UDP or (vflags & C.F_MIGRATE_DOWN_TCP)) and \
                                real_down_for(down_set, vip_num, cand):
                            stats[C.STAT_DOWN_REAL_MIGRATED] += 1
                        else:
                            real_id = cand
                            clock[0] += 1
                            ct_ent[bucket, w, conntable.E_STAMP] = clock[0]
            if real_id != 0:
                stats[C.STAT_LRU_HIT] += 1
            else:
                stats[C.STAT_LRU_MISS] += 1
        if real_id == 0:
            # 2. source routing, else the ring; a new flow the connection table would
            # record counts towards the flood guard, and over the rate it is neither
            # source-routed nor recorded
            record = use_lru and not is_icmp_err
            if record and conntable.flood(ct_rate, max_conn_rate, now):
                record = False
                stats[C.STAT_FLOOD_NEW_CONNS] += 1
            elif vflags & C.F_SRC_ROUTING:
                if family == C.FAMILY_V4:
                    real_id = src_route_v4(lpm4_lens, lpm4_starts, lpm4_keys, lpm4_reals, p, src_off)
                else:
                    real_id = src_route_v6(lpm6_lens, lpm6_starts, lpm6_hi, lpm6_lo, lpm6_reals, p, src_off)
                if real_id != 0 and real_family[real_id] == C.FAMILY_NONE:
                    real_id = 0  # the longest match's real is gone: the ring
                if real_id != 0:
                    stats[C.STAT_SRC_ROUTED] += 1
            if real_id == 0:
                h = flow_hash(p, family, src_off, slo, ports, dport, (vflags & C.F_DPORT_ONLY) != 0,
                              ch_seed, v6_seed)
                ring_pos = h % ring_size
                from_ring = True
                real_id = np.int64(rings[vip_num, ring_pos])
                if real_id == 0 or real_family[real_id] == C.FAMILY_NONE:
                    stats[C.STAT_DROP_NO_REAL] += 1  # row 15
                    actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                    continue
            if record:
                clock[0] += 1
                conntable.insert(ct_tags, ct_ent, bucket, tag, fk, real_id, now, clock[0])
            if use_lru:
                real_stats[real_id, C.REAL_STAT_LRU_MISS] += 1

        # ---- forwarding; local delivery needs no encapsulation, so it is decided first
        rfam = real_family[real_id]
        if (vflags & C.F_LOCAL) and (real_flags[real_id] & C.REAL_F_LOCAL):
            real_stats[real_id, C.VIP_STAT_PACKETS] += 1
            real_stats[real_id, C.VIP_STAT_BYTES] += n
            stats[C.STAT_PASS_LOCAL] += 1  # row 17
            copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, real_id
            continue
        if family == C.FAMILY_V6 and rfam == C.FAMILY_V4 and not gue:
            stats[C.STAT_DROP_ENCAP_FAILED] += 1  # row 16
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        # a stateless VIP's TCP segment takes the previous rings' reals along (xdp/hoplist.h)
        hcount = 0
        glen = 0
        if (vflags & C.F_STATELESS) and from_ring and proto == C.IPPROTO_TCP and not is_icmp_err and gue:
            hops[0] = real_id
            hcount = prev_ring_hops(hops, prev_rings, prev_refs, vip_num, ring_pos, real_addr, real_family, rfam)
            if hcount > 1:
                glen = hoplist_bytes(hcount, rfam)
        overhead = ((C.ENCAP_IPV4_OVERHEAD if rfam == C.FAMILY_V4 else C.ENCAP_IPV6_OVERHEAD)
                    + (C.UDP_HLEN if gue else 0) + glen)
        if mtu != 0 and pkt_len + overhead > mtu:
            quote = C.ICMP_TOO_BIG_QUOTE_V4 if family == C.FAMILY_V4 else C.ICMP_TOO_BIG_QUOTE_V6
            if (is_icmp_err or pkt_len < quote
                    or (family == C.FAMILY_V4 and (be16(p, l3 + 6) & C.IP_DF) == 0)):
                stats[C.STAT_DROP_TOO_BIG] += 1  # row 21
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            stats[C.STAT_TX_ICMP_TOO_BIG] += 1  # row 20
            actions[i], out_lens[i], real_ids[i] = C.XDP_TX, too_big(p, out, l3, family, overhead, mtu), 0
            continue
        # ---- encapsulation (xdp/encap.h): L2 to the gateway, outer IP (+ UDP), the packet
        ulen = C.UDP_HLEN + glen if gue else 0
        copy(out, 0, gw_mac, 0, 6)
        copy(out, 6, p, 0, 6)
        if vlan:
            copy(out, 12, p, 12, 4)
        o = l3
        if rfam == C.FAMILY_V4:
            out[l3 - 2] = C.ETH_P_IP >> 8
            out[l3 - 1] = C.ETH_P_IP & 0xFF
            tot = pkt_len + C.ENCAP_IPV4_OVERHEAD + ulen
            out[o] = 0x45
            out[o + 1] = tos
            out[o + 2] = tot >> 8
            out[o + 3] = tot & 0xFF
            zero(out, o + 4, 4)
            out[o + 8] = C.DEFAULT_TTL
            if gue:
                out[o + 9] = C.IPPROTO_UDP
                copy(out, o + 12, gue_src_v4, 0, 4)
            else:
                # Katran's outer source 172.16.(c2 ^ (sport & 0xff)).(c3 ^ (sport >> 8))
                out[o + 9] = C.IPPROTO_IPIP
                out[o + 12] = C.IPIP_V4_PREFIX0
                out[o + 13] = C.IPIP_V4_PREFIX1
                out[o + 14] = p[src_off + 2] ^ (sport & 0xFF)
                out[o + 15] = p[src_off + 3] ^ (sport >> 8)
            for k in range(4):
                out[o + 16 + k] = real_addr[real_id, k]
            c = ipv4_csum(out, o)
            out[o + 10] = c >> 8
            out[o + 11] = c & 0xFF
            o += C.ENCAP_IPV4_OVERHEAD
        else:
            out[l3 - 2] = C.ETH_P_IPV6 >> 8
            out[l3 - 1] = C.ETH_P_IPV6 & 0xFF
            out[o] = 0x60 | (tos >> 4)
            out[o + 1] = (tos & 0xF) << 4
            out[o + 2] = 0
            out[o + 3] = 0
            plen = pkt_len + ulen
            out[o + 4] = plen >> 8
            out[o + 5] = plen & 0xFF
            out[o + 7] = C.DEFAULT_TTL
            if gue:
                out[o + 6] = C.IPPROTO_UDP
                copy(out, o + 8, gue_src_v6, 0, 16)
            else:
                # Katran's outer source 0100::s0^(sport>>8) s1^(sport&0xff) s2 s3
                out[o + 6] = C.IPPROTO_IPIP if family == C.FAMILY_V4 else C.IPPROTO_IPV6
                out[o + 8] = C.IPIP_V6_PREFIX0
                out[o + 9] = C.IPIP_V6_PREFIX1
                zero(out, o + 10, 10)
                last4 = src_off if family == C.FAMILY_V4 else src_off + 12
                out[o + 20] = p[last4] ^ (sport >> 8)
                out[o + 21] = p[last4 + 1] ^ (sport & 0xFF)
                out[o + 22] = p[last4 + 2]
                out[o + 23] = p[last4 + 3]
            for k in range(16):
                out[o + 24 + k] = real_addr[real_id, k]
            o += C.ENCAP_IPV6_OVERHEAD
        if gue:
            # UDP: Katran's source port; the checksum once the inner packet is in place
            gsport = gue_sport(p, src_off, family, sport, rfam == C.FAMILY_V6)
            ulen_field = pkt_len + ulen  # ulen: UDP header + GUE hop list
            out[o] = gsport >> 8
            out[o + 1] = gsport & 0xFF
            out[o + 2] = gue_port >> 8
            out[o + 3] = gue_port & 0xFF
            out[o + 4] = ulen_field >> 8
            out[o + 5] = ulen_field & 0xFF
            out[o + 6] = 0
            out[o + 7] = 0
            o += C.UDP_HLEN
            if glen:
                o = write_hoplist(out, o, l3, o - C.UDP_HLEN, hops, hcount, real_addr, rfam, family,
                                  inner_sum(p, l3, pkt_len, family))
                stats[C.STAT_HOPLIST_SENT] += 1
        rest = n - l3
        copy(out, o, p, l3, rest)
        if gue and not glen:  # a hop list's checksum is write_hoplist's
            c = gue_udp_csum(out, l3, rfam == C.FAMILY_V6, o - C.UDP_HLEN, o, family)
            out[o - 2] = c >> 8
            out[o - 1] = c & 0xFF
        real_stats[real_id, C.VIP_STAT_PACKETS] += 1
        real_stats[real_id, C.VIP_STAT_BYTES] += n
        stats[C.STAT_TX_ENCAP] += 1  # row 18
        if is_icmp_err:
            stats[C.STAT_ICMP_ERROR_FORWARDED] += 1  # row 19
        actions[i], out_lens[i], real_ids[i] = C.XDP_TX, o + rest, real_id
