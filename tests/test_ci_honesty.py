"""CI cannot be green by skipping: tests/conftest.py turns every skip into a failure under
``CI`` (import-time skips, markers, skips inside a test), except tests marked
``external(what)``; and the test dependencies (schemathesis among them) are hard ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SKIPPING = {
    "test_at_import.py": 'import pytest\npytest.skip("no bcc", allow_module_level=True)\n\ndef test_x():\n    pass\n',
    "test_importorskip.py": 'import pytest\npytest.importorskip("no_such_module_lb")\n\ndef test_x():\n    pass\n',
    "test_inside.py": (
        "import pytest\n\n"
        "def test_in_test():\n    pytest.skip('later')\n\n"
        "@pytest.mark.skipif(True, reason='marker')\ndef test_marker():\n    pass\n\n"
        "@pytest.mark.external('a TRex box')\ndef test_external():\n    pytest.skip('no TRex')\n\n"
        "def test_runs():\n    pass\n"),
}


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    for name, text in SKIPPING.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", "--continue-on-collection-errors",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_under_ci_every_skip_fails_but_external_ones(tmp_path) -> None:
    r = _run(tmp_path, "true")
    out = r.stdout
    assert r.returncode != 0, out
    assert "ERROR test_at_import.py" in out and "skipped at import under CI" in out
    assert "ERROR test_importorskip.py" in out
    assert "FAILED test_inside.py::test_in_test" in out
    assert "test_inside.py::test_marker" in out and "skipped under CI (Skipped: marker)" in out
    assert "SKIPPED [1] test_inside.py" in out and "no TRex" in out  # external: allowed, and visible
    assert "PASSED test_inside.py::test_runs" in out


def test_outside_ci_skips_stay_skips(tmp_path) -> None:
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 5 skipped" in r.stdout, r.stdout


def test_schemathesis_is_a_hard_test_dependency() -> None:
    """In the [test] extras (setup.sh installs them and reinstalls when pyproject.toml's
    hash changes), and imported by the fuzz test without importorskip."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("schemathesis") for d in project["optional-dependencies"]["test"])
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "sha256sum pyproject.toml" in setup and "pip install -q -e '.[test]'" in setup
    fuzz = (REPO / "tests" / "test_control_fuzz.py").read_text()
    assert "importorskip" not in fuzz and "\nimport schemathesis\n" in fuzz
