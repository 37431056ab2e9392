"""Stateless VIPs in the control plane: previous rings kept for settings.second_chance_s
after a ring change (control.ring_history), written to the datapath (prev_rings, prev_ref),
carried by packets as hop lists, persisted with the state and dropped when they expire.
Runs on the userspace port (the numba datapath), with an injected wall clock."""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
from control_helpers import make_config, real_addr, vip_dict
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from control.datapaths import UserspacePort
from control.plane import open_plane
from control.ring_history import (
    PrevRing,
    history_from_json,
    history_to_json,
    next_history,
)
from control.store import DesiredState, Store
from control.tables import Sizes
from lb import constants as C
from lb.config import ConfigError, parse_config

GUE = {"encap": "gue", "gue": {"source_v4": "198.18.0.254", "source_v6": "2001:db8:fffe::254"}}
WINDOW = 600
VIP = "198.18.100.1"


def _cfg(weights=(1, 1), default_too: bool = False):
    vips = [vip_dict(0, [(i, w) for i, w in enumerate(weights)], flags=["stateless"])]
    if default_too:
        vips.append(vip_dict(1, [(i, w) for i, w in enumerate(weights)]))
    return make_config(vips, ring_size=257, **GUE, second_chance_s=WINDOW)


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _plane(cfg, store=None):
    clock = Clock()
    plane = open_plane(UserspacePort(Sizes.of(cfg.settings)), store, cfg)
    plane.core.wall_clock = clock
    return plane, clock


def _key(i: int = 0):
    return (str(ipaddress.ip_address("198.18.100.1") + i), 80, "tcp")


def _hops(out: bytes) -> list[str]:
    """The hop list of an output frame (IPv4 outer), [] for a plain GUE frame."""
    udp = 14 + 20
    gue = out[udp + 8:]
    if out[14 + 9] != 17 or (gue[0] >> 6) != 0 or gue[0] == 0x45:
        return []
    typ, nxt, cnt = struct.unpack("!HBB", gue[4:8])
    assert typ == C.GUE_HOPLIST_TYPE and nxt == 1
    return [str(ipaddress.IPv4Address(gue[8 + 4 * i: 12 + 4 * i])) for i in range(cnt)]


def _flows(plane, n: int = 300, dst: str = VIP) -> list[tuple[str, list[str]]]:
    """(real, hops) of n TCP ACKs from different clients through the port's datapath."""
    frames = [raw(Ether() / IP(src=f"198.18.{1 + i // 250}.{1 + i % 250}", dst=dst)
                  / TCP(sport=1000 + i, dport=80, flags="A")) for i in range(n)]
    r = plane.core.port.dp.process_frames(frames, now=1)
    out = []
    for i in range(n):
        assert int(r.actions[i]) == C.XDP_TX
        o = r.output(i)
        out.append((str(ipaddress.IPv4Address(o[30:34])), _hops(o)))
    return out


def test_a_ring_change_keeps_the_previous_ring_and_packets_carry_it() -> None:
    plane, clock = _plane(_cfg())
    before = _flows(plane)
    assert all(h == [] for _, h in before)  # no change yet: plain GUE
    plane.commands.add_real(_key(), {"address": real_addr(2), "weight": 1})
    after = _flows(plane)
    moved = [(b[0], a) for b, a in zip(before, after) if a[0] != b[0]]
    assert moved, "adding a real moved no flow"
    for old_real, (new_real, hops) in moved:
        assert hops == [new_real, old_real]  # the new real first, the old one second
    assert all(h == [] for (b, _), (a, h) in zip(before, after) if a == b)
    hist = plane.core.tables.history[_key()]
    assert len(hist) == 1 and hist[0].expires == pytest.approx(clock.now + WINDOW)
    assert plane.core.port.prev_refs() != {}
    assert plane.core.state.ring_history == plane.core.tables.history  # stored with the change
    # expiry: nothing before the window ends, everything after
    clock.now += WINDOW - 1
    assert not plane.runtime.expire_prev_rings()
    clock.now += 2
    assert plane.runtime.expire_prev_rings()
    assert plane.core.port.prev_refs() == {} and not plane.core.tables.history
    assert all(h == [] for _, h in _flows(plane))


def test_weights_change_twice_then_a_third_time_drops_the_oldest_loudly(caplog) -> None:
    plane, clock = _plane(_cfg(weights=(1, 1, 1)))
    r0 = _flows(plane)
    plane.commands.update_real(_key(), real_addr(0), {"weight": 3})
    clock.now += 10
    plane.commands.update_real(_key(), real_addr(1), {"weight": 4})
    r2 = _flows(plane)
    assert len(plane.core.tables.history[_key()]) == 2
    assert max(len(h) for _, h in r2) == 3
    for (first, _), (real, hops) in zip(r0, r2):
        if hops:
            assert hops[0] == real and first in hops  # the first ring's real is still there
    assert plane.core.counters["prev_rings_dropped_early"] == 0
    clock.now += 10
    plane.commands.update_real(_key(), real_addr(2), {"weight": 5})
    assert len(plane.core.tables.history[_key()]) == 2
    assert plane.core.counters["prev_rings_dropped_early"] == 1
    assert "dropped early" in caplog.text
    # a change back to a ring still held removes it from the history
    plane.commands.update_real(_key(), real_addr(2), {"weight": 1})
    keys = [e.key for e in plane.core.tables.history[_key()]]
    assert len(keys) == len(set(keys)) and plane.core.tables.parts[_key()].ring_input[0] == "maglev_v2"


