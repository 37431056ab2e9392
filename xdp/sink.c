/* Counting sink for the far side of a veth: counts every frame (packets, bytes) per CPU
 * and drops it. lb/pktgen.py (Sink) loads it with bcc.
 *
 * Optionally (sink_cfg.key_mode, changeable at run time) it also counts per key in a
 * bounded per-CPU hash (SINK_MAX_KEYS entries):
 *   SINK_KEY_DST:  the outer destination address (IPv4 or IPv6): "which real" for
 *                  encapsulated balancer output, or which VIP/host;
 *   SINK_KEY_FLOW: the outer 5-tuple (ports 0 unless TCP/UDP without fragmenting).
 * A frame whose key does not fit (table full) bumps key_overflow; a frame that is not
 * IPv4/IPv6 (or is truncated) bumps key_unparsed. Either way it is in packets/bytes.
 *
 * The per-CPU split of the counters says which CPU the sink's NAPI ran on.
 */
#include <uapi/linux/bpf.h>
#include <linux/types.h>

/* SINK_KEY_*, SINK_MAX_KEYS (default) and the wire constants. */
#include "generated/lb_shared.h"

struct sink_counts {
	__u64 packets;
	__u64 bytes;
	__u64 key_overflow;
	__u64 key_unparsed;
};

struct sink_cfg {
	__u32 key_mode;
};

struct sink_key {
	__u8 family; /* FAMILY_V4 or FAMILY_V6 */
	__u8 proto;
	__u16 sport; /* network order */
	__u16 dport;
	__u16 pad;
	__u8 src[16]; /* IPv4: first 4 bytes */
	__u8 dst[16];
};

struct sink_val {
	__u64 packets;
	__u64 bytes;
};

BPF_PERCPU_ARRAY(sink_stats, struct sink_counts, 1);
BPF_ARRAY(sink_cfg, struct sink_cfg, 1);
BPF_PERCPU_HASH(sink_keys, struct sink_key, struct sink_val, SINK_MAX_KEYS);

/* Fill key from the frame; 0 on success. */
static __always_inline int sink_parse(void *data, void *data_end, __u32 mode, struct sink_key *key)
{
	__u8 *p = data;
	__u16 proto;
	__u8 *l4 = 0;

	if (p + ETH_HLEN > (__u8 *)data_end)
		return -1;
	proto = ((__u16)p[12] << 8) | p[13];
	p += ETH_HLEN;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		if (p + VLAN_HLEN > (__u8 *)data_end)
			return -1;
		proto = ((__u16)p[2] << 8) | p[3];
		p += VLAN_HLEN;
	}
	if (proto == ETH_P_IP) {
		__u32 ihl;

		if (p + 20 > (__u8 *)data_end)
			return -1;
		ihl = (p[0] & 0xf) * 4;
		if (ihl < 20)
			return -1;
		key->family = FAMILY_V4;
		key->proto = p[9];
		__builtin_memcpy(key->src, p + 12, 4);
		__builtin_memcpy(key->dst, p + 16, 4);
		if ((((__u16)p[6] << 8 | p[7]) & (IP_MF | IP_OFFSET_MASK)) == 0)
			l4 = p + ihl;
	} else if (proto == ETH_P_IPV6) {
		if (p + 40 > (__u8 *)data_end)
			return -1;
		key->family = FAMILY_V6;
		key->proto = p[6];
		__builtin_memcpy(key->src, p + 8, 16);
		__builtin_memcpy(key->dst, p + 24, 16);
		l4 = p + 40;
	} else {
		return -1;
	}
	if (mode == SINK_KEY_DST) {
		key->proto = 0;
		__builtin_memset(key->src, 0, sizeof(key->src));
		return 0;
	}
	if (l4 && (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) && l4 + 4 <= (__u8 *)data_end) {
		key->sport = *(__u16 *)l4;
		key->dport = *(__u16 *)(l4 + 2);
	}
	return 0;
}

int sink_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	__u32 zero = 0;
	struct sink_counts *c = sink_stats.lookup(&zero);
	struct sink_cfg *cfg;
	struct sink_key key = {};
	struct sink_val *v;

	if (!c)
		return XDP_DROP;
	c->packets += 1;
	c->bytes += len;

	cfg = sink_cfg.lookup(&zero);
	if (!cfg || cfg->key_mode == SINK_KEY_NONE)
		return XDP_DROP;
	if (sink_parse(data, data_end, cfg->key_mode, &key)) {
		c->key_unparsed += 1;
		return XDP_DROP;
	}
	v = sink_keys.lookup(&key);
	if (!v) {
		struct sink_val init = {};

		/* -EEXIST: another CPU inserted it first; anything else: full */
		if (sink_keys.insert(&key, &init) && !sink_keys.lookup(&key)) {
			c->key_overflow += 1;
			return XDP_DROP;
		}
		v = sink_keys.lookup(&key);
		if (!v) {
			c->key_overflow += 1;
			return XDP_DROP;
		}
	}
	v->packets += 1;
	v->bytes += len;
	return XDP_DROP;
}
