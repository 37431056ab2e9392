"""The desired state in etcd: one configuration shared by a fleet of balancers.

``lbctl serve --store etcds://HOST:PORT/PREFIX`` keeps the desired state (the same JSON
document :class:`control.store.Store` writes to ``state.json``) under the key
``PREFIX/state`` in etcd instead of the local file, over TLS (``--store-ca``) as an etcd
user (``--store-user-file``: ``USER:PASSWORD``, mode 0600). Plain ``etcd://`` only to a
loopback address or with ``--store-plaintext``. Every balancer of the fleet points at
the same key:

* **writes through**: a change accepted by any balancer's API is written to etcd (a
  transaction that succeeds only if the key is still at the revision this balancer last
  saw, so two balancers cannot overwrite each other's change; the loser's request fails
  and nothing changes) before it is acknowledged; if etcd is unreachable the change is
  undone and refused (HTTP 503 through the daemon's PersistFailure);
* **watches**: a thread polls the key (every ``interval`` s, default 0.2) and, when
  another balancer has written a newer generation, makes it this balancer's desired
  state and reconciles the datapath: every balancer converges to the same rings;
* **etcd lost**: the balancer keeps forwarding with the last state it has; ``GET
  /v1/status`` says ``store.reachable: false`` (and since when), the metrics
  ``lb_store_reachable 0``, the log warns once; when etcd returns the watcher picks up
  whatever changed meanwhile. Nothing is lost: a change is either in
  etcd or was refused.

Health results, the lock and temporaries stay local (``--state-dir``): health is what
*this* balancer observes.

etcd is spoken to through its v3 JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/auth/authenticate``) with a small HTTP/1.1 client (TLS by :mod:`ssl`) over sockets
created in ``netns`` if given (the lab's etcd listens
only inside the lab's namespaces), so no etcd client library is needed.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from control.secret_files import private_first_line
from control.store import DesiredState, StateError, Store, _state_bytes

log = logging.getLogger("lb.etcd_store")

__all__ = ["EtcdClient", "EtcdStore", "EtcdUnavailable", "open_store", "parse_etcd_url", "read_credentials"]


class EtcdUnavailable(OSError):
    """etcd did not answer (or answered with an error)."""


def parse_etcd_url(url: str) -> tuple[str, int, str, bool]:
    """'etcds://198.18.10.1:2379/lb/fleet' -> ('198.18.10.1', 2379, '/lb/fleet', True):
    host, port, key prefix and whether to speak TLS (``etcds``) or not (``etcd``)."""
    u = urlsplit(url)
    if u.scheme not in ("etcd", "etcds") or not u.hostname or not u.port:
        raise ValueError(f"{url!r}: expected etcds://HOST:PORT/PREFIX (or etcd:// without TLS)")
    prefix = u.path.rstrip("/") or "/lb"
    return u.hostname, u.port, prefix, u.scheme == "etcds"


def read_credentials(path: str) -> tuple[str, str]:
    """An etcd user and password from the first line of ``path`` (``USER:PASSWORD``);
    refused if others can read the file."""
    user, sep, password = private_first_line(path, "--store-user-file").partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--store-user-file {path}: the first line must be USER:PASSWORD")
    return user, password


def _b64(b: bytes | str) -> str:
    return base64.b64encode(b.encode() if isinstance(b, str) else b).decode()


class EtcdClient:
    """The few etcd v3 calls we need, over the JSON gateway, one connection per call.

    ``tls``: an SSL context (verifying etcd's certificate) or None for plain HTTP;
    ``credentials``: (user, password) when etcd has authentication on: the client gets a
    token from ``/v3/auth/authenticate`` and sends it with every call, and gets a new one
    when etcd no longer accepts it (expired, or etcd restarted)."""

    def __init__(self, host: str, port: int, netns: str | None = None, timeout: float = 2.0,
                 tls: ssl.SSLContext | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.host, self.port, self.netns, self.timeout = host, port, netns, timeout
        self.tls, self.credentials = tls, credentials
        self._token: str | None = None

    def _socket(self) -> socket.socket:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.netns:
            from lb.kernel.netns import run_in_netns

            return run_in_netns(self.netns, socket.socket, fam, socket.SOCK_STREAM)
        return socket.socket(fam, socket.SOCK_STREAM)

    def _post(self, path: str, body: dict[str, Any], token: str | None) -> tuple[str, bytes]:
        """(status code, payload) of one POST."""
        data = json.dumps(body).encode()
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = f"Authorization: {token}\r\n" if token else ""
        req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{self.port}\r\nContent-Type: application/json\r\n"
               f"{auth}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
        try:
            s = self._socket()
            try:
                s.settimeout(self.timeout)
                s.connect((self.host, self.port))
                if self.tls is not None:
                    s = self.tls.wrap_socket(s, server_hostname=self.host)
                s.sendall(req)
                chunks = []
                while True:
                    c = s.recv(65536)
                    if not c:
                        break
                    chunks.append(c)
            finally:
                s.close()
        except OSError as e:  # ssl.SSLError included: a certificate etcd's CA did not sign
            raise EtcdUnavailable(f"etcd {self.host}:{self.port}: {e}") from None
        raw = b"".join(chunks)
        head, _, payload = raw.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if b"transfer-encoding: chunked" in head.lower():
            payload = _unchunk(payload)
        parts = status_line.split()
        return (parts[1] if len(parts) >= 2 else "?"), payload

    def _authenticate(self) -> str:
        assert self.credentials is not None
        user, password = self.credentials
        code, payload = self._post("/v3/auth/authenticate", {"name": user, "password": password}, None)
        if code != "200":
            raise EtcdUnavailable(f"etcd: authenticating as {user!r} failed: HTTP {code} {payload[:200]!r}")
        self._token = str(json.loads(payload).get("token", ""))
        return self._token

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        token = self._token
        if self.credentials is not None and token is None:
            token = self._authenticate()
        code, payload = self._post(path, body, token)
        if code == "401" and self.credentials is not None:  # the token expired or etcd restarted
            code, payload = self._post(path, body, self._authenticate())
        if code != "200":
            raise EtcdUnavailable(f"etcd {path}: HTTP {code} {payload[:200]!r}")
        try:
            return json.loads(payload or b"{}")
        except ValueError as e:
            raise EtcdUnavailable(f"etcd {path}: not JSON ({e})") from None

    def get(self, key: str) -> tuple[bytes | None, int]:
        """(value, mod_revision); (None, 0) if the key does not exist."""
        r = self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs") or []
        if not kvs:
            return None, 0
        return base64.b64decode(kvs[0].get("value", "")), int(kvs[0].get("mod_revision", 0))

    def put_if(self, key: str, value: bytes, mod_revision: int) -> tuple[bool, int]:
        """Write ``value`` if the key is still at ``mod_revision`` (0: does not exist).
        Returns (succeeded, the revision after)."""
        r = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        })
        return bool(r.get("succeeded")), int(r.get("header", {}).get("revision", 0))


def _unchunk(b: bytes) -> bytes:
    out = []
    while b:
        size_line, _, rest = b.partition(b"\r\n")
        n = int(size_line.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out.append(rest[:n])
        b = rest[n + 2:]
    return b"".join(out)


class EtcdStore:
    """A :class:`control.store.Store` whose desired state lives in etcd (see the module
    docstring). ``local_dir``: lock, health, temporaries (a plain Store)."""

    def __init__(self, url: str, local_dir: str, netns: str | None = None, interval: float = 0.2,
                 fsync: bool = True, tls: ssl.SSLContext | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        host, port, prefix, _ = parse_etcd_url(url)
        self.url = url
        self.key = f"{prefix}/state"
        self.client = EtcdClient(host, port, netns, tls=tls, credentials=credentials)
        self.local = Store(local_dir, fsync=fsync)
        self.dir = self.local.dir
        self.interval = interval
        self.revision = 0  # mod_revision of the key as we last read or wrote it
        self.runtime: Any = None  # control.runtime.Runtime, once attached
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # live, shown by GET /v1/status as "store" (the daemon puts this dict in its info)
        self.info: dict[str, Any] = {"kind": "etcd", "url": url, "key": self.key, "tls": tls is not None,
                                     "user": credentials[0] if credentials else None, "reachable": None,
                                     "unreachable_since": None, "last_error": None, "revision": 0,
                                     "adopted": 0, "conflicts": 0}

    # --- what Store offers ---------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return f"{self.url} (key {self.key})"

    @property
    def health_path(self) -> Any:
        return self.local.health_path

    def lock(self) -> None:
        self.local.lock()

    def unlock(self) -> None:
        self.stop()
        self.local.unlock()

    def clean_temporaries(self) -> list[str]:
        return self.local.clean_temporaries()

    def load_health(self) -> dict:
        return self.local.load_health()

    def save_health(self, health: Any) -> None:
        self.local.save_health(health)

    def _mark(self, ok: bool, err: str | None = None) -> None:
        if ok:
            if self.info["reachable"] is False:
                log.info("etcd reachable again")
            self.info.update(reachable=True, unreachable_since=None)
        else:
            if self.info["reachable"] is not False:
                log.warning("etcd unreachable: %s (forwarding goes on with generation %s)", err,
                            getattr(getattr(getattr(self.runtime, "core", None), "state", None), "generation", "?"))
                self.info["unreachable_since"] = time.time()
            self.info.update(reachable=False, last_error=err)

    def _read(self) -> tuple[DesiredState | None, int]:
        try:
            raw, rev = self.client.get(self.key)
        except EtcdUnavailable as e:
            self._mark(False, str(e))
            raise
        self._mark(True)
        if raw is None:
            return None, 0
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise StateError(f"{self.state_path}: not JSON ({e})") from None
        return DesiredState.from_json(data, self.state_path), rev

    def load(self) -> DesiredState | None:
        """The shared state (None if the key is empty). Unreachable etcd at start-up is a
        StateError: a balancer that never had a config has nothing to forward with."""
        try:
            state, rev = self._read()
        except EtcdUnavailable as e:
            raise StateError(f"{e}") from None
        self.revision = rev
        self.info["revision"] = rev
        return state

    def save(self, state: DesiredState) -> None:
        """Write through; OSError (the change is undone) if etcd is down or another
        balancer wrote first."""
        body = _state_bytes(state)
        try:
            ok, rev = self.client.put_if(self.key, body, self.revision)
        except EtcdUnavailable as e:
            self._mark(False, str(e))
            raise
        self._mark(True)
        if not ok:
            # the same document already there (two balancers seeding the same config)?
            other, orev = self._read()
            if other is not None and _state_bytes(other) == body:
                self.revision = orev
                return
            self.info["conflicts"] += 1
            raise OSError(f"etcd {self.key} changed since revision {self.revision} (another balancer "
                          f"wrote generation {other.generation if other else '?'}); try again")
        self.revision = rev
        self.info["revision"] = rev

    # --- watching ------------------------------------------------------------------------

    def attach(self, runtime: Any) -> None:
        """Follow the key for ``runtime``: adopt every newer generation written elsewhere."""
        self.runtime = runtime
        self._thread = threading.Thread(target=self._watch, name="etcd-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def poll_once(self) -> bool:
        """One look at the key; True if a new state was adopted."""
        try:
            raw, rev = self.client.get(self.key)
        except EtcdUnavailable as e:
            self._mark(False, str(e))
            return False
        self._mark(True)
        if raw is None or rev <= self.revision:
            return False
        core = self.runtime.core
        with core.lock:
            if rev <= self.revision:  # our own write (or a newer one) got there meanwhile
                return False
            try:
                new = DesiredState.from_json(json.loads(raw), self.state_path)
            except (ValueError, StateError) as e:
                log.error("ignoring an unusable state in etcd (revision %d): %s", rev, e)
                self.revision = rev
                return False
            if _state_bytes(new) == _state_bytes(core.state):
                self.revision = rev
                self.info["revision"] = rev
                return False
            log.info("adopting generation %d from etcd (revision %d; had %d)", new.generation, rev,
                     core.state.generation)
            self.revision = rev
            self.info["revision"] = rev
            self.info["adopted"] += 1
            self.runtime.adopt(new)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception as e:  # noqa: BLE001 - keep watching; the datapath keeps the last state
                log.error("applying the state from etcd failed (will retry): %s", e)


def open_store(spec: str | None, local_dir: str, netns: str | None = None, *, ca_file: str | None = None,
               user_file: str | None = None, plaintext: bool = False) -> Any:
    """``--store``: None or 'file' -> the local Store; 'etcds://...' (TLS, verified with
    ``ca_file``, else the system's CAs) or 'etcd://...' -> EtcdStore. ``user_file``: the
    etcd user and password (``USER:PASSWORD``, mode 0600). Plain ``etcd://`` only to a
    loopback address or with ``plaintext``: the state and the password would cross the
    network in the clear. ValueError names the option at fault."""
    if not spec or spec == "file":
        if ca_file or user_file:
            raise ValueError("--store-ca/--store-user-file need --store etcds://...")
        return Store(local_dir)
    host, _, _, tls = parse_etcd_url(spec)
    if not tls:
        if ca_file:
            raise ValueError(f"--store-ca with {spec}: TLS is etcds://")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and not plaintext:
            raise ValueError(f"--store {spec}: plain etcd:// only to a loopback address; use etcds:// (TLS) "
                             "or --store-plaintext")
    ctx = None
    if tls:
        try:
            ctx = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--store-ca {ca_file}: {e}") from None
    creds = read_credentials(user_file) if user_file else None
    return EtcdStore(spec, local_dir, netns=netns, tls=ctx, credentials=creds)
