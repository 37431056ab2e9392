"""The connection table under pressure, in both datapaths (docs/datapath.md, "Connection
table under pressure").

A table far smaller than the flows sent through it. Each datapath is checked against a
reference model of what the docs promise — per set (XDP: 4 ways; userspace: buckets of
8), the most recently used flows are kept, a hit moves its flow to the front, a miss
inserts at the front and evicts the least recently used — over a random access sequence,
then across a ring change: a flow whose entry survived keeps its real; a flow whose
entry was evicted is hashed on the new ring. Each datapath's own set function is used
(the XDP one mirrored by lb/xdp_tables.py, the userspace one is the twin's own
``conntable.slot``): which flows share a set is the one thing the two datapaths differ
on, so the same sequence evicts different flows in each, and the test asserts each
against its own sets, not byte identity between them.

UDP entries idle longer than 30 s are a miss, with the clock injected: the twin takes
``now`` as an argument; the XDP program reads the kernel clock, so its entries are aged
instead (their ``atime`` moved back through the table's mapping), which is the same to
the program.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import struct
from collections import OrderedDict

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from lb import constants as C
from lb import layout
from lb.config import parse_config
from lb.datapath_tables import compile_tables

pytestmark = [pytest.mark.bpf, pytest.mark.root]

VIP = "198.18.100.1"
CLIENT = "198.18.0.10"
REALS = ["198.19.0.1", "198.19.0.2", "198.19.0.3"]
LB_MAC, ROUTER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe"
PROTO = {"tcp": C.IPPROTO_TCP, "udp": C.IPPROTO_UDP}
SEC = 1_000_000_000


def _tables(conn_table_size: int = 64):
    vips = [{"address": VIP, "port": 80, "protocol": p, "reals": [{"address": r} for r in REALS]}
            for p in ("tcp", "udp")]
    return compile_tables(parse_config({"settings": {"gateway_mac": "00:00:5e:00:53:01", "ring_size": 1009,
                                                     "max_vips": 8, "max_reals": 32,
                                                     "conn_table_size": conn_table_size},
                                        "vips": vips}))


def _frame(sport: int, proto: str = "tcp") -> bytes:
    l4 = TCP(sport=sport, dport=80, flags="A") if proto == "tcp" else UDP(sport=sport, dport=80)
    return raw(Ether(dst=LB_MAC, src=ROUTER_MAC) / IP(src=CLIENT, dst=VIP) / l4)


def _rotate(ring: np.ndarray) -> np.ndarray:
    """Every slot to another real (ids 1 -> 2 -> 3 -> 1): after this, only the
    connection table keeps a flow where it was."""
    return np.where(ring == 0, 0, ring % 3 + 1).astype(np.uint32)


class Xdp:
    """The XDP program through BPF_PROG_TEST_RUN; its table shared by every CPU."""

    name = "xdp"
    ways = C.CONN_WAYS

    def __init__(self, tables) -> None:
        from lb.bpf_loader import XdpBalancer

        self.tables = tables
        self.bal = XdpBalancer.from_tables(tables)
        self.ids = {str(tables.real_address(i)): i for i in range(1, 4)}

    def send(self, sport: int, proto: str = "tcp") -> tuple[int, bool]:
        from lb.kernel.testrun import test_run

        hits = self.bal.read_stats().counters["lru_hit"]
        action, out, _ = test_run(self.bal.prog_fd, _frame(sport, proto))
        assert action == C.XDP_TX
        return self.ids[str(ipaddress.IPv4Address(out[30:34]))], self.bal.read_stats().counters["lru_hit"] > hits

    def set_of(self, sport: int, proto: str = "tcp") -> int:
        k = np.zeros(1, dtype=layout.FLOW_KEY)
        k[0]["src"][:4] = np.frombuffer(ipaddress.IPv4Address(CLIENT).packed, dtype=np.uint8)
        k[0]["dst"][:4] = np.frombuffer(ipaddress.IPv4Address(VIP).packed, dtype=np.uint8)
        k[0]["sport"], k[0]["dport"], k[0]["proto"], k[0]["family"] = sport, 80, PROTO[proto], C.FAMILY_V4
        return self.bal.conn_set_index(k.tobytes())

    def entries(self) -> set[int]:
        keys, _ = self.bal.conn_table_entries()
        return {int(k["sport"]) for k in keys}

    def capacity(self) -> int:
        return self.bal.ncpus * C.conn_sets(self.tables.conn_table_size) * C.CONN_WAYS

    def set_ring(self, vip_num: int, ring: np.ndarray) -> None:
        self.bal.update_ring(vip_num, ring)

    def advance(self, ns: int) -> None:
        """Age every entry by ``ns`` (the program's clock is the kernel's)."""
        words = self.bal._conn._ways.view("<u4")  # the mapping of conn_sets, 4 words an entry
        col = {f: layout.CONN_ENTRY.fields[f][1] // 4 for f in ("atime", "real_id")}
        used = words[:, col["real_id"]] != 0
        words[used, col["atime"]] -= np.uint32(ns >> C.CONN_TIME_SHIFT)  # modulo 2**32, as the program

    def close(self) -> None:
        self.bal.close()


class Twin:
    """The userspace datapath (one instance, one CPU's table) with an injected clock."""

    name = "userspace"
    ways = C.CONN_TABLE_WAYS

    def __init__(self, tables) -> None:
        from lb.datapath.userspace import UserspaceDatapath

        self.tables = tables
        self.dp = UserspaceDatapath(tables)
        self.now = 1_000 * SEC

    def send(self, sport: int, proto: str = "tcp") -> tuple[int, bool]:
        r = self.dp.process_frames([_frame(sport, proto)], self.now)
        assert r.actions[0] == C.XDP_TX
        return int(r.real_ids[0]), bool(r.stats[C.STAT_LRU_HIT])

    def _fk(self, sport: int, proto: str) -> np.ndarray:
        # the twin's flow key words (lb/datapath/balancer.py): address words, then
        # the wire ports read little-endian | proto << 32 | family << 40
        src = ipaddress.IPv4Address(CLIENT).packed + bytes(12)
        dst = ipaddress.IPv4Address(VIP).packed + bytes(12)
        w = struct.unpack("<QQQQ", src + dst)
        ports = int.from_bytes(struct.pack("!HH", sport, 80), "little")
        return np.array([*w, ports | PROTO[proto] << 32 | C.FAMILY_V4 << 40], dtype=np.uint64)

    def set_of(self, sport: int, proto: str = "tcp") -> int:
        from lb.datapath.conntable import slot

        return int(slot(self.dp.conn.mask, self._fk(sport, proto))[0])

    def entries(self) -> set[int]:
        t = self.dp.conn
        used = t.tags != 0
        ports = t.ent[:, :, 4][used] & np.uint64(0xFFFFFFFF)
        return {struct.unpack("!HH", int(p).to_bytes(4, "little"))[0] for p in ports}

    def capacity(self) -> int:
        return self.dp.conn.tags.size

    def set_ring(self, vip_num: int, ring: np.ndarray) -> None:
        rings = self.tables.rings.copy()
        rings[vip_num] = ring
        self.tables = dataclasses.replace(self.tables, rings=rings)
        self.dp.load_tables(self.tables)  # the connection table stays

    def advance(self, ns: int) -> None:
        self.now += ns

    def close(self) -> None:
        pass


@pytest.fixture(params=["xdp", "userspace"])
def dp(request):
    if request.param == "xdp" and os.geteuid() != 0:  # pragma: no cover
        pytest.skip("loading XDP programs needs root")
    d = (Xdp if request.param == "xdp" else Twin)(_tables())
    yield d
    d.close()


class Model:
    """What docs/datapath.md promises: per set, LRU order of at most ``ways`` flows."""

    def __init__(self, dp) -> None:
        self.dp, self.sets = dp, {}

    def access(self, sport: int, real_on_miss: int | None) -> tuple[bool, int | None]:
        """(hit?, the flow's stored real if hit); on a miss the flow is inserted with
        ``real_on_miss`` (None: what the datapath returns, recorded by the caller)."""
        s = self.sets.setdefault(self.dp.set_of(sport), OrderedDict())
        if sport in s:
            s.move_to_end(sport)
            return True, s[sport]
        s[sport] = real_on_miss
        if len(s) > self.dp.ways:
            s.popitem(last=False)  # the least recently used way
        return False, None

    def record(self, sport: int, real: int) -> None:
        self.sets[self.dp.set_of(sport)][sport] = real

    def contents(self) -> set[int]:
        return {p for s in self.sets.values() for p in s}


def test_full_table_evicts_lru_per_set_and_survivors_keep_their_real(dp) -> None:
    rng = random.Random(11)
    cap = dp.capacity()
    flows = list(range(20000, 20000 + 3 * cap))  # three times what the table holds
    model = Model(dp)
    ring_real: dict[int, int] = {}  # flow -> the real the (old) ring gives it
    seq = flows + [rng.choice(flows) for _ in range(4 * cap)]  # every flow, then random reuse
    for sport in seq:
        hit, stored = model.access(sport, None)
        real, got_hit = dp.send(sport)
        assert got_hit == hit, (dp.name, sport)
        if hit:
            assert real == stored
        else:
            model.record(sport, real)
            assert ring_real.setdefault(sport, real) == real  # the ring is deterministic
    assert dp.entries() == model.contents()
    assert len(dp.entries()) <= cap
    full_sets = sum(len(s) == dp.ways for s in model.sets.values())
    assert full_sets > 0.9 * len(model.sets)  # under pressure: the sets are full

    # the ring changes: every slot to another real
    old_ring = dp.tables.rings[0].copy()
    dp.set_ring(0, _rotate(old_ring))
    kept = moved = 0
    for sport in flows:
        hit, stored = model.access(sport, None)
        real, got_hit = dp.send(sport)
        assert got_hit == hit
        if hit:  # its entry survived the pressure: it keeps its real
            assert real == stored == ring_real[sport]
            kept += 1
        else:  # evicted before: hashed on the new ring, so it moved
            assert real == ring_real[sport] % 3 + 1
            model.record(sport, real)
            moved += 1
    assert dp.entries() == model.contents()
    print(f"MEASURED {dp.name} connection table of {cap} entries ({dp.ways} ways), {len(flows)} flows, "
          f"{len(seq)} packets: after a ring change {kept} established flows kept their real "
          f"(entry present), {moved} evicted ones were re-hashed on the new ring")
    assert kept > 0 and moved > 0


def test_udp_entries_expire_after_30_s_tcp_entries_do_not(dp) -> None:
    udp, tcp = 30001, 30002
    r_udp, hit = dp.send(udp, "udp")
    assert not hit
    r_tcp, _ = dp.send(tcp, "tcp")
    ring1 = dp.tables.rings[1].copy()  # the UDP VIP's ring
    ring0 = dp.tables.rings[0].copy()
    dp.set_ring(1, _rotate(ring1))
    dp.set_ring(0, _rotate(ring0))  # a miss now shows as another real
    # idle 29 s: a hit (the XDP program counts in units of 2**20 ns: 1 s of margin)
    dp.advance(29 * SEC)
    assert dp.send(udp, "udp") == (r_udp, True)  # ... and the hit refreshed atime
    dp.advance(29 * SEC)
    assert dp.send(udp, "udp") == (r_udp, True)
    # idle 31 s: a miss; re-hashed on the (changed) ring, and the new entry is used
    dp.advance(31 * SEC)
    assert dp.send(udp, "udp") == (r_udp % 3 + 1, False)
    assert dp.send(udp, "udp") == (r_udp % 3 + 1, True)
    # TCP entries have no idle timeout
    dp.advance(3600 * SEC)
    assert dp.send(tcp, "tcp") == (r_tcp, True)
