"""`lbctl simulate`: run frames through a datapath and say what happened to each.

Both datapaths sit behind one small interface (:class:`Simulator`), which is also what the
differential tests compare: frames in order through one instance, so the connection
table carries over between them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lb import constants as C
from lb.datapath_tables import DatapathTables


@dataclass(frozen=True)
class FrameVerdict:
    """What a datapath did with one frame."""

    action: str  # "TX" | "PASS" | "DROP" | "ABORTED"
    real: str | None  # address of the chosen real (TX/local PASS to a real), else None
    output: bytes  # the output frame (TX, PASS); empty for DROP

    def as_json(self) -> str:
        return json.dumps({"action": self.action, "real": self.real, "output": self.output.hex()})


class Simulator(Protocol):
    """A datapath that frames can be pushed through, one at a time, in order."""

    name: str

    def run(self, frame: bytes) -> FrameVerdict: ...

    def stats(self) -> dict[str, int]: ...


def ip_destination(frame: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Destination address of a (possibly 802.1Q-tagged) IP frame's first IP header."""
    l3 = 18 if frame[12:14] == b"\x81\x00" else 14
    et = frame[l3 - 2 : l3]
    if et == b"\x08\x00" and len(frame) >= l3 + 20:
        return ipaddress.IPv4Address(frame[l3 + 16 : l3 + 20])
    if et == b"\x86\xdd" and len(frame) >= l3 + 40:
        return ipaddress.IPv6Address(frame[l3 + 24 : l3 + 40])
    return None


class UserspaceSimulator:
    """The numba datapath (:mod:`lb.datapath`)."""

    name = "userspace"

    def __init__(self, tables: DatapathTables, now: int = 0):
        from lb.datapath import UserspaceDatapath

        self.tables = tables
        self.dp = UserspaceDatapath(tables)
        self.now = now

    def run(self, frame: bytes) -> FrameVerdict:
        r = self.dp.process_frames([frame], now=self.now)
        real = self.tables.real_address(int(r.real_ids[0]))
        return FrameVerdict(C.ACTION_NAMES[int(r.actions[0])], str(real) if real else None, r.output(0))

    def stats(self) -> dict[str, int]:
        return self.dp.stats_dict()


class XdpSimulator:
    """The XDP program, loaded (not attached) and run with BPF_PROG_TEST_RUN.

    The chosen real is read from the per-real counters around each frame (exact for TX
    and for a local PASS alike). ``track_reals=False`` skips that for bulk runs: then
    ``real`` comes from the outer destination of TX frames only.
    """

    name = "xdp"

    def __init__(self, tables: DatapathTables, track_reals: bool = True):
        from lb.bpf_loader import XdpBalancer

        self.tables = tables
        self.bal = XdpBalancer.from_tables(tables)
        self.track_reals = track_reals
        self._real_packets = self._read_real_packets() if track_reals else None

    def _read_real_packets(self):
        return self.bal.percpu_rows("real_stats")[:, C.VIP_STAT_PACKETS]

    def run(self, frame: bytes) -> FrameVerdict:
        from lb.kernel.testrun import test_run

        if len(frame) < C.ETH_HLEN:
            # BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header; the
            # driver would never hand the program one either. Row 1 of the table.
            return FrameVerdict("DROP", None, b"")
        action, out, _ = test_run(self.bal.prog_fd, frame)
        name = C.ACTION_NAMES.get(action, f"UNKNOWN({action})")
        real = None
        if self.track_reals:
            after = self._read_real_packets()
            moved = (after - self._real_packets).nonzero()[0]
            self._real_packets = after
            if len(moved) == 1:
                addr = self.tables.real_address(int(moved[0]))
                real = str(addr) if addr else None
        elif action == C.XDP_TX:
            dst = ip_destination(out)
            real = str(dst) if dst in self.tables.real_ids and out != frame else None
        return FrameVerdict(name, real, out if action in (C.XDP_TX, C.XDP_PASS) else b"")

    def stats(self) -> dict[str, int]:
        return dict(self.bal.read_stats().counters)

    def close(self) -> None:
        self.bal.close()


def make_simulator(datapath: str, tables: DatapathTables) -> Simulator:
    """``datapath`` is "userspace" or "xdp"."""
    if datapath == "userspace":
        return UserspaceSimulator(tables)
    if datapath == "xdp":
        return XdpSimulator(tables)
    raise ValueError(f"unknown datapath {datapath!r} (userspace | xdp)")


# --- input formats ------------------------------------------------------------------------


class FrameFileError(ValueError):
    """An input file of frames that can't be read; the message names the line."""


def read_hex_frames(path: str | Path) -> Iterator[bytes]:
    """One Ethernet frame per line as hex; blank lines and ``#`` comments are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip().replace(" ", "").replace(":", "")
            if not text:
                continue
            try:
                yield bytes.fromhex(text)
            except ValueError:
                raise FrameFileError(f"{path}:{lineno}: not a hex frame: {line.strip()[:60]!r}") from None


def read_pcap_frames(path: str | Path) -> Iterator[bytes]:
    """Frames of a pcap / pcapng file (Ethernet link type)."""
    from scapy.error import Scapy_Exception
    from scapy.utils import PcapReader

    try:
        with PcapReader(str(path)) as reader:
            for pkt in reader:
                yield bytes(pkt)
    except (Scapy_Exception, EOFError, OSError) as e:
        raise FrameFileError(f"{path}: not a readable pcap file ({e})") from None


def simulate(sim: Simulator, frames: Iterable[bytes]) -> Iterator[FrameVerdict]:
    """Push ``frames`` through ``sim`` in order."""
    for frame in frames:
        yield sim.run(frame)


def summarize(verdicts: list[FrameVerdict]) -> dict[str, dict[str, int]]:
    """Counts per action and per real."""
    actions: dict[str, int] = {}
    reals: dict[str, int] = {}
    for v in verdicts:
        actions[v.action] = actions.get(v.action, 0) + 1
        if v.real:
            reals[v.real] = reals.get(v.real, 0) + 1
    return {"actions": actions, "reals": reals}

