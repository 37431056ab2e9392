"""Health-driven removal with live flows (docs/api.md, "Health checks": how fast).

The lab (netns/lab.py: client, router, XDP balancer, 3 reals with real TCP servers and
DSR), ``lbctl serve`` adopting the balancer's maps with a TCP health check (probes
through the tunnel). Keep-alive HTTP/1.1 connections are open on every real. Then two
reals fail, one after the other:

* **refusing**: its server is stopped, so the kernel answers the probes' SYNs with RST;
* **silent**: its link is set down inside its namespace, so the probes get no answer at
  all and fail by ``timeout``.

Each must leave the datapath's ring (read from the pinned map, every millisecond) within
``interval x fall + timeout`` of the failure, plus the ring write the docs allow
(RING_WRITE_ALLOWANCE). Throughout, every keep-alive connection on the surviving real
answers every request, from that real.
"""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import threading
import time

import pytest
from test_control_daemon import Daemon

from lb.config import config_to_dict

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.4, 2, 3
BOUND = INTERVAL * FALL + TIMEOUT
RING_WRITE_ALLOWANCE = 0.05  # docs/api.md: the daemon acting on the verdict (wake-up, ring write)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


def _out_of_ring(bal, vip_num: int, real_id: int, since: float, limit: float = 10.0) -> float:
    """Seconds from ``since`` until ``real_id`` is in no slot of the ring (polled every ms)."""
    while time.monotonic() - since < limit:
        if real_id not in bal.ring(vip_num):
            return time.monotonic() - since
        time.sleep(0.001)
    raise AssertionError(f"real {real_id} still in the ring after {limit} s")


def test_failing_reals_leave_the_ring_in_time_and_survivors_keep_their_connections(tmp_path) -> None:
    from netns.lab import Lab
    from netns.servers import KeepAliveClient
    from netns.topology import VIP4

    with Lab(reals=3, datapath="xdp") as lab:
        lb = lab.balancers()[0]
        # a balancer host's default route: the tunnel probes to the VIP take it
        _ip(lb.ns, "route", "add", "default", "via", lb.gw4)
        pin_dir = lab.state["pin_dirs"][lb.name]
        cfg = config_to_dict(lab.config)
        vip = next(v for v in cfg["vips"] if (v["address"], v["port"], v["protocol"]) == (VIP4, 80, "tcp"))
        vip["healthcheck"] = {"type": "tcp", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE,
                              "fall": FALL}
        d = Daemon(tmp_path, "--pin-dir", pin_dir, "--netns", lb.ns, interface=lb.ifname, datapath="xdp",
                   config=cfg)
        bal = lab.backend(lb.name).bal  # the same pinned maps the daemon writes
        vip_num = lab.tables.vip_nums[(ipaddress.ip_address(VIP4), 80, "tcp")]
        ids = {h.name: lab.tables.real_ids[ipaddress.ip_address(h.real4)] for h in lab.reals()}
        client = lab.client()
        conns: list[KeepAliveClient] = []
        stop = threading.Event()
        survivor_answers: list[str | BaseException] = []
        t = None
        try:
            d.start()
            with d.client() as c:
                deadline = time.monotonic() + 20
                while not (len(h := c.health()) == 3 and all(x["state"] == "up" for x in h)):
                    assert time.monotonic() < deadline, h
                    time.sleep(0.1)
            # keep-alive connections until every real holds at least 3
            by_real: dict[str, list[KeepAliveClient]] = {h.name: [] for h in lab.reals()}
            while min(len(v) for v in by_real.values()) < 3:
                assert len(conns) < 200, {k: len(v) for k, v in by_real.items()}
                k = KeepAliveClient(client.ns, VIP4)
                conns.append(k)
                by_real[k.get()].append(k)
            refusing, silent, survivor = (h for h in lab.reals())

            def keep_asking() -> None:  # the survivor's connections, all the time
                while not stop.is_set():
                    for k in by_real[survivor.name]:
                        try:
                            survivor_answers.append(k.get())
                        except BaseException as e:  # noqa: BLE001 - asserted below
                            survivor_answers.append(e)
                    time.sleep(0.01)

            t = threading.Thread(target=keep_asking)
            t.start()
            time.sleep(0.3)

            # 1. refusing: the server stops; the real's kernel resets the probes
            proc = lab._procs[f"server-{refusing.name}"]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out_refusing = _out_of_ring(bal, vip_num, ids[refusing.name], t0)
            time.sleep(0.5)

            # 2. silent: the real's link goes down in its namespace; probes time out
            t0 = time.monotonic()
            _ip(silent.ns, "link", "set", silent.ifname, "down")
            out_silent = _out_of_ring(bal, vip_num, ids[silent.name], t0)
            time.sleep(0.5)
            stop.set()
            t.join(timeout=30)
            with d.client() as c:
                states = {x["real"]: (x["state"], x["last_result"]["detail"]) for x in c.health()}
                probes = sum(x["totals"].get("success", 0) + x["totals"].get("failure", 0) for x in c.health())
            # the survivor's connections: still there, still on the survivor
            final = [k.get() for k in by_real[survivor.name]]
        finally:
            stop.set()
            if t is not None:
                t.join(timeout=30)
            for k in conns:
                k.close()
            d.stop()
        broken = [a for a in survivor_answers if not isinstance(a, str) or a != survivor.name]
        print(f"MEASURED health removal (tcp check, interval {INTERVAL} s, timeout {TIMEOUT} s, fall {FALL}; "
              f"bound {BOUND:.2f} s + {RING_WRITE_ALLOWANCE * 1000:.0f} ms ring write): refusing real out of the "
              f"ring after {out_refusing:.3f} s, silent real after {out_silent:.3f} s; {probes} probes; "
              f"{len(by_real[survivor.name])} keep-alive connections on the survivor answered "
              f"{len(survivor_answers)} requests, {len(broken)} broken; verdicts {states}")
        assert out_refusing <= BOUND + RING_WRITE_ALLOWANCE
        assert out_silent <= BOUND + RING_WRITE_ALLOWANCE
        assert out_silent > INTERVAL * (FALL - 1) + TIMEOUT  # it did take `fall` timeouts
        assert states[refusing.real4][0] == "down" and states[silent.real4][0] == "down"
        assert survivor_answers and not broken, broken[:3]
        assert final == [survivor.name] * len(by_real[survivor.name])
