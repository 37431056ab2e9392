/* Map keys and values shared with userspace.
 *
 * One source of truth: lb/layout.py (numpy dtypes). These declarations must match it
 * byte for byte; tests/test_layout.py compiles this header and checks sizeof and every
 * field offset against the dtypes. Explicit padding everywhere: hash keys are compared
 * as bytes, so every byte of a key must be written (keys are zero-initialised).
 */
#pragma once

#include <linux/types.h>

/* An address as stored in every key: IPv4 in the first 4 bytes (network order), the
 * other 12 zero; IPv6 all 16 bytes. A separate family byte tells them apart. */
union lb_addr {
	__be32 v4;
	__be32 v6[4];
	__u8 bytes[16];
};

/* vip_map key (layout.VIP_KEY). 20 bytes. */
struct vip_key {
	union lb_addr addr;
	__be16 port;       /* network order; 0 = any port ("port-0 VIP") */
	__u8 proto;        /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 family;       /* FAMILY_V4 / FAMILY_V6 */
};

/* vip_map value (layout.VIP_META), Katran's vip_meta. 8 bytes. */
struct vip_meta {
	__u32 flags;       /* F_* bits (Katran's values) */
	__u32 vip_num;     /* ring number: ch_rings[vip_num * RING_SIZE + pos] */
};

/* vip_addrs key (layout.VIP_ADDR_KEY): every address that has at least one VIP. */
struct vip_addr_key {
	union lb_addr addr;
	__u8 family;
	__u8 pad[3];
};

/* reals entry (layout.REAL), indexed by real id; family 0 = no real. 20 bytes. */
struct real_def {
	union lb_addr addr;
	__u8 family;
	__u8 flags;        /* REAL_F_* */
	__u8 pad[2];
};

/* conn_table key (layout.FLOW_KEY): the flow after the VIP's flags. 40 bytes.
 * sport/dport are the wire bytes, as Katran's flow.ports. */
struct flow_key {
	union lb_addr src;
	union lb_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
} __attribute__((aligned(8)));  /* read as five u64 words (xdp/lookup.h) */

/* vip_slots entry (layout.VIP_SLOT): open-addressing VIP index, lb/vip_index.py.
 * key.family 0 = empty. 32 bytes. */
struct vip_slot {
	struct vip_key key;
	struct vip_meta meta;
	__u32 pad;
};

/* lb_runtime[0] (layout.RUNTIME). 16 bytes. */
struct lb_runtime {
	__u64 vip_index;   /* bit 0: live half of vip_slots; bits 32-63: its hash seed */
	__u64 conn_seed;   /* connection-table set hash seed */
};

/* conn_sets way (layout.CONN_ENTRY). A set of CONN_WAYS (4) is one cache line. The flow
 * is known by its 64-bit set hash h: tag = (h ^ real_id * LB_MIX_K) with the low 2 bits
 * replaced by the entry's slot in conn_keys (the flow key, for the control plane only, so
 * moving an entry inside its set never moves a key). An entry half-written by another CPU
 * (tag of one write, real of another) fails the comparison and is a miss, never a wrong
 * real. real_id 0 = empty. 16 bytes. */
struct conn_entry {
	__u64 tag;
	__u32 real_id;
	__u32 atime;       /* bpf_ktime_get_ns() >> LB_CONN_TIME_SHIFT (~1 ms units) */
};

/* ctl[0] (layout.CTL). 36 bytes. */
struct ctl_value {
	__u8 gw_mac[6];    /* destination MAC of encapsulated frames */
	__u16 max_frame;   /* largest frame accepted for a VIP address, L2 included */
	__u16 mtu;         /* largest outer IP packet towards reals; 0 = not checked */
	__be16 gue_port;   /* GUE outer UDP destination port */
	__u8 encap;        /* LB_ENCAP_IPIP / LB_ENCAP_GUE */
	__u8 pad[3];
	__u8 gue_src_v4[4];  /* GUE outer source addresses */
	__u8 gue_src_v6[16];
};

/* Source-routing LPM keys (layout.LPM_V4_KEY / LPM_V6_KEY); value: real id. */
struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};
