/* Encapsulation towards a real (docs/datapath.md, "Outputs"): IPv4-in-IPv4,
 * IPv4-in-IPv6 or IPv6-in-IPv6 with Katran's outer source addresses, or GUE (variant 1:
 * outer IP + UDP + the inner packet, any family in any family), XDP_TX. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "generated/lb_shared.h"
#include "parsing.h"
#include "csum.h"

/* Outer IPv4 source: 172.16.(c2 ^ (sport & 0xff)).(c3 ^ (sport >> 8)), with c2, c3 the
 * client address bytes 2 and 3 and sport the flow's host-order source port. */
static __always_inline __be32 encap_v4_src(const struct flow_key *flow)
{
	__u16 sport = bpf_ntohs(flow->sport);
	/* addresses in wire order, read as little-endian u32: byte i is bits 8i..8i+7 */
	__u32 c2 = (flow->src.v4 >> 16) & 0xff;
	__u32 c3 = flow->src.v4 >> 24;

	return (__u32)IPIP_V4_PREFIX0 | ((__u32)IPIP_V4_PREFIX1 << 8) |
	       ((c2 ^ (sport & 0xff)) << 16) | ((c3 ^ (sport >> 8)) << 24);
}

/* Outer IPv6 source: 01 00 00..00 s0^(sport>>8) s1^(sport&0xff) s2 s3, s0..s3 the
 * client's last 4 address bytes (an IPv4 client's whole address), sport the host-order
 * source port: in wire order that is the last 4 bytes XOR the port's two wire bytes,
 * written as four 4-byte words. */
static __always_inline void encap_v6_src(const struct flow_key *flow, struct in6_addr *out)
{
	/* the 4 address bytes in wire order, read as a little-endian u32 */
	__u32 last = flow->family == FAMILY_V4 ? flow->src.v4 : flow->src.v6[3];

	out->in6_u.u6_addr32[0] = IPIP_V6_PREFIX0 | (IPIP_V6_PREFIX1 << 8);
	out->in6_u.u6_addr32[1] = 0;
	out->in6_u.u6_addr32[2] = 0;
	out->in6_u.u6_addr32[3] = last ^ flow->sport;
}

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "header words are composed little-endian (x86-64, arm64)"
#endif

/* A MAC address as one 48-bit value (bytes in wire order, little-endian), read and
 * written as a 4-byte and a 2-byte access: clang copies the byte arrays of the packed
 * struct ethhdr one byte at a time. Packet and map value accesses may be unaligned here
 * (the verifier checks alignment strictly only on the stack, or where unaligned access
 * is slow: not on x86-64 or arm64). */
static __always_inline __u64 mac_load(const void *p)
{
	return (__u64)*(const __u32 *)p | ((__u64)*(const __u16 *)(p + 4) << 32);
}

static __always_inline void mac_store(void *p, __u64 mac)
{
	*(__u32 *)p = (__u32)mac;
	*(__u16 *)(p + 4) = mac >> 32;
}

/* Writes the output L2 header at data: dst_mac (the gateway's; for an ICMP reply the
 * input's source), src_mac (ours: the input's destination), the input's 802.1Q tag if
 * any, ethertype proto. Returns where the L3 header goes, or NULL. */
static __always_inline void *encap_write_l2(void *data, void *data_end,
					    const struct pkt_desc *pkt, __u64 dst_mac,
					    __u64 src_mac, __be16 proto)
{
	if (pkt->has_vlan) {
		struct lb_vlan_ethhdr *veth = data;

		if ((void *)(veth + 1) > data_end)
			return NULL;
		mac_store(veth->h_dest, dst_mac);
		mac_store(veth->h_source, src_mac);
		veth->tpid = bpf_htons(ETH_P_8021Q);
		veth->tci = pkt->vlan_tci;
		veth->encap_proto = proto;
		return veth + 1;
	} else {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return NULL;
		mac_store(eth->h_dest, dst_mac);
		mac_store(eth->h_source, src_mac);
		lb_store16(&eth->h_proto, proto);
		return eth + 1;
	}
}

