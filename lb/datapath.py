"""The userspace datapath: docs/datapath.md in numba, frame by frame.

Pure: frames and tables in, actions, output frames and counter updates out. The only
state it keeps between calls is the connection table (as the XDP program's LRU map), and
the only clock is the ``now`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath_tables import DatapathTables, routing_tables
from lb.jhash import jhash16, jhash_2words

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_EMPTY = np.uint64(0)  # "used" marker values in the lookup tables
_USED = np.uint64(1)

# --- small helpers -------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _be16(p, off):
    return (np.int64(p[off]) << 8) | np.int64(p[off + 1])


@nb.njit(cache=True, inline="always")
def _le64(p, off):
    v = np.uint64(0)
    for i in range(8):
        v |= np.uint64(p[off + i]) << np.uint64(8 * i)
    return v


@nb.njit(cache=True, inline="always")
def _mix(h, w):
    # multiply-xorshift mixing for table indexes (internal; never on the wire). The casts
    # keep numba from promoting a mix of int64 and uint64 to float64.
    h = (np.uint64(h) ^ np.uint64(w)) * np.uint64(_GOLDEN)
    return h ^ (h >> np.uint64(29))


@nb.njit(cache=True, inline="always")
def _addr_words(p, off, family):
    """(lo, hi) 64-bit words of a 16-byte table address read from the wire."""
    if family == C.FAMILY_V4:
        lo = np.uint64(0)
        for i in range(4):
            lo |= np.uint64(p[off + i]) << np.uint64(8 * i)
        return lo, np.uint64(0)
    return _le64(p, off), _le64(p, off + 8)


@nb.njit(cache=True, inline="always")
def _copy(dst, doff, src, soff, n):
    """dst[doff:doff+n] = src[soff:soff+n], without making array views (~14 ns each)."""
    for k in range(n):
        dst[doff + k] = src[soff + k]


@nb.njit(cache=True, inline="always")
def _zero(dst, doff, n):
    for k in range(n):
        dst[doff + k] = 0


@nb.njit(cache=True)
def _csum_fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@nb.njit(cache=True, inline="always")
def _ipv4_csum(buf, off):
    """Header checksum of the 20-byte IPv4 header at ``off`` (checksum field taken as 0)."""
    s = 0
    for i in range(0, 20, 2):
        if i != 10:
            s += _be16(buf, off + i)
    return (~_csum_fold(s)) & 0xFFFF


@nb.njit(cache=True)
def csum_replace16(old_csum, old_word, new_word):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')."""
    s = ((~old_csum) & 0xFFFF) + ((~old_word) & 0xFFFF) + new_word
    return (~_csum_fold(s)) & 0xFFFF


# --- hash tables (open addressing for VIPs, set-associative LRU for flows) ------------


@nb.njit(cache=True, inline="always")
def _vip_lookup(keys, used, mask, lo, hi, tail):
    h = _mix(_mix(_mix(np.uint64(0), lo), hi), tail)
    i = np.int64(h & np.uint64(mask))
    for _ in range(mask + 1):
        if used[i] == _EMPTY:
            return -1
        if keys[i, 0] == lo and keys[i, 1] == hi and keys[i, 2] == tail:
            return i
        i = (i + 1) & mask
    return -1


@nb.njit(cache=True)
def _vip_insert(keys, used, mask, lo, hi, tail):
    h = _mix(_mix(_mix(np.uint64(0), lo), hi), tail)
    i = np.int64(h & np.uint64(mask))
    while used[i] != _EMPTY:
        i = (i + 1) & mask
    keys[i, 0] = lo
    keys[i, 1] = hi
    keys[i, 2] = tail
    used[i] = _USED
    return i


# Connection table: ``tags[bucket, way]`` (one 64-byte line per bucket; 0 = empty) is
# checked first, so a lookup touches the tag line plus the one matching entry:
# ``ent[bucket, way]`` = 8 words: flow key (5), real id, atime (ns), LRU stamp.
_E_REAL, _E_ATIME, _E_STAMP = 5, 6, 7


@nb.njit(cache=True, inline="always")
def _flow_hash(fk):
    h = np.uint64(0)
    for i in range(5):
        h = _mix(h, fk[i])
    return h


@nb.njit(cache=True, inline="always")
def _ct_find(tags, ent, b, tag, fk):
    for w in range(tags.shape[1]):
        if tags[b, w] == tag:
            if (ent[b, w, 0] == fk[0] and ent[b, w, 1] == fk[1] and ent[b, w, 2] == fk[2]
                    and ent[b, w, 3] == fk[3] and ent[b, w, 4] == fk[4]):
                return w
    return -1


@nb.njit(cache=True, inline="always")
def _ct_insert(tags, ent, b, tag, fk, real_id, now, stamp):
    w = _ct_find(tags, ent, b, tag, fk)
    if w < 0:
        # a free way, else the least recently used one
        oldest = np.uint64(_M64)
        for j in range(tags.shape[1]):
            if tags[b, j] == _EMPTY:
                w = j
                break
            if ent[b, j, _E_STAMP] < oldest:
                oldest = ent[b, j, _E_STAMP]
                w = j
    for i in range(5):
        ent[b, w, i] = fk[i]
    tags[b, w] = tag
    ent[b, w, _E_REAL] = np.uint64(real_id)
    ent[b, w, _E_ATIME] = np.uint64(now)
    ent[b, w, _E_STAMP] = stamp


