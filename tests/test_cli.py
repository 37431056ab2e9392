"""lbctl: the simulate contract, config commands, errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
from fixtures import CLIENT4, CONTRACT_YAML, eth, tcp4
from scapy.layers.inet import IP, TCP
from scapy.packet import raw
from scapy.utils import wrpcap

from lb import cli
from lb.cli import COMMAND_GROUP, build_parser, main

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture
def contract(tmp_path):
    p = tmp_path / "lb.yaml"
    p.write_text(CONTRACT_YAML)
    return p


def test_simulate_json_contract(contract, tmp_path, capsys) -> None:
    syn = tcp4(dst="10.200.1.1")
    ack = tcp4(dst="10.200.1.1", tcp_flags="A")
    other = tcp4(dst="198.18.200.1")
    hexf = tmp_path / "frames.txt"
    hexf.write_text(f"# a comment\n{syn.hex()}\n\n{ack.hex()}\n{other.hex()}\n")
    assert main(["simulate", "--config", str(contract), "--hex-file", str(hexf), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(x) for x in lines] == [{"action", "real", "output"}] * 3
    assert lines[0]["action"] == "TX" and lines[0]["real"] in ("10.0.0.1", "10.0.0.2")
    # the connection table carries over between frames: the ACK goes where the SYN went
    assert lines[1]["real"] == lines[0]["real"]
    assert bytes.fromhex(lines[0]["output"])[14 + 16 : 14 + 20] == bytes(map(int, lines[0]["real"].split(".")))
    assert lines[2] == {"action": "PASS", "real": None, "output": other.hex()}


def test_simulate_pcap(contract, tmp_path, capsys) -> None:
    pcap = tmp_path / "in.pcap"
    frames = [eth() / IP(src=CLIENT4, dst="10.200.1.1") / TCP(sport=1000 + i, dport=80, flags="S") for i in range(20)]
    wrpcap(str(pcap), frames)
    assert main(["simulate", "--config", str(contract), "--pcap", str(pcap), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 20 and all(o["action"] == "TX" for o in out)
    assert {o["real"] for o in out} == {"10.0.0.1", "10.0.0.2"}


def test_simulate_bad_hex_names_the_line(contract, tmp_path, capsys) -> None:
    hexf = tmp_path / "frames.txt"
    hexf.write_text(f"{raw(eth()).hex()}\nnot-hex\n")
    assert main(["simulate", "--config", str(contract), "--hex-file", str(hexf), "--json"]) == 2
    assert "frames.txt:2" in capsys.readouterr().err


def test_invalid_config_exits_2_naming_the_field(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONTRACT_YAML.replace("port: 80", "port: 70000"))
    with pytest.raises(SystemExit) as e:
        main(["config", "validate", str(bad)])
    assert e.value.code == 2
    assert "vips[0].port" in capsys.readouterr().err


def test_config_validate_and_show(contract, capsys) -> None:
    assert main(["config", "validate", str(contract)]) == 0
    assert "ok (1 VIPs, 2 reals)" in capsys.readouterr().out
    assert main(["config", "show", str(contract), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["max_reals"] == 4096 and shown["vips"][0]["hash"] == "maglev"


def test_ring_shares(contract, capsys) -> None:
    assert main(["ring", "--config", str(contract), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["slots"] for r in rows) == [32768, 32769]


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    for args in (["--help"], ["simulate", "--help"], ["config", "--help"], ["config", "validate", "--help"],
                 ["config", "show", "--help"], ["ring", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(args)
        assert e.value.code == 0


def test_demo_runs_and_flows_are_sticky(capsys) -> None:
    assert main(["demo", "--flows", "200"]) == 0
    out = capsys.readouterr().out
    assert "400 flows stayed on one real, 0 were split" in out


def test_lbctl_entry_point_is_installed() -> None:
    r = subprocess.run([sys.executable, "-m", "lb.cli", "--help"], capture_output=True, text=True, check=True)
    assert "simulate" in r.stdout


def test_every_floor_registers_its_commands() -> None:
    """lbctl = lb's commands + those of each floor in the lbctl.commands entry points, as
    pyproject.toml declares them (a mismatch: the install is stale, pip install -e .)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMAND_GROUP]
    assert {ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)} == declared
    parser = build_parser()
    for args in (["simulate", "--help"], ["serve", "--help"], ["config", "export", "--help"], ["lab", "--help"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(args)
        assert e.value.code == 0


def test_a_floor_that_fails_to_load_is_named(monkeypatch, capsys) -> None:
    broken = EntryPoint(name="broken", value="no_such_floor.cli:register", group=COMMAND_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    parser = build_parser()
    assert capsys.readouterr().err == ("lbctl: the broken commands (no_such_floor.cli:register) are unavailable: "
                                       "ModuleNotFoundError: No module named 'no_such_floor'\n")
    assert parser.parse_args(["ring", "--config", "x.yaml"]).command == "ring"  # the other floors still work


def test_no_upper_floor_installed_is_said(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    build_parser()
    assert "entry-point group 'lbctl.commands' is empty" in capsys.readouterr().err


@pytest.mark.bpf
@pytest.mark.root
def test_simulate_xdp_matches_userspace(contract, tmp_path, capsys) -> None:
    """`--datapath xdp` runs the BPF program itself; both datapaths print the same lines."""
    frames = [tcp4(dst="10.200.1.1", sport=2000 + i) for i in range(8)]
    frames += [tcp4(dst="10.200.1.1", sport=2000, tcp_flags="A"), tcp4(dst="198.18.200.1")]
    hexf = tmp_path / "frames.txt"
    hexf.write_text("\n".join(f.hex() for f in frames) + "\n")
    outputs = {}
    for dp in ("userspace", "xdp"):
        assert main(["simulate", "--config", str(contract), "--hex-file", str(hexf), "--json",
                     "--datapath", dp]) == 0
        outputs[dp] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(outputs["xdp"]) == len(frames)
    assert outputs["xdp"] == outputs["userspace"]
    assert {o["real"] for o in outputs["xdp"][:8]} == {"10.0.0.1", "10.0.0.2"}
