"""The lab itself (netns/lab.py, netns/lab_cli.py): it builds what docs/lab.md says, and
nothing of it survives its end — normal exit, an exception in the test using it, an
exception or Ctrl-C in the middle of the build, ``lbctl lab down`` from another process.

"Nothing" is checked by :func:`netns.teardown.leftovers` against the state recorded while
building: namespaces, links named after the lab in the root namespace, the pinned-map
directory, server processes, loaded BPF programs (XDP on every veth the lab attached
to), the state file and logs.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from collections import Counter

import pytest

from lb import layout
from lb.kernel.maps import map_lookup
from lb.kernel.progs import prog_exists
from netns.datapaths import DatapathUnavailable
from netns.errors import LabError
from netns.lab import Lab
from netns.lab_state import list_labs, load_state
from netns.ns import ALLOWED_NETS, list_netns
from netns.processes import process_alive
from netns.servers import http_requests, udp_flows
from netns.teardown import leftovers, teardown
from netns.topology import EDGE_MTU, HTTP_PORT, INNER_MTU, VIP4, VIP6

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]

LBCTL = [sys.executable, "-m", "lb.cli", "lab"]


class Boom(Exception):
    """Raised on purpose in the middle of things."""


def assert_clean(state: dict, path: str) -> None:
    left = leftovers(state, path)
    assert not left, f"left behind: {left}"


def in_allowed(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in ALLOWED_NETS)


def links(ns: str) -> dict[str, dict]:
    r = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True,
                       check=True)
    return {link["ifname"]: link for link in json.loads(r.stdout)}


# ---- in-process -----------------------------------------------------------------------------

def test_lab_builds_what_it_says_and_leaves_nothing_after_an_exception_mid_test():
    lab = Lab(reals=2)
    with pytest.raises(Boom), lab:
        state = copy.deepcopy(lab.state)
        assert re.fullmatch(r"lbl[0-9a-f]{6}", lab.name)
        assert state["status"] == "ready" and os.path.exists(lab.state_path)
        present = set(list_netns())
        for ns in lab.namespaces:
            assert ns.startswith(lab.name + "-") and ns in present
        router = links(lab.router_ns)
        for h in lab.hosts:
            assert h.ifname.startswith(lab.name) and h.gw_ifname.startswith(lab.name)
            assert len(h.gw_ifname) <= 15
            mine = links(h.ns)[h.ifname]
            want = EDGE_MTU if h.role == "client" else INNER_MTU
            assert mine["mtu"] == router[h.gw_ifname]["mtu"] == want
            assert h.gw_mac == router[h.gw_ifname]["address"]
            for a in (h.addr4, h.addr6, h.gw4, h.gw6, h.real4 or h.addr4, h.real6 or h.addr6):
                assert in_allowed(a), a
        # The balancer writes the router's MAC on its link as the next hop.
        lb = lab.host("lb1")
        bal = lab.backend("lb1").bal
        ctl = map_lookup(bal.map_fd("ctl"), (0).to_bytes(4, "little"), layout.CTL.itemsize)
        assert ctl[:6] == bytes.fromhex(lb.gw_mac.replace(":", ""))
        # Pinned maps, servers and programs exist.
        assert os.path.isdir(os.path.join(lab.pin_root, "lb1"))
        assert os.path.exists(os.path.join(lab.pin_root, "decap_stats"))
        assert len(state["processes"]) == 2 and all(process_alive(p) for p in state["processes"])
        assert state["prog_ids"] and all(prog_exists(i) for i in state["prog_ids"])
        # VIP routes point at the balancer; the reals' default routes at the router.
        r = subprocess.run(["ip", "-n", lab.router_ns, "route", "get", VIP4], capture_output=True,
                           text=True, check=True)
        assert f"via {lb.addr4}" in r.stdout
        r = subprocess.run(["ip", "-n", lab.host("r1").ns, "-6", "route", "show", "default"],
                           capture_output=True, text=True, check=True)
        assert f"via {lab.host('r1').gw6}" in r.stdout
        res = http_requests(lab.client().ns, VIP4, HTTP_PORT, n=20)
        assert all(x.real in ("r1", "r2") for x in res)
        raise Boom("a test failing while the lab is up")
    assert_clean(state, lab.state_path)


@pytest.mark.parametrize("stage,exc", [("links", Boom), ("balancer", KeyboardInterrupt)])
def test_failure_mid_build_leaves_nothing(stage, exc):
    """An exception (KeyboardInterrupt too) when the build reaches ``stage``: the build
    tears down what it had made and re-raises. (A failure after the balancer is up is
    the mid-test case above.)"""
    snapshot: dict = {}
    lab = Lab(reals=2)

    def on_stage(name: str) -> None:
        if name == stage:
            snapshot.update(copy.deepcopy(lab.state))
            raise exc("injected")

    lab.on_stage = on_stage
    with pytest.raises(exc):
        lab.build()
    assert snapshot["status"] == f"building:{stage}"
    if stage == "balancer":  # servers were running, the decap program attached
        assert snapshot["processes"] and snapshot["prog_ids"]
    assert_clean(lab.state, lab.state_path)


def test_userspace_datapath_plugs_in(monkeypatch):
    """datapath="userspace" constructs lb.userspace_io.UserspaceBalancer(tables, ifname,
    netns) for each balancer, starts it, hands it new tables, stops it at teardown (a
    stand-in class here: the contract, not the engine)."""
    made = []

    class StandIn:
        def __init__(self, tables, ifname, netns):
            self.tables, self.ifname, self.netns = tables, ifname, netns
            self.calls = []
            made.append(self)

        def start(self):
            self.calls.append("start")

        def stop(self):
            self.calls.append("stop")

        def stats(self):
            return {"rx_packets": 7}

        def update_tables(self, tables):
            self.calls.append("update_tables")
            self.tables = tables

    fake = types.ModuleType("lb.userspace_io")
    fake.UserspaceBalancer = StandIn
    monkeypatch.setitem(sys.modules, "lb.userspace_io", fake)
    lab = Lab(reals=1, datapath="userspace")
    with lab:
        lb = lab.host("lb1")
        (bal,) = made
        assert (bal.ifname, bal.netns, bal.calls) == (lb.ifname, lb.ns, ["start"])
        assert bytes(bal.tables.ctl[0]["gw_mac"]) == bytes.fromhex(lb.gw_mac.replace(":", ""))
        lab.set_weights({"r1": 3})
        assert bal.calls == ["start", "update_tables"]
        assert lab.balancer_stats() == {"rx_packets": 7}
    assert bal.calls[-1] == "stop"
    assert_clean(lab.state, lab.state_path)


def test_missing_userspace_datapath_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lb.userspace_io", None)  # import fails
    lab = Lab(reals=1, datapath="userspace")
    with pytest.raises(DatapathUnavailable, match="lb/userspace_io.py"):
        lab.build()
    assert not os.path.exists(lab.state_path)  # refused before building anything
    assert not any(ns.startswith(lab.name) for ns in list_netns())


def test_two_balancers_share_the_flows_and_agree(capsys):
    """Two balancers behind ECMP at the router (5-tuple hash): both carry flows, and
    every flow reaches the real Katran's hash picks, whichever balancer it crossed —
    the property that lets Katran-compatible hosts share one ECMP group."""
    with Lab(reals=3, balancers=2) as lab:
        c = lab.client()
        for vip, client in ((VIP4, c.addr4), (VIP6, c.addr6)):
            before = {b.name: lab.balancer_stats(b.name)["tx_encap"] for b in lab.balancers()}
            res = http_requests(c.ns, vip, HTTP_PORT, n=400)
            assert not [r.error for r in res if r.error]
            assert all(r.real == lab.expected_real(vip, HTTP_PORT, "tcp", client, r.sport) for r in res)
            carried = {b.name: lab.balancer_stats(b.name)["tx_encap"] - before[b.name]
                       for b in lab.balancers()}
            assert all(v > 0 for v in carried.values()), carried
            with capsys.disabled():
                print(f"\nMEASURED two balancers, {vip}: 400 connections, packets encapsulated "
                      f"per balancer {carried}, per real {dict(sorted(Counter(r.real for r in res).items()))}")
        state, path = lab.state, lab.state_path
    assert_clean(state, path)


# ---- lbctl lab as subprocesses -------------------------------------------------------------

LAB_CONFIG = """\
# VIPs and reals of our own (the lab pairs real addresses into hosts in order)
settings:
  gateway_mac: "02:00:00:00:00:01"   # replaced by the router's MAC
  conn_table_size: 65536
