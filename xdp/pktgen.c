/* Traffic generator: an XDP program run by BPF_PROG_TEST_RUN in live-frames mode
 * (BPF_F_TEST_XDP_LIVE_FRAMES). lb/pktgen.py loads it with bcc.
 *
 * Live-frames mode recycles its page-pool frames without restoring what a program wrote
 * into them (only the data/data_end pointers are reset), so every run rewrites the
 * template's bytes into the frame before it varies the flow. Bytes past the template
 * (payload) keep what data_in held when the page was first set up; programs under test
 * that only rewrite or push headers leave them alone.
 *
 * Per frame:
 *   1. seq = this CPU's frame counter (pktgen_seq[0]), flow = seq % flows;
 *   2. copy tmpl.copy_len bytes (64..128, >= the headers) of the template into the frame;
 *   3. flow != 0: source port += flow and/or the low 32 bits of the source address +=
 *      flow, with the IPv4 header checksum and the TCP/UDP checksum updated
 *      incrementally (RFC 1624) from the template's (correct) values;
 *   4. action: XDP_TX (live frames: out of ingress_ifindex, i.e. to the veth peer),
 *      tail call into pktgen_next[0] (the program under test), or XDP_DROP (measures the
 *      generator alone).
 *
 * Fixed layout: Ethernet (no VLAN) + IPv4 without options or IPv6 without extension
 * headers + TCP or UDP; lb/pktgen.py checks the template before it writes it.
 *
 * pktgen_tx_stub is the "no-balancer" program under test: what the balancer's output
 * stage does to a frame it sends (Ethernet source = the frame's destination MAC,
 * destination = the configured gateway MAC, one per-CPU counter, XDP_TX), nothing else.
 */
#include <uapi/linux/bpf.h>
#include <linux/types.h>

/* PKTGEN_* (sizes, vary bits, actions, counter slots) and the wire constants. */
#include "generated/lb_shared.h"

struct pktgen_tmpl {
	__u8 data[PKTGEN_TMPL_MAX]; /* the frame's first copy_len bytes */
	__u32 copy_len; /* 64..128: bytes rewritten into every frame */
	__u32 flows; /* N >= 1 */
	__u8 family; /* FAMILY_V4 or FAMILY_V6 */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 vary; /* PKTGEN_VARY_* */
	__u8 action; /* PKTGEN_ACT_* */
	__u8 l4_csum; /* 1: keep the TCP/UDP checksum right (0: UDP over IPv4, checksum 0) */
	__u8 pad[3];
};

struct tx_stub_cfg {
	__u8 gw_mac[6];
	__u8 pad[2];
};

BPF_ARRAY(pktgen_tmpl, struct pktgen_tmpl, 1);
BPF_PERCPU_ARRAY(pktgen_seq, __u64, PKTGEN_N_STATS);
BPF_PROG_ARRAY(pktgen_next, 1);

