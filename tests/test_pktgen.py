"""The live-frames generator (xdp/pktgen.c, lb/pktgen.py), the counting sink
(xdp/sink.c) and the namespace helper (netns/ns.py).

Needs root, bpf() and bcc; builds network namespaces (unique names, always removed).
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from lb.constants import XDP_DROP, XDP_TX
from lb.pktgen import (
    PacketGenerator,
    Sink,
    SinkKey,
    build_frame,
    flow_tuple,
    parse_frame,
)
from netns.ns import Sandbox, list_netns

live = [pytest.mark.bpf, pytest.mark.root, pytest.mark.netns]
CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU = CPUS[0]
OTHER_CPU = CPUS[1] if len(CPUS) > 1 else None

CASES = [(4, "udp"), (4, "tcp"), (6, "udp"), (6, "tcp")]


def bpf(fn):
    for m in (pytest.mark.bpf, pytest.mark.root):
        fn = m(fn)
    return fn


def netns_test(fn):
    for m in live:
        fn = m(fn)
    return fn


def ifaces_in_root_ns() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@pytest.fixture(scope="module")
def gen():
    g = PacketGenerator()
    yield g
    g.close()


@pytest.fixture
def bed():
    """gen netns --veth (1 queue, quiet)--> sink netns; torn down after the test."""
    with Sandbox() as lab:
        gns, sns = lab.netns("pgtg"), lab.netns("pgts")
        a, b = lab.veth(gns, sns, "pt", queues=1)
        yield lab, gns, a, b
    assert not lab.teardown_errors
    assert gns.name not in list_netns() and sns.name not in list_netns()


# --- frames and the template (no namespaces) ----------------------------------------------


@pytest.mark.parametrize("family,proto", CASES)
@pytest.mark.parametrize("size", [64, 100, 1514])
def test_build_frame_agrees_with_scapy(family: int, proto: str, size: int) -> None:
    if family == 6 and proto == "tcp" and size < 74:
        size = 74
    f = build_frame(family, proto, size, sport=1234, dport=443)
    assert len(f) == size
    pkt = Ether(f)
    l3 = pkt[IP] if family == 4 else pkt[IPv6]
    l4 = pkt[TCP] if proto == "tcp" else pkt[UDP]
    assert (l4.sport, l4.dport) == (1234, 443)
    # scapy recomputes every checksum when the field is deleted
    for layer in ([l3, l4] if family == 4 else [l4]):
        want = layer.chksum
        del layer.chksum
        assert Ether(bytes(pkt))[type(layer)].chksum == want
    info = parse_frame(f)
    assert info.ip_csum_ok and info.l4_csum_ok


def test_template_validation(gen: PacketGenerator) -> None:
    with pytest.raises(ValueError, match="outside"):
        gen.set_template(build_frame(4, "udp", src="10.0.0.1"))
    with pytest.raises(ValueError, match="outside"):
        gen.set_template(build_frame(6, "udp", dst="fd00::1"))
    with pytest.raises(ValueError, match="outside"):  # the last flow leaves 198.18.0.0/15
        gen.set_template(build_frame(4, "udp", src="198.19.255.250"), flows=10, vary="src_addr")
    with pytest.raises(ValueError, match="length"):
        gen.set_template(build_frame(4, "udp")[:60])
    with pytest.raises(ValueError, match="length"):
        gen.set_template(build_frame(4, "udp", 1514) + b"\0")
    with pytest.raises(ValueError, match="65536"):
        gen.set_template(build_frame(4, "udp"), flows=70000, vary="src_port")
    with pytest.raises(ValueError):
        gen.set_template(build_frame(4, "udp"), vary="dst_port")


@bpf
@pytest.mark.parametrize("family,proto", CASES)
@pytest.mark.parametrize("vary", ["src_port", "src_addr", "both"])
@pytest.mark.parametrize("size", [64, 100, 1514])
def test_template_varies_flows(gen: PacketGenerator, family: int, proto: str, vary: str,
                               size: int) -> None:
    """Non-live BPF_PROG_TEST_RUN output: frame i is flow i % N, checksums right, every
    other byte the template's."""
    n = 7
    if family == 6 and proto == "tcp":
        size = max(size, 74)
    frame = build_frame(family, proto, size, sport=65533)  # the port wraps past 65535
    gen.detach_tail_call()
    gen.set_template(frame, flows=n, vary=vary)
    outs = gen.preview(2 * n + 3)
    l4o = 34 if family == 4 else 54
    varied = {l4o, l4o + 1, l4o + (16 if proto == "tcp" else 6), l4o + (17 if proto == "tcp" else 7)}
    varied |= {24, 25, 26, 27, 28, 29} if family == 4 else set(range(34, 38))
    for i, r in enumerate(outs):
        assert r.action == XDP_TX
        assert len(r.output) == size
        info = parse_frame(r.output)
        assert info.ip_csum_ok and info.l4_csum_ok, i
        assert (str(info.src), info.sport) == flow_tuple(frame, i % n, vary)
        assert (str(info.dst), info.dport) == (str(parse_frame(frame).dst), 80)
        diff = {j for j in range(size) if r.output[j] != frame[j]}
        assert diff <= varied, (i, sorted(diff))
        if i % n == 0:
            assert r.output == frame


