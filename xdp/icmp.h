/* ICMP written by the balancer: echo replies in place (row 11) and "too big" replies
 * to packets that would not fit settings.mtu once encapsulated (row 20). ICMP errors
 * from outside are parsed in parsing.h and forwarded like the flow they belong to. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "parsing.h"
#include "csum.h"
#include "encap.h"

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Type (and code) live in the first 16-bit word of an ICMP/ICMPv6 header; the reply
 * changes only the type, so the checksum is updated incrementally (RFC 1624), to what a
 * full recomputation gives. ICMPv6 sums a pseudo header (never zero): eqn. 3. An ICMPv4
 * message can sum to zero: lb_csum_replace2_nz (0xFFFF, not 0x0000, for that sum). */
static __always_inline void icmp_set_type(void *icmp, __u8 type, int v4)
{
	__u16 *word = icmp;
	__u16 *check = icmp + 2;
	__u16 old = *word;

	*(__u8 *)icmp = type;
	*check = v4 ? lb_csum_replace2_nz(*check, old, *word)
		    : lb_csum_replace2(*check, old, *word);
}

/* Echo request -> echo reply, same length: MACs swapped (802.1Q tag kept), addresses
 * swapped, TTL 64, header checksum recomputed, type 0. The caller checked the bounds of
 * eth, the 20-byte iph and 8 bytes of icmp. */
static __always_inline void icmp4_echo_reply(struct ethhdr *eth, struct iphdr *iph,
					     void *icmp)
{
	__be32 tmp = iph->saddr;

	swap_macs(eth);
	iph->saddr = iph->daddr;
	iph->daddr = tmp;
	iph->ttl = DEFAULT_TTL;
	iph->check = 0;
	iph->check = lb_ipv4_csum(iph);
	icmp_set_type(icmp, ICMP_ECHO_REPLY, 1);
}

/* ICMPv6 echo request -> echo reply: MACs and addresses swapped, hop limit 64, type 129.
 * Swapping the addresses leaves the pseudo-header sum unchanged. */
static __always_inline void icmp6_echo_reply(struct ethhdr *eth, struct ipv6hdr *ip6h,
					     void *icmp)
{
	struct in6_addr tmp = ip6h->saddr;

	swap_macs(eth);
	ip6h->saddr = ip6h->daddr;
	ip6h->daddr = tmp;
	ip6h->hop_limit = DEFAULT_TTL;
	icmp_set_type(icmp, ICMPV6_ECHO_REPLY, 0);
}

/* Row 20 reply sizes: ICMP header + quote, summed by bpf_csum_diff (multiples of 4,
 * at most 512 bytes). */
#define TOO_BIG_V4_ICMP_LEN (ICMP_HLEN + ICMP_TOO_BIG_QUOTE_V4)
#define TOO_BIG_V6_ICMP_LEN (ICMP_HLEN + ICMP_TOO_BIG_QUOTE_V6)

/* The reply headers go in front of the packet (adjust_head), so the packet's own start
 * becomes the quote where it is; then the frame is cut after the quote (adjust_tail).
 * The caller checked pkt_len >= quote. Writes IPv4 + ICMP frag-needed with next-hop MTU
 * mtu_left, or IPv6 + ICMPv6 packet-too-big; MACs swapped, 802.1Q tag kept. */
static __always_inline int icmp_too_big(struct xdp_md *ctx, const struct pkt_desc *pkt,
					__u32 mtu_left)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u64 dst_mac, src_mac;
	int v4 = pkt->flow.family == FAMILY_V4;
	__u32 hdrs = v4 ? IPV4_HLEN + ICMP_HLEN : IPV6_HLEN + ICMP_HLEN;
	__u32 quote = v4 ? ICMP_TOO_BIG_QUOTE_V4 : ICMP_TOO_BIG_QUOTE_V6;
	void *l3;

	if ((void *)(eth + 1) > data_end)
		return -1;
	dst_mac = mac_load(eth->h_source);
	src_mac = mac_load(eth->h_dest);
	if (bpf_xdp_adjust_head(ctx, -(int)hdrs))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	l3 = encap_write_l2(data, data_end, pkt, dst_mac, src_mac,
			    bpf_htons(v4 ? ETH_P_IP : ETH_P_IPV6));
	if (!l3)
		return -1;
	if (v4) {
		struct iphdr *iph = l3;
		struct icmphdr *icmp = (void *)(iph + 1);

		if ((void *)icmp + TOO_BIG_V4_ICMP_LEN > data_end)
			return -1;
		iph->version = IPV4_VERSION;
		iph->ihl = IPV4_HLEN / 4;
		iph->tos = 0;
		iph->tot_len = bpf_htons(IPV4_HLEN + TOO_BIG_V4_ICMP_LEN);
		iph->id = 0;
		iph->frag_off = 0;
		iph->ttl = DEFAULT_TTL;
		iph->protocol = IPPROTO_ICMP;
		iph->check = 0;
		iph->saddr = pkt->flow.dst.v4;
		iph->daddr = pkt->flow.src.v4;
		iph->check = lb_ipv4_csum(iph);
		icmp->type = ICMP_DEST_UNREACH;
		icmp->code = ICMP_FRAG_NEEDED;
		icmp->checksum = 0;
		icmp->un.frag.__unused = 0;
		icmp->un.frag.mtu = bpf_htons(mtu_left);
		icmp->checksum = lb_csum_fold(bpf_csum_diff(NULL, 0, (void *)icmp,
							    TOO_BIG_V4_ICMP_LEN, 0));
	} else {
		struct ipv6hdr *ip6h = l3;
		struct icmp6hdr *icmp = (void *)(ip6h + 1);
		/* pseudo header after the addresses: upper-layer length, 3 zeros, next header */
		__be32 pseudo[2] = { bpf_htonl(TOO_BIG_V6_ICMP_LEN), bpf_htonl(IPPROTO_ICMPV6) };
		__u32 sum;

		if ((void *)icmp + TOO_BIG_V6_ICMP_LEN > data_end)
			return -1;
		ip6h->version = IPV6_VERSION;
		ip6h->priority = 0;
		ip6h->flow_lbl[0] = 0;
		ip6h->flow_lbl[1] = 0;
		ip6h->flow_lbl[2] = 0;
		ip6h->payload_len = bpf_htons(TOO_BIG_V6_ICMP_LEN);
		ip6h->nexthdr = IPPROTO_ICMPV6;
		ip6h->hop_limit = DEFAULT_TTL;
		__builtin_memcpy(&ip6h->saddr, &pkt->flow.dst, sizeof(ip6h->saddr));
		__builtin_memcpy(&ip6h->daddr, &pkt->flow.src, sizeof(ip6h->daddr));
		icmp->icmp6_type = ICMPV6_PKT_TOOBIG;
		icmp->icmp6_code = 0;
		icmp->icmp6_cksum = 0;
		icmp->icmp6_mtu = bpf_htonl(mtu_left);
		sum = bpf_csum_diff(NULL, 0, (void *)&ip6h->saddr, 2 * sizeof(ip6h->saddr), 0);
		sum = bpf_csum_diff(NULL, 0, pseudo, sizeof(pseudo), sum);
		sum = bpf_csum_diff(NULL, 0, (void *)icmp, TOO_BIG_V6_ICMP_LEN, sum);
		icmp->icmp6_cksum = lb_csum_fold(sum);
	}
	/* the frame (now frame_len + hdrs long) ends after the quote: L2 + hdrs + quote */
	return bpf_xdp_adjust_tail(ctx, (int)(pkt->l3_off + quote) - (int)pkt->frame_len);
}
