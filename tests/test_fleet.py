"""The fleet: VIP announcement logic (control/bgp.py, unit tests with a fake clock) and
the fleet lab (netns/fleet.py: BIRD router with ECMP, two balancers each running lbctl
serve + BIRD + the announcer) with a balancer host dying under long-lived connections.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from control.bgp import (
    Announcer,
    BirdSpeaker,
    Observation,
    balancer_bird_config,
    router_bird_config,
    vip_health,
    vip_prefix,
)

P4, P6 = "198.18.0.100/32", "2001:db8::100/128"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ok(**vips: bool) -> Observation:
    return Observation(True, {P4: vips.get("v4", True), P6: vips.get("v6", True)})


def test_announce_only_after_stable_health() -> None:
    clk = Clock()
    a = Announcer(clk, announce_after=1.0)
    assert a.decide(ok()) == set()
    clk.t += 0.5
    assert a.decide(ok()) == set()
    clk.t += 0.5
    assert a.decide(ok()) == {P4, P6}


def test_withdraw_at_once_on_datapath_failure_and_reannounce_after_delay() -> None:
    clk = Clock()
    a = Announcer(clk, announce_after=1.0)
    a.decide(ok())
    clk.t += 1
    assert a.decide(ok()) == {P4, P6}
    clk.t += 0.1
    assert a.decide(Observation(False, {})) == set()  # daemon unreachable: nothing
    clk.t += 0.1
    assert a.decide(ok()) == set()  # back, but not yet for announce_after
    clk.t += 0.5
    assert a.decide(Observation(False, {})) == set()  # flapped: the timer restarts
    clk.t += 0.1
    a.decide(ok())
    clk.t += 0.99
    assert a.decide(ok()) == set()
    clk.t += 0.01
    assert a.decide(ok()) == {P4, P6}


def test_withdraw_the_vip_whose_reals_are_all_down_only() -> None:
    clk = Clock()
    a = Announcer(clk, announce_after=0)
    assert a.decide(ok()) == {P4, P6}
    assert a.decide(ok(v6=False)) == {P4}
    assert a.decide(Observation(True, {P4: True})) == {P4}  # VIP removed from the config
    assert a.decide(ok()) == {P4, P6}


def test_withdraw_after_grace_but_drain_and_stop_are_immediate() -> None:
    clk = Clock()
    a = Announcer(clk, announce_after=0, withdraw_after=2.0)
    assert a.decide(ok()) == {P4, P6}
    clk.t += 1
    assert a.decide(Observation(False, {})) == {P4, P6}  # within the grace
    clk.t += 0.9
    assert a.decide(Observation(False, {})) == {P4, P6}  # 0.9 s of 2
    clk.t += 1.0
    assert a.decide(Observation(False, {})) == {P4, P6}  # 1.9 s of 2
    clk.t += 0.1
    assert a.decide(Observation(False, {})) == set()
    assert a.decide(ok()) == {P4, P6}
    assert a.decide(Observation(True, {P4: True, P6: True}, drain=True)) == set()
    assert a.decide(ok()) == {P4, P6}
    assert a.decide(Observation(True, {P4: True, P6: True}, stopping=True)) == set()


def test_vip_health_from_the_api_view() -> None:
    vips = [
        {"address": "198.18.0.100", "port": 80, "reals": [
            {"address": "a", "weight": 1, "effective_weight": 0}, {"address": "b", "weight": 1,
                                                                   "effective_weight": 1}]},
        {"address": "2001:db8::100", "port": 80, "reals": [
            {"address": "a", "weight": 1, "effective_weight": 0, "drained": True}]},
        {"address": "2001:db8::100", "port": 7, "reals": [
            {"address": "a", "weight": 2, "effective_weight": None, "healthy": False}]},
        {"address": "198.18.0.101", "port": 80, "reals": [
            {"address": "a", "weight": 3, "effective_weight": None, "healthy": None}]},
    ]
    assert vip_health(vips) == {P4: True, P6: False, "198.18.0.101/32": True}
    assert vip_prefix("2001:db8::100") == P6
    # a CIDR VIP is announced as its prefix
    assert vip_prefix("198.18.64.0/24") == "198.18.64.0/24"
    assert vip_health([{"address": "2001:db8:64::/48", "port": 80, "reals": [
        {"address": "a", "weight": 1, "effective_weight": 1}]}]) == {"2001:db8:64::/48": True}


def test_speaker_files_and_configs(tmp_path) -> None:
    files = BirdSpeaker.files(tmp_path, {P4, P6})
    assert files == {"vips4.conf": f"route {P4} blackhole;\n", "vips6.conf": f"route {P6} blackhole;\n"}
    assert BirdSpeaker.files(tmp_path, set()) == {"vips4.conf": "", "vips6.conf": ""}
    rt = router_bird_config(router_id="198.18.11.1", asn=65000, log_file="/x",
                            peers=[("lb1", "198.18.11.1", "198.18.11.2", "2001:db8:0:11::1 2001:db8:0:11::2", 65001)])
    assert rt.count("merge paths on") == 2 and "hold time 3" in rt and "neighbor 198.18.11.2 as 65001" in rt
    bal = balancer_bird_config(router_id="198.18.11.2", asn=65001, peer_asn=65000, local4="198.18.11.2",
                               peer4="198.18.11.1", local6="2001:db8:0:11::2", peer6="2001:db8:0:11::1",
                               conf_dir="/c", log_file="/x")
    assert '\ninclude "/c/vips4.conf";\n' in bal and "next hop self" in bal


def test_store_options_tls_credentials_and_plaintext(tmp_path) -> None:
    """etcd:// (no TLS) only to loopback or with --store-plaintext; credentials only from
    a private file; every mistake a ValueError naming the option."""
    import os

    from control.etcd_store import open_store
    from netns.pki import LabCA

    d = str(tmp_path / "state")
    with pytest.raises(ValueError, match="plain etcd:// only to a loopback address"):
        open_store("etcd://198.18.10.1:2379/x", d)
    assert open_store("etcd://127.0.0.1:2379/x", d).info["tls"] is False
    assert open_store("etcd://198.18.10.1:2379/x", d, plaintext=True).info["tls"] is False
    with pytest.raises(ValueError, match="--store-ca"):
        open_store("etcds://198.18.10.1:2379/x", d, ca_file=str(tmp_path / "missing.pem"))
    ca = LabCA(tmp_path / "pki")
    cred = tmp_path / "lb1.cred"
    cred.write_text("lb1:s3cret-password\n")
    os.chmod(cred, 0o644)
    with pytest.raises(ValueError, match="readable by group/others"):
        open_store("etcds://198.18.10.1:2379/x", d, ca_file=ca.ca_path, user_file=str(cred))
    os.chmod(cred, 0o600)
    s = open_store("etcds://198.18.10.1:2379/x", d, ca_file=ca.ca_path, user_file=str(cred))
    assert (s.info["tls"], s.info["user"], s.client.credentials) == (True, "lb1", ("lb1", "s3cret-password"))
    cred.write_text("no-colon\n")
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        open_store("etcds://198.18.10.1:2379/x", d, user_file=str(cred))
    with pytest.raises(ValueError, match="need --store etcds"):
        open_store("file", d, user_file=str(cred))
    with pytest.raises(ValueError, match="expected etcds://"):
        open_store("http://198.18.10.1:2379/x", d)


def test_store_reachability_metrics() -> None:
    import time as _time

    from control_helpers import make_config, vip_dict

    from control.datapaths import MemoryPort
    from control.metrics import Metrics
    from control.plane import open_plane
    from control.tables import Sizes

    cfg = make_config([vip_dict(0, [0])])
    core = open_plane(MemoryPort(Sizes.of(cfg.settings)), None, cfg).core
    info = {"reachable": None, "unreachable_since": None, "adopted": 0, "conflicts": 0}
    m = Metrics(core, info)
    assert b"lb_store_reachable" not in m.render()  # not asked yet: nothing to say
    info.update(reachable=True, adopted=2)
    text = m.render().decode()
    assert "lb_store_reachable 1.0" in text and "lb_store_adopted_total 2.0" in text
    assert "lb_store_unreachable_seconds 0.0" in text
    info.update(reachable=False, unreachable_since=_time.time() - 5)
    text = m.render().decode()
    assert "lb_store_reachable 0.0" in text
    secs = float(next(ln for ln in text.splitlines() if ln.startswith("lb_store_unreachable_seconds ")).split()[1])
    assert 5 <= secs < 60


# ---- the fleet lab ------------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
def test_balancer_host_dies_connections_survive() -> None:
    from netns.fleet import FleetLab
    from netns.servers import KeepAliveClient, http_requests
    from netns.teardown import leftovers
    from netns.topology import VIP4, VIP6

    lab = FleetLab(reals=3, balancers=2)
    conns: list[KeepAliveClient] = []
    try:
        lab.build()
        assert lab.vip_nexthops(VIP4) == ["198.18.11.2", "198.18.12.2"]
        assert lab.vip_nexthops(VIP6) == ["2001:db8:0:11::2", "2001:db8:0:12::2"]
        c = lab.client()
        n = 64
        conns = [KeepAliveClient(c.ns, VIP4 if i % 2 == 0 else VIP6, timeout=30) for i in range(n)]
        owners = [k.get() for k in conns]
        rx1 = lab.balancer_stats("lb1")["rx_packets"]
        rx2 = lab.balancer_stats("lb2")["rx_packets"]
        assert rx1 > 0 and rx2 > 0, (rx1, rx2)  # ECMP uses both

        t0 = time.monotonic()
        lab.kill_balancer("lb1")
        done: dict[int, tuple[float, str | None]] = {}

        def probe(i: int) -> None:
            try:
                real = conns[i].get()
                done[i] = (time.monotonic() - t0, real)
            except Exception:  # noqa: BLE001 - counted as lost
                done[i] = (time.monotonic() - t0, None)

        threads = [threading.Thread(target=probe, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        lab.wait_ecmp(1, timeout=15)
        route_s = time.monotonic() - t0
        assert lab.vip_nexthops(VIP4) == ["198.18.12.2"]
        for t in threads:
            t.join(timeout=60)
        survived = sum(1 for i in range(n) if done.get(i, (0, None))[1] == owners[i])
        traffic_s = max(d for d, _ in done.values())
        stalled = sum(1 for d, _ in done.values() if d > 1.0)  # went through lb1
        again = [k.get() for k in conns]  # every connection answers at once now
        new = http_requests(c.ns, VIP4, n=100)
        print(f"MEASURED fleet failover: {survived}/{n} long-lived connections survived on their real; "
              f"router route withdrawn {route_s:.2f} s after the kill (hold 3 s); every connection answered "
              f"again {traffic_s:.2f} s after ({stalled} had been crossing lb1); lb1 had {rx1} rx packets, lb2 {rx2} before")
        assert survived == n, {i: (done.get(i), owners[i]) for i in range(n) if done.get(i, (0, None))[1] != owners[i]}
        assert again == owners
        assert all(r.real is not None for r in new)
        assert route_s < 8
        assert stalled > 0  # some connections did cross the balancer that died
    finally:
        for k in conns:
            k.close()
        st, sp = lab.state, lab.state_path
        lab.teardown()
    assert leftovers(st, sp) == []


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
def test_drain_and_sigterm_withdraw() -> None:
    import signal

    from netns.fleet import FleetLab
    from netns.teardown import leftovers
    from netns.topology import VIP4

    lab = FleetLab(reals=2, balancers=2)
    try:
        lab.build()
        Path = __import__("pathlib").Path
        drain = Path(lab.paths("lb2")["drain_file"])
        t0 = time.monotonic()
        drain.touch()
        lab.wait_ecmp(1, timeout=10)
        drain_s = time.monotonic() - t0
        assert lab.vip_nexthops(VIP4) == ["198.18.11.2"]
        drain.unlink()
        lab.wait_ecmp(2, timeout=10)
        t0 = time.monotonic()
        lab.kill_role("announcer-lb1", signal.SIGTERM)  # withdraws before exiting
        lab.wait_ecmp(1, timeout=10)
        term_s = time.monotonic() - t0
        assert lab.vip_nexthops(VIP4) == ["198.18.12.2"]
        print(f"MEASURED drain withdrawn in {drain_s:.2f} s, SIGTERM withdrawn in {term_s:.2f} s")
        assert term_s < 2.5  # well under the 3 s hold time: an explicit withdraw
    finally:
        st, sp = lab.state, lab.state_path
        lab.teardown()
    assert leftovers(st, sp) == []


def _etcd_is_locked_down(lab) -> None:
    """TLS only, a password for everyone, each balancer's user confined to the fleet's
    prefix, no secret on any command line."""
    from control.etcd_store import EtcdClient, EtcdUnavailable, read_credentials
    from netns.fleet import ETCD_ADDR, ETCD_PORT

    lb1 = lab.etcd_client("lb1")
    assert lb1.get(f"/{lab.name}/state")[0] is not None  # its own prefix: yes
    with pytest.raises(EtcdUnavailable, match="permission denied"):
        lb1.get("/elsewhere")  # outside it: no
    with pytest.raises(EtcdUnavailable, match="permission denied"):
        lb1.put_if("/elsewhere", b"x", 0)
    bad = EtcdClient(ETCD_ADDR, ETCD_PORT, netns=lab.router_ns, tls=lb1.tls, credentials=("lb1", "not-the-password"))
    with pytest.raises(EtcdUnavailable, match="authenticating as 'lb1' failed"):
        bad.get(f"/{lab.name}/state")
    anonymous = EtcdClient(ETCD_ADDR, ETCD_PORT, netns=lab.router_ns, tls=lb1.tls)
    with pytest.raises(EtcdUnavailable):
        anonymous.get(f"/{lab.name}/state")
    plain = EtcdClient(ETCD_ADDR, ETCD_PORT, netns=lab.router_ns, credentials=lb1.credentials)
    with pytest.raises(EtcdUnavailable):
        plain.get(f"/{lab.name}/state")  # an HTTPS-only server
    secrets_ = [read_credentials(lab.etcd_paths()[f"{u}.cred"])[1] for u in ("root", "lb1", "lb2")]
    for proc in lab._procs.values():
        if proc.poll() is None:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            assert not any(pw in cmdline for pw in secrets_), cmdline


def _rings_equal(lab, vip_num: int) -> bool:
    import numpy as np

    return bool(np.array_equal(lab.backend("lb1").bal.ring(vip_num), lab.backend("lb2").bal.ring(vip_num)))


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
def test_shared_config_in_etcd() -> None:
    import signal

    from control.client import ApiError, Client
    from netns.fleet import FleetLab
    from netns.servers import http_requests
    from netns.teardown import leftovers
    from netns.topology import VIP4

    lab = FleetLab(reals=3, balancers=2, etcd=True)
    try:
        lab.build()
        api = {n: Client(socket=lab.paths(n)["socket"], timeout=10) for n in ("lb1", "lb2")}
        st = {n: c.status() for n, c in api.items()}
        assert all(s["store"]["kind"] == "etcd" and s["store"]["reachable"] for s in st.values()), st
        assert [(s["store"]["tls"], s["store"]["user"]) for s in st.values()] == [(True, "lb1"), (True, "lb2")]
        assert st["lb1"]["generation"] == st["lb2"]["generation"]
        _etcd_is_locked_down(lab)
        key = (VIP4, 80, "tcp")
        vip_num = api["lb1"].vip(key)["vip_num"]
        r1 = lab.host("r1").real4

        # a weight changed through lb1's API reaches lb2's rings
        t0 = time.monotonic()
        api["lb1"].patch_real(key, r1, {"weight": 3})
        while not (_rings_equal(lab, vip_num) and api["lb2"].status()["generation"]
                   == api["lb1"].status()["generation"]):
            assert time.monotonic() - t0 < 5, "lb2 did not converge"
            time.sleep(0.01)
        converge_s = time.monotonic() - t0
        gen = api["lb1"].status()["generation"]
        assert api["lb2"].vip(key)["reals"][0]["weight"] == 3

        # etcd dies: both keep forwarding, say so, refuse changes (nothing half-done)
        lab.kill_role("etcd", signal.SIGKILL)
        t1 = time.monotonic()
        while not all(c.status()["store"]["reachable"] is False for c in api.values()):
            assert time.monotonic() - t1 < 5
            time.sleep(0.05)
        detect_s = time.monotonic() - t1
        res = http_requests(lab.client().ns, VIP4, n=100)
        assert all(r.real is not None for r in res)
        with pytest.raises(ApiError) as e:
            api["lb2"].patch_real(key, r1, {"weight": 1})
        assert e.value.status >= 500
        assert api["lb2"].status()["generation"] == gen and _rings_equal(lab, vip_num)

        # etcd back: reachable again, nothing lost, changes flow from lb2 to lb1 too
        lab.start_etcd()
        t2 = time.monotonic()
        while not all(c.status()["store"]["reachable"] for c in api.values()):
            assert time.monotonic() - t2 < 5
            time.sleep(0.05)
        back_s = time.monotonic() - t2
        assert api["lb1"].status()["generation"] == gen
        t3 = time.monotonic()
        api["lb2"].patch_real(key, r1, {"weight": 1})
        while not (api["lb1"].status()["generation"] == gen + 1 and _rings_equal(lab, vip_num)):
            assert time.monotonic() - t3 < 5
            time.sleep(0.01)
        converge2_s = time.monotonic() - t3
        print(f"MEASURED etcd fleet: weight change via lb1 -> lb2 rings identical in {converge_s * 1e3:.0f} ms; "
              f"etcd killed: both balancers report it unreachable in {detect_s:.2f} s, 100/100 requests "
              f"served meanwhile, a change refused with {e.value.status}; etcd back: reachable in {back_s:.2f} s, "
              f"generation {gen} kept; change via lb2 -> lb1 identical in {converge2_s * 1e3:.0f} ms")
        for c in api.values():
            c.close()
    finally:
        st_, sp = lab.state, lab.state_path
        lab.teardown()
    assert leftovers(st_, sp) == []


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.bpf
def test_lbctl_lab_up_bgp_is_one_command() -> None:
    """`lbctl lab up --bgp` builds the fleet: the router learns the VIP over BGP from both
    balancers (one ECMP route, no static route), a client gets answers, `lab down` removes all."""
    import json
    import subprocess
    import sys

    up = subprocess.run([sys.executable, "-m", "lb.cli", "lab", "up", "--bgp", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    name = json.loads(up.stdout)["name"]
    try:
        route = subprocess.run(["ip", "netns", "exec", f"{name}-rt", "ip", "route", "show", "198.18.0.100"],
                               capture_output=True, text=True, check=True).stdout
        assert "proto bird" in route and route.count("nexthop via") == 2, route
        body = subprocess.run(["ip", "netns", "exec", f"{name}-c1", "curl", "-s", "--max-time", "5",
                               "http://198.18.0.100/"], capture_output=True, text=True).stdout
        assert body.startswith("real=r"), body
    finally:
        subprocess.run([sys.executable, "-m", "lb.cli", "lab", "down", name], capture_output=True, timeout=120)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in left


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
def test_etcd_partition_rings_differ_connections() -> None:
    """lb2 loses etcd (its packets to etcd vanish; BGP and traffic untouched) while a
    weight changes through lb1: the two balancers forward with different rings. lb2 keeps
    forwarding with its last state and says it lost the store (status, metrics). Then lb1
    is drained, so every flow crosses lb2. Which connections survive is predicted
    exactly, per connection, from the two balancers' own answers to /v1/simulate:

    * opened before the split (both rings agreed): all survive;
    * opened during the split, where the rings agree, or where they differ but the flow
      crossed lb2: survive (lb2's ring or connection table holds their real);
    * opened during the split through lb1 where the rings differ: lb2 sends them to
      another real, which resets them: lost.

    Healed, lb2 adopts lb1's generation and the rings agree again; the survivors keep
    their real."""
    from control.client import ApiError, Client
    from netns.fleet import FleetLab
    from netns.servers import KeepAliveClient
    from netns.teardown import leftovers
    from netns.topology import VIP4

    lab = FleetLab(reals=3, balancers=2, etcd=True)
    conns: list[KeepAliveClient] = []
    try:
        lab.build()
        api = {n: Client(socket=lab.paths(n)["socket"], timeout=10) for n in ("lb1", "lb2")}
        key = (VIP4, 80, "tcp")
        vip_num = api["lb1"].vip(key)["vip_num"]
        names = {h.real4: h.name for h in lab.reals()}
        c = lab.client()
        before = [KeepAliveClient(c.ns, VIP4, timeout=10) for _ in range(32)]
        conns += before
        before_owner = [k.get() for k in before]

        t0 = time.monotonic()
        lab.partition_store("lb2")
        while api["lb2"].status()["store"]["reachable"] is not False:
            assert time.monotonic() - t0 < 10, "lb2 did not notice it lost etcd"
            time.sleep(0.05)
        lost_s = time.monotonic() - t0
        assert api["lb1"].status()["store"]["reachable"] is True
        metrics = api["lb2"].request("GET", "/metrics").text
        assert "lb_store_reachable 0.0" in metrics, [m for m in metrics.splitlines() if "store" in m]
        gen2 = api["lb2"].status()["generation"]
        with pytest.raises(ApiError) as refused:  # lb2 cannot write: refused, nothing changes
            api["lb2"].patch_real(key, lab.host("r2").real4, {"weight": 2})
        assert refused.value.status == 503 and api["lb2"].status()["generation"] == gen2

        api["lb1"].patch_real(key, lab.host("r1").real4, {"weight": 4})
        assert api["lb1"].status()["generation"] == gen2 + 1
        ring1, ring2 = lab.backend("lb1").bal.ring(vip_num), lab.backend("lb2").bal.ring(vip_num)
        differ = float((ring1 != ring2).mean())
        assert differ > 0.1, differ
        time.sleep(1.0)  # lb2 keeps its state: it cannot see the change
        assert api["lb2"].status()["generation"] == gen2

        during = [KeepAliveClient(c.ns, VIP4, timeout=10) for _ in range(96)]
        conns += during
        during_owner = [k.get() for k in during]
        fate = []  # per connection opened during the split: "agree", "via lb1", "via lb2"
        for k, owner in zip(during, during_owner, strict=True):
            q = {"src": c.addr4, "dst": VIP4, "sport": k.sport, "dport": 80, "protocol": "tcp"}
            r1, r2 = (names[api[n].simulate(q)["real"]] for n in ("lb1", "lb2"))
            assert owner in (r1, r2), (owner, r1, r2)
            fate.append("agree" if r1 == r2 else ("via lb1" if owner == r1 else "via lb2"))
        counts = {f: fate.count(f) for f in ("agree", "via lb1", "via lb2")}
        assert counts["via lb1"] > 0 and counts["via lb2"] > 0, counts  # ECMP used both, rings differ

        t1 = time.monotonic()
        drain = lab.paths("lb1")["drain_file"]
        open(drain, "w").close()
        lab.wait_ecmp(1, timeout=10)
        assert lab.vip_nexthops(VIP4) == ["198.18.12.2"]

        def outcome(k: KeepAliveClient) -> str | None:
            try:
                return k.get()
            except OSError:  # reset by a real that has no such connection, or timed out
                return None

        after_before = [outcome(k) for k in before]
        after_during = [outcome(k) for k in during]
        drained_s = time.monotonic() - t1
        assert after_before == before_owner  # all survive
        lost = [i for i, got in enumerate(after_during) if got != during_owner[i]]
        assert lost == [i for i, f in enumerate(fate) if f == "via lb1"], (lost, fate, after_during)
        assert all(after_during[i] is None for i in lost)  # reset, never silently another real

        t2 = time.monotonic()
        lab.partition_store("lb2", cut=False)
        while not (api["lb2"].status()["store"]["reachable"] and api["lb2"].status()["generation"] == gen2 + 1
                   and _rings_equal(lab, vip_num)):
            assert time.monotonic() - t2 < 15, "lb2 did not catch up"
            time.sleep(0.05)
        healed_s = time.monotonic() - t2
        assert "lb_store_reachable 1.0" in api["lb2"].request("GET", "/metrics").text
        os.unlink(drain)
        lab.wait_ecmp(2, timeout=15)
        survivors = [i for i in range(len(during)) if i not in lost]
        assert [before[i].get() for i in range(len(before))] == before_owner
        assert [during[i].get() for i in survivors] == [during_owner[i] for i in survivors]
        print(f"MEASURED etcd partition: lb2 reported the store lost in {lost_s:.2f} s (lb_store_reachable 0); "
              f"a change on lb1 made {differ:.0%} of the ring slots differ; of {len(during)} connections "
              f"opened during the split {counts['agree']} had both rings agree, {counts['via lb1']} crossed lb1 "
              f"where they differ, {counts['via lb2']} crossed lb2 where they differ; lb1 drained (all via lb2): "
              f"{len(before)}/{len(before)} opened before survived, {len(survivors)}/{len(during)} opened during "
              f"survived, {len(lost)} reset (exactly those via lb1 where the rings differ) within {drained_s:.2f} s; "
              f"healed: lb2 caught up in {healed_s:.2f} s; survivors kept their real after lb1 returned")
        for cl in api.values():
            cl.close()
    finally:
        for k in conns:
            k.close()
        st, sp = lab.state, lab.state_path
        lab.teardown()
    assert leftovers(st, sp) == []