@bpf
def test_drop_action(gen: PacketGenerator) -> None:
    gen.set_template(build_frame(4, "udp"), flows=3)
    gen.set_action("drop")
    try:
        assert {r.action for r in gen.preview(4)} == {XDP_DROP}
    finally:
        gen.set_action("tx")


# --- live frames over a veth -----------------------------------------------------------


@netns_test
@pytest.mark.parametrize("family,proto,vary", [(4, "udp", "src_port"), (6, "tcp", "both")])
def test_live_exact_count_and_flows(gen: PacketGenerator, bed, family: int, proto: str,
                                    vary: str) -> None:
    """K live frames over N flows out of the veth: the sink (softirq NAPI, on the
    generator's CPU) counts exactly K, each flow exactly its share."""
    _lab, gns, a, b = bed
    k, n = 100_003, 1000
    frame = build_frame(family, proto, 80, src_mac=a.mac_bytes, dst_mac=b.mac_bytes)
    with Sink(b.name, b.ns, key="flow") as sink:
        gen.detach_tail_call()
        gen.set_template(frame, flows=n, vary=vary)
        gen.reset_counters()
        r = gen.run(k, a.index, netns=gns, cpu=GEN_CPU)
        assert r.packets == k and r.cpus == {GEN_CPU: k}
        c = sink.counts()
        assert a.stats()["tx_dropped"] == 0
        assert c.packets == k, f"sink counted {c.packets} of {k}"
        assert c.bytes == k * len(frame)
        assert c.per_cpu == {GEN_CPU: k}  # softirq on the transmitting CPU
        assert c.key_overflow == 0 and c.key_unparsed == 0
        got = sink.keys()
        info = parse_frame(frame)
        want = {}
        for i in range(n):
            src, sport = flow_tuple(frame, i, vary)
            key = SinkKey(family, info.proto, src, str(info.dst), sport, info.dport)
            want[key] = (k // n + (1 if i < k % n else 0))
        assert {key: v[0] for key, v in got.items()} == want


@netns_test
def test_live_sink_dst_mode(gen: PacketGenerator, bed) -> None:
    _lab, gns, a, b = bed
    with Sink(b.name, b.ns, key="dst") as sink:
        gen.detach_tail_call()
        gen.set_template(build_frame(6, "udp", 64, dst="2001:db8:77::5"), flows=50, vary="src_addr")
        gen.run(10_000, a.index, netns=gns, cpu=GEN_CPU)
        assert sink.keys() == {SinkKey(6, 0, None, "2001:db8:77::5", 0, 0): (10_000, 640_000)}


@netns_test
def test_live_sink_key_table_is_bounded(gen: PacketGenerator, bed) -> None:
    _lab, gns, a, b = bed
    with Sink(b.name, b.ns, key="flow", max_keys=16) as sink:
        gen.detach_tail_call()
        gen.set_template(build_frame(4, "udp"), flows=100)
        gen.run(1000, a.index, netns=gns, cpu=GEN_CPU)
        c = sink.counts()
        assert c.packets == 1000
        assert len(sink.keys()) == 16
        assert c.key_overflow == 1000 - sum(v[0] for v in sink.keys().values()) > 0


@netns_test
@pytest.mark.external("a second CPU")
@pytest.mark.skipif(OTHER_CPU is None, reason="needs two CPUs to separate the sink's NAPI")
def test_live_threaded_napi_loss_is_accounted(gen: PacketGenerator, bed) -> None:
    """Sink NAPI in its own kthread on another CPU: frames the generator makes faster
    than the sink takes them are dropped at the veth (its ring is full) and counted in
    the veth's tx_dropped: sink + dropped == generated."""
    _lab, gns, a, b = bed
    k = 1_000_000
    with Sink(b.name, b.ns) as sink:
        b.set_threaded(True)
        assert b.threaded
        pids = b.pin_napi({OTHER_CPU})
        assert pids
        gen.detach_tail_call()
        gen.set_template(build_frame(4, "udp", 64), flows=1)
        r = gen.run(k, a.index, netns=gns, cpu=GEN_CPU)
        deadline = time.monotonic() + 10  # the kthread may wait for its CPU to drain the ring
        while True:
            c = sink.counts()
            dropped = a.stats()["tx_dropped"]
            if c.packets + dropped >= k or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert r.cpus == {GEN_CPU: k}
        assert set(c.per_cpu) == {OTHER_CPU}
        assert c.packets + dropped == k, (c.packets, dropped)
        assert b.stats()["rx_dropped"] == dropped


@netns_test
@pytest.mark.external("a second CPU")
@pytest.mark.skipif(OTHER_CPU is None, reason="needs two CPUs")
def test_live_two_threads(gen: PacketGenerator, bed) -> None:
    _lab, gns, a, b = bed
    k = 200_001
    with Sink(b.name, b.ns) as sink:
        gen.detach_tail_call()
        gen.set_template(build_frame(4, "tcp", 64), flows=10)
        r = gen.run(k, a.index, threads=2, cpu=[GEN_CPU, OTHER_CPU], netns=gns)
        assert r.packets == k and r.cpus == {GEN_CPU: 100_001, OTHER_CPU: 100_000}
        # two CPUs feed one veth ring: whatever did not fit is in tx_dropped, except
        # whole bulk queues (the kernel's XDP_TX bulk of DEV_MAP_BULK_SIZE = 16 frames)
        # that veth refused at once while the other CPU held its ring: those are freed
        # without being counted anywhere ip-link shows
        deadline = time.monotonic() + 10
        while sink.counts().packets + a.stats()["tx_dropped"] < k and time.monotonic() < deadline:
            time.sleep(0.01)
        delivered, stats = sink.counts().packets, a.stats()
        assert delivered == stats["tx_packets"]  # every frame veth sent reached the sink
        lost = k - delivered - stats["tx_dropped"]
        assert 0 <= lost < k // 2 and lost % 16 == 0, (delivered, stats["tx_dropped"])


# --- tail call into a program under test ----------------------------------------------------


@bpf
def test_tail_call_non_live(gen: PacketGenerator) -> None:
    gw = bytes.fromhex("02aabbccddee")
    fd = gen.configure_tx_stub(gw)
    frame = build_frame(4, "udp", 64, src_mac=bytes.fromhex("020000000011"),
                        dst_mac=bytes.fromhex("020000000022"))
    gen.set_template(frame, flows=4)
    gen.attach_tail_call(fd)
    try:
        outs = gen.preview(5)
    finally:
        gen.detach_tail_call()
    for i, r in enumerate(outs):
        assert r.action == XDP_TX
        assert r.output[:6] == gw and r.output[6:12] == bytes.fromhex("020000000022")
        assert parse_frame(r.output).sport == 10000 + i % 4


@netns_test
def test_tail_call_live(gen: PacketGenerator, bed) -> None:
    """generator -> tail call into the tx stub -> XDP_TX -> veth -> sink, exactly K."""
    _lab, gns, a, b = bed
    k = 50_000
    fd = gen.configure_tx_stub(b.mac_bytes)
    with Sink(b.name, b.ns) as sink:
        gen.set_template(build_frame(6, "udp", 128, dst_mac=a.mac_bytes), flows=100)
        stub_before = gen.tx_stub_count()
        gen.attach_tail_call(fd)
        try:
            r = gen.run(k, a.index, netns=gns, cpu=GEN_CPU)
        finally:
            gen.detach_tail_call()
        assert r.tail_missed == 0
        assert gen.tx_stub_count() - stub_before == k
        assert sink.counts().packets == k


@netns_test
def test_tail_call_missing_program_drops_and_counts(gen: PacketGenerator, bed) -> None:
    _lab, gns, a, b = bed
    with Sink(b.name, b.ns) as sink:
        gen.detach_tail_call()
        gen.set_template(build_frame(4, "udp"))
        gen.set_action("tail")  # empty slot
        try:
            r = gen.run(1000, a.index, netns=gns, cpu=GEN_CPU)
        finally:
            gen.set_action("tx")
        assert r.tail_missed == 1000
        assert sink.counts().packets == 0


# --- the namespace helper always tears down --------------------------------------------


def _build(lab: Sandbox) -> tuple[list[str], list[str]]:
    n1, n2 = lab.netns("pgtx"), lab.netns("pgty")
    a, b = lab.veth(n1, n2, "px", addrs=("198.18.0.1/30", "198.18.0.2/30"))
    c, d = lab.veth(None, n1, "px")  # one end in this (root) namespace
    assert {n1.name, n2.name} <= set(list_netns())
    assert c.name in ifaces_in_root_ns()
    assert a.addresses() == ["198.18.0.1/30"]
    return [n1.name, n2.name], [a.name, b.name, c.name, d.name]


def _assert_gone(ns_names: list[str], if_names: list[str]) -> None:
    assert not set(ns_names) & set(list_netns())
    assert not set(if_names) & ifaces_in_root_ns()
    for n in ns_names:
        assert not os.path.exists(f"/var/run/netns/{n}")


@pytest.mark.root
@pytest.mark.netns
def test_lab_teardown_on_assertion() -> None:
    names: list = []
    with pytest.raises(AssertionError, match="boom"):
        with Sandbox() as lab:
            names.extend(_build(lab))
            assert False, "boom"
    _assert_gone(*names)
    assert not lab.teardown_errors


@pytest.mark.root
@pytest.mark.netns
def test_lab_teardown_on_keyboard_interrupt() -> None:
    names: list = []
    with pytest.raises(KeyboardInterrupt):
        with Sandbox() as lab:
            names.extend(_build(lab))
            raise KeyboardInterrupt
    _assert_gone(*names)


@pytest.mark.root
@pytest.mark.netns
def test_lab_teardown_when_setup_fails_half_way() -> None:
    lab = Sandbox()
    with pytest.raises(ValueError, match="outside"):
        with lab:
            n1 = lab.netns("pgtz")
            lab.veth(n1, None, "pz", addrs=("10.1.1.1/24", None))
    _assert_gone([n1.name], [])
    # cleanups registered with on_teardown run too, and their errors do not stop teardown
    ran = []
    with Sandbox() as lab2:
        n2 = lab2.netns("pgtz")
        lab2.on_teardown(lambda: ran.append(1))
        lab2.on_teardown(lambda: 1 / 0)
    assert ran == [1] and isinstance(lab2.teardown_errors[0], ZeroDivisionError)
    _assert_gone([n2.name], [])


@bpf
@pytest.mark.netns
def test_lab_teardown_with_xdp_attached(gen: PacketGenerator) -> None:
    """A sink still attached when the lab goes (the usual failure path) does not keep the
    namespace alive, and detaching it afterwards is harmless."""
    with pytest.raises(RuntimeError):
        with Sandbox() as lab:
            n1, n2 = lab.netns("pgtx"), lab.netns("pgty")
            a, b = lab.veth(n1, n2, "px")
            sink = Sink(b.name, b.ns)
            raise RuntimeError
    _assert_gone([n1.name, n2.name], [])
    sink.close()


@pytest.mark.root
@pytest.mark.netns
def test_unique_names_and_quiet_links() -> None:
    with Sandbox() as lab:
        n1 = lab.netns("pgtq")
        a, b = lab.veth(n1, None, "pq", queues=1)
        assert a.name[:-1] == b.name[:-1] and len(a.name) == 2 + 6 + 1
        assert a.get_sysctl("addr_gen_mode") == "1"


def test_flow_tuple_wraps_port() -> None:
    f = build_frame(4, "udp", sport=65535)
    assert flow_tuple(f, 1, "src_port") == ("198.18.0.1", 0)
    assert flow_tuple(f, 3, "both") == ("198.18.0.4", 2)
    assert struct.unpack_from("!H", f, 34)[0] == 65535
    assert Counter(flow_tuple(f, i, "src_addr")[1] for i in range(5)) == {65535: 5}
