"""Desired state persistence: atomic replace, crash at any point leaves a whole state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from control_helpers import make_config, real_addr, vip_dict

from control.datapaths import MemoryPort
from control.plane import open_plane
from control.store import DesiredState, StateError, StateLocked, Store, _state_bytes, atomic_write
from control.tables import Sizes
from lb.config import config_to_dict

K0 = ("198.18.100.1", 80, "tcp")


def _state(gen=1):
    cfg = make_config([vip_dict(0, [0, (1, 3)], healthcheck={"type": "http", "http": {"path": "/h"}}),
                       vip_dict(1, [2], v6=True)])
    c = open_plane(MemoryPort(Sizes.of(cfg.settings)), None, cfg)
    c.commands.update_real(K0, real_addr(0), {"drain": True})
    return c.core.state


def test_round_trip(tmp_path) -> None:
    st = _state()
    store = Store(tmp_path)
    store.save(st)
    again = store.load()
    assert again.generation == st.generation and again.ids == st.ids and again.drained == st.drained
    assert config_to_dict(again.config) == config_to_dict(st.config)
    assert json.loads(_state_bytes(st)) == st.to_json()  # the fast writer writes the same document
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600
    assert Store(tmp_path / "none").load() is None


def test_crash_between_write_and_rename_keeps_the_previous_state(tmp_path, monkeypatch) -> None:
    store = Store(tmp_path)
    old = _state()
    store.save(old)
    new = DesiredState(old.config, old.ids, frozenset(), old.generation + 1, old.seed_digest)

    def crash(src, dst):
        raise KeyboardInterrupt("power cut before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(new)
    monkeypatch.undo()
    assert (tmp_path / ".state.json.tmp").exists()  # the new state was written, not renamed
    loaded = Store(tmp_path).load()
    assert loaded.generation == old.generation and loaded.drained == old.drained
    assert Store(tmp_path).clean_temporaries() == [".state.json.tmp"]


def test_crash_while_writing_keeps_the_previous_state(tmp_path, monkeypatch) -> None:
    store = Store(tmp_path)
    old = _state()
    store.save(old)
    real_write = os.write

    def half(fd, chunks):
        data = b"".join(chunks)
        real_write(fd, data[: len(data) // 2])
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "writev", half)
    with pytest.raises(OSError):
        store.save(DesiredState(old.config, old.ids, frozenset(), 99))
    monkeypatch.undo()
    assert Store(tmp_path).load().generation == old.generation


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch) -> None:
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", os.path.basename(a)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f.json", b"{}")
    assert events == [("fsync", ".f.json.tmp"), ("rename", ".f.json.tmp"), ("fsync", tmp_path.name)]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")  # control_helpers
    from control.store import Store
    from control.datapaths import MemoryPort
    from control.plane import open_plane
    from control.tables import Sizes
    from control_helpers import make_config, vip_dict
    cfg = make_config([vip_dict(i, [i, i + 1]) for i in range(6)])
    c = open_plane(MemoryPort(Sizes.of(cfg.settings)), Store(sys.argv[1]), cfg)
    print("ready", flush=True)
    w = 1
    while True:
        w = w % 5 + 1
        c.commands.update_real(("198.18.100.1", 80, "tcp"), "198.19.0.1", {"weight": w})
""")


def test_sigkill_at_any_moment_leaves_a_loadable_state(tmp_path) -> None:
    """A process that saves states as fast as it can is SIGKILLed at random moments;
    every time, the directory holds one complete state, never a torn one."""
    generations = []
    for i in range(6):
        d = tmp_path / f"s{i}"
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(d)], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(0.03 + i * 0.05)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        store = Store(d)
        st = store.load()
        assert st is not None and st.generation >= 1
        st.ids.check()
        generations.append(st.generation)
        store.clean_temporaries()
    assert max(generations) > 3  # the writer did get through many saves


def test_one_daemon_per_directory(tmp_path) -> None:
    a = Store(tmp_path)
    a.lock()
    with pytest.raises(StateLocked):
        Store(tmp_path).lock()
    a.unlock()
    Store(tmp_path).lock()
    # a holder killed with SIGKILL releases it (the kernel drops the flock)
    p = subprocess.Popen([sys.executable, "-c", "import sys,time; from control.store import Store; "
                          "Store(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)",
                          str(tmp_path / "k")], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(StateLocked):
            Store(tmp_path / "k").lock()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    Store(tmp_path / "k").lock()


def test_unusable_state_is_an_error_not_a_reset(tmp_path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="not JSON"):
        Store(tmp_path).load()
    st = _state().to_json()
    st["config"]["vips"][0]["port"] = 70000
    (tmp_path / "state.json").write_text(json.dumps(st))
    with pytest.raises(StateError, match=r"vips\[0\].port"):
        Store(tmp_path).load()
    st = _state().to_json()
    st["ids"]["reals"] = st["ids"]["reals"][:1]
    (tmp_path / "state.json").write_text(json.dumps(st))
    with pytest.raises(StateError, match="no number"):
        Store(tmp_path).load()


def test_health_file(tmp_path) -> None:
    store = Store(tmp_path)
    assert store.load_health() == {}
    store.save_health([((K0, "198.19.0.1"), False), ((K0, "198.19.0.2"), True)])
    assert store.load_health() == {(K0, "198.19.0.1"): False, (K0, "198.19.0.2"): True}
    (tmp_path / "health.json").write_text("garbage")
    assert store.load_health() == {}  # not critical: probes will tell again


def test_the_saved_state_wins_over_the_config_file(tmp_path, caplog) -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    port = MemoryPort(Sizes.of(cfg.settings))
    c = open_plane(port, Store(tmp_path), cfg)
    c.commands.create_vip(vip_dict(1, [2]))
    edited = make_config([vip_dict(0, [0])])
    c2 = open_plane(port, Store(tmp_path), edited)
    assert c2.core.generation == 2 and len(c2.core.state.config.vips) == 2
    assert "the saved state wins" in caplog.text
    c3 = open_plane(port, Store(tmp_path), edited, from_config=True)
    assert len(c3.core.state.config.vips) == 1 and c3.core.generation == 1
