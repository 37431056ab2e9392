"""Byte layouts of the datapath's tables, shared by the userspace datapath and the BPF maps.

Each layout is a numpy structured dtype with explicit offsets; ``python -m lb.c_header``
writes the C structs from them (``xdp/generated/lb_shared.h``, explicit padding, static
asserts on every size and offset) and ``tests/test_layout.py`` compares them with what bcc
sees. Addresses are always 16 bytes: IPv4 uses the first 4, the rest is zero, and a
``family`` byte (4 or 6) keeps 10.0.0.1 and 0a00:1:: apart. Ports are in network order.
"""

from __future__ import annotations

import numpy as np

from lb import constants

# VIP table key: (address, port, protocol, family). 20 bytes.
VIP_KEY = np.dtype(
    {
        "names": ["addr", "port", "proto", "family"],
        "formats": [("u1", 16), ">u2", "u1", "u1"],
        "offsets": [0, 16, 18, 19],
        "itemsize": 20,
    }
)

# VIP table value: Katran's vip_meta. 8 bytes.
VIP_META = np.dtype(
    {"names": ["flags", "vip_num"], "formats": ["<u4", "<u4"], "offsets": [0, 4], "itemsize": 8}
)

# VIP address set key (for ICMP echo and for dropping options/fragments only when the
# packet is for us): (address, family, padding). 20 bytes.
VIP_ADDR_KEY = np.dtype(
    {"names": ["addr", "family"], "formats": [("u1", 16), "u1"], "offsets": [0, 16], "itemsize": 20}
)

# Real table entry, indexed by real id (0 = no real). 20 bytes.
REAL = np.dtype(
    {
        "names": ["addr", "family", "flags"],
        "formats": [("u1", 16), "u1", "u1"],
        "offsets": [0, 16, 17],
        "itemsize": 20,
    }
)

# Connection-table key: the flow after the VIP's flags have been applied. 40 bytes.
# ``ports`` is the 4 wire bytes [sport][dport], as Katran's flow.ports.
FLOW_KEY = np.dtype(
    {
        "names": ["src", "dst", "sport", "dport", "proto", "family"],
        "formats": [("u1", 16), ("u1", 16), ">u2", ">u2", "u1", "u1"],
        "offsets": [0, 16, 32, 34, 36, 37],
        "itemsize": 40,
    }
)

# Control values (single entry). 40 bytes. ``mtu`` 0 = no too-big check; ``gue_port`` in
# network order; ``encap`` = constants.ENCAP_IPIP / ENCAP_GUE; ``cidr_vips`` 1 if any CIDR
# VIP exists (else the prefix lookups are skipped: without CIDR VIPs no frame pays for
# them); GUE outer source addresses; ``max_conn_rate``: new connections per CPU per
# second before the flood guard, 0 = off.
CTL = np.dtype(
    {
        "names": ["gw_mac", "max_frame", "mtu", "gue_port", "encap", "cidr_vips", "gue_src_v4",
                  "gue_src_v6", "max_conn_rate"],
        "formats": [("u1", 6), "<u2", "<u2", ">u2", "u1", "u1", ("u1", 4), ("u1", 16), "<u4"],
        "offsets": [0, 6, 8, 10, 12, 13, 16, 20, 36],
        "itemsize": 40,
    }
)

# Source-routing LPM keys (BPF_MAP_TYPE_LPM_TRIE: prefix length first, host order, then
# the address bytes). Values: u32 real id.
LPM_V4_KEY = np.dtype(
    {"names": ["prefixlen", "addr"], "formats": ["<u4", ("u1", 4)], "offsets": [0, 4], "itemsize": 8}
)
LPM_V6_KEY = np.dtype(
    {"names": ["prefixlen", "addr"], "formats": ["<u4", ("u1", 16)], "offsets": [0, 4], "itemsize": 20}
)

