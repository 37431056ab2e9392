/* XDP L4 load balancer, Katran-compatible. Implements docs/datapath.md row by row.
 *
 * This file orchestrates: parsing, checksums, hashing, encapsulation and ICMP live in
 * their headers; every map access is here because bcc rewrites map method calls only
 * in the main file. Every frame ends in exactly one outcome counter (single exit in
 * balancer_xdp). Constants, struct layouts and default sizes come from lb/constants.py
 * and lb/layout.py through xdp/generated/lb_shared.h; per-instance sizes are -D flags.
 */
#include <uapi/linux/bpf.h>

#include "generated/lb_shared.h"
#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "jhash.h"
#include "encap.h"
#include "icmp.h"
#include "quic.h"
#include "lookup.h"
#include "hoplist.h"

/* Benchmark only (bench/xdp_compare.py, part t): -DLB_STOP_AFTER_STAGE=n ends every frame
 * that gets that far with XDP_TX right after stage n (1 parsing, without the VIP lookups;
 * 2 VIP lookup; 3 connection table; 4 Maglev ring), so the cost of a stage is the
 * difference between two variants. Built without it, these expand to nothing. */
#ifdef LB_STOP_AFTER_STAGE
#define LB_STOP_AFTER(n)                            \
	do {                                        \
		if (LB_STOP_AFTER_STAGE == (n)) {   \
			*stat = STAT_TX_ENCAP;      \
			return XDP_TX;              \
		}                                   \
	} while (0)
#define LB_SKIP_VIP_LOOKUP (LB_STOP_AFTER_STAGE == 1)
#else
#define LB_STOP_AFTER(n) do { } while (0)
#define LB_SKIP_VIP_LOOKUP 0
#endif

/* ---- counters --------------------------------------------------------------------- */

static __always_inline void stat_inc(__u32 idx)
{
	__u32 zero = 0;
	struct lb_stats *s = stats.lookup(&zero);

	if (s && idx < N_STATS)
		s->n[idx] += 1;
}

static __always_inline void vip_stat_add(__u32 vip_num, __u32 bytes)
{
	struct vip_counters *v = vip_stats.lookup(&vip_num);

	if (v) {
		v->col[VIP_STAT_PACKETS] += 1;
		v->col[VIP_STAT_BYTES] += bytes;
	}
}

/* A real's packets and bytes, read when the real is known and written when the frame
 * leaves (real_stat_put): the loads overlap the encapsulation. Nothing else writes this
 * CPU's copy in between (XDP runs to completion on its CPU). */
struct real_stat_pending {
	struct real_counters *v;
	__u64 packets;
	__u64 bytes;
};

static __always_inline void real_stat_get(struct real_stat_pending *p, __u32 real_id)
{
	p->v = real_stats.lookup(&real_id);
	if (p->v) {
		p->packets = p->v->col[VIP_STAT_PACKETS];
		p->bytes = p->v->col[VIP_STAT_BYTES];
	}
}

static __always_inline void real_stat_put(const struct real_stat_pending *p, __u32 bytes)
{
	if (p->v) {
		p->v->col[VIP_STAT_PACKETS] = p->packets + 1;
		p->v->col[VIP_STAT_BYTES] = p->bytes + bytes;
	}
}

/* A connection-table miss hashed (or source-routed) a flow onto real_id. */
static __always_inline void real_miss_inc(__u32 real_id)
{
	struct real_counters *v = real_stats.lookup(&real_id);

	if (v)
		v->col[REAL_STAT_LRU_MISS] += 1;
}

/* ---- helper-free lookups: the VIP index and the connection table -------------------- */

static __always_inline struct lb_runtime *runtime(void)
{
	__u32 zero = 0;

	return lb_runtime.lookup(&zero);
}

/* The VIP of k in the live half of the index (lb/xdp_tables.py), or NULL. */
static __always_inline struct vip_meta *vip_find(const struct vip_words *k)
{
	struct lb_runtime *rt = runtime();
	struct vip_slot *s;
	__u32 base, home, idx;
	__u64 sel;
	int i;

	if (!rt)
		return NULL;
	sel = rt->vip_index; /* one load: half and seed belong together */
	base = (sel & 1) * VIP_SLOTS;
	home = vip_words_hash(k, sel >> 32);
#pragma unroll
	for (i = 0; i < VIP_PROBES; i++) {
		idx = base + ((home + i) & (VIP_SLOTS - 1));
		s = vip_slots.lookup(&idx);
		if (!s || !s->key.family)
			return NULL;
		if (vip_slot_matches(s, k))
			return &s->meta;
	}
	return NULL;
}

/* ---- capture (lbctl capture) ---------------------------------------------------------- */

/* Send the first bytes of the frame behind event ev (CAPTURE_EV_*) to capture_ring, if
 * lb_runtime.capture has the event on and this CPU's token bucket allows (GCRA: one record
 * per interval, CAPTURE_BURST back to back). Called on the rare paths only (a miss, a drop,
 * too-big, an unknown QUIC id), before the frame is changed; with capture off it costs a
 * lookup that the JIT inlines and one branch. */