BPF_ARRAY(tx_stub_cfg, struct tx_stub_cfg, 1);
BPF_PERCPU_ARRAY(tx_stub_count, __u64, 1);

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* RFC 1624 eqn. 3 over several words: HC' = ~(~HC + sum(~m_i + m'_i)). delta already
 * holds sum(~m_i + m'_i) of 16-bit words as they lie in memory. */
static __always_inline __u16 csum_apply(__u16 check, __u32 delta)
{
	return csum_fold((__u16)~check + delta);
}

static __always_inline __u32 csum_delta32(__u32 old, __u32 new)
{
	return (__u16)~(old & 0xffff) + (__u16)~(old >> 16) + (new & 0xffff) + (new >> 16);
}

int pktgen_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0, miss = PKTGEN_STAT_TAIL_MISSED;
	struct pktgen_tmpl *t = pktgen_tmpl.lookup(&zero);
	__u64 *seqp = pktgen_seq.lookup(&zero);
	__u32 clen, flows, flow, l4_delta = 0;
	__u64 seq;

	if (!t || !seqp)
		return XDP_ABORTED;
	seq = *seqp;
	*seqp = seq + 1;

	if (data + PKTGEN_MIN_FRAME > data_end)
		return XDP_ABORTED;

	/* 2. the template, 8 bytes at a time, then one (overlapping) word ending at clen */
	clen = t->copy_len;
#pragma unroll
	for (int i = 0; i < PKTGEN_TMPL_MAX / 8; i++) {
		if (i * 8 + 8 > clen || data + i * 8 + 8 > data_end)
			break;
		*(__u64 *)(data + i * 8) = *(__u64 *)(t->data + i * 8);
	}
	if (clen & 7) {
		__u32 off = (clen - 8) & 0x7f;
		void *p;

		if (off > PKTGEN_TMPL_MAX - 8)
			off = PKTGEN_TMPL_MAX - 8;
		p = data + off;
		if (p + 8 > data_end)
			return XDP_ABORTED;
		*(__u64 *)p = *(__u64 *)(t->data + off);
	}

	/* 3. the flow */
	flows = t->flows ? t->flows : 1;
	flow = seq % flows;
	if (!flow)
		goto out;

	if (t->family == FAMILY_V4) {
		__u8 *l3 = data + ETH_HLEN;
		__u8 *l4 = l3 + 20;
		__u16 *csum;

		if (t->vary & PKTGEN_VARY_ADDR) {
			__u32 *sa = (__u32 *)(l3 + 12);
			__u32 old = *sa, new = bpf_htonl(bpf_ntohl(old) + flow);
			__u32 d = csum_delta32(old, new);
			__u16 *ipc = (__u16 *)(l3 + 10);

			*sa = new;
			*ipc = csum_apply(*ipc, d);
			l4_delta += d;
		}
		if (t->vary & PKTGEN_VARY_PORT) {
			__u16 *sp = (__u16 *)l4;
			__u16 old = *sp, new = bpf_htons(bpf_ntohs(old) + flow);

			*sp = new;
			l4_delta += (__u16)~old + new;
		}
		if (!t->l4_csum)
			goto out;
		if (t->proto == IPPROTO_TCP) {
			csum = (__u16 *)(l4 + 16); /* 50..51 < 64 */
			*csum = csum_apply(*csum, l4_delta);
		} else {
			csum = (__u16 *)(l4 + 6);
			*csum = csum_apply(*csum, l4_delta) ?: 0xffff;
		}
	} else {
		__u8 *l3 = data + ETH_HLEN;
		__u8 *l4 = l3 + 40;
		__u16 *csum;

		if (t->vary & PKTGEN_VARY_ADDR) {
			__u32 *sa = (__u32 *)(l3 + 8 + 12); /* low word of the source */
			__u32 old = *sa, new = bpf_htonl(bpf_ntohl(old) + flow);

			*sa = new;
			l4_delta += csum_delta32(old, new);
		}
		if (t->vary & PKTGEN_VARY_PORT) {
			__u16 *sp = (__u16 *)l4;
			__u16 old = *sp, new = bpf_htons(bpf_ntohs(old) + flow);

			*sp = new;
			l4_delta += (__u16)~old + new;
		}
		if (t->proto == IPPROTO_TCP) {
			if ((void *)(l4 + 20) > data_end)
				return XDP_ABORTED;
			csum = (__u16 *)(l4 + 16);
			*csum = csum_apply(*csum, l4_delta);
		} else {
			csum = (__u16 *)(l4 + 6); /* 60..61 < 64 */
			*csum = csum_apply(*csum, l4_delta) ?: 0xffff;
		}
	}

out:
	/* 4. where the frame goes */
	if (t->action == PKTGEN_ACT_TAIL) {
		pktgen_next.call(ctx, 0);
		seqp = pktgen_seq.lookup(&miss);
		if (seqp)
			*seqp += 1;
		return XDP_DROP;
	}
	if (t->action == PKTGEN_ACT_DROP)
		return XDP_DROP;
	return XDP_TX;
}

int pktgen_tx_stub(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct tx_stub_cfg *cfg = tx_stub_cfg.lookup(&zero);
	__u64 *cnt = tx_stub_count.lookup(&zero);
	__u8 *eth = data;

	if (!cfg || !cnt || data + ETH_HLEN > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(eth + 6, eth, 6); /* source = the MAC the frame came to */
	__builtin_memcpy(eth, cfg->gw_mac, 6);
	*cnt += 1;
	return XDP_TX;
}
