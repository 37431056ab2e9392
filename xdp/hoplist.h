/* Stateless VIPs (docs/datapath.md, "Stateless VIPs"): GUE variant 0 whose private data
 * is a hop list, [type][next_hop][hop_count][hops...], so a real that has no connection
 * for a TCP segment can pass it to the real a previous ring chose (the reals' second
 * chance, xdp/decap.h). The balancer sends a list only when it has two or more distinct
 * reals for the flow; otherwise the packet is encapsulated as for any VIP (encap.h). */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "generated/lb_shared.h"
#include "parsing.h"
#include "csum.h"
#include "encap.h"

/* The reals of a flow: hop[0] the ring's, then the previous rings' (newest first),
 * distinct, all of the outer header's family. */
struct hop_list {
	union lb_addr hop[GUE_MAX_HOPS];
	__u32 count;
};

/* Bytes of the GUE header and the hop list (the UDP header not included). */
static __always_inline __u32 hoplist_bytes(__u32 count, __u8 family)
{
	return GUE_HLEN + GUE_HOPLIST_HLEN + count * (family == FAMILY_V4 ? 4 : 16);
}

/* The inner packet's part of the outer UDP checksum, read before the frame grows: the sum
 * of its IP header plus the negated pseudo-header sum of its TCP segment (a segment with a
 * valid checksum sums to exactly that), so the payload is never read. An unfolded sum of
 * 16-bit words as loaded (the one's-complement sum is byte-order independent). */
static __always_inline int hoplist_inner_sum(struct xdp_md *ctx, const struct pkt_desc *pkt,
					     __u32 *sum)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = pkt->l3_off, s = 0, ps = 0;
	const __u16 *w;
	int i;

	if (off > ETH_HLEN + VLAN_HLEN) /* always false; bounds the offset for the verifier */
		return -1;
	w = data + off;
	/* a TCP packet is at least 40 bytes in either family */
	if ((void *)w + IPV6_HLEN > data_end)
		return -1;
	if (pkt->flow.family == FAMILY_V4) {
#pragma unroll
		for (i = 0; i < IPV4_HLEN / 2; i++)
			s += w[i];
#pragma unroll
		for (i = 6; i < 10; i++) /* source and destination */
			ps += w[i];
		ps += bpf_htons(IPPROTO_TCP) + bpf_htons(pkt->pkt_len - IPV4_HLEN);
	} else {
#pragma unroll
		for (i = 0; i < IPV6_HLEN / 2; i++)
			s += w[i];
#pragma unroll
		for (i = 4; i < 20; i++)
			ps += w[i];
		ps += bpf_htons(pkt->pkt_len - IPV6_HLEN) + bpf_htons(IPPROTO_TCP);
	}
	*sum = s + lb_csum_fold(ps); /* lb_csum_fold is the negated (inverted) sum */
	return 0;
}

/* GUE base header and the hop list's fixed part at g (8 bytes); returns their word sum. */
static __always_inline __u32 hoplist_write_head(__u8 *g, __u32 count, __u8 family,
						__u8 inner_family)
{
	const __u16 *w = (const __u16 *)g;

	g[0] = (hoplist_bytes(count, family) - GUE_HLEN) / 4; /* ver 0, C 0, hlen */
	g[1] = inner_family == FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	g[2] = 0;
	g[3] = 0;
	g[4] = GUE_HOPLIST_TYPE >> 8;
	g[5] = GUE_HOPLIST_TYPE & 0xff;
	g[6] = 1; /* next_hop: the real after hops[0], which gets this packet */
	g[7] = count;
	return (__u32)w[0] + w[1] + w[2] + w[3];
}

/* Grows the frame by outer IP + UDP + GUE + hop list towards hl->hop[0] (the real, whose
 * entry is *real) and writes them; the outer UDP checksum is filled (inner_sum from
 * hoplist_inner_sum). cfg is the ctl entry. */