# --- QUIC connection ids and source routes (docs/datapath.md, real selection 0 and 2) ---


@nb.njit(cache=True, inline="always")
def _quic_server_id(p, pl, plen):
    """Server id in the DCID of the UDP payload ``p[pl:pl+plen]``; 0 = no id (fallback)."""
    if plen < 1:
        return 0
    b0 = np.int64(p[pl])
    if b0 & C.QUIC_LONG_HEADER:
        if (plen < C.QUIC_LONG_CID_OFFSET + C.QUIC_MIN_CONNID_LEN
                or (b0 & C.QUIC_PACKET_TYPE_MASK) < C.QUIC_HANDSHAKE
                or p[pl + C.QUIC_LONG_CID_OFFSET - 1] < C.QUIC_MIN_CONNID_LEN):
            return 0
        d = pl + C.QUIC_LONG_CID_OFFSET
    else:
        if plen < C.QUIC_SHORT_CID_OFFSET + C.QUIC_MIN_CONNID_LEN:
            return 0
        d = pl + C.QUIC_SHORT_CID_OFFSET
    version = np.int64(p[d]) >> 6
    if version == C.QUIC_CID_V1:
        return ((np.int64(p[d]) & 0x3F) << 10) | (np.int64(p[d + 1]) << 2) | (np.int64(p[d + 2]) >> 6)
    if version == C.QUIC_CID_V2:
        return (np.int64(p[d + 1]) << 16) | (np.int64(p[d + 2]) << 8) | np.int64(p[d + 3])
    if version == C.QUIC_CID_V3:
        return ((np.int64(p[d + 1]) << 24) | (np.int64(p[d + 2]) << 16) | (np.int64(p[d + 3]) << 8)
                | np.int64(p[d + 4]))
    return 0


@nb.njit(cache=True, inline="always")
def _bsearch(keys, lo, hi, x):
    """Index of ``x`` in the sorted ``keys[lo:hi]``, or -1."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < x:
            lo = mid + 1
        elif keys[mid] > x:
            hi = mid
        else:
            return mid
    return -1


@nb.njit(cache=True, inline="always")
def _bsearch2(khi, klo, lo, hi, xhi, xlo):
    """As :func:`_bsearch` for keys that are (khi, klo) pairs sorted lexicographically."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if khi[mid] < xhi or (khi[mid] == xhi and klo[mid] < xlo):
            lo = mid + 1
        elif khi[mid] > xhi or klo[mid] > xlo:
            hi = mid
        else:
            return mid
    return -1


@nb.njit(cache=True, inline="always")
def _lpm4_real(lens, starts, keys, reals, p, off):
    """Real id of the longest prefix holding the IPv4 address at ``p[off]``, 0 if none."""
    a = (np.int64(p[off]) << 24) | (np.int64(p[off + 1]) << 16) | (np.int64(p[off + 2]) << 8) | np.int64(p[off + 3])
    for k in range(lens.shape[0]):  # longest first
        j = _bsearch(keys, starts[k], starts[k + 1], a & ((_M32 << (32 - lens[k])) & _M32))
        if j >= 0:
            return reals[j]
    return 0


@nb.njit(cache=True, inline="always")
def _lpm6_real(lens, starts, khi, klo, reals, p, off):
    """As :func:`_lpm4_real` for the IPv6 address at ``p[off]``."""
    ahi = np.uint64(0)
    alo = np.uint64(0)
    for i in range(8):
        ahi = (ahi << np.uint64(8)) | np.uint64(p[off + i])
        alo = (alo << np.uint64(8)) | np.uint64(p[off + 8 + i])
    for k in range(lens.shape[0]):
        n = lens[k]
        # mask of the top n bits of a 64-bit half (a shift by 64 is undefined: n = 0 apart)
        mhi = np.uint64(0) if n == 0 else ~((np.uint64(1) << np.uint64(64 - min(n, 64))) - np.uint64(1))
        mlo = np.uint64(0) if n <= 64 else ~((np.uint64(1) << np.uint64(128 - n)) - np.uint64(1))
        j = _bsearch2(khi, klo, starts[k], starts[k + 1], ahi & mhi, alo & mlo)
        if j >= 0:
            return reals[j]
    return 0


