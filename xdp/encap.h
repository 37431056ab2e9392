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
 * client's last 4 address bytes (an IPv4 client's whole address). */
static __always_inline void encap_v6_src(const struct flow_key *flow, struct in6_addr *out)
{
	__u16 sport = bpf_ntohs(flow->sport);
	/* the 4 address bytes in wire order, read as a little-endian u32 */
	__u32 last = flow->family == FAMILY_V4 ? flow->src.v4 : flow->src.v6[3];

	out->in6_u.u6_addr32[0] = 0;
	out->in6_u.u6_addr32[1] = 0;
	out->in6_u.u6_addr32[2] = 0;
	out->in6_u.u6_addr8[0] = IPIP_V6_PREFIX0;
	out->in6_u.u6_addr8[1] = IPIP_V6_PREFIX1;
	out->in6_u.u6_addr8[12] = (last & 0xff) ^ (sport >> 8);
	out->in6_u.u6_addr8[13] = ((last >> 8) & 0xff) ^ (sport & 0xff);
	out->in6_u.u6_addr8[14] = (last >> 16) & 0xff;
	out->in6_u.u6_addr8[15] = last >> 24;
}

/* Writes the output L2 header at data: dst_mac (the gateway's; for an ICMP reply the
 * input's source), src_mac (ours: the input's destination), the input's 802.1Q tag if
 * any, ethertype proto. Returns where the L3 header goes, or NULL. */
static __always_inline void *encap_write_l2(void *data, void *data_end,
					    const struct pkt_desc *pkt, const __u8 *dst_mac,
					    const __u8 *src_mac, __be16 proto)
{
	if (pkt->has_vlan) {
		struct lb_vlan_ethhdr *veth = data;

		if ((void *)(veth + 1) > data_end)
			return NULL;
		__builtin_memcpy(veth->h_dest, dst_mac, ETH_ALEN);
		__builtin_memcpy(veth->h_source, src_mac, ETH_ALEN);
		veth->tpid = bpf_htons(ETH_P_8021Q);
		veth->tci = pkt->vlan_tci;
		veth->encap_proto = proto;
		return veth + 1;
	} else {
		struct ethhdr *eth = data;

		if ((void *)(eth + 1) > data_end)
			return NULL;
		__builtin_memcpy(eth->h_dest, dst_mac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, src_mac, ETH_ALEN);
		eth->h_proto = proto;
		return eth + 1;
	}
}

/* Outer IPv4 header: 0x45, inner TOS, tot_len = inner + 20 + extra, id 0, no DF,
 * TTL 64, checksum, destination = real; IPIP: protocol 4 and Katran's source, GUE:
 * protocol UDP, extra = the UDP header, the configured source. */
static __always_inline int encap_write_ipv4(void *l3, void *data_end,
					    const struct pkt_desc *pkt, __be32 real_addr,
					    __be32 saddr, __u8 proto, __u32 extra)
{
	struct iphdr *iph = l3;

	if ((void *)(iph + 1) > data_end)
		return -1;
	iph->version = IPV4_VERSION;
	iph->ihl = IPV4_HLEN / 4;
	iph->tos = pkt->tos;
	iph->tot_len = bpf_htons(pkt->pkt_len + ENCAP_IPV4_OVERHEAD + extra);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = DEFAULT_TTL;
	iph->protocol = proto;
	iph->check = 0;
	iph->saddr = saddr;
	iph->daddr = real_addr;
	iph->check = lb_ipv4_csum(iph);
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

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	/* version (4 bits) | traffic class (8) | flow label (20) */
	ip6h->version = IPV6_VERSION;
	ip6h->priority = pkt->tos >> 4;
	ip6h->flow_lbl[0] = (pkt->tos & 0x0f) << 4;
	ip6h->flow_lbl[1] = 0;
	ip6h->flow_lbl[2] = 0;
	ip6h->hop_limit = DEFAULT_TTL;
	if (gue) {
		ip6h->payload_len = bpf_htons(pkt->pkt_len + UDP_HLEN);
		ip6h->nexthdr = IPPROTO_UDP;
		__builtin_memcpy(&ip6h->saddr, gue_src, sizeof(ip6h->saddr));
	} else {
		ip6h->payload_len = bpf_htons(pkt->pkt_len);
		ip6h->nexthdr = pkt->flow.family == FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;
		encap_v6_src(&pkt->flow, &ip6h->saddr);
	}
	__builtin_memcpy(&ip6h->daddr, real_addr, sizeof(ip6h->daddr));
	return 0;
}

