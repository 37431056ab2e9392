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
from lb.jhash import jhash16, jhash_2words
from lb.state import DatapathTables

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


@nb.njit(cache=True)
def _csum_fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@nb.njit(cache=True)
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


@nb.njit(cache=True)
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


@nb.njit(cache=True, inline="always")
def _flow_bucket(fk, mask):
    h = np.uint64(0)
    for i in range(5):
        h = _mix(h, fk[i])
    return np.int64((h ^ (h >> np.uint64(32))) & np.uint64(mask))


@nb.njit(cache=True)
def _ct_find(ct_keys, ct_used, b, fk):
    for w in range(ct_keys.shape[1]):
        if ct_used[b, w] != _EMPTY:
            k = ct_keys[b, w]
            if k[0] == fk[0] and k[1] == fk[1] and k[2] == fk[2] and k[3] == fk[3] and k[4] == fk[4]:
                return w
    return -1


@nb.njit(cache=True)
def _ct_insert(ct_keys, ct_used, ct_real, ct_atime, ct_stamp, b, fk, real_id, now, stamp):
    w = _ct_find(ct_keys, ct_used, b, fk)
    if w < 0:
        # free way, else the least recently used one
        oldest = np.uint64(_M64)
        for j in range(ct_keys.shape[1]):
            if ct_used[b, j] == _EMPTY:
                w = j
                break
            if ct_stamp[b, j] < oldest:
                oldest = ct_stamp[b, j]
                w = j
    for i in range(5):
        ct_keys[b, w, i] = fk[i]
    ct_used[b, w] = _USED
    ct_real[b, w] = real_id
    ct_atime[b, w] = now
    ct_stamp[b, w] = stamp


# --- the datapath ----------------------------------------------------------------------


