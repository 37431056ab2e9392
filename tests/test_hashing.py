"""Katran's endpoint hash and Maglev murmur mix: the vectors of KATRAN_COMPAT.md and more."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.hashing import (
    endpoint_hash,
    fnv32_broken,
    hash_128_to_64,
    murmur_u64,
    spooky_short128,
)
from lb.maglev_reference import murmur_ref

U64 = st.integers(0, 2**64 - 1)

# KATRAN_COMPAT.md "Endpoint hash". MUST NOT change.
ENDPOINT_VECTORS = [
    ("10.0.0.1", 0xD671359DBAA15954),
    ("10.0.0.2", 0x2CD426D008B90279),
    ("10.0.0.3", 0x6EB4A2989236785D),
    ("fc00::1", 0x64E74A25B986D744),
    ("fc00::2", 0x87D247835B02295B),
    ("fc00::3", 0x0B2E5EA98827F017),
]


@pytest.mark.parametrize(("address", "expected"), ENDPOINT_VECTORS)
def test_endpoint_hash_vectors(address: str, expected: int) -> None:
    assert endpoint_hash(address) == expected
    assert endpoint_hash(ipaddress.ip_address(address)) == expected


@pytest.mark.parametrize("v4", ["10.0.0.1", "10.0.0.3", "192.168.255.129", "0.0.0.0"])
def test_ipv4_mapped_hashes_as_ipv4(v4: str) -> None:
    assert endpoint_hash(f"::ffff:{v4}") == endpoint_hash(v4)
    assert endpoint_hash(ipaddress.IPv6Address(f"::ffff:{v4}")) == endpoint_hash(v4)


def test_endpoint_hash_rejects_junk() -> None:
    with pytest.raises(ValueError):
        endpoint_hash("10.0.0.256")
    with pytest.raises(TypeError):
        endpoint_hash(42)  # type: ignore[arg-type]


def test_fnv32_broken() -> None:
    # ASCII bytes: plain FNV-1 (FNV-1 32 of "a" is 0x050c5d7e).
    assert fnv32_broken(b"a") == 0x050C5D7E
    assert fnv32_broken(b"") == 2166136261
    # A byte >= 0x80 is a negative signed char: it XORs in sign-extended.
    assert fnv32_broken(b"\x80") == ((2166136261 * 16777619) & 0xFFFFFFFF) ^ 0xFFFFFF80


def test_hash_128_to_64_is_u64() -> None:
    for u, lo in [(0, 0), (2**64 - 1, 2**64 - 1), (2, 0xFFFFFFFF), (10, 1)]:
        assert 0 <= hash_128_to_64(u, lo) < 2**64
    assert hash_128_to_64(0, 0) == 0  # (0 ^ 0) * k mixes to 0 all the way


# SpookyHash V2 Hash128(bytes(range(n)), seeds 0, 0), from Bob Jenkins' C++ SpookyV2 built
# as a test oracle: covers every branch of the short path, not only the 16 bytes we use.
SPOOKY_VECTORS = [
    (0, 0x232706FC6BF50919, 0x8B72EE65B4E851C7),
    (1, 0x8AE2F41804291280, 0x1F315D714E2D1D29),
    (7, 0xDF46961A1163469D, 0x52A663B93D351D39),
    (8, 0x7C816246374A845C, 0x2C13BCCCC8349657),
    (12, 0x76585DC839CDCA5A, 0xA74A2CCA2D7EA43F),
    (15, 0xD9AA86DE65DC278B, 0xDA240564552A4A10),
    (16, 0x340225D6331F2651, 0x886E7C23939A583D),
    (17, 0x9EFF109B3512E3B9, 0xE52259D521C8DCA4),
    (31, 0xA3962A6C761FFE09, 0x678FC7DA4AC3197A),
    (32, 0x57F50B68E2623FD2, 0x893924EFF994198B),
    (33, 0x3E958DCBEF6DD224, 0x6482A6DA6DE7DC07),
    (48, 0x99813DF6E1AFF986, 0x318EB6F6552A98C2),
    (100, 0x227A73410F9A8C4C, 0x4C4B4B26F70D083A),
    (191, 0x71043A03B5BB462F, 0xFE7D0AD0A893B638),
]


@pytest.mark.parametrize(("n", "h1", "h2"), SPOOKY_VECTORS)
def test_spooky_short_vectors(n: int, h1: int, h2: int) -> None:
    assert spooky_short128(bytes(range(n)), 0, 0) == (h1, h2)


def test_spooky_seeds() -> None:
    assert spooky_short128(bytes(range(16)), 1, 2) == (0x4D613FC99D85935B, 0xFF3188154BAB75C2)
    with pytest.raises(ValueError):
        spooky_short128(bytes(192))


# KATRAN_COMPAT.md "Maglev permutation". MUST NOT change.
def test_murmur_vectors() -> None:
    h = endpoint_hash("10.0.0.1")
    assert murmur_u64(h, 42, 0) == 0x7E0FC224EE1BBBE7
    assert murmur_u64(h, 2718281828, 2307) == 0x3E1F071290CB4773
    assert murmur_ref(h, 42, 0) == 0x7E0FC224EE1BBBE7
    assert murmur_ref(h, 2718281828, 2307) == 0x3E1F071290CB4773


@settings(max_examples=300, deadline=None)
@given(a=U64, b=U64, seed=st.integers(0, 2**32 - 1))
def test_murmur_numba_equals_reference(a: int, b: int, seed: int) -> None:
    assert murmur_u64(a, b, seed) == murmur_ref(a, b, seed)


@pytest.mark.parametrize(("a", "b", "seed"), [(-1, 0, 0), (2**64, 0, 0), (0, 0, 2**32)])
def test_murmur_range_checked(a: int, b: int, seed: int) -> None:
    with pytest.raises(ValueError):
        murmur_u64(a, b, seed)