static __always_inline void capture(struct xdp_md *ctx, __u32 ev, __u32 reason, __u32 vip_num,
				    __u32 real_id)
{
	struct lb_runtime *rt = runtime();
	struct capture_bucket *b;
	struct capture_record *r;
	__u64 word, now, interval, tat, cap;
	__u32 zero = 0, n;

	if (!rt)
		return;
	word = rt->capture; /* one read: events and interval belong together */
	if (!(word & (1u << ev)))
		return;
	b = capture_buckets.lookup(&zero);
	if (!b)
		return;
	now = bpf_ktime_get_ns();
	interval = word >> CAPTURE_INTERVAL_SHIFT;
	tat = b->tat;
	if (tat < now || tat - now > CAPTURE_BURST * interval)
		tat = now; /* idle, or left by an earlier capture at a lower rate */
	if (tat - now > (CAPTURE_BURST - 1) * interval) {
		b->limited += 1;
		return;
	}
	r = capture_ring.ringbuf_reserve(sizeof(*r));
	if (!r) {
		b->lost += 1;
		return;
	}
	b->tat = tat + interval;
	n = ctx->data_end - ctx->data;
	cap = n > CAPTURE_SNAPLEN ? CAPTURE_SNAPLEN : n;
	asm volatile("" : "+r"(cap)); /* the helper gets the clamped value, as the verifier wants */
	if (cap < 1 || cap > CAPTURE_SNAPLEN || bpf_xdp_load_bytes(ctx, 0, r->data, cap)) {
		capture_ring.ringbuf_discard(r, 0);
		return;
	}
	r->ts_ns = now;
	r->event = ev;
	r->reason = reason;
	r->cpu = bpf_get_smp_processor_id();
	r->vip_num = vip_num;
	r->real_id = real_id;
	r->frame_len = n;
	r->cap_len = cap;
	capture_ring.ringbuf_submit(r, 0);
}

/* The lookup key of addr (family fam) in vip_prefixes / vip_prefix_addrs: every bit of the
 * head and of the address, so the trie returns the longest prefix holding addr. */
static __always_inline void vip_lpm_key_of(struct vip_lpm_key *k, const union lb_addr *addr,
					   __u8 fam, __be16 port, __u8 proto)
{
	k->prefixlen = VIP_LPM_KEY_HEAD_BITS + (fam == FAMILY_V6 ? 128 : 32);
	k->port = port;
	k->proto = proto;
	k->family = fam;
	__builtin_memcpy(&k->addr, addr, sizeof(k->addr));
}

/* The CIDR VIP of the longest prefix holding the flow's destination, for (port, proto),
 * or NULL. Only after an exact miss (rows 14-21). Counts vip_prefix_matched. */
static __always_inline struct vip_meta *vip_prefix_find(const struct flow_key *flow, __be16 port)
{
	struct vip_lpm_key k;
	struct vip_meta *meta;

	vip_lpm_key_of(&k, &flow->dst, flow->family, port, flow->proto);
	meta = vip_prefixes.lookup(&k);
	if (meta)
		stat_inc(STAT_VIP_PREFIX_MATCHED);
	return meta;
}

/* flow's set in the connection table, its index (*idx) and the flow's hash (*h), or
 * NULL. The set is the hash's high 32 bits scaled to the number of sets (any count). */
static __always_inline struct conn_set *conn_set_of(const struct flow_key *flow, __u64 *h,
						    __u32 *idx)
{
	struct lb_runtime *rt = runtime();

	if (!rt)
		return NULL;
	*h = conn_set_hash(flow, rt->conn_seed);
	*idx = ((*h >> 32) * LB_CONN_SETS_ALL) >> 32;
	return conn_sets.lookup(idx);
}

/* pkt's set in the connection table: the one vip_fast_lookup found (and touched), else
 * looked up now (conn_set_of). */
static __always_inline struct conn_set *pkt_conn_set(const struct pkt_desc *pkt, __u64 *h,
						     __u32 *idx)
{
	if (!pkt->conn_ready)
		return conn_set_of(&pkt->flow, h, idx);
	*h = pkt->conn_h;
	*idx = pkt->conn_set;
	return conn_sets.lookup(idx);
}

/* The way holding a whole (untorn) entry for the flow of hash h, or -1. */
static __always_inline int conn_find(const struct conn_set *set, __u64 h)
{
	int w;

#pragma unroll
	for (w = 0; w < CONN_WAYS; w++) {
		const struct conn_entry *e = &set->way[w];

		if (e->real_id && (e->tag & ~(__u64)CONN_KEY_SLOT_MASK) == conn_tag(h, e->real_id))
			return w;
	}
	return -1;
}

/* Move way w to the front, shifting the ways before it back by one (recency order). All
 * in the set's one cache line. */
static __always_inline void conn_promote(struct conn_set *set, int w)
{
	struct conn_entry e = {};
	int j;

	if (w <= 0)
		return;
#pragma unroll
	for (j = 1; j < CONN_WAYS; j++)
		if (j == w)
			e = set->way[j];
#pragma unroll
	for (j = CONN_WAYS - 1; j > 0; j--)
		if (j <= w)
			set->way[j] = set->way[j - 1];
	set->way[0] = e;
}

/* Record flow -> real_id as the set's most recent entry: in place if the flow is there
 * (way w >= 0), else over the least recently used way; its key goes to the conn_keys slot
 * of the entry it replaces, or to a free one. */
static __always_inline void conn_store(struct conn_set *set, __u32 idx, int w,
				       const struct flow_key *flow, __u64 h, __u32 real_id,
				       __u64 now)
{
	struct conn_entry *e = &set->way[0];
	__u32 used = 0, slot, ki;
	struct flow_key *k;
	int j;

	if (w < 0)
		w = CONN_WAYS - 1;
	if (set->way[w].real_id) {
		slot = set->way[w].tag & CONN_KEY_SLOT_MASK;
	} else {
#pragma unroll
		for (j = 0; j < CONN_WAYS; j++)
			if (set->way[j].real_id)
				used |= 1u << (set->way[j].tag & CONN_KEY_SLOT_MASK);
		slot = !(used & 1) ? 0 : !(used & 2) ? 1 : !(used & 4) ? 2 : 3;
	}
	conn_promote(set, w);
	e->tag = conn_tag(h, real_id) | slot;
	e->atime = now >> CONN_TIME_SHIFT;
	e->real_id = real_id;
	ki = idx * CONN_WAYS + slot;
	k = conn_keys.lookup(&ki);
	if (k)
		*k = *flow;
}

