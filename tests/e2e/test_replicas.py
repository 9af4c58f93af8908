"""Replicas behind the project's nginx (deploy/nginx.conf), on 127.0.0.1, one killed mid-load.

Three real uvicorn replicas of the service and Debian's nginx running the committed
``deploy/nginx.conf`` byte for byte but for its ``listen`` line (a free 127.0.0.1 port);
``nginx-servers.conf`` is the committed one with each replica's address replaced by a
loopback port, its parameters (``max_fails``, ``fail_timeout``) kept.

The load: 8 client threads, 300 /hessian and /jacobian requests on the bundled mlp_tanh and
digits_cnn, through the project's client with its own retries OFF, so that every failure
nginx does not absorb shows. A third of the way in, one replica is SIGKILLed. Every request
must answer 200 with the right values: float64 references computed here with torch.func on
the bundled weights (independent of the service's engine), max |error| <= 1e-5 max |ref|.
One exception, counted apart: a response the dying replica had begun to send is cut, which
no proxy can resume; that request is sent once more (see ``send``).
Then the killed replica is restarted on its port and must take traffic again: its own
``/metrics`` counts derivative requests that came through nginx.

nginx missing: skipped here, failed in CI (``make nginx`` installs Debian's package).
Bounded: ~30-40 s on an idle 2-core machine (the replicas start in parallel); every wait
has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pytest
import torch
from hessian_client import Client, HessianServiceError
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.local_server import (
    LOCALHOST,
    free_port,
    server_env,
    uvicorn_command,
    wait_until_ready,
)
from hessian_service.repository import zoo
from tests.device import TEST_DEVICE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
NGINX_SERVERS = ROOT / "deploy" / "nginx-servers.conf"
LISTEN_LINE = re.compile(r"^(\s*)listen 8080;$", re.MULTILINE)
SERVER_LINE = re.compile(r"^server\s+(\S+)(.*);\s*$", re.MULTILINE)

REPLICAS = 3
CLIENT_THREADS = 8
REQUESTS = 300
KILL_AFTER = 100  # completed requests before the SIGKILL
RELATIVE_TOLERANCE = 1e-5  # float32 answers against float64 references
# A deadline, not the expected time (replicas are ready in ~10 s on an idle 2-core machine;
# beside other torch processes the three imports can take a minute).
READY_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 60.0
REJOIN_TIMEOUT_S = 30.0


def nginx_binary() -> str:
    """Debian's nginx (in /usr/sbin, which a non-root PATH may lack); skip or, in CI, fail."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        message = "nginx is not installed; `make nginx` installs Debian's package (needs root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} -- CI must run the replica test")
        pytest.skip(message)
    return found


# --------------------------------------------------------------------------- processes


