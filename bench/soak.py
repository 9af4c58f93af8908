"""Soak test: many mixed requests from 32 clients against one real server, checked.

One uvicorn server on 127.0.0.1 (``bench.serving``) and ``--clients`` closed-loop
clients (``bench.load.Connection``) that share ``--requests`` requests, bounded by
``--limit-s``. The requests cycle through every combination of kind (/hessian,
/jacobian), bundled model, response encoding (json, base64, binary), input encoding
(JSON numbers, base64), and batch (one sample, four), in a fixed shuffled order; the
only combination left out is a four-sample 784x784 Hessian in JSON text (~30 MB of
numbers per answer, which would make the run measure the client's JSON parser).

Every ``--check-every``-th answer is decoded (``hessian_client``'s wire format reader)
and compared with a float64 reference computed here with ``torch.func`` on the same
fixed inputs; a wrong answer counts as an error. The server's RSS (``/proc/<pid>``) is
read after a warm-up and every ``--rss-every`` requests, so one can see whether it
levels off. Printed: the RSS samples as they come, then errors by status, p50 / p99
latency, throughput; the last line is one JSON object. Exits 1 on any error, wrong
answer, or when the time limit stopped the run short.

    python -m bench.soak                       # 32 clients, 10,000 requests
    python -m bench.soak --requests 40000 --limit-s 3600
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from hessian_client._wire import decode_response
from torch.func import hessian, jacrev

from bench.load import Connection, Phase, summary
from bench.models import bundled
from bench.serving import server_process
from hessian_service.config import BUNDLED_MODELS_DIR

MODELS = ("quadratic4", "linear4", "mlp_tanh", "mlp_relu", "digits_cnn")
KINDS = ("hessian", "jacobian")
ENCODINGS = ("json", "base64", "binary")
BATCHES = (1, 4)
SAMPLES = 4  # fixed inputs per model; a batch of four is all of them
# Relative tolerance against the float64 reference, on the scale of the largest entry
# (the service computes in float32).
TOLERANCE = 1e-3
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One kind of request, with its body serialized once."""

    model: str
    kind: str
    encoding: str
    batch: int
    json_input: bool
    output_index: int | None
    first: int  # the first fixed sample it sends
    body: bytes

    @property
    def name(self) -> str:
        batch = f"b{self.batch}"
        inputs = "json-in" if self.json_input else "base64-in"
        return f"{self.kind}/{self.model}/{self.encoding}/{batch}/{inputs}"


def manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((BUNDLED_MODELS_DIR / name / "manifest.json").read_text())
    return loaded


def fixed_inputs(name: str, seed: int) -> np.ndarray:
    """``SAMPLES`` inputs of the model's input shape, the same in every run."""
    shape = manifest(name)["input_shape"]
    rng = np.random.default_rng([seed, MODELS.index(name)])
    return rng.random((SAMPLES, *shape), dtype=np.float32)


def body_of(case: dict[str, Any], x: np.ndarray) -> bytes:
    """A /hessian or /jacobian body for the samples ``x`` (shape [B, ...] or one sample)."""
    data: Any = x.reshape(-1).tolist() if case["json_input"] else base64.b64encode(x.tobytes())
    tensor = {
        "name": "x",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": data if case["json_input"] else data.decode("ascii"),
    }
    body: dict[str, Any] = {"model": case["model"], "inputs": [tensor]}
    body["encoding"] = case["encoding"]
    if case["output_index"] is not None:
        body["output_index"] = case["output_index"]
    return json.dumps(body).encode()


def cases(seed: int) -> tuple[list[Case], dict[str, np.ndarray]]:
    """Every combination, shuffled with ``seed``, and each model's fixed inputs."""
    inputs = {name: fixed_inputs(name, seed) for name in MODELS}
    out: list[Case] = []
    number = 0
    for model in MODELS:
        outputs = manifest(model)["output_shape"][0]
        wide = math.prod(manifest(model)["input_shape"]) > 100
        for kind in KINDS:
            for encoding in ENCODINGS:
                for batch in BATCHES:
                    if wide and kind == "hessian" and encoding == "json" and batch > 1:
                        continue
                    number += 1
                    spec: dict[str, Any] = {
                        "model": model,
                        "kind": kind,
                        "encoding": encoding,
                        "batch": batch,
                        "json_input": number % 2 == 0,
                        # Two output indices per model, so that merging meets both.
                        "output_index": (
                            (outputs - 1, min(2, outputs - 1))[number % 2]
                            if kind == "hessian"
                            else None
                        ),
                        "first": 0 if batch > 1 else number % SAMPLES,
                    }
                    x = inputs[model][spec["first"] : spec["first"] + batch]
                    x = x if batch > 1 else x[0]
                    out.append(Case(**spec, body=body_of(spec, x)))
    random.Random(seed).shuffle(out)
    return out, inputs


