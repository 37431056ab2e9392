"""A small client of the daemon's API (httpx), over the Unix socket or TCP + token."""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import quote

import httpx

from control.daemon import DEFAULT_SOCKET

__all__ = ["Client", "ApiError", "Unavailable", "parse_vip", "vip_path", "ROUTING_PATHS"]

# routing table (config section) -> its API path
ROUTING_PATHS = {"quic_servers": "/v1/quic-servers", "source_routes": "/v1/source-routes"}

VipKey = tuple[str, int, str]


class ApiError(Exception):
    """The daemon answered with an error; ``status`` and its JSON ``body``."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body if isinstance(body, dict) else {"error": str(body), "problems": []}
        super().__init__(self.body.get("error", f"HTTP {status}"))

    @property
    def caller_fault(self) -> bool:
        return 400 <= self.status < 500


class Unavailable(Exception):
    """No daemon answered."""


def parse_vip(text: str) -> VipKey:
    """'198.18.0.1:80/tcp' or '[2001:db8::1]:443/udp' -> (address, port, protocol); a CIDR
    VIP: '198.18.64.0/24:80/tcp', '[2001:db8:64::/48]:53/udp'."""
    hostport, sep, proto = text.rpartition("/")
    if not sep or proto not in ("tcp", "udp"):
        raise ValueError(f"{text!r}: expected ADDRESS:PORT/tcp|udp (IPv6: [ADDRESS]:PORT/udp)")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected ADDRESS:PORT/tcp|udp (IPv6: [ADDRESS]:PORT/udp)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: unbalanced [ ]")
        host = host[1:-1]
    return host, int(port), proto


def vip_path(key: VipKey) -> str:
    a, p, proto = key
    return f"/v1/vips/{quote(a, safe=':/')}/{p}/{proto}"  # a CIDR VIP's prefix: two segments


class Client:
    """``socket``: Unix socket path (default $LBCTL_SOCKET or /run/lb/lbd.sock); or ``url``
    (http://host:port or https://host:port) with ``token``; ``ca_file``: the CA that signed
    an https daemon's certificate (default: the system's)."""

    def __init__(self, socket: str | None = None, url: str | None = None, token: str | None = None,
                 timeout: float = 30.0, ca_file: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self.where = url
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
            self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, verify=verify)
        else:
            path = socket or os.environ.get("LBCTL_SOCKET") or DEFAULT_SOCKET
            self.where = f"unix:{path}"
            self.http = httpx.Client(base_url="http://lbd", transport=httpx.HTTPTransport(uds=path),
                                     headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None,
                if_match: int | None = None) -> httpx.Response:
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
        try:
            r = self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.ConnectError as e:
            raise Unavailable(f"no daemon at {self.where}: {e}") from None
        except (httpx.TransportError, OSError) as e:  # sent, but the answer never came
            raise Unavailable(f"lost the connection to {self.where} (the request may or may not have "
                              f"been applied): {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ApiError(r.status_code, body)
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None).json()

    def get_all(self, path: str, page: int | None = None) -> list[Any]:
        """Every entry of a paged list endpoint (following ``Link: rel="next"``), ``page``
        entries per request (default: the daemon's maximum)."""
        rows: list[Any] = []
        while True:
            params = {"offset": len(rows), **({"limit": page} if page else {})}
            r = self.request("GET", path, params=params)
            got = r.json()
            rows += got
            if "next" not in r.links or not got:
                return rows

    # conveniences
    def status(self) -> dict[str, Any]:
        return self.get("/v1/status")

    def vips(self) -> list[dict[str, Any]]:
        return self.get_all("/v1/vips")

    def vip(self, key: VipKey) -> dict[str, Any]:
        return self.get(vip_path(key))

    def create_vip(self, body: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/vips", json=body, if_match=if_match).json()

    def patch_vip(self, key: VipKey, body: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        return self.request("PATCH", vip_path(key), json=body, if_match=if_match).json()

    def delete_vip(self, key: VipKey, if_match: int | None = None) -> None:
        self.request("DELETE", vip_path(key), if_match=if_match)

    def add_real(self, key: VipKey, body: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        return self.request("POST", vip_path(key) + "/reals", json=body, if_match=if_match).json()

    def patch_real(self, key: VipKey, real: str, body: dict[str, Any], if_match: int | None = None
                   ) -> dict[str, Any]:
        return self.request("PATCH", f"{vip_path(key)}/reals/{quote(real, safe=':')}", json=body,
                            if_match=if_match).json()

    def delete_real(self, key: VipKey, real: str, if_match: int | None = None) -> None:
        self.request("DELETE", f"{vip_path(key)}/reals/{quote(real, safe=':')}", if_match=if_match)

    def stats(self) -> dict[str, Any]:
        return self.get("/v1/stats")

    def conntable(self, limit: int = 100) -> dict[str, Any]:
        return self.get("/v1/stats/conntable", limit=limit)

    def health(self) -> list[dict[str, Any]]:
        return self.get_all("/v1/health")

    def config(self) -> dict[str, Any]:
        return self.get("/v1/config")

    def config_yaml(self) -> str:
        return self.request("GET", "/v1/config", params={"format": "yaml"}).text

    def put_config(self, data: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        return self.request("PUT", "/v1/config", json=data, if_match=if_match).json()

    # QUIC server ids and source routes: ``table`` is "quic_servers" or "source_routes"
    def routing(self, table: str) -> list[dict[str, Any]]:
        return self.get_all(ROUTING_PATHS[table])

    def add_routing(self, table: str, entry: dict[str, Any], if_match: int | None = None) -> dict[str, Any]:
        return self.request("POST", ROUTING_PATHS[table], json=entry, if_match=if_match).json()

    def delete_routing(self, table: str, key: int | str, if_match: int | None = None) -> None:
        """``key``: a QUIC server id, or a prefix 'ADDRESS/LENGTH' (sent as two segments)."""
        self.request("DELETE", f"{ROUTING_PATHS[table]}/{quote(str(key), safe=':/')}", if_match=if_match)

    def simulate(self, query: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/simulate", json=query).json()
