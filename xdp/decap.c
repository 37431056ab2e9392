/* Decapsulation for the real servers: strips the tunnel header the balancer (or Katran)
 * put on a packet and hands the inner packet, byte for byte as the client sent it, to the
 * kernel, whose VIP sits on the real's loopback. No ipip/ip6tnl/fou modules needed.
 *
 * Kinds: IPv4-in-IPv4, IPv6-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6, and GUE (outer UDP to
 * GUE_PORT, variant 1 direct IP as Katran sends it, or variant 0 with a GUE header); see
 * xdp/decap.h for the exact formats.
 *
 * Which packets: every matching tunnel packet, whatever its outer destination, like
 * Katran's decap. If the allow-list (decap_allow_v4 / decap_allow_v6) has entries, which
 * the loader flags in decap_config[0], only tunnel packets whose outer destination is
 * listed are decapsulated; the others go to the kernel untouched (counted as
 * passed_not_allowed).
 *
 * Two entries, same parser, same counters:
 *   decap_xdp  XDP: move the L2 header forward over the outer headers, set its ethertype
 *              to the inner family, bpf_xdp_adjust_head, XDP_PASS.
 *   decap_tc   tc clsact ingress, direct action: bpf_skb_adjust_room(BPF_ADJ_ROOM_MAC)
 *              removes the outer headers after the MAC header (with
 *              BPF_F_ADJ_ROOM_DECAP_L3_IPV4/6 when the family changes, so skb->protocol
 *              follows; kernels before 6.3 lack those flags and get the
 *              bpf_skb_change_proto route instead), then the ethertype is rewritten.
 *
 * Counters: per-CPU array decap_stats, one slot per DECAP_STAT_* (indexes and names from
 * lb/decap_loader.py); every frame bumps exactly one.
 *
 * Not done here: the outer IPv4 header checksum and the outer UDP checksum are not
 * verified (Katran's decap doesn't either; the balancer sends UDP checksum 0); outer
 * fragments are not reassembled (passed to the kernel, counted); IPv6 extension headers
 * other than the fragment header are not walked (such packets are passed). The inner
 * packet is never modified: no TTL / hop-limit change, its checksums stay valid.
 * tc + GSO: a GSO skb (e.g. a tunnel GRO aggregate) is shrunk with
 * BPF_F_ADJ_ROOM_FIXED_GSO, which keeps gso_size (the inner segments' size); its tunnel
 * gso_type bits stay set, harmless for local delivery, which is all a real does with it.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#include "decap.h"

/* Kernel 6.3+ flags; Debian's 6.1 headers lack them, the running kernel knows them. */
#define DECAP_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define DECAP_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#define DECAP_V4_V6_HDR_DIFF 20 /* sizeof(ipv6hdr) - sizeof(iphdr) */

BPF_PERCPU_ARRAY(decap_stats, __u64, DECAP_N_STATS);
/* [0]: nonzero when the allow-list below is in force (it has entries). */
BPF_ARRAY(decap_config, __u32, 1);
BPF_HASH(decap_allow_v4, __u32, __u8, DECAP_ALLOW_MAX);
BPF_HASH(decap_allow_v6, struct decap_v6_key, __u8, DECAP_ALLOW_MAX);

static __always_inline int decap_allowlist_on(void)
{
	__u32 k = 0;
	__u32 *on = decap_config.lookup(&k);

	return on && *on;
}

static __always_inline int decap_dst_allowed_v4(__be32 daddr)
{
	__u32 key = daddr;

	if (!decap_allowlist_on())
		return 1;
	return decap_allow_v4.lookup(&key) != NULL;
}

static __always_inline int decap_dst_allowed_v6(const struct in6_addr *daddr)
{
	struct decap_v6_key key;

	if (!decap_allowlist_on())
		return 1;
	__builtin_memcpy(&key, daddr, sizeof(key));
	return decap_allow_v6.lookup(&key) != NULL;
}

static __always_inline void decap_count(__u32 idx)
{
	__u64 *c = decap_stats.lookup(&idx);

	if (c)
		*c += 1;
}

