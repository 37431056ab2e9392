"""Prometheus metrics (prometheus-client), one registry per daemon.

Datapath counters are read from the datapath at scrape time (a custom collector), so
they are exactly the counters the datapath keeps, per VIP and per real included. Every
counter of lb.constants.STATS is exported, by its name: ``tx_X`` as
``lb_tx_packets_total{action="X"}``, ``pass_X`` / ``drop_X`` as ``lb_pass_packets_total`` /
``lb_drop_packets_total{reason="X"}``, ``lru_X`` as ``lb_conn_table_lookups_total{result="X"}``,
``quic_X`` as ``lb_quic_packets_total{result="X"}``, a few by name (below), and any other
(a counter added later) as ``lb_<name>_total``:

==========================================  ==========================================
``lb_rx_packets_total``                     every frame the datapath saw
``lb_tx_packets_total{action}``             ``encap``, ``icmp_echo_reply``, ``icmp_too_big``
``lb_pass_packets_total{reason}``           ``not_ip``, ``not_vip``, ``local``
``lb_drop_packets_total{reason}``           ``malformed``, ``ip_options``, ``fragment``,
                                            ``oversize``, ``no_real``, ``encap_failed``,
                                            ``too_big``
``lb_conn_table_lookups_total{result}``     ``hit``, ``miss``
``lb_quic_packets_total{result}``           ``routed``, ``fallback``, ``unknown``
``lb_src_routed_packets_total``             real taken from the source-route table
``lb_flood_new_conns_total``                new flows over max_conn_rate (not recorded)
``lb_down_real_migrated_total``             flows moved off a real down for their VIP
``lb_quic_conn_table_writes_total``         QUIC-routed packets that wrote their real into the
                                            connection table (no entry, or another real)
``lb_vip_prefix_matched_packets_total``     VIP found by prefix (a CIDR VIP)
``lb_hoplist_sent_packets_total``           stateless VIPs: frames sent with a hop list (also tx_encap)
``lb_icmp_errors_forwarded_total``
``lb_conn_table_entries``                   entries now (XDP: all CPUs)
``lb_vip_packets_total{vip}``, ``lb_vip_bytes_total{vip}``
``lb_real_packets_total{real}``, ``lb_real_bytes_total{real}``  (per real, all VIPs)
``lb_real_conn_table_misses_total{real}``  connection-table misses that sent a new flow
                                            to the real (all VIPs)
``lb_real_up{vip,real}``                    1 up, 0 down (health-checked reals only)
``lb_real_effective_weight{vip,real}``      weight the ring is built with
``lb_vip_all_reals_down{vip}``              1 while every real of the VIP is down
==========================================  ==========================================

Kept by the control plane: ``lb_healthcheck_results_total{vip,real,result}``,
``lb_healthcheck_duration_seconds{vip,real}`` (histogram, completed probes),
``lb_health_transitions_total{vip,real,to}``, ``lb_control_changes_total{result}``,
``lb_ring_slots_written_total``, ``lb_control_generation``.

With a shared store (``--store etcds://...``): ``lb_store_reachable`` (1, or 0 while the
store is lost: forwarding goes on with the last state), ``lb_store_unreachable_seconds``
(how long it has been lost, 0 while reachable), ``lb_store_adopted_total`` (states
written by another balancer and adopted), ``lb_store_conflicts_total`` (writes that lost
a race with another balancer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from control.core import Core
from control.health_probing import ProbeDone, TargetKey
from control.tables import vip_label
from lb import constants as C

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# counter name prefix -> (family, label, help): one labelled family per prefix
_FAMILIES = {
    "tx_": ("lb_tx_packets", "action", "Frames sent back out (XDP_TX), by action"),
    "pass_": ("lb_pass_packets", "reason", "Frames passed to the host stack, by reason"),
    "drop_": ("lb_drop_packets", "reason", "Frames dropped, by reason"),
    "lru_": ("lb_conn_table_lookups", "result", "Connection-table lookups"),
    "quic_": ("lb_quic_packets", "result", ("QUIC VIP packets by how the real was chosen "
                                            "(routed by server id, fallback, unknown id)")),
}
# counters with a family of their own; any other counter is lb_<name>
_SINGLE = {
    "rx_packets": ("lb_rx_packets", "Frames seen by the datapath"),
    "icmp_error_forwarded": ("lb_icmp_errors_forwarded", "ICMP errors sent to the flow's real"),
    "src_routed": ("lb_src_routed_packets", "Packets whose real came from the source-route table"),
    "flood_new_conns": ("lb_flood_new_conns", ("New flows over settings.max_conn_rate on their CPU: "
                                               "hashed without source routing, not recorded")),
    "down_real_migrated": ("lb_down_real_migrated", ("Connection-table entries naming a real down for "
                                                     "the flow's VIP not honoured: flow re-hashed, "
                                                     "entry rewritten")),
    "quic_conn_written": ("lb_quic_conn_table_writes",
                          "QUIC-routed packets that wrote their real into the connection table"),
    "hoplist_sent": ("lb_hoplist_sent_packets", "Stateless VIPs: frames sent with a hop list of two or more reals "
                                               "(also counted as tx_encap)"),
    "vip_prefix_matched": ("lb_vip_prefix_matched_packets", "Packets whose VIP was a CIDR VIP (found by prefix)"),
}


def _counter_families(counters: dict[str, int]) -> Iterator[Any]:
    """Every datapath counter of lb.constants.STATS as a Prometheus family."""
    grouped: dict[str, CounterMetricFamily] = {}
    for name in C.STATS:
        value = counters.get(name, 0)
        prefix = None if name in _SINGLE else next((p for p in _FAMILIES if name.startswith(p)), None)
        if prefix is not None:
            fam, label, helptext = _FAMILIES[prefix]
            if fam not in grouped:
                grouped[fam] = CounterMetricFamily(fam, helptext, labels=[label])
            grouped[fam].add_metric([name[len(prefix):]], value)
        else:
            fam, helptext = _SINGLE.get(name, (f"lb_{name}", f"Datapath counter {name}"))
            yield CounterMetricFamily(fam, helptext, value=value)
    yield from grouped.values()


class _DatapathCollector(Collector):
    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[Any]:
        core = self.core
        with core.lock:
            st, tb = core.state, core.tables
            s = core.port.read_stats()
            conn = core.port.conn_count()
        yield from _counter_families(s.counters)
        yield GaugeMetricFamily("lb_conn_table_entries", "Connection-table entries", value=conn)

        vp = CounterMetricFamily("lb_vip_packets", "Packets to a VIP", labels=["vip"])
        vb = CounterMetricFamily("lb_vip_bytes", "Bytes to a VIP (frames, L2 included)", labels=["vip"])
        for v in st.config.vips:
            num = st.ids.vips[v.key]
            label = vip_label(v.key)
            vp.add_metric([label], int(s.vip[num, C.VIP_STAT_PACKETS]))
            vb.add_metric([label], int(s.vip[num, C.VIP_STAT_BYTES]))
        yield vp
        yield vb
        rp = CounterMetricFamily("lb_real_packets", "Packets sent to a real (all VIPs)", labels=["real"])
        rb = CounterMetricFamily("lb_real_bytes", "Bytes sent to a real (input frames)", labels=["real"])
        rm = CounterMetricFamily("lb_real_conn_table_misses", ("Connection-table misses that sent a "
                                 "new flow to a real (all VIPs)"), labels=["real"])
        for addr, rid in st.ids.reals.items():
            rp.add_metric([addr], int(s.real[rid, C.VIP_STAT_PACKETS]))
            rb.add_metric([addr], int(s.real[rid, C.VIP_STAT_BYTES]))
            rm.add_metric([addr], int(s.real[rid, C.REAL_STAT_LRU_MISS]))
        yield rp
        yield rb
        yield rm

        up = GaugeMetricFamily("lb_real_up", "1 if the real passes its health check", labels=["vip", "real"])
        ew = GaugeMetricFamily("lb_real_effective_weight", "Weight the ring is built with",
                               labels=["vip", "real"])
        ad = GaugeMetricFamily("lb_vip_all_reals_down", "1 while every real of the VIP is down",
                               labels=["vip"])
        if tb is not None:
            for key, targets in tb.targets.items():
                label = vip_label(key)
                for t in targets:
                    ew.add_metric([label, t.address], t.effective)
                    if t.up is not None:
                        up.add_metric([label, t.address], 1 if t.up else 0)
                ad.add_metric([label], 1 if key in tb.all_down else 0)
        yield up
        yield ew
        yield ad
        yield GaugeMetricFamily("lb_control_generation", "Generation of the desired state",
                                value=st.generation)
        rs = CounterMetricFamily("lb_ring_slots_written", "Ring slots written by the control plane")
        rs.add_metric([], core.counters["ring_slots_written"])
        yield rs
        ch = CounterMetricFamily("lb_control_changes", "Change requests", labels=["result"])
        ch.add_metric(["accepted"], core.counters["changes"])
        ch.add_metric(["refused_or_failed"], core.counters["changes_failed"])
        ch.add_metric(["rolled_back"], core.counters["rollbacks"])
        yield ch
        yield GaugeMetricFamily("lb_prev_rings", "Previous rings of stateless VIPs in the datapath",
                                value=len(tb.prev.rings) if tb is not None else 0)
        pl = CounterMetricFamily("lb_prev_rings_lost", "Previous rings of stateless VIPs not kept for"
                                 " their whole window", labels=["reason"])
        pl.add_metric(["dropped_early"], core.counters["prev_rings_dropped_early"])
        pl.add_metric(["no_slot"], core.counters["prev_rings_no_slot"])
        yield pl


class _StoreCollector(Collector):
    """The shared store's reachability, from the live ``info`` dict the store keeps
    (control.etcd_store.EtcdStore.info)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def collect(self) -> Iterator[Any]:
        i = self.info
        if i.get("reachable") is None:  # not asked yet
            return
        yield GaugeMetricFamily("lb_store_reachable", "1 while the shared desired-state store answers",
                                value=1 if i["reachable"] else 0)
        since = i.get("unreachable_since")
        yield GaugeMetricFamily("lb_store_unreachable_seconds", "Seconds since the store was lost (0: reachable)",
                                value=0 if since is None else max(0.0, time.time() - since))
        yield CounterMetricFamily("lb_store_adopted", "States written by another balancer and adopted",
                                  value=i.get("adopted", 0))
        yield CounterMetricFamily("lb_store_conflicts", "Writes refused: another balancer wrote first",
                                  value=i.get("conflicts", 0))


