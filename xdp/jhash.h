/* The kernel's jhash (Bob Jenkins' lookup3), as Katran uses it for the flow hash.
 * JHASH_INITVAL comes from lb/constants.py (JHASH_INITVAL). Words are read in CPU
 * (little-endian) order, as the kernel's __get_unaligned_cpu32 does. */
#pragma once

#include <linux/types.h>

static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define __lb_jhash_mix(a, b, c)                 \
	{                                       \
		a -= c; a ^= lb_rol32(c, 4);  c += b; \
		b -= a; b ^= lb_rol32(a, 6);  a += c; \
		c -= b; c ^= lb_rol32(b, 8);  b += a; \
		a -= c; a ^= lb_rol32(c, 16); c += b; \
		b -= a; b ^= lb_rol32(a, 19); a += c; \
		c -= b; c ^= lb_rol32(b, 4);  b += a; \
	}

#define __lb_jhash_final(a, b, c)               \
	{                                       \
		c ^= b; c -= lb_rol32(b, 14);   \
		a ^= c; a -= lb_rol32(c, 11);   \
		b ^= a; b -= lb_rol32(a, 25);   \
		c ^= b; c -= lb_rol32(b, 16);   \
		a ^= c; a -= lb_rol32(c, 4);    \
		b ^= a; b -= lb_rol32(a, 14);   \
		c ^= b; c -= lb_rol32(b, 24);   \
	}

/* jhash(key, 16, initval), unrolled: one 12-byte round, then a 4-byte tail. */
static __always_inline __u32 lb_jhash_16(const __u32 *k, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + 16 + initval;
	a += k[0];
	b += k[1];
	c += k[2];
	__lb_jhash_mix(a, b, c);
	a += k[3];
	__lb_jhash_final(a, b, c);
	return c;
}

static __always_inline __u32 lb_jhash_nwords(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += initval;
	b += initval;
	c += initval;
	__lb_jhash_final(a, b, c);
	return c;
}

/* lb_jhash_2words(a, b, initval): initval + JHASH_INITVAL + (2 << 2), as the kernel. */
static __always_inline __u32 lb_jhash_2words(__u32 a, __u32 b, __u32 initval)
{
	return lb_jhash_nwords(a, b, 0, initval + JHASH_INITVAL + (2 << 2));
}
