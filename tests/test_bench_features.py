"""bench/bench_features.py end to end in a tiny configuration: every feature's frames take
the feature's path in both datapaths (the script checks the counters and raises
otherwise), and the JSON holds a figure for every case. Not a speed test."""

from __future__ import annotations

import json
import os

import pytest

from bench import bench_features as bf
from netns.ns import list_netns

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.netns]


def test_every_feature_measured(tmp_path) -> None:
    out = tmp_path / "features.json"
    affinity = os.sched_getaffinity(0)
    assert bf.main(["--frames", "20000", "--reps", "1", "--user-repeat", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cases = {(r["feature"], r["family"]) for r in data["results"]}
    assert cases == {(c.feature, f) for c in bf.CASES for f in (4, 6)}
    for r in data["results"]:
        for side in ("xdp", "userspace"):
            assert r[side]["feature_ns"] > 0 and r[side]["baseline_ns"] > 0, r
    assert not [n for n in list_netns() if n.startswith(("lbfg", "lbfs"))]
    assert os.sched_getaffinity(0) == affinity  # the userspace part's pinning undone


def test_quic_frames_carry_the_server_id() -> None:
    from netns.quic import parse, server_id_of

    f = bf.frame(4, "quic", bf.SMALL, bytes(6))
    pkt = parse(f[14 + 20 + 8:])
    assert pkt is not None and not pkt.long and server_id_of(pkt.dcid) == bf.SERVER_ID