@nb.njit(cache=True)
def process_frame(  # noqa: C901 - one function mirrors the one XDP entry point
    p, n, out,
    vip_keys, vip_used, vip_vals, vip_mask,
    va_keys, va_used, va_mask,
    real_addr, real_family, real_flags,
    rings, ring_size, ch_seed, v6_seed,
    gw_mac, max_frame,
    ct_keys, ct_used, ct_real, ct_atime, ct_stamp, ct_mask, clock,
    now, stats, vip_stats, real_stats, fk,
):
    """Process one frame ``p[:n]``; returns (action, output length, real id).

    The output frame is written to ``out`` for TX and PASS. Counters are incremented in
    ``stats``/``vip_stats``/``real_stats``. ``fk`` is scratch space (5 uint64).
    """
    stats[C.STAT_RX_PACKETS] += 1
    # ---- L2
    if n < C.ETH_HLEN:
        stats[C.STAT_DROP_MALFORMED] += 1
        return C.XDP_DROP, 0, 0
    eth_type = _be16(p, 12)
    l3 = C.ETH_HLEN
    vlan = False
    if eth_type == C.ETH_P_8021Q:
        if n < C.ETH_HLEN + C.VLAN_HLEN:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        vlan = True
        eth_type = _be16(p, 16)
        l3 = C.ETH_HLEN + C.VLAN_HLEN
    avail = n - l3

    # ---- L3 sanity and "is this for a VIP address?"
    if eth_type == C.ETH_P_IP:
        family = C.FAMILY_V4
        if avail < 20 or (p[l3] >> 4) != 4 or (p[l3] & 0xF) < 5:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        ihl = np.int64(p[l3] & 0xF)
        pkt_len = _be16(p, l3 + 2)
        if pkt_len < ihl * 4 or pkt_len > avail:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        src_off = l3 + 12
        dst_off = l3 + 16
        proto = np.int64(p[l3 + 9])
        tos = np.int64(p[l3 + 1])
    elif eth_type == C.ETH_P_IPV6:
        family = C.FAMILY_V6
        if avail < 40 or (p[l3] >> 4) != 6:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        pkt_len = _be16(p, l3 + 4) + 40
        if pkt_len > avail:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        ihl = 10  # 40 bytes, in IPv4 IHL units
        src_off = l3 + 8
        dst_off = l3 + 24
        proto = np.int64(p[l3 + 6])
        tos = ((np.int64(p[l3]) & 0xF) << 4) | (np.int64(p[l3 + 1]) >> 4)
    else:
        stats[C.STAT_PASS_NOT_IP] += 1
        out[:n] = p[:n]
        return C.XDP_PASS, n, 0

    dlo, dhi = _addr_words(p, dst_off, family)
    if _vip_lookup(va_keys, va_used, va_mask, dlo, dhi, np.uint64(family)) < 0:
        stats[C.STAT_PASS_NOT_VIP] += 1
        out[:n] = p[:n]
        return C.XDP_PASS, n, 0

    # ---- checks that apply to VIP addresses only
    if n > max_frame:
        stats[C.STAT_DROP_OVERSIZE] += 1
        return C.XDP_DROP, 0, 0
    if family == C.FAMILY_V4:
        if ihl != 5:
            stats[C.STAT_DROP_IP_OPTIONS] += 1
            return C.XDP_DROP, 0, 0
        if _be16(p, l3 + 6) & (C.IP_MF | C.IP_OFFSET_MASK):
            stats[C.STAT_DROP_FRAGMENT] += 1
            return C.XDP_DROP, 0, 0
    elif proto == C.IPPROTO_FRAGMENT:
        stats[C.STAT_DROP_FRAGMENT] += 1
        return C.XDP_DROP, 0, 0

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
            return C.XDP_DROP, 0, 0
        sport = _be16(p, l4)
        dport = _be16(p, l4 + 2)
        syn = (p[l4 + 13] & C.TCP_FLAG_SYN) != 0
    elif proto == C.IPPROTO_UDP:
        if l4 + 8 > pend:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        sport = _be16(p, l4)
        dport = _be16(p, l4 + 2)
    elif proto == icmp_proto:
        if l4 + 8 > pend:
            stats[C.STAT_DROP_MALFORMED] += 1
            return C.XDP_DROP, 0, 0
        itype = p[l4]
        if (family == C.FAMILY_V4 and itype == C.ICMP_ECHO_REQUEST) or (
            family == C.FAMILY_V6 and itype == C.ICMPV6_ECHO_REQUEST
        ):
            return _echo_reply(p, n, out, l3, l4, family, vlan, stats)
        if family == C.FAMILY_V4 and itype == C.ICMP_DEST_UNREACH:
            inner = l4 + 8
            if inner + 24 > pend or (p[inner] >> 4) != 4 or (p[inner] & 0xF) != 5:
                stats[C.STAT_DROP_MALFORMED] += 1
                return C.XDP_DROP, 0, 0
            proto = np.int64(p[inner + 9])
            fsrc_off = inner + 16
            fdst_off = inner + 12
            il4 = inner + 20
        elif family == C.FAMILY_V6 and (itype == C.ICMPV6_DEST_UNREACH or itype == C.ICMPV6_PKT_TOOBIG):
            inner = l4 + 8
            if inner + 44 > pend or (p[inner] >> 4) != 6:
                stats[C.STAT_DROP_MALFORMED] += 1
                return C.XDP_DROP, 0, 0
            proto = np.int64(p[inner + 6])
            fsrc_off = inner + 24
            fdst_off = inner + 8
            il4 = inner + 40
        else:
            stats[C.STAT_PASS_NOT_VIP] += 1
            out[:n] = p[:n]
            return C.XDP_PASS, n, 0
        is_icmp_err = True
        sport = _be16(p, il4 + 2)
        dport = _be16(p, il4)
    else:
        stats[C.STAT_PASS_NOT_VIP] += 1
        out[:n] = p[:n]
        return C.XDP_PASS, n, 0

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
            out[:n] = p[:n]
            return C.XDP_PASS, n, 0
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
    use_lru = (vflags & C.F_LRU_BYPASS) == 0
    real_id = 0
    bucket = 0
    if use_lru:
        bucket = _flow_bucket(fk, ct_mask)
        if not (proto == C.IPPROTO_TCP and syn):
            w = _ct_find(ct_keys, ct_used, bucket, fk)
            if w >= 0:
                cand = np.int64(ct_real[bucket, w])
                fresh = proto != C.IPPROTO_UDP or (now - np.int64(ct_atime[bucket, w])) <= C.LRU_UDP_TIMEOUT_NS
                if real_family[cand] != C.FAMILY_NONE and fresh:
                    real_id = cand
                    clock[0] += 1
                    ct_stamp[bucket, w] = clock[0]
                    if proto == C.IPPROTO_UDP:
                        ct_atime[bucket, w] = now
        if real_id != 0:
            stats[C.STAT_LRU_HIT] += 1
        else:
            stats[C.STAT_LRU_MISS] += 1
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
            return C.XDP_DROP, 0, 0
        if use_lru and not is_icmp_err:
            clock[0] += 1
            _ct_insert(ct_keys, ct_used, ct_real, ct_atime, ct_stamp, bucket, fk, real_id, now, clock[0])

    rfam = real_family[real_id]
    if (vflags & C.F_LOCAL) and (real_flags[real_id] & C.REAL_F_LOCAL):
        real_stats[real_id, C.VIP_STAT_PACKETS] += 1
        real_stats[real_id, C.VIP_STAT_BYTES] += n
        stats[C.STAT_PASS_LOCAL] += 1
        out[:n] = p[:n]
        return C.XDP_PASS, n, real_id
    if family == C.FAMILY_V6 and rfam == C.FAMILY_V4:
        stats[C.STAT_DROP_ENCAP_FAILED] += 1
        return C.XDP_DROP, 0, 0

    # ---- encapsulation
    l2len = l3
    out[0:6] = gw_mac
    out[6:12] = p[0:6]
    if vlan:
        out[12:16] = p[12:16]
    o = l2len
    if rfam == C.FAMILY_V4:
        out[l2len - 2] = C.ETH_P_IP >> 8
        out[l2len - 1] = C.ETH_P_IP & 0xFF
        tot = pkt_len + C.ENCAP_IPV4_OVERHEAD
        out[o] = 0x45
        out[o + 1] = tos
        out[o + 2] = tot >> 8
        out[o + 3] = tot & 0xFF
        out[o + 4:o + 8] = 0
        out[o + 8] = C.DEFAULT_TTL
        out[o + 9] = C.IPPROTO_IPIP
        out[o + 12] = C.IPIP_V4_PREFIX0
        out[o + 13] = C.IPIP_V4_PREFIX1
        out[o + 14] = p[fsrc_off + 2] ^ (sport & 0xFF)
        out[o + 15] = p[fsrc_off + 3] ^ (sport >> 8)
        out[o + 16:o + 20] = real_addr[real_id, 0:4]
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
        out[o + 4] = pkt_len >> 8
        out[o + 5] = pkt_len & 0xFF
        out[o + 6] = C.IPPROTO_IPIP if family == C.FAMILY_V4 else C.IPPROTO_IPV6
        out[o + 7] = C.DEFAULT_TTL
        out[o + 8] = C.IPIP_V6_PREFIX0
        out[o + 9] = C.IPIP_V6_PREFIX1
        out[o + 10:o + 20] = 0
        last4 = fsrc_off if family == C.FAMILY_V4 else fsrc_off + 12
        out[o + 20] = p[last4] ^ (sport >> 8)
        out[o + 21] = p[last4 + 1] ^ (sport & 0xFF)
        out[o + 22] = p[last4 + 2]
        out[o + 23] = p[last4 + 3]
        out[o + 24:o + 40] = real_addr[real_id]
        o += C.ENCAP_IPV6_OVERHEAD
    rest = n - l3
    out[o:o + rest] = p[l3:n]
    real_stats[real_id, C.VIP_STAT_PACKETS] += 1
    real_stats[real_id, C.VIP_STAT_BYTES] += n
    stats[C.STAT_TX_ENCAP] += 1
    if is_icmp_err:
        stats[C.STAT_ICMP_ERROR_FORWARDED] += 1
    return C.XDP_TX, o + rest, real_id


