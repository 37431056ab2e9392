"""Shared test set-up.

Tests marked ``root``, ``bpf`` or ``netns`` need root (and the BPF/netns facilities of
the set-up). Run as root (CI always is) they simply run. Not as root, they are skipped
with a reason — except under CI (``CI`` set), where that would hide them: there they fail.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_PRIVILEGED = ("root", "bpf", "netns")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    privileged = [i for i in items if any(i.get_closest_marker(m) for m in _PRIVILEGED)]
    if privileged and os.environ.get("CI"):
        raise pytest.UsageError(f"{len(privileged)} tests need root; CI must run as root")
    for item in privileged:
        item.add_marker(pytest.mark.skip(reason="needs root (run `make test` as root)"))