@dataclass
class Replica:
    """One uvicorn replica on a fixed 127.0.0.1 port, startable again on the same port."""

    port: int
    log: IO[bytes]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        settings = {
            "HESSIAN_DEVICE": TEST_DEVICE,
            # Three replicas, nginx and 8 client threads share this machine's cores: one
            # intra-op thread each, as the compose profile does.
            "HESSIAN_TORCH_THREADS": "1",
            "HESSIAN_ACCESS_LOG": "false",
        }
        self.process = subprocess.Popen(
            uvicorn_command(LOCALHOST, self.port, ["--no-access-log"]),
            cwd=ROOT,
            env=server_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        why_not = wait_until_ready(self.process, self.url, max(deadline - time.monotonic(), 0.0))
        if why_not is not None:
            pytest.fail(f"replica :{self.port}: {why_not}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to open connections, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def render_nginx(folder: Path, listen_port: int, replica_ports: list[int]) -> Path:
    """The committed nginx files in ``folder``; only the listen line and the replicas'
    addresses differ. Returns the path of nginx.conf."""
    conf = NGINX_CONF.read_text()
    rendered_conf, found = LISTEN_LINE.subn(rf"\1listen {LOCALHOST}:{listen_port};", conf)
    assert found == 1, "deploy/nginx.conf must have exactly one `listen 8080;` line"
    (folder / "nginx.conf").write_text(rendered_conf)
    servers = NGINX_SERVERS.read_text()
    committed = SERVER_LINE.findall(servers)
    assert len(committed) == len(replica_ports), "one committed server line per replica"
    ports = iter(replica_ports)
    rendered = SERVER_LINE.sub(lambda m: f"server {LOCALHOST}:{next(ports)}{m.group(2)};", servers)
    (folder / "nginx-servers.conf").write_text(rendered)
    return folder / "nginx.conf"


@dataclass
class Cluster:
    url: str
    replicas: list[Replica]
    access_log: Path
    error_log: Path
    started_s: float = 0.0

    def access_entries(self) -> list[dict[str, Any]]:
        """Every nginx access-log line so far, parsed (the committed JSON log_format)."""
        lines = self.access_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nginx = nginx_binary()
    folder = Path(tempfile.mkdtemp(prefix="hessian-nginx-"))
    # Traversable by nginx's workers, which run as `nobody` when the master is root (CI).
    folder.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    prefix = folder / "prefix"
    prefix.mkdir()
    access_log, error_log = folder / "access.log", folder / "error.log"
    logs: list[IO[bytes]] = []
    replicas: list[Replica] = []
    nginx_process: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        ports = [free_port() for _ in range(REPLICAS)]
        logs = [(folder / f"replica-{i}.log").open("ab") for i in range(REPLICAS)]
        replicas = [Replica(port, log) for port, log in zip(ports, logs, strict=True)]
        lb_port = free_port()
        conf = render_nginx(folder, lb_port, ports)
        for replica in replicas:  # all at once: they import torch in parallel
            replica.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for replica in replicas:
            replica.wait_ready(deadline)
        command = [nginx, "-c", str(conf), "-p", f"{prefix}/", "-e", "stderr"]
        command += ["-g", f"daemon off; pid {folder / 'nginx.pid'};"]
        with access_log.open("wb") as out, error_log.open("wb") as err:
            nginx_process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        url = f"http://{LOCALHOST}:{lb_port}"
        _wait_for_nginx(url, nginx_process, error_log)
        yield Cluster(url, replicas, access_log, error_log, started_s=time.monotonic() - started)
    finally:
        if nginx_process is not None:
            _stop(nginx_process)
        for replica in replicas:
            replica.stop()
        for log in logs:
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_nginx(url: str, process: subprocess.Popen[bytes], error_log: Path) -> None:
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=url, timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"nginx exited ({process.returncode}):\n{error_log.read_text()}")
            try:
                if http.get("/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    pytest.fail(f"nginx did not answer in 10 s:\n{error_log.read_text()}")


# --------------------------------------------------------------------------- references


@cache
def network(name: str) -> torch.nn.Module:
    """A bundled model built from the zoo and its safetensors weights, in float64."""
    model = zoo.build(name)
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / name / "weights.safetensors")))
    model = model.to(torch.float64).eval()
    model.requires_grad_(False)
    return model


def reference(kind: str, model: str, x: np.ndarray, output_index: int | None) -> np.ndarray:
    """d2 f_k / dx2 (hessian, one output) or df / dx (jacobian, all outputs) in float64 by
    torch.func, shaped as the service answers: [n, n] / [B, n, n] or [m, n]."""
    net = network(model)
    batch = x.reshape(-1, 1, 28, 28)
    answers = []
    for sample in torch.from_numpy(batch.astype(np.float64)):
        flat = sample.reshape(-1)
        if kind == "hessian":

            def f(v: torch.Tensor) -> torch.Tensor:
                return net(v.reshape(1, 1, 28, 28))[0, output_index]

            answers.append(torch.func.hessian(f)(flat).numpy())
        else:

            def g(v: torch.Tensor) -> torch.Tensor:
                return net(v.reshape(1, 1, 28, 28))[0]

            answers.append(torch.func.jacrev(g)(flat).numpy())
    stacked = np.stack(answers)
    return stacked if x.ndim == 4 else stacked[0]


@dataclass(frozen=True)
class Case:
    kind: str
    model: str
    x: np.ndarray
    output_index: int | None
    expected: np.ndarray


@cache
def cases() -> tuple[Case, ...]:
    """Six distinct requests: mlp_tanh Hessians of three outputs at three inputs, a batch
    of two (4.9 MB: more than nginx's 4 MiB of memory buffers, so it goes through
    proxy_temp), and two digits_cnn Jacobians."""
    rng = np.random.default_rng(18)
    sample = json.loads((BUNDLED_MODELS_DIR / "digits_sample.json").read_text())
    digit = np.asarray(sample["data"], np.float32).reshape(1, 28, 28)
    noisy = [(digit + 0.3 * rng.standard_normal(digit.shape)).astype(np.float32) for _ in range(4)]
    specs = [
        ("hessian", "mlp_tanh", digit, 2),
        ("hessian", "mlp_tanh", noisy[0], 0),
        ("hessian", "mlp_tanh", noisy[1], 7),
        ("hessian", "mlp_tanh", np.stack([noisy[2], digit]), 3),
        ("jacobian", "digits_cnn", digit, None),
        ("jacobian", "digits_cnn", noisy[3], None),
    ]
    built = []
    for kind, model, x, index in specs:
        expected = reference(kind, model, x, index)
        assert np.abs(expected).max() > 1e-3, "a vacuous reference"
        built.append(Case(kind, model, x, index, expected))
    return tuple(built)


