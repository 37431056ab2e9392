"""Every constant shared by the userspace datapath, the XDP program and the control plane.

This module is the one source of truth: the C side receives these values as ``-D`` flags
built by :func:`c_defines`, and ``tests/test_layout.py`` checks that both sides agree.
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
MAX_FRAME_SIZE = 1514  # largest frame accepted for a VIP, L2 header included; configurable

# --- time ----------------------------------------------------------------------------
LRU_UDP_TIMEOUT_NS = 30 * 1_000_000_000  # Katran: a UDP entry idle this long is a miss

# --- hashing (Katran) ----------------------------------------------------------------
JHASH_INITVAL = 0xDEADBEEF
# The flow-hash seeds are derived from the sizes: jhash_2words(..., ch_rings_size(...))
# and, for IPv6 sources, jhash(src, 16, max_vips).


def ch_rings_size(max_vips: int, ring_size: int) -> int:
    """Seed of the flow hash (Katran's CH_RINGS_SIZE), reduced to 32 bits as C does."""
    return (max_vips * ring_size) & 0xFFFFFFFF


# --- encapsulation (Katran) ------------------------------------------------------------
DEFAULT_TTL = 64  # outer TTL / hop limit, and the TTL of ICMP echo replies
IPIP_V4_PREFIX0, IPIP_V4_PREFIX1 = 172, 16  # outer IPv4 source = 172.16.x.y
IPIP_V6_PREFIX0, IPIP_V6_PREFIX1 = 0x01, 0x00  # outer IPv6 source = 0100::/16 ...
ENCAP_IPV4_OVERHEAD = 20
ENCAP_IPV6_OVERHEAD = 40
ENCAP_MAX_OVERHEAD = 40  # room the output buffer keeps for the outer header

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

VIP_FLAGS = {
    "no_src_port": F_NO_SRC_PORT,
    "lru_bypass": F_LRU_BYPASS,
    "quic": F_QUIC,
    "dport_only": F_DPORT_ONLY,
    "src_routing": F_SRC_ROUTING,
    "local": F_LOCAL,
}
# Flags the datapath implements today; the config refuses the others by name.
SUPPORTED_VIP_FLAGS = ("no_src_port", "lru_bypass", "dport_only", "local")

# --- real flags -------------------------------------------------------------------------
REAL_F_LOCAL = 1 << 0  # this real is the balancer host itself

# --- global counters: index into the stats array ----------------------------------------
# Every frame bumps rx_packets and exactly one of the outcome counters below it
# (tx_*, pass_*, drop_*); lru_* and icmp_* say more about some of those frames.
STATS = (
    "rx_packets",
    "tx_encap",  # encapsulated towards a real
    "tx_icmp_echo_reply",  # echo request to a VIP address answered by the balancer
    "pass_not_ip",  # not IPv4/IPv6 (ARP, QinQ, ...)
    "pass_not_vip",  # IP, but no VIP for it (or a protocol we do not balance)
    "pass_local",  # VIP flagged local, real is this host
    "drop_malformed",  # truncated headers, bad version / IHL / length fields
    "drop_ip_options",  # IPv4 header with options, to a VIP address
    "drop_fragment",  # IPv4 fragment or IPv6 fragment header, to a VIP address
    "drop_oversize",  # frame longer than max_frame_size, to a VIP address
    "drop_no_real",  # VIP has no usable real
    "drop_encap_failed",  # real cannot carry this packet / no headroom
    "lru_hit",  # connection table gave the real
    "lru_miss",  # real chosen by hashing (SYN, new flow, expired UDP, stale entry)
    "icmp_error_forwarded",  # ICMP(v6) error for a VIP flow sent to its real
)
STAT_INDEX = {name: i for i, name in enumerate(STATS)}
N_STATS = len(STATS)
# The same indexes as module-level ints (STAT_RX_PACKETS, ...), which numba and the
# -D flags can use directly.
globals().update({f"STAT_{name.upper()}": i for i, name in enumerate(STATS)})
# Per-VIP and per-real counter columns.
VIP_STAT_PACKETS = 0
VIP_STAT_BYTES = 1


def c_defines(
    ring_size: int = RING_SIZE,
    max_vips: int = MAX_VIPS,
    max_reals: int = MAX_REALS,
    conn_table_size: int = CONN_TABLE_SIZE,
) -> list[str]:
    """The ``-D`` flags that hand every shared constant to the C side."""
    values: dict[str, int] = {
        "RING_SIZE": ring_size,
        "MAX_VIPS": max_vips,
        "MAX_REALS": max_reals,
        "CONN_TABLE_SIZE": conn_table_size,
        "CH_RINGS_SIZE": ch_rings_size(max_vips, ring_size),
        "LRU_UDP_TIMEOUT_NS": LRU_UDP_TIMEOUT_NS,
        "DEFAULT_TTL": DEFAULT_TTL,
        "N_STATS": N_STATS,
        "FAMILY_V4": FAMILY_V4,
        "FAMILY_V6": FAMILY_V6,
        "REAL_F_LOCAL": REAL_F_LOCAL,
    }
    values.update({f"F_{name.upper()}": bit for name, bit in VIP_FLAGS.items()})
    values.update({f"STAT_{name.upper()}": i for i, name in enumerate(STATS)})
    values.update(
        IPIP_V4_PREFIX0=IPIP_V4_PREFIX0,
        IPIP_V4_PREFIX1=IPIP_V4_PREFIX1,
        IPIP_V6_PREFIX0=IPIP_V6_PREFIX0,
        IPIP_V6_PREFIX1=IPIP_V6_PREFIX1,
    )
    out = []
    for k, v in values.items():
        suffix = "ULL" if v > 0x7FFFFFFF else ""
        out.append(f"-D{k}={v}{suffix}")
    return out