/* The flood guard: counts one new connection at now (ns) on this CPU and says whether
 * the CPU is over max_conn_rate in the current window (then the flow is hashed without
 * source routing and not recorded). Windows are CONN_RATE_WINDOW_NS long; a new one
 * starts with its first connection. max_conn_rate 0: off, nothing is counted. */
static __always_inline int conn_flood(const struct ctl_value *cfg, __u64 now)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct conn_rate *cr;

	if (!cfg || !cfg->max_conn_rate)
		return 0;
	cr = conn_rates.lookup(&cpu);
	if (!cr)
		return 0;
	if (now - cr->window_start > CONN_RATE_WINDOW_NS) {
		cr->window_start = now;
		cr->count = 1;
		return 0;
	}
	cr->count += 1;
	return cr->count > cfg->max_conn_rate;
}

/* ---- real selection and forwarding (rows 14-21) ------------------------------------ */

/* Whether the health checks hold real real_id down for VIP vip_num (the down set).
 * real_id < MAX_REALS: the caller found it in the reals table. */
static __always_inline int real_down_for(__u32 vip_num, __u32 real_id)
{
	__u32 idx = vip_num * DOWN_ROW_WORDS + real_id / DOWN_WORD_BITS;
	__u64 *word;

	if (vip_num >= MAX_VIPS)
		return 0;
	word = down_set.lookup(&idx);
	return word && ((*word >> (real_id % DOWN_WORD_BITS)) & 1);
}

/* hash % RING_SIZE without a divide instruction: clang's BPF backend emits a division by
 * a constant as it is, and the JIT makes it a 64-bit divide (tens of cycles). This is the
 * round-up method for 32-bit dividends (Granlund and Montgomery, PLDI 1994, fig. 4.1):
 * l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1, t = m x / 2^32,
 * x / d = (t + (x - t) / 2) / 2^(l - 1); the magic numbers come from RING_SIZE at compile
 * time and the static asserts check the edges. */
#define RING_MOD_L (32 - __builtin_clz(RING_SIZE - 1))
#define RING_MOD_M ((((1ULL << RING_MOD_L) - RING_SIZE) << 32) / RING_SIZE + 1)
#define RING_MOD_T(x) (((__u64)(x) * RING_MOD_M) >> 32)
#define RING_MOD_Q(x) ((RING_MOD_T(x) + (((__u64)(x) - RING_MOD_T(x)) >> 1)) >> (RING_MOD_L - 1))
#define RING_MOD(x) ((__u32)((__u64)(x) - RING_MOD_Q(x) * RING_SIZE))
_Static_assert(RING_SIZE > 2 && RING_MOD_M < (1ULL << 32), "RING_MOD: magic number");
_Static_assert(RING_MOD(0) == 0 && RING_MOD(RING_SIZE - 1) == RING_SIZE - 1 &&
	       RING_MOD(RING_SIZE) == 0 && RING_MOD(0xffffffffu) == 0xffffffffu % RING_SIZE &&
	       RING_MOD(0xffffffffu / RING_SIZE * RING_SIZE) == 0 &&
	       RING_MOD(0xffffffffu / RING_SIZE * RING_SIZE - 1) == RING_SIZE - 1,
	       "RING_MOD: x % RING_SIZE at the edges");

static __always_inline __u32 ring_mod(__u32 x)
{
	return RING_MOD(x);
}

/* Katran's flow hash. dport_only: src = 0, sport = dport (the hash only). */
static __always_inline __u32 flow_hash(const struct flow_key *flow, __u32 vip_flags)
{
	union lb_addr src = flow->src;
	__u32 sport = flow->sport;
	__u32 dport = flow->dport;
	__u32 ports;

	if (vip_flags & F_DPORT_ONLY) {
		src = (union lb_addr){};
		sport = dport;
	}
	/* the u32 read little-endian from the wire bytes [sport][dport] */
	ports = sport | (dport << 16);
	if (flow->family == FAMILY_V6)
		return lb_jhash_2words(lb_jhash_16(src.v6, MAX_VIPS), ports, (__u32)CH_RINGS_SIZE);
	return lb_jhash_2words(src.v4, ports, (__u32)CH_RINGS_SIZE);
}

/* Step 0, QUIC (VIP flag quic, UDP, not an ICMP error): the real named by the server id
 * in the connection id, or NULL (then *real_id stays 0 and the connection table decides).
 * Counts quic_routed / quic_unknown / quic_fallback. */
static __always_inline struct real_def *quic_real(struct xdp_md *ctx, struct pkt_desc *pkt,
						  __u32 vip_num, __u32 *real_id)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 off = pkt->l4_off + sizeof(struct udphdr);
	__u32 id = 0, *rid;
	struct real_def *r;

	/* always true; bounds the variable offset for the verifier. The payload length is
	 * not negative: the parsers checked the UDP header against the packet length. */
	if (off <= ETH_HLEN + VLAN_HLEN + IPV6_HLEN + sizeof(struct udphdr))
		id = quic_server_id(data + off, data_end, pkt->pkt_len + pkt->l3_off - off);
	if (!id) {
		stat_inc(STAT_QUIC_FALLBACK);
		return NULL;
	}
	rid = quic_servers.lookup(&id);
	if (rid) {
		id = *rid; /* one read: the control plane may rewrite the entry */
		r = reals.lookup(&id);
		if (r && r->family) {
			*real_id = id;
			stat_inc(STAT_QUIC_ROUTED);
			return r;
		}
	}
	stat_inc(STAT_QUIC_UNKNOWN);
	capture(ctx, CAPTURE_EV_QUIC_UNKNOWN, 0, vip_num, 0);
	return NULL;
}

