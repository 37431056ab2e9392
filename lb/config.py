"""Declarative configuration: a YAML file of settings and VIPs, validated as a whole.

Parsing is all-or-nothing: :func:`parse_config` and :func:`load_config` either return a
complete, cross-checked :class:`Config` or raise :class:`ConfigError` listing every
problem found, each as ``(path, message)`` where the path uses the YAML's own names
(``vips[0].reals[1].weight``). Every model forbids unknown keys, so a typo is an error.

Field-level problems are all reported together; checks that span several fields (for
example duplicate VIPs) run once the fields themselves are valid.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lb import constants as C
from lb.healthcheck_config import HealthCheck, HttpCheck, UdpCheck, int_range  # vips[].healthcheck
from lb.maglev import is_prime

__all__ = [
    "ConfigError",
    "Settings",
    "GueSettings",
    "Real",
    "Vip",
    "QuicServer",
    "SourceRoute",
    "Config",
    "parse_config",
    "load_config",
    "parse_config_yaml",
    "config_to_dict",
    "dump_config_yaml",
    "GUE_DEFAULT_PORT",
    "MIN_RING_SIZE",
    "MAX_WEIGHT",
]

GUE_DEFAULT_PORT = C.GUE_DEFAULT_PORT  # Katran's GUE destination port (GUE_DPORT)
MIN_RING_SIZE = 13  # smallest Maglev ring accepted: anything smaller balances badly
MAX_WEIGHT = 2**32 - 1  # weights are u32
MAX_FRAME_SIZE_RANGE = (64, 9216)  # Ethernet minimum .. common jumbo frame
TOP = "(top level)"  # path shown for errors about the whole document

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- errors --------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid configuration. ``errors`` lists every problem as (path, message)."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.errors)
        head = f"{self.source}: " if self.source else ""
        lines = [f"{head}invalid config ({n} error{'s' if n != 1 else ''})"]
        lines += [f"  {path}: {msg}" for path, msg in self.errors]
        return "\n".join(lines)


def _problems(problems: list[tuple[str, str]]) -> PydanticCustomError:
    """Several cross-field problems, paths relative to the model that found them."""
    summary = "; ".join(f"{p}: {m}" for p, m in problems)
    ctx = {"summary": summary, "problems": problems}
    return PydanticCustomError("lb_problems", "{summary}", ctx)


def _show(value: Any) -> str:
    """A short, YAML-flavoured rendering of a bad input for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


# --- field validators ----------------------------------------------------------------


def _parse_ip(value: Any) -> IP:
    if not isinstance(value, str):
        raise ValueError(f"must be an IP address string (got {_show(value)})")
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {_show(value)}") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            raise ValueError(f"zone/scope ids are not allowed: {_show(value)}")
        if ip.ipv4_mapped is not None:
            raise ValueError(f"IPv4-mapped IPv6 address; write it as {ip.ipv4_mapped}")
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"must be a unicast address (got {ip})")
    return ip


def _canonical_ip(value: Any) -> str:
    return str(_parse_ip(value))


def _prime(v: int) -> int:
    if not is_prime(v):
        raise ValueError(f"{v} is not prime")
    return v


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"must be a power of two (got {v})")
    return v


