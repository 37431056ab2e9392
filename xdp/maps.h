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

/* (VIP address, port, proto, family) -> flags and ring number. */
LB_MAP("hash", struct vip_key, struct vip_meta, vip_map, MAX_VIPS, 0);

/* Every address that carries a VIP -> 1. Decides "is this packet for us" before any
 * port is looked at (ICMP echo, options, fragments, oversize). */
LB_MAP("hash", struct vip_addr_key, __u32, vip_addrs, MAX_VIPS, 0);

/* Real id -> real. Id 0 is never used ("no real"). */
LB_MAP("array", __u32, struct real_def, reals, MAX_REALS, 0);

/* Maglev rings, one per VIP number, RING_SIZE slots each: real id, 0 = none.
 * mmap-able so the control plane writes slots directly. */
LB_MAP("array", __u32, __u32, ch_rings, MAX_VIPS * RING_SIZE, BPF_F_MMAPABLE);

#ifndef LB_CONN_PERCPU_MAPS
/* Connection table: flow -> (real id, last access). One LRU list per CPU
 * (BPF_F_NO_COMMON_LRU); the kernel gives each CPU max_entries / nr_cpus entries,
 * so CONN_TABLE_SIZE is the per-CPU capacity. */
LB_MAP("lru_hash", struct flow_key, struct conn_value, conn_table,
       CONN_TABLE_SIZE * LB_NR_CPUS, BPF_F_NO_COMMON_LRU);
#else
/* -DLB_CONN_PERCPU_MAPS: Katran's layout instead. conn_table[cpu] is that CPU's own
 * LRU_HASH of CONN_TABLE_SIZE entries (one common LRU each, used by one CPU only).
 * conn_inner is the inner-map template bcc needs in the program; the loader
 * (lb/bpf_loader.py) uses it as CPU 0's table and creates the others. A flow's entry is
 * then seen only by the CPU that wrote it (a flow that moves to another CPU is hashed
 * again), where the default's single table is looked up by every CPU. Not the default:
 * no faster in bench/bench_xdp.py (part d), and that difference in behaviour. */
LB_MAP("lru_hash", struct flow_key, struct conn_value, conn_inner, CONN_TABLE_SIZE, 0);
LB_MAP("array_of_maps$conn_inner", int, int, conn_table, LB_NR_CPUS, 0);
#endif

/* QUIC server id (from the connection id) -> real id. */
LB_MAP("hash", __u32, __u32, quic_servers, MAX_QUIC_SERVER_IDS, 0);

/* Source routing: client prefix -> real id, one trie per family (LPM tries must not be
 * preallocated). */
LB_MAP("lpm_trie", struct lpm_v4_key, __u32, src_routes_v4, MAX_SRC_ROUTES, BPF_F_NO_PREALLOC);
LB_MAP("lpm_trie", struct lpm_v6_key, __u32, src_routes_v6, MAX_SRC_ROUTES, BPF_F_NO_PREALLOC);

/* Global settings, one entry. */
LB_MAP("array", __u32, struct ctl_value, ctl, 1, 0);

/* Global counters, index STAT_* (lb/constants.py STATS), per CPU. */
LB_MAP("percpu_array", __u32, __u64, stats, N_STATS, 0);

/* Per-VIP counters: [vip_num * VIP_STAT_COLUMNS + VIP_STAT_PACKETS / VIP_STAT_BYTES], per CPU.
 * Bytes are input frame lengths, L2 header included. */
LB_MAP("percpu_array", __u32, __u64, vip_stats, MAX_VIPS * VIP_STAT_COLUMNS, 0);

/* Per-real counters: [real_id * VIP_STAT_COLUMNS + VIP_STAT_PACKETS / VIP_STAT_BYTES], per CPU. */
LB_MAP("percpu_array", __u32, __u64, real_stats, MAX_REALS * VIP_STAT_COLUMNS, 0);
