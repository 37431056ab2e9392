/* Hashes of the helper-free lookups (lb/xdp_tables.py builds and mirrors them): the VIP
 * index and the connection table's sets. Keys are read as little-endian 64-bit words,
 * mixed with one multiply-xorshift step each (lb_mix). Internal, seeded, never on the
 * wire. The probing itself is in balancer.c, where the maps are.
 */
#pragma once

#include "generated/lb_shared.h"

static __always_inline __u64 lb_mix(__u64 h, __u64 w)
{
	h = (h ^ w) * MIX_K;
	return h ^ (h >> 29);
}

/* A VIP key as the three words the index compares: address bytes 0-7 and 8-15, then
 * (port, proto, family) as a little-endian u32. */
struct vip_words {
	__u64 w0;
	__u64 w1;
	__u32 w2;
};

static __always_inline __u32 vip_tail(__be16 port, __u8 proto, __u8 family)
{
	return (__u32)port | ((__u32)proto << 16) | ((__u32)family << 24);
}

static __always_inline __u64 vip_words_hash(const struct vip_words *k, __u64 seed)
{
	return lb_mix(lb_mix(lb_mix(seed, k->w0), k->w1), k->w2);
}

static __always_inline int vip_slot_matches(const struct vip_slot *s, const struct vip_words *k)
{
	const __u64 *w = (const __u64 *)s;

	return w[0] == k->w0 && w[1] == k->w1 && *(const __u32 *)&w[2] == k->w2;
}

/* The flow key as five 64-bit words: src, dst, (ports, proto, family, pad). */
static __always_inline __u64 conn_set_hash(const struct flow_key *f, __u64 seed)
{
	const __u64 *w = (const __u64 *)f;
	__u64 h = seed;

	h = lb_mix(h, w[0]);
	h = lb_mix(h, w[1]);
	h = lb_mix(h, w[2]);
	h = lb_mix(h, w[3]);
	return lb_mix(h, w[4]);
}

/* The tag an entry for a flow with set hash h and real real_id carries: its high 62 bits;
 * the low 2 bits (CONN_KEY_SLOT_MASK) say where in the set's conn_keys the flow key is. */
static __always_inline __u64 conn_tag(__u64 h, __u32 real_id)
{
	return (h ^ ((__u64)real_id * MIX_K)) & ~(__u64)CONN_KEY_SLOT_MASK;
}
