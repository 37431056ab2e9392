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