/* After step 0 (not with lru_bypass), as Katran does (balancer.bpf.c,
 * check_and_update_real_index_in_lru): a QUIC-routed packet writes its real into the
 * connection table, so that a later packet of the flow without a usable id (fallback,
 * unknown id) stays on it. The flow's entry with this real is only made the most recent;
 * with another real it takes this one (atime kept); none: a new entry, atime now (Katran
 * writes atime 0, which leaves a UDP entry it creates expired). Counts quic_conn_written
 * when it writes; a new entry counts towards the flood guard (flood_new_conns over it). */
static __always_inline void quic_conn_write(const struct pkt_desc *pkt, __u32 real_id)
{
	const struct flow_key *flow = &pkt->flow;
	struct conn_set *set;
	__u32 idx = 0, zero = 0;
	__u64 h = 0, now;
	int w;

	set = pkt_conn_set(pkt, &h, &idx);
	if (!set)
		return;
	w = conn_find(set, h);
	if (w >= 0 && w < CONN_WAYS) {
		struct conn_entry *e = &set->way[w];

		if (e->real_id != real_id) {
			e->tag = conn_tag(h, real_id) | (e->tag & CONN_KEY_SLOT_MASK);
			e->real_id = real_id;
			stat_inc(STAT_QUIC_CONN_WRITTEN);
		}
		conn_promote(set, w);
		return;
	}
	/* a new entry is a new connection: over the flood guard's rate it is not written
	 * (as Katran's check_and_update_real_index_in_lru) */
	now = bpf_ktime_get_ns();
	if (conn_flood(ctl.lookup(&zero), now)) {
		stat_inc(STAT_FLOOD_NEW_CONNS);
		return;
	}
	conn_store(set, idx, -1, flow, h, real_id, now);
	stat_inc(STAT_QUIC_CONN_WRITTEN);
}

/* Step 2, source routing: the real of the longest prefix of the client address in the
 * family's source-route table, or NULL when there is no match or its real is gone (a
 * shorter prefix is not tried: the ring decides). Counts src_routed. */
static __always_inline struct real_def *src_route_real(const struct flow_key *flow, __u32 *real_id)
{
	struct real_def *r = NULL;
	__u32 *rid, id = 0;

	if (flow->family == FAMILY_V6) {
		struct lpm_v6_key k = { .prefixlen = 128 };

		__builtin_memcpy(k.addr, flow->src.bytes, sizeof(k.addr));
		rid = src_routes_v6.lookup(&k);
	} else {
		struct lpm_v4_key k = { .prefixlen = 32 };

		__builtin_memcpy(k.addr, flow->src.bytes, sizeof(k.addr));
		rid = src_routes_v4.lookup(&k);
	}
	if (rid) {
		id = *rid; /* one read: the control plane may rewrite the entry */
		r = reals.lookup(&id);
	}
	if (!r || !r->family)
		return NULL;
	*real_id = id;
	stat_inc(STAT_SRC_ROUTED);
	return r;
}

/* Stateless VIPs: the reals the VIP's previous rings pick at ring position pos, added to
 * hl (which holds the ring's real real_id, of family family) when valid, of that family
 * and not there yet. Most flows keep their real: an id equal to one in the list is
 * skipped before its entry is read. */
static __always_inline void prev_ring_hops(__u32 vip_num, __u32 pos, __u32 real_id, __u8 family,
					   struct hop_list *hl)
{
	struct prev_ref *ref = prev_ref.lookup(&vip_num);
	__u32 slots, i, seen = real_id, seen2 = real_id;

	if (!ref)
		return;
	slots = *(__u32 *)ref; /* one read: the control plane rewrites both refs at once */
	if (!slots)
		return;
#pragma unroll
	for (i = 0; i < PREV_RINGS_PER_VIP; i++) {
		__u32 s = (slots >> (16 * i)) & 0xffff, k, id, j, dup = 0;
		struct real_def *r;
		__u32 *slot;

		if (!s || s > MAX_PREV_RINGS)
			continue;
		k = (s - 1) * RING_SIZE + pos;
		slot = prev_rings.lookup(&k);
		if (!slot)
			continue;
		id = *slot;
		if (!id || id == seen || id == seen2)
			continue;
		r = reals.lookup(&id);
		if (!r || r->family != family)
			continue;
#pragma unroll
		for (j = 0; j < GUE_MAX_HOPS; j++)
			if (j < hl->count && hl->hop[j].v6[0] == r->addr.v6[0] &&
			    hl->hop[j].v6[1] == r->addr.v6[1] && hl->hop[j].v6[2] == r->addr.v6[2] &&
			    hl->hop[j].v6[3] == r->addr.v6[3])
				dup = 1;
		if (dup || hl->count >= GUE_MAX_HOPS)
			continue;
		if (hl->count == 1)
			hl->hop[1] = r->addr;
		else
			hl->hop[2] = r->addr;
		hl->count++;
		seen2 = id;
	}
}