def relative_error(answer: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(answer.astype(np.float64) - expected).max() / np.abs(expected).max())


# --------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    case: int
    seconds: float
    error: str | None = None  # the request was lost: no 200
    relative_error: float | None = None
    cut: bool = False  # its first response was cut mid-body, and sending it again worked


def send(client: Client, index: int) -> Outcome:
    """One request through nginx; its answer checked against the float64 reference.

    nginx resends a request to another replica only until the response has begun: a
    replica that dies while writing a response's body cuts that response (HTTP cannot
    resume it; the client sees a connection closed mid-body). The project's client resends
    such a request by default; here, with its retries off, that one resend is done here,
    counted apart (``cut``), and allowed once per request. A status error is never resent.
    """
    case = cases()[index % len(cases())]
    call = client.hessian if case.kind == "hessian" else client.jacobian
    started = time.perf_counter()
    cut = False
    while True:
        try:
            answer = call(case.model, case.x, output_index=case.output_index, as_numpy=True)
            break
        except HessianServiceError as error:
            if not cut and isinstance(error.__cause__, httpx.TransportError):
                cut = True
                continue
            return Outcome(index, time.perf_counter() - started, error=str(error)[:300], cut=cut)
    seconds = time.perf_counter() - started
    if answer.shape != case.expected.shape:
        return Outcome(index, seconds, relative_error=float("inf"), cut=cut)
    return Outcome(index, seconds, relative_error=relative_error(answer, case.expected), cut=cut)