@nb.njit(cache=True)
def _echo_reply(p, n, out, l3, l4, family, vlan, stats):
    out[:n] = p[:n]
    out[0:6] = p[6:12]
    out[6:12] = p[0:6]
    if family == C.FAMILY_V4:
        out[l3 + 12:l3 + 16] = p[l3 + 16:l3 + 20]
        out[l3 + 16:l3 + 20] = p[l3 + 12:l3 + 16]
        out[l3 + 8] = C.DEFAULT_TTL
        c = _ipv4_csum(out, l3)
        out[l3 + 10] = c >> 8
        out[l3 + 11] = c & 0xFF
        new_type = C.ICMP_ECHO_REPLY
    else:
        out[l3 + 8:l3 + 24] = p[l3 + 24:l3 + 40]
        out[l3 + 24:l3 + 40] = p[l3 + 8:l3 + 24]
        out[l3 + 7] = C.DEFAULT_TTL
        new_type = C.ICMPV6_ECHO_REPLY
    code = np.int64(p[l4 + 1])
    out[l4] = new_type
    c = csum_replace16(_be16(p, l4 + 2), (np.int64(p[l4]) << 8) | code, (new_type << 8) | code)
    out[l4 + 2] = c >> 8
    out[l4 + 3] = c & 0xFF
    stats[C.STAT_TX_ICMP_ECHO_REPLY] += 1
    return C.XDP_TX, n, 0


