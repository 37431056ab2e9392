"""Capture (lb/capture.py, xdp/balancer.c capture()): the events the XDP program records
for every golden fixture, off by default, the per-CPU rate limit, and the pcapng file as
tshark reads it back."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from fixtures import FIXTURE_SETS, Fixture

from lb import constants as C
from lb.capture import (
    MAX_RATE,
    MIN_RATE,
    CaptureError,
    CaptureEvent,
    CaptureMaps,
    RingReader,
    capture,
    capture_word,
    parse_events,
)

pytestmark = [pytest.mark.bpf, pytest.mark.root]

ALL = set(C.CAPTURE_EVENTS.values())
CASES = [(name, fx) for name, (_, fxs) in FIXTURE_SETS.items() for fx in fxs
         if len(fx.frame) >= C.ETH_HLEN]  # shorter frames can't be test-run


@pytest.fixture(scope="module")
def loaded():
    """Table set name -> (XdpBalancer, tables, CaptureMaps, reader, records)."""
    from lb.bpf_loader import XdpBalancer

    out: dict = {}

    def get(name: str):
        if name not in out:
            tables = FIXTURE_SETS[name][0]()
            bal = XdpBalancer.from_tables(tables)
            maps = CaptureMaps.of_balancer(bal)
            records: list[bytes] = []
            out[name] = (bal, tables, maps, RingReader(maps.fds["capture_ring"], records.append), records)
        return out[name]

    yield get
    for bal, _, maps, reader, _ in out.values():
        reader.close()
        maps.close()
        bal.close()


def drain(reader: RingReader, records: list[bytes]) -> list[CaptureEvent]:
    reader.poll(0)
    evs = [CaptureEvent.decode(r) for r in records]
    records.clear()
    return evs


def expected_events(fx: Fixture) -> list[tuple[int, int]]:
    """(event, reason) the fixture's frame must produce, in the order the program meets them."""
    c = fx.counters
    out = []
    if c.get("quic_unknown"):
        out.append((C.CAPTURE_EV_QUIC_UNKNOWN, 0))
    if c.get("lru_miss") and not c.get("drop_no_real"):
        out.append((C.CAPTURE_EV_LRU_MISS, 0))
    for name in ("tx_icmp_too_big", "drop_too_big"):
        if c.get(name):
            out.append((C.CAPTURE_EV_TOO_BIG, C.STAT_INDEX[name]))
    if fx.action == "DROP":
        reason = next(n for n in c if n.startswith("drop_"))
        out.append((C.CAPTURE_EV_DROP, C.STAT_INDEX[reason]))
    return out


def test_words_and_names() -> None:
    assert parse_events(["all"]) == ALL
    assert parse_events(["drop", "lru-miss"]) == {C.CAPTURE_EV_DROP, C.CAPTURE_EV_LRU_MISS}
    with pytest.raises(CaptureError, match="unknown event 'dorp'"):
        parse_events(["dorp"])
    w = capture_word({C.CAPTURE_EV_DROP}, 1000)
    assert w & C.CAPTURE_MASK == 1 << C.CAPTURE_EV_DROP
    assert w >> C.CAPTURE_INTERVAL_SHIFT == 1_000_000  # ns between two records of a CPU
    for bad in (0, MIN_RATE / 2, MAX_RATE * 2):
        with pytest.raises(CaptureError, match="rate must be"):
            capture_word(ALL, bad)


def test_off_by_default_no_records(loaded) -> None:
    """A freshly loaded program has capture off: every fixture runs, nothing is recorded,
    nothing is even counted as held back."""
    from lb.kernel.testrun import test_run

    bal, _, maps, reader, records = loaded("main")
    assert maps.word == 0
    for _, fx in [c for c in CASES if c[0] == "main"]:
        for f in (*fx.setup, fx.frame):
            test_run(bal.prog_fd, f)
    assert drain(reader, records) == []
    assert maps.drops() == (0, 0)


@pytest.mark.parametrize(("table_set", "fx"), CASES,
                         ids=[f"{name}-row{fx.row}-{fx.description}" for name, fx in CASES])
