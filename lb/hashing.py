"""Katran's hashes on the control side: the endpoint hash and the Maglev permutation mix.

The endpoint hash is folly ``IPAddress::hash()`` as built on 64-bit Linux; Katran feeds it
to Maglev, so it MUST NOT change or our rings stop matching Katran hosts in the same ECMP
group. Facts and vectors: /work/shared/KATRAN_COMPAT.md ("Endpoint hash", "Maglev
permutation"). Endpoint hashing runs once per real and stays plain Python (exact integer
arithmetic, reduced mod 2^32 / 2^64 by hand); ``murmur`` runs per endpoint inside the ring
builder, so it is numba-compiled and callable from other ``@njit`` code.
"""

from __future__ import annotations

import ipaddress

import numba
import numpy as np

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# folly seeds the address hash with the address family (Linux values).
AF_INET = 2
AF_INET6 = 10

# --- folly hash_128_to_64 / fnv32 (the "broken" signed-char variant) ---------------------

_K_MUL = 0x9DDFEA08EB382D69  # folly::hash::hash_128_to_64 multiplier


def hash_128_to_64(upper: int, lower: int) -> int:
    """folly ``hash_128_to_64`` (a CityHash mix): two u64 -> one u64."""
    a = ((lower ^ upper) * _K_MUL) & MASK64
    a ^= a >> 47
    b = ((upper ^ a) * _K_MUL) & MASK64
    b ^= b >> 47
    return (b * _K_MUL) & MASK64


_FNV32_INIT = 2166136261


def fnv32_broken(data: bytes) -> int:
    """folly ``fnv32_buf``: FNV-1 over *signed* chars (bytes >= 0x80 sign-extend)."""
    h = _FNV32_INIT
    for byte in data:
        # h * 16777619 spelled as shifts, exactly as folly writes it.
        h = (h + (h << 1) + (h << 4) + (h << 7) + (h << 8) + (h << 24)) & MASK32
        signed = byte - 256 if byte >= 0x80 else byte
        h ^= signed & MASK32  # int8 -> int32 sign extension, seen as u32
    return h


# --- SpookyHash V2, short-message path (messages < 192 bytes) -----------------------------

_SC_CONST = 0xDEADBEEFDEADBEEF


