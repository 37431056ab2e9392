"""CIDR VIPs end to end in the lab: one VIP per family is a prefix (tcp/80), two reals
behind each. Real TCP connections to two addresses inside each prefix are answered by
those reals (through the XDP balancer and the reals' decap); an address just outside the
prefix, routed to the balancer all the same, is not ours: passed to the balancer host
(which does not route it), never forwarded to a real."""

from __future__ import annotations

import subprocess

import pytest

from lb.config import parse_config
from netns.lab import Lab
from netns.servers import http_requests
from netns.teardown import leftovers
from netns.topology import HTTP_PORT, seg4, seg6

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

PREFIX4, PREFIX6 = "198.18.64.0/24", "2001:db8:64::/48"
INSIDE4, INSIDE6 = ("198.18.64.10", "198.18.64.250"), ("2001:db8:64::10", "2001:db8:64:ffff::1")
OUTSIDE4, OUTSIDE6 = "198.18.65.1", "2001:db8:65::1"
REALS = 2


def _config():
    return parse_config({
        "settings": {"gateway_mac": "02:00:00:00:00:01", "conn_table_size": 65536},
        "vips": [
            {"address": PREFIX4, "port": HTTP_PORT, "protocol": "tcp",
             "reals": [{"address": seg4(100 + i, 2)} for i in range(1, REALS + 1)]},
            {"address": PREFIX6, "port": HTTP_PORT, "protocol": "tcp",
             "reals": [{"address": seg6(100 + i, 2)} for i in range(1, REALS + 1)]},
        ],
    })


@pytest.fixture(scope="module")
def lab():
    lab = Lab(reals=REALS, datapath="xdp", config=_config())
    with lab:
        lb1 = lab.host("lb1")
        # the router sends the outside addresses to the balancer too: the balancer decides
        for dst, via in ((OUTSIDE4 + "/32", lb1.addr4), (OUTSIDE6 + "/128", lb1.addr6)):
            subprocess.run(["ip", "-n", lab.router_ns, "route", "add", dst, "via", via], check=True,
                           capture_output=True)
        yield lab
    left = leftovers(lab.state, lab.state_path)
    assert not left, f"the lab left things behind: {left}"


@pytest.mark.parametrize("inside", [INSIDE4, INSIDE6], ids=["ipv4", "ipv6"])
def test_two_addresses_inside_the_prefix_are_served(lab, inside) -> None:
    before = lab.balancer_stats()
    for dst in inside:
        res = http_requests(lab.client().ns, dst, HTTP_PORT, n=20)
        assert all(r.real in ("r1", "r2") for r in res), [r.error for r in res if r.real is None]
        assert {r.real for r in res} == {"r1", "r2"}  # balanced over both reals
    after = lab.balancer_stats()
    # each connection: SYN, ACK, request, FIN... all through the prefix lookup
    assert after["vip_prefix_matched"] - before["vip_prefix_matched"] >= 2 * 20 * 3
    assert after["tx_encap"] - before["tx_encap"] == after["vip_prefix_matched"] - before["vip_prefix_matched"]


@pytest.mark.parametrize("outside", [OUTSIDE4, OUTSIDE6], ids=["ipv4", "ipv6"])
def test_an_address_outside_the_prefix_is_not_ours(lab, outside) -> None:
    before = lab.balancer_stats()
    res = http_requests(lab.client().ns, outside, HTTP_PORT, n=2, timeout=1.0)
    assert all(r.real is None for r in res)
    after = lab.balancer_stats()
    assert after["pass_not_vip"] - before["pass_not_vip"] >= 2  # the SYNs reached it, passed
    assert after["tx_encap"] == before["tx_encap"] and after["vip_prefix_matched"] == before["vip_prefix_matched"]
