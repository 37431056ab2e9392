/* Internet checksums (RFC 1071, RFC 1624). The one's-complement sum is byte-order
 * independent, so 16-bit words are summed as loaded and the result stored as is. */
#pragma once

#include <linux/types.h>

static __always_inline __u16 lb_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Unfolded sum of n 16-bit words at p, as loaded (n a constant: unrolled). */
static __always_inline __u32 lb_csum_words(const void *p, int n)
{
	const __u16 *w = p;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < n; i++)
		sum += w[i];
	return sum;
}

/* Header checksum of a 20-byte IPv4 header whose check field is already 0: ten 16-bit
 * words. */
static __always_inline __u16 lb_ipv4_csum(const void *iph)
{
	return lb_csum_fold(lb_csum_words(iph, 10));
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit word changed from m to m'. */
static __always_inline __u16 lb_csum_replace2(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check;

	sum += (__u16)~old;
	sum += new;
	return lb_csum_fold(sum);
}

/* The same change for a message that may sum to zero (ICMPv4: no pseudo header; an echo
 * reply that is all zero after the type byte). Eqn. 3 gives 0x0000 there, which fails
 * verification; a full recomputation gives 0xFFFF. Computed as HC' = HC + m + ~m' (the
 * same value modulo 0xFFFF, end-around carry), which is 0x0000 only if m is: a message
 * summing to zero gets 0xFFFF, the only checksum an all-zero one verifies with (both
 * verify a nonzero one). */
static __always_inline __u16 lb_csum_replace2_nz(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = check;

	sum += old;
	sum += (__u16)~new;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}