/* Outer IPv4 header: 0x45, inner TOS, tot_len = inner + 20 + extra, id 0, no DF,
 * TTL 64, checksum, destination = real; IPIP: protocol 4 and Katran's source, GUE:
 * protocol UDP, extra = the UDP header, the configured source. Written as five 4-byte
 * words, the checksum summed from the same values (nothing is read back). l3 is 4-byte
 * aligned on the stack (hc_encap.c), or packet memory. */
static __always_inline int encap_write_ipv4(void *l3, void *data_end,
					    const struct pkt_desc *pkt, __be32 real_addr,
					    __be32 saddr, __u8 proto, __u32 extra)
{
	__u32 *w = l3;
	__u32 w0, w2, sum;

	if (l3 + IPV4_HLEN > data_end)
		return -1;
	/* version 4, IHL 5, TOS, total length (network order); then id 0 and frag_off 0 */
	w0 = (IPV4_VERSION << 4 | IPV4_HLEN / 4) | ((__u32)pkt->tos << 8) |
	     ((__u32)bpf_htons(pkt->pkt_len + ENCAP_IPV4_OVERHEAD + extra) << 16);
	w2 = DEFAULT_TTL | ((__u32)proto << 8); /* checksum 0 while summing */
	sum = (w0 & 0xffff) + (w0 >> 16) + w2 + (saddr & 0xffff) + (saddr >> 16) +
	      (real_addr & 0xffff) + (real_addr >> 16);
	w[0] = w0;
	w[1] = 0;
	w[2] = w2 | ((__u32)lb_csum_fold(sum) << 16);
	w[3] = saddr;
	w[4] = real_addr;
	return 0;
}

/* Outer IPv6 header: traffic class copied, flow label 0, hop limit 64. IPIP: payload =
 * inner packet, next header IPIP (IPv4 client) or IPV6, Katran's source; GUE: payload +
 * UDP header, next header UDP, source gue_src. */
static __always_inline int encap_write_ipv6(void *l3, void *data_end,
					    const struct pkt_desc *pkt,
					    const union lb_addr *real_addr, int gue,
					    const __u8 *gue_src)
{
	struct ipv6hdr *ip6h = l3;
	__u32 *w = l3;
	__u32 plen = pkt->pkt_len;
	__u8 next;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (gue) {
		const __u32 *src = (const __u32 *)gue_src; /* 4-byte aligned in ctl_value */

		plen += UDP_HLEN;
		next = IPPROTO_UDP;
		ip6h->saddr.in6_u.u6_addr32[0] = src[0];
		ip6h->saddr.in6_u.u6_addr32[1] = src[1];
		ip6h->saddr.in6_u.u6_addr32[2] = src[2];
		ip6h->saddr.in6_u.u6_addr32[3] = src[3];
	} else {
		next = pkt->flow.family == FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
		encap_v6_src(&pkt->flow, &ip6h->saddr);
	}
	/* version 6 | traffic class | flow label 0; payload length, next header, hop limit:
	 * two 4-byte words */
	w[0] = (IPV6_VERSION << 4 | pkt->tos >> 4) | ((__u32)(pkt->tos & 0x0f) << 12);
	w[1] = bpf_htons(plen) | ((__u32)next << 16) | ((__u32)DEFAULT_TTL << 24);
	__builtin_memcpy(&ip6h->daddr, real_addr, sizeof(ip6h->daddr));
	return 0;
}

/* GUE's UDP source port, Katran's (pckt_encap.h gue_encap_v4 / gue_encap_v6): the flow's
 * host-order source port P XORed with two client address bytes, in the byte order
 * Katran's u16 arithmetic leaves on the wire. c = the client address (for the IPv4 outer
 * header its first 4 bytes, an IPv6 client's too):
 *   IPv4 outer:               [(P & 0xff) ^ c2, (P >> 8) ^ c3]
 *   IPv6 outer, IPv4 client:  [(P >> 8) ^ c2, (P & 0xff) ^ c3]
 *   IPv6 outer, IPv6 client:  [(P >> 8) ^ c12, (P & 0xff) ^ c13]
 * Returned in network order. */
