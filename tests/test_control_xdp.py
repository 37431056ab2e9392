"""The XDP port against the in-memory one: the same plans leave the BPF maps holding
exactly what the MemoryPort holds (records, rings, the down set), rollback included, a
frame run through the program goes where the desired tables say, and a new control plane
on pinned maps finds them as the last one left them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from control_helpers import make_config, real_addr, tables_for, vip_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.datapaths import MemoryPort, XdpPort
from control.ids import EMPTY
from control.reconcile import ApplyError, PutVip, apply, plan
from control.tables import Sizes

pytestmark = [pytest.mark.bpf, pytest.mark.root]

SIZES = Sizes(ring_size=13, max_vips=8, max_reals=32, conn_table_size=64)


@pytest.fixture(scope="module")
def bal():
    from lb.bpf_loader import XdpBalancer

    b = XdpBalancer(SIZES.ring_size, SIZES.max_vips, SIZES.max_reals, SIZES.conn_table_size)
    yield b
    b.close()


def contents(port) -> tuple:
    rings = np.stack([port.ring(n) for n in range(SIZES.max_vips)])
    return (port.vip_entries(), port.vip_addr_entries(), port.real_entries(), port.ctl_entry(), rings.tobytes(),
            port.down_words())


def _reset(bal) -> XdpPort:
    """Empty the maps (the module shares one program)."""
    port = XdpPort(bal)
    empty = MemoryPort(SIZES)
    for n in range(SIZES.max_vips):
        bal.update_ring(n, np.zeros(SIZES.ring_size, dtype=np.uint32))
    from control.reconcile import (
        DeleteVip,
        DeleteVipAddr,
        WriteCtl,
        WriteDownWord,
        WriteReal,
    )
    from control.tables import EMPTY_REAL

    port.apply(WriteCtl(empty.ctl_entry(), port.ctl_entry()))
    for k, m in port.vip_entries().items():
        port.apply(DeleteVip(k, m))
    for k in port.vip_addr_entries():
        port.apply(DeleteVipAddr(k))
    for rid, rec in port.real_entries().items():
        port.apply(WriteReal(rid, EMPTY_REAL, rec))
    for i, word in port.down_words().items():
        port.apply(WriteDownWord(i, 0, word))
    assert contents(port) == contents(empty)
    return port


@st.composite
def transitions(draw):
    """Configs in a row, each with the (VIP, real) pairs its health checks hold down."""
    def one():
        vips, down = [], []
        for i in draw(st.lists(st.integers(0, 6), unique=True, max_size=6)):
            reals = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3)), max_size=5,
                                  unique_by=lambda t: t[0]))
            v6, proto, checked = draw(st.booleans()), draw(st.sampled_from(["tcp", "udp"])), draw(st.booleans())
            v = vip_dict(i, reals, v6=v6, protocol=proto, **({"healthcheck": {"type": "tcp"}} if checked else {}))
            if draw(st.integers(0, 2)) == 0:  # a CIDR VIP (nested prefixes for even and odd i)
                v["address"] = (f"2001:db8:64:{(i // 2) << 8:x}::/{64 - 8 * (i % 2)}" if ":" in v["address"]
                                else f"198.18.{64 + 2 * (i // 2)}.0/{24 - (i % 2)}")
            vips.append(v)
            down.append([real_addr(j, v6) for j, _ in reals if checked and draw(st.booleans())])
        cfg = make_config(vips, gateway_mac=draw(st.sampled_from(["00:00:5e:00:53:01", "02:00:00:00:00:09"])))
        return cfg, [(vip.key, addr) for vip, addrs in zip(cfg.vips, down) for addr in addrs]

    return [one() for _ in range(draw(st.integers(2, 5)))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(transitions())
def test_same_plans_same_maps(bal, configs) -> None:
    xdp = _reset(bal)
    mem = MemoryPort(SIZES)
    ids, prev = EMPTY, None
    for cfg, down in configs:
        desired, ids = tables_for(cfg, ids, prev=prev, down=down)
        p_mem, p_xdp = plan(mem, desired), plan(xdp, desired)
        assert p_mem.summary() == p_xdp.summary()
        apply(p_mem, mem)
        apply(p_xdp, xdp)
        assert contents(xdp) == contents(mem)
        assert plan(xdp, desired).empty
        prev = desired


def test_rollback_on_the_maps(bal) -> None:
    xdp = _reset(bal)
    cfg = make_config([vip_dict(0, [0, 1])])
    desired, ids = tables_for(cfg, EMPTY)
    apply(plan(xdp, desired), xdp)
    before = contents(xdp)
    cfg2 = make_config([vip_dict(0, [0, (1, 3), 2]), vip_dict(1, [3, 4], v6=True)])
    d2, _ = tables_for(cfg2, ids)

    class Failing(XdpPort):
        def apply(self, op):
            if isinstance(op, PutVip) and op.old is None:
                raise OSError(28, "injected: map full")
            super().apply(op)

    with pytest.raises(ApplyError, match="undone"):
        apply(plan(xdp, d2), Failing(bal))
    assert contents(xdp) == before


def test_a_frame_follows_the_tables(bal) -> None:
    from control.flows import FlowQuery, flow_frame
    from lb.kernel.testrun import test_run

    xdp = _reset(bal)
    cfg = make_config([vip_dict(0, [0, 1, 2])])
    desired, ids = tables_for(cfg, EMPTY)
    apply(plan(xdp, desired), xdp)
    bal.clear_conn_table()
    seen = set()
    for sport in range(1000, 1040):
        frame = flow_frame(FlowQuery(src="198.18.0.9", dst="198.18.100.1", sport=sport, dport=80, protocol="tcp"))
        action, out, _ = test_run(bal.prog_fd, frame)
        assert action == 3  # XDP_TX
        seen.add(str(__import__("ipaddress").IPv4Address(out[30:34])))
    assert seen == {real_addr(0), real_addr(1), real_addr(2)}
    # drain real 1 through the tables: new flows avoid it, the VIP's counters kept
    cfg2 = make_config([vip_dict(0, [0, (1, 0), 2])])
    d2, _ = tables_for(cfg2, ids, prev=desired)
    p = plan(xdp, d2, ring_nums=[0])
    assert [type(op).__name__ for op in p.ops] == ["WriteRing"]
    apply(p, xdp)
    for sport in range(2000, 2040):
        frame = flow_frame(FlowQuery(src="198.18.0.9", dst="198.18.100.1", sport=sport, dport=80, protocol="tcp"))
        _, out, _ = test_run(bal.prog_fd, frame)
        assert str(__import__("ipaddress").IPv4Address(out[30:34])) != real_addr(1)
    assert xdp.read_stats().vip[0, 0] == 80


def test_a_restart_on_pinned_maps_adopts_the_down_set(tmp_path) -> None:
    """The daemon dies with a real down for one VIP; a new control plane on the pinned
    maps, with the health verdicts it saved, finds the down set (and everything else) as
    it should be: no writes. A verdict that changed while it was away is one word."""
    import secrets

    from control.plane import open_plane
    from control.store import Store
    from lb.bpf_loader import XdpBalancer

    hc = {"type": "tcp"}
    cfg = make_config([vip_dict(0, [0, 1], healthcheck=hc), vip_dict(1, [1, 2], healthcheck=hc)])
    key = cfg.vips[0].key
    pin_dir = f"/sys/fs/bpf/lbx{secrets.token_hex(4)}"
    try:
        first = XdpBalancer(SIZES.ring_size, SIZES.max_vips, SIZES.max_reals, SIZES.conn_table_size,
                            pin_dir=pin_dir)
        c1 = open_plane(XdpPort(first), Store(tmp_path), cfg)
        c1.runtime.set_health({(key, real_addr(1)): False})
        words = XdpPort(first).down_words()
        assert len(words) == 1 and words == dict(c1.core.tables.down)
        first.close()

        second = XdpBalancer(SIZES.ring_size, SIZES.max_vips, SIZES.max_reals, SIZES.conn_table_size,
                             pin_dir=pin_dir)
        try:
            c2 = open_plane(XdpPort(second), Store(tmp_path), cfg)
            assert sum(c2.core.last_reconcile["writes"].values()) == 0
            assert XdpPort(second).down_words() == words
            # the real came back while nobody watched: the restart clears its bit
            Store(tmp_path).save_health([((key, real_addr(1)), True)])
            c3 = open_plane(XdpPort(second), Store(tmp_path), cfg)
            w = c3.core.last_reconcile["writes"]
            assert w["down_words"] == 1 and XdpPort(second).down_words() == {}
        finally:
            second.close()
    finally:
        XdpBalancer.unpin_dir(pin_dir)

CIDR = {"address": "198.18.64.0/24", "port": 80, "protocol": "tcp"}


def test_a_cidr_vip_is_published_and_withdrawn(bal) -> None:
    """Its prefix goes into vip_prefixes and vip_prefix_addrs, frames to two addresses
    inside it are balanced to its reals and one outside passes; deleting it withdraws
    both entries; a restarted control plane on the pinned maps finds nothing to write."""
    from control.flows import FlowQuery, flow_frame
    from lb.kernel.testrun import test_run

    xdp = _reset(bal)
    cfg = make_config([vip_dict(0, [0]), {**CIDR, "reals": [{"address": real_addr(1)}]}])
    desired, ids = tables_for(cfg, EMPTY)
    apply(plan(xdp, desired), xdp)
    assert len(xdp._trie_entries("vip_prefixes", 24, 8)) == 1
    assert len(xdp._trie_entries("vip_prefix_addrs", 24, 4)) == 1

    def go(dst: str) -> tuple[int, str | None]:
        frame = flow_frame(FlowQuery(src="198.18.0.9", dst=dst, sport=1234, dport=80, protocol="tcp"))
        action, out, _ = test_run(bal.prog_fd, frame)
        return action, (str(__import__("ipaddress").IPv4Address(out[30:34])) if action == 3 else None)

    before = bal.read_stats().counters["vip_prefix_matched"]
    assert go("198.18.64.1") == (3, real_addr(1))
    assert go("198.18.64.254") == (3, real_addr(1))
    assert go("198.18.63.255")[0] == 2  # XDP_PASS: not ours
    assert go("198.18.100.1") == (3, real_addr(0))
    assert bal.read_stats().counters["vip_prefix_matched"] - before == 2

    d2, _ = tables_for(make_config([vip_dict(0, [0])]), ids, prev=desired)
    apply(plan(xdp, d2), xdp)
    assert xdp._trie_entries("vip_prefixes", 24, 8) == {} == xdp._trie_entries("vip_prefix_addrs", 24, 4)
    assert go("198.18.64.1")[0] == 2


def test_cidr_vips_survive_a_restart_on_pinned_maps(tmp_path) -> None:
    from lb.bpf_loader import XdpBalancer
    from lb.kernel.objects import BPFFS

    pin = os.path.join(BPFFS, f"lbx-cidr-{os.getpid()}")
    cfg = make_config([{**CIDR, "reals": [{"address": real_addr(1)}]},
                       {"address": "2001:db8:64::/48", "port": 0, "protocol": "udp",
                        "reals": [{"address": real_addr(2, v6=True)}]}])
    desired, _ = tables_for(cfg, EMPTY)
    try:
        with XdpBalancer(SIZES.ring_size, SIZES.max_vips, SIZES.max_reals, SIZES.conn_table_size,
                         pin_dir=pin) as first:
            apply(plan(XdpPort(first), desired), XdpPort(first))
        with XdpBalancer(SIZES.ring_size, SIZES.max_vips, SIZES.max_reals, SIZES.conn_table_size,
                         pin_dir=pin) as second:
            port = XdpPort(second)
            assert set(port.vip_entries()) == set(desired.vips) and port.vip_addr_entries() == desired.vip_addrs
            assert plan(port, desired).empty
    finally:
        XdpBalancer.unpin_dir(pin)
