"""How long the largest accepted JSON-number body holds the GIL (HESSIAN_MAX_JSON_NUMBER_BYTES).

Every JSON parser holds the GIL for its whole call, so the longest single call in the
handling of a body is what an event loop waiting beside it can stall for. For bodies
whose bytes outside strings are just under ``--limit`` (the setting's default unless
given), written three ways -- floats as ``json.dumps`` writes a float32 tensor's
``tolist()`` (~20 bytes a number), four decimals (~8), and ``0,`` (2 bytes a number, the
most numbers a limit lets through) -- this prints, in ms: the count, ``parse_json``
(jiter), the validation of the request, the service's decode of the numbers
(``codec.decode_tensor``), ``json.loads`` (what FastAPI used) for comparison, and the
longest gap a thread sleeping 0.5 ms at a time saw while another thread ran parse,
validation and decode (what the event loop would see).

    python -m bench.json_body_gil              # the default limit
    python -m bench.json_body_gil --limit 8388608
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from hessian_service.config import Settings
from hessian_service.wire import codec
from hessian_service.wire.json_body import bytes_outside_strings, parse_json
from hessian_service.wire.schemas import DerivativeRequest

STYLES: dict[str, Callable[[np.ndarray], str]] = {
    "float32 repr": lambda x: json.dumps(x.tolist()),
    "4 decimals": lambda x: "[" + ", ".join(f"{v:.4f}" for v in x.tolist()) + "]",
    "0, compact": lambda x: "[" + ",".join("0" for _ in range(x.size)) + "]",
}


def body_under(limit: int, style: str) -> tuple[bytes, int]:
    """A /hessian body written in ``style`` whose bytes outside strings are <= ``limit``,
    as many numbers as fit; and that count of numbers."""

    def make(n: int) -> bytes:
        data = STYLES[style](np.random.default_rng(1).standard_normal(n).astype(np.float32))
        return (
            '{"model": "digits_cnn", "output_index": 0, "inputs": [{"name": "x", '
            f'"shape": [{n}], "datatype": "FP32", "data": {data}}}]}}'
        ).encode()

    n = 1000
    per = bytes_outside_strings(make(n)) / n
    n = int(limit / per)
    while bytes_outside_strings(body := make(n)) > limit:
        n -= max(1, n // 1000)
    return body, n


def best_ms(call: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def longest_gap_ms(work: Callable[[], Any]) -> float:
    """The longest a thread sleeping 0.5 ms at a time waited while ``work`` ran in another."""
    worker = threading.Thread(target=work)
    gaps: list[float] = []
    last = time.perf_counter()  # before start(): its return can wait for the first hold
    worker.start()
    while worker.is_alive():
        time.sleep(0.0005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    return max(gaps, default=0.0) * 1000


def measure(limit: int) -> list[dict[str, Any]]:
    rows = []
    for style in STYLES:
        body, n = body_under(limit, style)
        parsed = parse_json(body)
        request = DerivativeRequest.model_validate(parsed)

        def pipeline(body: bytes = body) -> None:
            request = DerivativeRequest.model_validate(parse_json(body))
            codec.decode_tensor(request.inputs[0], "inputs[0]")

        tensor = request.inputs[0]
        rows.append(
            {
                "style": style,
                "numbers": n,
                "body_bytes": len(body),
                "outside_bytes": bytes_outside_strings(body),
                "count_ms": best_ms(partial(bytes_outside_strings, body)),
                "parse_json_ms": best_ms(partial(parse_json, body)),
                "validate_ms": best_ms(partial(DerivativeRequest.model_validate, parsed)),
                "decode_ms": best_ms(partial(codec.decode_tensor, tensor, "inputs[0]")),
                "json_loads_ms": best_ms(partial(json.loads, body)),
                "longest_gap_ms": max(longest_gap_ms(pipeline) for _ in range(3)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=Settings().max_json_number_bytes)
    limit = parser.parse_args().limit
    rows = measure(limit)
    print(f"# limit {limit} bytes outside strings; times in ms (best of 3; gap: worst of 3)")
    keys = [k for k in rows[0] if k != "style"]
    print(f"{'style':14}" + "".join(f"{k:>15}" for k in keys))
    for row in rows:
        print(
            f"{row['style']:14}"
            + "".join(
                f"{row[k]:>15.1f}" if isinstance(row[k], float) else f"{row[k]:>15}" for k in keys
            )
        )
    print(json.dumps({"limit": limit, "rows": rows}))


if __name__ == "__main__":
    main()
