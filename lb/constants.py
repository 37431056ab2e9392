"""Every constant shared by the userspace datapath, the XDP program and the control plane.

This module is the one source of truth: ``python -m lb.c_header`` writes every value the
C side uses, under the same name, into ``xdp/generated/lb_shared.h`` (per-instance sizes
as ``#ifndef`` defaults that :func:`lb.c_header.c_flags` overrides), and
``tests/test_layout.py`` checks that the checked-in header is what it generates.
Values that are Katran's are marked so; they MUST NOT change, or real selection stops
matching Katran hosts in the same ECMP group.
"""

from __future__ import annotations

# --- sizes (defaults; the config may override the ones marked "configurable") ---------
RING_SIZE = 65537  # Katran; configurable (must be prime)
MAX_VIPS = 512  # Katran; configurable
MAX_REALS = 4096  # Katran; configurable
CONN_TABLE_SIZE = 1 << 20  # connection-table entries per CPU; configurable
CONN_TABLE_WAYS = 8  # userspace table: entries per bucket (set-associative LRU)
CONN_WAYS = 4  # XDP connection table: 16-byte entries per set (a set = one cache line)
CONN_KEY_SLOT_MASK = 3  # low bits of an XDP connection-table tag: the entry's key slot
DOWN_WORD_BITS = 64  # real ids per word of the down set (layout.DOWN_WORD)
VIP_PROBES = 8  # XDP VIP index: a key lies at most this many slots from its home slot
MAX_FRAME_SIZE = 1514  # largest frame accepted for a VIP, L2 header included; configurable

# --- time ----------------------------------------------------------------------------
LRU_UDP_TIMEOUT_NS = 30 * 1_000_000_000  # Katran: a UDP entry idle this long is a miss
# The XDP connection table keeps atime as a u32 in units of 2**CONN_TIME_SHIFT ns
# (~1.05 ms; wraps after ~52 days, compared modulo 2**32), so an entry is 16 bytes.
CONN_TIME_SHIFT = 20
CONN_UDP_TIMEOUT = LRU_UDP_TIMEOUT_NS >> CONN_TIME_SHIFT  # 28610 units = 29.9998 s
# Flood guard (docs/datapath.md, real selection step 2): new connections are counted per
# CPU in windows of this length; above settings.max_conn_rate in one window, a new flow
# is hashed without source routing and not written to the connection table.
CONN_RATE_WINDOW_NS = 1_000_000_000  # Katran's ONE_SEC
MAX_CONN_RATE = 125_000  # Katran's MAX_CONN_RATE: new connections per CPU per window; configurable

# --- hashing (Katran) ----------------------------------------------------------------
JHASH_INITVAL = 0xDEADBEEF
# Multiply-xorshift constant of the XDP program's internal table hashes (VIP index,
# connection-table sets; lb/xdp_tables.py). Not Katran's, never on the wire.
MIX_K = 0x9E3779B97F4A7C15
# The flow-hash seeds are derived from the sizes: jhash_2words(..., ch_rings_size(...))
# and, for IPv6 sources, jhash(src, 16, max_vips).


def vip_slots(max_vips: int) -> int:
    """Slots in one half of the XDP VIP index: a power of two >= 2 * max_vips (the
    table is at most half full, so probe chains stay short)."""
    n = 1
    while n < 2 * max_vips:
        n <<= 1
    return n


