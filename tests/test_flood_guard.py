"""The flood guard on the XDP datapath under a live-frames SYN flood.

Established flows are recorded first (BPF_PROG_TEST_RUN), then the generator
(xdp/pktgen.c) tail-calls the balancer with 1,000,000 SYNs of distinct flows from one
CPU, then the VIP's ring changes so that every new hash lands on another real. With the
guard on, every established flow still finds its entry and keeps its real; with it off
(the control, same flood), the flood evicts them and they follow the new ring. Needs
root, bpf() and bcc; builds network namespaces (unique names, always removed).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from lb.config import parse_config
from lb.datapath_tables import compile_tables
from lb.pktgen import PacketGenerator, Sink, build_frame
from netns.ns import Sandbox

pytestmark = [pytest.mark.bpf, pytest.mark.root, pytest.mark.netns]

FLOOD = 1_000_000  # SYNs, each a new flow
RATE = 2_000  # settings.max_conn_rate of the test: new connections per CPU per second
ESTABLISHED = 200
VIP = "2001:db8:100::1"
OLD_REALS, NEW_REAL = ("2001:db8:2::1", "2001:db8:2::2"), "2001:db8:2::3"
TCP_SYN, TCP_ACK = 0x02, 0x10


def config(gw_mac: str, max_conn_rate: int, moved: bool):
    """One TCP VIP. ``moved``: the ring is NEW_REAL only (the old reals stay real entries
    with weight 0, so entries naming them stay valid)."""
    reals = [{"address": a, "weight": 0 if moved else 1} for a in OLD_REALS]
    reals.append({"address": NEW_REAL, "weight": 1 if moved else 0})
    return parse_config({
        "settings": {"gateway_mac": gw_mac, "ring_size": 4099, "max_vips": 4, "max_reals": 16,
                     "conn_table_size": 65536, "max_conn_rate": max_conn_rate},
        "vips": [{"address": VIP, "port": 80, "protocol": "tcp", "reals": reals}],
    })


def outer_dst(out: bytes) -> str:
    """The real an encapsulated IPv6 frame goes to (outer IPv6 destination)."""
    return str(ipaddress.IPv6Address(out[14 + 24:14 + 40]))


@pytest.fixture(scope="module")
def bed():
    """gen netns --veth--> sink netns (counts and drops what the balancer sends), the
    generator, and one balancer for both tests (each loads its own tables)."""
    from lb.bpf_loader import XdpBalancer

    with Sandbox() as lab:
        gns, sns = lab.netns("lbfg"), lab.netns("lbfs")
        a, b = lab.veth(gns, sns, "fg", queues=1)
        sink = Sink(b.name, b.ns)
        lab.on_teardown(sink.close)
        gen = PacketGenerator()
        lab.on_teardown(gen.close)
        bal = XdpBalancer.from_tables(compile_tables(config(b.mac, 0, moved=False)))
        lab.on_teardown(bal.close)
        yield gns, a, b, gen, bal
    assert not lab.teardown_errors


def run_flood(bed, max_conn_rate: int) -> tuple[dict[str, int], int]:
    """Record ESTABLISHED flows, flood, move the ring, send the flows' ACKs. Returns the
    flood's counter deltas and how many established flows kept their real."""
    from lb.kernel.testrun import test_run

    gns, a, b, gen, bal = bed
    a_mac, b_mac = a.mac_bytes, b.mac  # (each a netlink round trip into the namespace)
    bal.load_tables(compile_tables(config(b_mac, max_conn_rate, moved=False)))
    bal.clear_conn_table()

    def frame(sport: int, flags: int, src: str = "2001:db8:5::1") -> bytes:
        return build_frame(6, "tcp", 74, src=src, dst=VIP, sport=sport, dport=80,
                           dst_mac=a_mac, tcp_flags=flags)

    first: dict[int, str] = {}
    for sport in range(20000, 20000 + ESTABLISHED):
        _, out, _ = test_run(bal.prog_fd, frame(sport, TCP_SYN))
        first[sport] = outer_dst(out)
    assert set(first.values()) == set(OLD_REALS)

    before = bal.read_stats().counters
    gen.set_template(frame(40000, TCP_SYN, src="2001:db8:6::"), flows=FLOOD, vary="src_addr")
    gen.attach_tail_call(bal.prog_fd)
    try:
        r = gen.run(FLOOD, a.index, netns=gns, cpu=min(os.sched_getaffinity(0)))
    finally:
        gen.detach_tail_call()
    assert r.packets == FLOOD and not r.tail_missed
    after = bal.read_stats().counters
    flood = {k: after[k] - before[k] for k in after if after[k] != before[k]}

    bal.load_tables(compile_tables(config(b_mac, max_conn_rate, moved=True)))
    kept = 0
    for sport, real in first.items():
        _, out, _ = test_run(bal.prog_fd, frame(sport, TCP_ACK))
        assert outer_dst(out) in (real, NEW_REAL)
        kept += outer_dst(out) == real
    return flood, kept


def test_a_syn_flood_does_not_evict_established_flows(bed) -> None:
    flood, kept = run_flood(bed, RATE)
    assert flood["rx_packets"] == flood["tx_encap"] == flood["lru_miss"] == FLOOD
    # at most RATE recorded per window on the generator's CPU; the flood lasts a few
    # windows at most even on a loaded machine
    assert FLOOD - 10 * RATE <= flood["flood_new_conns"] < FLOOD
    assert kept == ESTABLISHED


def test_without_the_guard_the_same_flood_evicts_them(bed) -> None:
    """The control: max_conn_rate 0 (off). 1,000,000 new entries in 131,072 (2 CPUs x
    65,536) leave next to no established entry, so the ACKs follow the new ring."""
    flood, kept = run_flood(bed, 0)
    assert "flood_new_conns" not in flood
    assert kept < ESTABLISHED // 10
