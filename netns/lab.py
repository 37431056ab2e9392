"""The network-namespace lab: clients, a router, balancers on a stick, reals with DSR.

One call builds the whole topology (see docs/lab.md for the diagram and the addressing
plan)::

    with Lab(reals=3) as lab:                     # built on enter, torn down on exit
        results = http_requests(lab.client().ns, VIP4, 80, n=1000)

* **client** namespaces (``c1``..) with a 1500-byte link to the router;
* one **router** namespace that routes VIP/32 and VIP/128 to the balancer(s) (ECMP if
  there are several) and the tunnel traffic (outer destination = a real) to the reals;
* **balancer** namespaces (``lb1``..), each "on a stick": one 1600-byte link to the
  router; the datapath encapsulates and sends the packet back out of that link
  (XDP_TX), towards ``gateway_mac`` = the router's MAC on that link;
* **real** namespaces (``r1``..): the VIPs on loopback, the decap program (XDP, native)
  on the router-facing link, the real servers (:mod:`netns.servers`) bound to the VIPs,
  default route via the router, so replies go straight to the client (DSR).

Everything the lab creates is recorded, *before* it is created, in a state file
``/run/lb-lab/<name>.json`` (:mod:`netns.lab_state`). :meth:`Lab.teardown` (and
:func:`netns.teardown.teardown` for another process, e.g. ``lbctl lab down``) removes
everything listed there: processes, XDP programs, namespaces (and with them every link:
all links have one end in the router), pinned maps under ``/sys/fs/bpf/<name>/``, logs,
the state file. A ``with Lab()`` block tears down on any exception, KeyboardInterrupt
included, with SIGINT/SIGTERM blocked while it does; :meth:`Lab.release` instead leaves
the lab running after the process exits (``lbctl lab up``).

The balancer's datapath is a parameter, ``"xdp"`` or ``"userspace"``
(:mod:`netns.datapaths`). The rest lives beside this module: the addressing plan and
hosts in :mod:`netns.topology`, ``ip``/sysctl plumbing in :mod:`netns.netconfig`,
processes in :mod:`netns.processes`.

Real ids are kept stable across :meth:`Lab.apply` calls, as Katran does: a real keeps
its id while it is configured, a removed real's id is not handed out again in this lab,
so connection-table entries never point at the wrong real after a change
(:mod:`netns.lab_tables`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Self

from lb.constants import XDP_PASS
from lb.kernel.objects import BPFFS
from lb.kernel.progs import prog_info
from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, xdp_attach
from netns.datapaths import (
    Backend,
    UserspaceBackend,
    UserspaceRunner,
    XdpBackend,
    check_datapath,
    run_userspace,
)
from netns.errors import LabError
from netns.lab_bpf import load_xdp_action, pin_prog_map
from netns.lab_state import STATE_DIR, state_path_for, write_state
from netns.lab_tables import remap_real_ids, with_gateway
from netns.netconfig import ip_batch, link_macs, tx_checksum_off, write_sysctls
from netns.processes import proc_start_time, signals_blocked, spawn, wait_ready
from netns.teardown import teardown_state
from netns.topology import (
    HTTP_PORT,
    MAX_BALANCERS,
    MAX_CLIENTS,
    MAX_REALS,
    UDP_PORT,
    Host,
    check_addresses,
    host_commands,
    make_hosts,
    role_sysctls,
    vip_route_commands,
    vips_and_reals,
)

NAME_PREFIX = "lbl"
LAB_CONN_TABLE_SIZE = 65536  # per CPU; Katran's 1M per CPU would take seconds to allocate


class Lab:
    """A whole lab; see the module docstring.

    reals / clients / balancers: how many of each namespace.
    datapath: "xdp" or "userspace".
    config: an lb.config.Config whose VIPs and reals the lab serves (addresses must fit
        the addressing plan; gateway_mac is replaced by the router's MAC). Default: the
        VIPs VIP4 and VIP6, HTTP on port 80 and UDP echo on port 7, every real weight 1.
    weights: real name -> weight for the default config; reals left out are built (and
        serve) but are not in the balancer's config yet (add them later with
        :meth:`set_weights`).
    balancer_processes: run a userspace datapath in its own process (the runner,
        ``python -m netns.lab run-userspace``) instead of in this one, so the lab can
        outlive this process (``lbctl lab up``). XDP needs no process either way.
    on_stage: called with each stage name as the build reaches it (tests raise there).
    """

    STAGES = ("namespaces", "links", "addresses", "decap", "servers", "balancer", "routes",
              "ready")
    name_prefix = NAME_PREFIX  # subclasses (netns/fleet.py) name their labs differently

    def __init__(self, reals: int = 3, *, clients: int = 1, balancers: int = 1,
                 datapath: str = "xdp", config: Any = None,
                 weights: Mapping[str, int] | None = None, state_dir: str = STATE_DIR,
                 xdp_mode: str = "native", balancer_processes: bool = False,
                 on_stage: Callable[[str], None] | None = None) -> None:
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        if not 1 <= balancers <= MAX_BALANCERS:
            raise ValueError(f"balancers must be 1..{MAX_BALANCERS}")
        self.datapath = datapath
        self.xdp_mode = xdp_mode
        self.balancer_processes = balancer_processes
        self.state_dir = state_dir
        self.on_stage = on_stage
        self._user_config = config
        self.vips, real_addrs = vips_and_reals(config)
        n_reals = max(reals, len(real_addrs))
        if not 1 <= n_reals <= MAX_REALS:
            raise ValueError(f"reals must be 1..{MAX_REALS}")
        self.name = self._new_name()
        self.router_ns = f"{self.name}-rt"
        self.hosts: list[Host] = make_hosts(self.name, clients, balancers, n_reals)
        for h, (a4, a6) in zip(self.reals(), real_addrs + [(None, None)] * n_reals):
            h.real4 = a4 or h.addr4
            h.real6 = a6 or h.addr6
        check_addresses(self.hosts, self.vips)
        if config is None:
            names = [h.name for h in self.reals()]
            self.weights = dict(weights) if weights is not None else {n: 1 for n in names}
            unknown = set(self.weights) - set(names)
            if unknown:
                raise ValueError(f"weights for reals this lab does not have: {sorted(unknown)}")
        else:
            if weights is not None:
                raise ValueError("give weights or a config, not both")
            self.weights = None
        self.state_path = state_path_for(self.name, state_dir)
        self.pin_root = os.path.join(BPFFS, self.name)
        self.log_dir = os.path.join(state_dir, self.name)
        self.state: dict[str, Any] = {
            "version": 1, "name": self.name, "datapath": datapath, "created": time.time(),
            "owner_pid": os.getpid(), "owner_start": proc_start_time(os.getpid()),
            "status": "new", "router_ns": self.router_ns, "namespaces": [], "links": [],
            "hosts": [], "vips": [asdict(v) for v in self.vips], "pin_root": self.pin_root,
            "pin_dirs": {}, "processes": [], "prog_ids": [], "log_dir": self.log_dir,
            "config": None, "real_ids": {}, "max_reals": None,
        }
        self.real_ids: dict[str, int] = self.state["real_ids"]
        self.config = None  # the lb.config.Config in force
        self.tables = None  # its lb.datapath_tables.DatapathTables (lab real ids)
        self._backends: dict[str, Backend] = {}
        self._decap = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = False
        self.timings: dict[str, float] = {}

    # ---- naming --------------------------------------------------------------------------

    def _new_name(self) -> str:
        from netns.ns import list_netns, unique_name

        taken = set(list_netns())
        for _ in range(20):
            name = unique_name(self.name_prefix, maxlen=9)
            if (not any(n.startswith(name) for n in taken)
                    and not os.path.exists(state_path_for(name, self.state_dir))
                    and not os.path.exists(os.path.join(BPFFS, name))):
                return name
        raise LabError("could not find an unused lab name")

    # ---- hosts -----------------------------------------------------------------------------

    def _role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def clients(self) -> list[Host]:
        return self._role("client")

    def balancers(self) -> list[Host]:
        return self._role("balancer")

    def reals(self) -> list[Host]:
        return self._role("real")

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def client(self, k: int = 1) -> Host:
        return self.host(f"c{k}")

    def real_by_address(self, addr: str) -> Host:
        ip = ipaddress.ip_address(addr)
        for h in self.reals():
            if ip in (ipaddress.ip_address(h.real4), ipaddress.ip_address(h.real6)):
                return h
        raise KeyError(addr)

    @property
    def namespaces(self) -> list[str]:
        return [self.router_ns] + [h.ns for h in self.hosts]

    # ---- state file ------------------------------------------------------------------------

    def _save(self) -> None:
        self.state["hosts"] = [asdict(h) for h in self.hosts]
        os.makedirs(self.state_dir, exist_ok=True)
        write_state(self.state, self.state_path)

    def _stage(self, name: str) -> None:
        self.state["status"] = f"building:{name}"
        self._save()
        if self.on_stage is not None:
            self.on_stage(name)

    # ---- build -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> Lab:
        """Build everything; on any failure (Ctrl-C included) tear down and re-raise."""
        check_datapath(self.datapath)
        try:
            self._build()
        except BaseException:
            try:
                self.teardown()
            except LabError as e:  # keep the build's error; say what was left
                print(f"lab {self.name}: teardown after a failed build: {e}", file=sys.stderr)
            raise
        return self

    def _timed(self, what: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - t0, 3)
        return now

    def _build(self) -> None:
        t = t_start = time.monotonic()
        os.makedirs(self.log_dir, exist_ok=True)
        self._stage("namespaces")
        self.state["namespaces"] = list(self.namespaces)
        self._save()  # recorded before they exist: a crash in between leaves nothing unknown
        ip_batch(None, [f"netns add {ns}" for ns in self.namespaces], "creating namespaces")
        write_sysctls(self.router_ns, role_sysctls("router"))
        for h in self.hosts:
            write_sysctls(h.ns, role_sysctls(h.role))
        t = self._timed("namespaces", t)

        self._stage("links")
        self.state["links"] = [[h.gw_ifname, self.router_ns, h.ifname, h.ns] for h in self.hosts]
        self._save()
        ip_batch(self.router_ns, [
            f"link add {h.gw_ifname} mtu {h.mtu} type veth peer name {h.ifname} netns {h.ns} "
            f"mtu {h.mtu}" for h in self.hosts], "creating links")
        t = self._timed("links", t)

        self._stage("addresses")
        self._addresses()
        t = self._timed("addresses", t)

        self._stage("decap")
        self._attach_decap()
        t = self._timed("decap", t)

        self._stage("servers")
        self._start_servers()
        t = self._timed("servers", t)

        self._stage("balancer")
        self._start_balancers()
        t = self._timed("balancer", t)

        self._stage("routes")
        self._vip_routes()
        t = self._timed("routes", t)
        self.timings["total"] = round(t - t_start, 3)
        self._stage("ready")
        self.state["status"] = "ready"
        self.state["timings"] = self.timings
        self._save()

    def _addresses(self) -> None:
        router = ["link set lo up"]
        for h in self.hosts:
            cmds, router_cmds = host_commands(h, self.vips)
            router += router_cmds
            ip_batch(h.ns, cmds, f"configuring {h.name}")
        # router routes for config real addresses need the links up first
        ip_batch(self.router_ns, router, "configuring the router")
        for h in self.balancers():
            tx_checksum_off(self.router_ns, h.gw_ifname)
        for h in self.reals():  # replies cross the XDP_PASS on the router's end (above)
            tx_checksum_off(h.ns, h.ifname)
        macs = link_macs(self.router_ns)
        for h in self.hosts:
            h.gw_mac = macs[h.gw_ifname]
            h.mac = link_macs(h.ns)[h.ifname]
        self._save()

    def _attach_decap(self) -> None:
        from lb.decap_loader import DecapProgram

        # One program for every real (compiling takes seconds); its counters are the sum
        # over reals. Per-real figures come from the balancer and the servers.
        self._decap = DecapProgram("xdp", xdp_mode=self.xdp_mode)
        self.state["prog_ids"].append(int(prog_info(self._decap.prog_fd)["id"]))
        self._save()
        for h in self.reals():
            self._decap.attach(h.ifname, netns=h.ns)
        os.makedirs(self.pin_root, exist_ok=True)
        path = os.path.join(self.pin_root, "decap_stats")
        pin_prog_map(self._decap.prog_fd, "decap_stats", path)
        self.state["pin_dirs"]["decap_stats"] = path
        self._save()

    def _server_argv(self, h: Host) -> list[str]:
        from netns.servers import ADMIN_PORT, format_endpoint

        argv = [sys.executable, "-m", "netns.servers", "--name", h.name, "--addr4", h.real4,
                "--addr6", h.real6, "--admin", format_endpoint(h.addr4, ADMIN_PORT),
                "--admin", format_endpoint(h.addr6, ADMIN_PORT)]
        for v in self.vips:
            port = v.port or (HTTP_PORT if v.protocol == "tcp" else UDP_PORT)
            kind = "quic" if "quic" in v.flags else v.protocol
            # a CIDR VIP (tcp, checked): a wildcard socket answers every address of the
            # prefix, each connection from the address it was made to
            host = ("::" if v.version == 6 else "0.0.0.0") if v.is_prefix else v.address
            argv += [f"--{kind}", format_endpoint(host, port)]
        for q in (self._user_config.quic_servers if self._user_config is not None else ()):
            if q.real in (h.real4, h.real6):
                argv += ["--quic-id", f"{q.real}={q.id}"]
        return argv

    def _spawn(self, role: str, ns: str | None, argv: list[str], log: str, *,
               ready_pipe: bool = True) -> subprocess.Popen:
        """Start and record a process of this lab (:func:`netns.processes.spawn`). With
        ``ready_pipe`` its stdout is a pipe for :func:`netns.processes.wait_ready` and its
        stderr goes to ``log``; without, both go to ``log``."""
        with open(log, "ab") as logf:
            if ready_pipe:
                proc = spawn(ns, argv, subprocess.PIPE, logf)
            else:
                proc = spawn(ns, argv, logf, subprocess.STDOUT)
        self.state["processes"].append({"role": role, "ns": ns, "pid": proc.pid,
                                        "start": proc_start_time(proc.pid), "argv": argv})
        self._procs[role] = proc
        self._save()
        return proc

    def _start_servers(self) -> None:
        procs = [(h, self._spawn(f"server-{h.name}", h.ns, self._server_argv(h),
                                 os.path.join(self.log_dir, f"{h.name}.log")))
                 for h in self.reals()]  # all start at once, then wait for each
        for h, p in procs:
            wait_ready(p, 20, os.path.join(self.log_dir, f"{h.name}.log"), f"the server on {h.name}")

    def _start_balancers(self) -> None:
        # The router's end of each balancer link runs XDP_PASS: veth hands XDP_TX'd
        # frames only to a peer whose NAPI is on.
        fd = load_xdp_action(XDP_PASS, "lab_xdp_pass")
        try:
            self.state["prog_ids"].append(int(prog_info(fd)["id"]))
            self._save()
            # The router's end of each real link too: a real's decap sends a stateless VIP's
            # segment on to its next hop with XDP_TX (the second chance, docs/datapath.md).
            for h in self.reals():
                xdp_attach(h.gw_ifname, fd, XDP_FLAGS_DRV_MODE, netns=self.router_ns)
            for h in self.balancers():
                xdp_attach(h.gw_ifname, fd, XDP_FLAGS_DRV_MODE, netns=self.router_ns)
                if self.datapath == "userspace":
                    # XDP on the balancer's end makes the router's end segment GSO packets
                    # in software: the AF_PACKET datapath then sees wire-size frames.
                    xdp_attach(h.ifname, fd, XDP_FLAGS_DRV_MODE, netns=h.ns)
        finally:
            os.close(fd)  # the attachments hold the program
        cfg = self._initial_config()
        self.state["max_reals"] = cfg.settings.max_reals
        tables = self._compile(cfg)
        self._set_config(cfg, tables)  # before the balancers: the runner reads it
        for h in self.balancers():
            t = with_gateway(tables, h.gw_mac)
            if self.datapath == "xdp":
                pin_dir = os.path.join(self.pin_root, h.name)
                self.state["pin_dirs"][h.name] = pin_dir
                self._save()
                backend: Backend = XdpBackend(t, h, pin_dir, self.xdp_mode)
            elif self.balancer_processes:
                backend = UserspaceRunner(h, self.state_path, self.log_dir, self._spawn)
            else:
                backend = UserspaceBackend(t, h)
            self._backends[h.name] = backend
            if backend.prog_id is not None:
                self.state["prog_ids"].append(backend.prog_id)
            self._save()

    def _vip_routes(self) -> None:
        ip_batch(self.router_ns, vip_route_commands(self.vips, self.balancers()),
                 "routing the VIPs to the balancers")

    # ---- configuration ---------------------------------------------------------------------

    def _initial_config(self) -> Any:
        if self._user_config is not None:
            from lb.config import config_to_dict, parse_config

            data = config_to_dict(self._user_config)
            data["settings"]["gateway_mac"] = self.balancers()[0].gw_mac
            return parse_config(data)
        return self.config_for(self.weights)

    def config_for(self, weights: Mapping[str, int]) -> Any:
        """The lab's VIPs with the named reals (name -> weight) behind every VIP of each
        real's family; settings as in force (or the lab's defaults)."""
        from lb.config import config_to_dict, parse_config

        if self.config is not None:
            settings = config_to_dict(self.config)["settings"]
        elif self._user_config is not None:
            settings = config_to_dict(self._user_config)["settings"]
        else:
            settings = {"conn_table_size": LAB_CONN_TABLE_SIZE}
        settings["gateway_mac"] = self.balancers()[0].gw_mac or "02:00:00:00:00:01"
        vips = []
        for v in self.vips:
            reals = []
            for name, w in weights.items():
                h = self.host(name)
                reals.append({"address": h.real6 if v.version == 6 else h.real4, "weight": int(w)})
            vips.append({"address": v.address, "port": v.port, "protocol": v.protocol,
                         "hash": v.hash, "flags": list(v.flags), "reals": reals})
        return parse_config({"settings": settings, "vips": vips})

    def _compile(self, cfg: Any) -> Any:
        from lb.datapath_tables import compile_tables

        return remap_real_ids(compile_tables(cfg), self.real_ids, cfg.settings.max_reals)

    def _set_config(self, cfg: Any, tables: Any) -> None:
        from lb.config import config_to_dict

        self.config = cfg
        self.tables = tables
        self.state["config"] = config_to_dict(cfg)
        self._save()

    def apply(self, cfg: Any) -> int | None:
        """Load config ``cfg`` into every balancer: real ids kept stable, gateway MAC set
        per balancer, sizes as loaded. When only weights changed (same reals, same VIPs)
        just the ring slots that differ are rewritten (``update_ring``) and their number
        is returned; otherwise the whole tables go in (``load_tables``) and None is
        returned."""
        import numpy as np

        tables = self._compile(cfg)
        old = self.tables
        rings_only = (old is not None and np.array_equal(old.reals, tables.reals)
                      and np.array_equal(old.vip_keys, tables.vip_keys)
                      and np.array_equal(old.vip_metas, tables.vip_metas)
                      and np.array_equal(old.vip_prefix_keys, tables.vip_prefix_keys)
                      and np.array_equal(old.vip_prefix_metas, tables.vip_prefix_metas)
                      and np.array_equal(old.ctl, tables.ctl))  # settings (encap, mtu) too
        changed: int | None = 0 if rings_only else None
        for h in self.balancers():
            b = self._backends[h.name]
            if rings_only and hasattr(b, "update_ring"):
                for num in range(len(tables.vip_keys) + len(tables.vip_prefix_keys)):
                    changed += b.update_ring(num, tables.rings[num])
            else:
                b.load_tables(with_gateway(tables, h.gw_mac))
                changed = None
        self._set_config(cfg, tables)
        return changed

    def set_weights(self, weights: Mapping[str, int]) -> int | None:
        """Put exactly the named reals (name -> weight) behind the lab's VIPs; returns
        what :meth:`apply` returns."""
        self.weights = dict(weights)
        return self.apply(self.config_for(weights))

    def backend(self, name: str = "lb1") -> Any:
        """The in-process balancer handle (``.bal`` is the XdpBalancer / UserspaceBalancer)."""
        return self._backends[name]

    # ---- reading -------------------------------------------------------------------------

    def balancer_stats(self, name: str | None = None) -> dict[str, int]:
        """Global counters of one balancer, or summed over all of them."""
        names = [name] if name else [h.name for h in self.balancers()]
        total: dict[str, int] = {}
        for n in names:
            for k, v in self._backends[n].stats().items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def real_packets(self) -> dict[str, int]:
        """Packets each real address received from the balancers (XDP: per-real
        counters; keyed by real address)."""
        from lb import constants as C

        out: dict[str, int] = {}
        for h in self.balancers():
            arr = self._backends[h.name].real_stats()
            if arr is None:
                continue
            for addr, rid in self.real_ids.items():
                out[addr] = out.get(addr, 0) + int(arr[rid, C.VIP_STAT_PACKETS])
        return out

    def expected_real(self, vip: str, port: int, protocol: str, client: str, sport: int) -> str | None:
        """Name of the real Katran's hashing picks for a new flow (client, sport) ->
        (vip, port, protocol) under the config in force: the flow hash of
        docs/datapath.md on the ring of that VIP. (VIPs without flags.)"""
        from lb import constants as C
        from lb.jhash import jhash_2words, jhash_bytes

        t = self.tables
        num = t.vip_nums[(ipaddress.ip_address(vip), port, protocol)]
        ip = ipaddress.ip_address(client)
        ports = int.from_bytes(sport.to_bytes(2, "big") + port.to_bytes(2, "big"), "little")
        src = (int.from_bytes(ip.packed, "little") if ip.version == 4
               else jhash_bytes(ip.packed, t.max_vips))
        h = jhash_2words(src, ports, C.ch_rings_size(t.max_vips, t.ring_size))
        addr = t.real_address(int(t.rings[num][h % t.ring_size]))
        return None if addr is None else self.real_by_address(str(addr)).name

    def decap_stats(self) -> dict[str, int]:
        """The reals' decap counters (one program for all reals: summed)."""
        assert self._decap is not None
        return self._decap.read_stats()

    def server_stats(self) -> dict[str, dict]:
        """Each real server's own counters (from its admin endpoint)."""
        from netns.servers import admin_stats

        return {h.name: admin_stats(self.router_ns, h.addr4) for h in self.reals()}

    # ---- lifetime --------------------------------------------------------------------------

    def release(self) -> str:
        """Leave the lab running after this process exits (``lbctl lab up``): XDP programs
        stay attached, maps pinned, servers running. Returns the state file's path."""
        for b in self._backends.values():
            b.release()
        self._backends.clear()
        self._decap = None  # attachments and the pinned counters outlive the handle
        for p in self._procs.values():
            p.returncode = 0  # not ours to wait for any more (no ResourceWarning)
        self._procs.clear()
        self.state["owner_pid"] = None
        self.state["owner_start"] = None
        self._save()
        self._closed = True
        return self.state_path

    def teardown(self) -> None:
        """Remove everything; raise LabError listing what could not be removed."""
        if self._closed:
            return
        with signals_blocked():
            errors = []
            for name, b in list(self._backends.items()):
                try:
                    b.close()
                except Exception as e:  # noqa: BLE001 - keep tearing down, report it
                    errors.append(f"closing balancer {name}: {e}")
            self._backends.clear()
            if self._decap is not None:
                try:
                    self._decap.close()
                except Exception as e:  # noqa: BLE001 - keep tearing down, report it
                    errors.append(f"closing the decap program: {e}")
                self._decap = None
            errors += teardown_state(self.state, self.state_path)
            for p in self._procs.values():
                with contextlib.suppress(Exception):
                    p.wait(timeout=0.1)
            self._procs.clear()
            self._closed = True
        if errors:
            raise LabError(f"lab {self.name}: teardown incomplete: " + "; ".join(errors))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m netns.lab run-userspace --state FILE --balancer NAME``: the userspace
    runner of one lab balancer (:func:`netns.datapaths.run_userspace`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m netns.lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run-userspace", help="run the userspace datapath of one lab balancer")
    r.add_argument("--state", required=True)
    r.add_argument("--balancer", required=True)
    args = p.parse_args(argv)
    return run_userspace(args.state, args.balancer)


if __name__ == "__main__":
    sys.exit(main())
