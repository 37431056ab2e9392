"""The one C view of lb/constants.py and lb/layout.py: ``xdp/generated/lb_shared.h``.

Every BPF program in xdp/ includes the generated header and takes from it every value it
shares with Python, under the Python name:

* each integer constant of :mod:`lb.constants` (wire facts, flags, encapsulation, QUIC,
  ICMP, counter indexes of every program, per-VIP stat columns, ...) as a ``#define``;
  names the kernel's uapi headers already define (``ETH_P_IP``, ``IPPROTO_TCP``,
  ``XDP_TX``, ...) are not redefined but checked with ``_Static_assert``;
* per-instance sizes as ``#ifndef`` defaults, overridden by the ``-D`` flags of
  :func:`c_flags`, the one place that builds compile flags for xdp/;
* the structs of :data:`lb.layout.C_STRUCTS`, field by field with explicit padding, and
  ``_Static_assert`` on every size and offset.

    python -m lb.c_header           # rewrite the header after changing constants/layout
    python -m lb.c_header --check   # exit 1 if the checked-in header is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lb import constants, layout

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
HEADER = XDP_DIR / "generated" / "lb_shared.h"
COMMAND = "python -m lb.c_header"

# Per-instance values: -D flags from c_flags(); the header's defaults are lb.constants'.
INSTANCE_DEFAULTS: dict[str, int] = {
    "RING_SIZE": constants.RING_SIZE,
    "MAX_VIPS": constants.MAX_VIPS,
    "MAX_REALS": constants.MAX_REALS,
    "CONN_TABLE_SIZE": constants.CONN_TABLE_SIZE,
    "CH_RINGS_SIZE": constants.ch_rings_size(constants.MAX_VIPS, constants.RING_SIZE),
    "VIP_SLOTS": constants.vip_slots(constants.MAX_VIPS),
    "CONN_SETS": constants.conn_sets(constants.CONN_TABLE_SIZE),
    "DOWN_ROW_WORDS": constants.down_row_words(constants.MAX_REALS),
    "GUE_PORT": constants.GUE_DEFAULT_PORT,  # the port xdp/decap.c decapsulates
    "SINK_MAX_KEYS": constants.SINK_MAX_KEYS,
}

# Names the kernel headers included below define already (macros or enum members): the
# header checks their values instead of defining them a second time. uapi headers only,
# plus linux/jhash.h, whose JHASH_INITVAL the balancer's kernel includes pull in anyway.
KERNEL_HEADERS = ("uapi/linux/bpf.h", "uapi/linux/if_ether.h", "uapi/linux/in.h",
                  "uapi/linux/in6.h", "uapi/linux/icmp.h", "uapi/linux/icmpv6.h", "linux/jhash.h")
KERNEL_NAMES = frozenset({
    "XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX",
    "ETH_HLEN", "ETH_P_IP", "ETH_P_IPV6", "ETH_P_8021Q", "ETH_P_8021AD",
    "IPPROTO_ICMP", "IPPROTO_IPIP", "IPPROTO_TCP", "IPPROTO_UDP", "IPPROTO_IPV6",
    "IPPROTO_FRAGMENT", "IPPROTO_ICMPV6",
    "ICMP_DEST_UNREACH", "ICMP_FRAG_NEEDED",
    "ICMPV6_DEST_UNREACH", "ICMPV6_PKT_TOOBIG", "ICMPV6_ECHO_REQUEST", "ICMPV6_ECHO_REPLY",
    "JHASH_INITVAL",
})

# Constants of lb.constants the C side has no use for, kept out of the header.
PYTHON_ONLY = frozenset({
    "CONN_TABLE_WAYS",  # the userspace connection table's associativity
    "MAX_FRAME_SIZE",  # a run-time setting (ctl.max_frame), not a compile-time one
    "MAX_CONN_RATE",  # likewise (ctl.max_conn_rate)
    # C reads tcphdr.syn; linux/tcp.h has an enum member of this name (another value).
    "TCP_FLAG_SYN",
    "VIP_PREFIX_MIN_V4", "VIP_PREFIX_MIN_V6",  # lb.config's bounds on CIDR VIPs
})

# numpy scalar type (dtype.str) -> C type
_C_TYPES = {"|u1": "__u8", "<u2": "__u16", ">u2": "__be16", "<u4": "__u32", ">u4": "__be32",
            "<u8": "__u64"}

_ADDR_UNION = """\
/* An address as stored in every key: IPv4 in the first 4 bytes (network order), the
 * other 12 zero; IPv6 all 16 bytes. A separate family byte tells them apart. */
