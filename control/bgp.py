"""VIP announcement over BGP: when a balancer should attract a VIP's traffic, and the
adapter that tells its BGP speaker (BIRD).

The model (docs/fleet.md): several balancers sit behind a router that routes each VIP
over every balancer announcing it (ECMP). A balancer must announce a VIP only while it
can serve it:

* its datapath is healthy (the daemon answers, the XDP program is on the interface), and
* the VIP has at least one real that takes new flows (weight > 0, not drained, healthy),
* and it is not being drained (operator flag) or shut down (SIGTERM).

Anything else withdraws. :class:`Announcer` is that decision, pure: inputs and a clock
in, the set of prefixes to announce out. It withdraws at once (``withdraw_after``,
default 0 s) and re-announces only after the inputs have been good for ``announce_after``
seconds, so a flapping real or daemon does not make the router rehash flows back and
forth. Tests drive it with a fake clock.

:class:`BirdSpeaker` applies a decision: it writes the announced prefixes as static
blackhole routes into files that the balancer's BIRD includes in two ``protocol static``
blocks (exported over BGP with ``next hop self``) and runs ``birdc configure``: BIRD
reloads only the static protocols, the BGP sessions stay up, the router gets an UPDATE or
WITHDRAW within milliseconds. If this process and BIRD die together (the host dies), the
router's hold timer removes the balancer.

``python -m control.bgp`` is the announcer sidecar: it polls the daemon's API (``lbctl
serve``) and the interface, decides, tells BIRD; on SIGTERM/SIGINT it withdraws
everything before exiting.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lb.bgp")

__all__ = [
    "Announcer",
    "BirdSpeaker",
    "Observation",
    "balancer_bird_config",
    "observe",
    "router_bird_config",
    "vip_prefix",
]


def vip_prefix(address: str) -> str:
    """'198.18.0.100' -> '198.18.0.100/32', '2001:db8::100' -> '2001:db8::100/128'; a CIDR
    VIP's prefix is announced as it is ('198.18.64.0/24')."""
    if "/" in address:
        return str(ipaddress.ip_network(address))
    a = ipaddress.ip_address(address)
    return f"{a}/{a.max_prefixlen}"


@dataclass(frozen=True)
class Observation:
    """What the balancer sees at one moment.

    datapath_ok: the daemon answers and the datapath is on the interface.
    vips: prefix -> whether the VIP (any port/protocol on that address) has at least one
        real that takes new flows. A prefix not listed is not configured: withdrawn.
    drain: the operator asked this balancer to stop attracting traffic.
    stopping: the announcer is shutting down (SIGTERM).
    """

    datapath_ok: bool
    vips: Mapping[str, bool] = field(default_factory=dict)
    drain: bool = False
    stopping: bool = False


class Announcer:
    """The announce/withdraw decision, with hysteresis; pure (no I/O), clock injected.

    A prefix is *eligible* when the datapath is ok, the VIP has a usable real, and there
    is no drain or stop. An announced prefix is withdrawn once it has been ineligible for
    ``withdraw_after`` seconds (0: at the first bad observation). A withdrawn prefix is
    announced once it has been eligible for ``announce_after`` seconds. Drain and stop
    withdraw at once, whatever ``withdraw_after`` says.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, announce_after: float = 1.0,
                 withdraw_after: float = 0.0) -> None:
        self.clock = clock
        self.announce_after = announce_after
        self.withdraw_after = withdraw_after
        self.announced: set[str] = set()
        self._since: dict[str, tuple[bool, float]] = {}  # prefix -> (eligible, since when)

    def eligible(self, obs: Observation) -> dict[str, bool]:
        ok = obs.datapath_ok and not obs.drain and not obs.stopping
        prefixes = set(obs.vips) | self.announced
        return {p: ok and bool(obs.vips.get(p, False)) for p in prefixes}

    def decide(self, obs: Observation) -> set[str]:
        """The prefixes to announce now (the previous set, changed as the rules say)."""
        now = self.clock()
        elig = self.eligible(obs)
        for p, e in elig.items():
            prev = self._since.get(p)
            if prev is None or prev[0] != e:
                self._since[p] = (e, now)
        for p in list(self._since):
            if p not in elig:
                del self._since[p]
        out = set()
        for p, e in elig.items():
            since = now - self._since[p][1]
            if p in self.announced:
                if e or (since < self.withdraw_after and not (obs.drain or obs.stopping)):
                    out.add(p)
            elif e and since >= self.announce_after:
                out.add(p)
        self.announced = out
        return set(out)


# ---- observing the balancer ----------------------------------------------------------------------

def vip_health(vips: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """From the API's VIP list (GET /v1/vips): prefix -> has a real taking new flows."""
    out: dict[str, bool] = {}
    for v in vips:
        p = vip_prefix(v["address"])
        usable = False
        for r in v.get("reals", []):
            eff = r.get("effective_weight")
            if eff is None:
                eff = 0 if (r.get("drained") or r.get("healthy") is False) else r.get("weight", 0)
            usable = usable or eff > 0
        out[p] = out.get(p, False) or usable
    return out