_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _mac(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 60**6:
        # YAML 1.1 reads unquoted 52:54:00:12:34:56 as a base-60 integer.
        digits = []
        for _ in range(6):
            value, d = divmod(value, 60)
            digits.append(f"{d:02d}")
        guess = ":".join(reversed(digits))
        raise ValueError(
            f'must be a quoted string: YAML read the unquoted MAC as a number (write "{guess}")'
        )
    if not isinstance(value, str):
        raise ValueError(f"must be a MAC address string (got {_show(value)})")
    if not _MAC_RE.fullmatch(value):
        raise ValueError(f"not a MAC address (xx:xx:xx:xx:xx:xx): {_show(value)}")
    mac = value.lower()
    if mac == "00:00:00:00:00:00" or int(mac[:2], 16) & 1:
        raise ValueError(f"must be a unicast, non-zero MAC (got {mac})")
    return mac


def _flag(name: str) -> str:
    if name in C.VIP_FLAGS:
        return name
    raise ValueError(f"unknown flag {_show(name)}; valid flags: {', '.join(C.VIP_FLAGS)}")


def _canonical_prefix(value: Any) -> str:
    """'198.18.64.0/24' / '2001:db8:5::/48' in canonical form; host bits must be zero."""
    if not isinstance(value, str):
        raise ValueError(f"must be a prefix string like 198.18.64.0/24 (got {_show(value)})")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 prefix: {_show(value)}") from None
    if ipaddress.ip_interface(value.strip()).ip != net.network_address:
        raise ValueError(f"host bits set in {value.strip()}: did you mean {net}?")
    return str(net)


# Address ranges a CIDR VIP must not overlap: no unicast traffic is ours there.
_NOT_UNICAST = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "::/128", "::ffff:0:0/96", "ff00::/8"))


def _canonical_vip_address(value: Any) -> str:
    """A VIP's address: one address (an exact VIP), or a prefix (a CIDR VIP) such as
    '198.18.64.0/24', canonical. A prefix has no host bits set, is at least
    VIP_PREFIX_MIN_V4 / _V6 bits long, is shorter than a whole address (a /32 or /128
    is written as the address), and holds only unicast addresses."""
    if not isinstance(value, str) or "/" not in value:
        return _canonical_ip(value)
    net = ipaddress.ip_network(_canonical_prefix(value))
    shortest = C.VIP_PREFIX_MIN_V4 if net.version == 4 else C.VIP_PREFIX_MIN_V6
    if net.prefixlen == net.max_prefixlen:
        raise ValueError(f"a /{net.prefixlen} is one address: write it as {net.network_address}"
                         " (an exact VIP)")
    if net.prefixlen < shortest:
        raise ValueError(f"prefix /{net.prefixlen} is too short: a CIDR VIP is /{shortest}"
                         f" or longer for IPv{net.version} (got {net})")
    bad = next((n for n in _NOT_UNICAST if n.version == net.version and n.overlaps(net)), None)
    if bad is not None:
        raise ValueError(f"{net} overlaps {bad}: a CIDR VIP must hold unicast addresses only")
    return str(net)


def _none_is_empty(value: Any) -> Any:
    """``reals:`` with nothing after it is null in YAML; read it as an empty list."""
    return [] if value is None else value


def _duplicates(items: list[Any], name: str) -> list[tuple[str, str]]:
    """One problem per repeated item, naming the first occurrence."""
    first: dict[Any, int] = {}
    out = []
    for i, item in enumerate(items):
        if item in first:
            out.append((f"{name}[{i}]", f"duplicate of {name}[{first[item]}] ({item})"))
        else:
            first[item] = i
    return out


Address = Annotated[str, PlainValidator(_canonical_ip)]
VipAddress = Annotated[str, PlainValidator(_canonical_vip_address)]
Prefix = Annotated[str, PlainValidator(_canonical_prefix)]
Mac = Annotated[str, PlainValidator(_mac)]
Flag = Annotated[str, AfterValidator(_flag)]

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- models --------------------------------------------------------------------------


class GueSettings(BaseModel):
    """GUE encapsulation: outer UDP destination port and outer source addresses."""

    model_config = _STRICT

    port: Annotated[int, int_range(1, 65535)] = GUE_DEFAULT_PORT
    source_v4: Address | None = None
    source_v6: Address | None = None

    @field_validator("source_v4")
    @classmethod
    def _v4(cls, v: str | None) -> str | None:
        if v is not None and ":" in v:
            raise ValueError(f"must be an IPv4 address (got {v})")
        return v

    @field_validator("source_v6")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f"must be an IPv6 address (got {v})")
        return v


