"""The daemon as the control plane of the network-namespace lab (netns/lab.py).

The lab builds clients, a router, one XDP balancer (maps pinned) and three reals with
DSR. ``lbctl serve`` then takes the balancer over: it adopts the lab's pinned maps (the
lab numbers VIPs and reals as compile_tables does, so nothing needs writing) and swaps
its own program in. Under client traffic — long-lived connections and a stream of new
ones — the daemon is SIGKILLed, left dead, restarted and used to drain a real: not one
request fails, and every long-lived connection stays on its real throughout.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter

import pytest
from test_control_daemon import Daemon

from lb.config import config_to_dict

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]


def test_restart_under_client_traffic(tmp_path) -> None:
    from netns.lab import Lab
    from netns.servers import KeepAliveClient, http_requests
    from netns.topology import VIP4

    with Lab(reals=3, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        pin_dir = lab.state["pin_dirs"][lb.name]
        cfg = config_to_dict(lab.config)
        d = Daemon(tmp_path, "--pin-dir", pin_dir, "--netns", lb.ns, interface=lb.ifname, datapath="xdp",
                   config=cfg)
        client = lab.client()
        conns = []
        stop = threading.Event()
        results: list = []
        try:
            d.start()
            with d.client() as c:
                st = c.status()
            assert sum(st["last_reconcile"]["writes"].values()) == 0, st["last_reconcile"]

            conns = [KeepAliveClient(client.ns, VIP4) for _ in range(12)]
            owners = [k.get() for k in conns]
            assert len(set(owners)) >= 2

            def traffic() -> None:
                while not stop.is_set():
                    results.extend(http_requests(client.ns, VIP4, n=40, concurrency=8))

            t = threading.Thread(target=traffic)
            t.start()
            time.sleep(0.5)
            d.kill(signal.SIGKILL)  # the balancer keeps forwarding on the pinned maps
            down_since = len(results)
            time.sleep(1.5)
            assert [k.get() for k in conns] == owners
            served_while_down = len(results) - down_since
            d.start()
            with d.client() as c:
                assert sum(c.status()["last_reconcile"]["writes"].values()) == 0
                drained = owners[0]
                addr = lab.host(drained).real4
                c.patch_real(("198.18.0.100", 80, "tcp"), addr, {"drain": True})
            time.sleep(0.5)
            stop.set()
            t.join(timeout=60)
            assert [k.get() for k in conns] == owners  # drained or not, established flows stay
            after = http_requests(client.ns, VIP4, n=100)
            assert all(r.real is not None for r in after)
            assert drained not in {r.real for r in after}
        finally:
            stop.set()
            for k in conns:
                k.close()
            d.stop()
        failed = [r for r in results if r.real is None]
        by_real = Counter(r.real for r in results)
        print(f"MEASURED restart under traffic: {len(results)} requests ({served_while_down} while the "
              f"daemon was dead), {len(failed)} failed, by real {dict(sorted(by_real.items()))}")
        assert served_while_down > 0
        assert not failed, failed[:3]


def test_udp_flow_leaves_a_dead_real_within_one_interval(tmp_path) -> None:
    """A UDP flow pinned to a real whose server dies: once the daemon's health checks take
    the real down for the UDP VIP, the flow's next datagram is re-hashed onto the healthy
    ring (down_real_migrated) — within one check interval of the verdict — and stays on its
    new real. Only the UDP VIP is health-checked, so the real stays up for the TCP VIP on
    the same address: the down set is per (VIP, real)."""
    from test_control_tunnel import _default_routes

    from lb.kernel.netns import run_in_netns
    from netns.lab import Lab
    from netns.topology import UDP_PORT, VIP4

    interval = 0.5
    hc = {"interval": interval, "timeout": 0.3, "rise": 2, "fall": 2}
    with Lab(reals=3, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        _default_routes(lb)
        cfg = config_to_dict(lab.config)
        for v in cfg["vips"]:
            if v["address"] == VIP4 and v["protocol"] == "udp":  # udp 7; tcp 80 is not checked
                v["healthcheck"] = {**hc, "type": "udp", "udp": {"send": "hc"}}
        d = Daemon(tmp_path, "--pin-dir", lab.state["pin_dirs"][lb.name], "--netns", lb.ns,
                   interface=lb.ifname, datapath="xdp", config=cfg)
        client = lab.client()
        sock = run_in_netns(client.ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sock.settimeout(0.1)
        seen: list[tuple[float, str | None]] = []  # (time, real that answered)

        def send() -> str | None:
            sock.sendto(b"flow", (VIP4, UDP_PORT))
            try:
                data, _ = sock.recvfrom(2048)
            except TimeoutError:
                return None
            return data.split(b" ", 1)[0].decode()

        try:
            d.start()
            with d.client() as c:
                deadline = time.monotonic() + 15
                while not (len(h := c.health()) == 3 and all(x["state"] == "up" for x in h)):
                    assert time.monotonic() < deadline, c.health()
                    time.sleep(0.1)
                owner = send()
                assert owner is not None and all(send() == owner for _ in range(5))
                victim = lab.host(owner)
                before = c.stats()["counters"]["down_real_migrated"]
                proc = lab._procs[f"server-{victim.name}"]
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
                t_kill = time.monotonic()
                t_down = None
                while time.monotonic() - t_kill < 10:
                    seen.append((time.monotonic(), send()))
                    if t_down is None and any(x["state"] == "down" for x in c.health()
                                              if x["real"] == victim.real4 and x["vip"].endswith("/udp")):
                        t_down = time.monotonic()
                    if t_down is not None and time.monotonic() - t_down > 2 * interval:
                        break
                    time.sleep(0.05)
                assert t_down is not None, "the real was never marked down"
                moved = next(t for t, r in seen if r not in (None, owner))
                after = [r for t, r in seen if t > moved]
                migrated = c.stats()["counters"]["down_real_migrated"] - before
                # down for the UDP VIP only: the TCP VIP still gives it its weight
                tcp_real = next(r for r in c.vip((VIP4, 80, "tcp"))["reals"] if r["address"] == victim.real4)
        finally:
            sock.close()
            d.stop()
        print(f"MEASURED dead real: marked down {t_down - t_kill:.2f} s after its server died; "
              f"the UDP flow moved {moved - t_down:+.2f} s from the verdict; {migrated} datagram(s) migrated")
        assert moved - t_down <= interval
        assert after and all(r == after[0] for r in after) and after[0] != owner
        assert migrated == 1  # the entry was rewritten: one migration, then hits
        assert tcp_real["effective_weight"] > 0 and tcp_real["healthy"] is None