def derivative_requests(replica: Replica) -> float:
    """/hessian and /jacobian requests this replica answered, from its own /metrics."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10, trust_env=False).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "hessian_requests_total" and s.labels.get("route") in ("/hessian", "/jacobian")
    )


def upstream_errors(error_log: str) -> dict[str, int]:
    """nginx's own account of the failed tries: refused connections, replicas gone before
    their response header (nginx resends these), and replicas gone mid-body (cut)."""
    lines = [line for line in error_log.splitlines() if "upstream" in line]
    return {
        "refused": sum("Connection refused" in line for line in lines),
        "before_header": sum(
            "while reading response header from upstream" in line for line in lines
        ),
        "mid_body": sum("while reading upstream" in line for line in lines),
    }


def served_by(entries: list[dict[str, Any]], replica: Replica) -> int:
    """Requests whose final try went to ``replica`` (nginx lists every try)."""
    address = f"{LOCALHOST}:{replica.port}"
    return sum(1 for e in entries if e["upstream"].split(", ")[-1] == address)


# --------------------------------------------------------------------------- tests


def test_balancer_serves_models_read_only(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=10, trust_env=False) as http:
        listed = http.get("/models")
        assert listed.status_code == 200
        assert {"mlp_tanh", "digits_cnn"} <= {m["name"] for m in listed.json()["models"]}
        for method, path in (("POST", "/models"), ("DELETE", "/models/mlp_tanh")):
            refused = http.request(method, path)
            assert refused.status_code == 405, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.headers["allow"] == "GET, HEAD"
            problem = refused.json()
            assert problem["status"] == 405 and problem["detail"].startswith("method:")
            assert "each replica" in problem["detail"]


def test_service_errors_pass_through_untried_elsewhere(cluster: Cluster) -> None:
    """A 4xx of the service is its answer, not a failure: no retry, its own problem body."""
    before = len(cluster.access_entries())
    with httpx.Client(base_url=cluster.url, timeout=10, trust_env=False) as http:
        response = http.post("/hessian", json={"model": "no_such_model", "inputs": []})
    assert response.status_code in (404, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == response.status_code
    time.sleep(0.2)  # nginx writes the log line after the response
    entry = cluster.access_entries()[before:][-1]
    assert entry["uri"] == "/hessian" and "," not in entry["upstream"], entry


def test_too_large_body_is_refused_before_it_is_read(cluster: Cluster) -> None:
    """Content-Length over client_max_body_size (64 MiB, the service's body limit): 413 at
    once, as problem+json, without sending a byte of the body."""
    port = int(cluster.url.rsplit(":", 1)[1])
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        sock.sendall(
            b"POST /hessian HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {64 * 2**20 + 1}\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/problem+json" in head
    problem = json.loads(body)
    assert problem["status"] == 413 and problem["detail"].startswith("body:")
    assert "HESSIAN_MAX_BODY_BYTES" in problem["detail"]


def test_a_replica_killed_mid_load_loses_nothing_and_rejoins(
    cluster: Cluster, record_property: Any
) -> None:
    cases()  # the references, before any clock starts
    victim = cluster.replicas[0]
    log_start = len(cluster.access_entries())
    done = 0
    done_lock = threading.Lock()
    kill_now = threading.Event()
    local = threading.local()
    clients: list[Client] = []

    def job(index: int) -> Outcome:
        nonlocal done
        if not hasattr(local, "client"):
            # Retries OFF: only nginx may hide a failure.
            local.client = Client(cluster.url, retries=0, timeout=60, trust_env=False)
            clients.append(local.client)
        outcome = send(local.client, index)
        with done_lock:
            done += 1
            if done == KILL_AFTER:
                kill_now.set()
        return outcome

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            futures = [pool.submit(job, i) for i in range(REQUESTS)]
            assert kill_now.wait(LOAD_TIMEOUT_S), "the load did not reach the kill point"
            served_before_kill = served_by(cluster.access_entries()[log_start:], victim)
            victim.kill()
            _done, pending = wait(futures, timeout=LOAD_TIMEOUT_S)
            assert not pending, f"{len(pending)} requests unanswered after {LOAD_TIMEOUT_S} s"
        load_s = time.monotonic() - started
        outcomes = [f.result() for f in futures]
    finally:
        for client in clients:
            client.close()

    lost = [o for o in outcomes if o.error is not None]
    cut = [o for o in outcomes if o.cut]
    errors = [o.relative_error for o in outcomes if o.relative_error is not None]
    wrong = [e for e in errors if e > RELATIVE_TOLERANCE]
    time.sleep(0.2)
    entries = cluster.access_entries()[log_start:]
    load_entries = [e for e in entries if e["uri"] in ("/hessian", "/jacobian")]
    retried = [e for e in load_entries if "," in e["upstream"]]
    latencies = np.array([o.seconds for o in outcomes]) * 1000
    nginx_errors = upstream_errors(cluster.error_log.read_text())
    per_replica = {f":{r.port}": served_by(load_entries, r) for r in cluster.replicas}
    figures = {
        "requests": len(outcomes),
        "lost": len(lost),
        "wrong": len(wrong),
        "retried_by_nginx": len(retried),
        "cut_mid_body_then_resent": len(cut),
        "nginx_upstream_errors": nginx_errors,
        "served_by_victim_before_kill": served_before_kill,
        "served_per_replica": per_replica,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "max_ms": round(float(latencies.max()), 1),
        "load_s": round(load_s, 2),
        "max_relative_error": max(errors) if errors else None,
        "startup_s": round(cluster.started_s, 1),
    }
    print(f"replica kill under load: {json.dumps(figures)}")
    for key, value in figures.items():
        record_property(key, value)

    assert not lost, f"{len(lost)} requests lost, e.g. {lost[:3]}"
    # Only responses under way on the victim at the kill can be cut: at most one per client.
    assert len(cut) <= CLIENT_THREADS, f"{len(cut)} responses cut mid-body"
    assert len(cut) <= nginx_errors["mid_body"], "a cut that nginx did not see as one"
    assert not wrong, f"{len(wrong)} wrong answers (max relative error {max(wrong):.2e})"
    assert len(load_entries) == REQUESTS + len(cut), "nginx logged every request (and resend)"
    assert all(e["status"] == 200 for e in load_entries)
    assert served_before_kill > 0, "the victim took no traffic before it was killed"
    # The kill hit the traffic path: some request met the dead replica and went on.
    assert retried, "no request was retried: the kill never reached a request"
    assert all(e["upstream_status"].split(", ")[-1] == "200" for e in retried)

    # -------------------------------------------------------------- the victim comes back
    restart = time.monotonic()
    victim.start()
    victim.wait_ready(time.monotonic() + READY_TIMEOUT_S)
    ready = time.monotonic()
    assert derivative_requests(victim) == 0, "a fresh process counts from zero"
    rejoined = 0.0
    sent = 0
    case_count = len(cases())
    with Client(cluster.url, retries=0, timeout=60, trust_env=False) as client:
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            outcome = send(client, sent % case_count)
            sent += 1
            assert outcome.error is None, f"lost after the restart: {outcome.error}"
            assert outcome.relative_error is not None
            assert outcome.relative_error <= RELATIVE_TOLERANCE
            rejoined = derivative_requests(victim)
            if rejoined >= 3:
                break
            time.sleep(0.05)
    restart_s, rejoin_s = ready - restart, time.monotonic() - ready
    print(
        f"restarted replica :{victim.port}: ready {restart_s:.1f} s after its start, then took "
        f"{rejoined:.0f} of the next {sent} requests within {rejoin_s:.1f} s"
    )
    record_property("restart_s", round(restart_s, 1))
    record_property("rejoin_s", round(rejoin_s, 1))
    assert rejoined >= 3, f"the restarted replica took {rejoined:.0f} requests in {sent}"
    time.sleep(0.2)
    final = cluster.access_entries()[log_start + len(entries) :]
    assert served_by(final, victim) >= 3, "nginx's log shows the restarted replica serving"
