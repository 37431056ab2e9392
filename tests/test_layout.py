"""The C side's constants and structs are lb/constants.py and lb/layout.py, generated.

* xdp/generated/lb_shared.h is exactly what ``python -m lb.c_header`` writes today;
* every BPF program includes it, and no xdp source defines a shared name (or a number
  for one) by hand;

and the C structs and the numpy dtypes are the same bytes, two independent checks:
* static asserts generated from the dtypes (sizeof, offsetof and sizeof of every field),
  compiled by bcc's clang with the same flags as the datapath;
* bcc's own view of the loaded program's maps (the ctypes Key/Leaf types it builds from
  the compiled program's type information).
And every constant the C side is handed (STAT_*, N_STATS, F_*, ...) arrives with the
value lb.constants has, under the same name.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from lb import c_header, constants, layout
from lb.c_header import XDP_DIR, c_flags

pytestmark = [pytest.mark.bpf, pytest.mark.root]

needs_root = pytest.mark.root  # through conftest's guard: skipped as a user, a failure under CI

# Small sizes keep compile/load quick; layouts do not depend on them.
SMALL = dict(ring_size=13, max_vips=8, max_reals=16, conn_table_size=64)

# Every hand-written C file of xdp/ (the generated header lives in xdp/generated/).
C_SOURCES = sorted(p for p in XDP_DIR.iterdir() if p.suffix in (".c", ".h"))

# Maps whose key/value types are layout structs: map -> (key dtype, value dtype).
MAP_TYPES = {
    "vip_map": (layout.VIP_KEY, layout.VIP_META),
    "vip_addrs": (layout.VIP_ADDR_KEY, None),
    "reals": (None, layout.REAL),
    "vip_slots": (None, layout.VIP_SLOT),
    "lb_runtime": (None, layout.RUNTIME),
    "ctl": (None, layout.CTL),
    "conn_rates": (None, layout.CONN_RATE),
    "vip_prefixes": (layout.VIP_LPM_KEY, layout.VIP_META),
    "vip_prefix_addrs": (layout.VIP_LPM_KEY, None),
}


def _field_size(dtype: np.dtype, name: str) -> int:
    return dtype.fields[name][0].itemsize


def struct_asserts(cname: str, dtype: np.dtype) -> str:
    """_Static_assert lines for one struct: size, and offset and size of every field."""
    lines = [f'_Static_assert(sizeof(struct {cname}) == {dtype.itemsize}, '
             f'"sizeof(struct {cname}) != {dtype.itemsize}");']
    for name in dtype.names:
        off = dtype.fields[name][1]
        size = _field_size(dtype, name)
        lines.append(f'_Static_assert(__builtin_offsetof(struct {cname}, {name}) == {off}, '
                     f'"offsetof({cname}.{name}) != {off}");')
        lines.append(f'_Static_assert(sizeof(((struct {cname} *)0)->{name}) == {size}, '
                     f'"sizeof({cname}.{name}) != {size}");')
    return "\n".join(lines)


def constant_asserts() -> str:
    lines = [f'_Static_assert({name} == {value}{"ULL" if value > 0x7FFFFFFF else ""}, "{name}");'
             for name, value in c_header.shared_constants().items()]
    lines.append(f'_Static_assert(N_STATS == {constants.N_STATS}, "N_STATS");')
    for i, name in enumerate(constants.STATS):
        lines.append(f'_Static_assert(STAT_{name.upper()} == {i}, "STAT_{name.upper()}");')
    for name, bit in constants.VIP_FLAGS.items():
        lines.append(f'_Static_assert(F_{name.upper()} == {bit}, "F_{name.upper()}");')
    lines.append(f'_Static_assert(VIP_STAT_PACKETS == {constants.VIP_STAT_PACKETS}, "pk");')
    lines.append(f'_Static_assert(VIP_STAT_BYTES == {constants.VIP_STAT_BYTES}, "by");')
    lines.append(f'_Static_assert(ETH_P_8021Q == {constants.ETH_P_8021Q}, "8021q");')
    lines.append(f'_Static_assert(IP_MF == {constants.IP_MF}, "mf");')
    lines.append(f'_Static_assert(IPIP_V4_PREFIX0 == {constants.IPIP_V4_PREFIX0}, "v4p0");')
    lines.append(f'_Static_assert(IPIP_V6_PREFIX0 == {constants.IPIP_V6_PREFIX0}, "v6p0");')
    lines.append(f'_Static_assert(CH_RINGS_SIZE == '
                 f'{constants.ch_rings_size(SMALL["max_vips"], SMALL["ring_size"])}, "chr");')
    lines.append(f'_Static_assert(LRU_UDP_TIMEOUT_NS == {constants.LRU_UDP_TIMEOUT_NS}ULL, '
                 f'"lru timeout");')
    return "\n".join(lines)


def compile_c(body: str) -> None:
    """Compile the generated header + body + a trivial XDP function with the datapath's
    flags."""
    from bcc import BPF

    text = ('#include <uapi/linux/bpf.h>\n#include "generated/lb_shared.h"\n' + body +
            "\nint layout_probe(struct xdp_md *ctx) { return XDP_PASS; }\n")
    b = BPF(text=text, cflags=c_flags(**SMALL))
    b.cleanup()


@pytest.mark.parametrize("cname", sorted(layout.C_STRUCTS))
def test_struct_matches_dtype_static_asserts(cname: str, capfd) -> None:
    try:
        compile_c(struct_asserts(cname, layout.C_STRUCTS[cname]))
    except Exception as e:
        err = capfd.readouterr().err
        failed = re.findall(r'static_assert failed.*?"(.*?)"', err) or [err[-2000:]]
        pytest.fail(f"struct {cname} differs from lb/layout.py: {failed} ({e})")


def test_every_constant_reaches_c(capfd) -> None:
    try:
        compile_c(constant_asserts())
    except Exception as e:
        err = capfd.readouterr().err
        pytest.fail(f"constants differ between lb/constants.py and C: {err[-2000:]} ({e})")


def test_every_counter_is_used_by_the_datapath() -> None:
    """Each STAT_* index is bumped somewhere in balancer.c (a counter nobody updates
    would silently stay 0 on the XDP side)."""
    src = (XDP_DIR / "balancer.c").read_text()
    missing = [n for n in constants.STATS if f"STAT_{n.upper()}" not in src]
    assert not missing


def test_every_decap_and_probe_counter_is_used() -> None:
    """The same for the decap program's and the health-probe encapsulator's counters."""
    decap = (XDP_DIR / "decap.c").read_text() + (XDP_DIR / "decap.h").read_text()
    assert not [n for n in constants.DECAP_STATS if f"DECAP_STAT_{n.upper()}" not in decap]
    hc = (XDP_DIR / "hc_encap.c").read_text()
    assert not [n for n in constants.HC_STATS if f"HC_STAT_{n.upper()}" not in hc]


def test_checked_in_header_is_generated() -> None:
    """xdp/generated/lb_shared.h is what lb.c_header writes from today's Python; after a
    change to lb/constants.py or lb/layout.py run ``python -m lb.c_header``."""
    assert c_header.HEADER.read_text() == c_header.render(), (
        f"{c_header.HEADER} is stale: run {c_header.COMMAND}")


def test_flags_carry_only_per_instance_values() -> None:
    """-D flags hand over sizes and other per-instance values, never a shared constant
    (those come from the header), and each per-instance size the header defaults."""
    flags = c_flags(**SMALL, nr_cpus=2, pin_dir="/sys/fs/bpf/x", gue_port=6081,
                    hc_mark_base=0x4C420000, sink_max_keys=8)
    names = {f[2:].split("=", 1)[0] for f in flags if f.startswith("-D")}
    assert not names & set(c_header.shared_constants())
    assert set(c_header.INSTANCE_DEFAULTS) <= names
    assert f"-DCH_RINGS_SIZE={constants.ch_rings_size(SMALL['max_vips'], SMALL['ring_size'])}" in flags


def _includes(path) -> set[str]:
    """The quoted includes of path, followed through xdp/."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        for inc in re.findall(r'^#include\s+"([^"]+)"', todo.pop().read_text(), re.M):
            if inc not in seen:
                seen.add(inc)
                if (XDP_DIR / inc).exists() and not inc.startswith("generated/"):
                    todo.append(XDP_DIR / inc)
    return seen


def test_every_program_includes_the_header() -> None:
    for path in (p for p in C_SOURCES if p.suffix == ".c"):
        assert "generated/lb_shared.h" in _includes(path), path.name


def test_no_hand_written_twins_of_shared_constants() -> None:
    """No xdp source defines a name lb.constants has (or a per-instance size's default), a
    hand-made twin of one (LB_<name>, <name>_) or a layout struct; the ethertypes are
    spelled by name, never as numbers."""
    shared = {n for n in vars(constants) if n.isupper()} | set(c_header.INSTANCE_DEFAULTS)
    twins = {f"LB_{n}" for n in shared} | {f"{n}_" for n in shared}
    for path in C_SOURCES:
        text = path.read_text()
        defined = set(re.findall(r"^#define\s+(\w+)", text, re.M))
        assert not defined & shared, f"{path.name} defines {defined & shared}"
        used_twins = set(re.findall(r"\b\w+\b", text)) & twins
        assert not used_twins, f"{path.name} uses {used_twins}"
        structs = set(re.findall(r"^(?:struct|union)\s+(\w+)\s*\{", text, re.M))
        assert not structs & (set(layout.C_STRUCTS) | {"lb_addr"}), path.name
        literals = re.findall(r"\b0x(?:0800|86dd|8100|88a8)\b", text, re.I)
        assert not literals, f"{path.name} spells ethertypes as numbers: {literals}"


def _ctype_layout(ct: type) -> tuple[int, dict[str, tuple[int, int]]]:
    fields = {}
    for name, ftype in ct._fields_:
        fields[name] = (getattr(ct, name).offset, ctypes.sizeof(ftype))
    return ctypes.sizeof(ct), fields


def _dtype_layout(dtype: np.dtype) -> tuple[int, dict[str, tuple[int, int]]]:
    return dtype.itemsize, {n: (dtype.fields[n][1], _field_size(dtype, n)) for n in dtype.names}


@needs_root
def test_bcc_map_types_match_dtypes() -> None:
    """bcc's Key/Leaf ctypes of the loaded program's maps agree with lb/layout.py
    (padding members the C side names explicitly are ignored)."""
    from lb.bpf_loader import XdpBalancer

    with XdpBalancer(**SMALL) as bal:
        for mapname, (kdt, vdt) in MAP_TYPES.items():
            table = bal._bpf[mapname.encode()]
            for ct, dt in ((table.Key, kdt), (table.Leaf, vdt)):
                if dt is None:
                    continue
                size, fields = _ctype_layout(ct)
                want_size, want_fields = _dtype_layout(dt)
                assert size == want_size, (mapname, ct.__name__)
                for name, (off, fsize) in want_fields.items():
                    assert fields.get(name) == (off, fsize), (mapname, name, fields.get(name))
                extra = set(fields) - set(want_fields)
                assert all(n.startswith("pad") for n in extra), extra
