"""The Internet checksum (RFC 1071) in plain Python, for frames built and checked here."""

from __future__ import annotations

import struct


def internet_checksum(data: bytes, start: int = 0) -> int:
    """One's complement of the one's-complement sum of ``data`` as 16-bit big-endian
    words (odd length padded with a zero byte); ``start`` is an extra partial sum
    (e.g. of the pseudo header)."""
    if len(data) % 2:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