@nb.njit(cache=True)
def process_batch(
    frames, lengths, out, out_lens, actions, real_ids,
    vip_keys, vip_used, vip_vals, vip_mask,
    va_keys, va_used, va_mask,
    real_addr, real_family, real_flags,
    rings, ring_size, ch_seed, v6_seed,
    gw_mac, max_frame,
    ct_keys, ct_used, ct_real, ct_atime, ct_stamp, ct_mask, clock,
    now, stats, vip_stats, real_stats,
):
    """Run :func:`process_frame` over ``frames[i, :lengths[i]]`` in order."""
    fk = np.zeros(5, dtype=np.uint64)
    for i in range(frames.shape[0]):
        a, olen, rid = process_frame(
            frames[i], lengths[i], out[i],
            vip_keys, vip_used, vip_vals, vip_mask,
            va_keys, va_used, va_mask,
            real_addr, real_family, real_flags,
            rings, ring_size, ch_seed, v6_seed,
            gw_mac, max_frame,
            ct_keys, ct_used, ct_real, ct_atime, ct_stamp, ct_mask, clock,
            now, stats, vip_stats, real_stats, fk,
        )
        actions[i] = a
        out_lens[i] = olen
        real_ids[i] = rid


# --- Python face -----------------------------------------------------------------------


