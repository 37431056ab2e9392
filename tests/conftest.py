"""Shared test set-up.

Tests marked ``root``, ``bpf`` or ``netns`` need root (and the BPF/netns facilities of
the set-up). Run as root (CI always is) they simply run. Not as root, they are skipped
with a reason — except under CI (``CI`` set), where that would hide them: there they fail.

Under CI no test may skip at all, however it skips (a marker, ``pytest.skip`` in the
test or at import time, ``importorskip``): a skip is reported as a failure. The only
exception is a test marked ``external(what)``: it needs something CI does not provide
(TRex, a Katran tree, a second CPU, spare memory) and says so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_PRIVILEGED = ("root", "bpf", "netns")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    privileged = [i for i in items if any(i.get_closest_marker(m) for m in _PRIVILEGED)]
    if privileged and _ci():
        raise pytest.UsageError(f"{len(privileged)} tests need root; CI must run as root")
    for item in privileged:
        item.add_marker(pytest.mark.skip(reason="needs root (run `make test` as root)"))


def _skip_reason(longrepr: Any) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module that skips as it is imported: a failure under CI."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _ci():
        rep.outcome = "failed"
        rep.longrepr = f"{collector.nodeid} skipped at import under CI: {_skip_reason(rep.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A test that skips: a failure under CI, unless it is marked ``external``."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _ci() and not hasattr(rep, "wasxfail") and item.get_closest_marker("external") is None:
        rep.outcome = "failed"
        rep.longrepr = (f"skipped under CI ({_skip_reason(rep.longrepr)}); a test CI cannot run is marked "
                        "external(what) instead")
