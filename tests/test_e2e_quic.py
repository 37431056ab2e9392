"""QUIC connection-id routing end to end in the lab (netns/lab.py, netns/quic.py).

Three reals serve a QUIC VIP (IPv4 and IPv6, udp/443) and hand out connection ids that
carry their server ids (one real per CID layout: v1, v2, v3). A client opens a
connection (its Initial is hashed to some real), then keeps talking from other source
ports — ports chosen so that hashing would send the flow to a *different* real. Every
packet must still reach the real that answered the Initial, and the balancer's
`quic_routed` counter must account for each of them. Both datapaths.
"""

from __future__ import annotations

import pytest

from lb.config import parse_config
from lb.kernel.netns import run_in_netns
from netns.lab import Lab
from netns.quic import quic_session
from netns.teardown import leftovers
from netns.topology import VIP4, VIP6, seg4, seg6

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

PORT = 443
REALS = 3
SERVER_IDS = {1: 0x1001, 2: 0x20002, 3: 0x3000003}  # v1, v2, v3 layouts
SERVER_IDS6 = {1: 0x1101, 2: 0x20102, 3: 0x3000103}
PER_PORT = 3


def _real4(i: int) -> str:
    return seg4(100 + i, 2)  # the lab's real i (its own link address)


def _real6(i: int) -> str:
    return seg6(100 + i, 2)


def _config():
    reals4 = [{"address": _real4(i)} for i in range(1, REALS + 1)]
    reals6 = [{"address": _real6(i)} for i in range(1, REALS + 1)]
    return parse_config({
        "settings": {"gateway_mac": "02:00:00:00:00:01", "conn_table_size": 65536},
        "vips": [
            {"address": VIP4, "port": PORT, "protocol": "udp", "flags": ["quic"], "reals": reals4},
            {"address": VIP6, "port": PORT, "protocol": "udp", "flags": ["quic"], "reals": reals6},
        ],
        "quic_servers": [{"id": SERVER_IDS[i], "real": _real4(i)} for i in SERVER_IDS]
        + [{"id": SERVER_IDS6[i], "real": _real6(i)} for i in SERVER_IDS6],
    })


@pytest.fixture(scope="module", params=["xdp", "userspace"])
def lab(request):
    lab = Lab(reals=REALS, datapath=request.param, config=_config())
    with lab:
        yield lab
    left = leftovers(lab.state, lab.state_path)
    assert not left, f"the lab left things behind: {left}"


def _ports_that_move(lab: Lab, vip: str, client: str, first: int, n: int) -> list[int]:
    """``first``, then ``n`` source ports whose hash picks another real than ``first``'s."""
    home = lab.expected_real(vip, PORT, "udp", client, first)
    out = [first]
    sport = first + 1
    while len(out) < n + 1:
        if lab.expected_real(vip, PORT, "udp", client, sport) != home:
            out.append(sport)
        sport += 1
    return out


def _starts_on_every_real(lab: Lab, vip: str, client: str, first: int) -> list[int]:
    """One first source port per real: sessions that begin (are hashed) on each real, so
    each CID layout (v1/v2/v3: one per real) carries real traffic."""
    starts: dict[str, int] = {}
    sport = first
    while len(starts) < REALS:
        starts.setdefault(lab.expected_real(vip, PORT, "udp", client, sport), sport)
        sport += 1000
    return [starts[name] for name in sorted(starts)]


@pytest.mark.parametrize("family", [4, 6])
def test_connection_survives_source_port_changes(lab, family: int, capsys) -> None:
    vip = VIP4 if family == 4 else VIP6
    client = lab.client()
    client_addr = client.addr4 if family == 4 else client.addr6
    for start in _starts_on_every_real(lab, vip, client_addr, 20000 + family * 7):
        sports = _ports_that_move(lab, vip, client_addr, start, 6)
        before = lab.balancer_stats()
        session = run_in_netns(client.ns, quic_session, vip, PORT, sports, PER_PORT)
        after = lab.balancer_stats()

        home = lab.expected_real(vip, PORT, "udp", client_addr, sports[0])
        assert session.initial_real == home  # the Initial was hashed, as any new flow
        assert set(session.by_port) == set(sports)
        for sport, names in session.by_port.items():
            assert names == [home] * PER_PORT, (
                f"source port {sport} (hash: {lab.expected_real(vip, PORT, 'udp', client_addr, sport)})"
                f" reached {names}, the connection lives on {home}")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        routed = len(sports) * PER_PORT
        assert delta["quic_routed"] == routed
        assert delta["quic_fallback"] == 1  # the Initial
        assert delta["quic_unknown"] == 0
        sid = (SERVER_IDS if family == 4 else SERVER_IDS6)[int(home[1:])]
        with capsys.disabled():
            print(f"\nMEASURED quic v{family} {lab.datapath}: server id {sid:#x}, {routed} packets from"
                  f" {len(sports)} source ports, all on {home} (hashing would have moved"
                  f" {len(sports) - 1} of the ports)")


def test_unknown_server_id_is_hashed(lab) -> None:
    """A DCID naming a server id nobody has falls back to hashing (quic_unknown) and
    the packet reaches the real the hash picks, which says the id is foreign."""
    from netns.quic import CID_LEN, encode_cid, parse, short_packet

    client = lab.client()
    sport = 42000
    home = lab.expected_real(VIP4, PORT, "udp", client.addr4, sport)

    def send() -> bytes:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            s.bind(("0.0.0.0", sport))
            s.sendto(short_packet(encode_cid(0x7777, rand=bytes(CID_LEN)), b"hi"), (VIP4, PORT))
            return s.recvfrom(65536)[0]

    before = lab.balancer_stats()
    reply = parse(run_in_netns(client.ns, send))
    after = lab.balancer_stats()
    assert reply is not None and reply.payload.startswith(f"real={home} sid={0x7777} foreign".encode())
    assert after["quic_unknown"] - before.get("quic_unknown", 0) == 1