static __always_inline int forward(struct xdp_md *ctx, struct pkt_desc *pkt, __u32 *stat,
				   __u32 *lru_stat)
{
	struct vip_words vk = {};
	struct vip_meta *meta;
	struct conn_set *set = NULL;
	struct real_def *real = NULL;
	struct ctl_value *cfg;
	__u32 flags, vip_num, real_id = 0, zero = 0;
	int use_lru, way = -1;
	__u64 fh = 0;
	__u32 set_idx = 0;
	struct hop_list hl;
	struct real_stat_pending rs = {};
	__u32 ring_pos = 0, inner_sum = 0, hl_bytes = 0;
	int from_ring = 0;

	if (pkt->vip_found) {
		/* found by vip_fast_lookup() with the packet's own port */
		flags = pkt->vip.flags;
		vip_num = pkt->vip.vip_num;
	} else {
		const __u64 *dst = (const __u64 *)&pkt->flow.dst;
		struct ctl_value *cc = ctl.lookup(&zero);
		int cidr = cc && cc->cidr_vips; /* no CIDR VIP: no prefix lookup */

		vk.w0 = dst[0];
		vk.w1 = dst[1];
		vk.w2 = vip_tail(pkt->flow.dport, pkt->flow.proto, pkt->flow.family);
		meta = vip_find(&vk);
		if (!meta && cidr) /* then the longest prefix with the port */
			meta = vip_prefix_find(&pkt->flow, pkt->flow.dport);
		if (!meta) {
			vk.w2 = vip_tail(0, pkt->flow.proto, pkt->flow.family);
			meta = vip_find(&vk);
			if (!meta && cidr)
				meta = vip_prefix_find(&pkt->flow, 0);
			if (!meta) {
				*stat = STAT_PASS_NOT_VIP; /* row 14 */
				return XDP_PASS;
			}
			/* a port-0 VIP ignores the destination port, unless it hashes on it */
			if (!(meta->flags & F_DPORT_ONLY))
				pkt->flow.dport = 0;
		}
		flags = meta->flags;
		vip_num = meta->vip_num;
	}
	if (flags & F_NO_SRC_PORT)
		pkt->flow.sport = 0;
	vip_stat_add(vip_num, pkt->frame_len);
	LB_STOP_AFTER(2);

	/* 0. QUIC connection id */
	if ((flags & F_QUIC) && pkt->flow.proto == IPPROTO_UDP && !pkt->icmp_err) {
		real = quic_real(ctx, pkt, vip_num, &real_id);
		if (real_id && !(flags & F_LRU_BYPASS))
			quic_conn_write(pkt, real_id);
	}

	/* 1. connection table (a QUIC-routed packet neither reads nor writes it, nor does a
	 * stateless VIP's) */
	use_lru = !(flags & (F_LRU_BYPASS | F_STATELESS)) && !real_id;
	if (use_lru)
		set = pkt_conn_set(pkt, &fh, &set_idx);
	if (set && !pkt->tcp_syn) {
		way = conn_find(set, fh);
		if (way >= 0 && way < CONN_WAYS) {
			struct conn_entry *e = &set->way[way];
			__u32 id = e->real_id;
			struct real_def *r = reals.lookup(&id);

			if (r && r->family) {
				if (pkt->flow.proto != IPPROTO_UDP) {
					real_id = id;
				} else {
					__u32 now = bpf_ktime_get_ns() >> CONN_TIME_SHIFT;

					if (now - e->atime <= CONN_UDP_TIMEOUT) {
						e->atime = now;
						real_id = id;
					}
				}
				/* a real the health checks took down for this VIP: UDP, and
				 * TCP where the VIP asks, re-hash (the entry is rewritten
				 * below); the down set is read only behind the real's hint */
				if (real_id && (r->flags & REAL_F_DOWN) &&
				    (pkt->flow.proto == IPPROTO_UDP || (flags & F_MIGRATE_DOWN_TCP)) &&
				    real_down_for(vip_num, id)) {
					real_id = 0;
					stat_inc(STAT_DOWN_REAL_MIGRATED);
				} else if (real_id) {
					real = r;
					conn_promote(set, way);
				}
			}
		}
		*lru_stat = real_id ? STAT_LRU_HIT : STAT_LRU_MISS;
	} else if (use_lru) {
		*lru_stat = STAT_LRU_MISS; /* SYN: always re-hashed */
	}
	LB_STOP_AFTER(3);

	/* 2. source routing, else the Maglev ring; a new flow the connection table would
	 * record counts towards the flood guard, and over the rate it is neither source-routed
	 * nor recorded */
	if (!real_id) {
		__u32 pos, *slot;
		int record = set && !pkt->icmp_err;
		__u64 now = record ? bpf_ktime_get_ns() : 0;

		if (record && conn_flood(ctl.lookup(&zero), now)) {
			record = 0;
			stat_inc(STAT_FLOOD_NEW_CONNS);
		} else if (flags & F_SRC_ROUTING) {
			real = src_route_real(&pkt->flow, &real_id);
		}
		if (!real_id) {
			if (vip_num >= MAX_VIPS) {
				*stat = STAT_DROP_NO_REAL;
				return XDP_DROP;
			}
			ring_pos = ring_mod(flow_hash(&pkt->flow, flags));
			pos = vip_num * RING_SIZE + ring_pos;
			slot = ch_rings.lookup(&pos);
			from_ring = 1;
			if (slot)
				real_id = *slot;
			if (real_id)
				real = reals.lookup(&real_id);
			if (!real || !real->family) {
				/* row 15 (also: the ring names a real id that has no entry) */
				*stat = STAT_DROP_NO_REAL;
				return XDP_DROP;
			}
		}
		if (record) {
			if (pkt->tcp_syn)
				way = conn_find(set, fh);
			conn_store(set, set_idx, way, &pkt->flow, fh, real_id, now);
		}
		if (use_lru) {
			real_miss_inc(real_id);
			capture(ctx, CAPTURE_EV_LRU_MISS, 0, vip_num, real_id);
		}
	}
	LB_STOP_AFTER(4);
	if (!real) {
		*stat = STAT_DROP_NO_REAL; /* unreachable; keeps the verifier's view simple */
		return XDP_DROP;
	}
	real_stat_get(&rs, real_id);

	/* local delivery needs no encapsulation, so it is decided first */
	if ((flags & F_LOCAL) && (real->flags & REAL_F_LOCAL)) {
		real_stat_put(&rs, pkt->frame_len);
		*stat = STAT_PASS_LOCAL; /* row 17 */
		return XDP_PASS;
	}
	cfg = ctl.lookup(&zero);
	if (!cfg) {
		*stat = STAT_DROP_ENCAP_FAILED;
		return XDP_DROP;
	}
	/* a stateless VIP's TCP segment takes the previous rings' reals along (GUE only) */
	hl.count = 0;
	if ((flags & F_STATELESS) && from_ring && pkt->flow.proto == IPPROTO_TCP &&
	    !pkt->icmp_err && cfg->encap == ENCAP_GUE) {
		hl.hop[0] = real->addr;
		hl.count = 1;
		prev_ring_hops(vip_num, ring_pos, real_id, real->family, &hl);
		if (hl.count > 1) {
			if (hoplist_inner_sum(ctx, pkt, &inner_sum))
				hl.count = 0; /* unreachable: a TCP packet has 40 bytes */
			else
				hl_bytes = hoplist_bytes(hl.count, real->family);
		}
	}
	if (pkt->flow.family == FAMILY_V6 && real->family == FAMILY_V4 &&
	    cfg->encap != ENCAP_GUE) {
		*stat = STAT_DROP_ENCAP_FAILED; /* row 16 */
		return XDP_DROP;
	}
	if (cfg->mtu) {
		__u32 overhead = (real->family == FAMILY_V4 ? ENCAP_IPV4_OVERHEAD
							    : ENCAP_IPV6_OVERHEAD) +
				 (cfg->encap == ENCAP_GUE ? UDP_HLEN : 0) + hl_bytes;

		if (pkt->pkt_len + overhead > cfg->mtu) {
			__u32 quote = pkt->flow.family == FAMILY_V4 ? ICMP_TOO_BIG_QUOTE_V4
								    : ICMP_TOO_BIG_QUOTE_V6;

			int drop = pkt->icmp_err || pkt->pkt_len < quote ||
				   (pkt->flow.family == FAMILY_V4 && !pkt->df);

			capture(ctx, CAPTURE_EV_TOO_BIG, drop ? STAT_DROP_TOO_BIG : STAT_TX_ICMP_TOO_BIG,
				vip_num, real_id);
			if (drop) {
				*stat = STAT_DROP_TOO_BIG; /* row 21 */
				return XDP_DROP;
			}
			if (icmp_too_big(ctx, pkt, cfg->mtu - overhead)) {
				*stat = STAT_DROP_ENCAP_FAILED; /* no headroom */
				return XDP_DROP;
			}
			*stat = STAT_TX_ICMP_TOO_BIG; /* row 20 */
			return XDP_TX;
		}
	}
	if (hl_bytes) {
		if (encapsulate_hoplist(ctx, pkt, real, cfg, &hl, inner_sum)) {
			*stat = STAT_DROP_ENCAP_FAILED; /* row 16: no headroom */
			return XDP_DROP;
		}
		stat_inc(STAT_HOPLIST_SENT);
	} else if (encapsulate(ctx, pkt, real, cfg)) {
		*stat = STAT_DROP_ENCAP_FAILED; /* row 16: no headroom */
		return XDP_DROP;
	}
	real_stat_put(&rs, pkt->frame_len);
	if (pkt->icmp_err)
		stat_inc(STAT_ICMP_ERROR_FORWARDED); /* row 19 */
	*stat = STAT_TX_ENCAP; /* row 18 */
	return XDP_TX;
}

