"""`lbctl demo` builds its frames from scapy templates; they must be what scapy builds."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from lb.demo import CLIENT_MAC, LB_MAC, _frames_of, _retarget


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(("client", "sport", "dport"), [("198.18.3.7", 1024, 80), ("198.18.99.254", 65534, 1),
                                                        ("198.18.0.1", 40000, 65535)])
def test_retargeted_frames_are_scapys(protocol, client, sport, dport):
    ip = Ether(dst=LB_MAC, src=CLIENT_MAC) / IP(src=client, dst="198.18.100.1")
    if protocol == "tcp":
        want = [raw(ip / TCP(sport=sport, dport=dport, flags=f)) for f in ("S", "A", "PA")]
    else:
        want = [raw(ip / UDP(sport=sport, dport=dport) / bytes([n])) for n in range(3)]
    assert [_retarget(t, client, sport, dport) for t in _frames_of("198.18.100.1", protocol)] == want
