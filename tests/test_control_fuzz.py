"""Schemathesis over the OpenAPI document, against the app as the daemon runs it (a state
store on disk, a bearer token): whatever the generated requests,

* the API never answers 5xx (every bad input is the caller's fault, named);
* every answer matches the document (status code declared, content type, body schema);
* a refused request (4xx) changes nothing: the generation in memory and the one saved in
  the store stay as they were;
* the datapath always holds exactly the desired state.

Random seeds (hypothesis prints the one to reproduce a failure), a bounded number of
examples per operation (``LB_FUZZ_EXAMPLES``, default 60). The last test prints how
many requests were tried and how many got 4xx / 5xx.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import schemathesis
from control_helpers import make_config, vip_dict
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from control.api import create_app
from control.datapaths import MemoryPort
from control.plane import open_plane
from control.reconcile import plan
from control.store import Store
from control.tables import Sizes

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("LB_FUZZ_EXAMPLES", "60"))

STATE_DIR = Path(tempfile.mkdtemp(prefix="lb-fuzz-"))
atexit.register(shutil.rmtree, STATE_DIR, True)
STORE = Store(STATE_DIR, fsync=False)
CFG = make_config([vip_dict(0, [0, 1]), vip_dict(1, [2], v6=True, protocol="udp", port=443)])
PORT = MemoryPort(Sizes.of(CFG.settings))
CTL = open_plane(PORT, STORE, CFG)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(CTL, token=TOKEN), headers=AUTH)
SEEN: Counter[str] = Counter()
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


def saved_generation() -> int:
    state = STORE.load()
    assert state is not None
    return state.generation


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_refusals_change_nothing(case) -> None:
    before = CTL.core.generation
    response = case.call(headers=AUTH)
    SEEN["requests"] += 1
    SEEN[f"{response.status_code // 100}xx"] += 1
    case.validate_response(response, checks=CHECKS)
    assert response.headers.get("x-request-id")
    if response.status_code >= 400:
        assert CTL.core.generation == before, (response.status_code, response.text)
    assert saved_generation() == CTL.core.generation
    assert plan(PORT, CTL.core.tables).empty


def test_the_fuzzing_changed_something(capsys) -> None:
    """Runs after the fuzzing (file order): generated requests did get through validation,
    and others were refused."""
    with capsys.disabled():
        print(f"\nMEASURED schemathesis: {SEEN['requests']} requests, 2xx {SEEN['2xx']}, 4xx {SEEN['4xx']}, "
              f"5xx {SEEN['5xx']}; changes accepted {CTL.core.counters['changes']}, refused "
              f"{CTL.core.counters['changes_failed']}; generation {CTL.core.generation}")
    assert SEEN["5xx"] == 0
    assert CTL.core.counters["changes"] > 0 and CTL.core.counters["changes_failed"] > 0, CTL.core.counters
