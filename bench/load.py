"""Load benchmark: N concurrent clients of single-sample requests, batching on vs off.

Two real uvicorn servers on 127.0.0.1 in one run -- one with dynamic batching
(``HESSIAN_MAX_BATCH_SIZE=32``), one without (``=1``) -- and N concurrent clients (asyncio
+ httpx, bodies serialized beforehand) that each send one single-sample request after
the other. Phases alternate off / on for ``--rounds`` rounds so that noise from other
work on the machine hits both alike. Every phase is bounded by a number of requests and
a time limit. Printed per endpoint and mode: throughput, p50 / p99 latency, errors, and
the mean batch size the server reports in /metrics; the last line is one JSON object.

    python -m bench.load                      # 32 clients, /jacobian and /hessian
    python -m bench.load --clients 8 --requests 200 --kinds jacobian
    python -m bench.load --kinds hessian --output-indices 10   # mixed outputs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.serving import server
from hessian_service.local_server import ALLOCATOR_ENV


def bodies(
    kind: str, model: str, count: int, *, output_indices: int = 1, seed: int = 0
) -> list[bytes]:
    """``count`` single-sample request bodies (base64 in and out), serialized once.

    /hessian requests ask for output 3, or spread over outputs 0 to ``output_indices - 1``
    (only requests for the same output merge).
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = rng.random((1, 28, 28), dtype=np.float32)
        body: dict[str, Any] = {
            "model": model,
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 28, 28],
                    "datatype": "FP32",
                    "data": base64.b64encode(x.tobytes()).decode(),
                }
            ],
            "encoding": "base64",
        }
        if kind == "hessian":
            body["output_index"] = 3 if output_indices == 1 else i % output_indices
        out.append(json.dumps(body).encode())
    return out


@dataclass
class Phase:
    """One measured phase: latencies of the answered requests, errors, wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    def merge(self, other: Phase) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.wall_s += other.wall_s


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    httpx spent about 7 ms of client CPU per request with 32 concurrent connections here,
    which made the *client* the bottleneck on a 2-core machine; this one costs a few
    tens of microseconds (like wrk or hey, which this machine does not have).
    """

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line, *lines = (
            (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        )
        headers = {}
        for line in lines:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), headers, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_phase(
    url: str, kind: str, payloads: list[bytes], clients: int, requests: int, limit_s: float
) -> Phase:
    """``clients`` closed-loop clients share ``requests`` requests (stop at ``limit_s``)."""
    phase = Phase()
    remaining = requests
    stop_at = time.perf_counter() + limit_s

    async def client(number: int) -> None:
        nonlocal remaining
        connection = Connection(url)
        i = number
        try:
            while remaining > 0 and time.perf_counter() < stop_at:
                remaining -= 1
                started = time.perf_counter()
                try:
                    status, _, _ = await asyncio.wait_for(
                        connection.post(f"/{kind}", payloads[i % len(payloads)]), limit_s + 30
                    )
                    ok = status == 200
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    ok = False
                    await connection.close()
                if ok:
                    phase.latencies.append(time.perf_counter() - started)
                else:
                    phase.errors += 1
                i += clients
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    phase.wall_s = time.perf_counter() - started
    return phase


def batch_means(url: str) -> dict[str, float]:
    """Mean samples per computed batch, per kind, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "hessian_batch_samples":
            continue
        for sample in family.samples:
            kind = sample.labels.get("kind", "")
            if sample.name.endswith("_sum"):
                sums[kind] = sample.value
            elif sample.name.endswith("_count"):
                counts[kind] = sample.value
    return {k: round(sums[k] / counts[k], 2) for k in sums if counts.get(k)}


def summary(phase: Phase) -> dict[str, float]:
    answered = len(phase.latencies)
    ms = sorted(v * 1000 for v in phase.latencies)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))] if ms else float("nan")
    return {
        "requests": answered + phase.errors,
        "errors": phase.errors,
        "throughput_rps": round(answered / phase.wall_s, 1) if phase.wall_s else 0.0,
        "p50_ms": round(statistics.median(ms), 2) if ms else float("nan"),
        "p99_ms": round(p99, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", default="mlp_tanh")
    parser.add_argument("--kinds", nargs="+", default=["jacobian", "hessian"])
    parser.add_argument("--requests", type=int, default=0, help="per phase; 0: 10 per client")
    parser.add_argument("--rounds", type=int, default=4, help="off/on phase pairs per kind")
    parser.add_argument(
        "--output-indices", type=int, default=1, help="/hessian: spread over this many outputs"
    )
    parser.add_argument("--phase-limit-s", type=float, default=60.0)
    parser.add_argument("--max-batch-size", type=int, default=32, help="for 'on'")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="for 'on'")
    args = parser.parse_args()
    requests = args.requests or 10 * args.clients
    settings = {
        "off": {"HESSIAN_MAX_BATCH_SIZE": "1"},
        "on": {
            "HESSIAN_MAX_BATCH_SIZE": str(args.max_batch_size),
            "HESSIAN_MAX_BATCH_DELAY_MS": str(args.delay_ms),
        },
    }
    print(
        f"# {args.clients} clients, single-sample {args.model} requests, {requests} per phase, "
        f"{args.rounds} rounds of off/on; /hessian over {args.output_indices} output index(es); "
        f"batching on = max {args.max_batch_size} samples, "
        f"{args.delay_ms} ms; malloc thresholds {ALLOCATOR_ENV}; {os.cpu_count()} CPUs"
    )
    report: dict[str, Any] = {}
    with ExitStack() as stack:
        urls = {mode: stack.enter_context(server(**env)) for mode, env in settings.items()}
        for kind in args.kinds:
            payloads = bodies(kind, args.model, 64, output_indices=args.output_indices)
            for url in urls.values():  # warm-up, not measured
                asyncio.run(run_phase(url, kind, payloads, 4, 16, 30))
            totals = {mode: Phase() for mode in urls}
            for _ in range(args.rounds):
                for mode, url in urls.items():
                    totals[mode].merge(
                        asyncio.run(
                            run_phase(
                                url, kind, payloads, args.clients, requests, args.phase_limit_s
                            )
                        )
                    )
            for mode, url in urls.items():
                figures = summary(totals[mode])
                figures["mean_batch_samples"] = batch_means(url).get(kind, float("nan"))
                report[f"{kind}_{mode}"] = figures
                print(
                    f"/{kind:8s} batching {mode:3s}: "
                    + ", ".join(f"{k} {v}" for k, v in figures.items())
                )
            on, off = report[f"{kind}_on"], report[f"{kind}_off"]
            report[f"{kind}_throughput_ratio"] = (
                round(on["throughput_rps"] / off["throughput_rps"], 2)
                if off["throughput_rps"]
                else None
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