static __always_inline __be16 gue_sport(const struct flow_key *flow, int outer_v6)
{
	__u16 p = bpf_ntohs(flow->sport);
	const __u8 *c = flow->src.bytes;
	__u8 hi, lo;

	if (!outer_v6) {
		hi = (p & 0xff) ^ c[2];
		lo = (p >> 8) ^ c[3];
	} else if (flow->family == FAMILY_V4) {
		hi = (p >> 8) ^ c[2];
		lo = (p & 0xff) ^ c[3];
	} else {
		hi = (p >> 8) ^ c[12];
		lo = (p & 0xff) ^ c[13];
	}
	return bpf_htons(((__u16)hi << 8) | lo);
}

/* GUE's UDP header: Katran's source port, destination = the GUE port, length; the
 * checksum is gue_udp_csum()'s, written once the rest is in place. */
static __always_inline int encap_write_udp(void *l4, void *data_end,
					   const struct pkt_desc *pkt, __be16 gue_port, int outer_v6)
{
	struct udphdr *udp = l4;

	if ((void *)(udp + 1) > data_end)
		return -1;
	udp->source = gue_sport(&pkt->flow, outer_v6);
	udp->dest = gue_port;
	udp->len = bpf_htons(pkt->pkt_len + UDP_HLEN);
	udp->check = 0;
	return 0;
}

/* GUE's outer UDP checksum (docs/datapath.md), by Katran's method (csum_helpers.h
 * gue_csum_v4 / _v6 / _v4_in_v6): a valid inner TCP, UDP or ICMPv6 checksum makes the inner
 * L4 bytes sum to minus the inner pseudo header (an ICMPv4 message: to zero), so the sum
 * over outer pseudo header + UDP header (check 0) + inner packet is the outer pseudo header
 * + UDP header + inner IP header - inner pseudo header: no payload byte is read. It holds
 * as well for a packet whose inner checksum is filled in later (hc_encap.c, offload).
 * outer_addrs = the outer header's source and destination words, summed; udp = the UDP
 * header written so far; inner = the inner IP header (20 / 40 bytes readable);
 * no_csum = the inner packet is UDP over IPv4 with checksum 0: then 0 here too (nothing
 * to vouch for; Katran's value would be wrong). Unlike Katran: ICMPv4 inside (Katran
 * subtracts a pseudo header there too) and IPv6 in IPv4 (Katran reads the IPv6 header
 * as IPv4) are right, and a sum of zero is sent as 0xFFFF (RFC 768), not 0x0000.
 * Returns the checksum in network order. */
static __always_inline __be16 gue_udp_csum(__u32 outer_addrs, const struct udphdr *udp,
					   const void *inner, int inner_v6, int no_csum)
{
	__u32 sum = outer_addrs;
	__u16 c;

	if (no_csum)
		return 0;
	/* outer pseudo header: addresses, protocol, UDP length; then the UDP header */
	sum += bpf_htons(IPPROTO_UDP) + udp->len;
	sum += udp->source + udp->dest + udp->len;
	if (inner_v6) {
		const struct ipv6hdr *ip6h = inner;

		/* the inner header minus its pseudo header; the addresses and payload length are
		 * in both and cancel */
		sum += lb_csum_words(ip6h, 2);
		sum += *(const __u16 *)&ip6h->nexthdr; /* next header and hop limit */
		sum += (__u16)~bpf_htons(ip6h->nexthdr);
	} else {
		const struct iphdr *iph = inner;

		if (iph->protocol == IPPROTO_ICMP) {
			sum += lb_csum_words(iph, IPV4_HLEN / 2); /* no pseudo header */
		} else {
			/* the addresses are in both and cancel */
			sum += lb_csum_words(iph, 6);
			sum += (__u16)~bpf_htons(iph->protocol);
			sum += (__u16)~bpf_htons((__u16)(bpf_ntohs(iph->tot_len) - IPV4_HLEN));
		}
	}
	c = lb_csum_fold(sum);
	return c ? c : 0xffff;
}