# CIDR VIP key (BPF_MAP_TYPE_LPM_TRIE vip_prefixes: -> VIP_META; vip_prefix_addrs, with
# port and proto 0: -> u32 1). ``prefixlen`` (host order) counts the 32 bits of (port,
# proto, family), matched exactly, plus the address prefix length, so one trie holds both
# families and a lookup finds the longest prefix among the VIPs of one (port, proto). The
# address is stored as in VIP_KEY (IPv4 in the first 4 bytes). 24 bytes.
VIP_LPM_KEY = np.dtype(
    {
        "names": ["prefixlen", "port", "proto", "family", "addr"],
        "formats": ["<u4", ">u2", "u1", "u1", ("u1", 16)],
        "offsets": [0, 4, 6, 7, 8],
        "itemsize": 24,
    }
)

# Source-routing table entries (userspace form): LPM key + real id.
SRC_ROUTE_V4 = np.dtype([("key", LPM_V4_KEY), ("real_id", "<u4")])
SRC_ROUTE_V6 = np.dtype([("key", LPM_V6_KEY), ("real_id", "<u4")])

# QUIC server id -> real id table entry (userspace form; the BPF map's key and value are
# the two u32s).
QUIC_SERVER = np.dtype(
    {"names": ["server_id", "real_id"], "formats": ["<u4", "<u4"], "offsets": [0, 4], "itemsize": 8}
)

# VIP index slot (the XDP program's VIP lookup, lb/xdp_tables.py): a VIP_KEY and its
# VIP_META, open addressing in an array map. family 0 = empty slot. 32 bytes.
VIP_SLOT = np.dtype(
    {
        "names": ["key", "meta"],
        "formats": [VIP_KEY, VIP_META],
        "offsets": [0, 20],
        "itemsize": 32,
    }
)

# Runtime words the datapath reads beside ctl (one entry, mmap-able). ``vip_index``: bit 0
# = the live half of vip_slots, bits 32-63 = its hash seed (lb/xdp_tables.py); one aligned
# u64, so the control plane switches half and seed in one store. ``conn_seed``: the
# connection table's set-hash seed (random, chosen when the map is new). ``capture``:
# bits 0-7 the capture events on (1 << constants.CAPTURE_EV_*), bits 32-63 the interval
# between two records of one CPU in ns (lb/capture.py); 0 = off. 24 bytes.
RUNTIME = np.dtype(
    {"names": ["vip_index", "conn_seed", "capture"], "formats": ["<u8", "<u8", "<u8"],
     "offsets": [0, 8, 16], "itemsize": 24}
)

# A capture record, as the XDP program writes it into the capture ring buffer
# (lb/capture.py reads it). ``ts_ns``: bpf_ktime_get_ns() (CLOCK_MONOTONIC); ``event``:
# constants.CAPTURE_EV_*; ``reason``: the frame's outcome counter (STAT_*) where the event
# knows it (drop, too-big), else 0; ``vip_num``: CAPTURE_NO_VIP when unknown; ``real_id``: 0
# when unknown; ``frame_len``: the frame's length as it arrived; ``data``: its first
# ``cap_len`` (<= CAPTURE_SNAPLEN) bytes. 32 + CAPTURE_SNAPLEN bytes.
CAPTURE_RECORD = np.dtype(
    {"names": ["ts_ns", "event", "reason", "cpu", "vip_num", "real_id", "frame_len", "cap_len",
               "data"],
     "formats": ["<u8", "<u2", "<u2", "<u4", "<u4", "<u4", "<u4", "<u4", ("u1", constants.CAPTURE_SNAPLEN)],
     "offsets": [0, 8, 10, 12, 16, 20, 24, 28, 32], "itemsize": 32 + constants.CAPTURE_SNAPLEN}
)

# A CPU's capture state (per-CPU array, one entry): ``tat`` = the theoretical arrival time
# (ns) of its next record (a GCRA token bucket); ``limited`` = records not sent because of
# the rate; ``lost`` = records not sent because the ring buffer was full. 24 bytes.
CAPTURE_BUCKET = np.dtype({"names": ["tat", "limited", "lost"], "formats": ["<u8", "<u8", "<u8"],
                           "offsets": [0, 8, 16], "itemsize": 24})

