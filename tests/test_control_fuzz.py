"""Schemathesis over the OpenAPI document: whatever the generated requests, the API never
answers 5xx (every bad input is the caller's fault, named), and the datapath always holds
exactly the desired state."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from control_helpers import make_config, vip_dict  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from control.api import create_app  # noqa: E402
from control.datapaths import MemoryPort  # noqa: E402
from control.plane import open_plane  # noqa: E402
from control.reconcile import plan  # noqa: E402
from control.tables import Sizes  # noqa: E402

CFG = make_config([vip_dict(0, [0, 1]), vip_dict(1, [2], v6=True, protocol="udp", port=443)])
PORT = MemoryPort(Sizes.of(CFG.settings))
CTL = open_plane(PORT, None, CFG)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(CTL))


@schema.parametrize()
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
    assert plan(PORT, CTL.core.tables).empty


def test_the_fuzzing_changed_something() -> None:
    """Runs after the fuzzing (file order): generated requests did get through validation."""
    assert CTL.core.counters["changes"] > 0 and CTL.core.counters["changes_failed"] > 0, CTL.core.counters