# --- the datapath ----------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _echo_reply(p, n, out, l3, l4, family, vlan, stats):
    _copy(out, 0, p, 0, n)
    _copy(out, 0, p, 6, 6)
    _copy(out, 6, p, 0, 6)
    if family == C.FAMILY_V4:
        _copy(out, l3 + 12, p, l3 + 16, 4)
        _copy(out, l3 + 16, p, l3 + 12, 4)
        out[l3 + 8] = C.DEFAULT_TTL
        c = _ipv4_csum(out, l3)
        out[l3 + 10] = c >> 8
        out[l3 + 11] = c & 0xFF
        new_type = C.ICMP_ECHO_REPLY
    else:
        _copy(out, l3 + 8, p, l3 + 24, 16)
        _copy(out, l3 + 24, p, l3 + 8, 16)
        out[l3 + 7] = C.DEFAULT_TTL
        new_type = C.ICMPV6_ECHO_REPLY
    code = np.int64(p[l4 + 1])
    out[l4] = new_type
    c = csum_replace16(_be16(p, l4 + 2), (np.int64(p[l4]) << 8) | code, (new_type << 8) | code)
    out[l4 + 2] = c >> 8
    out[l4 + 3] = c & 0xFF
    stats[C.STAT_TX_ICMP_ECHO_REPLY] += 1
    return C.XDP_TX, n, 0


@nb.njit(cache=True, inline="always")
def _sum16(buf, off, nbytes):
    """One's-complement partial sum (unfolded) of ``nbytes`` (even) bytes at ``off``."""
    s = 0
    for k in range(0, nbytes, 2):
        s += _be16(buf, off + k)
    return s


@nb.njit(cache=True, inline="always")
def _too_big(p, out, l3, family, pkt_len, overhead, mtu, stats):
    """Row 20: ICMP frag-needed / ICMPv6 packet-too-big back to the client, quoting the
    start of the packet. Returns (action, output length, real id)."""
    _copy(out, 0, p, 6, 6)
    _copy(out, 6, p, 0, 6)
    _copy(out, 12, p, 12, l3 - 12)  # the 802.1Q tag if any, and the same ethertype
    o = l3
    if family == C.FAMILY_V4:
        quote = C.ICMP_TOO_BIG_QUOTE_V4
        ic = o + 20
        out[o] = 0x45
        out[o + 1] = 0
        tot = 20 + 8 + quote
        out[o + 2] = tot >> 8
        out[o + 3] = tot & 0xFF
        _zero(out, o + 4, 4)
        out[o + 8] = C.DEFAULT_TTL
        out[o + 9] = C.IPPROTO_ICMP
        _copy(out, o + 12, p, l3 + 16, 4)
        _copy(out, o + 16, p, l3 + 12, 4)
        c = _ipv4_csum(out, o)
        out[o + 10] = c >> 8
        out[o + 11] = c & 0xFF
        out[ic] = C.ICMP_DEST_UNREACH
        out[ic + 1] = C.ICMP_FRAG_NEEDED
        _zero(out, ic + 2, 4)
        out[ic + 6] = (mtu - overhead) >> 8
        out[ic + 7] = (mtu - overhead) & 0xFF
        _copy(out, ic + 8, p, l3, quote)
        s = _sum16(out, ic, 8 + quote)
    else:
        quote = C.ICMP_TOO_BIG_QUOTE_V6
        ic = o + 40
        plen = 8 + quote
        out[o] = 0x60
        _zero(out, o + 1, 3)
        out[o + 4] = plen >> 8
        out[o + 5] = plen & 0xFF
        out[o + 6] = C.IPPROTO_ICMPV6
        out[o + 7] = C.DEFAULT_TTL
        _copy(out, o + 8, p, l3 + 24, 16)
        _copy(out, o + 24, p, l3 + 8, 16)
        out[ic] = C.ICMPV6_PKT_TOOBIG
        _zero(out, ic + 1, 5)
        out[ic + 6] = (mtu - overhead) >> 8
        out[ic + 7] = (mtu - overhead) & 0xFF
        _copy(out, ic + 8, p, l3, quote)
        # pseudo header: addresses, upper-layer length, next header
        s = _sum16(out, o + 8, 32) + plen + C.IPPROTO_ICMPV6 + _sum16(out, ic, plen)
    c = (~_csum_fold(s)) & 0xFFFF
    out[ic + 2] = c >> 8
    out[ic + 3] = c & 0xFF
    stats[C.STAT_TX_ICMP_TOO_BIG] += 1
    return C.XDP_TX, ic + 8 + quote, 0