@functools.cache
def float64_model(name: str) -> torch.nn.Module:
    return bundled(name).double()


def reference(model_name: str, kind: str, x: np.ndarray, output_index: int | None) -> np.ndarray:
    """The Jacobian [m, n] or Hessian [n, n] of one sample by ``torch.func`` in float64
    (kept as float32: the answers are float32)."""
    model = float64_model(model_name)
    sample = torch.from_numpy(x).double()

    def outputs(v: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = model(v.unsqueeze(0))[0]
        return result

    if kind == "jacobian":
        matrix = jacrev(outputs)(sample).reshape(-1, sample.numel())
    else:
        assert output_index is not None
        matrix = hessian(lambda v: outputs(v)[output_index])(sample)
        matrix = matrix.reshape(sample.numel(), sample.numel())
    result: np.ndarray = matrix.float().numpy()
    return result


class References:
    """Float64 references of every (model, kind, sample, output) the cases ask for."""

    def __init__(self, all_cases: list[Case], inputs: dict[str, np.ndarray]) -> None:
        self.table: dict[tuple[str, str, int, int | None], np.ndarray] = {}
        self.max_error = 0.0  # the largest relative error of a checked answer
        for case in all_cases:
            for sample in range(case.first, case.first + case.batch):
                key = (case.model, case.kind, sample, case.output_index)
                if key not in self.table:
                    x = inputs[case.model][sample]
                    self.table[key] = reference(*key[:2], x, case.output_index)

    def wrong(self, case: Case, headers: dict[str, str], content: bytes) -> str | None:
        """Why the answer to ``case`` is wrong, or None when it matches the reference."""
        try:
            answer = decode_response(content, httpx.Headers(headers)).arrays[case.kind]
        except Exception as failure:  # a malformed answer is a wrong answer
            return f"{case.name}: cannot decode the answer: {type(failure).__name__}: {failure}"
        expected = np.stack(
            [
                self.table[(case.model, case.kind, sample, case.output_index)]
                for sample in range(case.first, case.first + case.batch)
            ]
        )
        if answer.size != expected.size:
            return f"{case.name}: {answer.size} values, expected {expected.size}"
        got = answer.astype(np.float64).reshape(expected.shape)
        scale = max(float(np.abs(expected).max()), 1e-6)
        error = float(np.abs(got - expected).max()) / scale
        self.max_error = max(self.max_error, error)
        return None if error <= TOLERANCE else f"{case.name}: relative error {error:.2e}"


def rss_mb(pid: int) -> tuple[float, float]:
    """The process's resident set and its peak so far, in MiB (``/proc/<pid>/status``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)


@dataclass
class Run:
    """What a run saw: latencies of 200s, statuses, wrong answers, RSS samples."""

    phase: Phase
    statuses: Counter[str]
    checked: int = 0
    wrong: int = 0
    first_wrong: str | None = None
    sent: int = 0


async def soak(
    url: str,
    pid: int,
    all_cases: list[Case],
    references: References,
    *,
    clients: int,
    requests: int,
    limit_s: float,
    check_every: int,
    rss_every: int,
    rss_samples: list[dict[str, float]] | None,
) -> Run:
    """``clients`` closed-loop clients share ``requests`` requests, stopped at ``limit_s``;
    request ``i`` is ``all_cases[i % len]``, checked when ``i % check_every == 0``."""
    run = Run(Phase(), Counter())
    stop_at = time.perf_counter() + limit_s
    started = time.perf_counter()

    async def client() -> None:
        connection = Connection(url)
        try:
            while run.sent < requests and time.perf_counter() < stop_at:
                number = run.sent
                run.sent += 1
                case = all_cases[number % len(all_cases)]
                begun = time.perf_counter()
                try:
                    status, headers, content = await asyncio.wait_for(
                        connection.post(f"/{case.kind}", case.body), 120
                    )
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
                    await connection.close()
                    run.statuses[f"transport:{type(error).__name__}"] += 1
                    run.phase.errors += 1
                    continue
                elapsed = time.perf_counter() - begun
                run.statuses[str(status)] += 1
                if status != 200:
                    run.phase.errors += 1
                else:
                    run.phase.latencies.append(elapsed)
                    if number % check_every == 0:
                        run.checked += 1
                        why = references.wrong(case, headers, content)
                        if why is not None:
                            run.wrong += 1
                            run.first_wrong = run.first_wrong or why
                done = run.phase.errors + len(run.phase.latencies)
                if rss_samples is not None and done % rss_every == 0:
                    rss, peak = rss_mb(pid)
                    elapsed_s = round(time.perf_counter() - started, 1)
                    rss_samples.append({"requests": done, "rss_mb": rss, "s": elapsed_s})
                    print(f"# {done:6d} requests, {elapsed_s:7.1f} s: RSS {rss} MiB (peak {peak})")
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    run.phase.wall_s = time.perf_counter() - started
    return run


def coprime(step: int, count: int) -> int:
    """The smallest step >= ``step`` that is coprime with ``count``: checking every
    step-th request then visits every case."""
    while math.gcd(step, count) != 1:
        step += 1
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=500, help="requests before the RSS base")
    parser.add_argument("--limit-s", type=float, default=1200.0, help="for the measured part")
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--rss-every", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server environment, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.env)
    all_cases, inputs = cases(args.seed)
    check_every = coprime(args.check_every, len(all_cases))
    started = time.perf_counter()
    references = References(all_cases, inputs)
    print(
        f"# {args.clients} clients, {args.requests} requests over {len(all_cases)} cases "
        f"({', '.join(MODELS)}; {', '.join(KINDS)}; {', '.join(ENCODINGS)}; batches {BATCHES}),"
        f" every {check_every}th answer checked against {len(references.table)} float64 "
        f"references ({time.perf_counter() - started:.1f} s to compute); {os.cpu_count()} CPUs"
    )
    report: dict[str, Any] = {"clients": args.clients, "cases": len(all_cases), "env": server_env}
    samples: list[dict[str, float]] = []
    with server_process(**server_env) as (url, process):
        report["rss_start_mb"] = rss_mb(process.pid)[0]
        warm = asyncio.run(
            soak(url, process.pid, all_cases, references, clients=args.clients,
                 requests=args.warmup, limit_s=args.limit_s, check_every=check_every,
                 rss_every=args.rss_every, rss_samples=None)
        )  # fmt: skip
        report["rss_after_warmup_mb"] = rss_mb(process.pid)[0]
        print(f"# warm-up: {warm.sent} requests; RSS {report['rss_after_warmup_mb']} MiB")
        run = asyncio.run(
            soak(url, process.pid, all_cases, references, clients=args.clients,
                 requests=args.requests, limit_s=args.limit_s, check_every=check_every,
                 rss_every=args.rss_every, rss_samples=samples)
        )  # fmt: skip
        report["rss_end_mb"], report["rss_peak_mb"] = rss_mb(process.pid)
        time.sleep(2.0)  # no request in flight: what the server keeps between bursts
        report["rss_idle_mb"] = rss_mb(process.pid)[0]
        alive = process.poll() is None
    figures = summary(run.phase)
    wrong = run.wrong + warm.wrong
    report.update(figures)
    report.update(
        {
            "requested": args.requests,
            "complete": figures["requests"] >= args.requests,
            "statuses": dict(run.statuses),
            "warmup_errors": warm.phase.errors,
            "checked": run.checked + warm.checked,
            "wrong": wrong,
            "max_relative_error": float(f"{references.max_error:.2e}"),
            "first_wrong": run.first_wrong or warm.first_wrong,
            "server_alive": alive,
            "rss_samples": samples,
            "rss_growth_mb": round(report["rss_end_mb"] - report["rss_after_warmup_mb"], 1),
        }
    )
    print(
        f"# {figures['requests']} requests in {run.phase.wall_s:.1f} s: "
        f"{figures['throughput_rps']} req/s, p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms; statuses {dict(run.statuses)}; "
        f"{report['checked']} answers checked, {wrong} wrong; RSS after warm-up "
        f"{report['rss_after_warmup_mb']} MiB, at the end {report['rss_end_mb']} MiB "
        f"(peak {report['rss_peak_mb']})"
    )
    print(json.dumps(report))
    failed = figures["errors"] or warm.phase.errors or wrong or not report["complete"]
    raise SystemExit(1 if failed or not alive else 0)


if __name__ == "__main__":
    main()