def test_fixture_events(loaded, table_set: str, fx: Fixture) -> None:
    """With every event on, each golden fixture's frame still does what the fixture says
    (action, output, counters) and yields exactly the records its counters imply: event,
    reason, VIP, real, original length and first bytes."""
    from lb.kernel.testrun import test_run

    bal, tables, maps, reader, records = loaded(table_set)
    bal.clear_conn_table()
    maps.word = 0
    for s in fx.setup:
        test_run(bal.prog_fd, s)
    if fx.reload:  # the fixture's tables change between its setup and its frame
        bal.load_tables(FIXTURE_SETS[fx.reload][0]())
    drain(reader, records)
    maps.word = capture_word(ALL, MAX_RATE)
    try:
        before = bal.read_stats().counters
        t0 = time.monotonic_ns()
        action, out, _ = test_run(bal.prog_fd, fx.frame)
        evs = drain(reader, records)
        after = bal.read_stats().counters
    finally:
        maps.word = 0
        if fx.reload:
            bal.load_tables(tables)
    # capture changes nothing the frame does
    assert C.ACTION_NAMES[action] == fx.action and (fx.output is None or out == fx.output)
    assert {n: after[n] - before[n] for n in C.STATS if after[n] != before[n]} == fx.counters
    assert [(e.event, e.reason) for e in evs] == expected_events(fx)
    for e in evs:
        assert e.frame_len == len(fx.frame)
        assert e.data == fx.frame[:C.CAPTURE_SNAPLEN]
        assert t0 <= e.ts_ns <= time.monotonic_ns()
        assert 0 <= e.cpu < os.cpu_count()
        if e.event == C.CAPTURE_EV_DROP:
            assert (e.vip_num, e.real_id) == (C.CAPTURE_NO_VIP, 0)
        else:
            assert e.vip_num != C.CAPTURE_NO_VIP
        if e.event in (C.CAPTURE_EV_LRU_MISS, C.CAPTURE_EV_TOO_BIG):
            assert e.real_id != 0
            if fx.real:
                assert e.real_id == tables.real_ids[ipaddress.ip_address(fx.real)]


def test_only_the_events_asked_for(loaded) -> None:
    """Drops only: a new flow (a miss) records nothing, a malformed frame one drop."""
    from lb.kernel.testrun import test_run

    bal, _, maps, reader, records = loaded("main")
    miss = next(fx for name, fx in CASES if name == "main" and fx.counters.get("lru_miss")
                and fx.action == "TX")
    bad = next(fx for name, fx in CASES if name == "main" and fx.counters.get("drop_malformed"))
    bal.clear_conn_table()
    drain(reader, records)
    maps.word = capture_word({C.CAPTURE_EV_DROP}, MAX_RATE)
    try:
        test_run(bal.prog_fd, miss.frame)
        test_run(bal.prog_fd, bad.frame)
        evs = drain(reader, records)
    finally:
        maps.word = 0
    assert [(e.event, C.STATS[e.reason]) for e in evs] == [(C.CAPTURE_EV_DROP, "drop_malformed")]


def test_rate_limit_per_cpu(loaded) -> None:
    """At the lowest rate one CPU sends CAPTURE_BURST records back to back, then holds the
    rest back (counted in capture_buckets.limited)."""
    from lb.kernel.testrun import test_run

    bal, _, maps, reader, records = loaded("main")
    bad = next(fx for name, fx in CASES if name == "main" and fx.counters.get("drop_malformed"))
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one CPU: one bucket
    limited0, lost0 = maps.drops()
    drain(reader, records)
    maps.word = capture_word({C.CAPTURE_EV_DROP}, MIN_RATE)
    try:
        n = 3 * C.CAPTURE_BURST
        for _ in range(n):
            test_run(bal.prog_fd, bad.frame)
        evs = drain(reader, records)
    finally:
        maps.word = 0
        os.sched_setaffinity(0, cpus)
    assert len(evs) == C.CAPTURE_BURST
    assert {e.cpu for e in evs} == {min(cpus)}
    limited, lost = maps.drops()
    assert (limited - limited0, lost - lost0) == (n - C.CAPTURE_BURST, 0)
    # the next capture, at a higher rate, is not held back by what this one left
    maps.word = capture_word({C.CAPTURE_EV_DROP}, MAX_RATE)
    try:
        for _ in range(n):
            test_run(bal.prog_fd, bad.frame)
        assert len(drain(reader, records)) == n
    finally:
        maps.word = 0


def test_capture_refuses_a_second_capture(loaded, tmp_path) -> None:
    _, _, maps, _, _ = loaded("main")
    maps.word = capture_word(ALL, 10)
    try:
        with pytest.raises(CaptureError, match="another capture is running"):
            capture(maps, str(tmp_path / "x.pcapng"), ALL, count=1)
        assert maps.word == capture_word(ALL, 10)  # left alone
    finally:
        maps.word = 0


TSHARK = shutil.which("tshark")


@pytest.mark.skipif(TSHARK is None and not os.environ.get("CI"),
                    reason="tshark not installed (scripts/setup.sh installs it)")
