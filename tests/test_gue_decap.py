"""End to end: what the balancer emits with ``encap: gue`` is what our decap program
(xdp/decap.c) accepts, with its UDP checksum filled in or 0. GUE frames made by the XDP
balancer (and, identically, by the userspace datapath) for every family pair,
IPv6-in-IPv4 included, go through the decap program's XDP and tc entries by
BPF_PROG_TEST_RUN; the inner packet must come out byte for byte as the client sent it.
"""

from __future__ import annotations

import pytest
from fixtures import CLIENT4, GUE_PORT, _tcp, fixture_tables_gue
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from lb import constants as C
from lb.kernel.testrun import test_run
from lb.datapath import UserspaceDatapath
from lb.decap_loader import DecapProgram

pytestmark = [pytest.mark.bpf, pytest.mark.root]

TC_ACT_OK = 0

# (name, client frame, outer family expected)
FLOWS = [
    ("4in4", _tcp("198.18.110.1", payload=b"hello over gue", tos=0x28, ttl=9), 4),
    ("udp-4in4", raw(Ether(dst="02:00:00:00:00:01") / IP(src=CLIENT4, dst="198.18.110.1", ttl=3)
                     / UDP(sport=5353, dport=53) / Raw(b"q" * 100)), 4),
    ("6in6", _tcp("2001:db8:110::1", payload=b"six", tc=0x28, fl=99, hlim=7), 6),
    ("4in6", _tcp("198.18.110.3", payload=b"four in six", sport=999), 6),
    ("6in4", _tcp("2001:db8:110::2", payload=b"six in four" * 50), 4),
    ("6in4-at-mtu", _tcp("2001:db8:110::2", size=1372), 4),
]


@pytest.fixture(scope="module")
def balancer():
    from lb.bpf_loader import XdpBalancer

    tables = fixture_tables_gue()
    bal = XdpBalancer.from_tables(tables)
    yield bal, tables
    bal.close()


@pytest.fixture(scope="module", params=["xdp", "tc"])
def decap(request):
    prog = DecapProgram(request.param, gue_port=GUE_PORT)
    yield prog
    prog.close()


@pytest.mark.parametrize(("name", "frame", "outer"), FLOWS, ids=[f[0] for f in FLOWS])
def test_balancer_gue_output_decapsulates_to_the_client_packet(balancer, decap, name, frame, outer):
    bal, tables = balancer
    bal.clear_conn_table()
    action, gue_frame, _ = test_run(bal.prog_fd, frame)
    assert action == C.XDP_TX
    assert gue_frame == UserspaceDatapath(tables).process_frames([frame], now=1).output(0)
    outer_ip = Ether(gue_frame).payload
    assert isinstance(outer_ip, IP if outer == 4 else IPv6) and UDP in outer_ip
    assert outer_ip[UDP].dport == GUE_PORT
    assert outer_ip[UDP].chksum != 0  # filled in, as Katran does
    # the same frame with checksum 0 (RFC 6935 tunnels; what we sent before): accepted too
    csum_at = 14 + (20 if outer == 4 else 40) + 6
    zeroed = gue_frame[:csum_at] + b"\0\0" + gue_frame[csum_at + 2:]

    for sent in (gue_frame, zeroed):
        decap.reset_stats()
        action, out, _ = test_run(decap.prog_fd, sent, out_size=len(sent) + 512)
        assert action == (C.XDP_PASS if decap.mode == "xdp" else TC_ACT_OK)
        inner = frame[14:]
        ethertype = C.ETH_P_IPV6 if inner[0] >> 4 == 6 else C.ETH_P_IP
        # the outer frame's MACs stay, the ethertype becomes the inner family's
        assert out == sent[:12] + ethertype.to_bytes(2, "big") + inner
        stats = decap.read_stats()
        assert stats["gue"] == 1 and sum(stats.values()) == 1, stats



@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_udp_and_tcp_through_balancer_and_decap_with_gue(family):
    """The namespace lab (netns/lab.py) switched to ``encap: gue``: real UDP echo and HTTP
    exchanges from the client namespace reach the reals through the XDP balancer and
    the reals' decap program, and every request is answered."""
    from lb.config import config_to_dict, parse_config
    from netns.lab import Lab
    from netns.servers import http_requests, udp_flows
    from netns.topology import UDP_PORT, VIP4, VIP6

    vip = VIP4 if family == 4 else VIP6
    with Lab(reals=2, datapath="xdp") as lab:
        data = config_to_dict(lab.config)
        data["settings"].update(encap="gue", gue={"source_v4": "198.18.0.254", "source_v6": "2001:db8:fffe::254"})
        lab.apply(parse_config(data))
        before, dbefore = lab.balancer_stats(), lab.decap_stats()
        replies = udp_flows(lab.client().ns, vip, UDP_PORT, flows=10, per_flow=3)
        results = http_requests(lab.client().ns, vip, n=20, concurrency=5)
        assert all(name is not None for names in replies.values() for name in names), replies
        assert all(r.real is not None for r in results), results[:3]
        tx = lab.balancer_stats()["tx_encap"] - before["tx_encap"]
        gue = lab.decap_stats()["gue"] - dbefore["gue"]
        assert tx >= 30 + 20 * 3 and gue == tx, (tx, gue)