vips:
  - address: 198.18.200.1
    port: 8000
    protocol: tcp
    reals: [{address: 198.19.1.1}, {address: 198.19.1.2, weight: 2}]
  - address: 2001:db8:200::1
    port: 8000
    protocol: tcp
    reals: [{address: "2001:db8:201::1"}, {address: "2001:db8:201::2"}]
  - address: 198.18.200.1
    port: 53
    protocol: udp
    reals: [{address: 198.19.1.1}, {address: 198.19.1.2}]
"""


def lbctl(*args: str, state_dir: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LBCTL, *args, "--state-dir", state_dir], capture_output=True,
                          text=True, timeout=timeout, check=False)


def check_lab_capture(name: str, sd: str, state: dict, tmp_path) -> None:
    """``lbctl lab capture`` (another process) while HTTP requests go through the lab:
    one pcapng packet per new connection's SYN, named after its VIP and real; the capture
    is off again afterwards."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgReader

    from lb.capture import CaptureMaps

    cap = tmp_path / "lab.pcapng"
    proc = subprocess.Popen([*LBCTL, "capture", name, "--event", "lru-miss", "-c", "5", "--duration", "60",
                             "-w", str(cap), "--state-dir", sd], stderr=subprocess.PIPE, text=True)
    try:
        with CaptureMaps.pinned(state["pin_dirs"]["lb1"]) as maps:
            deadline = time.monotonic() + 30
            while maps.word == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert maps.word != 0
            res = http_requests(f"{name}-c1", "198.18.200.1", 8000, n=20)
            assert not [x.error for x in res if x.error]
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert "5 packets written" in err and "lru-miss 5" in err
            assert maps.word == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    pkts = list(PcapNgReader(str(cap)))
    assert len(pkts) == 5
    for p in pkts:
        comment = p.comments[0].decode()
        assert comment.startswith("lb event=lru-miss cpu=") and "vip=198.18.200.1:8000/tcp" in comment
        assert re.search(r"real=198\.19\.1\.[12]$", comment), comment
        frame = Ether(bytes(p))
        assert frame[TCP].dport == 8000 and frame[TCP].flags == "S"