union lb_addr {
	__be32 v4;
	__be32 v6[4];
	__u8 bytes[16];
};"""


def shared_constants() -> dict[str, int]:
    """Every integer constant of lb.constants the C side gets, in module order."""
    return {
        name: value for name, value in vars(constants).items()
        if name.isupper() and type(value) is int
        and name not in INSTANCE_DEFAULTS and name not in PYTHON_ONLY
    }


def _c_int(value: int) -> str:
    # Values past int range are unsigned long long in C, as they were as -D flags.
    return f"{value}ULL" if value > 0x7FFFFFFF else str(value)


def _constant_lines() -> list[str]:
    lines = []
    for name, value in shared_constants().items():
        if name in KERNEL_NAMES:
            lines.append(f'_Static_assert({name} == {_c_int(value)}, "{name}: kernel != lb.constants");')
        else:
            lines.append(f"#define {name} {_c_int(value)}")
    return lines


def _instance_lines() -> list[str]:
    lines = []
    for name, value in INSTANCE_DEFAULTS.items():
        lines += [f"#ifndef {name}", f"#define {name} {_c_int(value)}", "#endif"]
    return lines


def _dtype_names() -> dict[int, str]:
    return {id(v): k for k, v in vars(layout).items() if isinstance(v, np.dtype)}


class Member(NamedTuple):
    """One member of a generated struct."""

    decl: str  # the C declaration, without its semicolon
    name: str
    offset: int
    size: int


def _c_decl(cname: str, name: str, fdt: np.dtype, offset: int) -> str:
    if name in layout.C_ADDR_FIELDS.get(cname, ()):
        if fdt.itemsize != 16:
            raise ValueError(f"{cname}.{name}: an address field must be 16 bytes")
        decl, align = f"union lb_addr {name}", 4
    elif fdt.names is not None:  # a nested layout struct
        inner = [k for k, v in layout.C_STRUCTS.items() if v == fdt]
        if not inner:
            raise ValueError(f"{cname}.{name}: nested dtype is not one of layout.C_STRUCTS")
        decl, align = f"struct {inner[0]} {name}", 4
    elif fdt.subdtype is not None:
        base, shape = fdt.subdtype
        decl, align = f"{_C_TYPES[base.str]} {name}[{shape[0]}]", base.itemsize
    else:
        decl, align = f"{_C_TYPES[fdt.str]} {name}", fdt.itemsize
    # C lays members out at their natural alignment: the dtype's offset must be one.
    if offset % align:
        raise ValueError(f"{cname}.{name} at offset {offset} is not {align}-byte aligned")
    return decl


def struct_fields(cname: str, dtype: np.dtype) -> list[Member]:
    """Every member of ``struct cname``: the dtype's fields in offset order, and byte-array
    ``pad`` members (``pad1``, ``pad2``, ... if several) for the gaps between them and at
    the end, so that every byte of a key is named and can be zeroed."""
    fields = sorted(dtype.fields.items(), key=lambda kv: kv[1][1])
    spans: list[tuple[int, int, str | None]] = []  # (offset, size, field or None = gap)
    pos = 0
    for name, (fdt, off) in fields:
        if off > pos:
            spans.append((pos, off - pos, None))
        spans.append((off, fdt.itemsize, name))
        pos = off + fdt.itemsize
    if dtype.itemsize > pos:
        spans.append((pos, dtype.itemsize - pos, None))
    n_gaps = sum(name is None for *_, name in spans)
    members, gap = [], 0
    for off, size, name in spans:
        if name is None:
            gap += 1
            pad = "pad" if n_gaps == 1 else f"pad{gap}"
            members.append(Member(f"__u8 {pad}[{size}]", pad, off, size))
        else:
            members.append(Member(_c_decl(cname, name, dtype.fields[name][0], off), name, off, size))
    return members


def _struct_lines(cname: str, dtype: np.dtype, pyname: str) -> list[str]:
    members = struct_fields(cname, dtype)
    lines = [f"/* lb.layout.{pyname}: {dtype.itemsize} bytes. */", f"struct {cname} {{"]
    lines += [f"\t{m.decl};" for m in members]
    align = layout.C_ALIGN.get(cname)
    lines += [f"}} __attribute__((aligned({align})));" if align else "};",
              f"_Static_assert(sizeof(struct {cname}) == {dtype.itemsize}, "
                    f'"sizeof(struct {cname})");']
    for m in members:
        lines.append(f"_Static_assert(__builtin_offsetof(struct {cname}, {m.name}) == {m.offset} && "
                     f"sizeof(((struct {cname} *)0)->{m.name}) == {m.size}, \"{cname}.{m.name}\");")
    return lines


def render() -> str:
    """The header's text."""
    names = _dtype_names()
    out = [
        f"/* Generated by `{COMMAND}` from lb/constants.py and lb/layout.py. DO NOT EDIT:",
        " * change the Python side and run the command again (tests/test_layout.py fails while",
        " * this file and its sources disagree). */",
        "#pragma once",
        "",
        "#include <linux/types.h>",
        *(f"#include <{h}>" for h in KERNEL_HEADERS),
        "",
        "/* Per-instance sizes: -D flags from lb.c_header.c_flags(); defaults from lb.constants. */",
        *_instance_lines(),
        "",
        "/* lb.constants, same names (the kernel's own names: values checked). */",
        *_constant_lines(),
        "",
        _ADDR_UNION,
    ]
    for cname, dtype in layout.C_STRUCTS.items():
        out += ["", *_struct_lines(cname, dtype, names[id(dtype)])]
    return "\n".join(out) + "\n"


