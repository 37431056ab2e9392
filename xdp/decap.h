/* Tunnel recognition for the real servers' decapsulation program (xdp/decap.c).
 *
 * One parser, shared by the XDP and the tc entry: it looks at a frame and answers
 * "strip <outer_len> bytes after the L2 header, the inner packet is IPv4/IPv6", "pass it
 * to the kernel untouched" or "drop it", and names the counter the frame bumps.
 *
 * Accepted (the outer header of each kind is what the balancer, or Katran, writes):
 *   IPv4 outer, protocol 4   IPv4-in-IPv4      (outer IPv4 options are allowed)
 *   IPv4 outer, protocol 41  IPv6-in-IPv4      (Katran sends it for v6 VIPs with v4 reals)
 *   IPv6 outer, next hdr 41  IPv6-in-IPv6
 *   IPv6 outer, next hdr 4   IPv4-in-IPv6
 *   IPv4/IPv6 outer, UDP to GUE_PORT:
 *     GUE variant 1 (first two payload bits 01): the inner IP header follows the UDP
 *       header directly; its version nibble (4/6) tells the family. Katran's GUE encap
 *       (GUE_ENCAP) writes exactly this: outer IP + UDP (checksum 0) + inner packet.
 *     GUE variant 0 (bits 00), data message (C = 0): 4-byte GUE header + Hlen * 4 bytes
 *       of optional fields, then the inner packet; Proto/ctype 4 or 41 picks the family.
 *       Optional fields that start with GUE_HOPLIST_TYPE are a stateless VIP's hop list
 *       (docs/datapath.md): checked here (bad ones are dropped), acted on by decap.c's
 *       second-chance step, to which decap_inner_tcp gives the inner TCP 4-tuple.
 *
 * Wire constants (ETH_P_*, IPPROTO_*, IP_MF, ...) and the counter indexes (DECAP_STAT_*)
 * come from lb/constants.py through xdp/generated/lb_shared.h; GUE_PORT is a -D flag
 * (lb.c_header.c_flags), Katran's GUE_DPORT by default.
 */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/tcp.h>

#include "generated/lb_shared.h"

/* Longest outer part we look through before the inner header: IPv4 with options (60) +
 * UDP (8) + GUE v0 header (4) + optional fields (31 * 4). */
#define DECAP_MAX_OUTER (60 + UDP_HLEN + 4 + 124)
/* Bytes the tc entry makes linear before parsing: VLAN-less L2 + outer + inner v6 hdr. */
#define DECAP_PULL_LEN (ETH_HLEN + DECAP_MAX_OUTER + 40)

#define DECAP_L2_MAX (ETH_HLEN + VLAN_HLEN) /* Ethernet + one 802.1Q / 802.1ad tag */

enum decap_verdict {
	DECAP_PASS = 0,  /* hand the frame to the kernel untouched */
	DECAP_DROP = 1,  /* malformed / unsupported tunnel packet */
	DECAP_STRIP = 2, /* remove plan.outer_len bytes after the L2 header */
};

struct decap_plan {
	__u32 stat;          /* DECAP_STAT_* counter this frame bumps */
	__u32 l2_len;        /* 14, or 18 with a VLAN tag */
	__u32 outer_len;     /* bytes between the L2 header and the inner IP header */
	__be16 inner_proto;  /* ethertype of the inner packet, network order */
	__u8 outer_v6;       /* outer header is IPv6 */
	__u8 inner_v6;       /* inner header is IPv6 */
	/* GUE v0 with a hop list (stateless VIP); the rest is only set when hoplist is. */
	__u8 hoplist;
	__u8 hop_count;      /* 1..GUE_MAX_HOPS */
	__u8 next_hop;       /* 0..hop_count */
	__u32 outer_ip_len;  /* outer IP header length: the UDP header follows */
};

/* An IPv6 address as an allow-list key. */
struct decap_v6_key {
	__u32 addr[4];
};