def test_default_vips_keep_no_previous_ring() -> None:
    plane, _ = _plane(_cfg(default_too=True))
    plane.commands.add_real(_key(1), {"address": real_addr(2), "weight": 1})
    assert not plane.core.tables.history and plane.core.port.prev_refs() == {}


def test_a_restarted_balancer_with_wiped_maps_knows_the_previous_ring(tmp_path) -> None:
    store = Store(tmp_path)
    plane, _ = _plane(_cfg(), store)
    before = _flows(plane)
    plane.commands.add_real(_key(), {"address": real_addr(2), "weight": 1})
    want = _flows(plane)
    store.unlock()
    # a new process: fresh (empty) maps, the state from the store
    plane2, _ = _plane(_cfg(), Store(tmp_path))
    assert _flows(plane2) == want
    assert any(h for _, h in want) and before != want


def test_the_slots_of_the_maps_are_not_reused_while_named() -> None:
    plane, _ = _plane(_cfg(weights=(1, 1, 1)))
    plane.commands.update_real(_key(), real_addr(0), {"weight": 2})
    first = dict(plane.core.tables.prev.inputs)
    plane.commands.update_real(_key(), real_addr(1), {"weight": 2})
    second = plane.core.tables.prev.inputs
    for slot, inp in first.items():  # the older ring kept its slot
        assert second[slot] == inp
    assert len(second) == 2


def test_history_json_round_trip_and_state_document(tmp_path) -> None:
    h = {_key(): (PrevRing("maglev_v2", ((real_addr(0), 1), (real_addr(1), 2)), 123.5),)}
    assert history_from_json(history_to_json(h)) == h
    cfg = _cfg()
    from control.ids import EMPTY, allocate

    ids = allocate(EMPTY, [v.key for v in cfg.vips], [r.address for v in cfg.vips for r in v.reals], 8, 32)
    st = DesiredState(cfg, ids, frozenset(), 3, None, h)
    store = Store(tmp_path)
    store.save(st)
    assert store.load().ring_history == h


def test_next_history_drops_expired_and_non_stateless() -> None:
    plane, clock = _plane(_cfg(default_too=True))
    parts = plane.core.tables.parts
    old = {_key(): PrevRing("maglev_v2", ((real_addr(5), 1),), clock.now - 1),
           _key(1): PrevRing("maglev_v2", ((real_addr(5), 1),), clock.now + 99)}
    hist, dropped = next_history({k: (v,) for k, v in old.items()}, parts, parts, clock.now, WINDOW)
    assert hist == {} and dropped == []


@pytest.mark.parametrize(("settings", "reals", "where"), [
    ({}, ["198.19.0.1"], "vips[0].flags[0]"),
    (GUE, ["198.19.0.1", "2001:db8:1::1"], "vips[0].reals"),
])
def test_config_refuses_a_stateless_vip_it_cannot_carry(settings, reals, where) -> None:
    data = {"settings": {"gateway_mac": "00:00:5e:00:53:01", **settings},
            "vips": [{"address": VIP, "port": 80, "protocol": "tcp", "flags": ["stateless"],
                      "reals": [{"address": a} for a in reals]}]}
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert where in str(e.value)


def test_prev_rings_reach_the_tables_of_both_datapaths() -> None:
    plane, _ = _plane(_cfg())
    plane.commands.add_real(_key(), {"address": real_addr(2), "weight": 1})
    t = plane.core.tables.to_datapath_tables()
    (slot, ring), = plane.core.tables.prev.rings.items()
    assert np.array_equal(t.prev_rings[slot], ring)
    assert t.prev_refs[plane.core.tables.vip_nums[_key()]] == slot + 1


def test_metrics_and_status_count_previous_rings() -> None:
    from prometheus_client import generate_latest

    from control.metrics import Metrics

    plane, clock = _plane(_cfg(weights=(1, 1, 1)))
    for i, w in enumerate((2, 3, 4)):  # three changes inside the window
        clock.now += 1
        plane.commands.update_real(_key(), real_addr(i), {"weight": w})
    text = generate_latest(Metrics(plane.core).registry).decode()
    assert "lb_prev_rings 2.0" in text
    assert 'lb_prev_rings_lost_total{reason="dropped_early"} 1.0' in text
    assert plane.views.status()["counters"]["prev_rings_dropped_early"] == 1


@pytest.mark.root
@pytest.mark.bpf
def test_the_xdp_port_holds_what_the_userspace_port_holds() -> None:
    """The same changes on the XDP port (prev_rings mmap'ed, prev_ref map) and on the
    userspace port give the same previous rings and refs."""
    from control.datapaths import XdpPort
    from lb.bpf_loader import XdpBalancer

    cfg = _cfg()
    s = cfg.settings
    bal = XdpBalancer(s.ring_size, s.max_vips, s.max_reals, s.conn_table_size)
    try:
        planes = {}
        for name, port in (("xdp", XdpPort(bal)), ("user", UserspacePort(Sizes.of(s)))):
            plane = open_plane(port, None, cfg)
            plane.commands.add_real(_key(), {"address": real_addr(2), "weight": 1})
            planes[name] = plane
        x, u = planes["xdp"].core, planes["user"].core
        assert x.port.prev_refs() == u.port.prev_refs() != {}
        for slot in x.tables.prev.rings:
            assert np.array_equal(x.port.prev_ring(slot), u.port.prev_ring(slot))
        assert bal.prev_ref(x.tables.vip_nums[_key()]) == next(iter(x.port.prev_refs().values()))
    finally:
        bal.close()