def c_flags(
    *,
    ring_size: int = constants.RING_SIZE,
    max_vips: int = constants.MAX_VIPS,
    max_reals: int = constants.MAX_REALS,
    conn_table_size: int = constants.CONN_TABLE_SIZE,
    nr_cpus: int | None = None,
    pin_dir: str | None = None,
    gue_port: int | None = None,
    hc_mark_base: int | None = None,
    sink_max_keys: int | None = None,
) -> list[str]:
    """Compile flags for any program in xdp/: the include path and the per-instance
    ``-D`` values (sizes always; the others when given, else the header's defaults or,
    for ``nr_cpus``/``hc_mark_base``, nothing: only the programs that need them ask)."""
    defines: dict[str, int | str | None] = {
        "RING_SIZE": ring_size,
        "MAX_VIPS": max_vips,
        "MAX_REALS": max_reals,
        "CONN_TABLE_SIZE": conn_table_size,
        "CH_RINGS_SIZE": constants.ch_rings_size(max_vips, ring_size),
        "VIP_SLOTS": constants.vip_slots(max_vips),
        "CONN_SETS": constants.conn_sets(conn_table_size),
        "DOWN_ROW_WORDS": constants.down_row_words(max_reals),
        "LB_NR_CPUS": nr_cpus,
        "LB_PIN_DIR": None if pin_dir is None else f'"{pin_dir}"',
        "GUE_PORT": gue_port,
        "HC_MARK_BASE": None if hc_mark_base is None else f"{hc_mark_base}U",
        "SINK_MAX_KEYS": sink_max_keys,
    }
    flags = [f"-I{XDP_DIR}"]
    for name, value in defines.items():
        if value is not None:
            flags.append(f"-D{name}={_c_int(value) if isinstance(value, int) else value}")
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the checked-in header differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = HEADER.exists() and HEADER.read_text() == text
        print(f"{HEADER}: {'up to date' if same else 'STALE, run ' + COMMAND}")
        return 0 if same else 1
    HEADER.parent.mkdir(exist_ok=True)
    HEADER.write_text(text)
    print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
