"""The compiled batch loop is cached on disk, and a change in any module it inlines
(not only its own file, which is all numba checks) compiles it afresh."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lb
from lb.datapath import balancer
from lb.datapath.jitcache import dependency_files

LB = Path(lb.__file__).parent


def test_the_loop_depends_on_every_module_it_inlines():
    deps = {str(p.relative_to(LB.parent)) for p in dependency_files(Path(balancer.__file__))}
    for name in ("balancer", "parsing", "csum", "icmp", "quic", "conntable", "routing"):
        assert f"lb/datapath/{name}.py" in deps
    assert {"lb/jhash.py", "lb/constants.py"} <= deps
    # the Python face and the table compiler are not compiled into the loop
    assert not deps & {"lb/datapath/userspace.py", "lb/datapath/maps.py", "lb/datapath_tables.py"}


LOOP = """
from lb.datapath.jitcache import cached_njit
from lb.toy_helper import helper

@cached_njit
def loop(x):
    return helper(x)
"""
RUN = ("from lb.toy_loop import loop; print(loop(1), sum(loop.stats.cache_hits.values()),"
       " sum(loop.stats.cache_misses.values()))")


def test_a_change_in_an_inlined_helper_module_invalidates_the_cache(tmp_path):
    shutil.copytree(LB, tmp_path / "lb", ignore=shutil.ignore_patterns("__pycache__"))
    helper = tmp_path / "lb" / "toy_helper.py"
    (tmp_path / "lb" / "toy_loop.py").write_text(LOOP)

    def run(value: int) -> tuple[int, int, int]:
        helper.write_text(f"import numba as nb\n\n@nb.njit(inline='always')\ndef helper(x):\n"
                          f"    return x + {value}\n")
        out = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                             capture_output=True, text=True, check=True).stdout.split()
        return tuple(int(v) for v in out)

    assert run(1) == (2, 0, 1)  # compiled, and written to the cache
    assert run(1) == (2, 1, 0)  # from the cache
    assert run(2) == (3, 0, 1)  # the helper changed: compiled again, not the stale code
    assert run(2) == (3, 1, 0)
