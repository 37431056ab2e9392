"""The kernel's jhash (lookup3), as Katran's datapath uses it for the flow hash.

All functions are numba-compiled and work on 32-bit values held in int64/uint32; every
arithmetic result is masked to 32 bits, as C's u32 does.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from lb.constants import JHASH_INITVAL

_M32 = 0xFFFFFFFF


@nb.njit(cache=True, inline="always")
def _rol32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


@nb.njit(cache=True, inline="always")
def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rol32(b, 14)) & _M32
    a = ((a ^ c) - _rol32(c, 11)) & _M32
    b = ((b ^ a) - _rol32(a, 25)) & _M32
    c = ((c ^ b) - _rol32(b, 16)) & _M32
    a = ((a ^ c) - _rol32(c, 4)) & _M32
    b = ((b ^ a) - _rol32(a, 14)) & _M32
    c = ((c ^ b) - _rol32(b, 24)) & _M32
    return c


@nb.njit(cache=True)
def jhash_2words(a: int, b: int, initval: int) -> int:
    """Kernel ``jhash_2words(a, b, initval)``."""
    iv = (initval + JHASH_INITVAL + (2 << 2)) & _M32
    return _final((a + iv) & _M32, (b + iv) & _M32, iv)


@nb.njit(cache=True, inline="always")
def _get32(k: np.ndarray, off: int) -> int:
    return (
        np.int64(k[off])
        | (np.int64(k[off + 1]) << 8)
        | (np.int64(k[off + 2]) << 16)
        | (np.int64(k[off + 3]) << 24)
    )


@nb.njit(cache=True)
def jhash16(k: np.ndarray, off: int, initval: int) -> int:
    """Kernel ``jhash(k + off, 16, initval)`` over bytes (little-endian word reads)."""
    a = b = c = (JHASH_INITVAL + 16 + initval) & _M32
    a = (a + _get32(k, off)) & _M32
    b = (b + _get32(k, off + 4)) & _M32
    c = (c + _get32(k, off + 8)) & _M32
    # __jhash_mix
    a = ((a - c) & _M32) ^ _rol32(c, 4)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rol32(a, 6)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rol32(b, 8)
    b = (b + a) & _M32
    a = ((a - c) & _M32) ^ _rol32(c, 16)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rol32(a, 19)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rol32(b, 4)
    b = (b + a) & _M32
    # tail: 4 bytes
    a = (a + _get32(k, off + 12)) & _M32
    return _final(a, b, c)


def jhash_bytes(data: bytes, initval: int) -> int:
    """Kernel ``jhash(data, len, initval)`` for any length (reference, pure Python)."""
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & _M32
    k = bytes(data) + b"\0" * 12
    pos = 0
    rol = lambda x, r: ((x << r) | (x >> (32 - r))) & _M32  # noqa: E731
    w = lambda i: int.from_bytes(k[i : i + 4], "little")  # noqa: E731
    while length > 12:
        a = (a + w(pos)) & _M32
        b = (b + w(pos + 4)) & _M32
        c = (c + w(pos + 8)) & _M32
        a = ((a - c) & _M32) ^ rol(c, 4); c = (c + b) & _M32  # noqa: E702
        b = ((b - a) & _M32) ^ rol(a, 6); a = (a + c) & _M32  # noqa: E702
        c = ((c - b) & _M32) ^ rol(b, 8); b = (b + a) & _M32  # noqa: E702
        a = ((a - c) & _M32) ^ rol(c, 16); c = (c + b) & _M32  # noqa: E702
        b = ((b - a) & _M32) ^ rol(a, 19); a = (a + c) & _M32  # noqa: E702
        c = ((c - b) & _M32) ^ rol(b, 4); b = (b + a) & _M32  # noqa: E702
        length -= 12
        pos += 12
    if length == 0:
        return c
    tail = k[pos : pos + length] + b"\0" * (12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    return _final(a, b, c)