class Settings(BaseModel):
    """Sizes and host-wide settings."""

    model_config = _STRICT

    ring_size: Annotated[
        int, Field(ge=MIN_RING_SIZE, lt=2**32), AfterValidator(_prime)
    ] = C.RING_SIZE
    max_vips: Annotated[int, Field(ge=1, lt=2**32)] = C.MAX_VIPS
    max_reals: Annotated[int, Field(ge=2, le=2**32)] = C.MAX_REALS
    conn_table_size: Annotated[
        int, Field(ge=C.CONN_TABLE_WAYS, le=2**32), AfterValidator(_power_of_two)
    ] = C.CONN_TABLE_SIZE
    gateway_mac: Mac
    encap: Literal["ipip", "gue"] = "ipip"
    gue: GueSettings = GueSettings()
    max_frame_size: Annotated[int, int_range(*MAX_FRAME_SIZE_RANGE)] = C.MAX_FRAME_SIZE
    # Path MTU towards the reals (largest outer IP packet). When set, a packet that would
    # exceed it once encapsulated is answered with ICMP "fragmentation needed" / ICMPv6
    # "packet too big" instead of being sent (docs/datapath.md). None: not checked.
    mtu: Annotated[int, int_range(C.MIN_MTU, MAX_FRAME_SIZE_RANGE[1])] | None = None
    local_addresses: Annotated[list[Address], BeforeValidator(_none_is_empty)] = []
    # Flood guard: new connections per CPU per second above which a new flow is hashed
    # without source routing and not written to the connection table, so a SYN flood
    # cannot evict established flows (docs/datapath.md). 0 turns the guard off.
    max_conn_rate: Annotated[int, int_range(0, 2**32 - 1)] = C.MAX_CONN_RATE
    # Stateless VIPs: how long (seconds) a VIP's previous ring is kept after its ring
    # changed, so connections begun before the change reach their real by the reals'
    # second chance (docs/datapath.md, "Stateless VIPs").
    second_chance_s: Annotated[int, int_range(1, 7 * 86400)] = C.SECOND_CHANCE_S

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = _duplicates(self.local_addresses, "local_addresses")
        if self.max_vips * self.ring_size >= 2**32:
            got = f"{self.max_vips} * {self.ring_size}"
            problems.append(("ring_size", f"max_vips * ring_size must be < 2**32 (got {got})"))
        if self.max_vips * self.max_reals > 2**32:  # the down set: one bit per (VIP, real)
            got = f"{self.max_vips} * {self.max_reals}"
            problems.append(("max_reals", f"max_vips * max_reals must be <= 2**32 (got {got})"))
        if problems:
            raise _problems(problems)
        return self

    @property
    def gateway_mac_bytes(self) -> bytes:
        """The gateway MAC as 6 bytes."""
        return bytes.fromhex(self.gateway_mac.replace(":", ""))


class Real(BaseModel):
    """A backend server."""

    model_config = _STRICT

    address: Address
    weight: Annotated[int, Field(ge=0, le=MAX_WEIGHT)] = 1

    @property
    def ip(self) -> IP:
        """The address as an :mod:`ipaddress` object."""
        return ipaddress.ip_address(self.address)