def xdp_attached(interface: str, netns: str | None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show", "dev", interface]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if r.returncode != 0:
        return False
    try:
        links = json.loads(r.stdout or "[]")
    except ValueError:
        return False
    return bool(links) and "xdp" in links[0] and "UP" in links[0].get("flags", [])


def observe(api_socket: str, interface: str, netns: str | None, drain_file: str | None = None,
            timeout: float = 2.0, check_xdp: bool = True) -> Observation:
    """Ask the daemon (its Unix socket) and the kernel; any failure means not ok."""
    from control.client import Client

    drain = bool(drain_file) and os.path.exists(drain_file)  # type: ignore[arg-type]
    try:
        with Client(socket=api_socket, timeout=timeout) as c:
            c.status()
            vips = vip_health(c.vips())
    except Exception as e:  # noqa: BLE001 - unreachable, refused, timeout: all mean "not ok"
        log.debug("daemon not answering: %s", e)
        return Observation(False, {}, drain)
    ok = xdp_attached(interface, netns) if check_xdp else True
    return Observation(ok, vips, drain)


# ---- the speaker ---------------------------------------------------------------------------------

class BirdSpeaker:
    """Announces prefixes through a BIRD whose config includes ``conf_dir/vips4.conf`` and
    ``conf_dir/vips6.conf`` inside ``protocol static`` blocks (:func:`balancer_bird_config`)."""

    def __init__(self, conf_dir: str, ctl_socket: str, birdc: str = "birdc") -> None:
        self.conf_dir = Path(conf_dir)
        self.ctl_socket = ctl_socket
        self.birdc = birdc
        self.current: set[str] | None = None

    @staticmethod
    def files(conf_dir: str | Path, prefixes: Iterable[str]) -> dict[str, str]:
        v4 = sorted(p for p in prefixes if ":" not in p)
        v6 = sorted(p for p in prefixes if ":" in p)
        return {"vips4.conf": "".join(f"route {p} blackhole;\n" for p in v4),
                "vips6.conf": "".join(f"route {p} blackhole;\n" for p in v6)}

    def write(self, prefixes: Iterable[str]) -> None:
        for name, text in self.files(self.conf_dir, prefixes).items():
            tmp = self.conf_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.conf_dir / name)

    def apply(self, prefixes: set[str]) -> bool:
        """Make BIRD announce exactly ``prefixes``; True if something changed."""
        if prefixes == self.current:
            return False
        self.write(prefixes)
        r = subprocess.run([self.birdc, "-s", self.ctl_socket, "configure"], capture_output=True, text=True,
                           timeout=10, check=False)
        if r.returncode != 0 or "Reconfigur" not in r.stdout:
            raise RuntimeError(f"birdc configure failed: {r.stdout.strip()} {r.stderr.strip()}")
        log.info("announcing %s", ", ".join(sorted(prefixes)) or "nothing")
        self.current = set(prefixes)
        return True


def _bgp_timers(hold: int, keepalive: int) -> str:
    return (f"hold time {hold}; keepalive time {keepalive}; connect retry time 1; "
            f"connect delay time 1; error wait time 1, 2; error forget time 10;")