def _rot64(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


def _short_mix(h: list[int]) -> None:
    """SpookyHash ShortMix, in place on [h0, h1, h2, h3]."""
    # (rotated, rotation, added, xored-into) for each of the 12 steps.
    for dst, rot, add, xor in (
        (2, 50, 3, 0), (3, 52, 0, 1), (0, 30, 1, 2), (1, 41, 2, 3),
        (2, 54, 3, 0), (3, 48, 0, 1), (0, 38, 1, 2), (1, 37, 2, 3),
        (2, 62, 3, 0), (3, 34, 0, 1), (0, 5, 1, 2), (1, 36, 2, 3),
    ):  # fmt: skip
        h[dst] = (_rot64(h[dst], rot) + h[add]) & MASK64
        h[xor] ^= h[dst]


def _short_end(h: list[int]) -> None:
    """SpookyHash ShortEnd, in place on [h0, h1, h2, h3]."""
    # (xored, by, rotated, rotation) for each of the 11 steps: h[x] ^= h[y];
    # h[y] = rot(h[y], r); h[x] += h[y].
    for x, y, rot in (
        (3, 2, 15), (0, 3, 52), (1, 0, 26), (2, 1, 51), (3, 2, 28), (0, 3, 9),
        (1, 0, 47), (2, 1, 54), (3, 2, 32), (0, 3, 25), (1, 0, 63),
    ):  # fmt: skip
        h[x] ^= h[y]
        h[y] = _rot64(h[y], rot)
        h[x] = (h[x] + h[y]) & MASK64


def spooky_short128(message: bytes, seed1: int = 0, seed2: int = 0) -> tuple[int, int]:
    """SpookyHash V2 ``Hash128`` for messages shorter than 192 bytes (``Short``)."""
    if len(message) >= 192:
        raise ValueError("only the short-message path (< 192 bytes) is implemented")
    length = len(message)
    # Little-endian u64 words; the tail is zero-padded, which matches the switch over
    # the remaining bytes in the reference (it only adds bytes that are present).
    padded = message + b"\0" * (-length % 32 + 32)
    words = [int.from_bytes(padded[i : i + 8], "little") for i in range(0, len(padded), 8)]
    h = [seed1 & MASK64, seed2 & MASK64, _SC_CONST, _SC_CONST]
    w = 0
    remainder = length % 32
    if length > 15:
        for _ in range(length // 32):  # whole 32-byte blocks
            h[2] = (h[2] + words[w]) & MASK64
            h[3] = (h[3] + words[w + 1]) & MASK64
            _short_mix(h)
            h[0] = (h[0] + words[w + 2]) & MASK64
            h[1] = (h[1] + words[w + 3]) & MASK64
            w += 4
        if remainder >= 16:  # one more 16-byte half block
            h[2] = (h[2] + words[w]) & MASK64
            h[3] = (h[3] + words[w + 1]) & MASK64
            _short_mix(h)
            w += 2
            remainder -= 16
    h[3] = (h[3] + (length << 56)) & MASK64
    if remainder == 0:
        h[2] = (h[2] + _SC_CONST) & MASK64
        h[3] = (h[3] + _SC_CONST) & MASK64
    else:
        # 1..15 tail bytes: bytes 0..7 go into h2, bytes 8..14 into h3 (added to the
        # length already there); absent bytes are zero in the padded words.
        h[2] = (h[2] + words[w]) & MASK64
        if remainder > 8:
            h[3] = (h[3] + words[w + 1]) & MASK64
    _short_end(h)
    return h[0], h[1]


# --- the endpoint hash ------------------------------------------------------------------


def endpoint_hash(address: Address) -> int:
    """Katran's Maglev endpoint hash (folly ``IPAddress::hash()``), a u64.

    An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) hashes as its IPv4 address, as
    folly does.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return hash_128_to_64(AF_INET, fnv32_broken(ip.packed))
    if isinstance(ip, ipaddress.IPv6Address):
        h1, h2 = spooky_short128(ip.packed, 0, 0)
        return hash_128_to_64(AF_INET6, hash_128_to_64(h1, h2))
    raise TypeError(f"not an IP address: {address!r}")


# --- MurmurHash3_x64_128, one block: the Maglev permutation mix ---------------------------

_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_ADD1 = np.uint64(0x52DCE729)
_ADD2 = np.uint64(0x38495AB5)
_FIVE = np.uint64(5)
_LEN = np.uint64(16)  # the block length MurmurHash3 folds into both halves


# Every constant and shift count is a uint64 so numba never promotes to int64/float64;
# uint64 multiplication wraps mod 2^64 like C.
@numba.njit(cache=True, inline="always")
def _rotl64(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(cache=True, inline="always")
def _fmix64(k: np.uint64) -> np.uint64:
    k ^= k >> np.uint64(33)
    k *= _FMIX1
    k ^= k >> np.uint64(33)
    k *= _FMIX2
    k ^= k >> np.uint64(33)
    return k


@numba.njit(cache=True)
def murmur(a: np.uint64, b: np.uint64, seed: np.uint64) -> np.uint64:
    """One MurmurHash3_x64_128 block over (a, b), halves summed (Katran's MurmurHash3_x64_64)."""
    a = np.uint64(a)
    b = np.uint64(b)
    h1 = np.uint64(seed)
    h2 = np.uint64(seed)
    k1 = _rotl64(a * _C1, 31) * _C2
    h1 ^= k1
    h1 = _rotl64(h1, 27) + h2
    h1 = h1 * _FIVE + _ADD1
    k2 = _rotl64(b * _C2, 33) * _C1
    h2 ^= k2
    h2 = _rotl64(h2, 31) + h1
    h2 = h2 * _FIVE + _ADD2
    h1 ^= _LEN
    h2 ^= _LEN
    h1 += h2
    h2 += h1
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    return h1 + h2


def murmur_u64(a: int, b: int, seed: int) -> int:
    """Python entry point to :func:`murmur`; a, b are u64 and seed a u32 (as in Katran)."""
    if not (0 <= a <= MASK64 and 0 <= b <= MASK64 and 0 <= seed <= MASK32):
        raise ValueError("a and b must be u64 and seed a u32")
    return int(murmur(np.uint64(a), np.uint64(b), np.uint64(seed)))
