/* Health probes through the tunnel (Katran's healthchecking_ipip): a tc egress program,
 * clsact direct-action, on the balancer's interface.
 *
 * The prober (control/tunnel_probe.py) opens its probe socket with SO_MARK = HC_MARK_BASE
 * + real id and connects to the VIP address/port. Every packet of that socket leaves with
 * that mark; this program looks the mark up in hc_reals (mark -> struct real_def, written
 * by the prober) and encapsulates the packet towards that real exactly as balancer_xdp
 * would (xdp/encap.h), following the balancer's settings in hc_ctl (written by the prober
 * from settings.encap / settings.gue): IPIP (IPv4-in-IPv4, IPv4-in-IPv6, IPv6-in-IPv6) with
 * Katran's outer source derived from the packet's source address and port, or GUE (outer
 * IP from gue.source_v4/v6 + UDP to gue.port, Katran's source port from the client address
 * and port, the UDP checksum as the datapath computes it (from the headers: a probe whose
 * own checksum the NIC fills in later gets a right one too; none for a GSO packet); then
 * also IPv6-in-IPv4), outer TTL / hop limit DEFAULT_TTL, inner TOS copied.
 * The real decapsulates it and answers from the VIP straight to the balancer's address
 * (DSR): an ordinary reply for the connected socket, and the balancer's own XDP program
 * passes it (its destination is not a VIP address).
 *
 * L2: the stack has already resolved the next hop of the route to the VIP (the gateway,
 * on a one-armed balancer) and written its MAC as the destination; the outer packet goes
 * to the same gateway, which routes it to the real, so the Ethernet header is kept and
 * only its ethertype changes when the outer family differs (IPv4-in-IPv6, IPv6-in-IPv4).
 * This is the datapath's gateway_mac without reading the balancer's ctl map.
 *
 * Unmarked packets and marks that are not ours pass untouched; a mark in our range
 * without an entry is dropped (it would otherwise reach the VIP unencapsulated and be
 * load-balanced to any real: a probe must never test the wrong real), and so is an IPv6
 * probe for an IPv4 real with IPIP (the datapath cannot send it either).
 * Constants (HC_STAT_* included) come from lb/constants.py through
 * xdp/generated/lb_shared.h; HC_MARK_BASE and MAX_REALS are -D flags (lb.c_header.c_flags).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "generated/lb_shared.h"
#include "parsing.h"
#include "csum.h"
#include "encap.h"

BPF_HASH(hc_reals, __u32, struct real_def, MAX_REALS);
/* [0]: the balancer's settings as its own ctl entry (layout.CTL); only encap, gue_port and
 * gue_src_v4/v6 are read. All zero (never written) = IPIP. */
BPF_ARRAY(hc_ctl, struct ctl_value, 1);
BPF_PERCPU_ARRAY(hc_stats, __u64, HC_N_STATS);

static __always_inline void hc_stat(__u32 idx)
{
	__u64 *v = hc_stats.lookup(&idx);

	if (v)
		*v += 1;
}

/* The outer headers as written after the Ethernet header: IP, then UDP with GUE (IPIP
 * stores only the IP part). */
struct outer_v4 {
	struct iphdr ip;
	struct udphdr udp;
};

struct outer_v6 {
	struct ipv6hdr ip6;
	struct udphdr udp;
};