def test_lbctl_lab_up_status_down(tmp_path):
    """``lbctl lab up --config`` builds a lab that outlives the command; traffic from
    this process goes through it (and ``lbctl lab capture`` records its new flows);
    ``lbctl lab status`` (another process) reads the
    balancer's counters from the pinned maps; ``lbctl lab down`` removes all of it."""
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(LAB_CONFIG)
    sd = str(tmp_path / "state")
    r = lbctl("up", "--config", str(cfg), "--json", state_dir=sd)
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["name"]
    state = load_state(name, sd)
    path = os.path.join(sd, f"{name}.json")
    try:
        assert state["owner_pid"] is None and state["status"] == "ready"
        st = json.loads(lbctl("status", name, "--json", state_dir=sd).stdout)[0]
        assert all(st["namespaces"].values()) and all(p["alive"] for p in st["processes"])
        assert {h["real4"] for h in st["hosts"] if h["role"] == "real"} == {"198.19.1.1", "198.19.1.2"}
        assert {v["vip"] for v in st["vips"]} == {"198.18.200.1:8000/tcp", "[2001:db8:200::1]:8000/tcp",
                                                  "198.18.200.1:53/udp"}
        client = f"{name}-c1"
        res4 = http_requests(client, "198.18.200.1", 8000, n=300)
        res6 = http_requests(client, "2001:db8:200::1", 8000, n=100)
        assert not [x.error for x in res4 + res6 if x.error]
        assert {x.addr for x in res4} == {"198.19.1.1", "198.19.1.2"}
        n4 = Counter(x.addr for x in res4)
        assert n4["198.19.1.2"] > n4["198.19.1.1"]  # weight 2 vs 1
        flows = udp_flows(client, "198.18.200.1", 53, flows=10, per_flow=2)
        assert all(len(set(v)) == 1 and None not in v for v in flows.values())
        check_lab_capture(name, sd, state, tmp_path)

        r = lbctl("status", name, "--json", state_dir=sd)
        st = json.loads(r.stdout)[0]
        counters = st["balancers"]["lb1"]["counters"]
        assert counters["tx_encap"] >= 5 * 400  # SYN, ACK, request, ACK, RST at least
        per_real = st["balancers"]["lb1"]["reals"]
        assert per_real["198.19.1.1"]["packets"] > 0 and per_real["2001:db8:201::2"]["packets"] > 0
        assert st["decap"]["v4_in_v4"] > 0 and st["decap"]["v6_in_v6"] > 0
        text = lbctl("status", name, state_dir=sd).stdout
        assert name in text and "tx_encap" in text and "running" in text

        r = lbctl("down", "--all", state_dir=sd)
        assert r.returncode == 0, r.stderr
        assert f"{name}: torn down" in r.stdout
        assert_clean(state, path)
        assert lbctl("down", name, state_dir=sd).returncode == 1  # no such lab any more
    finally:
        if os.path.exists(path):
            teardown(name, sd)


def test_ctrl_c_during_lbctl_lab_up_leaves_nothing(tmp_path):
    """SIGINT (Ctrl-C) to ``lbctl lab up`` while it builds: exit 130, nothing left."""
    sd = str(tmp_path / "state")
    p = subprocess.Popen([*LBCTL, "up", "--reals", "2", "--state-dir", sd],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and state is None:
            for name in list_labs(sd):
                try:
                    s = load_state(name, sd)
                except (ValueError, OSError):
                    continue
                if s["status"] == "building:balancer":  # servers up, decap attached
                    state = s
            time.sleep(0.05)
        assert state is not None, "the build never reached the balancer stage"
        assert state["processes"]
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert_clean(load_state_or(state, sd), os.path.join(sd, f"{state['name']}.json"))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for name in list_labs(sd):
            teardown(name, sd)


def load_state_or(state: dict, sd: str) -> dict:
    """The state file if it is still there (it should not be), else the snapshot."""
    try:
        return load_state(state["name"], sd)
    except (LabError, ValueError):
        return state