/* GUE after the outer IP header at l3 (written): the UDP header, then its checksum over
 * the inner packet already in place behind it. */
static __always_inline int encap_write_gue(void *l3, void *data_end, const struct pkt_desc *pkt,
					   __be16 gue_port, int outer_v6)
{
	__u32 ip_len = outer_v6 ? ENCAP_IPV6_OVERHEAD : ENCAP_IPV4_OVERHEAD;
	struct udphdr *udp = l3 + ip_len;
	__u32 addrs;
	int no_csum = 0;

	if (encap_write_udp(udp, data_end, pkt, gue_port, outer_v6))
		return -1;
	if (outer_v6) {
		struct ipv6hdr *ip6h = l3;

		if ((void *)(ip6h + 1) > data_end)
			return -1;
		addrs = lb_csum_words(&ip6h->saddr, 16);
	} else {
		struct iphdr *iph = l3;

		if ((void *)(iph + 1) > data_end)
			return -1;
		addrs = lb_csum_words(&iph->saddr, 4);
	}
	if (pkt->flow.family == FAMILY_V6) {
		struct ipv6hdr *inner6 = (void *)(udp + 1);

		if ((void *)(inner6 + 1) > data_end)
			return -1;
		udp->check = gue_udp_csum(addrs, udp, inner6, 1, 0);
	} else {
		struct iphdr *inner4 = (void *)(udp + 1);
		struct udphdr *iu = (void *)(inner4 + 1);

		if ((void *)(inner4 + 1) > data_end)
			return -1;
		if (inner4->protocol == IPPROTO_UDP) {
			if ((void *)(iu + 1) > data_end)
				return -1;
			no_csum = !iu->check;
		}
		udp->check = gue_udp_csum(addrs, udp, inner4, 0, no_csum);
	}
	return 0;
}

/* Grows the frame at the front by the outer headers and writes L2 + outer IP (+ UDP
 * with GUE); the original packet (and any trailing padding) stays as it is behind
 * them. cfg is the ctl entry; real's fields are copied before the
 * packet moves. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct pkt_desc *pkt,
				       const struct real_def *real, const struct ctl_value *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u64 src_mac;
	__u8 real_family = real->family;
	union lb_addr real_addr = real->addr;
	int gue = cfg->encap == ENCAP_GUE;
	__u32 udp_len = gue ? UDP_HLEN : 0;
	__u32 ip_len;
	void *l3;

	if ((void *)(eth + 1) > data_end)
		return -1;
	src_mac = mac_load(eth->h_dest);

	ip_len = real_family == FAMILY_V4 ? ENCAP_IPV4_OVERHEAD : ENCAP_IPV6_OVERHEAD;
	if (bpf_xdp_adjust_head(ctx, -(int)(ip_len + udp_len)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;

	if (real_family == FAMILY_V4) {
		__be32 saddr;

		l3 = encap_write_l2(data, data_end, pkt, mac_load(cfg->gw_mac), src_mac,
				    bpf_htons(ETH_P_IP));
		if (!l3)
			return -1;
		if (gue)
			saddr = *(const __u32 *)cfg->gue_src_v4; /* 4-byte aligned in ctl_value */
		else
			saddr = encap_v4_src(&pkt->flow);
		if (encap_write_ipv4(l3, data_end, pkt, real_addr.v4, saddr,
				     gue ? IPPROTO_UDP : IPPROTO_IPIP, udp_len))
			return -1;
	} else {
		l3 = encap_write_l2(data, data_end, pkt, mac_load(cfg->gw_mac), src_mac,
				    bpf_htons(ETH_P_IPV6));
		if (!l3)
			return -1;
		if (encap_write_ipv6(l3, data_end, pkt, &real_addr, gue, cfg->gue_src_v6))
			return -1;
	}
	if (!gue)
		return 0;
	return encap_write_gue(l3, data_end, pkt, cfg->gue_port, real_family == FAMILY_V6);
}