/* ---- IPv4 / IPv6 (rows 3-13) ------------------------------------------------------- */

/* Returned by the per-family parsers for a TCP/UDP packet or a well-formed ICMP error to
 * a VIP address: pkt->flow is filled and forward() decides (rows 14-21). Not an XDP
 * action, so forward() is inlined once. */
#define LB_FORWARD (-1)

/* The common packet's shortcut through row 5: TCP or UDP, no IPv4 options, not a
 * fragment, the whole L4 header inside the packet (rows 7-9 let it through), and
 * (dst, dport, proto) is a VIP. Its destination is then a VIP address by construction
 * (lb.datapath_tables puts every VIP's address in vip_addrs; XdpBalancer.load_tables adds
 * addresses before VIPs and removes them after), so vip_addr_checks() skips the
 * vip_addrs lookup and forward() uses this VIP: one hash lookup per packet instead of
 * two. Anything else, a miss included, takes the full path, which reaches the same row.
 * l4 points at the L4 header, l4_room = packet bytes from there on; vk has the address
 * and family filled in. */
static __always_inline void vip_fast_lookup(struct pkt_desc *pkt, struct vip_words *vk,
					    void *l4, void *data_end, __u32 l4_room, __u8 proto,
					    __u8 family)
{
	struct l4_ports *ports = l4;
	struct vip_meta *meta;
	__u32 hlen;

	if (LB_SKIP_VIP_LOOKUP)
		return;
	if (proto == IPPROTO_TCP)
		hlen = sizeof(struct tcphdr);
	else if (proto == IPPROTO_UDP)
		hlen = sizeof(struct udphdr);
	else
		return;
	if (l4_room < hlen || l4 + hlen > data_end || (void *)(ports + 1) > data_end)
		return;
	vk->w2 = vip_tail(ports->dest, proto, family);
	meta = vip_find(vk);
	if (!meta)
		return;
	pkt->vip = *meta;
	pkt->vip_found = 1;
	/* A VIP with the connection table, and a key as parsed: find the flow's set now and
	 * touch it, so that its cache line (often a cache and TLB miss) loads while the rest
	 * of the packet is checked; forward() uses the set found here. */
	if (!(meta->flags & (F_LRU_BYPASS | F_STATELESS | F_NO_SRC_PORT))) {
		struct conn_set *set;

		flow_set_ports(&pkt->flow, ports);
		set = conn_set_of(&pkt->flow, &pkt->conn_h, &pkt->conn_set);
		if (set) {
			pkt->conn_ready = 1;
			(void)*(volatile __u64 *)&set->way[0].tag;
		}
	}
}

