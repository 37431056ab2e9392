"""lbctl's daemon commands against a running (userspace) daemon: tables, --json, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from control_helpers import real_addr
from test_control_daemon import REPO, Daemon

from lb.cli import main


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("cli"))
    d.start()
    yield d
    d.stop()


def run(daemon, capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*argv, "--socket", daemon.socket])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_vip_and_real_commands(daemon, capsys) -> None:
    rc, out, _ = run(daemon, capsys, "vip", "list")
    assert rc == 0 and "198.18.100.1:80/tcp" in out
    rc, out, _ = run(daemon, capsys, "vip", "add", "[2001:db8:100::1]:443/udp", "--real", f"{real_addr(0, True)}=3",
                     "--real", real_addr(1, True), "--hash", "maglev", "--healthcheck", '{"type": "udp"}')
    assert rc == 0 and "created [2001:db8:100::1]:443/udp" in out
    rc, out, _ = run(daemon, capsys, "vip", "show", "[2001:db8:100::1]:443/udp", "--json")
    v = json.loads(out)
    assert [(r["address"], r["weight"]) for r in v["reals"]] == [(real_addr(0, True), 3), (real_addr(1, True), 1)]
    rc, out, _ = run(daemon, capsys, "vip", "set", "[2001:db8:100::1]:443/udp", "--flags", "no_src_port",
                     "--no-healthcheck")
    assert rc == 0
    rc, out, _ = run(daemon, capsys, "vip", "show", "[2001:db8:100::1]:443/udp", "--json")
    assert json.loads(out)["flags"] == ["no_src_port"] and json.loads(out)["healthcheck"] is None

    vip = "198.18.100.1:80/tcp"
    assert run(daemon, capsys, "real", "add", vip, real_addr(7), "--weight", "4")[0] == 0
    assert run(daemon, capsys, "real", "set", vip, real_addr(7), "--weight", "9")[0] == 0
    rc, out, _ = run(daemon, capsys, "real", "drain", vip, real_addr(7))
    assert rc == 0 and "drained" in out
    rc, out, _ = run(daemon, capsys, "real", "list", vip, "--json")
    r7 = [r for r in json.loads(out) if r["address"] == real_addr(7)][0]
    assert r7["weight"] == 9 and r7["drained"] and r7["effective_weight"] == 0
    rc, out, _ = run(daemon, capsys, "real", "list", vip)
    assert real_addr(7) in out and "yes" in out  # the table shows it drained
    assert run(daemon, capsys, "real", "undrain", vip, real_addr(7))[0] == 0
    assert run(daemon, capsys, "real", "del", vip, real_addr(7))[0] == 0
    rc, out, _ = run(daemon, capsys, "vip", "where", vip, "--src", "198.18.0.9", "--sport", "1234", "--json")
    assert rc == 0 and json.loads(out)["action"] == "TX"
    assert run(daemon, capsys, "vip", "del", "[2001:db8:100::1]:443/udp")[0] == 0


def test_errors_and_exit_codes(daemon, capsys) -> None:
    rc, _, err = run(daemon, capsys, "real", "set", "198.18.100.1:80/tcp", real_addr(0), "--weight", "-1")
    assert rc == 2 and "weight: must be >= 0 (got -1)" in err
    rc, _, err = run(daemon, capsys, "vip", "show", "198.18.100.9:80/tcp")
    assert rc == 2 and "no VIP 198.18.100.9:80/tcp" in err
    rc, _, err = run(daemon, capsys, "vip", "add", "198.18.100.1:80/tcp")
    assert rc == 2 and "exists" in err
    gen = json.loads(run(daemon, capsys, "config", "export", "--json")[1])["generation"]
    rc, _, err = run(daemon, capsys, "real", "set", "198.18.100.1:80/tcp", real_addr(0), "--weight", "2",
                     "--if-match", str(gen - 1))
    assert rc == 2 and f"generation is {gen}" in err
    with pytest.raises(SystemExit) as e:
        main(["vip", "show", "198.18.100.1:80", "--socket", daemon.socket])  # no protocol
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["vip", "list", "--socket", str(daemon.dir / "nobody.sock")]) == 1
    assert "no daemon at" in capsys.readouterr().err


def test_stats_health_config(daemon, capsys, tmp_path) -> None:
    rc, out, _ = run(daemon, capsys, "stats", "--json")
    s = json.loads(out)
    assert rc == 0 and "rx_packets" in s["counters"] and s["vips"][0]["vip"] == "198.18.100.1:80/tcp"
    rc, out, _ = run(daemon, capsys, "stats")
    assert rc == 0 and "per VIP" in out and "198.18.100.1:80/tcp" in out
    rc, out, _ = run(daemon, capsys, "health", "--json")
    assert rc == 0 and json.loads(out) == []
    rc, out, _ = run(daemon, capsys, "config", "export")
    cfg = yaml.safe_load(out)
    assert rc == 0 and cfg["vips"][0]["address"] == "198.18.100.1"
    cfg["vips"][0]["reals"][0]["weight"] = 6
    f = tmp_path / "new.yaml"
    f.write_text(yaml.safe_dump(cfg))
    rc, out, _ = run(daemon, capsys, "config", "apply", str(f))
    assert rc == 0 and "applied: generation" in out
    rc, out, _ = run(daemon, capsys, "vip", "show", "198.18.100.1:80/tcp", "--json")
    assert json.loads(out)["reals"][0]["weight"] == 6
    cfg["vips"][0]["port"] = 70000
    f.write_text(yaml.safe_dump(cfg))
    rc, _, err = run(daemon, capsys, "config", "apply", str(f))
    assert rc == 2 and "vips[0].port: must be 0..65535" in err


def test_stats_watch(daemon) -> None:
    p = subprocess.Popen([sys.executable, "-m", "lb.cli", "stats", "--watch", "0.2", "--json", "--socket",
                          daemon.socket], cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = []
    t0 = time.monotonic()
    while len(lines) < 3 and time.monotonic() - t0 < 60:
        lines.append(p.stdout.readline())
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 0
    assert all("counters" in json.loads(x) for x in lines)


def test_quic_and_route_commands(daemon, capsys) -> None:
    rc, out, _ = run(daemon, capsys, "quic", "add", "0x401", real_addr(0))
    assert rc == 0 and f"added QUIC server id 1025 -> {real_addr(0)}" in out
    rc, out, _ = run(daemon, capsys, "quic", "list")
    assert rc == 0 and "1025" in out and real_addr(0) in out and "yes" in out
    rc, out, _ = run(daemon, capsys, "route", "add", "198.18.64.0/24", real_addr(1))
    assert rc == 0 and "added source route 198.18.64.0/24" in out
    rc, out, _ = run(daemon, capsys, "route", "list", "--json")
    assert rc == 0 and [(r["prefix"], r["real"], r["active"]) for r in json.loads(out)] == [
        ("198.18.64.0/24", real_addr(1), True)]
    # refusals name the field; a real still routed to cannot be removed
    rc, _, err = run(daemon, capsys, "quic", "add", "1025", real_addr(1))
    assert rc == 2 and "id 1025 exists" in err
    rc, _, err = run(daemon, capsys, "route", "add", "198.18.64.1/24", real_addr(1))
    assert rc == 2 and "prefix: host bits set" in err
    rc, _, err = run(daemon, capsys, "quic", "add", "9", "198.19.9.9")
    assert rc == 2 and "real: 198.19.9.9 is not a real of any VIP" in err
    rc, _, err = run(daemon, capsys, "real", "del", "198.18.100.1:80/tcp", real_addr(1))
    assert rc == 2 and "source_routes[0] (198.18.64.0/24" in err
    rc, _, err = run(daemon, capsys, "route", "del", "198.18.65.0/24")
    assert rc == 2 and "no source_routes entry 198.18.65.0/24" in err
    with pytest.raises(SystemExit):
        main(["route", "del", "198.18.64.0", "--socket", daemon.socket])  # no length
    with pytest.raises(SystemExit):
        main(["quic", "del", "x", "--socket", daemon.socket])
    capsys.readouterr()
    assert run(daemon, capsys, "quic", "del", "1025")[0] == 0
    rc, out, _ = run(daemon, capsys, "route", "del", "198.18.64.0/24")
    assert rc == 0 and "deleted source route 198.18.64.0/24" in out
    assert json.loads(run(daemon, capsys, "quic", "list", "--json")[1]) == []
    rc, out, _ = run(daemon, capsys, "config", "export", "--json")
    assert json.loads(out)["config"]["source_routes"] == []


@pytest.mark.parametrize("argv", [["quic"], ["quic", "list"], ["quic", "add"], ["quic", "del"], ["route"],
                                  ["route", "list"], ["route", "add"], ["route", "del"]])
def test_quic_and_route_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage: lbctl " + " ".join(argv) in capsys.readouterr().out


def test_capture_needs_the_xdp_datapath(daemon, capsys, tmp_path) -> None:
    """``lbctl capture`` asks the daemon where its maps are; a userspace daemon has none:
    exit 2, saying why, and no file."""
    out = tmp_path / "x.pcapng"
    rc, _, err = run(daemon, capsys, "capture", "-w", str(out), "-c", "1")
    assert rc == 2 and "needs the XDP datapath" in err and "userspace" in err
    assert not out.exists()
    rc, _, err = run(daemon, capsys, "capture", "-w", str(out), "--event", "dorp", "--pin-dir", str(tmp_path))
    assert rc == 2 and "unknown event 'dorp'" in err


def test_cidr_vip_commands_and_a_restart(daemon, capsys) -> None:
    """A CIDR VIP through lbctl (PREFIX:PORT/proto, [IPv6 PREFIX]:PORT/proto), kept by the
    state store across a daemon restart, then deleted."""
    vip, vip6 = "198.18.64.0/24:80/tcp", "[2001:db8:64::/48]:53/udp"
    rc, out, _ = run(daemon, capsys, "vip", "add", vip, "--real", real_addr(3))
    assert rc == 0 and f"created {vip}" in out
    rc, out, _ = run(daemon, capsys, "vip", "add", vip6, "--real", real_addr(3, True), "--flag", "no_src_port")
    assert rc == 0 and f"created {vip6}" in out
    assert run(daemon, capsys, "real", "add", vip, real_addr(4), "--weight", "2")[0] == 0
    rc, out, _ = run(daemon, capsys, "vip", "where", vip, "--src", "198.18.0.9", "--sport", "1234",
                     "--dst", "198.18.64.200", "--json")
    assert rc == 0 and json.loads(out)["action"] == "TX" and json.loads(out)["real"] in (real_addr(3), real_addr(4))
    rc, out, _ = run(daemon, capsys, "vip", "where", vip, "--src", "198.18.0.9", "--sport", "1234",
                     "--dst", "198.18.65.1", "--json")
    assert json.loads(out)["action"] == "PASS"
    rc, _, err = run(daemon, capsys, "vip", "add", "198.18.64.1/24:80/tcp")
    assert rc != 0 and "host bits set" in err

    daemon.stop()
    daemon.start()
    rc, out, _ = run(daemon, capsys, "vip", "show", vip, "--json")
    assert rc == 0 and [r["address"] for r in json.loads(out)["reals"]] == [real_addr(3), real_addr(4)]
    rc, out, _ = run(daemon, capsys, "vip", "show", vip6, "--json")
    assert rc == 0 and json.loads(out)["flags"] == ["no_src_port"]
    assert run(daemon, capsys, "vip", "del", vip)[0] == 0
    assert run(daemon, capsys, "vip", "del", vip6)[0] == 0
    assert run(daemon, capsys, "vip", "show", vip)[0] != 0