# Not cached: numba's on-disk cache made this loop ~1.8x slower (314 vs 175 ns/packet,
# measured with bench/bench_datapath.py); it costs a few seconds of compilation per process.
@nb.njit(cache=False)
def process_batch(  # noqa: C901 - one loop body mirrors the one XDP entry point
    frames, lengths, outs, out_lens, actions, real_ids,
    vip_keys, vip_used, vip_vals, vip_mask,
    va_keys, va_used, va_mask,
    real_addr, real_family, real_flags,
    rings, ring_size, ch_seed, v6_seed,
    gw_mac, max_frame, mtu, encap, gue_port, gue_src_v4, gue_src_v6,
    quic_ids, quic_reals,
    lpm4_lens, lpm4_start, lpm4_keys, lpm4_reals,
    lpm6_lens, lpm6_start, lpm6_hi, lpm6_lo, lpm6_reals,
    ct_tags, ct_ent, ct_mask, clock,
    now, stats, vip_stats, real_stats,
):
    """Process ``frames[i, :lengths[i]]`` in order, as docs/datapath.md says.

    Per frame: ``actions[i]``, the output frame in ``outs[i, :out_lens[i]]`` (TX and PASS)
    and the chosen ``real_ids[i]``; counters are incremented in ``stats``, ``vip_stats``,
    ``real_stats``. The frame logic is the loop body itself, not a function: a call per
    frame with this many array arguments costs more than the logic (~300 ns).
    """
    fk = np.zeros(5, dtype=np.uint64)  # the flow key, as 5 words
    for i in range(frames.shape[0]):
        p = frames[i]
        n = lengths[i]
        out = outs[i]
        stats[C.STAT_RX_PACKETS] += 1
        # ---- L2
        if n < C.ETH_HLEN:
            stats[C.STAT_DROP_MALFORMED] += 1
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        eth_type = _be16(p, 12)
        l3 = C.ETH_HLEN
        vlan = False
        if eth_type == C.ETH_P_8021Q:
            if n < C.ETH_HLEN + C.VLAN_HLEN:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            vlan = True
            eth_type = _be16(p, 16)
            l3 = C.ETH_HLEN + C.VLAN_HLEN
        avail = n - l3

        # ---- L3 sanity and "is this for a VIP address?"
        if eth_type == C.ETH_P_IP:
            family = C.FAMILY_V4
            if avail < 20 or (p[l3] >> 4) != 4 or (p[l3] & 0xF) < 5:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            ihl = np.int64(p[l3] & 0xF)
            pkt_len = _be16(p, l3 + 2)
            if pkt_len < ihl * 4 or pkt_len > avail:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            src_off = l3 + 12
            dst_off = l3 + 16
            proto = np.int64(p[l3 + 9])
            tos = np.int64(p[l3 + 1])
        elif eth_type == C.ETH_P_IPV6:
            family = C.FAMILY_V6
            if avail < 40 or (p[l3] >> 4) != 6:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            pkt_len = _be16(p, l3 + 4) + 40
            if pkt_len > avail:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            ihl = 10  # 40 bytes, in IPv4 IHL units
            src_off = l3 + 8
            dst_off = l3 + 24
            proto = np.int64(p[l3 + 6])
            tos = ((np.int64(p[l3]) & 0xF) << 4) | (np.int64(p[l3 + 1]) >> 4)
        else:
            stats[C.STAT_PASS_NOT_IP] += 1
            _copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        dlo, dhi = _addr_words(p, dst_off, family)
        if _vip_lookup(va_keys, va_used, va_mask, dlo, dhi, np.uint64(family)) < 0:
            stats[C.STAT_PASS_NOT_VIP] += 1
            _copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        # ---- checks that apply to VIP addresses only
        if n > max_frame:
            stats[C.STAT_DROP_OVERSIZE] += 1
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        if family == C.FAMILY_V4:
            if ihl != 5:
                stats[C.STAT_DROP_IP_OPTIONS] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            if _be16(p, l3 + 6) & (C.IP_MF | C.IP_OFFSET_MASK):
                stats[C.STAT_DROP_FRAGMENT] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
        elif proto == C.IPPROTO_FRAGMENT:
            stats[C.STAT_DROP_FRAGMENT] += 1
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue

        l4 = l3 + ihl * 4
        pend = l3 + pkt_len
        icmp_proto = C.IPPROTO_ICMP if family == C.FAMILY_V4 else C.IPPROTO_ICMPV6
        is_icmp_err = False
        syn = False
        # flow fields: offsets of src/dst addresses and the two ports (host order)
        fsrc_off = src_off
        fdst_off = dst_off
        if proto == C.IPPROTO_TCP:
            if l4 + 20 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            sport = _be16(p, l4)
            dport = _be16(p, l4 + 2)
            syn = (p[l4 + 13] & C.TCP_FLAG_SYN) != 0
        elif proto == C.IPPROTO_UDP:
            if l4 + 8 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            sport = _be16(p, l4)
            dport = _be16(p, l4 + 2)
        elif proto == icmp_proto:
            if l4 + 8 > pend:
                stats[C.STAT_DROP_MALFORMED] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            itype = p[l4]
            if (family == C.FAMILY_V4 and itype == C.ICMP_ECHO_REQUEST) or (
                family == C.FAMILY_V6 and itype == C.ICMPV6_ECHO_REQUEST
            ):
                actions[i], out_lens[i], real_ids[i] = _echo_reply(p, n, out, l3, l4, family, vlan, stats)
                continue
            if family == C.FAMILY_V4 and itype == C.ICMP_DEST_UNREACH:
                inner = l4 + 8
                if inner + 24 > pend or (p[inner] >> 4) != 4 or (p[inner] & 0xF) != 5:
                    stats[C.STAT_DROP_MALFORMED] += 1
                    actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                    continue
                proto = np.int64(p[inner + 9])
                fsrc_off = inner + 16
                fdst_off = inner + 12
                il4 = inner + 20
            elif family == C.FAMILY_V6 and (itype == C.ICMPV6_DEST_UNREACH or itype == C.ICMPV6_PKT_TOOBIG):
                inner = l4 + 8
                if inner + 44 > pend or (p[inner] >> 4) != 6:
                    stats[C.STAT_DROP_MALFORMED] += 1
                    actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                    continue
                proto = np.int64(p[inner + 6])
                fsrc_off = inner + 24
                fdst_off = inner + 8
                il4 = inner + 40
            else:
                stats[C.STAT_PASS_NOT_VIP] += 1
                _copy(out, 0, p, 0, n)
                actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
                continue
            is_icmp_err = True
            sport = _be16(p, il4 + 2)
            dport = _be16(p, il4)
        else:
            stats[C.STAT_PASS_NOT_VIP] += 1
            _copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
            continue

        # ---- VIP lookup, with the port-0 fallback
        if is_icmp_err:
            dlo, dhi = _addr_words(p, fdst_off, family)
        tail = np.uint64(dport) | (np.uint64(proto) << np.uint64(16)) | (np.uint64(family) << np.uint64(24))
        vi = _vip_lookup(vip_keys, vip_used, vip_mask, dlo, dhi, tail)
        if vi < 0:
            tail = (np.uint64(proto) << np.uint64(16)) | (np.uint64(family) << np.uint64(24))
            vi = _vip_lookup(vip_keys, vip_used, vip_mask, dlo, dhi, tail)
            if vi < 0:
                stats[C.STAT_PASS_NOT_VIP] += 1
                _copy(out, 0, p, 0, n)
                actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, 0
                continue
            # a port-0 VIP ignores the destination port, unless it hashes on it
            if (np.int64(vip_vals[vi, 0]) & C.F_DPORT_ONLY) == 0:
                dport = 0
        vflags = np.int64(vip_vals[vi, 0])
        vip_num = np.int64(vip_vals[vi, 1])
        vip_stats[vip_num, C.VIP_STAT_PACKETS] += 1
        vip_stats[vip_num, C.VIP_STAT_BYTES] += n
        if vflags & C.F_NO_SRC_PORT:
            sport = 0

        # ---- real selection: connection table, else the ring
        slo, shi = _addr_words(p, fsrc_off, family)
        # ports word = the 4 wire bytes [sport][dport] read little-endian (Katran's flow.ports)
        ports = ((sport >> 8) | ((sport & 0xFF) << 8) | ((dport >> 8) << 16) | ((dport & 0xFF) << 24))
        fk[0] = slo
        fk[1] = shi
        fk[2] = dlo
        fk[3] = dhi
        fk[4] = np.uint64(ports) | (np.uint64(proto) << np.uint64(32)) | (np.uint64(family) << np.uint64(40))
        real_id = 0
        # 0. QUIC: the server id in the connection id names the real
        if (vflags & C.F_QUIC) and proto == C.IPPROTO_UDP and not is_icmp_err:
            qid = _quic_server_id(p, l4 + C.UDP_HLEN, pend - l4 - C.UDP_HLEN)
            if qid == 0:
                stats[C.STAT_QUIC_FALLBACK] += 1
            else:
                j = _bsearch(quic_ids, 0, quic_ids.shape[0], qid)
                if j >= 0 and real_family[quic_reals[j]] != C.FAMILY_NONE:
                    real_id = quic_reals[j]
                    stats[C.STAT_QUIC_ROUTED] += 1
                else:
                    stats[C.STAT_QUIC_UNKNOWN] += 1
        # a QUIC-routed packet neither reads nor writes the connection table
        use_lru = (vflags & C.F_LRU_BYPASS) == 0 and real_id == 0
        bucket = 0
        tag = np.uint64(0)
        if use_lru:
            fh = _flow_hash(fk)
            bucket = np.int64(fh & np.uint64(ct_mask))
            tag = (fh >> np.uint64(32)) | np.uint64(1)
            if not (proto == C.IPPROTO_TCP and syn):
                w = _ct_find(ct_tags, ct_ent, bucket, tag, fk)
                if w >= 0:
                    cand = np.int64(ct_ent[bucket, w, _E_REAL])
                    age = now - np.int64(ct_ent[bucket, w, _E_ATIME])
                    fresh = proto != C.IPPROTO_UDP or age <= C.LRU_UDP_TIMEOUT_NS
                    if real_family[cand] != C.FAMILY_NONE and fresh:
                        real_id = cand
                        clock[0] += 1
                        ct_ent[bucket, w, _E_STAMP] = clock[0]
                        if proto == C.IPPROTO_UDP:
                            ct_ent[bucket, w, _E_ATIME] = np.uint64(now)
            if real_id != 0:
                stats[C.STAT_LRU_HIT] += 1
            else:
                stats[C.STAT_LRU_MISS] += 1
        if real_id == 0:
            # 2. source routing, else the ring
            if vflags & C.F_SRC_ROUTING:
                if family == C.FAMILY_V4:
                    real_id = _lpm4_real(lpm4_lens, lpm4_start, lpm4_keys, lpm4_reals, p, fsrc_off)
                else:
                    real_id = _lpm6_real(lpm6_lens, lpm6_start, lpm6_hi, lpm6_lo, lpm6_reals, p, fsrc_off)
                if real_id != 0 and real_family[real_id] == C.FAMILY_NONE:
                    real_id = 0  # the longest match's real is gone: the ring
                if real_id != 0:
                    stats[C.STAT_SRC_ROUTED] += 1
            if real_id == 0:
                if vflags & C.F_DPORT_ONLY:
                    hports = ((dport >> 8) | ((dport & 0xFF) << 8)) * 0x10001
                    if family == C.FAMILY_V4:
                        h = jhash_2words(0, hports, ch_seed)
                    else:
                        zero = np.zeros(16, dtype=np.uint8)
                        h = jhash_2words(jhash16(zero, 0, v6_seed), hports, ch_seed)
                elif family == C.FAMILY_V4:
                    h = jhash_2words(np.int64(slo), ports, ch_seed)
                else:
                    h = jhash_2words(jhash16(p, fsrc_off, v6_seed), ports, ch_seed)
                real_id = np.int64(rings[vip_num, h % ring_size])
                if real_id == 0 or real_family[real_id] == C.FAMILY_NONE:
                    stats[C.STAT_DROP_NO_REAL] += 1
                    actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                    continue
            if use_lru and not is_icmp_err:
                clock[0] += 1
                _ct_insert(ct_tags, ct_ent, bucket, tag, fk, real_id, now, clock[0])

        rfam = real_family[real_id]
        if (vflags & C.F_LOCAL) and (real_flags[real_id] & C.REAL_F_LOCAL):
            real_stats[real_id, C.VIP_STAT_PACKETS] += 1
            real_stats[real_id, C.VIP_STAT_BYTES] += n
            stats[C.STAT_PASS_LOCAL] += 1
            _copy(out, 0, p, 0, n)
            actions[i], out_lens[i], real_ids[i] = C.XDP_PASS, n, real_id
            continue
        gue = encap == C.ENCAP_GUE
        if family == C.FAMILY_V6 and rfam == C.FAMILY_V4 and not gue:
            stats[C.STAT_DROP_ENCAP_FAILED] += 1
            actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
            continue
        hlen = C.ENCAP_IPV4_OVERHEAD if rfam == C.FAMILY_V4 else C.ENCAP_IPV6_OVERHEAD
        ulen = C.UDP_HLEN if gue else 0
        if mtu != 0 and pkt_len + hlen + ulen > mtu:
            quote = C.ICMP_TOO_BIG_QUOTE_V4 if family == C.FAMILY_V4 else C.ICMP_TOO_BIG_QUOTE_V6
            if (is_icmp_err or pkt_len < quote
                    or (family == C.FAMILY_V4 and (_be16(p, l3 + 6) & C.IP_DF) == 0)):
                stats[C.STAT_DROP_TOO_BIG] += 1
                actions[i], out_lens[i], real_ids[i] = C.XDP_DROP, 0, 0
                continue
            actions[i], out_lens[i], real_ids[i] = _too_big(p, out, l3, family, pkt_len,
                                                            hlen + ulen, mtu, stats)
            continue

        # ---- encapsulation
        l2len = l3
        _copy(out, 0, gw_mac, 0, 6)
        _copy(out, 6, p, 0, 6)
        if vlan:
            _copy(out, 12, p, 12, 4)
        o = l2len
        if rfam == C.FAMILY_V4:
            out[l2len - 2] = C.ETH_P_IP >> 8
            out[l2len - 1] = C.ETH_P_IP & 0xFF
            tot = pkt_len + C.ENCAP_IPV4_OVERHEAD + ulen
            out[o] = 0x45
            out[o + 1] = tos
            out[o + 2] = tot >> 8
            out[o + 3] = tot & 0xFF
            _zero(out, o + 4, 4)
            out[o + 8] = C.DEFAULT_TTL
            if gue:
                out[o + 9] = C.IPPROTO_UDP
                _copy(out, o + 12, gue_src_v4, 0, 4)
            else:
                out[o + 9] = C.IPPROTO_IPIP
                out[o + 12] = C.IPIP_V4_PREFIX0
                out[o + 13] = C.IPIP_V4_PREFIX1
                out[o + 14] = p[fsrc_off + 2] ^ (sport & 0xFF)
                out[o + 15] = p[fsrc_off + 3] ^ (sport >> 8)
            for k in range(4):
                out[o + 16 + k] = real_addr[real_id, k]
            c = _ipv4_csum(out, o)
            out[o + 10] = c >> 8
            out[o + 11] = c & 0xFF
            o += C.ENCAP_IPV4_OVERHEAD
        else:
            out[l2len - 2] = C.ETH_P_IPV6 >> 8
            out[l2len - 1] = C.ETH_P_IPV6 & 0xFF
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
                _copy(out, o + 8, gue_src_v6, 0, 16)
            else:
                out[o + 6] = C.IPPROTO_IPIP if family == C.FAMILY_V4 else C.IPPROTO_IPV6
                out[o + 8] = C.IPIP_V6_PREFIX0
                out[o + 9] = C.IPIP_V6_PREFIX1
                _zero(out, o + 10, 10)
                last4 = fsrc_off if family == C.FAMILY_V4 else fsrc_off + 12
                out[o + 20] = p[last4] ^ (sport >> 8)
                out[o + 21] = p[last4 + 1] ^ (sport & 0xFF)
                out[o + 22] = p[last4 + 2]
                out[o + 23] = p[last4 + 3]
            for k in range(16):
                out[o + 24 + k] = real_addr[real_id, k]
            o += C.ENCAP_IPV6_OVERHEAD
        if gue:
            # UDP: source port varies with the client, checksum 0 (RFC 6935)
            a = fsrc_off + (2 if family == C.FAMILY_V4 else 14)
            gsport = C.GUE_SPORT_BASE | ((_be16(p, a) ^ sport) & C.GUE_SPORT_MASK)
            ulen_field = pkt_len + C.UDP_HLEN
            out[o] = gsport >> 8
            out[o + 1] = gsport & 0xFF
            out[o + 2] = gue_port >> 8
            out[o + 3] = gue_port & 0xFF
            out[o + 4] = ulen_field >> 8
            out[o + 5] = ulen_field & 0xFF
            out[o + 6] = 0
            out[o + 7] = 0
            o += C.UDP_HLEN
        rest = n - l3
        _copy(out, o, p, l3, rest)
        real_stats[real_id, C.VIP_STAT_PACKETS] += 1
        real_stats[real_id, C.VIP_STAT_BYTES] += n
        stats[C.STAT_TX_ENCAP] += 1
        if is_icmp_err:
            stats[C.STAT_ICMP_ERROR_FORWARDED] += 1
        actions[i], out_lens[i], real_ids[i] = C.XDP_TX, o + rest, real_id
        continue