class Vip(BaseModel):
    """A virtual service: (address, port, protocol) balanced over its reals. The address
    may be a prefix (a CIDR VIP): the VIP then serves every address inside it
    (docs/datapath.md, "The flow")."""

    model_config = _STRICT

    address: VipAddress
    port: Annotated[int, int_range(0, 65535)]  # 0 = any port
    protocol: Literal["tcp", "udp"]
    hash: Literal["maglev", "maglev_v2"] = "maglev_v2"
    flags: Annotated[list[Flag], BeforeValidator(_none_is_empty)] = []
    reals: Annotated[list[Real], BeforeValidator(_none_is_empty)] = []  # empty: traffic is dropped
    healthcheck: HealthCheck | None = None  # probes of the reals (lb/healthcheck_config.py)

    @model_validator(mode="after")
    def _check(self) -> Vip:
        problems = _duplicates(self.flags, "flags")
        problems += [
            (f"{p}.address", m) for p, m in _duplicates([r.address for r in self.reals], "reals")
        ]
        if problems:
            raise _problems(problems)
        return self

    @property
    def ip(self) -> IP:
        """The address as an :mod:`ipaddress` object (of a CIDR VIP: its prefix's first
        address)."""
        return self.network.network_address

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The addresses the VIP serves: its prefix, or its one address as a /32 or /128."""
        return ipaddress.ip_network(self.address)

    @property
    def is_prefix(self) -> bool:
        """A CIDR VIP: the address is a prefix."""
        return "/" in self.address

    @property
    def flag_bits(self) -> int:
        """The flags as Katran's bit mask."""
        bits = 0
        for name in self.flags:
            bits |= C.VIP_FLAGS[name]
        return bits

    @property
    def key(self) -> tuple[str, int, str]:
        """What makes a VIP unique: (address, port, protocol)."""
        return (self.address, self.port, self.protocol)


class QuicServer(BaseModel):
    """A QUIC server id (as the real embeds it in its connection ids) and its real."""

    model_config = _STRICT

    id: Annotated[int, int_range(1, C.MAX_QUIC_SERVER_ID)]
    real: Address


class SourceRoute(BaseModel):
    """Clients in ``prefix`` go to ``real`` on VIPs flagged src_routing (before hashing)."""

    model_config = _STRICT

    prefix: Prefix
    real: Address


class Config(BaseModel):
    """The whole configuration."""

    model_config = _STRICT

    settings: Settings
    vips: Annotated[list[Vip], BeforeValidator(_none_is_empty)] = []
    quic_servers: Annotated[list[QuicServer], BeforeValidator(_none_is_empty)] = []
    source_routes: Annotated[list[SourceRoute], BeforeValidator(_none_is_empty)] = []

    @model_validator(mode="after")
    def _check(self) -> Config:
        problems = _limits(self) + _encap(self) + _routing_tables(self) + _mtu(self)
        first: dict[tuple[str, int, str], int] = {}
        for i, vip in enumerate(self.vips):
            if vip.key in first:
                addr, port, proto = vip.key
                what = f"duplicate of vips[{first[vip.key]}] ({addr} port {port} {proto})"
                problems.append((f"vips[{i}]", what))
            first.setdefault(vip.key, i)
            if "quic" in vip.flags and vip.protocol != "udp":
                where = f"vips[{i}].flags[{vip.flags.index('quic')}]"
                problems.append((where, f"'quic' needs protocol udp (got {vip.protocol})"))
            if "migrate_down_tcp" in vip.flags and vip.protocol != "tcp":
                where = f"vips[{i}].flags[{vip.flags.index('migrate_down_tcp')}]"
                problems.append((where, f"'migrate_down_tcp' needs protocol tcp (got {vip.protocol};"
                                        " UDP flows always leave a down real)"))
            if "local" in vip.flags and not self.settings.local_addresses:
                where = f"vips[{i}].flags[{vip.flags.index('local')}]"
                problems.append((where, "'local' needs settings.local_addresses, which is empty"))
            if "stateless" in vip.flags:
                problems += _stateless(self, i, vip)
        if problems:
            raise _problems(problems)
        return self


def _stateless(cfg: Config, i: int, vip: Vip) -> list[tuple[str, str]]:
    """A stateless VIP's hop list is a GUE header whose addresses are in the outer
    header's family: it needs encap gue and reals of one family."""
    where = f"vips[{i}].flags[{vip.flags.index('stateless')}]"
    out = []
    if cfg.settings.encap != "gue":
        out.append((where, f"'stateless' needs settings.encap: gue (got {cfg.settings.encap})"))
    versions = {r.ip.version for r in vip.reals}
    if len(versions) > 1:
        why = "a stateless VIP's reals must all be IPv4 or all IPv6 (the hop list carries addresses of one family)"
        out.append((f"vips[{i}].reals", why))
    return out


