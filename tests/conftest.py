"""Shared fixtures: the seeded case table and the bundled models."""

from __future__ import annotations

import os

import pytest
import torch

from tests.cases import CASES, Case

# The suite sends many same-shape diagonal/trace requests; with the service's default
# (compile after 3) each would start a background torch.compile (10-40 s of CPU) beside
# the tests. Servers started by the tests inherit this; tests/unit/test_graph_compiled.py
# exercises the compile itself.
os.environ.setdefault("HESSIAN_COMPILE_AFTER", "0")


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(autouse=True)
def _float_defaults() -> None:
    torch.manual_seed(0)