def test_pcapng_read_back_by_tshark(loaded, tmp_path) -> None:
    """capture() while frames run: the file has one packet per record, with the event as
    the packet comment, the original length, the first bytes and a wall-clock time, as
    tshark reads it; the events are off again afterwards."""
    from lb.kernel.testrun import test_run

    bal, _, maps, _, _ = loaded("mtu")
    too_big = next(fx for name, fx in CASES if name == "mtu" and fx.counters.get("tx_icmp_too_big"))
    frames = [too_big.frame, b"\x00" * 12 + b"\x81\x00"]  # too-big (a miss first); a cut VLAN tag: dropped
    path = str(tmp_path / "cap.pcapng")
    bal.clear_conn_table()
    result: dict = {}

    def run() -> None:
        result["r"] = capture(maps, path, ALL, rate=MAX_RATE, count=3, duration=30)

    t = threading.Thread(target=run)
    t0 = time.time()
    t.start()
    deadline = time.monotonic() + 10
    while maps.word == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for f in frames:
        test_run(bal.prog_fd, f)
    t.join(30)
    assert not t.is_alive()
    assert maps.word == 0
    r = result["r"]
    assert r.written == 3 and r.by_event == {"lru-miss": 1, "too-big": 1, "drop": 1}

    out = subprocess.run([TSHARK or "tshark", "-r", path, "-T", "fields", "-E", "separator=|",
                          "-e", "frame.comment", "-e", "frame.len", "-e", "frame.cap_len",
                          "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split("|") for line in out]
    assert [row[0].split(" ")[1] for row in rows] == ["event=lru-miss", "event=too-big", "event=drop"]
    assert "reason=tx_icmp_too_big" in rows[1][0] and "vip=198.18." in rows[1][0]
    assert "reason=drop_malformed" in rows[2][0]
    want = [too_big.frame, too_big.frame, frames[1]]
    assert [int(row[1]) for row in rows] == [len(f) for f in want]
    assert [int(row[2]) for row in rows] == [min(len(f), C.CAPTURE_SNAPLEN) for f in want]
    assert all(t0 - 1 <= float(row[3]) <= time.time() + 1 for row in rows)
    hexes = subprocess.run([TSHARK or "tshark", "-r", path, "-T", "fields", "-e", "frame_raw"],
                           capture_output=True, text=True, check=False).stdout.split()
    if not hexes:  # tshark 4.0 has no frame_raw field: its hex dump, per packet
        hexes = _tshark_hex(path)
    assert [bytes.fromhex(h) for h in hexes] == [f[:C.CAPTURE_SNAPLEN] for f in want]


def _tshark_hex(path: str) -> list[str]:
    """Each packet's bytes from ``tshark -x`` (offset, hex bytes, ASCII; a blank line ends
    a packet)."""
    text = subprocess.run([TSHARK or "tshark", "-r", path, "-x"], capture_output=True, text=True,
                          check=True).stdout
    packets, cur = [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if cur:
                packets.append("".join(cur))
                cur = []
            continue
        cur.append("".join(line[6:6 + 48].split()))
    return packets


def test_lbctl_capture_on_pinned_maps(tmp_path) -> None:
    """``lbctl capture --pin-dir`` end to end: another process switches the events on,
    writes what the program sends and switches them off; a second one started meanwhile is
    refused (exit 2) and changes nothing; Ctrl-C ends one cleanly."""
    import secrets
    import sys

    from scapy.utils import PcapNgReader

    from lb.bpf_loader import XdpBalancer
    from lb.kernel.objects import BPFFS
    from lb.kernel.testrun import test_run

    pin_dir = os.path.join(BPFFS, f"lbtest-cap-{secrets.token_hex(4)}")
    path = tmp_path / "cli.pcapng"
    lbctl = [sys.executable, "-m", "lb.cli", "capture", "--pin-dir", pin_dir]
    bal = XdpBalancer.from_tables(FIXTURE_SETS["main"][0](), pin_dir=pin_dir)
    proc = None
    try:
        with CaptureMaps.pinned(pin_dir) as maps:
            proc = subprocess.Popen([*lbctl, "--event", "drop", "-c", "2", "--duration", "60", "-w", str(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while maps.word == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert maps.word == capture_word({C.CAPTURE_EV_DROP}, 1000)
            second = subprocess.run([*lbctl, "-w", str(tmp_path / "second.pcapng")], check=False, capture_output=True,
                                    text=True, timeout=60)
            assert second.returncode == 2 and "another capture is running" in second.stderr
            assert maps.word == capture_word({C.CAPTURE_EV_DROP}, 1000)
            bad = b"\x00" * 12 + b"\x81\x00"  # a cut VLAN tag: dropped as malformed
            for _ in range(2):
                test_run(bal.prog_fd, bad)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert "2 packets written" in err and "drop 2" in err
            assert maps.word == 0
            # Ctrl-C: exit 0, the file closed, the events off
            proc = subprocess.Popen([*lbctl, "-w", str(tmp_path / "int.pcapng")], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while maps.word == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert maps.word != 0
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "0 packets written" in err, err
            assert maps.word == 0
            assert list(PcapNgReader(str(tmp_path / "int.pcapng"))) == []
        pkts = list(PcapNgReader(str(path)))
        assert [bytes(p) for p in pkts] == [bad, bad]
        assert all(len(p.comments) == 1 and p.comments[0].startswith(b"lb event=drop reason=drop_malformed cpu=")
                   for p in pkts)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        bal.close(unpin=True)