/* Is ak's address inside the prefix of a CIDR VIP (any port, any protocol)? Asked only
 * when it is no exact VIP address. */
static __always_inline int vip_prefix_addr(const struct vip_addr_key *ak)
{
	struct vip_lpm_key k;

	vip_lpm_key_of(&k, &ak->addr, ak->family, 0, 0);
	return vip_prefix_addrs.lookup(&k) != NULL;
}

/* Rows 5 and 6, shared by both families: is the destination a VIP address, and does
 * the frame fit. Returns -1 with *stat and *action set when the frame is done. */
static __always_inline int vip_addr_checks(struct vip_addr_key *ak, struct pkt_desc *pkt,
					   __u32 *stat, int *action)
{
	struct ctl_value *c;
	__u32 zero = 0;

	if (LB_SKIP_VIP_LOOKUP)
		return 0;
	c = ctl.lookup(&zero);
	if (!pkt->vip_found && !vip_addrs.lookup(ak) && !(c && c->cidr_vips && vip_prefix_addr(ak))) {
		*stat = STAT_PASS_NOT_VIP; /* row 5 */
		*action = XDP_PASS;
		return -1;
	}
	if (!c || pkt->frame_len > c->max_frame) {
		*stat = STAT_DROP_OVERSIZE; /* row 6 */
		*action = XDP_DROP;
		return -1;
	}
	return 0;
}

/* Rows 9-13, shared by both families: the L4 header at the cursor. pkt->flow has its
 * family, protocol and addresses; l3 is the IP header, l4_room the packet's bytes from
 * the cursor on; data and data_end are the caller's (the verifier knows their range).
 * v6: the family, a constant, so that each inlined copy is specialised to its family. */
static __always_inline int process_l4(void *data, void *data_end, struct hdr_cursor *nh,
				      struct pkt_desc *pkt, void *l3, __u32 l4_room, __u32 *stat,
				      const int v6)
{
	__u8 proto = pkt->flow.proto;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *tcp = nh->pos;

		if (!l4_fits(nh, data_end, l4_room, sizeof(*tcp)) || (void *)(tcp + 1) > data_end) {
			*stat = STAT_DROP_MALFORMED; /* row 9 */
			return XDP_DROP;
		}
		flow_set_ports(&pkt->flow, (struct l4_ports *)tcp);
		pkt->tcp_syn = tcp->syn;
		return LB_FORWARD;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = nh->pos;

		if (!l4_fits(nh, data_end, l4_room, sizeof(*udp)) || (void *)(udp + 1) > data_end) {
			*stat = STAT_DROP_MALFORMED; /* row 9 */
			return XDP_DROP;
		}
		flow_set_ports(&pkt->flow, (struct l4_ports *)udp);
		return LB_FORWARD;
	}
	if (proto == (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP)) {
		struct icmphdr *icmp = nh->pos; /* type first in ICMPv4 and ICMPv6 alike */
		int err;

		if (!l4_fits(nh, data_end, l4_room, ICMP_HLEN) || (void *)(icmp + 1) > data_end) {
			*stat = STAT_DROP_MALFORMED; /* row 9 */
			return XDP_DROP;
		}
		if (icmp->type == (v6 ? ICMPV6_ECHO_REQUEST : ICMP_ECHO_REQUEST)) {
			if (v6)
				icmp6_echo_reply(data, l3, (struct icmp6hdr *)icmp);
			else
				icmp4_echo_reply(data, l3, icmp);
			*stat = STAT_TX_ICMP_ECHO_REPLY; /* row 11 */
			return XDP_TX;
		}
		if (v6 ? icmp->type == ICMPV6_DEST_UNREACH || icmp->type == ICMPV6_PKT_TOOBIG
		       : icmp->type == ICMP_DEST_UNREACH) {
			err = v6 ? parse_icmp_inner_v6(icmp, data_end, l4_room, &pkt->flow)
				 : parse_icmp_inner_v4(icmp, data_end, l4_room, &pkt->flow);
			if (err < 0) {
				*stat = STAT_DROP_MALFORMED; /* row 12 */
				return XDP_DROP;
			}
			pkt->icmp_err = 1;
			return LB_FORWARD;
		}
		*stat = STAT_PASS_NOT_VIP; /* row 13 */
		return XDP_PASS;
	}
	*stat = STAT_PASS_NOT_VIP; /* row 10 */
	return XDP_PASS;
}

