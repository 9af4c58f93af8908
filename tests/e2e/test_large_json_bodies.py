"""Large JSON bodies against a real uvicorn: the loop stays live, memory stays bounded.

A body of 57 MiB of JSON numbers -- what the outside review sent -- is refused with 413
by its count of bytes outside strings (``HESSIAN_MAX_JSON_NUMBER_BYTES``), counted while
it arrives and before anything parses it. Four at once on ``/hessian`` and one on
``/v2/.../infer``: ``/health/live`` answers every probe in under 50 ms meanwhile, and a
normal request afterwards gets the right answer. The server's peak memory for one such
body (``VmHWM`` in ``/proc/<pid>/status``, reset first through ``clear_refs``) stays
within three times the body's size. Bodies just under the limit are parsed in a
worker thread, one at a time: four senders of them keep the median probe under 50 ms.
Bounded: at most 5000 probes, 120 s a request.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from hessian_service.local_server import ServerDidNotStart, local_server_process
from tests.device import TEST_DEVICE
from tests.e2e.conftest import ROOT
from tests.timing import slowdown

pytestmark = pytest.mark.e2e

MiB = 1 << 20
BODY_BYTES = 57 * MiB
LIMIT = 2 * MiB  # HESSIAN_MAX_JSON_NUMBER_BYTES's default, the one under test
SETTING = "HESSIAN_MAX_JSON_NUMBER_BYTES"
PROBLEM = "application/problem+json"
INFER = "/v2/models/digits_cnn/infer"


def numbers_body(prefix: bytes, suffix: bytes, size: int = BODY_BYTES) -> bytes:
    """``prefix`` + a JSON list of random float32 numbers + ``suffix``, ``size`` bytes
    long: one MiB of numbers, written as ``json.dumps`` writes them, repeated."""
    values = np.random.default_rng(0).standard_normal(60_000).astype(np.float32).tolist()
    text = ", ".join(map(repr, values)).encode()
    block = text[: text.rindex(b",", 0, MiB)]  # whole numbers only
    repeats = (size - len(prefix) - len(suffix)) // (len(block) + 2)
    body = prefix + b"[" + b", ".join([block] * repeats) + b"]" + suffix
    return body + b" " * (size - len(body))  # trailing whitespace: still one JSON value


def hessian_body() -> bytes:
    return numbers_body(
        b'{"model": "digits_cnn", "output_index": 0, "inputs": [{"name": "x", '
        b'"shape": [1, 1, 28, 28], "datatype": "FP32", "data": ',
        b"}]}",
    )


def infer_body() -> bytes:
    return numbers_body(
        b'{"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ',
        b"}]}",
    )


def outside_strings(body: bytes) -> int:
    """The bytes of one of these bodies outside string literals: its strings are keys
    and short values that hold no quote and no backslash."""
    assert b"\\" not in body
    return len(body) - sum(len(literal) for literal in re.findall(rb'"[^"]*"', body))


@contextmanager
def server() -> Iterator[tuple[str, int]]:
    """A fresh server with the default settings: its URL and its process id."""
    try:
        with local_server_process({"HESSIAN_DEVICE": TEST_DEVICE}, cwd=ROOT) as (url, process):
            yield url, process.pid
    except ServerDidNotStart as error:
        pytest.fail(str(error))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak since start or since the last reset) of ``pid``, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh at the current RSS (``echo 5 > /proc/<pid>/clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass(frozen=True)
class Answer:
    status_code: int
    content_type: str
    body: bytes


def post_raw(url: str, path: str, body: bytes) -> Answer:
    """POST ``body`` with the standard library's client: it hands the body to one
    ``sendall``, which lets the GIL go. (httpx's sync transport slices what is left to
    send after every ``send`` -- copies of up to the whole body with the GIL held --
    which stalled this process's own probes by hundreds of ms.)"""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return Answer(response.status, response.getheader("content-type", ""), response.read())
    finally:
        connection.close()


def assert_refused_for_json_numbers(answer: Answer, body: bytes, oip: bool) -> None:
    assert answer.status_code == 413, answer.body[:500]
    assert answer.content_type == PROBLEM
    problem = json.loads(answer.body)
    assert problem["limit_bytes"] == LIMIT
    assert problem["setting"] == SETTING
    assert problem["json_number_bytes"] == outside_strings(body)  # exact: all of the body
    assert problem["field"] == "body"
    assert f"limit of {LIMIT} ({SETTING})" in problem["detail"]
    alternative = "binary tensor extension" if oip else "base64"
    assert alternative in problem["detail"]
    if oip:
        assert problem["error"] == problem["detail"]  # what tritonclient reads


def assert_quadratic_hessian(client: httpx.Client) -> None:
    """f(x) = x*x*arange(4) at x = 2, output 2: the Hessian is diag(0, 0, 4, 0)."""
    tensor = {"name": "x", "shape": [4], "datatype": "FP32", "data": [2.0] * 4}
    response = client.post(
        "/hessian", json={"model": "quadratic4", "inputs": [tensor], "output_index": 2}
    )
    assert response.status_code == 200, response.text
    (hessian, _output) = response.json()["outputs"]
    assert hessian["shape"] == [4, 4]
    assert np.array_equal(np.reshape(hessian["data"], (4, 4)), np.diag([0.0, 0.0, 4.0, 0.0]))


def probed(
    url: str, probe: httpx.Client, sends: list[tuple[str, bytes]], rounds: int = 1
) -> list[float]:
    """Send every ``(path, body)`` at once, each from its own thread, ``rounds`` times
    one after the other; probe ``/health/live`` (1 ms apart) until all are answered.
    The probes' latencies, in s; ``answers`` every answer (or the error)."""
    answers.clear()

    def send(i: int, path: str, body: bytes) -> None:
        for _ in range(rounds):
            try:
                answers.append(post_raw(url, path, body))
            except OSError as error:
                answers.append(error)

    senders = [
        threading.Thread(target=send, args=(i, path, body), daemon=True)
        for i, (path, body) in enumerate(sends)
    ]
    for sender in senders:
        sender.start()
    probes: list[float] = []
    while any(s.is_alive() for s in senders) and len(probes) < 5000:
        started = time.perf_counter()
        response = probe.get("/health/live")
        probes.append(time.perf_counter() - started)
        assert response.status_code == 200
        time.sleep(0.001)
    for sender in senders:
        sender.join(timeout=120)
    assert len(answers) == len(sends) * rounds
    return probes


answers: list[Answer | OSError] = []  # list.append is atomic: the senders share it


def summary(probes: list[float]) -> str:
    ordered = sorted(probes) or [0.0]
    return (
        f"{len(probes)} probes, max {ordered[-1] * 1000:.1f} ms, "
        f"median {ordered[len(ordered) // 2] * 1000:.1f} ms"
    )


# The latency bounds hold on a machine at its usual speed, scaled by the slowdown measured
# right after each attempt (tests/timing.py); a shared host's speed swings within
# minutes, so each scenario may run up to ATTEMPTS times and one attempt must meet the
# bound. Every attempt's answers are checked in full.
ATTEMPTS = 3


def test_liveness_under_50_ms_while_four_57_mib_json_bodies_arrive() -> None:
    sends = [("/hessian", hessian_body())] * 4 + [(INFER, infer_body())]
    hessian, infer = sends[0][1], sends[-1][1]
    attempts: list[tuple[float, float]] = []  # (slowest probe, slowdown)
    with server() as (url, pid), httpx.Client(base_url=url, timeout=10, trust_env=False) as probe:
        probe.get("/health/live")  # the connection is open before the clock starts
        for _ in range(ATTEMPTS):
            reset_peak(pid)
            before = memory_kib(pid)
            started = time.perf_counter()
            probes = probed(url, probe, sends)
            elapsed = time.perf_counter() - started
            after = memory_kib(pid)
            factor = slowdown()
            print(
                f"/health/live while 4 x {BODY_BYTES >> 20} MiB JSON bodies went to /hessian "
                f"and 1 to /v2 infer ({elapsed:.1f} s): {summary(probes)}; server peak RSS "
                f"+{(after['VmHWM'] - before['VmRSS']) / 1024:.0f} MiB; slowdown {factor:.2f}"
            )
            assert [a.status_code for a in answers if isinstance(a, Answer)] == [413] * len(sends)
            for answer in answers:
                assert isinstance(answer, Answer)
                oip = b"error" in answer.body
                assert_refused_for_json_numbers(answer, infer if oip else hessian, oip=oip)
            assert sum(b"error" in a.body for a in answers if isinstance(a, Answer)) == 1
            assert len(probes) >= 10, "the bodies were refused too quickly to probe"
            attempts.append((max(probes), factor))
            if max(probes) < 0.050 * factor:
                break
        assert_quadratic_hessian(probe)
    assert any(worst < 0.050 * factor for worst, factor in attempts), attempts


def test_liveness_under_50_ms_while_four_bodies_just_under_the_limit_are_parsed() -> None:
    # 120 digits as JSON numbers, ~1.8 MiB outside strings, under a shape of one: each
    # body is accepted, parsed, validated and decoded (off the event loop) before the
    # service finds that it holds 94,080 numbers where the shape says 784.
    x = np.random.default_rng(1).random((120, 1, 28, 28), dtype=np.float32)
    tensor = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}
    body = json.dumps({"model": "digits_cnn", "inputs": [tensor], "output_index": 0}).encode()
    assert 0.8 * LIMIT < outside_strings(body) <= LIMIT
    # Each parse (jiter, ~8 ms) and decode (numpy, ~8 ms) holds the GIL throughout; the
    # loop waits for the one running when it wakes: measured max 37-58 ms, median 20-29 ms
    # here, and 168 ms / 62 ms when FastAPI parsed on the loop. The median must stay
    # under 50 ms and the slowest under 100 ms (times the slowdown).
    attempts: list[tuple[float, float, float]] = []  # (median, slowest, slowdown)
    with server() as (url, _pid), httpx.Client(base_url=url, timeout=60, trust_env=False) as probe:
        probe.get("/health/live")
        for _ in range(ATTEMPTS):
            probes = probed(url, probe, [("/hessian", body)] * 4, rounds=5)
            factor = slowdown()
            print(
                f"/health/live while 4 x 5 x {len(body) / MiB:.1f} MiB JSON-number bodies were "
                f"parsed for /hessian: {summary(probes)}; slowdown {factor:.2f}"
            )
            assert len(answers) == 20
            for answer in answers:
                assert isinstance(answer, Answer)
                assert answer.status_code == 422, answer.body[:500]
                problem = json.loads(answer.body)
                assert problem["field"] == "inputs[0].data"
                assert "holds 94080 numbers; shape expects 784" in problem["detail"]
            assert len(probes) >= 5, "the bodies were answered too quickly to probe"
            median = sorted(probes)[len(probes) // 2]
            attempts.append((median, max(probes), factor))
            if median < 0.050 * factor and max(probes) < 0.100 * factor:
                break
        assert_quadratic_hessian(probe)
    assert any(m < 0.050 * f and worst < 0.100 * f for m, worst, f in attempts), attempts


def test_a_refused_57_mib_json_body_costs_at_most_three_times_its_size() -> None:
    body = hessian_body()
    with server() as (url, pid), httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        assert_quadratic_hessian(client)  # every code path warm
        reset_peak(pid)
        before = memory_kib(pid)
        answer = post_raw(url, "/hessian", body)
        after = memory_kib(pid)
        peak = (after["VmHWM"] - before["VmRSS"]) * 1024
        print(
            f"server RSS {before['VmRSS'] / 1024:.0f} MiB before a {len(body) >> 20} MiB JSON "
            f"body, peak +{peak / MiB:.1f} MiB while answering it ({peak / len(body):.2f}x "
            f"the body): {answer.status_code}"
        )
        assert_refused_for_json_numbers(answer, body, oip=False)
        assert_quadratic_hessian(client)
    assert peak <= 3 * len(body)
