"""Part of the bad-input catalogue (``tests/catalogue.py``) against a real server.

The in-process run (``tests/api/test_bad_input_catalogue.py``) has every row; here the
rows whose bytes matter on the wire -- raw bodies (invalid JSON, NaN literals), every
/v2 row, URL paths with unicode, dots and 5,000 characters -- go through uvicorn, and
the server still answers a normal request with the closed-form Hessian afterwards.
"""

from __future__ import annotations

import httpx
import pytest

from tests import catalogue
from tests.api.test_bad_input_catalogue import assert_serves_correctly
from tests.catalogue import Row, check

WIRE_ROWS = [
    row
    for row in catalogue.derivative_rows() + catalogue.v2_rows() + catalogue.model_path_rows()
    if row.raw is not None
    or row.oip
    or row.method != "POST"
    or row.id.startswith("hessian:model-")
    or row.id.startswith("hessian:data-")
]


def test_enough_rows_go_over_the_wire() -> None:
    assert len(WIRE_ROWS) >= 80


@pytest.mark.parametrize("row", WIRE_ROWS, ids=[row.id for row in WIRE_ROWS])
def test_bad_input_over_http(client: httpx.Client, row: Row) -> None:
    check(client, row)


def test_after_the_catalogue_the_server_answers_correctly(client: httpx.Client) -> None:
    assert_serves_correctly(client)
    assert client.get("/health/ready").status_code == 200