int decap_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct decap_plan plan = {};
	__u8 l2[DECAP_L2_MAX];
	int v;

	v = decap_parse(data, data_end, (__u64)(data_end - data), 1, &plan);
	if (v != DECAP_STRIP) {
		decap_count(plan.stat);
		return v == DECAP_DROP ? XDP_DROP : XDP_PASS;
	}
	/* A tunnel frame is longer than DECAP_L2_MAX, and so is what remains of it. */
	if (data + DECAP_L2_MAX > data_end || plan.outer_len > DECAP_MAX_OUTER)
		goto error;
	__builtin_memcpy(l2, data, DECAP_L2_MAX);
	if (bpf_xdp_adjust_head(ctx, (int)plan.outer_len))
		goto error;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + DECAP_L2_MAX > data_end)
		goto error; /* cannot happen: the inner IP header follows */
	/* The new L2 header ends where the inner packet starts; MACs and any VLAN tag are
	 * kept, the (innermost) ethertype names the inner family. */
	__builtin_memcpy(data, l2, 2 * ETH_ALEN);
	if (plan.l2_len == ETH_HLEN) {
		*(__be16 *)(data + 2 * ETH_ALEN) = plan.inner_proto;
	} else {
		__builtin_memcpy(data + 2 * ETH_ALEN, l2 + 2 * ETH_ALEN, VLAN_HLEN);
		*(__be16 *)(data + 2 * ETH_ALEN + VLAN_HLEN) = plan.inner_proto;
	}
	decap_count(plan.stat);
	return XDP_PASS;
error:
	decap_count(DECAP_STAT_DROPPED_ERROR);
	return XDP_DROP;
}

/* Removes plan->outer_len bytes after the MAC header and makes skb->protocol follow the
 * inner family. Returns 0 or a negative errno; on error the skb may be half-done and must
 * be dropped. */
static __always_inline int decap_tc_strip(struct __sk_buff *skb, const struct decap_plan *plan)
{
	__s32 olen = (__s32)plan->outer_len;
	int ret;

	if (plan->inner_v6 == plan->outer_v6)
		return bpf_skb_adjust_room(skb, -olen, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO);
#ifndef DECAP_TC_LEGACY
	ret = bpf_skb_adjust_room(skb, -olen, BPF_ADJ_ROOM_MAC,
				  BPF_F_ADJ_ROOM_FIXED_GSO |
				  (plan->inner_v6 ? DECAP_F_ADJ_ROOM_DECAP_L3_IPV6
						  : DECAP_F_ADJ_ROOM_DECAP_L3_IPV4));
	if (ret == 0)
		return 0;
	/* -EINVAL on kernels without the DECAP_L3 flags: fall through. The helper checks
	 * its flags before touching the packet. */
#endif
	/* bpf_skb_change_proto sets skb->protocol and converts the room after the MAC
	 * header between an IPv4 and an IPv6 header's size: IPv4 -> IPv6 inserts 20 bytes,
	 * IPv6 -> IPv4 removes 20. The rest of the outer headers goes with adjust_room. */
	if (plan->inner_v6) {
		ret = bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0);
		if (ret)
			return ret;
		olen += DECAP_V4_V6_HDR_DIFF;
	} else {
		ret = bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0);
		if (ret)
			return ret;
		olen -= DECAP_V4_V6_HDR_DIFF;
	}
	return bpf_skb_adjust_room(skb, -olen, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO);
}

int decap_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct decap_plan plan = {};
	__u32 len = skb->len;
	__u32 linear = (__u32)(data_end - data);
	int v;

	/* Headers of a non-linear skb may sit outside the direct-access window. */
	if (linear < len && linear < DECAP_PULL_LEN) {
		bpf_skb_pull_data(skb, len < DECAP_PULL_LEN ? len : DECAP_PULL_LEN);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	v = decap_parse(data, data_end, len, 0, &plan);
	if (v != DECAP_STRIP) {
		decap_count(plan.stat);
		return v == DECAP_DROP ? TC_ACT_SHOT : TC_ACT_OK;
	}
	if (decap_tc_strip(skb, &plan) ||
	    bpf_skb_store_bytes(skb, 2 * ETH_ALEN, &plan.inner_proto, sizeof(plan.inner_proto), 0)) {
		decap_count(DECAP_STAT_DROPPED_ERROR);
		return TC_ACT_SHOT;
	}
	decap_count(plan.stat);
	return TC_ACT_OK;
}