/* GUE variant 0 header (draft-ietf-intarea-gue): ver(2) C(1) hlen(5) | proto | flags. */
struct decap_gue_hdr {
	__u8 ver_c_hlen;
	__u8 proto;
	__be16 flags;
};

/* A hop list's fixed part: the first 4 bytes of the GUE optional fields; the addresses
 * (hop_count of them, the outer header's family) follow. */
struct decap_hoplist_hdr {
	__be16 type;         /* GUE_HOPLIST_TYPE */
	__u8 next_hop;
	__u8 hop_count;
};
_Static_assert(sizeof(struct decap_gue_hdr) == GUE_HLEN, "GUE header: decap.h != lb.constants");
_Static_assert(sizeof(struct decap_hoplist_hdr) == GUE_HOPLIST_HLEN,
	       "hop list header: decap.h != lb.constants");

/* Allow-list check, implemented by decap.c (maps live there). Returns nonzero if the
 * outer destination may be decapsulated. */
static __always_inline int decap_dst_allowed_v4(__be32 daddr);
static __always_inline int decap_dst_allowed_v6(const struct in6_addr *daddr);

/* Checks the inner packet that starts at `inner` (room = bytes the outer header says it
 * carries from there on) and fills in the family. */
static __always_inline int decap_check_inner(void *inner, void *data_end, __u32 room,
					     int want_v6, struct decap_plan *plan)
{
	if (want_v6) {
		struct ipv6hdr *ip6h = inner;

		if ((void *)(ip6h + 1) > data_end || room < sizeof(*ip6h))
			return DECAP_DROP;
		if (ip6h->version != 6)
			return DECAP_DROP;
		if ((__u32)bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h) > room)
			return DECAP_DROP;
		plan->inner_v6 = 1;
		plan->inner_proto = bpf_htons(ETH_P_IPV6);
	} else {
		struct iphdr *iph = inner;
		__u32 tot_len;

		if ((void *)(iph + 1) > data_end || room < sizeof(*iph))
			return DECAP_DROP;
		if (iph->version != 4 || iph->ihl < 5)
			return DECAP_DROP;
		tot_len = bpf_ntohs(iph->tot_len);
		if (tot_len < (__u32)iph->ihl * 4 || tot_len > room)
			return DECAP_DROP;
		plan->inner_v6 = 0;
		plan->inner_proto = bpf_htons(ETH_P_IP);
	}
	return DECAP_STRIP;
}

/* The hop list at `priv` (the GUE optional fields, priv_len bytes, which the caller
 * checked lie inside the frame's UDP payload). Not a hop list: plan untouched, STRIP.
 * A hop list: consistent -> plan->hoplist etc. set, STRIP; else DROP (counted). */
static __always_inline int decap_parse_hoplist(void *priv, void *data_end, __u32 priv_len,
					       int outer_v6, struct decap_plan *plan)
{
	struct decap_hoplist_hdr *hl = priv;
	__u32 addr_len = outer_v6 ? 16 : 4;

	if (priv_len < sizeof(hl->type) || (void *)(&hl->type + 1) > data_end ||
	    hl->type != bpf_htons(GUE_HOPLIST_TYPE))
		return DECAP_STRIP;
	plan->stat = DECAP_STAT_HOPLIST_MALFORMED;
	if (priv_len < sizeof(*hl) || (void *)(hl + 1) > data_end)
		return DECAP_DROP;
	if (hl->hop_count == 0 || hl->hop_count > GUE_MAX_HOPS || hl->next_hop > hl->hop_count ||
	    priv_len != sizeof(*hl) + hl->hop_count * addr_len)
		return DECAP_DROP;
	plan->hoplist = 1;
	plan->hop_count = hl->hop_count;
	plan->next_hop = hl->next_hop;
	plan->stat = DECAP_STAT_DROPPED_MALFORMED;
	return DECAP_STRIP;
}

