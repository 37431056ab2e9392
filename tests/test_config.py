"""Tests for lb.config: the YAML config model, its validation and its error messages."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb import constants as C
from lb.config import (
    GUE_DEFAULT_PORT,
    Config,
    ConfigError,
    config_to_dict,
    dump_config_yaml,
    load_config,
    parse_config,
    parse_config_yaml,
)

from fixtures import CONTRACT_YAML  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = CONTRACT_YAML


def base() -> dict[str, Any]:
    """A fresh, valid document to break in one place."""
    return yaml.safe_load(EXAMPLE)


def errors_of(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def assert_error(data: Any, path: str, *fragments: str) -> None:
    """``data`` is rejected with an error at ``path`` whose message has every fragment."""
    errs = errors_of(data)
    msgs = [m for p, m in errs if p == path]
    assert msgs, f"no error at {path}: {errs}"
    assert any(all(f in m for f in fragments) for m in msgs), f"{path}: {msgs}"


# --- loading ---------------------------------------------------------------------------


def test_example_loads_with_values_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(EXAMPLE)
    cfg = load_config(f)
    s = cfg.settings
    assert (s.ring_size, s.max_vips, s.gateway_mac, s.encap) == (65537, 512, "00:00:de:ad:be:af", "ipip")
    assert s.max_reals == C.MAX_REALS
    assert s.conn_table_size == C.CONN_TABLE_SIZE
    assert s.max_frame_size == C.MAX_FRAME_SIZE
    assert s.local_addresses == []
    assert s.gue.port == GUE_DEFAULT_PORT and s.gue.source_v4 is None and s.gue.source_v6 is None
    assert s.gateway_mac_bytes == bytes([0, 0, 0xDE, 0xAD, 0xBE, 0xAF])
    [vip] = cfg.vips
    assert (vip.address, vip.port, vip.protocol) == ("10.200.1.1", 80, "tcp")
    assert (vip.hash, vip.flags) == ("maglev", [])
    assert vip.ip == ipaddress.IPv4Address("10.200.1.1")
    assert vip.flag_bits == 0
    assert [(r.ip, r.weight) for r in vip.reals] == [
        (ipaddress.IPv4Address("10.0.0.1"), 1),
        (ipaddress.IPv4Address("10.0.0.2"), 1),
    ]


def test_defaults_of_a_minimal_vip() -> None:
    cfg = parse_config(
        {
            "settings": {"gateway_mac": "02:00:00:00:00:01"},
            "vips": [{"address": "10.0.0.9", "port": 0, "protocol": "udp"}],
        }
    )
    s = cfg.settings
    assert s.ring_size == C.RING_SIZE and s.max_vips == C.MAX_VIPS
    vip = cfg.vips[0]
    assert vip.hash == "maglev_v2" and vip.flags == [] and vip.reals == []


def test_null_lists_are_empty() -> None:
    cfg = parse_config_yaml('settings: {gateway_mac: "02:00:00:00:00:01"}\nvips:\n')
    assert cfg.vips == []


def test_normalisation() -> None:
    d = base()
    d["settings"]["gateway_mac"] = "00:00:DE:AD:BE:AF"
    d["vips"][0]["address"] = "2001:DB8:0:0::1"
    d["vips"][0]["reals"] = [{"address": "2001:db8:0000::2"}]
    cfg = parse_config(d)
    assert cfg.settings.gateway_mac == "00:00:de:ad:be:af"
    assert cfg.vips[0].address == "2001:db8::1"
    assert cfg.vips[0].reals[0].address == "2001:db8::2"
    assert cfg.vips[0].reals[0].weight == 1


def test_flag_bits() -> None:
    d = base()
    d["settings"]["local_addresses"] = ["10.0.0.1"]
    d["vips"][0]["flags"] = ["no_src_port", "local", "dport_only", "lru_bypass"]
    vip = parse_config(d).vips[0]
    assert vip.flag_bits == C.F_NO_SRC_PORT | C.F_LOCAL | C.F_DPORT_ONLY | C.F_LRU_BYPASS


def test_example_file_loads() -> None:
    cfg = load_config(ROOT / "examples" / "lb.yaml")
    v4, v6 = cfg.vips
    assert v4.address == "198.18.100.1" and len(v4.reals) == 3
    assert all(r.ip in ipaddress.ip_network("198.18.0.0/15") for r in v4.reals)
    assert v6.ip in ipaddress.ip_network("2001:db8::/32")
    assert all(r.ip.version == 6 for r in v6.reals)
    assert parse_config(config_to_dict(cfg)) == cfg


def test_round_trip() -> None:
    d = base()
    d["settings"].update(
        encap="gue", gue={"source_v4": "10.9.9.9", "port": 7000}, local_addresses=["10.0.0.2"]
    )
    d["vips"][0]["flags"] = ["local"]
    reals = [{"address": "10.0.0.3", "weight": 0}]
    d["vips"].append({"address": "10.200.1.1", "port": 53, "protocol": "udp", "reals": reals})
    cfg = parse_config(d)
    plain = config_to_dict(cfg)
    assert plain["vips"][0]["reals"][0]["address"] == "10.0.0.1"
    assert parse_config(plain) == cfg
    assert parse_config_yaml(dump_config_yaml(cfg)) == cfg


def test_round_trip_mac_that_yaml_would_read_as_a_number() -> None:
    d = base()
    d["settings"]["gateway_mac"] = "52:54:00:12:34:56"
    cfg = parse_config(d)
    assert parse_config_yaml(dump_config_yaml(cfg)) == cfg


# --- one test per rule -------------------------------------------------------------------


def test_bad_vip_address() -> None:
    d = base()
    d["vips"][0]["address"] = "10.200.1.300"
    assert_error(d, "vips[0].address", "not an IPv4 or IPv6 address", "'10.200.1.300'")


def test_bad_real_address() -> None:
    d = base()
    d["vips"][0]["reals"][1]["address"] = "nope"
    assert_error(d, "vips[0].reals[1].address", "not an IPv4 or IPv6 address")


def test_address_must_be_a_string() -> None:
    d = base()
    d["vips"][0]["address"] = 167772161  # would silently be 10.0.0.1 to ipaddress
    assert_error(d, "vips[0].address", "must be an IP address string", "167772161")


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255"])
def test_vip_address_must_be_unicast(addr: str) -> None:
    d = base()
    d["vips"][0]["address"] = addr
    assert_error(d, "vips[0].address", "must be a unicast address")


# --- CIDR VIPs ------------------------------------------------------------------------------


def test_cidr_vips_load_canonical_beside_exact_vips() -> None:
    d = base()
    d["vips"] += [{"address": " 198.18.64.0/24", "port": 80, "protocol": "tcp"},
                  {"address": "198.18.64.128/25", "port": 80, "protocol": "tcp"},  # nested: fine
                  {"address": "198.18.64.7", "port": 80, "protocol": "tcp"},  # inside a prefix: fine
                  {"address": "198.18.64.0/24", "port": 0, "protocol": "tcp"},
                  {"address": "2001:DB8:64:0::/48", "port": 53, "protocol": "udp"}]
    cfg = parse_config(d)
    assert [v.address for v in cfg.vips[1:]] == ["198.18.64.0/24", "198.18.64.128/25", "198.18.64.7",
                                                 "198.18.64.0/24", "2001:db8:64::/48"]
    assert [v.is_prefix for v in cfg.vips] == [False, True, True, False, True, True]
    assert str(cfg.vips[1].ip) == "198.18.64.0" and cfg.vips[5].network.prefixlen == 48
    assert parse_config(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(("addr", "fragments"), [
    ("198.18.64.1/24", ("host bits set in 198.18.64.1/24", "did you mean 198.18.64.0/24")),
    ("198.18.64.1/32", ("a /32 is one address", "write it as 198.18.64.1")),
    ("2001:db8::1/128", ("a /128 is one address", "write it as 2001:db8::1")),
    ("198.0.0.0/7", ("/7 is too short", f"/{C.VIP_PREFIX_MIN_V4} or longer for IPv4")),
    ("2000::/15", ("/15 is too short", f"/{C.VIP_PREFIX_MIN_V6} or longer for IPv6")),
    ("224.0.0.0/8", ("overlaps 224.0.0.0/4", "unicast")),
    ("0.0.0.0/8", ("overlaps 0.0.0.0/8",)),
    ("255.255.255.0/24", ("overlaps 255.255.255.255/32",)),
    ("ff00::/16", ("overlaps ff00::/8",)),
    ("::ffff:0:0/112", ("overlaps ::ffff:0:0/96",)),
    ("198.18.64.0/33", ("not an IPv4 or IPv6 prefix",)),
    ("198.18.64.0/", ("not an IPv4 or IPv6 prefix",)),
])
def test_bad_cidr_vip(addr: str, fragments: tuple[str, ...]) -> None:
    d = base()
    d["vips"][0]["address"] = addr
    assert_error(d, "vips[0].address", *fragments)


def test_duplicate_cidr_vip() -> None:
    d = base()
    d["vips"] += [{"address": "198.18.64.0/24", "port": 80, "protocol": "tcp"},
                  {"address": "198.18.64.0/24", "port": 80, "protocol": "tcp"}]
    assert_error(d, "vips[2]", "duplicate of vips[1]", "198.18.64.0/24 port 80 tcp")


def test_cidr_vip_counts_towards_max_vips_and_its_family_towards_ipip() -> None:
    d = base()
    d["settings"]["max_vips"] = 1
    d["vips"].append({"address": "198.18.64.0/24", "port": 80, "protocol": "tcp"})
    assert_error(d, "vips", "2 VIPs but settings.max_vips is 1")
    d = base()
    d["vips"][0]["address"] = "2001:db8:64::/48"
    assert_error(d, "vips[0].reals[0].address", "IPv4 real 10.0.0.1 behind IPv6 VIP", "ipip")


def test_port_out_of_range() -> None:
    d = base()
    d["vips"][0]["port"] = 70000
    errs = errors_of(d)
    assert ("vips[0].port", "must be 0..65535 (got 70000)") in errs


def test_port_wrong_type() -> None:
    d = base()
    d["vips"][0]["port"] = "http"
    assert_error(d, "vips[0].port", "must be an integer", "'http'")
    d["vips"][0]["port"] = True  # YAML `yes`
    assert_error(d, "vips[0].port", "must be an integer", "true")


def test_protocol() -> None:
    d = base()
    d["vips"][0]["protocol"] = "sctp"
    assert_error(d, "vips[0].protocol", "must be one of", "tcp", "udp", "'sctp'")


def test_hash() -> None:
    d = base()
    d["vips"][0]["hash"] = "ring"
    assert_error(d, "vips[0].hash", "must be one of", "maglev_v2")


def test_negative_weight() -> None:
    d = base()
    d["vips"][0]["reals"][1]["weight"] = -1
    assert ("vips[0].reals[1].weight", "must be >= 0 (got -1)") in errors_of(d)


def test_weight_too_big() -> None:
    d = base()
    d["vips"][0]["reals"][0]["weight"] = 2**32
    assert_error(d, "vips[0].reals[0].weight", "must be <= 4294967295")


def test_ring_size_not_prime() -> None:
    d = base()
    d["settings"]["ring_size"] = 65536
    assert ("settings.ring_size", "65536 is not prime") in errors_of(d)


def test_ring_size_too_small() -> None:
    d = base()
    d["settings"]["ring_size"] = 7
    assert_error(d, "settings.ring_size", "must be >=")


def test_ring_size_times_max_vips() -> None:
    d = base()
    d["settings"]["ring_size"] = 16777259  # prime, 512 * it >= 2**32
    assert_error(d, "settings.ring_size", "max_vips * ring_size must be < 2**32")


def test_max_vips_times_max_reals() -> None:
    """The down set holds a bit per (VIP number, real id): at most 2**32 of them."""
    d = base()
    d["settings"].update(max_vips=2**16, max_reals=2**16 + 1, ring_size=13)
    assert_error(d, "settings.max_reals", "max_vips * max_reals must be <= 2**32", "65536 * 65537")
    d["settings"]["max_reals"] = 2**16
    parse_config(d)


def test_conn_table_size_power_of_two() -> None:
    d = base()
    d["settings"]["conn_table_size"] = 1000
    assert_error(d, "settings.conn_table_size", "power of two", "1000")
    d["settings"]["conn_table_size"] = C.CONN_TABLE_WAYS // 2
    assert_error(d, "settings.conn_table_size", f"must be >= {C.CONN_TABLE_WAYS}")


def test_max_frame_size() -> None:
    d = base()
    d["settings"]["max_frame_size"] = 10000
    assert_error(d, "settings.max_frame_size", "must be 64..9216 (got 10000)")


def test_max_vips_and_max_reals_minimums() -> None:
    d = base()
    d["settings"].update(max_vips=0, max_reals=1)
    assert_error(d, "settings.max_vips", "must be >= 1")
    assert_error(d, "settings.max_reals", "must be >= 2")


def test_duplicate_vip() -> None:
    d = base()
    d["vips"].append(copy.deepcopy(d["vips"][0]))
    assert_error(d, "vips[1]", "duplicate of vips[0]", "10.200.1.1 port 80 tcp")


def test_same_address_other_port_or_protocol_is_fine() -> None:
    d = base()
    d["vips"].append({**copy.deepcopy(d["vips"][0]), "protocol": "udp"})
    d["vips"].append({**copy.deepcopy(d["vips"][0]), "port": 443})
    assert len(parse_config(d).vips) == 3


def test_duplicate_real_in_vip() -> None:
    d = base()
    d["vips"][0]["reals"].append({"address": "10.0.0.1"})
    assert_error(d, "vips[0].reals[2].address", "duplicate of reals[0]")


def test_too_many_vips() -> None:
    d = base()
    d["settings"]["max_vips"] = 1
    d["vips"].append({"address": "10.200.1.2", "port": 80, "protocol": "tcp"})
    assert_error(d, "vips", "2 VIPs but settings.max_vips is 1")


def test_too_many_reals() -> None:
    d = base()
    d["settings"]["max_reals"] = 2  # one usable id
    assert_error(d, "vips", "2 distinct real addresses", "allows 1")
    d["vips"][0]["reals"].pop()
    reals = [{"address": "10.0.0.1"}]
    d["vips"].append({"address": "10.200.1.2", "port": 80, "protocol": "tcp", "reals": reals})
    parse_config(d)  # the same real behind two VIPs uses one id


def test_v4_real_on_v6_vip_with_ipip() -> None:
    d = base()
    d["vips"][0]["address"] = "2001:db8::1"
    assert_error(d, "vips[0].reals[0].address", "IPv4 real 10.0.0.1 behind IPv6 VIP", "ipip")


def test_v6_real_on_v4_vip_with_ipip_is_fine() -> None:
    d = base()
    d["vips"][0]["reals"] = [{"address": "2001:db8::2"}]
    parse_config(d)


def test_gue_needs_source_v6_for_v6_real() -> None:
    d = base()
    d["settings"].update(encap="gue", gue={"source_v4": "10.9.9.9"})
    d["vips"][0]["reals"].append({"address": "2001:db8::7"})
    assert_error(d, "settings.gue.source_v6", "required with encap gue", "vips[0].reals[2]", "IPv6")
    d["settings"]["gue"]["source_v6"] = "2001:db8::fe"
    d["vips"][0]["address"] = "2001:db8::1"  # v4 real behind v6 VIP: fine with GUE
    parse_config(d)


def test_gue_needs_source_v4_for_v4_real() -> None:
    d = base()
    d["settings"]["encap"] = "gue"
    assert_error(d, "settings.gue.source_v4", "required with encap gue", "IPv4")


def test_gue_source_family() -> None:
    d = base()
    d["settings"]["gue"] = {"source_v4": "2001:db8::1", "source_v6": "10.0.0.1", "port": 0}
    assert_error(d, "settings.gue.source_v4", "must be an IPv4 address")
    assert_error(d, "settings.gue.source_v6", "must be an IPv6 address")
    assert_error(d, "settings.gue.port", "must be 1..65535 (got 0)")


def test_unknown_flag() -> None:
    d = base()
    d["vips"][0]["flags"] = ["no_src_port", "fast"]
    assert_error(d, "vips[0].flags[1]", "unknown flag 'fast'", *C.VIP_FLAGS)


def test_duplicate_flag() -> None:
    d = base()
    d["vips"][0]["flags"] = ["lru_bypass", "lru_bypass"]
    assert_error(d, "vips[0].flags[1]", "duplicate of flags[0]")


def test_local_flag_needs_local_addresses() -> None:
    d = base()
    d["vips"][0]["flags"] = ["local"]
    assert_error(d, "vips[0].flags[0]", "settings.local_addresses")


def test_migrate_down_tcp_is_for_tcp_vips() -> None:
    d = base()
    d["vips"][0]["flags"] = ["migrate_down_tcp"]
    assert parse_config(d).vips[0].flag_bits == C.F_MIGRATE_DOWN_TCP
    d["vips"][0]["protocol"] = "udp"
    assert_error(d, "vips[0].flags[0]", "'migrate_down_tcp' needs protocol tcp")


def test_max_conn_rate() -> None:
    d = base()
    assert parse_config(d).settings.max_conn_rate == C.MAX_CONN_RATE == 125_000
    d["settings"]["max_conn_rate"] = 0  # the flood guard off
    from lb.datapath_tables import compile_tables

    assert compile_tables(parse_config(d)).ctl[0]["max_conn_rate"] == 0
    for bad, msg in ((-1, "must be 0..4294967295"), (2**32, "must be 0..4294967295"),
                     ("100", "integer"), (1.5, "integer"), (True, "integer")):
        d["settings"]["max_conn_rate"] = bad
        assert_error(d, "settings.max_conn_rate", msg)


def test_duplicate_local_address() -> None:
    d = base()
    d["settings"]["local_addresses"] = ["10.0.0.1", "10.0.0.1"]
    assert_error(d, "settings.local_addresses[1]", "duplicate of local_addresses[0]")


@pytest.mark.parametrize(
    "where, path",
    [
        (lambda d: d, "vipz"),
        (lambda d: d["settings"], "settings.vipz"),
        (lambda d: d["settings"].setdefault("gue", {}), "settings.gue.vipz"),
        (lambda d: d["vips"][0], "vips[0].vipz"),
        (lambda d: d["vips"][0]["reals"][1], "vips[0].reals[1].vipz"),
    ],
)
def test_unknown_key_at_every_level(where, path: str) -> None:
    d = base()
    where(d)["vipz"] = 1
    assert_error(d, path, "unknown key")


def test_typo_suggests_the_key() -> None:
    d = base()
    d["settings"]["rign_size"] = d["settings"].pop("ring_size")
    assert_error(d, "settings.rign_size", "unknown key", "did you mean 'ring_size'?")
    d = base()
    d["vips"][0]["reals"][0]["wieght"] = 2
    assert_error(d, "vips[0].reals[0].wieght", "did you mean 'weight'?")


def test_missing_keys() -> None:
    d = base()
    del d["settings"]["gateway_mac"]
    del d["vips"][0]["port"]
    errs = errors_of(d)
    assert ("settings.gateway_mac", "required") in errs
    assert ("vips[0].port", "required") in errs
    assert ("settings", "required") in errors_of({"vips": []})


@pytest.mark.parametrize(
    "mac",
    ["00:00:de:ad:be", "00-00-de-ad-be-af", "00:00:de:ad:be:ag", "00:00:00:00:00:00", "01:00:5E:00:00:01"],
)
def test_bad_mac(mac: str) -> None:
    d = base()
    d["settings"]["gateway_mac"] = mac
    assert_error(d, "settings.gateway_mac", mac.lower() if mac.count(":") == 5 else mac)


def test_unquoted_mac_read_as_number_by_yaml() -> None:
    text = EXAMPLE.replace('"00:00:de:ad:be:af"', "52:54:00:12:34:56")
    with pytest.raises(ConfigError) as info:
        parse_config_yaml(text)
    [(path, msg)] = info.value.errors
    assert path == "settings.gateway_mac"
    assert "quoted" in msg and '"52:54:00:12:34:56"' in msg


def test_yaml_syntax_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("settings:\n  ring_size: [1, 2\nvips: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    [(path, msg)] = info.value.errors
    assert path.startswith("line 3, column")
    assert "invalid YAML" in msg
    assert str(f) in str(info.value)


def test_yaml_duplicate_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_yaml(EXAMPLE + "settings: {}\n")
    assert info.value.errors == [("line 15, column 1", "invalid YAML: duplicate key 'settings'")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "a list"), ("", "an empty document"), ("42\n", "42")])
def test_top_level_not_a_mapping(text: str, got: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_yaml(text)
    [(path, msg)] = info.value.errors
    assert path == "(top level)"
    assert "must be a mapping" in msg and got in msg


def test_wrong_container_types() -> None:
    errs = errors_of({"settings": "fast", "vips": {"a": 1}})
    assert ("settings", "must be a mapping (got 'fast')") in errs
    assert ("vips", "must be a list (got a mapping)") in errs
    errs = errors_of({"settings": base()["settings"], "vips": [None, 5]})
    assert ("vips[0]", "must be a mapping (got null)") in errs
    assert ("vips[1]", "must be a mapping (got 5)") in errs


def test_non_string_key() -> None:
    d = base()
    d["vips"][0][1] = "x"
    assert_error(d, "vips[0]", "keys must be strings (got 1)")


def test_several_errors_all_reported() -> None:
    d = base()
    d["settings"]["ring_size"] = 65536
    d["settings"]["gateway_mac"] = "nope"
    d["vips"][0]["port"] = 70000
    d["vips"][0]["reals"][1]["weight"] = -1
    d["vips"][0]["flags"] = ["turbo"]
    d["vips"][0]["typo"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(d)
    paths = [p for p, _ in info.value.errors]
    assert paths == [
        "settings.ring_size",
        "settings.gateway_mac",
        "vips[0].port",
        "vips[0].flags[0]",
        "vips[0].reals[1].weight",
        "vips[0].typo",
    ]
    text = str(info.value)
    assert text.startswith("invalid config (6 errors)")
    for line in (
        "settings.ring_size: 65536 is not prime",
        "vips[0].port: must be 0..65535 (got 70000)",
        "vips[0].reals[1].weight: must be >= 0 (got -1)",
    ):
        assert f"\n  {line}" in text
    assert "pydantic" not in text and "Input should" not in text


def test_several_cross_field_errors_all_reported() -> None:
    d = base()
    d["vips"].append(copy.deepcopy(d["vips"][0]))
    d["vips"][0]["flags"] = ["local"]
    d["settings"]["max_vips"] = 1
    paths = {p for p, _ in errors_of(d)}
    assert {"vips[1]", "vips", "vips[0].flags[0]"} <= paths


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    e = ConfigError([("a.b", "bad")], "f.yaml")
    assert str(e) == "f.yaml: invalid config (1 error)\n  a.b: bad"


def test_models_are_frozen() -> None:
    cfg = parse_config(base())
    with pytest.raises(Exception):
        cfg.settings.ring_size = 4  # type: ignore[misc]


# --- fuzzing -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**6000), max_value=10**6000),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        ["tcp", "udp", "10.0.0.1", "2001:db8::1", "ff02::1", "local", "quic", "gue", "ipip", "maglev"]
    ),
    st.binary(max_size=4),
)
keys = st.one_of(
    st.sampled_from(["settings", "vips", "reals", "address", "port", "weight", "flags", "gue", "ring_size"]),
    st.text(max_size=8),
    st.integers(),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=25,
)


def _mutate(doc: Any, path: list[Any], value: Any) -> Any:
    """Replace (or add) the value at a path of the valid example."""
    node = doc
    for step in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(step, {}) if isinstance(step, str) else node
        elif isinstance(node, list) and node:
            node = node[step % len(node)] if isinstance(step, int) else node[0]
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and node:
        node[last % len(node) if isinstance(last, int) else 0] = value
    return doc


paths = st.lists(
    st.one_of(
        st.sampled_from(["settings", "vips", "reals", "address", "port", "weight", "flags", "gue", "hash"]),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=5,
)


def _only_config_error(data: Any) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError as e:
        assert e.errors and all(isinstance(p, str) and isinstance(m, str) for p, m in e.errors)
        str(e)
        return
    assert isinstance(cfg, Config)
    assert parse_config(config_to_dict(cfg)) == cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk)
def test_fuzz_random_junk(data: Any) -> None:
    _only_config_error(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths, junk)
def test_fuzz_mutated_example(path: list[Any], value: Any) -> None:
    _only_config_error(_mutate(base(), path, value))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_yaml_text(text: str) -> None:
    try:
        parse_config_yaml(text)
    except ConfigError:
        pass


def test_readme_example_is_the_example_file() -> None:
    doc = (ROOT / "README.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT / "examples" / "lb.yaml").read_text()
    parse_config_yaml(block)


# --- QUIC server ids, source routes, mtu ------------------------------------------------


def routed() -> dict[str, Any]:
    """base() with a QUIC VIP and both routing tables filled."""
    d = base()
    d["vips"].append({"address": "10.200.1.2", "port": 443, "protocol": "udp", "flags": ["quic", "src_routing"],
                      "reals": [{"address": "10.0.0.1"}, {"address": "10.0.0.3"}]})
    d["vips"].append({"address": "2001:db8:100::1", "port": 443, "protocol": "udp", "flags": ["src_routing"],
                      "reals": [{"address": "2001:db8:200::1"}]})
    d["quic_servers"] = [{"id": 1, "real": "10.0.0.1"}, {"id": 0xFFFFFFFF, "real": "10.0.0.3"}]
    d["source_routes"] = [{"prefix": "198.18.64.0/24", "real": "10.0.0.2"},
                          {"prefix": "2001:db8:5::/48", "real": "2001:db8:200::1"}]
    return d


def test_routing_tables_load_canonical() -> None:
    d = routed()
    d["source_routes"][1]["prefix"] = "2001:0db8:0005:0000::/48"
    cfg = parse_config(d)
    assert [(q.id, q.real) for q in cfg.quic_servers] == [(1, "10.0.0.1"), (0xFFFFFFFF, "10.0.0.3")]
    assert [r.prefix for r in cfg.source_routes] == ["198.18.64.0/24", "2001:db8:5::/48"]
    assert parse_config(config_to_dict(cfg)) == cfg  # round trip


def test_routing_tables_compile_to_real_ids() -> None:
    from lb.datapath_tables import compile_tables

    t = compile_tables(parse_config(routed()))
    ids = {str(a): i for a, i in t.real_ids.items()}
    assert sorted(t.quic_servers.tolist()) == [(1, ids["10.0.0.1"]), (0xFFFFFFFF, ids["10.0.0.3"])]
    assert t.src_routes_v6["real_id"].tolist() == [ids["2001:db8:200::1"]]
    assert t.src_routes_v4["key"]["prefixlen"].tolist() == [24]
    assert bytes(t.src_routes_v4["key"]["addr"][0]) == bytes([198, 18, 64, 0])
    assert t.src_routes_v4["real_id"].tolist() == [ids["10.0.0.2"]]
    assert t.src_routes_v6["key"]["prefixlen"].tolist() == [48]
    assert bytes(t.src_routes_v6["key"]["addr"][0]) == ipaddress.ip_address("2001:db8:5::").packed


@pytest.mark.parametrize(
    ("edit", "path", "fragment"),
    [
        (lambda d: d["quic_servers"].append({"id": 1, "real": "10.0.0.2"}), "quic_servers[2].id", "duplicate of quic_servers[0]"),
        (lambda d: d["quic_servers"].append({"id": 0, "real": "10.0.0.2"}), "quic_servers[2].id", "must be 1..4294967295"),
        (lambda d: d["quic_servers"].append({"id": 2**32, "real": "10.0.0.2"}), "quic_servers[2].id", "must be 1..4294967295"),
        (lambda d: d["quic_servers"].append({"id": 9, "real": "10.9.9.9"}), "quic_servers[2].real", "not a real of any VIP"),
        (lambda d: d["quic_servers"].append({"id": 9}), "quic_servers[2].real", "required"),
        (lambda d: d["source_routes"].append({"prefix": "198.18.64.7/24", "real": "10.0.0.2"}),
         "source_routes[2].prefix", "host bits set in 198.18.64.7/24: did you mean 198.18.64.0/24?"),
        (lambda d: d["source_routes"].append({"prefix": "198.18.64.0/24", "real": "10.0.0.1"}),
         "source_routes[2].prefix", "duplicate of source_routes[0]"),
        (lambda d: d["source_routes"].append({"prefix": "nope", "real": "10.0.0.1"}),
         "source_routes[2].prefix", "not an IPv4 or IPv6 prefix"),
        (lambda d: d["source_routes"].append({"prefix": 5, "real": "10.0.0.1"}),
         "source_routes[2].prefix", "must be a prefix string"),
        (lambda d: d["source_routes"].append({"prefix": "10.1.0.0/16", "real": "10.9.9.9"}),
         "source_routes[2].real", "not a real of any VIP"),
        (lambda d: d["vips"][1].update(protocol="tcp"), "vips[1].flags[0]", "'quic' needs protocol udp"),
        (lambda d: d["settings"].update(mtu=1279), "settings.mtu", "must be 1280..9216"),
    ],
)
def test_routing_table_errors(edit, path: str, fragment: str) -> None:
    d = routed()
    edit(d)
    assert_error(d, path, fragment)


def test_ipv6_clients_routed_to_ipv4_real_need_gue() -> None:
    d = routed()
    d["source_routes"][1]["real"] = "10.0.0.1"  # an IPv6 prefix -> IPv4 real
    assert_error(d, "source_routes[1].real", "ipip can't carry IPv6 in IPv4")
    d["settings"]["encap"] = "gue"
    d["settings"]["gue"] = {"source_v4": "198.18.0.254", "source_v6": "2001:db8::fe"}
    assert parse_config(d).source_routes[1].real == "10.0.0.1"


def test_mtu_must_leave_1280_for_ipv6_clients() -> None:
    d = routed()
    d["settings"]["mtu"] = 1300
    assert_error(d, "settings.mtu", "must be >= 1320 with IPv6 VIPs")
    d["settings"]["mtu"] = 1320
    assert parse_config(d).settings.mtu == 1320
    d["settings"].update(mtu=1320, encap="gue", gue={"source_v4": "198.18.0.254", "source_v6": "2001:db8::fe"})
    assert_error(d, "settings.mtu", "must be >= 1328")