static __always_inline int process_ipv4(struct xdp_md *ctx, struct hdr_cursor *nh,
					struct pkt_desc *pkt, __u32 *stat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vip_addr_key ak = {};
	struct iphdr *iph;
	__u32 l4_room;
	int action;

	if (parse_iphdr(nh, data_end, pkt->frame_len - pkt->l3_off, &iph) < 0) {
		*stat = STAT_DROP_MALFORMED; /* row 3 */
		return XDP_DROP;
	}
	ak.addr.v4 = iph->daddr;
	ak.family = FAMILY_V4;
	pkt->flow.family = FAMILY_V4;
	pkt->flow.proto = iph->protocol;
	pkt->flow.src.v4 = iph->saddr;
	pkt->flow.dst.v4 = iph->daddr;
	if (iph->ihl == IPV4_HLEN / 4 && !ipv4_is_fragment(iph)) {
		struct vip_words vk = { .w0 = iph->daddr };

		vip_fast_lookup(pkt, &vk, nh->pos, data_end,
				bpf_ntohs(iph->tot_len) - IPV4_HLEN, iph->protocol, FAMILY_V4);
	}
	if (vip_addr_checks(&ak, pkt, stat, &action) < 0)
		return action;
	if (iph->ihl != IPV4_HLEN / 4) {
		*stat = STAT_DROP_IP_OPTIONS; /* row 7 */
		return XDP_DROP;
	}
	if (ipv4_is_fragment(iph)) {
		*stat = STAT_DROP_FRAGMENT; /* row 8 */
		return XDP_DROP;
	}

	pkt->pkt_len = bpf_ntohs(iph->tot_len);
	pkt->l4_off = pkt->l3_off + IPV4_HLEN;
	pkt->tos = iph->tos;
	pkt->df = (iph->frag_off & bpf_htons(IP_DF)) != 0;
	l4_room = pkt->pkt_len - IPV4_HLEN;

	return process_l4(data, data_end, nh, pkt, iph, l4_room, stat, 0);
}

static __always_inline int process_ipv6(struct xdp_md *ctx, struct hdr_cursor *nh,
					struct pkt_desc *pkt, __u32 *stat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vip_addr_key ak = {};
	struct ipv6hdr *ip6h;
	__u32 l4_room;
	int action;

	if (parse_ip6hdr(nh, data_end, pkt->frame_len - pkt->l3_off, &ip6h) < 0) {
		*stat = STAT_DROP_MALFORMED; /* row 4 */
		return XDP_DROP;
	}
	__builtin_memcpy(&ak.addr, &ip6h->daddr, sizeof(ak.addr));
	ak.family = FAMILY_V6;
	pkt->flow.family = FAMILY_V6;
	pkt->flow.proto = ip6h->nexthdr;
	__builtin_memcpy(&pkt->flow.src, &ip6h->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(&pkt->flow.dst, &ak.addr, sizeof(pkt->flow.dst));
	{
		struct vip_words vk = {};

		__builtin_memcpy(&vk, &ak.addr, sizeof(ak.addr));
		vip_fast_lookup(pkt, &vk, nh->pos, data_end, bpf_ntohs(ip6h->payload_len),
				ip6h->nexthdr, FAMILY_V6);
	}
	if (vip_addr_checks(&ak, pkt, stat, &action) < 0)
		return action;
	if (ip6h->nexthdr == IPPROTO_FRAGMENT) {
		*stat = STAT_DROP_FRAGMENT; /* row 8 */
		return XDP_DROP;
	}

	l4_room = bpf_ntohs(ip6h->payload_len);
	pkt->pkt_len = l4_room + IPV6_HLEN;
	pkt->l4_off = pkt->l3_off + IPV6_HLEN;
	pkt->tos = ipv6_tclass(ip6h);

	return process_l4(data, data_end, nh, pkt, ip6h, l4_room, stat, 1);
}

/* ---- entry -------------------------------------------------------------------------- */

static __always_inline int process_frame(struct xdp_md *ctx, __u32 *stat, __u32 *lru_stat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	struct pkt_desc pkt = {};
	int eth_type, action;

	pkt.frame_len = data_end - data;
	eth_type = parse_ethhdr_vlan(&nh, data_end, &pkt);
	if (eth_type < 0) {
		*stat = STAT_DROP_MALFORMED; /* row 1 */
		return XDP_DROP;
	}
	if (eth_type == bpf_htons(ETH_P_IP)) {
		action = process_ipv4(ctx, &nh, &pkt, stat);
	} else if (eth_type == bpf_htons(ETH_P_IPV6)) {
		action = process_ipv6(ctx, &nh, &pkt, stat);
	} else {
		*stat = STAT_PASS_NOT_IP; /* row 2 */
		return XDP_PASS;
	}
	if (action != LB_FORWARD)
		return action;
	LB_STOP_AFTER(1);
	return forward(ctx, &pkt, stat, lru_stat);
}

int balancer_xdp(struct xdp_md *ctx)
{
	__u32 stat = STAT_DROP_MALFORMED, lru_stat = 0, zero = 0;
	int action = process_frame(ctx, &stat, &lru_stat);
	struct lb_stats *s = stats.lookup(&zero);

	/* the frame's global counters in one lookup: rx, its outcome, lru_hit / lru_miss */
	if (s) {
		s->n[STAT_RX_PACKETS] += 1;
		if (stat < N_STATS)
			s->n[stat] += 1;
		if (lru_stat && lru_stat < N_STATS)
			s->n[lru_stat] += 1;
	}
	if (action == XDP_DROP) /* decided before any rewrite: the frame is as it arrived */
		capture(ctx, CAPTURE_EV_DROP, stat, CAPTURE_NO_VIP, 0);
	return action;
}
