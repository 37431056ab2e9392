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
 * Second chance (stateless VIPs, docs/datapath.md): a GUE packet with a hop list that
 * carries a TCP segment without SYN for which this host has no socket (established,
 * SYN-RECV or TIME-WAIT; a listener does not count) is not decapsulated but sent on to the
 * next hop in its list: outer destination rewritten, next_hop + 1, outer TTL - 1, outer
 * checksums updated incrementally, MACs swapped, out of the interface it came in on
 * (XDP_TX; tc: bpf_redirect to that device's egress). No hop left: delivered anyway (last
 * resort). lb/second_chance.py is the same decision in Python.
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
#include "csum.h"

enum decap_sc_verdict {
	DECAP_SC_DELIVER = 0, /* decapsulate as usual */
	DECAP_SC_FORWARD = 1, /* rewritten for the next hop: send back out */
	DECAP_SC_DROP = 2,
};

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

/* Sums ~old + new over n 16-bit words into *sum (RFC 1624 eqn. 3, several words). */
static __always_inline void decap_csum_diff(__u32 *sum, const __u16 *old, const __u16 *new, int n)
{
#pragma unroll
	for (int i = 0; i < n; i++)
		*sum += (__u16)~old[i] + new[i];
}

static __always_inline __u16 decap_csum_apply(__u16 check, __u32 sum)
{
	return lb_csum_fold(sum + (__u16)~check);
}

/* Rewrites a hop-list packet in place for its next hop (plan from decap_parse, with a hop
 * left). Returns DECAP_SC_FORWARD, or DECAP_SC_DROP with plan->stat set. */
