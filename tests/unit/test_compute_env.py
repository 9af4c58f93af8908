"""The OpenMP defaults (hessian_service/compute_env.py) reach torch's libgomp, and the
user's environment wins.

The observable is libgomp's own view: with ``OMP_DISPLAY_ENV=VERBOSE`` it prints, when
torch loads it, the settings it read -- ``GOMP_SPINCOUNT`` is 0 under PASSIVE, 300,000
when the policy is unset, 30,000,000,000 under ACTIVE -- so each case runs in a fresh
interpreter that imports the app the way ``uvicorn hessian_service.main:app`` does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hessian_service.compute_env import COMPUTE_ENV_DEFAULTS, with_compute_defaults
from hessian_service.local_server import server_env

SPIN_PASSIVE, SPIN_UNSET, SPIN_ACTIVE = 0, 300_000, 30_000_000_000


def _libgomp_view(code: str, **env: str) -> tuple[dict[str, str], str]:
    """Run ``code`` in a fresh interpreter without OpenMP variables but ``env``; libgomp's
    displayed settings, and stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shown = dict(re.findall(r"^\s+(\w+) = '([^']*)'$", done.stderr, flags=re.MULTILINE))
    assert "GOMP_SPINCOUNT" in shown, done.stderr[-2000:]
    return shown, done.stderr


def test_importing_the_app_makes_libgomp_sleep_at_once() -> None:
    shown, _ = _libgomp_view("import hessian_service.main")
    assert shown["OMP_WAIT_POLICY"] == "PASSIVE"
    assert int(shown["GOMP_SPINCOUNT"]) == SPIN_PASSIVE


def test_the_users_wait_policy_wins() -> None:
    code = "import os, hessian_service.main; print(os.environ['OMP_WAIT_POLICY'])"
    shown, _ = _libgomp_view(code, OMP_WAIT_POLICY="ACTIVE")
    assert shown["OMP_WAIT_POLICY"] == "ACTIVE"
    assert int(shown["GOMP_SPINCOUNT"]) == SPIN_ACTIVE


def test_torch_imported_first_keeps_libgomps_default_and_says_so() -> None:
    code = "import os, torch, hessian_service.main; assert 'OMP_WAIT_POLICY' not in os.environ"
    shown, stderr = _libgomp_view(code)
    assert int(shown["GOMP_SPINCOUNT"]) == SPIN_UNSET
    assert "cannot take effect" in stderr
    assert "OMP_WAIT_POLICY" in stderr


@pytest.mark.parametrize(
    ("callers", "expected"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")],
)
def test_launchers_add_the_default_unless_the_caller_set_it(
    monkeypatch: pytest.MonkeyPatch, callers: dict[str, str], expected: str
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    for key, value in callers.items():
        monkeypatch.setenv(key, value)
    assert server_env({})["OMP_WAIT_POLICY"] == expected  # local_server, the benchmarks
    assert with_compute_defaults(dict(os.environ))["OMP_WAIT_POLICY"] == expected  # serve
    # A server's own settings win over both.
    assert server_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    assert set(COMPUTE_ENV_DEFAULTS) == {"OMP_WAIT_POLICY"}
