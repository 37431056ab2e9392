"""Shared helpers of the benchmark scripts: CPU pinning, result tables and JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def pin_to_cpu(cpu: int | None = None) -> int:
    """Pin this process to one CPU (the last one by default) and return its number."""
    cpus = sorted(os.sched_getaffinity(0))
    chosen = cpus[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release()}


def report(title: str, columns: list[str], rows: list[list[Any]], data: dict[str, Any], json_path: str | None,
           default_name: str) -> Path:
    """Print a table and write ``data`` (plus machine facts) as JSON; returns the path."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console().print(table)
    path = Path(json_path) if json_path else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    print(f"wrote {path}")
    return path
