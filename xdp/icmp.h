/* ICMP handling at a VIP address: echo replies written in place (row 11). ICMP errors
 * are parsed in parsing.h and forwarded like the flow they belong to. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "parsing.h"
#include "csum.h"

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Type (and code) live in the first 16-bit word of an ICMP/ICMPv6 header; the reply
 * changes only the type, so the checksum is updated incrementally (RFC 1624). */
static __always_inline void icmp_set_type(void *icmp, __u8 type)
{
	__u16 *word = icmp;
	__u16 *check = icmp + 2;
	__u16 old = *word;

	*(__u8 *)icmp = type;
	*check = lb_csum_replace2(*check, old, *word);
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
	icmp_set_type(icmp, LB_ICMP_ECHO_REPLY);
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
	icmp_set_type(icmp, LB_ICMPV6_ECHO_REPLY);
}