# --- Python face -----------------------------------------------------------------------


@dataclass
class BatchResult:
    """What one batch did: per frame action, output frame and real id; counter deltas."""

    actions: np.ndarray  # uint8[n], kernel xdp_action values
    out: np.ndarray  # uint8[n, stride + ENCAP_MAX_OVERHEAD]
    out_lens: np.ndarray  # int64[n]; 0 for DROP
    real_ids: np.ndarray  # uint32[n]; 0 when no real was chosen
    stats: np.ndarray  # int64[N_STATS] deltas
    vip_stats: np.ndarray | None  # int64[max_vips, 2] deltas (None: not collected)
    real_stats: np.ndarray | None  # int64[max_reals, 2] deltas (None: not collected)

    def output(self, i: int) -> bytes:
        """Output frame ``i`` (the unchanged input for PASS, empty for DROP)."""
        return self.out[i, : self.out_lens[i]].tobytes()


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


def _lpm_v4(routes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Source routes (layout.SRC_ROUTE_V4) as sorted per-length groups for a longest-prefix
    match by binary search: (lengths, starts, keys, reals); keys are the masked addresses
    as big-endian integers, sorted within each group."""
    addr = routes["key"]["addr"].astype(np.int64)
    keys = (addr[:, 0] << 24) | (addr[:, 1] << 16) | (addr[:, 2] << 8) | addr[:, 3] if len(routes) else np.zeros(0, np.int64)
    order, lens, starts = _lpm_groups(routes["key"]["prefixlen"])
    keys, reals = keys[order], routes["real_id"].astype(np.int64)[order]
    for k in range(len(lens)):
        g = slice(starts[k], starts[k + 1])
        o = np.argsort(keys[g], kind="stable")
        keys[g], reals[g] = keys[g][o], reals[g][o]
    return lens, starts, np.ascontiguousarray(keys), np.ascontiguousarray(reals)


def _lpm_v6(routes: np.ndarray) -> tuple[np.ndarray, ...]:
    """As :func:`_lpm_v4` for IPv6: (lengths, starts, hi, lo, reals), the masked address as
    two big-endian uint64 halves, sorted by (hi, lo) within each group."""
    raw = np.ascontiguousarray(routes["key"]["addr"]).reshape(len(routes), 16)
    hi = raw[:, :8].copy().view(">u8").ravel().astype(np.uint64)
    lo = raw[:, 8:].copy().view(">u8").ravel().astype(np.uint64)
    order, lens, starts = _lpm_groups(routes["key"]["prefixlen"])
    hi, lo, reals = hi[order], lo[order], routes["real_id"].astype(np.int64)[order]
    for k in range(len(lens)):
        g = slice(starts[k], starts[k + 1])
        o = np.lexsort((lo[g], hi[g]))
        hi[g], lo[g], reals[g] = hi[g][o], lo[g][o], reals[g][o]
    return (lens, starts, np.ascontiguousarray(hi), np.ascontiguousarray(lo),
            np.ascontiguousarray(reals))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class UserspaceDatapath:
    """One instance = one CPU's datapath: its own connection table, shared-nothing."""

    def __init__(self, tables: DatapathTables):
        ways = C.CONN_TABLE_WAYS
        buckets = _pow2_at_least(max(1, tables.conn_table_size // ways))
        self.ct_tags = np.zeros((buckets, ways), dtype=np.uint64)
        self.ct_ent = np.zeros((buckets, ways, 8), dtype=np.uint64)
        self.ct_mask = buckets - 1
        self.clock = np.zeros(1, dtype=np.uint64)
        # Counters are int64: numba turns uint64 += int into a float64 round trip (~75 ns).
        self.stats = np.zeros(C.N_STATS, dtype=np.int64)
        self.load_tables(tables)

    def load_tables(self, tables: DatapathTables) -> None:
        """Replace VIPs, reals, rings and control values; the connection table stays."""
        self.tables = tables
        cap = _pow2_at_least(max(2, 2 * len(tables.vip_keys)))
        self.vip_keys = np.zeros((cap, 3), dtype=np.uint64)
        self.vip_used = np.zeros(cap, dtype=np.uint64)
        self.vip_vals = np.zeros((cap, 2), dtype=np.uint32)
        for key, meta in zip(tables.vip_keys, tables.vip_metas):
            fam = int(key["family"])
            lo, hi = _addr_words(key["addr"], 0, fam)
            tail = np.uint64(int(key["port"]) | (int(key["proto"]) << 16) | (fam << 24))
            # as uint64: a word >= 2**63 comes back from numba as a Python int it cannot retype
            i = _vip_insert(self.vip_keys, self.vip_used, cap - 1, np.uint64(lo), np.uint64(hi), tail)
            self.vip_vals[i] = (meta["flags"], meta["vip_num"])
        self.vip_mask = cap - 1
        vcap = _pow2_at_least(max(2, 2 * len(tables.vip_addr_keys)))
        self.va_keys = np.zeros((vcap, 3), dtype=np.uint64)
        self.va_used = np.zeros(vcap, dtype=np.uint64)
        for key in tables.vip_addr_keys:
            fam = int(key["family"])
            lo, hi = _addr_words(key["addr"], 0, fam)
            _vip_insert(self.va_keys, self.va_used, vcap - 1, np.uint64(lo), np.uint64(hi), np.uint64(fam))
        self.va_mask = vcap - 1
        self.real_addr = np.ascontiguousarray(tables.reals["addr"])
        self.real_family = np.ascontiguousarray(tables.reals["family"])
        self.real_flags = np.ascontiguousarray(tables.reals["flags"])
        self.rings = tables.rings
        ctl = tables.ctl[0]
        self.gw_mac = np.array(ctl["gw_mac"], dtype=np.uint8)
        self.max_frame = int(ctl["max_frame"])
        self.mtu = int(ctl["mtu"])  # 0: not checked
        self.encap = int(ctl["encap"])
        self.gue_port = int(ctl["gue_port"])  # host order
        self.gue_src_v4 = np.array(ctl["gue_src_v4"], dtype=np.uint8)
        self.gue_src_v6 = np.array(ctl["gue_src_v6"], dtype=np.uint8)
        quic, src_v4, src_v6 = routing_tables(tables)
        # QUIC server ids, sorted, for a binary search
        order = np.argsort(quic["server_id"], kind="stable")
        self.quic_ids = np.ascontiguousarray(quic["server_id"][order], dtype=np.int64)
        self.quic_reals = np.ascontiguousarray(quic["real_id"][order], dtype=np.int64)
        self.lpm4 = _lpm_v4(src_v4)
        self.lpm6 = _lpm_v6(src_v6)
        self.ch_seed = C.ch_rings_size(tables.max_vips, tables.ring_size)
        self.v6_seed = tables.max_vips
        if not hasattr(self, "vip_stats") or self.vip_stats.shape[0] != tables.max_vips:
            self.vip_stats = np.zeros((tables.max_vips, 2), dtype=np.int64)
            self.real_stats = np.zeros((tables.max_reals, 2), dtype=np.int64)

    def state_args(self) -> tuple:
        """process_batch's arguments between ``real_ids`` and ``now``: the tables and the
        connection table, in its order (lb/userspace_io.py passes them through too)."""
        return (
            self.vip_keys, self.vip_used, self.vip_vals, self.vip_mask,
            self.va_keys, self.va_used, self.va_mask,
            self.real_addr, self.real_family, self.real_flags,
            self.rings, self.tables.ring_size, self.ch_seed, self.v6_seed,
            self.gw_mac, self.max_frame, self.mtu, self.encap, self.gue_port,
            self.gue_src_v4, self.gue_src_v6,
            self.quic_ids, self.quic_reals,
            *self.lpm4, *self.lpm6,
            self.ct_tags, self.ct_ent, self.ct_mask, self.clock,
        )

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
        process_batch(frames, lengths, out, out_lens, actions, real_ids, *self.state_args(),
                      int(now), stats, vip_stats, real_stats)
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
        return int(np.count_nonzero(self.ct_tags))