int hc_encap_tc(struct __sk_buff *skb)
{
	__u32 mark = skb->mark;
	struct real_def *r;
	struct real_def real;
	struct ctl_value cfg;
	struct ctl_value *c;
	struct pkt_desc pkt = {};
	__u32 zero = 0;
	__be16 outer_proto;
	__u32 udp_len;
	int gue;
	struct ethhdr eth;
	__be16 proto;
	__u64 flags;
	int olen;
	/* the probe's IP header, and whether its L4 checksum cannot vouch for its bytes */
	union {
		struct iphdr v4;
		struct ipv6hdr v6;
	} in = {};
	int no_csum = 0;

	if (mark < HC_MARK_BASE || mark >= HC_MARK_BASE + MAX_REALS) {
		hc_stat(HC_STAT_PASSED);
		return TC_ACT_OK;
	}
	r = hc_reals.lookup(&mark);
	if (!r || (r->family != FAMILY_V4 && r->family != FAMILY_V6)) {
		hc_stat(HC_STAT_DROP_NO_REAL);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(&real, r, sizeof(real));
	c = hc_ctl.lookup(&zero);
	if (!c)
		goto failed;
	__builtin_memcpy(&cfg, c, sizeof(cfg));

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		goto malformed;
	proto = eth.h_proto;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr iph;
		struct udphdr ports = {}; /* TCP: the ports; UDP: the whole header */

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0 || iph.version != 4 ||
		    iph.ihl < 5)
			goto malformed;
		if (iph.protocol == IPPROTO_TCP || iph.protocol == IPPROTO_UDP)
			if (bpf_skb_load_bytes(skb, ETH_HLEN + iph.ihl * 4, &ports,
					       sizeof(ports)) < 0)
				goto malformed;
		/* gue_udp_csum() knows TCP, UDP (0: no checksum) and ICMP, without options */
		no_csum = iph.ihl != 5 || (iph.protocol == IPPROTO_UDP && !ports.check) ||
			  (iph.protocol != IPPROTO_TCP && iph.protocol != IPPROTO_UDP &&
			   iph.protocol != IPPROTO_ICMP);
		in.v4 = iph;
		pkt.flow.family = FAMILY_V4;
		pkt.flow.src.v4 = iph.saddr;
		pkt.flow.dst.v4 = iph.daddr;
		pkt.flow.sport = ports.source;
		pkt.flow.dport = ports.dest;
		pkt.flow.proto = iph.protocol;
		pkt.tos = iph.tos;
		pkt.pkt_len = bpf_ntohs(iph.tot_len);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6h;
		struct l4_ports ports = {};

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6h, sizeof(ip6h)) < 0 || ip6h.version != 6)
			goto malformed;
		if (ip6h.nexthdr == IPPROTO_TCP || ip6h.nexthdr == IPPROTO_UDP)
			if (bpf_skb_load_bytes(skb, ETH_HLEN + IPV6_HLEN, &ports, sizeof(ports)) < 0)
				goto malformed;
		no_csum = ip6h.nexthdr != IPPROTO_TCP && ip6h.nexthdr != IPPROTO_UDP &&
			  ip6h.nexthdr != IPPROTO_ICMPV6;
		in.v6 = ip6h;
		pkt.flow.family = FAMILY_V6;
		__builtin_memcpy(&pkt.flow.src, &ip6h.saddr, 16);
		__builtin_memcpy(&pkt.flow.dst, &ip6h.daddr, 16);
		pkt.flow.sport = ports.source;
		pkt.flow.dport = ports.dest;
		pkt.flow.proto = ip6h.nexthdr;
		pkt.tos = ipv6_tclass(&ip6h);
		pkt.pkt_len = bpf_ntohs(ip6h.payload_len) + IPV6_HLEN;
	} else {
		hc_stat(HC_STAT_PASSED);  /* ARP, ...: not a probe packet */
		return TC_ACT_OK;
	}

	gue = cfg.encap == ENCAP_GUE;
	/* A GSO packet's segments would each need their own checksum: send them without */
	no_csum |= skb->gso_size != 0;
	if (real.family == FAMILY_V4 && pkt.flow.family == FAMILY_V6 && !gue) {
		/* IPv6 in IPv4 only with GUE, as in the datapath (docs/datapath.md row 16) */
		hc_stat(HC_STAT_DROP_NO_REAL);
		return TC_ACT_SHOT;
	}
	udp_len = gue ? UDP_HLEN : 0;
	flags = BPF_F_ADJ_ROOM_FIXED_GSO | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0);
	if (real.family == FAMILY_V4) {
		struct outer_v4 outer = {};
		__be32 saddr = encap_v4_src(&pkt.flow);

		if (gue)
			__builtin_memcpy(&saddr, cfg.gue_src_v4, sizeof(saddr));
		olen = ENCAP_IPV4_OVERHEAD + udp_len;
		outer_proto = bpf_htons(ETH_P_IP);
		if (bpf_skb_adjust_room(skb, olen, BPF_ADJ_ROOM_MAC, flags | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
			goto failed;
		if (encap_write_ipv4(&outer.ip, (void *)(&outer + 1), &pkt, real.addr.v4, saddr,
				     gue ? IPPROTO_UDP : IPPROTO_IPIP, udp_len))
			goto failed;
		if (gue) {
			if (encap_write_udp(&outer.udp, (void *)(&outer + 1), &pkt, cfg.gue_port, 0))
				goto failed;
			outer.udp.check = gue_udp_csum(lb_csum_words(&outer.ip.saddr, 4), &outer.udp,
						       &in, pkt.flow.family == FAMILY_V6, no_csum);
		}
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, olen, BPF_F_INVALIDATE_HASH))
			goto failed;
	} else {
		struct outer_v6 outer = {};

		olen = ENCAP_IPV6_OVERHEAD + udp_len;
		outer_proto = bpf_htons(ETH_P_IPV6);
		if (bpf_skb_adjust_room(skb, olen, BPF_ADJ_ROOM_MAC, flags | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
			goto failed;
		if (encap_write_ipv6(&outer.ip6, (void *)(&outer + 1), &pkt, &real.addr, gue,
				     cfg.gue_src_v6))
			goto failed;
		if (gue) {
			if (encap_write_udp(&outer.udp, (void *)(&outer + 1), &pkt, cfg.gue_port, 1))
				goto failed;
			outer.udp.check = gue_udp_csum(lb_csum_words(&outer.ip6.saddr, 16), &outer.udp,
						       &in, pkt.flow.family == FAMILY_V6, no_csum);
		}
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &outer, olen, BPF_F_INVALIDATE_HASH))
			goto failed;
	}
	/* adjust_room changed skb->protocol; the Ethernet header is ours to fix */
	if (proto != outer_proto &&
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &outer_proto, sizeof(outer_proto), 0))
		goto failed;
	hc_stat(real.family == FAMILY_V4 ? HC_STAT_ENCAP_V4 : HC_STAT_ENCAP_V6);
	return TC_ACT_OK;

malformed:
	hc_stat(HC_STAT_DROP_MALFORMED);
	return TC_ACT_SHOT;
failed:
	hc_stat(HC_STAT_DROP_FAILED);
	return TC_ACT_SHOT;
}
