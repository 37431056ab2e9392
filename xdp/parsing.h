/* Header parsing, xdp-tools style: a cursor moves through the frame and every helper
 * checks its own bounds against data_end before touching a byte.
 *
 * Wire constants (ETH_P_*, IPPROTO_*, ...) come from lb/constants.py through the
 * generated header (xdp/generated/lb_shared.h).
 * Length checks are done twice on purpose: once against the IP packet's own length
 * (docs/datapath.md: "every L4 read must lie inside the packet") and once against
 * data_end, which is what the verifier understands.
 */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "generated/lb_shared.h"

#define IPV4_VERSION 4
#define IPV6_VERSION 6
#define IPV4_HLEN ((__u32)sizeof(struct iphdr))   /* IHL 5: options are dropped */
#define IPV6_HLEN ((__u32)sizeof(struct ipv6hdr))
#define ICMP_HLEN 8u                               /* type, code, checksum, 4 more */
#define L4_PORTS_LEN 4u                            /* sport, dport */

struct hdr_cursor {
	void *pos;
};

/* The 4 bytes of an 802.1Q tag after the outer ethertype. */
struct lb_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* Ethernet header with one 802.1Q tag, as written on output. */
struct lb_vlan_ethhdr {
	__u8 h_dest[ETH_ALEN];
	__u8 h_source[ETH_ALEN];
	__be16 tpid;
	__be16 tci;
	__be16 encap_proto;
};

/* The first 4 bytes of a TCP or UDP header. */
struct l4_ports {
	__be16 source;
	__be16 dest;
};

/* What the parsers learn about a frame; the orchestration in balancer.c fills the rest. */
struct pkt_desc {
	struct flow_key flow;   /* the packet's flow (for ICMP errors: the inner flow, swapped) */
	__u32 frame_len;        /* whole input frame, L2 header and padding included */
	__u32 l3_off;           /* ETH_HLEN or ETH_HLEN + VLAN_HLEN */
	__u32 pkt_len;          /* IP packet length from its own header */
	__u32 l4_off;           /* L4 header offset in the frame (l3_off + IP header) */
	__be16 vlan_tci;        /* valid when has_vlan */
	__u8 has_vlan;
	__u8 tos;               /* IPv4 TOS / IPv6 traffic class of the packet */
	__u8 icmp_err;          /* flow taken from an ICMP error's embedded header */
	__u8 tcp_syn;           /* TCP segment with SYN set: never served from conn_table */
	__u8 vip_found;         /* vip holds the VIP of (dst, dport, proto) (fast path) */
	__u8 df;                /* IPv4 "don't fragment" set (row 20 vs 21) */
	struct vip_meta vip;
	__u8 conn_ready;        /* conn_h and conn_set hold flow's set in the connection table */
	__u64 conn_h;           /* (computed early: the set's cache line is on its way while */
	__u32 conn_set;         /*  the rest of the packet is parsed) */
};

/* 2 bytes at p as one load (the packet is not strictly aligned). clang reads and writes
 * a field of a packed struct (struct ethhdr) a byte at a time, also through a cast; a
 * pointer passed as void * loses that. */
static __always_inline __u16 lb_load16(const void *p)
{
	return *(const __u16 *)p;
}

static __always_inline void lb_store16(void *p, __u16 v)
{
	*(__u16 *)p = v;
}

/* Ethernet plus at most one 802.1Q tag. Returns the ethertype of the payload (network
 * order) and sets pkt->l3_off, or -1 when the frame is too short for its L2 header. */
static __always_inline int parse_ethhdr_vlan(struct hdr_cursor *nh, void *data_end,
					     struct pkt_desc *pkt)
{
	struct ethhdr *eth = nh->pos;
	struct lb_vlan_hdr *vlh;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return -1;
	proto = lb_load16(&eth->h_proto);
	if (proto != bpf_htons(ETH_P_8021Q)) {
		pkt->l3_off = ETH_HLEN;
		nh->pos = eth + 1;
		return proto;
	}
	vlh = (void *)(eth + 1);
	if ((void *)(vlh + 1) > data_end)
		return -1;
	pkt->has_vlan = 1;
	pkt->vlan_tci = vlh->tci;
	pkt->l3_off = ETH_HLEN + VLAN_HLEN;
	nh->pos = vlh + 1;
	return vlh->encap_proto;
}

