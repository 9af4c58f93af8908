"""schemathesis, every check, against a real uvicorn server on 127.0.0.1: 0 failures.

The server is tested twice: with model management off (no ``HESSIAN_ADMIN_TOKEN``), and
with a token set and sent, so that ``POST /models`` and ``DELETE /models/{name}`` are
reached past authentication. Both servers serve a throw-away copy of the bundled models
and store uploads in a temporary folder: with the token, schemathesis unloads models.

The schemathesis command line runs as a child process (as a developer would run it), with
a fixed seed, at least 25 generated cases per operation and a hard time limit; its JSON
report is read back, and every failure is shown with its reproducing ``curl``.

Phases: all four. ``examples`` sends the OpenAPI document's own request examples;
``coverage`` sends the boundary and wrong-type values of every field, the missing
required parts, and undeclared methods (405 + ``Allow``); ``fuzzing`` draws
``MAX_EXAMPLES`` valid and invalid requests per operation; ``stateful`` follows the links
between operations (GET a model after listing, DELETE then GET, ...). Together they take
about 12 s per server on 2 cores, so none is worth leaving out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

# The CLI's own package, for its config as the CLI reads it; importing the two check
# modules registers the built-in checks (``CHECKS`` lists only what was imported).
import schemathesis.openapi.checks
import schemathesis.specs.openapi.checks
from schemathesis.checks import CHECKS
from schemathesis.config import SchemathesisConfig
from schemathesis.openapi import from_dict

from hessian_service.config import BUNDLED_MODELS_DIR
from tests.e2e.conftest import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 13
MAX_EXAMPLES = 25
# Hard limit on one schemathesis run (about 12 s on a quiet 2-core machine).
RUN_LIMIT_S = 240
CONFIG = Path(__file__).with_name("schemathesis.toml")
TOKEN = "schemathesis-token-0123456789"
PHASES = ("examples", "coverage", "fuzzing", "stateful")


def throwaway_models(tmp_path: Path) -> dict[str, str]:
    """Server settings for a copy of the bundled models and an upload folder in tmp_path."""
    models = tmp_path / "models"
    shutil.copytree(BUNDLED_MODELS_DIR, models)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    return {"HESSIAN_MODELS_DIR": str(models), "HESSIAN_UPLOAD_DIR": str(uploads)}


def schemathesis(url: str, report_dir: Path, *options: str) -> tuple[int, str, dict[str, Any]]:
    """Run ``schemathesis run`` on the server's OpenAPI document: its exit code, its
    output, and its JSON report. Kills it past ``RUN_LIMIT_S``."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        # Every check runs: each is on unless CONFIG turns it off. No `--checks all` here:
        # a check named on the command line overrides CONFIG's per-operation `enabled =
        # false` (use_after_free on the reads of a job, explained there).
        *options,
        "--phases",
        ",".join(PHASES),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        # One worker: the same seed then gives the same requests in the same order.
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report_dir / "report.json"),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_LIMIT_S, cwd=report_dir, check=False
    )
    output = done.stdout + done.stderr
    report_path = report_dir / "report.json"
    assert report_path.exists(), f"schemathesis wrote no report (exit {done.returncode}):\n{output}"
    return done.returncode, output, json.loads(report_path.read_text())


def assert_clean(code: int, output: str, report: dict[str, Any]) -> None:
    """0 failures and 0 errors, every operation tested, every phase run to the end."""
    failures = output[output.find("FAILURES") :] if "FAILURES" in output else output[-4000:]
    assert report["failures"] == [] and code == 0, failures
    assert report["errors"] == [], output[-4000:]
    assert report["complete"] is True and report["stop_reason"] == "completed"
    operations = report["operations"]
    assert operations["tested"] == operations["total"] == operations["selected"] > 0
    assert {phase: report["phases"][phase]["status"] for phase in PHASES} == dict.fromkeys(
        PHASES, "success"
    ), report["phases"]
    assert report["seed"] == SEED
    # At least MAX_EXAMPLES drawn requests for each operation across the phases.
    assert report["test_cases"]["generated"] >= MAX_EXAMPLES * operations["tested"]