@dataclass
class BatchResult:
    """What one batch did: per frame action, output frame and real id; counter deltas."""

    actions: np.ndarray  # uint8[n], kernel xdp_action values
    out: np.ndarray  # uint8[n, stride + ENCAP_MAX_OVERHEAD]
    out_lens: np.ndarray  # int64[n]; 0 for DROP
    real_ids: np.ndarray  # uint32[n]; 0 when no real was chosen
    stats: np.ndarray  # uint64[N_STATS] deltas
    vip_stats: np.ndarray  # uint64[max_vips, 2] deltas
    real_stats: np.ndarray  # uint64[max_reals, 2] deltas

    def output(self, i: int) -> bytes:
        """Output frame ``i`` (the unchanged input for PASS, empty for DROP)."""
        return self.out[i, : self.out_lens[i]].tobytes()


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class UserspaceDatapath:
    """One instance = one CPU's datapath: its own connection table, shared-nothing."""

    def __init__(self, tables: DatapathTables):
        ways = C.CONN_TABLE_WAYS
        buckets = _pow2_at_least(max(1, tables.conn_table_size // ways))
        self.ct_keys = np.zeros((buckets, ways, 5), dtype=np.uint64)
        self.ct_used = np.zeros((buckets, ways), dtype=np.uint64)
        self.ct_real = np.zeros((buckets, ways), dtype=np.uint32)
        self.ct_atime = np.zeros((buckets, ways), dtype=np.int64)
        self.ct_stamp = np.zeros((buckets, ways), dtype=np.uint64)
        self.ct_mask = buckets - 1
        self.clock = np.zeros(1, dtype=np.uint64)
        self.stats = np.zeros(C.N_STATS, dtype=np.uint64)
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
            i = _vip_insert(self.vip_keys, self.vip_used, cap - 1, lo, hi, tail)
            self.vip_vals[i] = (meta["flags"], meta["vip_num"])
        self.vip_mask = cap - 1
        vcap = _pow2_at_least(max(2, 2 * len(tables.vip_addr_keys)))
        self.va_keys = np.zeros((vcap, 3), dtype=np.uint64)
        self.va_used = np.zeros(vcap, dtype=np.uint64)
        for key in tables.vip_addr_keys:
            fam = int(key["family"])
            lo, hi = _addr_words(key["addr"], 0, fam)
            _vip_insert(self.va_keys, self.va_used, vcap - 1, lo, hi, np.uint64(fam))
        self.va_mask = vcap - 1
        self.real_addr = np.ascontiguousarray(tables.reals["addr"])
        self.real_family = np.ascontiguousarray(tables.reals["family"])
        self.real_flags = np.ascontiguousarray(tables.reals["flags"])
        self.rings = tables.rings
        self.gw_mac = np.array(tables.ctl[0]["gw_mac"], dtype=np.uint8)
        self.max_frame = int(tables.ctl[0]["max_frame"])
        self.ch_seed = C.ch_rings_size(tables.max_vips, tables.ring_size)
        self.v6_seed = tables.max_vips
        if not hasattr(self, "vip_stats") or self.vip_stats.shape[0] != tables.max_vips:
            self.vip_stats = np.zeros((tables.max_vips, 2), dtype=np.uint64)
            self.real_stats = np.zeros((tables.max_reals, 2), dtype=np.uint64)

    def process(self, frames: np.ndarray, lengths: np.ndarray, now: int) -> BatchResult:
        """Process a batch: ``frames`` uint8[n, stride], ``lengths`` int64[n] (<= stride)."""
        n, stride = frames.shape
        lengths = np.asarray(lengths, dtype=np.int64)
        if np.any(lengths < 0) or np.any(lengths > stride):
            raise ValueError("frame lengths must be within 0..stride")
        out = np.zeros((n, stride + C.ENCAP_MAX_OVERHEAD), dtype=np.uint8)
        out_lens = np.zeros(n, dtype=np.int64)
        actions = np.zeros(n, dtype=np.uint8)
        real_ids = np.zeros(n, dtype=np.uint32)
        stats = np.zeros(C.N_STATS, dtype=np.uint64)
        vip_stats = np.zeros_like(self.vip_stats)
        real_stats = np.zeros_like(self.real_stats)
        process_batch(
            frames, lengths, out, out_lens, actions, real_ids,
            self.vip_keys, self.vip_used, self.vip_vals, self.vip_mask,
            self.va_keys, self.va_used, self.va_mask,
            self.real_addr, self.real_family, self.real_flags,
            self.rings, self.tables.ring_size, self.ch_seed, self.v6_seed,
            self.gw_mac, self.max_frame,
            self.ct_keys, self.ct_used, self.ct_real, self.ct_atime, self.ct_stamp, self.ct_mask,
            self.clock, int(now), stats, vip_stats, real_stats,
        )
        self.stats += stats
        self.vip_stats += vip_stats
        self.real_stats += real_stats
        return BatchResult(actions, out, out_lens, real_ids, stats, vip_stats, real_stats)

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
        return int(np.count_nonzero(self.ct_used))