def conn_sets(conn_table_size: int) -> int:
    """Sets per CPU in the XDP connection table (conn_table_size entries, CONN_WAYS
    per set; conn_table_size is a power of two >= CONN_TABLE_WAYS)."""
    return max(1, conn_table_size // CONN_WAYS)


def down_row_words(max_reals: int) -> int:
    """u64 words per VIP in the down set (one bit per real id; layout.DOWN_WORD)."""
    return (max_reals + DOWN_WORD_BITS - 1) // DOWN_WORD_BITS


def ch_rings_size(max_vips: int, ring_size: int) -> int:
    """Seed of the flow hash (Katran's CH_RINGS_SIZE), reduced to 32 bits as C does."""
    return (max_vips * ring_size) & 0xFFFFFFFF


# --- encapsulation (Katran) ------------------------------------------------------------
DEFAULT_TTL = 64  # outer TTL / hop limit, and the TTL of ICMP echo replies
IPIP_V4_PREFIX0, IPIP_V4_PREFIX1 = 172, 16  # outer IPv4 source = 172.16.x.y
IPIP_V6_PREFIX0, IPIP_V6_PREFIX1 = 0x01, 0x00  # outer IPv6 source = 0100::/16 ...
ENCAP_IPV4_OVERHEAD = 20
ENCAP_IPV6_OVERHEAD = 40
UDP_HLEN = 8
# room the output buffer keeps for the outer headers: GUE with a full hop list in IPv6
# (40 + 8 + GUE_HLEN + GUE_HOPLIST_HLEN + GUE_MAX_HOPS * 16)
ENCAP_MAX_OVERHEAD = 104
# GUE (variant 1, Katran's: the UDP payload is the inner IP packet, no GUE header).
ENCAP_IPIP = 0  # ctl.encap
ENCAP_GUE = 1
GUE_DEFAULT_PORT = 6080  # Katran's GUE_DPORT
# The outer UDP source port is Katran's: the flow's source port XORed with two client
# address bytes (docs/datapath.md), so a real's NIC can spread tunnels over its queues.
# Stateless VIPs (docs/datapath.md, "Stateless VIPs"): a GUE variant-0 header whose
# private data is a hop list, [type u16][next_hop u8][hop_count u8][hops...].
GUE_HOPLIST_TYPE = 0x4C42  # "LB": the private data is our hop list
GUE_MAX_HOPS = 3  # the ring's real + up to two previous rings' reals
GUE_HLEN = 4  # GUE base header: ver/C/hlen, proto, flags
GUE_HOPLIST_HLEN = 4  # hop list before its addresses: type, next_hop, hop_count

# --- stateless VIPs: previous rings (control/ring_history.py) ---------------------------
MAX_PREV_RINGS = 16  # slots of the prev_rings map (RING_SIZE real ids each)
PREV_RINGS_PER_VIP = GUE_MAX_HOPS - 1  # a VIP points at its newest previous rings
SECOND_CHANCE_S = 600  # default settings.second_chance_s: how long a previous ring is kept

# --- ICMP "too big" generated by the balancer (settings.mtu) ---------------------------
ICMP_FRAG_NEEDED = 4  # code of ICMP dest-unreachable "fragmentation needed and DF set"
IP_DF = 0x4000  # in the host-order frag_off field
# Bytes of the offending IP packet quoted in the ICMP message (IP header + L4 start;
# multiples of 4, and always shorter than any packet that can trigger it).
ICMP_TOO_BIG_QUOTE_V4 = 128
ICMP_TOO_BIG_QUOTE_V6 = 256
MIN_MTU = 1280  # IPv6 minimum link MTU: the smallest settings.mtu accepted

# --- QUIC connection-id routing (Katran's layouts) -------------------------------------
QUIC_LONG_HEADER = 0x80  # first byte: long header form
QUIC_PACKET_TYPE_MASK = 0x30  # long header packet type bits
QUIC_HANDSHAKE = 0x20  # types below this (Initial 0x00, 0-RTT 0x10) carry a client-chosen CID
QUIC_MIN_CONNID_LEN = 8  # shorter destination CIDs are not ours: hashed
QUIC_LONG_CID_OFFSET = 6  # flags(1) version(4) dcid_len(1), then the DCID
QUIC_SHORT_CID_OFFSET = 1  # flags(1), then the DCID
QUIC_CID_V1, QUIC_CID_V2, QUIC_CID_V3 = 1, 2, 3  # top 2 bits of the DCID's first byte
MAX_QUIC_SERVER_IDS = 1 << 16  # entries of the server id -> real table
MAX_QUIC_SERVER_ID = 0xFFFFFFFF  # v3 ids are 32 bits (v1: 16, v2: 24)

# --- CIDR VIPs (a VIP whose address is a prefix) ----------------------------------------
# Shortest prefix accepted (lb.config): a shorter one would make a large part of the
# address space "for us" (ICMP echo answered, fragments dropped, ...). A full-length
# prefix (/32, /128) is refused: write the address, an exact VIP.
VIP_PREFIX_MIN_V4 = 8
VIP_PREFIX_MIN_V6 = 16
# The LPM keys of vip_prefixes / vip_prefix_addrs (layout.VIP_LPM_KEY) start with 32 bits
# of (port, proto, family) that every entry matches exactly, then the address prefix.
VIP_LPM_KEY_HEAD_BITS = 32

# --- source routing --------------------------------------------------------------------
MAX_SRC_ROUTES = 1 << 14  # prefixes per address family

# --- wire constants --------------------------------------------------------------------
ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_FRAGMENT = 44
IPPROTO_ICMPV6 = 58
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMPV6_DEST_UNREACH = 1
ICMPV6_PKT_TOOBIG = 2
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
TCP_FLAG_SYN = 0x02
IP_MF = 0x2000  # in the host-order frag_off field
IP_OFFSET_MASK = 0x1FFF

# Address families as stored in keys and real entries (0 = empty / no real).
FAMILY_NONE = 0
FAMILY_V4 = 4
FAMILY_V6 = 6

# --- actions: the kernel's enum xdp_action values --------------------------------------
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
ACTION_NAMES = {XDP_ABORTED: "ABORTED", XDP_DROP: "DROP", XDP_PASS: "PASS", XDP_TX: "TX"}

# --- VIP flags: Katran's bit values ----------------------------------------------------
F_NO_SRC_PORT = 1 << 0  # hash and key the flow with source port 0
F_LRU_BYPASS = 1 << 1  # no connection table: every packet is hashed
F_QUIC = 1 << 2  # QUIC VIP (connection-id routing)
F_DPORT_ONLY = 1 << 3  # hash on the destination port only
F_SRC_ROUTING = 1 << 4  # LPM source routing before hashing
F_LOCAL = 1 << 5  # packets whose real is this host go to the local stack
# Our own flags start at bit 16, clear of Katran's (bits 0-9 are taken there).
F_MIGRATE_DOWN_TCP = 1 << 16  # TCP non-SYN: a connection-table entry to a down real is re-hashed
# Ours, not Katran's (bit 17, clear of Katran's): no connection table; the ring's real and
# the previous rings' reals travel as a GUE hop list (docs/datapath.md, "Stateless VIPs").
F_STATELESS = 1 << 17

VIP_FLAGS = {
    "no_src_port": F_NO_SRC_PORT,
    "lru_bypass": F_LRU_BYPASS,
    "quic": F_QUIC,
    "dport_only": F_DPORT_ONLY,
    "src_routing": F_SRC_ROUTING,
    "local": F_LOCAL,
    "migrate_down_tcp": F_MIGRATE_DOWN_TCP,
    "stateless": F_STATELESS,
}

# --- real flags -------------------------------------------------------------------------
REAL_F_LOCAL = 1 << 0  # this real is the balancer host itself
# Health checks took this real down for at least one VIP it serves: a hint, so that the
# connection-table hit path reads the down set (layout.DOWN_WORD) only for such a real.
REAL_F_DOWN = 1 << 1

# --- global counters: index into the stats array ----------------------------------------
# Every frame bumps STAT_RX_PACKETS and exactly one of the outcome counters below it
# (TX_*, PASS_*, DROP_*); LRU_* and ICMP_* say more about some of those frames.
# Indexes are stable across versions: new counters are appended.
STAT_RX_PACKETS = 0
STAT_TX_ENCAP = 1  # encapsulated towards a real
STAT_TX_ICMP_ECHO_REPLY = 2  # echo request to a VIP address answered by the balancer
STAT_PASS_NOT_IP = 3  # not IPv4/IPv6 (ARP, QinQ, ...)
STAT_PASS_NOT_VIP = 4  # IP, but no VIP for it (or a protocol we do not balance)
STAT_PASS_LOCAL = 5  # VIP flagged local, real is this host
STAT_DROP_MALFORMED = 6  # truncated headers, bad version / IHL / length fields
STAT_DROP_IP_OPTIONS = 7  # IPv4 header with options, to a VIP address
STAT_DROP_FRAGMENT = 8  # IPv4 fragment or IPv6 fragment header, to a VIP address
STAT_DROP_OVERSIZE = 9  # frame longer than max_frame_size, to a VIP address
STAT_DROP_NO_REAL = 10  # VIP has no usable real
STAT_DROP_ENCAP_FAILED = 11  # real cannot carry this packet / no headroom
STAT_LRU_HIT = 12  # connection table gave the real
STAT_LRU_MISS = 13  # real chosen by hashing (SYN, new flow, expired UDP, stale entry)
STAT_ICMP_ERROR_FORWARDED = 14  # ICMP(v6) error for a VIP flow sent to its real
STAT_TX_ICMP_TOO_BIG = 15  # packet + encapsulation > settings.mtu: ICMP too-big sent back
STAT_DROP_TOO_BIG = 16  # packet + encapsulation > settings.mtu and no ICMP may be sent
STAT_QUIC_ROUTED = 17  # QUIC VIP: real taken from the server id in the connection id
STAT_QUIC_FALLBACK = 18  # QUIC VIP: no server id to route on (Initial, 0-RTT, id 0, ...)
STAT_QUIC_UNKNOWN = 19  # QUIC VIP: server id not in the table (or its real is gone): hashed
STAT_SRC_ROUTED = 20  # src_routing VIP: real taken from the client-prefix table
STAT_FLOOD_NEW_CONNS = 21  # new flow above max_conn_rate on its CPU: hashed, not recorded
STAT_DOWN_REAL_MIGRATED = 22  # connection-table entry named a down real: re-hashed, rewritten
STAT_QUIC_CONN_WRITTEN = 23  # QUIC-routed: its real written into the connection table (new or changed)
STAT_HOPLIST_SENT = 24  # stateless VIP: encapsulated with a hop list of >= 2 reals (in tx_encap)
STAT_VIP_PREFIX_MATCHED = 25  # VIP found by the longest prefix of the destination (a CIDR VIP)


def _counter_names(prefix: str) -> tuple[str, ...]:
    """The names of this module's ``<prefix><NAME> = index`` counters, in index order, as
    the control plane reports them (``STAT_RX_PACKETS`` -> ``"rx_packets"``). The indexes
    must be 0..n-1, each once."""
    found = [(v, k[len(prefix):].lower()) for k, v in globals().items()
             if k.startswith(prefix) and type(v) is int]
    if sorted(v for v, _ in found) != list(range(len(found))):
        raise AssertionError(f"{prefix}* indexes are not 0..{len(found) - 1}, each once")
    return tuple(name for _, name in sorted(found))


STATS = _counter_names("STAT_")
STAT_INDEX = {name: i for i, name in enumerate(STATS)}
N_STATS = len(STATS)

# Per-VIP and per-real counter columns: [row * VIP_STAT_COLUMNS + column].
VIP_STAT_PACKETS = 0
VIP_STAT_BYTES = 1
VIP_STAT_COLUMNS = 2
# Per-real counters have one more column: connection-table misses that hashed (or
# source-routed) a flow onto the real, for every VIP (Katran counts them for one VIP at a
# time). real_stats is [real_id * REAL_STAT_COLUMNS + column].
REAL_STAT_LRU_MISS = 2
REAL_STAT_COLUMNS = 3

# --- packet capture (lbctl capture, lb/capture.py): events through a BPF ring buffer ----
# Off unless lb_runtime.capture has an event's bit set (1 << CAPTURE_EV_*); then each CPU
# sends at most one record per lb_runtime.capture's interval (a token bucket of
# CAPTURE_BURST records), the first CAPTURE_SNAPLEN bytes of the frame as it arrived.
CAPTURE_EV_LRU_MISS = 1  # connection-table miss: a new flow hashed (or source-routed) to a real
CAPTURE_EV_TOO_BIG = 2  # packet + encapsulation > settings.mtu (ICMP too-big sent, or dropped)
CAPTURE_EV_QUIC_UNKNOWN = 3  # QUIC VIP: server id not in the table (or its real is gone)
CAPTURE_EV_DROP = 4  # any XDP_DROP; the record's reason is the drop's STAT_* counter
CAPTURE_EVENTS = {"lru-miss": CAPTURE_EV_LRU_MISS, "too-big": CAPTURE_EV_TOO_BIG,
                  "quic-unknown": CAPTURE_EV_QUIC_UNKNOWN, "drop": CAPTURE_EV_DROP}
CAPTURE_MASK = 0xFF  # lb_runtime.capture bits 0-7: the events on; bits 32-63: interval (ns)
CAPTURE_INTERVAL_SHIFT = 32
CAPTURE_SNAPLEN = 128  # bytes of each frame recorded (from its first byte, L2 included)
CAPTURE_BURST = 16  # records a CPU may send back to back before the interval applies
CAPTURE_RING_BYTES = 1 << 20  # the ring buffer map (a power of two, whole pages)
CAPTURE_NO_VIP = 0xFFFFFFFF  # record.vip_num when no VIP is known (drops before the lookup)

# --- the real servers' decapsulation program (xdp/decap.c, lb/decap_loader.py) ----------
# Counters, one slot each in decap_stats: every frame the program sees bumps exactly one.
DECAP_STAT_V4_IN_V4 = 0  # IPv4-in-IPv4 decapsulated
DECAP_STAT_V6_IN_V6 = 1  # IPv6-in-IPv6 decapsulated
DECAP_STAT_V4_IN_V6 = 2  # IPv4-in-IPv6 decapsulated
DECAP_STAT_V6_IN_V4 = 3  # IPv6-in-IPv4 decapsulated (Katran sends it for v6 VIPs with v4 reals)
DECAP_STAT_GUE = 4  # GUE (UDP to the GUE port) decapsulated, any outer/inner family
DECAP_STAT_PASSED = 5  # not a tunnel packet: handed to the kernel untouched
DECAP_STAT_PASSED_NOT_ALLOWED = 6  # tunnel packet, outer destination not on the allow-list
DECAP_STAT_PASSED_FRAGMENT = 7  # fragmented tunnel packet (not reassembled here): to the kernel
DECAP_STAT_DROPPED_MALFORMED = 8  # tunnel packet with truncated / inconsistent headers
DECAP_STAT_DROPPED_UNSUPPORTED = 9  # GUE control message, reserved variant, other inner protocol
DECAP_STAT_DROPPED_ERROR = 10  # a helper failed while decapsulating (should stay 0)
# GUE packets with a hop list (stateless VIPs; the second-chance step, lb/second_chance.py):
DECAP_STAT_HOPLIST_DELIVERED = 11  # decapsulated: local socket, SYN, not TCP, ... (not last resort)
DECAP_STAT_HOPLIST_FORWARDED = 12  # TCP non-SYN, no local socket: sent on to the next hop
DECAP_STAT_HOPLIST_LAST_RESORT = 13  # TCP non-SYN, no local socket, no hop left: decapsulated
DECAP_STAT_HOPLIST_MALFORMED = 14  # hop list with a bad count / next hop / length: dropped
DECAP_STAT_HOPLIST_TTL_EXPIRED = 15  # would be forwarded, outer TTL / hop limit <= 1: dropped
DECAP_STATS = _counter_names("DECAP_STAT_")
DECAP_N_STATS = len(DECAP_STATS)
DECAP_ALLOW_MAX = 64  # entries per family in the allow-list maps

# --- health probes through the tunnel (xdp/hc_encap.c, control/tunnel_probe.py) ---------
# Counters, one slot each in hc_stats; each packet the program sees bumps exactly one.
HC_STAT_PASSED = 0  # no mark of ours (or not IP): untouched
HC_STAT_ENCAP_V4 = 1  # encapsulated in IPv4 (IPIP, or GUE in IPv4)
HC_STAT_ENCAP_V6 = 2  # encapsulated in IPv6 (IPv4-in-IPv6, IP6IP6, or GUE in IPv6)
HC_STAT_DROP_NO_REAL = 3  # a mark of ours without a real (or an IPv6 packet for an IPv4 real, IPIP)
HC_STAT_DROP_MALFORMED = 4  # headers unreadable
HC_STAT_DROP_FAILED = 5  # a helper failed (no room, ...)
HC_STATS = _counter_names("HC_STAT_")
HC_N_STATS = len(HC_STATS)

# --- traffic generator and sink for the benchmarks (xdp/pktgen.c, xdp/sink.c, lb/pktgen.py)
PKTGEN_MIN_FRAME = 64  # shortest frame the generator writes
PKTGEN_TMPL_MAX = 128  # template bytes rewritten into every frame, at most
PKTGEN_VARY_PORT = 1  # template.vary bits: source port += flow
PKTGEN_VARY_ADDR = 2  # low 32 bits of the source address += flow
PKTGEN_ACT_TX = 0  # template.action: XDP_TX (live frames: to the veth peer)
PKTGEN_ACT_TAIL = 1  # tail call into pktgen_next[0], the program under test
PKTGEN_ACT_DROP = 2  # XDP_DROP: the generator alone
# Per-CPU counters of pktgen_seq.
PKTGEN_STAT_SEQ = 0  # frames this CPU generated
PKTGEN_STAT_TAIL_MISSED = 1  # tail call failed (empty slot): frame dropped
PKTGEN_STATS = _counter_names("PKTGEN_STAT_")
PKTGEN_N_STATS = len(PKTGEN_STATS)
SINK_KEY_NONE = 0  # sink_cfg.key_mode: count packets and bytes only
SINK_KEY_DST = 1  # ... and per outer destination address
SINK_KEY_FLOW = 2  # ... and per outer 5-tuple
SINK_MAX_KEYS = 1024  # default size of the sink's per-key table; configurable