# Connection-table entry of the XDP program (xdp/generated/lb_shared.h): tag = the flow's 64-bit set
# hash ^ real_id * MIX_K (lb/xdp_tables.py) with its low 2 bits the entry's slot in the
# set's conn_keys, real_id (0 = empty), atime in units of
# 2**constants.CONN_TIME_SHIFT ns. Four make a set, one cache line. 16 bytes.
CONN_ENTRY = np.dtype(
    {"names": ["tag", "real_id", "atime"], "formats": ["<u8", "<u4", "<u4"],
     "offsets": [0, 8, 12], "itemsize": 16}
)

# The flood guard's state of one CPU (xdp/maps.h conn_rates, indexed by CPU): the start of
# the current window (ns, bpf_ktime_get_ns) and the new connections counted in it. One
# cache line each, so CPUs never share a line. 64 bytes.
CONN_RATE = np.dtype(
    {"names": ["window_start", "count"], "formats": ["<u8", "<u8"], "offsets": [0, 8],
     "itemsize": 64}
)

# A word of the down set (xdp/maps.h down_set): bit ``real_id % 64`` of word
# ``vip_num * constants.down_row_words(max_reals) + real_id // 64`` is set while the health
# checks hold that real down for that VIP (a row of words per VIP number). The datapath
# reads it only for a real flagged REAL_F_DOWN; max_vips * max_reals bits (256 KiB at the
# defaults; lb.config caps max_vips * max_reals at 2**32).
DOWN_WORD = np.dtype("<u8")

# A connection-table entry as the control plane reports it (XdpBalancer.conn_table_entries):
# real id and last access in ns.
CONN_VALUE = np.dtype({"names": ["real_id", "atime"], "formats": ["<u4", "<u8"],
                       "offsets": [0, 8], "itemsize": 16})

# A stateless VIP's previous rings (prev_ref map, indexed by vip_num): the prev_rings slots
# of its newest (prev0) and older (prev1) previous ring, each slot + 1; 0 = none. One u32
# read, so a packet sees both refs of one write. 4 bytes.
PREV_REF = np.dtype(
    {"names": ["prev0", "prev1"], "formats": ["<u2", "<u2"], "offsets": [0, 2], "itemsize": 4}
)

# name in C (struct <name> in xdp/generated/lb_shared.h) -> dtype
C_STRUCTS: dict[str, np.dtype] = {
    "vip_key": VIP_KEY,
    "vip_meta": VIP_META,
    "vip_addr_key": VIP_ADDR_KEY,
    "real_def": REAL,
    "flow_key": FLOW_KEY,
    "ctl_value": CTL,
    "lpm_v4_key": LPM_V4_KEY,
    "lpm_v6_key": LPM_V6_KEY,
    "vip_slot": VIP_SLOT,
    "lb_runtime": RUNTIME,
    "conn_entry": CONN_ENTRY,
    "capture_record": CAPTURE_RECORD,
    "capture_bucket": CAPTURE_BUCKET,
    "conn_rate": CONN_RATE,
    "prev_ref": PREV_REF,
    "vip_lpm_key": VIP_LPM_KEY,
}

# 16-byte address fields the C side reads as ``union lb_addr`` (IPv4 word, IPv6 words or
# bytes); every other array field is a plain byte array.
C_ADDR_FIELDS: dict[str, tuple[str, ...]] = {
    "vip_key": ("addr",),
    "vip_addr_key": ("addr",),
    "real_def": ("addr",),
    "flow_key": ("src", "dst"),
    "vip_lpm_key": ("addr",),
}

# Structs the C side reads as 64-bit words on the stack (where the verifier wants aligned
# access): C alignment beyond the members' own.
C_ALIGN: dict[str, int] = {
    "flow_key": 8,  # xdp/lookup.h hashes it as five u64 words
}