/* Row 3: the IPv4 header is sane. l3_len = bytes after the L2 header. */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end, __u32 l3_len,
				       struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	__u32 tot_len;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->version != IPV4_VERSION || iph->ihl < IPV4_HLEN / 4)
		return -1;
	tot_len = bpf_ntohs(iph->tot_len);
	if (tot_len < (__u32)iph->ihl * 4 || tot_len > l3_len)
		return -1;
	*iphdr = iph;
	nh->pos = iph + 1;
	return 0;
}

/* Row 4: the IPv6 header is sane. */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end, __u32 l3_len,
					struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return -1;
	if (ip6h->version != IPV6_VERSION)
		return -1;
	if ((__u32)bpf_ntohs(ip6h->payload_len) + IPV6_HLEN > l3_len)
		return -1;
	*ip6hdr = ip6h;
	nh->pos = ip6h + 1;
	return 0;
}

static __always_inline int ipv4_is_fragment(const struct iphdr *iph)
{
	return (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET_MASK)) != 0;
}

/* IPv6 traffic class: the 8 bits after the version nibble. */
static __always_inline __u8 ipv6_tclass(const struct ipv6hdr *ip6h)
{
	return (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
}

/* An L4 header of hdr_len bytes at the cursor, inside both the packet (l4_room = packet
 * bytes from the cursor on) and the frame. */
static __always_inline int l4_fits(struct hdr_cursor *nh, void *data_end, __u32 l4_room,
				   __u32 hdr_len)
{
	if (l4_room < hdr_len)
		return 0;
	if (nh->pos + hdr_len > data_end)
		return 0;
	return 1;
}

static __always_inline void flow_set_ports(struct flow_key *flow, const struct l4_ports *p)
{
	flow->sport = p->source;
	flow->dport = p->dest;
}

/* Row 12 for ICMPv4: the header embedded in a destination-unreachable message. icmp
 * points at the ICMP header, icmp_room = packet bytes from there on. On success the flow
 * is the embedded flow swapped (its destination is our client). */
static __always_inline int parse_icmp_inner_v4(void *icmp, void *data_end, __u32 icmp_room,
					       struct flow_key *flow)
{
	struct iphdr *inner = icmp + ICMP_HLEN;
	struct l4_ports *ports = (void *)(inner + 1);

	if (icmp_room < ICMP_HLEN + IPV4_HLEN + L4_PORTS_LEN)
		return -1;
	if ((void *)(ports + 1) > data_end)
		return -1;
	if (inner->version != IPV4_VERSION || inner->ihl != IPV4_HLEN / 4)
		return -1;
	flow->src.v4 = inner->daddr;
	flow->dst.v4 = inner->saddr;
	flow->sport = ports->dest;
	flow->dport = ports->source;
	flow->proto = inner->protocol;
	return 0;
}

/* Row 12 for ICMPv6: destination-unreachable and packet-too-big. */
static __always_inline int parse_icmp_inner_v6(void *icmp, void *data_end, __u32 icmp_room,
					       struct flow_key *flow)
{
	struct ipv6hdr *inner = icmp + ICMP_HLEN;
	struct l4_ports *ports = (void *)(inner + 1);

	if (icmp_room < ICMP_HLEN + IPV6_HLEN + L4_PORTS_LEN)
		return -1;
	if ((void *)(ports + 1) > data_end)
		return -1;
	if (inner->version != IPV6_VERSION)
		return -1;
	__builtin_memcpy(&flow->src, &inner->daddr, sizeof(flow->src));
	__builtin_memcpy(&flow->dst, &inner->saddr, sizeof(flow->dst));
	flow->sport = ports->dest;
	flow->dport = ports->source;
	flow->proto = inner->nexthdr;
	return 0;
}
