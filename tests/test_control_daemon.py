"""The daemon as a process: start, serve on its socket, SIGKILL at any moment, restart
losing nothing; TCP only with a token; and (root) with XDP on a veth in a namespace of
its own: restart keeps VIPs, reals, weights and the pinned connection table, and the
program forwards while the daemon is down."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from control_helpers import real_addr, small_settings, vip_dict

from control.client import ApiError, Client, Unavailable

REPO = Path(__file__).resolve().parent.parent
K0 = ("198.18.100.1", 80, "tcp")


class Daemon:
    """``lbctl serve`` in a subprocess; its log in ``dir/daemon.log``."""

    def __init__(self, directory: Path, *extra: str, interface: str = "lbcnone", datapath: str = "userspace",
                 config: dict | None = None, netns: str | None = None) -> None:
        self.dir = directory
        self.socket = str(directory / "run" / "lbd.sock")
        self.log = directory / "daemon.log"
        cfg = config or {"settings": small_settings(), "vips": [vip_dict(0, [0, (1, 2)])]}
        (directory / "lb.yaml").write_text(yaml.safe_dump(cfg))
        io = ["--no-packet-io"] if datapath == "userspace" and interface == "lbcnone" else []
        self.argv = [sys.executable, "-m", "lb.cli", "serve", "--interface", interface, "--datapath", datapath,
                     *io, "--config", str(directory / "lb.yaml"), "--state-dir", str(directory / "state"),
                     "--socket", self.socket, *extra]
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 120.0) -> Daemon:
        argv = self.argv if self.netns is None else ["ip", "netns", "exec", self.netns, *self.argv]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with self.client() as c:
                    c.status()
                return
            except Unavailable:
                time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def client(self) -> Client:
        return Client(socket=self.socket, timeout=30)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        try:
            d.stop()
        except Exception:  # noqa: BLE001 - a test may have killed it already
            if d.proc is not None:
                d.proc.kill()


def test_serve_restart_and_socket_permissions(tmp_path, daemons) -> None:
    d = Daemon(tmp_path)
    daemons.append(d.start())
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(d.socket)).st_mode) == 0o700
    with d.client() as c:
        c.create_vip(vip_dict(1, [2, 3]))
        c.patch_real(K0, real_addr(1), {"weight": 5})
        c.patch_real(K0, real_addr(0), {"drain": True})
        before = c.vips()
        gen = c.status()["generation"]
    # a second daemon on the same state directory is refused
    d2 = Daemon(tmp_path)
    d2.socket = str(tmp_path / "other.sock")
    d2.argv[d2.argv.index("--socket") + 1] = d2.socket
    p = subprocess.run(d2.argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "in use by another daemon" in p.stderr

    assert d.kill(signal.SIGKILL) == -signal.SIGKILL
    assert os.path.exists(d.socket)  # left behind by SIGKILL: the next daemon replaces it
    d.start()
    with d.client() as c:
        assert c.vips() == before and c.status()["generation"] == gen
    assert d.kill(signal.SIGTERM) == 0
    assert not os.path.exists(d.socket)
    assert "the datapath keeps running" in d.log.read_text()


def test_sigkill_during_changes_loses_no_acknowledged_change(tmp_path, daemons) -> None:
    """Clients change weights and add VIPs as fast as they can; the daemon is SIGKILLed at
    random moments and restarted. Everything acknowledged is there afterwards; at most the
    one request in flight may or may not have been applied."""
    d = Daemon(tmp_path)
    daemons.append(d.start())
    rng = random.Random(7)
    next_vip = 1
    for round_ in range(4):
        acked: list[tuple[str, object, int]] = []
        in_flight: list[tuple[str, object]] = []
        stop = threading.Event()

        def work(stop=stop, acked=acked, in_flight=in_flight) -> None:  # this round's
            nonlocal next_vip
            with d.client() as c:
                while not stop.is_set():
                    try:
                        if rng.random() < 0.3 and next_vip < 7:
                            in_flight[:] = [("vip", next_vip)]
                            c.create_vip(vip_dict(next_vip, [next_vip]))
                            acked.append(("vip", next_vip, 0))
                            next_vip += 1
                        else:
                            w = rng.randint(1, 1000)
                            in_flight[:] = [("weight", w)]
                            r = c.request("PATCH", f"/v1/vips/{K0[0]}/80/tcp/reals/{real_addr(1)}",
                                          json={"weight": w})
                            acked.append(("weight", w, int(r.headers["etag"].strip('"'))))
                    except (Unavailable, ApiError, OSError):
                        return

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.3 + rng.random() * 0.7)
        d.kill(signal.SIGKILL)
        stop.set()
        t.join(timeout=30)
        d.start()
        with d.client() as c:
            vips = {v["id"]: v for v in c.vips()}
            weight = vips["198.18.100.1:80/tcp"]["reals"][1]["weight"]
        weights = [w for kind, w, _ in acked if kind == "weight"]
        assert weights, f"round {round_}: no change was acknowledged"
        pending = [x for k, x in in_flight if k == "weight"]
        assert weight in (weights[-1], *pending), (round_, weight, weights[-3:], pending)
        for kind, n, _ in acked:
            if kind == "vip":
                assert f"198.18.100.{n + 1}:80/tcp" in vips


def test_tcp_needs_a_token_and_non_loopback_is_refused(tmp_path) -> None:
    base = Daemon(tmp_path).argv
    p = subprocess.run([*base, "--listen", "198.18.0.1:8080"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "refusing to serve on a non-loopback address without a bearer token" in p.stderr
    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123\n")
    os.chmod(tok, 0o644)
    p = subprocess.run([*base, "--listen", "127.0.0.1:8080", "--token-file", str(tok)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "readable by group/others" in p.stderr


@pytest.mark.netns
@pytest.mark.root
def test_tcp_with_token_inside_a_namespace(tmp_path, daemons) -> None:
    from lb.kernel.netns import run_in_netns
    from netns.ns import Netns

    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123\n")
    os.chmod(tok, 0o600)
    with Netns("lbc") as ns:
        ns.exec(["ip", "link", "set", "lo", "up"])
        d = Daemon(tmp_path, "--listen", "127.0.0.1:18080", "--token-file", str(tok), netns=ns.name)
        daemons.append(d.start(wait=False))

        def ask(token: str | None) -> int:
            import httpx

            headers = {"Authorization": f"Bearer {token}"} if token else {}
            deadline = time.monotonic() + 120
            while True:
                try:
                    return httpx.get("http://127.0.0.1:18080/v1/vips", headers=headers, timeout=5).status_code
                except httpx.ConnectError:
                    if time.monotonic() > deadline or d.proc.poll() is not None:
                        raise
                    time.sleep(0.2)

        assert run_in_netns(ns, ask, "0123456789abcdef0123") == 200
        assert run_in_netns(ns, ask, None) == 401
        assert run_in_netns(ns, ask, "wrong") == 401
        d.stop()


# --- XDP: a veth in a namespace of our own ------------------------------------------------------

LB_MAC = "02:00:00:00:00:01"  # control.flows builds frames to this MAC from CLIENT_MAC
CLIENT_MAC = "02:00:00:00:00:fe"


def _syn_and_ack(sport: int) -> tuple[bytes, bytes]:
    from control.flows import FlowQuery, flow_frame

    q = dict(src="198.18.0.10", dst=K0[0], sport=sport, dport=80, protocol="tcp")
    return flow_frame(FlowQuery(**q)), flow_frame(FlowQuery(**q, tcp_flags="A"))


def _exchange(ns: str, dev: str, frames: list[bytes], timeout: float = 3.0) -> list[str | None]:
    """Send each frame out of ``dev`` (in ``ns``); return the outer destination (the real)
    of the IPIP frame that comes back for each, None if none came back."""
    from lb.kernel.netns import run_in_netns

    def go() -> list[str | None]:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        try:
            s.bind((dev, 0))
            s.settimeout(0.1)
            out: list[str | None] = []
            for f in frames:
                s.send(f)
                got, end = None, time.monotonic() + timeout
                while got is None and time.monotonic() < end:
                    try:
                        data, addr = s.recvfrom(65535)
                    except socket.timeout:
                        continue
                    if addr[2] == socket.PACKET_OUTGOING or data[12:14] != b"\x08\x00" or data[23] != 4:
                        continue
                    if data[14 + 20 + 20:14 + 20 + 22] != f[14 + 20:14 + 22]:  # inner sport
                        continue
                    got = socket.inet_ntoa(data[30:34])
                out.append(got)
            return out
        finally:
            s.close()

    return run_in_netns(ns, go)


@pytest.mark.bpf
@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_xdp_daemon_sigkill_restart_keeps_everything(tmp_path, daemons) -> None:
    from bcc import BPF

    from lb.bpf_loader import XdpBalancer
    from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, xdp_attach
    from netns.ns import Sandbox, unique_name

    pin_dir = f"/sys/fs/bpf/{unique_name('lbc')}"
    passer = None
    with Sandbox() as lab:
        ns = lab.netns("lbc")
        a, b = lab.veth(ns, ns, prefix="lbc")
        a.set_mac(CLIENT_MAC)
        b.set_mac(LB_MAC)
        try:
            # veth delivers XDP_TX'd frames only to a peer whose NAPI runs: an XDP_PASS on `a`
            passer = BPF(text=b"int pass_all(struct xdp_md *ctx) { return XDP_PASS; }")
            xdp_attach(a.name, passer.load_func(b"pass_all", BPF.XDP).fd, XDP_FLAGS_DRV_MODE, ns.name)
            cfg = {"settings": small_settings(ring_size=1009, mtu=1500), "vips": [vip_dict(0, [0, 1, 2])],
                   "quic_servers": [{"id": 1025, "real": real_addr(0)}],
                   "source_routes": [{"prefix": "198.18.64.0/24", "real": real_addr(1)}]}
            d = Daemon(tmp_path, "--pin-dir", pin_dir, interface=b.name, datapath="xdp", config=cfg,
                       netns=None)
            d.argv += ["--netns", ns.name]
            daemons.append(d.start())
            with d.client() as c:
                c.patch_real(K0, real_addr(2), {"weight": 3})
                c.add_real(K0, {"address": real_addr(3), "weight": 2})
                c.create_vip(vip_dict(1, [4, 5], protocol="udp", port=53, flags=["quic", "src_routing"]))
                c.add_routing("quic_servers", {"id": 0x20000, "real": real_addr(4)})
                c.add_routing("source_routes", {"prefix": "198.18.96.0/19", "real": real_addr(5)})
                before = {"vips": c.vips(), "config": c.config(), "quic": c.routing("quic_servers"),
                          "routes": c.routing("source_routes")}

            flows = [_syn_and_ack(20000 + i) for i in range(40)]
            first = _exchange(ns.name, a.name, [syn for syn, _ in flows])
            assert None not in first and len(set(first)) >= 3  # spread over the reals
            with d.client() as c:
                ct = c.conntable(limit=1000)
                assert ct["entries"] == 40 and ct["datapath"] == "xdp"
                entries = {(e["sport"], e["real"]) for e in ct["sample"]}
            assert entries == {(20000 + i, first[i]) for i in range(40)}

            assert d.kill(signal.SIGKILL) == -signal.SIGKILL
            # the program keeps forwarding with nobody in charge: established flows stay put
            assert _exchange(ns.name, a.name, [ack for _, ack in flows]) == first

            d.start()
            with d.client() as c:
                st = c.status()
                assert st["datapath"] == "xdp" and st["pin_dir"] == pin_dir
                # the pinned maps already held the desired state: adopted with zero writes
                assert sum(st["last_reconcile"]["writes"].values()) == 0, st["last_reconcile"]
                assert {"vips": c.vips(), "config": c.config(), "quic": c.routing("quic_servers"),
                        "routes": c.routing("source_routes")} == before
                ct = c.conntable(limit=1000)
                assert {(e["sport"], e["real"]) for e in ct["sample"]} >= entries
                # the adopted maps take changes: drain the real of flow 0
                drained = first[0]
                c.patch_real(K0, drained, {"drain": True})
            assert _exchange(ns.name, a.name, [ack for _, ack in flows]) == first  # existing flows stay
            fresh = _exchange(ns.name, a.name, [_syn_and_ack(30000 + i)[0] for i in range(30)])
            assert None not in fresh and drained not in fresh  # no new flow goes to the drained real
            d.stop()
            assert "maps adopted from" in d.log.read_text()
        finally:
            if passer is not None:
                passer.cleanup()
            XdpBalancer.unpin_dir(pin_dir)
    assert not os.path.exists(pin_dir)


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.slow
def test_userspace_io_daemon_forwards_and_takes_changes(tmp_path, daemons) -> None:
    """--datapath userspace on a veth: frames in, encapsulated frames out; a drain through
    the API reaches the running loop."""
    from netns.ns import Sandbox

    with Sandbox() as lab:
        ns = lab.netns("lbc")
        a, b = lab.veth(ns, ns, prefix="lbc")
        a.set_mac(CLIENT_MAC)
        b.set_mac(LB_MAC)
        cfg = {"settings": small_settings(ring_size=1009), "vips": [vip_dict(0, [0, 1, 2])]}
        d = Daemon(tmp_path, "--netns", ns.name, interface=b.name, datapath="userspace", config=cfg)
        daemons.append(d.start())
        flows = [_syn_and_ack(21000 + i) for i in range(30)]
        first = _exchange(ns.name, a.name, [syn for syn, _ in flows])
        assert None not in first and len(set(first)) == 3
        with d.client() as c:
            s = c.stats()
            assert s["counters"]["tx_encap"] == 30 and s["conn_table"]["entries"] == 30
            assert s["vips"][0]["packets"] == 30
            drained = first[0]
            c.patch_real(K0, drained, {"drain": True})
        assert _exchange(ns.name, a.name, [ack for _, ack in flows]) == first  # established flows stay
        fresh = _exchange(ns.name, a.name, [_syn_and_ack(31000 + i)[0] for i in range(30)])
        assert None not in fresh and drained not in fresh
        d.stop()
        assert "userspace datapath running on" in d.log.read_text()


def test_the_token_is_the_first_line_and_its_length_is_checked(tmp_path) -> None:
    from control.daemon import StartupError, read_token

    tok = tmp_path / "token"
    tok.write_text("short\n" + "x" * 40 + "\n")  # the long second line does not count
    os.chmod(tok, 0o600)
    with pytest.raises(StartupError, match="first line"):
        read_token(str(tok))
    tok.write_text("  0123456789abcdef  \nanything\n")
    assert read_token(str(tok)) == "0123456789abcdef"
    tok.write_text("")
    with pytest.raises(StartupError, match="at least 16"):
        read_token(str(tok))


@pytest.mark.netns
@pytest.mark.root
def test_tls_on_a_non_loopback_address(tmp_path, daemons) -> None:
    """TCP on a non-loopback address: refused without TLS unless --insecure-http; with
    --tls-cert/--tls-key the client and lbctl talk HTTPS, trusting --ca-file only."""
    from lb.kernel.netns import run_in_netns
    from netns.ns import Netns
    from netns.pki import LabCA

    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123\n")
    os.chmod(tok, 0o600)
    ca = LabCA(tmp_path / "pki")
    srv = ca.issue("lbd", ["198.18.0.1"], server=True)
    stranger = LabCA(tmp_path / "other")
    cfg = {"settings": small_settings(), "vips": [vip_dict(i, [i]) for i in range(3)]}
    with Netns("lbc") as ns:
        ns.exec(["ip", "link", "set", "lo", "up"])
        ns.exec(["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"])
        plain = ["--listen", "198.18.0.1:18080", "--token-file", str(tok)]
        p = subprocess.run(["ip", "netns", "exec", ns.name, *Daemon(tmp_path, config=cfg).argv, *plain], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 2 and "a non-loopback address needs TLS" in p.stderr, p.stderr

        d = Daemon(tmp_path, "--listen", "198.18.0.1:18443", "--token-file", str(tok), "--tls-cert", srv.cert,
                   "--tls-key", srv.key, config=cfg, netns=ns.name)
        daemons.append(d.start(wait=False))

        def ask(ca_file: str, page: int | None = None) -> list:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with Client(url="https://198.18.0.1:18443", token="0123456789abcdef0123", ca_file=ca_file) as c:
                        return c.get_all("/v1/vips", page=page)
                except Unavailable as e:
                    if "CERTIFICATE_VERIFY_FAILED" in str(e) or time.monotonic() > deadline or d.proc.poll():
                        raise
                    time.sleep(0.2)

        vips = run_in_netns(ns, ask, ca.ca_path)
        assert [v["id"] for v in vips] == [f"198.18.100.{i + 1}:80/tcp" for i in range(3)]
        assert run_in_netns(ns, ask, ca.ca_path, 1) == vips  # three pages of one
        with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            run_in_netns(ns, ask, stranger.ca_path)
        cli = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "lb.cli", "vip", "list", "--json",
                              "--url", "https://198.18.0.1:18443", "--token-file", str(tok), "--ca-file", ca.ca_path],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert cli.returncode == 0 and len(json.loads(cli.stdout)) == 3, cli.stderr
        d.stop()

        d = Daemon(tmp_path, *plain, "--insecure-http", config=cfg, netns=ns.name)
        daemons.append(d.start(wait=False))

        def ask_plain() -> int:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    return httpx.get("http://198.18.0.1:18080/v1/vips", timeout=5,
                                     headers={"Authorization": "Bearer 0123456789abcdef0123"}).status_code
                except httpx.ConnectError:
                    if time.monotonic() > deadline or d.proc.poll() is not None:
                        raise
                    time.sleep(0.2)

        assert run_in_netns(ns, ask_plain) == 200
        d.stop()
