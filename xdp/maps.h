/* The balancer's maps. Sizes are per-instance -D flags (lb.c_header.c_flags), with the
 * defaults of xdp/generated/lb_shared.h.
 *
 * With -DLB_PIN_DIR="\"/sys/fs/bpf/<instance>\"" every map is pinned as
 * <instance>/<map name>: bcc opens the pinned map if it exists (a restarted control
 * plane, or a replacement program, gets the same maps) and creates and pins it if not.
 *
 * bcc rewrites map method calls (.lookup, .update) only in the main file, so the maps
 * are declared here and used only in balancer.c.
 */
#pragma once

#include "generated/lb_shared.h"

#ifndef LB_NR_CPUS
#error "LB_NR_CPUS (possible CPUs) must come from the loader"
#endif

#ifdef LB_PIN_DIR
#define LB_MAP(_type, _key, _value, _name, _entries, _flags) \
	BPF_TABLE_PINNED(_type, _key, _value, _name, _entries, LB_PIN_DIR "/" #_name, _flags)
#else
#define LB_MAP(_type, _key, _value, _name, _entries, _flags) \
	BPF_F_TABLE(_type, _key, _value, _name, _entries, _flags)
#endif

/* (VIP address, port, proto, family) -> flags and ring number: the canonical VIP set,
 * written and read back by the control plane. The program reads vip_slots. */
LB_MAP("hash", struct vip_key, struct vip_meta, vip_map, MAX_VIPS, 0);

/* The VIP index the program reads (lb/xdp_tables.py): two halves of VIP_SLOTS slots,
 * lb_runtime.vip_index says which one is live. */
LB_MAP("array", __u32, struct vip_slot, vip_slots, 2 * VIP_SLOTS, 0);

/* Runtime words (layout.RUNTIME), one entry; mmap-able so the control plane switches the
 * VIP index with one aligned store. */
LB_MAP("array", __u32, struct lb_runtime, lb_runtime, 1, BPF_F_MMAPABLE);

/* Every address that carries a VIP -> 1. Decides "is this packet for us" before any
 * port is looked at (ICMP echo, options, fragments, oversize). */
LB_MAP("hash", struct vip_addr_key, __u32, vip_addrs, MAX_VIPS, 0);

/* CIDR VIPs (layout.VIP_LPM_KEY, both families): (port, proto, family, address prefix) ->
 * flags and ring number, looked up only after the exact VIP misses; and every prefix that
 * carries a CIDR VIP (port and proto 0) -> 1, the prefix half of vip_addrs. LPM tries must
 * not be preallocated: an empty one costs nothing. */
LB_MAP("lpm_trie", struct vip_lpm_key, struct vip_meta, vip_prefixes, MAX_VIPS, BPF_F_NO_PREALLOC);
LB_MAP("lpm_trie", struct vip_lpm_key, __u32, vip_prefix_addrs, MAX_VIPS, BPF_F_NO_PREALLOC);

/* Real id -> real. Id 0 is never used ("no real"). */
LB_MAP("array", __u32, struct real_def, reals, MAX_REALS, 0);

/* The down set (layout.DOWN_WORD): bit real_id % DOWN_WORD_BITS of word vip_num *
 * DOWN_ROW_WORDS + real_id / DOWN_WORD_BITS is set while the health checks hold that real
 * down for that VIP. Read only for a real flagged REAL_F_DOWN (down for at least one VIP).
 * mmap-able so the control plane reads and writes words directly (aligned 64-bit stores). */
LB_MAP("array", __u32, __u64, down_set, MAX_VIPS * DOWN_ROW_WORDS, BPF_F_MMAPABLE);

/* Maglev rings, one per VIP number, RING_SIZE slots each: real id, 0 = none.
 * mmap-able so the control plane writes slots directly. */
LB_MAP("array", __u32, __u32, ch_rings, MAX_VIPS * RING_SIZE, BPF_F_MMAPABLE);

/* Connection table: CONN_SETS * LB_NR_CPUS sets (CONN_TABLE_SIZE entries per CPU, as
 * capacity) of CONN_WAYS 16-byte entries, one cache line per set, shared by every CPU like
 * the LRU hash it replaces. Ways are kept in recency order (way 0 the most recently used):
 * a set is LRU, and a lookup reads one cache line and calls no helper. mmap-able so the
 * control plane reads and clears it directly. conn_keys[set * CONN_WAYS + slot] holds each
 * entry's flow key (slot: the low bits of its tag); the program writes it with the entry
 * and never reads it. */
#if CONN_WAYS > 4
#error "conn_entry.tag has 2 bits of key slot: CONN_WAYS <= 4"
#endif
struct conn_set {
	struct conn_entry way[CONN_WAYS];
};
#define LB_CONN_SETS_ALL ((__u64)CONN_SETS * LB_NR_CPUS)
LB_MAP("array", __u32, struct conn_set, conn_sets, LB_CONN_SETS_ALL, BPF_F_MMAPABLE);
LB_MAP("array", __u32, struct flow_key, conn_keys, LB_CONN_SETS_ALL * CONN_WAYS, BPF_F_MMAPABLE);

/* The flood guard's new-connection count, one entry per CPU (index: the CPU number), a
 * cache line each (layout.CONN_RATE). Written on the miss path only. */
LB_MAP("array", __u32, struct conn_rate, conn_rates, LB_NR_CPUS, 0);
/* Stateless VIPs' previous rings: MAX_PREV_RINGS slots of RING_SIZE real ids, mmap-able
 * like ch_rings; prev_ref[vip_num] names the slots of a VIP's previous rings (layout
 * PREV_REF; all zero for most VIPs). Written only by the control plane. */
LB_MAP("array", __u32, __u32, prev_rings, MAX_PREV_RINGS * RING_SIZE, BPF_F_MMAPABLE);
LB_MAP("array", __u32, struct prev_ref, prev_ref, MAX_VIPS, 0);

/* QUIC server id (from the connection id) -> real id. */
LB_MAP("hash", __u32, __u32, quic_servers, MAX_QUIC_SERVER_IDS, 0);

/* Source routing: client prefix -> real id, one trie per family (LPM tries must not be
 * preallocated). */
LB_MAP("lpm_trie", struct lpm_v4_key, __u32, src_routes_v4, MAX_SRC_ROUTES, BPF_F_NO_PREALLOC);
LB_MAP("lpm_trie", struct lpm_v6_key, __u32, src_routes_v6, MAX_SRC_ROUTES, BPF_F_NO_PREALLOC);

/* Global settings, one entry. */
LB_MAP("array", __u32, struct ctl_value, ctl, 1, 0);

/* Counters, per CPU, one map entry per row so that a packet's counters of a row share one
 * lookup: the global counters (one row, index STAT_*, lb/constants.py STATS), per VIP
 * (row vip_num, columns VIP_STAT_PACKETS / VIP_STAT_BYTES) and per real (row real_id, the
 * same and REAL_STAT_LRU_MISS). Bytes are input frame lengths, L2 header included. */
struct lb_stats {
	__u64 n[N_STATS];
};
struct vip_counters {
	__u64 col[VIP_STAT_COLUMNS];
};
struct real_counters {
	__u64 col[REAL_STAT_COLUMNS];
};
LB_MAP("percpu_array", __u32, struct lb_stats, stats, 1, 0);
LB_MAP("percpu_array", __u32, struct vip_counters, vip_stats, MAX_VIPS, 0);
LB_MAP("percpu_array", __u32, struct real_counters, real_stats, MAX_REALS, 0);

/* Capture (lbctl capture, lb/capture.py): struct capture_record for the frames behind the
 * events lb_runtime.capture turns on, rate-limited per CPU by capture_buckets. A ring
 * buffer map, declared as bcc's BPF_RINGBUF_OUTPUT does, pinned like the others. */
#ifdef LB_PIN_DIR
#define LB_CAPTURE_RING_SECTION "maps/ringbuf:" LB_PIN_DIR "/capture_ring"
#else
#define LB_CAPTURE_RING_SECTION "maps/ringbuf"
#endif
struct capture_ring_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section(LB_CAPTURE_RING_SECTION)))
struct capture_ring_table_t capture_ring = { .max_entries = CAPTURE_RING_BYTES };
LB_MAP("percpu_array", __u32, struct capture_bucket, capture_buckets, 1, 0);
