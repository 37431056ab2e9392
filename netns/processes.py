"""The lab's processes: starting them (logged, in a namespace, in their own session),
waiting for their "ready" line, recognising them later by pid + start time, and killing
them (also every stray process left inside a lab namespace)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from netns.errors import LabError

REPO = Path(__file__).resolve().parent.parent


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), so a
    recorded pid is never confused with a later process that reused the number."""
    from netns.ns import proc_stat_fields

    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    if fields[0] == "Z":
        return None  # a zombie has finished; only its parent's wait() is missing
    return int(fields[19])


def process_alive(entry: Mapping[str, Any]) -> bool:
    """Whether a recorded process (``{"pid": .., "start": ..}``) still runs."""
    return proc_start_time(int(entry["pid"])) == entry.get("start")


def spawn(ns: str | None, argv: Sequence[str], stdout: int | IO[bytes],
          stderr: int | IO[bytes]) -> subprocess.Popen:
    """Start ``argv`` from the repository (on PYTHONPATH) in namespace ``ns`` (None: this
    one), in a session of its own: Ctrl-C on a terminal is not theirs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # `ip netns exec` execs the command, so the pid is the command's.
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            cwd=str(REPO), env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, timeout: float, log: str, what: str) -> None:
    """Wait for the child's first stdout line, which must start with "ready"."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(proc.stdout.fileno(), 256)
        if not chunk:
            break
        line += chunk
    proc.stdout.close()
    if not line.startswith(b"ready"):
        tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
        raise LabError(f"{what} did not start (exit {proc.poll()}): {tail}")


def netns_pids(ns: str) -> list[int]:
    """Every process inside namespace ``ns``."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30,
                       check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill(pids_starts: Iterable[tuple[int, int | None]], grace: float = 3.0) -> list[str]:
    """SIGTERM, wait up to ``grace`` s, SIGKILL; only processes whose start time still
    matches. Returns the ones that would not die."""
    me = os.getpid()
    targets = [(p, s) for p, s in pids_starts if p != me and s is not None
               and proc_start_time(p) == s]
    for pid, _ in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid, _ in targets:  # reap our own children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        targets = [(p, s) for p, s in targets if proc_start_time(p) == s]
        if not targets:
            return []
        time.sleep(0.02)
    for pid, _ in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    for pid, _ in targets:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return [f"process {p} did not exit" for p, s in targets if proc_start_time(p) == s]


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held back for the body (delivered when it ends), main thread only."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