# What CONFIG changes, operation by operation (schemathesis ORs the keys of a block: a
# block of `include-path` and `include-method` once matched every POST).
USE_AFTER_FREE_OFF = {"GET /jobs/{job_id}", "GET /jobs/{job_id}/result"}
OPERATORS = ("/hvp", "/jvp", "/vjp", "/hessian/diagonal", "/hessian/trace", "/hessian/eigen")
INFER = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
# UM-Bridge's routes: 400 for every invalid request (an unknown model too), 413 over a limit.
UMBRIDGE = (
    "/Evaluate",
    "/Gradient",
    "/ApplyJacobian",
    "/ApplyHessian",
    "/InputSizes",
    "/OutputSizes",
    "/ModelInfo",
)
ALSO_ACCEPTED: dict[str, set[str]] = {
    **{f"POST {path}": {"422"} for path in ("/hessian", "/jacobian", "/models")},
    **{f"POST {path}": {"413", "422"} for path in (*OPERATORS, "/jobs")},
    **{f"POST {path}": {"400"} for path in INFER},
    **{f"POST {path}": {"400", "413"} for path in UMBRIDGE},
}
DEFAULT_ACCEPTED = {"2xx", "3xx", "401", "403", "404", "409", "429", "5xx"}


def test_the_config_changes_only_what_it_says() -> None:
    """Every check on for every operation, but use_after_free on the two reads of a job;
    positive_data_acceptance widened exactly where ``ALSO_ACCEPTED`` says."""
    from hessian_service.main import app

    config = SchemathesisConfig.from_path(str(CONFIG))
    schema = from_dict(app.openapi(), config=config)
    seen = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        seen.add(label)
        checks = schema.config.checks_config_for(operation=operation)
        off = {name for name in CHECKS.get_all_names() if not checks.get_by_name(name=name).enabled}
        assert off == ({"use_after_free"} if label in USE_AFTER_FREE_OFF else set()), label
        accepted = set(checks.positive_data_acceptance.expected_statuses)
        assert accepted == DEFAULT_ACCEPTED | ALSO_ACCEPTED.get(label, set()), label
    assert USE_AFTER_FREE_OFF | set(ALSO_ACCEPTED) <= seen


def test_schemathesis_without_the_admin_token(tmp_path: Path) -> None:
    """Model management off: POST/DELETE /models answer 403 to everyone.

    ``missing_required_header`` is left out of this run only: the one required header in
    the document is ``Authorization`` on those two operations, and the check demands 401
    when it is missing. With no token configured no credential can succeed, which is
    what 403 means (RFC 9110, 15.5.4); 401 would invite the client to authenticate
    (15.5.2). The run with the token below keeps the check, and passes it (401).
    """
    with running_server(**throwaway_models(tmp_path)) as url:
        code, output, report = schemathesis(
            url, tmp_path, "--exclude-checks", "missing_required_header"
        )
        assert httpx.get(f"{url}/health/live", trust_env=False).status_code == 200
    assert_clean(code, output, report)


def test_schemathesis_with_the_admin_token(tmp_path: Path) -> None:
    """Model management on and authenticated: uploads and deletes are reached."""
    settings = throwaway_models(tmp_path)
    with running_server(HESSIAN_ADMIN_TOKEN=TOKEN, **settings) as url:
        code, output, report = schemathesis(
            url, tmp_path, "--header", f"Authorization: Bearer {TOKEN}"
        )
        assert httpx.get(f"{url}/health/live", trust_env=False).status_code == 200
    assert_clean(code, output, report)
    # Uploads were refused (random bytes are not models): nothing was left behind.
    assert list(Path(settings["HESSIAN_UPLOAD_DIR"]).iterdir()) == []