def balancer_bird_config(*, router_id: str, asn: int, peer_asn: int, local4: str, peer4: str,
                         local6: str, peer6: str, conf_dir: str, log_file: str, hold: int = 3,
                         keepalive: int = 1) -> str:
    """BIRD on a balancer: announces the static routes in the include files, learns nothing."""
    t = _bgp_timers(hold, keepalive)
    return f"""\
router id {router_id};
log "{log_file}" all;
protocol device {{ }}
protocol static vips4 {{ ipv4;
include "{conf_dir}/vips4.conf";
}}
protocol static vips6 {{ ipv6;
include "{conf_dir}/vips6.conf";
}}
protocol bgp up4 {{
  local {local4} as {asn}; neighbor {peer4} as {peer_asn}; direct; {t}
  ipv4 {{ import none; export where proto = "vips4"; next hop self; }};
}}
protocol bgp up6 {{
  local {local6} as {asn}; neighbor {peer6} as {peer_asn}; direct; {t}
  ipv6 {{ import none; export where proto = "vips6"; next hop self; }};
}}
"""


def router_bird_config(*, router_id: str, asn: int, peers: Iterable[tuple[str, str, str, str, int]],
                       log_file: str, accept4: str = "198.18.0.0/24", accept6: str = "2001:db8::/64",
                       hold: int = 3, keepalive: int = 1) -> str:
    """BIRD on the router: two BGP sessions (IPv4, IPv6) with every balancer; the learned
    VIP routes go into the kernel with ``merge paths on``: one ECMP route over every
    balancer announcing the VIP.

    ``peers``: (name, local4, peer4, "local6 peer6", peer asn). Only host routes inside
    ``accept4`` / ``accept6`` (the VIP segment) are accepted.
    """
    t = _bgp_timers(hold, keepalive)
    out = [f"""\
router id {router_id};
log "{log_file}" all;
protocol device {{ scan time 1; }}
filter vips4 {{ if net ~ [ {accept4}{{32,32}} ] then accept; reject; }}
filter vips6 {{ if net ~ [ {accept6}{{128,128}} ] then accept; reject; }}
protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}
protocol kernel k6 {{ ipv6 {{ import none; export all; }}; merge paths on; }}
"""]
    for name, local4, peer4, v6pair, peer_asn in peers:
        local6, peer6 = v6pair.split()
        out.append(f"""\
protocol bgp {name}_4 {{
  local {local4} as {asn}; neighbor {peer4} as {peer_asn}; direct; {t}
  ipv4 {{ import filter vips4; export none; }};
}}
protocol bgp {name}_6 {{
  local {local6} as {asn}; neighbor {peer6} as {peer_asn}; direct; {t}
  ipv6 {{ import filter vips6; export none; }};
}}
""")
    return "".join(out)


# ---- the sidecar ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    ann = Announcer(announce_after=args.announce_after, withdraw_after=args.withdraw_after)
    speaker = BirdSpeaker(args.conf_dir, args.bird_socket, args.birdc)
    stop = threading.Event()

    def on_signal(sig: int, _frame: Any) -> None:
        log.info("signal %s: withdrawing everything", signal.Signals(sig).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)
    while not stop.is_set():
        obs = observe(args.api_socket, args.interface, args.netns, args.drain_file,
                      check_xdp=not args.no_xdp_check)
        try:
            speaker.apply(ann.decide(obs))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.error("%s (will retry)", e)
            speaker.current = None
        stop.wait(args.interval)
    ann.decide(Observation(False, {}, stopping=True))
    try:
        speaker.apply(set())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.error("could not withdraw: %s", e)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m control.bgp", description=__doc__.split("\n\n")[0])
    p.add_argument("--api-socket", required=True, help="the daemon's API socket (lbctl serve --socket)")
    p.add_argument("--interface", required=True)
    p.add_argument("--netns")
    p.add_argument("--bird-socket", required=True, help="BIRD's control socket")
    p.add_argument("--conf-dir", required=True, help="directory of vips4.conf / vips6.conf")
    p.add_argument("--birdc", default="birdc")
    p.add_argument("--drain-file", help="while this file exists, withdraw everything")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between observations")
    p.add_argument("--announce-after", type=float, default=1.0)
    p.add_argument("--withdraw-after", type=float, default=0.0)
    p.add_argument("--no-xdp-check", action="store_true", help="userspace datapath: no XDP to look for")
    p.add_argument("--log-level", default="info")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