/* GUE's UDP header: source port 0xC000 | ((a14 << 8 | a15) ^ sport) & 0x3FFF (a14, a15
 * the client address's last two bytes) so a real's NIC can spread tunnels over its
 * queues; destination = the GUE port; checksum 0 (RFC 6935). */
static __always_inline int encap_write_udp(void *l4, void *data_end,
					   const struct pkt_desc *pkt, __be16 gue_port)
{
	struct udphdr *udp = l4;
	__u16 sport = bpf_ntohs(pkt->flow.sport);
	/* the last 4 address bytes in wire order, read as a little-endian u32 */
	__u32 last = pkt->flow.family == FAMILY_V4 ? pkt->flow.src.v4 : pkt->flow.src.v6[3];
	__u16 tail = (((last >> 16) & 0xff) << 8) | (last >> 24);

	if ((void *)(udp + 1) > data_end)
		return -1;
	udp->source = bpf_htons(GUE_SPORT_BASE | ((tail ^ sport) & GUE_SPORT_MASK));
	udp->dest = gue_port;
	udp->len = bpf_htons(pkt->pkt_len + UDP_HLEN);
	udp->check = 0;
	return 0;
}

/* Grows the frame at the front by the outer headers and writes L2 + outer IP (+ UDP
 * with GUE); the original packet (and any trailing padding) stays as it is behind
 * them. cfg is a stack copy of the ctl entry; real's fields are copied before the
 * packet moves. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct pkt_desc *pkt,
				       const struct real_def *real, const struct ctl_value *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 src_mac[ETH_ALEN];
	__u8 real_family = real->family;
	union lb_addr real_addr = real->addr;
	int gue = cfg->encap == ENCAP_GUE;
	__u32 udp_len = gue ? UDP_HLEN : 0;
	__u32 ip_len;
	void *l3;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(src_mac, eth->h_dest, ETH_ALEN);

	ip_len = real_family == FAMILY_V4 ? ENCAP_IPV4_OVERHEAD : ENCAP_IPV6_OVERHEAD;
	if (bpf_xdp_adjust_head(ctx, -(int)(ip_len + udp_len)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;

	if (real_family == FAMILY_V4) {
		__be32 saddr;

		l3 = encap_write_l2(data, data_end, pkt, cfg->gw_mac, src_mac,
				    bpf_htons(ETH_P_IP));
		if (!l3)
			return -1;
		if (gue)
			__builtin_memcpy(&saddr, cfg->gue_src_v4, sizeof(saddr));
		else
			saddr = encap_v4_src(&pkt->flow);
		if (encap_write_ipv4(l3, data_end, pkt, real_addr.v4, saddr,
				     gue ? IPPROTO_UDP : IPPROTO_IPIP, udp_len))
			return -1;
	} else {
		l3 = encap_write_l2(data, data_end, pkt, cfg->gw_mac, src_mac,
				    bpf_htons(ETH_P_IPV6));
		if (!l3)
			return -1;
		if (encap_write_ipv6(l3, data_end, pkt, &real_addr, gue, cfg->gue_src_v6))
			return -1;
	}
	if (!gue)
		return 0;
	return encap_write_udp(l3 + ip_len, data_end, pkt, cfg->gue_port);
}
