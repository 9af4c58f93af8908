"""``hessian_service.local_server``: the one way scripts, benchmarks and these tests start
a real server; a server that cannot start is reported with its own error."""

from __future__ import annotations

import httpx
import pytest

from hessian_service.local_server import ServerDidNotStart, local_server
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_a_started_server_answers_and_is_stopped_on_exit() -> None:
    with local_server({"HESSIAN_DEVICE": "cpu"}, cwd=ROOT) as url:
        ready = httpx.get(f"{url}/health/ready", trust_env=False, timeout=10).json()
        assert ready["status"] == "ok" and ready["models_loaded"] == 6
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health/live", trust_env=False, timeout=2)


def test_a_server_that_cannot_start_raises_with_its_stderr() -> None:
    with (
        pytest.raises(ServerDidNotStart, match="exited with code") as failure,
        local_server({"HESSIAN_MAX_BATCH_SIZE": "zero"}, cwd=ROOT),
    ):
        pytest.fail("a server with an invalid setting reported ready")
    assert "max_batch_size" in str(failure.value)
    assert "unable to parse string as an integer" in str(failure.value)
