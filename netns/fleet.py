"""The fleet lab: several balancers behind a BGP router with ECMP (docs/fleet.md).

:class:`FleetLab` is :class:`netns.lab.Lab` (same clients, reals, DSR, XDP balancers
with pinned maps) with the VIP routing done by BGP instead of static routes:

* the **router** runs BIRD (``bird2``): one BGP session per balancer and family (hold
  3 s, keepalive 1 s), the learned VIP routes go into the kernel with ``merge paths on``
  (one ECMP route over every balancer announcing the VIP);
* each **balancer** runs ``lbctl serve`` (adopting the lab's pinned maps, swapping its own
  program in), a BIRD announcing static routes over BGP, and the announcer sidecar
  (``python -m control.bgp``) that decides from the daemon's API what to announce.

The router's end of every balancer link gets the same MAC, so one configuration
(``gateway_mac``) is valid on every balancer: the fleet shares one config.

With ``etcd=True`` the config lives in etcd, in the router's namespace on its own
address (:data:`ETCD_ADDR`): TLS only (a throwaway CA, :mod:`netns.pki`), authentication
on, one user and role per balancer confined to the lab's key prefix, every password in a
0600 file, none on a command line. :meth:`FleetLab.partition_store` cuts one balancer
off etcd alone.

Names: ``lbf`` + 6 hex (per run), everything recorded in the lab's state file before it
exists, every process (daemons, BIRDs, announcers) killed on teardown, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import yaml

from lb.constants import XDP_DROP
from lb.kernel.progs import prog_info
from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, xdp_attach, xdp_detach
from netns.errors import LabError
from netns.lab import Lab
from netns.lab_bpf import load_xdp_action
from netns.netconfig import ip_batch, link_macs
from netns.topology import BALANCER_SEG0, seg4

FLEET_PREFIX = "lbf"
# etcd's client address: on the router's loopback, in segment 10, which no link uses
ETCD_ADDR = seg4(BALANCER_SEG0, 1)
ETCD_PORT = 2379
ROUTER_ASN = 65000
BALANCER_ASN = 65001


class FleetLab(Lab):
    """A lab whose balancers announce the VIPs to the router over BGP."""

    name_prefix = FLEET_PREFIX

    def __init__(self, reals: int = 3, *, balancers: int = 2, hold: int = 3, keepalive: int = 1,
                 announce_after: float = 1.0, etcd: bool = False, **kw: Any) -> None:
        if kw.get("datapath", "xdp") != "xdp":
            raise ValueError("the fleet lab runs lbctl serve on the XDP datapath")
        super().__init__(reals, balancers=balancers, **kw)
        self.hold, self.keepalive, self.announce_after = hold, keepalive, announce_after
        self.etcd = etcd
        self.state["fleet"] = {"balancers": {}}

    # ---- hooks into Lab's build ---------------------------------------------------------------

    def _addresses(self) -> None:
        super()._addresses()
        # One gateway MAC for every balancer: the router's end of each balancer link gets
        # lb1's, so the same config (gateway_mac) is right on every balancer.
        mac = self.balancers()[0].gw_mac
        ip_batch(self.router_ns, [f"link set {h.gw_ifname} address {mac}" for h in self.balancers()[1:]],
                 "one gateway MAC for the balancers")
        macs = link_macs(self.router_ns)
        for h in self.balancers():
            h.gw_mac = macs[h.gw_ifname]
        self._save()

    def _vip_routes(self) -> None:
        """Instead of static routes: BIRD on the router, lbctl serve + BIRD + announcer on
        every balancer; wait until the router has the ECMP route over all of them."""
        from control.bgp import router_bird_config

        d = self.log_dir
        peers = [(h.name, h.gw4, h.addr4, f"{h.gw6} {h.addr6}", BALANCER_ASN) for h in self.balancers()]
        conf = os.path.join(d, "rt.bird.conf")
        with open(conf, "w") as f:
            f.write(router_bird_config(router_id=self.balancers()[0].gw4, asn=ROUTER_ASN, peers=peers,
                                       log_file=os.path.join(d, "rt.bird.log"), hold=self.hold,
                                       keepalive=self.keepalive))
        self.router_bird_socket = os.path.join(d, "rt.bird.ctl")
        self._spawn_logged("bird-rt", self.router_ns,
                           ["bird", "-f", "-c", conf, "-s", self.router_bird_socket], "rt.bird.out")
        if self.etcd:
            self.start_etcd()
        for h in self.balancers():
            self._start_daemon(h)
        for h in self.balancers():
            self._wait_daemon(h)
        for h in self.balancers():
            self.start_speaker(h.name)
        self.wait_ecmp(len(self.balancers()), timeout=30)

    # ---- processes ----------------------------------------------------------------------------

    def _spawn_logged(self, role: str, ns: str | None, argv: list[str], log: str) -> subprocess.Popen:
        """A recorded process whose stdout and stderr both go to ``log`` in the log dir."""
        return self._spawn(role, ns, argv, os.path.join(self.log_dir, log), ready_pipe=False)

    def paths(self, name: str) -> dict[str, str]:
        d = self.log_dir
        return {"socket": os.path.join(d, f"{name}.api.sock"), "state_dir": os.path.join(d, f"{name}.state"),
                "config": os.path.join(d, "fleet.yaml"), "bird_conf": os.path.join(d, f"{name}.bird.conf"),
                "bird_socket": os.path.join(d, f"{name}.bird.ctl"), "conf_dir": os.path.join(d, f"{name}.vips"),
                "drain_file": os.path.join(d, f"{name}.drain")}

    def daemon_argv(self, name: str) -> list[str]:
        from lb.config import config_to_dict

        h = self.host(name)
        p = self.paths(name)
        if not os.path.exists(p["config"]):
            with open(p["config"], "w") as f:
                yaml.safe_dump(config_to_dict(self.config), f)
        return [sys.executable, "-m", "lb.cli", "serve", "--interface", h.ifname, "--netns", h.ns,
                "--datapath", "xdp", "--pin-dir", self.state["pin_dirs"][name], "--config", p["config"],
                "--state-dir", p["state_dir"], "--socket", p["socket"], *self.store_argv(name)]

    def _start_daemon(self, h: Any) -> None:
        self._spawn_logged(f"daemon-{h.name}", None, self.daemon_argv(h.name), f"{h.name}.daemon.log")

    def _wait_daemon(self, h: Any, timeout: float = 120) -> None:
        from control.client import Client

        proc = self._procs[f"daemon-{h.name}"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"lbctl serve on {h.name} exited {proc.returncode}: "
                               + self.log_tail(f"{h.name}.daemon.log"))
            try:
                with Client(socket=self.paths(h.name)["socket"], timeout=5) as c:
                    c.status()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        raise LabError(f"lbctl serve on {h.name} not ready after {timeout} s")

    def start_daemon(self, name: str) -> None:
        h = self.host(name)
        self._start_daemon(h)
        self._wait_daemon(h)

    # ---- etcd: the fleet's shared configuration ---------------------------------------------------

    def store_url(self, name: str) -> str | None:
        """The daemon's --store: etcd over TLS at the fleet's etcd address."""
        return f"etcds://{ETCD_ADDR}:{ETCD_PORT}/{self.name}" if self.etcd else None

    def store_argv(self, name: str) -> list[str]:
        """--store and its credentials: the lab CA's certificate and this balancer's
        user file (``lbN:PASSWORD``, mode 0600): no secret on a command line."""
        if not self.etcd:
            return []
        return ["--store", str(self.store_url(name)), "--store-ca", self.etcd_paths()["ca"],
                "--store-user-file", self.etcd_paths()[f"{name}.cred"]]

    def etcd_paths(self) -> dict[str, str]:
        d = os.path.join(self.log_dir, "pki")
        out = {"dir": d, "ca": os.path.join(d, "ca.pem"), "cert": os.path.join(d, "etcd-server.pem"),
               "key": os.path.join(d, "etcd-server.key"), "root.cred": os.path.join(d, "root.cred")}
        out.update({f"{h.name}.cred": os.path.join(d, f"{h.name}.cred") for h in self.balancers()})
        return out

    def etcd_client(self, user: str = "root") -> Any:
        """A client of the lab's etcd from the router's namespace, as ``user`` (its
        credentials file) once authentication is on."""
        import ssl

        from control.etcd_store import EtcdClient, read_credentials

        p = self.etcd_paths()
        creds = read_credentials(p[f"{user}.cred"]) if self.state["fleet"].get("etcd_auth") else None
        return EtcdClient(ETCD_ADDR, ETCD_PORT, netns=self.router_ns, credentials=creds,
                          tls=ssl.create_default_context(cafile=p["ca"]))

    def _etcd_pki(self) -> None:
        """The lab's CA, etcd's server certificate (CN names no etcd user), and a random
        password per etcd user, each in its own 0600 file."""
        import secrets

        from netns.pki import LabCA

        p = self.etcd_paths()
        LabCA(p["dir"], f"{self.name} CA").issue("etcd-server", [ETCD_ADDR], server=True)
        for user in ["root", *(h.name for h in self.balancers())]:
            fd = os.open(p[f"{user}.cred"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{user}:{secrets.token_urlsafe(24)}\n")

    def _etcd_auth(self) -> None:
        """Users and roles, then authentication on: ``root`` (the lab's admin) and per
        balancer a user and a role of the same name that may read and write the fleet's
        key prefix only."""
        from control.etcd_store import _b64, read_credentials

        c = self.etcd_client()
        p = self.etcd_paths()
        _, root_pw = read_credentials(p["root.cred"])
        c.call("/v3/auth/user/add", {"name": "root", "password": root_pw})
        c.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        prefix = f"/{self.name}/"
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # every key that starts with the prefix
        for h in self.balancers():
            _, pw = read_credentials(p[f"{h.name}.cred"])
            c.call("/v3/auth/user/add", {"name": h.name, "password": pw})
            c.call("/v3/auth/role/add", {"name": h.name})
            c.call("/v3/auth/role/grant", {"name": h.name, "perm": {"permType": "READWRITE", "key": _b64(prefix),
                                                                     "range_end": _b64(end)}})
            c.call("/v3/auth/user/grant", {"user": h.name, "role": h.name})
        c.call("/v3/auth/enable", {})
        self.state["fleet"]["etcd_auth"] = True
        self._save()

    def start_etcd(self, timeout: float = 30) -> None:
        """etcd in the router's namespace: clients over TLS on the fleet's etcd address
        (the router's loopback, reached by the balancers through their links), the peer
        URL on the namespace's loopback; data under the lab's log dir. The first start
        makes the certificates, the users and roles, and turns authentication on."""
        from control.etcd_store import EtcdUnavailable

        first = not os.path.exists(self.etcd_paths()["ca"])
        if first:
            self._etcd_pki()
            ip_batch(self.router_ns, [f"addr add {ETCD_ADDR}/32 dev lo"], "the fleet's etcd address")
            for h in self.balancers():  # a balancer routes nothing else (no default route)
                ip_batch(h.ns, [f"route add {ETCD_ADDR}/32 via {h.gw4}"], f"{h.name}'s route to etcd")
        p = self.etcd_paths()
        clients = f"https://{ETCD_ADDR}:{ETCD_PORT}"
        peer = "http://127.0.0.1:2380"
        argv = ["etcd", "--name", "fleet", "--data-dir", os.path.join(self.log_dir, "etcd"),
                "--listen-client-urls", clients, "--advertise-client-urls", clients,
                "--cert-file", p["cert"], "--key-file", p["key"],
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"fleet={peer}", "--log-level", "warn"]
        proc = self._spawn_logged("etcd", self.router_ns, argv, "etcd.log")
        c = self.etcd_client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                c.get(f"/{self.name}/probe")
                break
            except EtcdUnavailable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError("etcd did not start: " + self.log_tail("etcd.log")) from None
                time.sleep(0.1)
        if first:
            self._etcd_auth()

    def partition_store(self, name: str, cut: bool = True) -> None:
        """Cut (or heal) balancer ``name`` off etcd, and only off etcd: its packets to the
        etcd address go to a neighbour that does not exist on its link, so they vanish
        silently as in a real partition; BGP and the data path are untouched."""
        h = self.host(name)
        via = h.gw4.rsplit(".", 1)[0] + ".254" if cut else h.gw4
        ip_batch(h.ns, [f"route replace {ETCD_ADDR}/32 via {via}"],
                 f"{'cutting' if cut else 'healing'} {name}'s path to etcd")

    def log_tail(self, log: str, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.log_dir, log), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def start_speaker(self, name: str) -> None:
        """BIRD in the balancer's namespace and the announcer sidecar next to it."""
        from control.bgp import BirdSpeaker, balancer_bird_config

        h = self.host(name)
        p = self.paths(name)
        os.makedirs(p["conf_dir"], exist_ok=True)
        BirdSpeaker(p["conf_dir"], p["bird_socket"]).write(set())  # start announcing nothing
        with open(p["bird_conf"], "w") as f:
            f.write(balancer_bird_config(router_id=h.addr4, asn=BALANCER_ASN, peer_asn=ROUTER_ASN,
                                         local4=h.addr4, peer4=h.gw4, local6=h.addr6, peer6=h.gw6,
                                         conf_dir=p["conf_dir"], log_file=os.path.join(self.log_dir, f"{name}.bird.log"),
                                         hold=self.hold, keepalive=self.keepalive))
        bird = self._spawn_logged(f"bird-{name}", h.ns, ["bird", "-f", "-c", p["bird_conf"], "-s", p["bird_socket"]],
                                  f"{name}.bird.out")
        deadline = time.monotonic() + 10
        while not os.path.exists(p["bird_socket"]):
            if time.monotonic() > deadline or bird.poll() is not None:
                raise LabError(f"BIRD on {name} did not start: " + self.log_tail(f"{name}.bird.out"))
            time.sleep(0.05)
        self._spawn_logged(f"announcer-{name}", None,
                           [sys.executable, "-m", "control.bgp", "--api-socket", p["socket"], "--interface",
                            h.ifname, "--netns", h.ns, "--bird-socket", p["bird_socket"], "--conf-dir",
                            p["conf_dir"], "--drain-file", p["drain_file"],
                            "--announce-after", str(self.announce_after)], f"{name}.announcer.log")

    def kill_role(self, role: str, sig: int = signal.SIGKILL) -> None:
        proc = self._procs.get(role)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def kill_balancer(self, name: str) -> None:
        """The balancer's host dies silently: first the router's end of its link drops
        everything the balancer sends (a dead host sends no TCP FIN/RST that would close
        the BGP session at once: only the hold timer notices), then SIGKILL its daemon,
        BIRD and announcer, and take the XDP program off its link (it would keep
        forwarding without the daemon)."""
        h = self.host(name)
        fd = load_xdp_action(XDP_DROP, "fleet_xdp_drop")
        try:
            self.state["prog_ids"].append(int(prog_info(fd)["id"]))
            self._save()
            xdp_attach(h.gw_ifname, fd, XDP_FLAGS_DRV_MODE, netns=self.router_ns)
        finally:
            os.close(fd)
        for role in (f"daemon-{name}", f"bird-{name}", f"announcer-{name}"):
            proc = self._procs.get(role)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        xdp_detach(h.ifname, netns=h.ns)
        for role in (f"daemon-{name}", f"bird-{name}", f"announcer-{name}"):
            proc = self._procs.get(role)
            if proc is not None:
                proc.wait(timeout=30)

    # ---- the router's view -----------------------------------------------------------------------

    def vip_nexthops(self, vip: str) -> list[str]:
        """The router's kernel next hops for the VIP (empty: no route)."""
        plen = 128 if ":" in vip else 32
        r = subprocess.run(["ip", "-n", self.router_ns, "-6" if plen == 128 else "-4", "-j", "route", "show",
                            f"{vip}/{plen}"],
                           capture_output=True, text=True, timeout=10, check=False)
        out = []
        for route in json.loads(r.stdout or "[]"):
            if "nexthops" in route:
                out += [n.get("gateway", "") for n in route["nexthops"]]
            elif "gateway" in route:
                out.append(route["gateway"])
        return sorted(out)

    def wait_ecmp(self, n: int, timeout: float = 30, vips: list[str] | None = None) -> float:
        """Wait until every VIP is routed over exactly ``n`` balancers; seconds waited."""
        vips = vips or sorted({v.address for v in self.vips})
        t0 = time.monotonic()
        while True:
            hops = {v: self.vip_nexthops(v) for v in vips}
            if all(len(h) == n for h in hops.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                detail = "".join(f"\n--- {h.name}: {self.bird_show(h.name)}{self.log_tail(h.name + '.bird.out')}"
                                 f"{self.log_tail(h.name + '.announcer.log', 1000)}" for h in self.balancers())
                raise LabError(f"VIP routes not over {n} balancers after {timeout} s: {hops}; router BIRD: "
                               + self.bird_show("rt") + detail)
            time.sleep(0.02)

    def bird_show(self, who: str, what: str = "protocols") -> str:
        sock = self.router_bird_socket if who == "rt" else self.paths(who)["bird_socket"]
        r = subprocess.run(["birdc", "-s", sock, "show", *what.split()], capture_output=True, text=True,
                           timeout=10, check=False)
        return r.stdout + r.stderr


def main(argv: list[str] | None = None) -> int:
    """``python -m netns.fleet up [--reals N] [--balancers N] [--etcd]``: build a fleet lab
    that stays up, print its name (``lbctl lab down NAME`` removes it)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m netns.fleet")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--reals", type=int, default=3)
    up.add_argument("--balancers", type=int, default=2)
    up.add_argument("--etcd", action="store_true", help="shared config in etcd over TLS with a user per balancer (lbctl serve --store etcds://...)")
    args = p.parse_args(argv)
    lab = FleetLab(args.reals, balancers=args.balancers, etcd=args.etcd)
    lab.build()
    lab.release()
    print(lab.name)
    return 0


__all__ = ["FleetLab", "main"]

if __name__ == "__main__":
    sys.exit(main())