class Metrics:
    """The daemon's registry: datapath collector + health-check metrics; with
    ``store_info`` (a shared store's live status), the store's reachability."""

    def __init__(self, core: Core, store_info: dict[str, Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DatapathCollector(core))
        if store_info is not None:
            self.registry.register(_StoreCollector(store_info))
        self.hc_results = Counter("lb_healthcheck_results", "Health-check probe results",
                                  ["vip", "real", "result"], registry=self.registry)
        self.hc_latency = Histogram("lb_healthcheck_duration_seconds", "Duration of completed probes",
                                    ["vip", "real"], registry=self.registry,
                                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                             0.5, 1.0, 2.5, 5.0))
        self.transitions = Counter("lb_health_transitions", "Health verdict changes",
                                   ["vip", "real", "to"], registry=self.registry)
        core.on_health.append(self.on_transition)

    def observe_probe(self, ev: ProbeDone) -> None:
        vip, real = vip_label(ev.key[0]), ev.key[1]
        self.hc_results.labels(vip, real, "success" if ev.result.ok else "failure").inc()
        if ev.result.latency is not None:
            self.hc_latency.labels(vip, real).observe(ev.result.latency)

    def on_transition(self, key: TargetKey, up: bool, reason: str) -> None:
        self.transitions.labels(vip_label(key[0]), key[1], "up" if up else "down").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
