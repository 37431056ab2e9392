"""The desired state and its atomic persistence.

:class:`DesiredState` is everything an operator has asked for: the config (lb.config
model, health checks included), which reals are drained, and the numbers handed out
(:class:`~control.ids.Ids`, so a restart keeps every VIP number and real id). It is a
value: every accepted change makes a new one with ``generation + 1``.

:class:`Store` keeps it in ``<state-dir>/state.json``. :func:`atomic_write` writes a
temporary file in the same directory, fsyncs it, renames it over the old file and fsyncs
the directory: after a crash at any point, ``state.json`` is either the old or the new
state, complete. The config includes the routing tables (``quic_servers``,
``source_routes``) and ``settings.mtu``. Health results go to ``health.json`` the same way (they only save
probes after a restart). A lock file (``flock``) keeps two daemons off one directory;
the kernel drops the lock when the holder dies, also by SIGKILL.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control.ids import Ids, VipKey
from control.ring_history import PrevRing, history_from_json, history_to_json
from lb.config import Config, ConfigError, config_to_dict, parse_config

__all__ = ["DesiredState", "Store", "StateError", "StateLocked", "atomic_write", "config_digest",
           "STATE_FORMAT"]

STATE_FORMAT = 1
STATE_FILE = "state.json"
HEALTH_FILE = "health.json"
LOCK_FILE = "lock"


class StateError(RuntimeError):
    """The state file exists but cannot be used (unreadable, corrupt, inconsistent)."""


class StateLocked(StateError):
    """Another process holds the state directory."""


def config_digest(cfg: Config) -> str:
    """sha256 of the config's canonical JSON (which file or request it came from does not matter)."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class DesiredState:
    """What the datapath should do, as asked for. A value; never mutated."""

    config: Config
    ids: Ids = field(default_factory=Ids)
    drained: frozenset[tuple[VipKey, str]] = frozenset()  # (VIP key, real address)
    generation: int = 0  # +1 per accepted change
    seed_digest: str | None = None  # config_digest of the --config file this state started from
    # stateless VIPs' previous rings as of this change (control.ring_history), so that a
    # restarted balancer, or another one of the fleet, knows them too
    ring_history: Mapping[VipKey, tuple[PrevRing, ...]] = field(default_factory=dict)

    def head_json(self) -> dict[str, Any]:
        """Everything but the config."""
        return {
            "format": STATE_FORMAT,
            "generation": self.generation,
            "seed_digest": self.seed_digest,
            "drained": sorted([a, p, proto, r] for (a, p, proto), r in self.drained),
            "ids": self.ids.to_json(),
            "ring_history": history_to_json(self.ring_history),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.head_json(), "config": config_to_dict(self.config)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = STATE_FILE) -> DesiredState:
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise StateError(f"{source}: not a state file of format {STATE_FORMAT}")
        try:
            cfg = parse_config(data["config"], source)
        except ConfigError as e:
            raise StateError(f"{source}: the stored config is invalid:\n{e}") from None
        try:
            ids = Ids.from_json(data["ids"])
            drained = frozenset(((str(a), int(p), str(proto)), str(r)) for a, p, proto, r in data["drained"])
            generation = int(data["generation"])
            history = history_from_json(data.get("ring_history"))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source}: {e}") from None
        keys = {v.key for v in cfg.vips}
        missing = [k for k in keys if k not in ids.vips] + [
            r.address for v in cfg.vips for r in v.reals if r.address not in ids.reals]
        if missing:
            raise StateError(f"{source}: no number stored for {missing[:3]}")
        return cls(cfg, ids, drained, generation, data.get("seed_digest"), history)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | list[bytes], fsync: bool = True, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (bytes, or a list of chunks written in order) so that
    a crash leaves the old or the new content: write ``.<name>.tmp`` beside it, fsync,
    rename over ``path``, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        for i in range(0, len(chunks), 1024):  # IOV_MAX
            batch = chunks[i:i + 1024]
            n = os.writev(fd, batch)
            for chunk in batch:  # a short write: the rest one by one
                if n >= len(chunk):
                    n -= len(chunk)
                    continue
                view = memoryview(chunk)[n:]
                n = 0
                while view:
                    view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