/* For a frame decap_parse said to STRIP: if the (checked) inner packet is a TCP segment
 * without SYN whose header lies inside it -- the only packets the second-chance step
 * looks up a socket for -- fills *tuple (the 4-tuple as the packet has it, network order)
 * and returns 1. Fragments and IPv6 extension headers are left to the kernel (0). */
static __always_inline int decap_inner_tcp(void *data, void *data_end,
					   const struct decap_plan *plan,
					   struct bpf_sock_tuple *tuple)
{
	__u32 off = plan->l2_len + plan->outer_len;
	void *inner;
	struct tcphdr *th;

	if (off > DECAP_L2_MAX + DECAP_MAX_OUTER)
		return 0; /* bound for the verifier; cannot happen */
	inner = data + off;

	if (plan->inner_v6) {
		struct ipv6hdr *ip6h = inner;

		if ((void *)(ip6h + 1) > data_end || ip6h->nexthdr != IPPROTO_TCP ||
		    bpf_ntohs(ip6h->payload_len) < sizeof(*th))
			return 0;
		th = (void *)(ip6h + 1);
		if ((void *)(th + 1) > data_end || th->syn)
			return 0;
		__builtin_memcpy(tuple->ipv6.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(tuple->ipv6.daddr, &ip6h->daddr, 16);
		tuple->ipv6.sport = th->source;
		tuple->ipv6.dport = th->dest;
	} else {
		struct iphdr *iph = inner;
		__u32 ihl;

		if ((void *)(iph + 1) > data_end || iph->protocol != IPPROTO_TCP ||
		    (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET_MASK)))
			return 0;
		ihl = (__u32)iph->ihl * 4;
		if (bpf_ntohs(iph->tot_len) < ihl + sizeof(*th))
			return 0;
		th = inner + ihl;
		if ((void *)(th + 1) > data_end || th->syn)
			return 0;
		tuple->ipv4.saddr = iph->saddr;
		tuple->ipv4.daddr = iph->daddr;
		tuple->ipv4.sport = th->source;
		tuple->ipv4.dport = th->dest;
	}
	return 1;
}

/* GUE payload at `gue` (after the UDP header), `room` = UDP payload bytes. `*skip` gets
 * the GUE header length (0 for variant 1). */
static __always_inline int decap_parse_gue(void *gue, void *data_end, __u32 room,
					   struct decap_plan *plan, __u32 *skip, int *inner_v6)
{
	__u8 *first = gue;
	__u8 variant;

	if ((void *)(first + 1) > data_end || room < 1)
		return DECAP_DROP;
	variant = *first >> 6;
	if (variant == 1) {
		/* Direct IP: version nibble 4 (0100) or 6 (0110). */
		__u8 version = *first >> 4;

		if (version != 4 && version != 6) {
			plan->stat = DECAP_STAT_DROPPED_UNSUPPORTED;
			return DECAP_DROP;
		}
		*skip = 0;
		*inner_v6 = version == 6;
		return DECAP_STRIP;
	}
	if (variant == 0) {
		struct decap_gue_hdr *gh = gue;
		__u32 hlen;

		if ((void *)(gh + 1) > data_end || room < sizeof(*gh))
			return DECAP_DROP;
		if (gh->ver_c_hlen & 0x20) {
			/* Control message: nothing to hand to the stack. */
			plan->stat = DECAP_STAT_DROPPED_UNSUPPORTED;
			return DECAP_DROP;
		}
		hlen = sizeof(*gh) + (__u32)(gh->ver_c_hlen & 0x1f) * 4;
		if (hlen > room)
			return DECAP_DROP;
		if (gh->proto == IPPROTO_IPIP)
			*inner_v6 = 0;
		else if (gh->proto == IPPROTO_IPV6)
			*inner_v6 = 1;
		else {
			plan->stat = DECAP_STAT_DROPPED_UNSUPPORTED;
			return DECAP_DROP;
		}
		*skip = hlen;
		return DECAP_STRIP;
	}
	plan->stat = DECAP_STAT_DROPPED_UNSUPPORTED; /* variants 2, 3: reserved */
	return DECAP_DROP;
}