static __always_inline int encapsulate_hoplist(struct xdp_md *ctx, const struct pkt_desc *pkt,
					       const struct real_def *real,
					       const struct ctl_value *cfg,
					       const struct hop_list *hl, __u32 inner_sum)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u64 src_mac;
	__u8 family = real->family;
	union lb_addr real_addr = real->addr;
	__u32 n = hl->count, glen, ulen, sum = inner_sum;
	struct udphdr *udp;
	const __u16 *w;
	__u8 *g;
	void *l3;
	int i;

	if (n < 2 || n > GUE_MAX_HOPS)
		return -1;
	glen = hoplist_bytes(n, family);
	ulen = pkt->pkt_len + UDP_HLEN + glen;
	if ((void *)(eth + 1) > data_end)
		return -1;
	src_mac = mac_load(eth->h_dest);
	if (bpf_xdp_adjust_head(ctx, -(int)((family == FAMILY_V4 ? ENCAP_IPV4_OVERHEAD
								   : ENCAP_IPV6_OVERHEAD) +
					     UDP_HLEN + glen)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;

	if (family == FAMILY_V4) {
		__be32 saddr;

		l3 = encap_write_l2(data, data_end, pkt, mac_load(cfg->gw_mac), src_mac,
				    bpf_htons(ETH_P_IP));
		if (!l3)
			return -1;
		saddr = *(const __u32 *)cfg->gue_src_v4; /* 4-byte aligned in ctl_value */
		if (encap_write_ipv4(l3, data_end, pkt, real_addr.v4, saddr, IPPROTO_UDP,
				     UDP_HLEN + glen))
			return -1;
		w = l3 + 12; /* pseudo header: source, destination */
		if ((void *)(w + 4) > data_end)
			return -1;
#pragma unroll
		for (i = 0; i < 4; i++)
			sum += w[i];
		udp = l3 + ENCAP_IPV4_OVERHEAD;
	} else {
		struct ipv6hdr *ip6h;

		l3 = encap_write_l2(data, data_end, pkt, mac_load(cfg->gw_mac), src_mac,
				    bpf_htons(ETH_P_IPV6));
		if (!l3)
			return -1;
		if (encap_write_ipv6(l3, data_end, pkt, &real_addr, 1, cfg->gue_src_v6))
			return -1;
		ip6h = l3;
		if ((void *)(ip6h + 1) > data_end)
			return -1;
		ip6h->payload_len = bpf_htons(ulen);
		w = (const __u16 *)&ip6h->saddr;
#pragma unroll
		for (i = 0; i < 16; i++)
			sum += w[i];
		udp = l3 + ENCAP_IPV6_OVERHEAD;
	}
	if (encap_write_udp(udp, data_end, pkt, cfg->gue_port, family == FAMILY_V6))
		return -1;
	if ((void *)(udp + 1) > data_end)
		return -1;
	udp->len = bpf_htons(ulen);
	udp->check = 0;
	/* pseudo header's protocol and length, then the UDP header */
	sum += bpf_htons(IPPROTO_UDP) + udp->len + udp->source + udp->dest + udp->len;

	g = (__u8 *)(udp + 1);
	if ((void *)(g + GUE_HLEN + GUE_HOPLIST_HLEN) > data_end)
		return -1;
	sum += hoplist_write_head(g, n, family, pkt->flow.family);
	g += GUE_HLEN + GUE_HOPLIST_HLEN;
	if (family == FAMILY_V4) {
#pragma unroll
		for (i = 0; i < GUE_MAX_HOPS; i++) {
			__u8 *h = g + i * 4;

			if (i >= n)
				break;
			if ((void *)(h + 4) > data_end)
				return -1;
			__builtin_memcpy(h, &hl->hop[i].v4, 4);
			w = (const __u16 *)h;
			sum += (__u32)w[0] + w[1];
		}
	} else {
#pragma unroll
		for (i = 0; i < GUE_MAX_HOPS; i++) {
			__u8 *h = g + i * 16;
			int j;

			if (i >= n)
				break;
			if ((void *)(h + 16) > data_end)
				return -1;
			__builtin_memcpy(h, hl->hop[i].bytes, 16);
			w = (const __u16 *)h;
#pragma unroll
			for (j = 0; j < 8; j++)
				sum += w[j];
		}
	}
	udp->check = lb_csum_fold(sum);
	if (!udp->check)
		udp->check = 0xffff; /* 0 would mean "no checksum" */
	return 0;
}