class Store:
    """``directory``/state.json (+ health.json, lock). ``fsync=False`` only for tests
    and benchmarks that measure without the disk."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.fsync = fsync
        self._lock_fd: int | None = None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def health_path(self) -> Path:
        return self.dir / HEALTH_FILE

    def lock(self) -> None:
        """Hold the directory for this process (until it exits); StateLocked if taken."""
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(f"{self.dir} is in use by another daemon") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean_temporaries(self) -> list[str]:
        """Remove temporary files a crash left behind (the renames never happened)."""
        gone = []
        for p in self.dir.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone

    # --- desired state ---------------------------------------------------------------

    def load(self) -> DesiredState | None:
        """The last saved state, None if there is none. StateError if unusable."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{self.state_path}: {e}") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise StateError(f"{self.state_path}: not JSON ({e})") from None
        return DesiredState.from_json(data, str(self.state_path))

    def save(self, state: DesiredState) -> None:
        atomic_write(self.state_path, _state_chunks(state), self.fsync)

    # --- health ----------------------------------------------------------------------

    def load_health(self) -> dict[tuple[VipKey, str], bool]:
        """(VIP key, real) -> up, as last saved; {} if none or unreadable (not critical)."""
        try:
            data = json.loads(self.health_path.read_bytes())
            return {((str(a), int(p), str(proto)), str(r)): bool(up) for a, p, proto, r, up in data["reals"]}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def save_health(self, health: Iterable[tuple[tuple[VipKey, str], bool]]) -> None:
        rows = sorted([a, p, proto, r, up] for ((a, p, proto), r), up in health)
        atomic_write(self.health_path, json.dumps({"format": STATE_FORMAT, "reals": rows}).encode(),
                     self.fsync)


# --- serialisation, fast for large configs ------------------------------------------------
#
# A config of 500 VIPs x 100 reals is ~3 MB of JSON and model_dump()s in ~100 ms. VIP
# models are immutable and reused from one state to the next, so each VIP's JSON is
# cached by object identity (the cache holds the object, so the id stays valid) and the
# document is assembled from the pieces.

_vip_json_cache: dict[int, tuple[Any, bytes]] = {}
_ids_json_cache: tuple[Any, bytes] | None = None


def _vip_json(vip: Any) -> bytes:
    hit = _vip_json_cache.get(id(vip))
    if hit is not None and hit[0] is vip:
        return hit[1]
    text = json.dumps(vip.model_dump(mode="json", exclude_none=True), separators=(",", ":")).encode()
    _vip_json_cache[id(vip)] = (vip, text)
    return text


def _ids_json(ids: Ids) -> bytes:
    global _ids_json_cache
    if _ids_json_cache is None or _ids_json_cache[0] is not ids:
        _ids_json_cache = (ids, json.dumps(ids.to_json(), separators=(",", ":")).encode())
    return _ids_json_cache[1]


def _state_bytes(state: DesiredState) -> bytes:
    return b"".join(_state_chunks(state))


def _state_chunks(state: DesiredState) -> list[bytes]:
    """The state document in pieces (written one after the other: no 2 MB buffer to build)."""
    cfg = state.config
    vips = [_vip_json(v) for v in cfg.vips]
    if len(_vip_json_cache) > 2 * len(vips) + 64:
        live = {id(v) for v in cfg.vips}
        for k in [k for k in _vip_json_cache if k not in live]:
            del _vip_json_cache[k]
    head = {"format": STATE_FORMAT, "generation": state.generation, "seed_digest": state.seed_digest,
            "drained": sorted([a, p, proto, r] for (a, p, proto), r in state.drained),
            "ring_history": history_to_json(state.ring_history)}
    settings = json.dumps(cfg.settings.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
    out = [json.dumps(head, separators=(",", ":"))[:-1].encode(), b',"ids":', _ids_json(state.ids),
           b',"config":{"settings":', settings.encode(), b',"vips":[']
    for i, v in enumerate(vips):
        if i:
            out.append(b",")
        out.append(v)
    routing = {k: [x.model_dump(mode="json") for x in getattr(cfg, k)] for k in ("quic_servers", "source_routes")}
    out.append(b"]," + json.dumps(routing, separators=(",", ":"))[1:].encode() + b"}\n")
    return out