/* The parser. frame_len = the whole frame's length (may exceed data_end - data for a
 * non-linear skb; every header read is still checked against data_end). allow_vlan: the
 * frame may carry one 802.1Q/802.1ad tag (XDP); tc sees VLAN tags already stripped into
 * skb metadata, and a tagged frame there is passed. */
static __always_inline int decap_parse(void *data, void *data_end, __u64 frame_len,
				       int allow_vlan, struct decap_plan *plan)
{
	struct ethhdr *eth = data;
	void *l3;
	__be16 proto;
	__u32 l2_len = ETH_HLEN;
	__u32 l3_room;     /* bytes the outer IP header says the packet has */
	__u32 ip_hlen;     /* outer IP header length */
	__u8 l4proto;
	int outer_v6;
	int inner_v6 = 0;
	int gue = 0;
	__u32 gue_skip = 0;
	void *payload;     /* first byte after the outer IP header */
	__u32 payload_room;
	int v;

	plan->stat = DECAP_STAT_PASSED;
	if ((void *)(eth + 1) > data_end)
		return DECAP_PASS;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		__be16 *inner_type = (void *)(eth + 1) + 2;

		if (!allow_vlan)
			return DECAP_PASS;
		if ((void *)(inner_type + 1) > data_end)
			return DECAP_PASS;
		proto = *inner_type;
		l2_len = ETH_HLEN + VLAN_HLEN;
	}
	plan->l2_len = l2_len;
	l3 = data + l2_len;
	if (frame_len < l2_len)
		return DECAP_PASS;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = l3;
		__u32 tot_len;

		outer_v6 = 0;
		if ((void *)(iph + 1) > data_end)
			return DECAP_PASS;
		if (iph->version != 4 || iph->ihl < 5)
			return DECAP_PASS;
		l4proto = iph->protocol;
		if (l4proto != IPPROTO_IPIP && l4proto != IPPROTO_IPV6 &&
		    l4proto != IPPROTO_UDP)
			return DECAP_PASS;
		ip_hlen = (__u32)iph->ihl * 4;
		tot_len = bpf_ntohs(iph->tot_len);
		payload = l3 + ip_hlen;
		if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET_MASK)) {
			/* Not reassembled here. A GUE datagram is recognisable only in the
			 * first fragment. */
			if (l4proto != IPPROTO_UDP)
				plan->stat = DECAP_STAT_PASSED_FRAGMENT;
			else if (!(iph->frag_off & bpf_htons(IP_OFFSET_MASK))) {
				struct udphdr *u = payload;

				if ((void *)(u + 1) <= data_end && u->dest == bpf_htons(GUE_PORT))
					plan->stat = DECAP_STAT_PASSED_FRAGMENT;
			}
			return DECAP_PASS;
		}
		if (l4proto == IPPROTO_UDP) {
			struct udphdr *u = payload;

			if ((void *)(u + 1) > data_end || u->dest != bpf_htons(GUE_PORT))
				return DECAP_PASS;
		}
		if (!decap_dst_allowed_v4(iph->daddr)) {
			plan->stat = DECAP_STAT_PASSED_NOT_ALLOWED;
			return DECAP_PASS;
		}
		/* From here on it is a tunnel packet for us: broken means dropped. */
		plan->stat = DECAP_STAT_DROPPED_MALFORMED;
		if (tot_len < ip_hlen || (__u64)tot_len + l2_len > frame_len)
			return DECAP_DROP;
		l3_room = tot_len;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = l3;

		outer_v6 = 1;
		if ((void *)(ip6h + 1) > data_end)
			return DECAP_PASS;
		if (ip6h->version != 6)
			return DECAP_PASS;
		l4proto = ip6h->nexthdr;
		ip_hlen = sizeof(*ip6h);
		payload = l3 + ip_hlen;
		if (l4proto == IPPROTO_FRAGMENT) {
			__u8 *frag_next = payload;

			if ((void *)(frag_next + 1) <= data_end &&
			    (*frag_next == IPPROTO_IPIP || *frag_next == IPPROTO_IPV6 ||
			     *frag_next == IPPROTO_UDP))
				plan->stat = DECAP_STAT_PASSED_FRAGMENT;
			return DECAP_PASS;
		}
		if (l4proto != IPPROTO_IPIP && l4proto != IPPROTO_IPV6 &&
		    l4proto != IPPROTO_UDP)
			return DECAP_PASS;
		if (l4proto == IPPROTO_UDP) {
			struct udphdr *u = payload;

			if ((void *)(u + 1) > data_end || u->dest != bpf_htons(GUE_PORT))
				return DECAP_PASS;
		}
		if (!decap_dst_allowed_v6(&ip6h->daddr)) {
			plan->stat = DECAP_STAT_PASSED_NOT_ALLOWED;
			return DECAP_PASS;
		}
		plan->stat = DECAP_STAT_DROPPED_MALFORMED;
		l3_room = (__u32)bpf_ntohs(ip6h->payload_len) + ip_hlen;
		if (l3_room == ip_hlen || (__u64)l3_room + l2_len > frame_len)
			return DECAP_DROP; /* payload_len 0 (jumbogram) or truncated */
	} else {
		return DECAP_PASS;
	}

	payload_room = l3_room - ip_hlen;
	if (l4proto == IPPROTO_UDP) {
		struct udphdr *u = payload;
		__u32 ulen;

		if ((void *)(u + 1) > data_end)
			return DECAP_DROP;
		ulen = bpf_ntohs(u->len);
		if (ulen < sizeof(*u) || ulen > payload_room)
			return DECAP_DROP;
		v = decap_parse_gue(payload + sizeof(*u), data_end, ulen - sizeof(*u), plan,
				    &gue_skip, &inner_v6);
		if (v != DECAP_STRIP)
			return v;
		if (gue_skip > DECAP_MAX_OUTER) /* bound for the verifier; cannot happen */
			return DECAP_DROP;
		if (gue_skip > sizeof(struct decap_gue_hdr)) { /* variant 0 with optional fields */
			v = decap_parse_hoplist(payload + sizeof(*u) + sizeof(struct decap_gue_hdr),
						data_end, gue_skip - sizeof(struct decap_gue_hdr),
						outer_v6, plan);
			if (v != DECAP_STRIP)
				return v;
		}
		gue = 1;
		payload += sizeof(*u) + gue_skip;
		payload_room = ulen - sizeof(*u) - gue_skip;
		ip_hlen += sizeof(*u) + gue_skip;
	} else {
		inner_v6 = l4proto == IPPROTO_IPV6;
	}

	v = decap_check_inner(payload, data_end, payload_room, inner_v6, plan);
	if (v != DECAP_STRIP)
		return v;
	plan->outer_len = ip_hlen;
	plan->outer_v6 = outer_v6;
	if (plan->hoplist) {
		plan->outer_ip_len = ip_hlen - sizeof(struct udphdr) - gue_skip;
		plan->stat = DECAP_STAT_HOPLIST_DELIVERED;
	} else if (gue)
		plan->stat = DECAP_STAT_GUE;
	else if (!outer_v6)
		plan->stat = inner_v6 ? DECAP_STAT_V6_IN_V4 : DECAP_STAT_V4_IN_V4;
	else
		plan->stat = inner_v6 ? DECAP_STAT_V6_IN_V6 : DECAP_STAT_V4_IN_V6;
	return DECAP_STRIP;
}
