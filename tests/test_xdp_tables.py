"""The XDP program's helper-free tables: the VIP index (vip_slots) and the
set-associative connection table (conn_sets), through BPF_PROG_TEST_RUN, with the hashes
mirrored in lb/xdp_tables.py."""

from __future__ import annotations


import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from lb import constants as C
from lb import layout
from lb.bpf_loader import XdpBalancer
from lb.kernel.testrun import test_run as bpf_test_run
from lb.xdp_tables import VipIndexError, build_vip_slots, conn_set_hash, conn_tag, vip_hash

from test_xdp_basic import CLIENT4, LB_MAC, ROUTER_MAC, VIP4, build_tables

pytestmark = [pytest.mark.bpf, pytest.mark.root]


def _vip_key(i: int) -> bytes:
    k = np.zeros(1, dtype=layout.VIP_KEY)
    k[0]["addr"][:4] = np.frombuffer(bytes([198, 18, i >> 8, i & 0xFF]), dtype=np.uint8)
    k[0]["port"], k[0]["proto"], k[0]["family"] = 80, C.IPPROTO_TCP, C.FAMILY_V4
    return k.tobytes()


def test_vip_index_places_every_key_near_home() -> None:
    nslots = C.vip_slots(C.MAX_VIPS)
    keys = [_vip_key(i) for i in range(C.MAX_VIPS)]
    metas = [(i).to_bytes(4, "little") + (i).to_bytes(4, "little") for i in range(len(keys))]
    slots, seed = build_vip_slots(keys, metas, nslots)
    raw_slots = slots.view(np.uint8).reshape(nslots, layout.VIP_SLOT.itemsize)
    for key, meta in zip(keys, metas):
        home = vip_hash(key, seed) & (nslots - 1)
        found = [(home + d) & (nslots - 1) for d in range(C.VIP_PROBES)
                 if raw_slots[(home + d) & (nslots - 1), :20].tobytes() == key]
        assert len(found) == 1
        assert raw_slots[found[0], 20:28].tobytes() == meta
    assert int(np.count_nonzero(slots["key"]["family"])) == len(keys)
    with pytest.raises(ValueError, match="power of two"):
        build_vip_slots(keys, metas, nslots // 2)
    with pytest.raises(VipIndexError, match="no seed"):  # no seed left to try
        build_vip_slots(keys[:1] * 3, metas[:3], 8, max_seeds=0)


def _syn_ack(sport: int, flags: str) -> bytes:
    return raw(Ether(dst=LB_MAC, src=ROUTER_MAC) / IP(src=CLIENT4, dst=VIP4)
               / TCP(sport=sport, dport=80, flags=flags))


def _flow_key(sport: int) -> bytes:
    k = np.zeros(1, dtype=layout.FLOW_KEY)
    k[0]["src"][:4] = np.frombuffer(bytes(map(int, CLIENT4.split("."))), dtype=np.uint8)
    k[0]["dst"][:4] = np.frombuffer(bytes(map(int, VIP4.split("."))), dtype=np.uint8)
    k[0]["sport"], k[0]["dport"] = sport, 80
    k[0]["proto"], k[0]["family"] = C.IPPROTO_TCP, C.FAMILY_V4
    return k.tobytes()


@pytest.fixture(scope="module")
def bal():
    b = XdpBalancer.from_tables(build_tables(conn_table_size=64))
    yield b
    b.close()


def _send(b: XdpBalancer, sport: int, flags: str) -> tuple[str, str]:
    s0 = b.read_stats().counters
    action, out, _ = bpf_test_run(b.prog_fd, _syn_ack(sport, flags))
    s1 = b.read_stats().counters
    lru = "hit" if s1["lru_hit"] > s0["lru_hit"] else "miss"
    return lru, ".".join(str(x) for x in out[30:34])  # outer destination = the real


def _same_set(b: XdpBalancer, n: int) -> list[int]:
    by_set: dict[int, list[int]] = {}
    for sport in range(1024, 60000):
        ports = by_set.setdefault(b.conn_set_index(_flow_key(sport)), [])
        ports.append(sport)
        if len(ports) == n:
            return ports
    raise AssertionError("no set got enough flows")


def _move_ring(b: XdpBalancer) -> None:
    """Every slot of the IPv4 VIP's ring to another real: only the table keeps flows."""
    ring = b.ring(0)
    b.update_ring(0, (ring % 3) + 1)


def test_conn_set_is_lru_within_a_set(bal) -> None:
    bal.clear_conn_table()
    f = _same_set(bal, C.CONN_WAYS + 1)
    first = {p: _send(bal, p, "S")[1] for p in f[:C.CONN_WAYS]}  # fills the set
    assert bal.conn_table_count() == C.CONN_WAYS
    assert _send(bal, f[0], "A") == ("hit", first[f[0]])  # f[0] becomes most recent
    _send(bal, f[-1], "S")  # a fifth flow evicts the least recently used: f[1]
    assert bal.conn_table_count() == C.CONN_WAYS
    keys, _ = bal.conn_table_entries()  # every key still beside its entry after the moves
    assert {k.tobytes() for k in keys} == {_flow_key(p) for p in (f[0], *f[2:])}
    ring0 = bal.ring(0)
    try:
        _move_ring(bal)
        for p in (f[0], *f[2:C.CONN_WAYS]):
            assert _send(bal, p, "A") == ("hit", first[p])  # kept their real
        lru, real = _send(bal, f[1], "A")
        assert lru == "miss" and real != first[f[1]]  # evicted: hashed on the new ring
    finally:
        bal.update_ring(0, ring0)


def test_torn_entry_is_a_miss_not_a_wrong_real(bal) -> None:
    bal.clear_conn_table()
    (p,) = _same_set(bal, 1)
    real = _send(bal, p, "S")[1]
    keys, values = bal.conn_table_entries()
    assert len(keys) == 1 and keys[0].tobytes() == _flow_key(p)
    row = int(bal._conn._used()[0])
    entry = bal._conn._ways[row].copy().view(layout.CONN_ENTRY)[0]
    h = conn_set_hash(_flow_key(p), bal._vip_index.conn_seed)
    assert int(entry["tag"]) & ~3 == conn_tag(h, int(values[0]["real_id"]))  # C == mirror
    ways = bal._conn._ways  # the mapping: change the entry's real id, not its tag
    ways[row, layout.CONN_ENTRY.fields["real_id"][1]] ^= 0x3  # real id 1 <-> 2, 3 <-> 0
    assert _send(bal, p, "A") == ("miss", real)  # the ring decides again
    assert _send(bal, p, "A") == ("hit", real)  # and the entry was rewritten whole


def test_vip_index_switches_whole(bal) -> None:
    tables = build_tables(conn_table_size=64)
    half = bal._vip_index.live_half
    assert _send(bal, 1111, "S")[1].startswith("198.19.0.")
    only_v6 = build_tables(conn_table_size=64)
    only_v6.vip_keys, only_v6.vip_metas = tables.vip_keys[1:], tables.vip_metas[1:]
    bal.load_tables(only_v6)
    assert bal._vip_index.live_half == half ^ 1
    action, _, _ = bpf_test_run(bal.prog_fd, _syn_ack(1111, "S"))
    assert C.ACTION_NAMES[action] == "PASS"  # the VIP is gone from the index
    bal.load_tables(tables)
    assert bal._vip_index.live_half == half
    action, _, _ = bpf_test_run(bal.prog_fd, _syn_ack(1111, "S"))
    assert C.ACTION_NAMES[action] == "TX"
