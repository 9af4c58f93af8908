"""Shared fixtures: the seeded case table and the bundled models."""

from __future__ import annotations

import pytest
import torch

from tests.cases import CASES, Case


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(autouse=True)
def _float_defaults() -> None:
    torch.manual_seed(0)
