"""Program reload under load loses no frame.

Topology (bench/bench_xdp.py's ``Bed``, topology mode): the live-frames generator
(lb/pktgen.py) in namespace ``gen`` sends frames to a VIP out of veth end A; the XDP
balancer is attached natively on end B (its own namespace) and encapsulates each frame
back out of B (XDP_TX, gateway = A's MAC), where the sink (xdp/sink.c on A) counts it.
While the generator streams, ``XdpBalancer.replace_program()`` compiles a new build
(other cflags: a different program) and swaps it in atomically on the same maps, several
times. Every frame sent must be accounted for: received by the sink, or counted as a
drop (veth tx_dropped on either end, any balancer drop/pass counter). Target: 0 lost;
and the balancer's rx_packets counter (shared by every build: same maps) equals the
frames sent, so no frame ever met "no program".
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns, pytest.mark.slow]

RELOADS = 5
CHUNK = 100_000


def test_replace_program_under_pktgen_load() -> None:
    from bench.bench_xdp import SRC, VIPS, Bed, bench_config
    from lb.bpf_loader import XdpBalancer
    from lb.datapath_tables import compile_tables
    from lb.pktgen import PacketGenerator

    with PacketGenerator() as gen, Bed(gen, topology=True, gen_cpu=0, other_cpu=1) as bed:
        tables = compile_tables(bench_config(bed.gateway_mac, conn_table_size=65536))
        bal = XdpBalancer.from_tables(tables)
        try:
            bal.attach(bed.b.name, "native", netns=bed.b.ns.name)
            vip = VIPS[(4, "lru")]
            gen.detach_tail_call()
            gen.set_action("tx")
            gen.set_template(bed.frame(4, SRC[4], vip), flows=1000, vary="src_port")
            gen.run(10_000, bed.a.index, netns=bed.gen_ns, cpu=bed.gen_cpu)  # warm: ARP-free, LRU filled
            time.sleep(0.2)

            def snapshot() -> tuple[int, int, dict[str, int]]:
                drops = bed.a.stats().get("tx_dropped", 0) + bed.b.stats().get("tx_dropped", 0)
                return bed.sink.counts().packets, drops, dict(bal.read_stats().counters)

            sink0, veth0, st0 = snapshot()
            sent = 0
            stop = threading.Event()
            errors: list[BaseException] = []

            def stream() -> None:
                nonlocal sent
                try:
                    while not stop.is_set():
                        r = gen.run(CHUNK, bed.a.index, netns=bed.gen_ns, cpu=bed.gen_cpu)
                        sent += r.packets
                except BaseException as e:  # noqa: BLE001 - reported by the test thread
                    errors.append(e)

            t = threading.Thread(target=stream)
            t.start()
            reload_s = []
            try:
                time.sleep(0.3)
                for i in range(RELOADS):
                    t0 = time.monotonic()
                    bal.replace_program([f"-DLB_RELOAD_GENERATION={i + 1}"])  # a new build
                    reload_s.append(time.monotonic() - t0)
                    time.sleep(0.2)
            finally:
                stop.set()
                t.join(timeout=120)
            assert not errors, errors
            # let the veth rings drain
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                sink1, veth1, st1 = snapshot()
                if sink1 - sink0 + veth1 - veth0 >= sent:
                    break
                time.sleep(0.05)
            sink1, veth1, st1 = snapshot()
            d = {k: st1[k] - st0[k] for k in st1}
            received = sink1 - sink0
            veth_dropped = veth1 - veth0
            bal_drops = sum(v for k, v in d.items() if k.startswith("drop_"))
            bal_pass = sum(v for k, v in d.items() if k.startswith("pass_"))
            lost = sent - received - veth_dropped - bal_drops - bal_pass
            print(f"MEASURED reload under load: {RELOADS} replace_program() calls "
                  f"({', '.join(f'{s:.2f}' for s in reload_s)} s each) while streaming; sent {sent}, "
                  f"sink received {received}, veth dropped {veth_dropped}, balancer drops {bal_drops}, "
                  f"passes {bal_pass}, balancer rx_packets {d['rx_packets']}, tx_encap {d['tx_encap']}; "
                  f"lost {lost}")
            assert sent > 0
            assert d["rx_packets"] == sent, "frames that met no balancer program"
            assert d["tx_encap"] == sent - bal_drops - bal_pass
            assert lost == 0
            assert veth_dropped == 0 and bal_drops == 0 and bal_pass == 0
        finally:
            bal.close()