def _limits(cfg: Config) -> list[tuple[str, str]]:
    """VIPs and distinct reals must fit the tables."""
    s, out = cfg.settings, []
    if len(cfg.vips) > s.max_vips:
        out.append(("vips", f"{len(cfg.vips)} VIPs but settings.max_vips is {s.max_vips}"))
    n = len({r.address for v in cfg.vips for r in v.reals})
    if n > s.max_reals - 1:
        out.append(
            (
                "vips",
                f"{n} distinct real addresses but settings.max_reals = {s.max_reals}"
                f" allows {s.max_reals - 1} (ids 1..max_reals-1)",
            )
        )
    return out


def _encap(cfg: Config) -> list[tuple[str, str]]:
    """Every real must be reachable with the chosen encapsulation."""
    s, out = cfg.settings, []
    needs_source: dict[int, str] = {}  # IP version -> first real needing a GUE source
    for i, vip in enumerate(cfg.vips):
        for j, real in enumerate(vip.reals):
            version = real.ip.version
            if s.encap == "gue":
                needs_source.setdefault(version, f"vips[{i}].reals[{j}] ({real.address})")
            elif vip.ip.version == 6 and version == 4:
                out.append(
                    (
                        f"vips[{i}].reals[{j}].address",
                        f"IPv4 real {real.address} behind IPv6 VIP {vip.address}: ipip can't"
                        " carry IPv6 in IPv4; use an IPv6 real or encap: gue",
                    )
                )
    for version, key in ((4, "source_v4"), (6, "source_v6")):
        if version in needs_source and getattr(s.gue, key) is None:
            what = f"required with encap gue: {needs_source[version]} is an IPv{version} real"
            out.append((f"settings.gue.{key}", what))
    return out


def _mtu(cfg: Config) -> list[tuple[str, str]]:
    """IPv6 hosts never go below 1280: with IPv6 VIPs the inner packet must fit that."""
    s = cfg.settings
    first_v6 = next((i for i, v in enumerate(cfg.vips) if v.ip.version == 6), None)
    need = C.MIN_MTU + C.ENCAP_IPV6_OVERHEAD + (C.UDP_HLEN if s.encap == "gue" else 0)
    if not s.mtu or first_v6 is None or s.mtu >= need:
        return []
    return [("settings.mtu", f"must be >= {need} with IPv6 VIPs (vips[{first_v6}]):"
             f" IPv6 clients need 1280 bytes inside the tunnel (got {s.mtu})")]


def _routing_tables(cfg: Config) -> list[tuple[str, str]]:
    """quic_servers and source_routes: unique keys, sizes, and reals that exist."""
    reals = {r.address for v in cfg.vips for r in v.reals}
    out = _duplicates([q.id for q in cfg.quic_servers], "quic_servers")
    out = [(f"{p}.id", m) for p, m in out]
    out += [(f"{p}.prefix", m) for p, m in _duplicates([r.prefix for r in cfg.source_routes],
                                                       "source_routes")]
    if len(cfg.quic_servers) > C.MAX_QUIC_SERVER_IDS:
        out.append(("quic_servers", f"{len(cfg.quic_servers)} entries, at most {C.MAX_QUIC_SERVER_IDS}"))
    for version in (4, 6):
        n = sum(1 for r in cfg.source_routes if ipaddress.ip_network(r.prefix).version == version)
        if n > C.MAX_SRC_ROUTES:
            out.append(("source_routes", f"{n} IPv{version} prefixes, at most {C.MAX_SRC_ROUTES}"))
    for section, items in (("quic_servers", cfg.quic_servers), ("source_routes", cfg.source_routes)):
        for i, item in enumerate(items):
            if item.real not in reals:
                out.append((f"{section}[{i}].real", f"{item.real} is not a real of any VIP"))
    for i, route in enumerate(cfg.source_routes):
        if (cfg.settings.encap == "ipip" and ipaddress.ip_network(route.prefix).version == 6
                and ipaddress.ip_address(route.real).version == 4):
            out.append((f"source_routes[{i}].real", f"IPv4 real {route.real} for IPv6 clients"
                        f" {route.prefix}: ipip can't carry IPv6 in IPv4; use an IPv6 real or encap: gue"))
    return out