static __always_inline int decap_forward(void *data, void *data_end, struct decap_plan *plan)
{
	__u32 l2_len = plan->l2_len;
	__u32 ip_len = plan->outer_ip_len;
	struct udphdr *u;
	struct decap_hoplist_hdr *hl;
	__u16 old_nh, new_nh;
	__u32 usum = 0;
	__u8 mac[ETH_ALEN];
	__u8 nh_word[2];
	__u8 nh;

	plan->stat = DECAP_STAT_DROPPED_ERROR;
	if (l2_len > DECAP_L2_MAX || ip_len > 60)
		return DECAP_SC_DROP; /* bounds for the verifier; cannot happen */
	u = data + l2_len + ip_len;
	hl = (void *)(u + 1) + sizeof(struct decap_gue_hdr);
	if ((void *)(hl + 1) > data_end)
		return DECAP_SC_DROP;
	nh = hl->next_hop;
	if (nh >= GUE_MAX_HOPS || nh != plan->next_hop)
		return DECAP_SC_DROP;
	/* The checksummed word holding next_hop: (next_hop, hop_count). */
	nh_word[0] = nh;
	nh_word[1] = hl->hop_count;
	__builtin_memcpy(&old_nh, nh_word, 2);
	nh_word[0] = nh + 1;
	__builtin_memcpy(&new_nh, nh_word, 2);
	decap_csum_diff(&usum, &old_nh, &new_nh, 1);
	if (plan->outer_v6) {
		struct ipv6hdr *ip6h = data + l2_len;
		__u16 *hop = (void *)(hl + 1) + nh * 16;

		if ((void *)(ip6h + 1) > data_end || (void *)(hop + 8) > data_end)
			return DECAP_SC_DROP;
		if (ip6h->hop_limit <= 1) {
			plan->stat = DECAP_STAT_HOPLIST_TTL_EXPIRED;
			return DECAP_SC_DROP;
		}
		decap_csum_diff(&usum, (__u16 *)&ip6h->daddr, hop, 8);
		__builtin_memcpy(&ip6h->daddr, hop, 16);
		ip6h->hop_limit--;
	} else {
		struct iphdr *iph = data + l2_len;
		__u16 *hop = (void *)(hl + 1) + nh * 4;
		__u32 isum = 0;
		__u16 old_ttl;

		if ((void *)(iph + 1) > data_end || (void *)(hop + 2) > data_end)
			return DECAP_SC_DROP;
		if (iph->ttl <= 1) {
			plan->stat = DECAP_STAT_HOPLIST_TTL_EXPIRED;
			return DECAP_SC_DROP;
		}
		decap_csum_diff(&usum, (__u16 *)&iph->daddr, hop, 2);
		decap_csum_diff(&isum, (__u16 *)&iph->daddr, hop, 2);
		old_ttl = *(__u16 *)&iph->ttl;
		iph->ttl--;
		decap_csum_diff(&isum, &old_ttl, (__u16 *)&iph->ttl, 1);
		iph->check = decap_csum_apply(iph->check, isum);
		__builtin_memcpy(&iph->daddr, hop, 4);
	}
	if ((void *)(u + 1) > data_end)
		return DECAP_SC_DROP;
	/* A zero UDP checksum means "none" (IPv4; RFC 6935 allows it for tunnels over
	 * IPv6) and stays so; a computed 0 goes out as 0xffff (RFC 768). */
	if (u->check) {
		u->check = decap_csum_apply(u->check, usum);
		if (!u->check)
			u->check = 0xffff;
	}
	hl->next_hop = nh + 1;
	/* Back to the router it came from. */
	if (data + ETH_HLEN > data_end)
		return DECAP_SC_DROP;
	__builtin_memcpy(mac, data, ETH_ALEN);
	__builtin_memcpy(data, data + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(data + ETH_ALEN, mac, ETH_ALEN);
	plan->stat = DECAP_STAT_HOPLIST_FORWARDED;
	return DECAP_SC_FORWARD;
}

/* The second-chance step for a hop-list packet decap_parse said to STRIP. ctx is the
 * program's context (xdp_md or __sk_buff): the socket lookup runs in its namespace.
 * Returns DECAP_SC_DELIVER (decapsulate, plan->stat set), DECAP_SC_FORWARD (rewritten in
 * place) or DECAP_SC_DROP. */
static __always_inline int decap_second_chance(void *ctx, void *data, void *data_end,
					       struct decap_plan *plan)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int local = 0;

	if (!decap_inner_tcp(data, data_end, plan, &tuple))
		return DECAP_SC_DELIVER; /* SYN, UDP, ...: this host's to take */
	if (plan->inner_v6)
		sk = bpf_skc_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_skc_lookup_tcp(ctx, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* Established (and the other connected states), a request socket
		 * (NEW_SYN_RECV) or TIME-WAIT: a connection of ours. A listener matches any
		 * 4-tuple to its port and is no connection. */
		local = sk->state != BPF_TCP_LISTEN;
		bpf_sk_release(sk);
	}
	if (local)
		return DECAP_SC_DELIVER;
	if (plan->next_hop >= plan->hop_count) {
		plan->stat = DECAP_STAT_HOPLIST_LAST_RESORT;
		return DECAP_SC_DELIVER;
	}
	return decap_forward(data, data_end, plan);
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
	if (plan.hoplist) {
		v = decap_second_chance(ctx, data, data_end, &plan);
		if (v != DECAP_SC_DELIVER) {
			decap_count(plan.stat);
			return v == DECAP_SC_FORWARD ? XDP_TX : XDP_DROP;
		}
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
	if (plan.hoplist) {
		v = decap_second_chance(skb, data, data_end, &plan);
		if (v != DECAP_SC_DELIVER) {
			decap_count(plan.stat);
			return v == DECAP_SC_FORWARD ? bpf_redirect(skb->ifindex, 0) : TC_ACT_SHOT;
		}
	}
	if (decap_tc_strip(skb, &plan) ||
	    bpf_skb_store_bytes(skb, 2 * ETH_ALEN, &plan.inner_proto, sizeof(plan.inner_proto), 0)) {
		decap_count(DECAP_STAT_DROPPED_ERROR);
		return TC_ACT_SHOT;
	}
	decap_count(plan.stat);
	return TC_ACT_OK;
}