# --- pydantic errors -> ConfigError ----------------------------------------------------

_MODEL_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Config,
    ("settings",): Settings,
    ("settings", "gue"): GueSettings,
    ("vips",): Vip,
    ("vips", "reals"): Real,
    ("quic_servers",): QuicServer,
    ("source_routes",): SourceRoute,
    ("vips", "healthcheck"): HealthCheck,
    ("vips", "healthcheck", "http"): HttpCheck,
    ("vips", "healthcheck", "udp"): UdpCheck,
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or TOP


def _unknown_key(loc: tuple[Any, ...]) -> str:
    model = _MODEL_AT.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
    if model is None:
        return "unknown key"
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; valid keys: {', '.join(valid)}"


_BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def _message(err: Any) -> str:
    t, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if t == "missing":
        return "required"
    if t == "extra_forbidden":
        return _unknown_key(err["loc"])
    if t == "value_error":
        return str(ctx.get("error", err["msg"]))
    if t in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer (got {_show(got)})"
    if t == "string_type":
        return f"must be a string (got {_show(got)})"
    if t == "list_type":
        return f"must be a list (got {_show(got)})"
    if t in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping (got {_show(got)})"
    if t == "literal_error":
        return f"must be one of: {ctx.get('expected', '').replace(' or ', ', ')} (got {_show(got)})"
    if t in _BOUNDS:
        limit = next(iter(ctx.values()), "?")
        return f"must be {_BOUNDS[t]} {limit} (got {_show(got)})"
    return str(err["msg"])


def _convert(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "lb_problems":
            base = _path(loc)
            for rel, msg in err["ctx"]["problems"]:
                out.append((rel if base == TOP else f"{base}.{rel}", msg))
        elif err["type"] in ("extra_forbidden", "invalid_key") and not isinstance(loc[-1], str):
            out.append((_path(loc[:-1]), f"keys must be strings (got {_show(loc[-1])})"))
        else:
            out.append((_path(loc), _message(err)))
    return out


# --- public API -------------------------------------------------------------------------


def parse_config(data: dict[str, Any], source: str | None = None) -> Config:
    """Validate a decoded document (e.g. from YAML). Raises :class:`ConfigError`."""
    if not isinstance(data, dict):
        kind = "an empty document" if data is None else _show(data)
        msg = f"must be a mapping with keys settings, vips (got {kind})"
        raise ConfigError([(TOP, msg)], source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_convert(exc), source) from None


class _Loader(yaml.SafeLoader):
    """Safe loader that refuses a key repeated in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "YAML"
    return (where, f"invalid YAML: {problem}")


def parse_config_yaml(text: str, source: str | None = None) -> Config:
    """Parse YAML text into a :class:`Config`. Raises :class:`ConfigError`."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)], source) from None
    return parse_config(data, source)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Raises :class:`ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(TOP, f"cannot read {path}: {exc}")], str(path)) from None
    return parse_config_yaml(text, str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (addresses as strings) that :func:`parse_config` reads back to ``cfg``."""
    return cfg.model_dump(mode="json", exclude_none=True)


def dump_config_yaml(cfg: Config) -> str:
    """The config as YAML, keys in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
