"""Contention benchmark: one server's latency idle and beside neighbour processes.

A server always shares its cores -- with its event loop, its other workers, and whatever
else runs on the host -- and torch's OpenMP threads spin-wait for each other by default
(libgomp: about 300,000 spins before sleeping), so a busy neighbour that takes a core
from one spinning thread can stall the whole parallel region. This benchmark measures
that end to end with real servers on 127.0.0.1, one per setting, all started at once:

- workloads: one mlp_tanh Hessian (1 sample) and one digits_cnn Hessian of a 32-sample
  batch, both answered in the binary encoding, read by a raw-socket client into a
  preallocated buffer (so the client costs little CPU of its own);
- neighbours, started here and bounded in time (each exits at its deadline and is killed
  on exit): ``spin`` (a Python loop, one core), ``torch_matmul`` (512x512 matmuls with
  torch's default threads: every core), ``jax_jit`` (a jitted matmul loop on XLA's
  thread pool, when JAX is importable: the ``bench`` extra), ``torch_hessians`` (a
  second torch process computing the same Hessians in a loop); each neighbour runs
  with the OpenMP defaults a foreign process would have;
- settings: ``torch_defaults`` (torch imported before the app, so the service's
  defaults cannot apply: what the server did before), ``defaults_1_thread`` (the same
  with one intra-op thread), and the service's defaults ``passive``
  (``OMP_WAIT_POLICY=PASSIVE``) with torch's threads and ``passive_1_thread``
  (cores - 1 intra-op threads, leaving a core to the event loop).

Settings are interleaved within every neighbour phase (the order rotates per round), so
the machine's other load hits them alike. The machine is shared and noisy: the load
average is printed at the start and the end; read ratios, not single figures.

    python -m bench.contention                       # make bench-contention
    python -m bench.contention --rounds 2 --neighbours spin torch_matmul
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np

from bench.serving import ROOT
from hessian_service.compute_env import COMPUTE_ENV_DEFAULTS
from hessian_service.local_server import ALLOCATOR_ENV, local_server

# One 784x784 float32 Hessian per sample.
HESSIAN_BYTES = 784 * 784 * 4
# Keys a neighbour (a foreign process) must not inherit from the service's defaults.
OPENMP_KEYS = tuple(COMPUTE_ENV_DEFAULTS)


@dataclass(frozen=True)
class Workload:
    """One request body and the least number of bytes its binary answer carries."""

    name: str
    body: bytes
    min_bytes: int


def workloads() -> list[Workload]:
    """mlp_tanh, 1 sample; digits_cnn, 32 samples (output 3; inputs in base64)."""
    import base64

    rng = np.random.default_rng(0)
    out = []
    for name, model, batch in (("mlp_tanh", "mlp_tanh", 1), ("digits_cnn_x32", "digits_cnn", 32)):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        body = {
            "model": model,
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": base64.b64encode(x.tobytes()).decode(),
                }
            ],
            "output_index": 3,
            "encoding": "binary",
        }
        out.append(Workload(name, json.dumps(body).encode(), batch * HESSIAN_BYTES))
    return out


class RawClient:
    """HTTP/1.1 keep-alive POSTs on a blocking socket, the body read with ``recv_into`` a
    preallocated buffer: a few tens of microseconds of client CPU per request (httpx
    reads a 78 MB body at about 100-150 MB/s here, which would time the client)."""

    def __init__(self, url: str, capacity: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.sock = self._connect()
        self.buffer = memoryview(bytearray(capacity))

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def post(self, path: str, body: bytes) -> int:
        """Send ``body``, read the whole answer; its body length (ValueError if not 200).
        Once on a fresh connection if the server closed an idle one (uvicorn's keep-alive
        timeout is 5 s; a neighbour's start-up takes longer)."""
        try:
            return self._post(path, body)
        except (ConnectionError, BrokenPipeError):
            self.sock.close()
            self.sock = self._connect()
            return self._post(path, body)

    def _post(self, path: str, body: bytes) -> int:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            received += chunk
        header, _, rest = received.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(fields.get("content-length", "0"))
        if length > len(self.buffer):
            raise ValueError(f"a {length}-byte answer is larger than the buffer")
        self.buffer[: len(rest)] = rest
        got = len(rest)
        while got < length:
            n = self.sock.recv_into(self.buffer[got:length])
            if not n:
                raise ConnectionError("the server closed the connection mid-body")
            got += n
        if status != 200:
            raise ValueError(f"HTTP {status}: {bytes(self.buffer[: min(length, 500)])!r}")
        return length

    def close(self) -> None:
        self.sock.close()


# Neighbour programs: argv[1] is the monotonic deadline; each prints "ready" once warm.
_SPIN = """
import sys, time
deadline = float(sys.argv[1]); print("ready", flush=True)
while time.monotonic() < deadline:
    pass
"""
_TORCH_MATMUL = """
import sys, time, torch
deadline = float(sys.argv[1]); a = torch.randn(512, 512); a @ a; print("ready", flush=True)
while time.monotonic() < deadline:
    a @ a
"""
_JAX_JIT = """
import sys, time, jax, jax.numpy as jnp
deadline = float(sys.argv[1])
f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
a = jnp.ones((512, 512), jnp.float32) / 512; f(a).block_until_ready(); print("ready", flush=True)
while time.monotonic() < deadline:
    f(a).block_until_ready()
"""
_TORCH_HESSIANS = """
import sys, time, torch
from bench.models import bundled
from hessian_service import engine
deadline = float(sys.argv[1])
mlp, cnn = bundled("mlp_tanh"), bundled("digits_cnn")
one, batch = torch.rand(1, 1, 28, 28), torch.rand(32, 1, 28, 28)
engine.hessian(mlp, one, output_index=3); print("ready", flush=True)
while time.monotonic() < deadline:
    engine.hessian(mlp, one, output_index=3)
    engine.hessian(cnn, batch, output_index=3)
"""
NEIGHBOURS = {
    "spin": _SPIN,
    "torch_matmul": _TORCH_MATMUL,
    "jax_jit": _JAX_JIT,
    "torch_hessians": _TORCH_HESSIANS,
}


def jax_importable() -> bool:
    """Whether ``jax`` imports in this interpreter (the ``bench`` extra), in a child."""
    check = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True, timeout=60)
    return check.returncode == 0


def foreign_env() -> dict[str, str]:
    """This environment as an unrelated process would have it: no service settings, no
    OpenMP settings (libgomp's defaults), the allocator settings."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_KEYS}
    return {**env, **ALLOCATOR_ENV, "PYTHONPATH": str(ROOT)}


@contextmanager
def neighbour(name: str, limit_s: float) -> Iterator[None]:
    """Run neighbour ``name`` until it is stopped or ``limit_s`` passes, once it is warm."""
    deadline = time.monotonic() + limit_s
    process = subprocess.Popen(
        [sys.executable, "-c", NEIGHBOURS[name], str(deadline)],
        env=foreign_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded: the child exits by its deadline
        if line.strip() != b"ready":
            raise RuntimeError(f"neighbour {name} did not start (exit {process.poll()})")
        time.sleep(0.5)  # its threads are running
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# Each setting: extra server environment, and whether torch is imported before the app
# (then the service's OpenMP defaults cannot apply and libgomp keeps its own).
SETTINGS: dict[str, tuple[dict[str, str], bool]] = {
    "torch_defaults": ({}, True),
    "defaults_1_thread": ({"HESSIAN_TORCH_THREADS": "1"}, True),
    "passive": ({}, False),
    "passive_1_thread": ({"HESSIAN_TORCH_THREADS": "1"}, False),
}


@contextmanager
def setting_server(name: str) -> Iterator[str]:
    """One server for setting ``name`` on 127.0.0.1 (CPU, no access log)."""
    settings, torch_first = SETTINGS[name]
    quiet = {"HESSIAN_DEVICE": "cpu", "HESSIAN_ACCESS_LOG": "false", **settings}
    options = ("--no-access-log", "--log-level", "warning")
    launcher = None
    if torch_first:
        # `env -u` drops the defaults that server_env adds; torch is imported (and libgomp
        # reads its environment) before hessian_service.main could set them.
        unset = [arg for key in OPENMP_KEYS for arg in ("-u", key)]
        start = "import torch, uvicorn; uvicorn.main()"
        launcher = ["env", *unset, sys.executable, "-c", start, "hessian_service.main:app"]
    with local_server(quiet, uvicorn_options=options, cwd=ROOT, launcher=launcher) as url:
        yield url


def measure(
    client: RawClient, work: Workload, repeats: int, limit_s: float, into: list[float]
) -> None:
    """Append up to ``repeats`` latencies (ms) of ``work`` to ``into``, within ``limit_s``."""
    stop_at = time.perf_counter() + limit_s
    for _ in range(repeats):
        started = time.perf_counter()
        length = client.post("/hessian", work.body)
        into.append((time.perf_counter() - started) * 1000)
        if length < work.min_bytes:
            raise ValueError(f"{work.name}: {length} bytes, expected at least {work.min_bytes}")
        if time.perf_counter() > stop_at:
            break


def table(results: Mapping[str, Mapping[str, Mapping[str, list[float]]]]) -> list[str]:
    """Markdown rows: per workload, setting and neighbour, median idle and loaded, ratio."""
    rows = [
        "| workload | setting | neighbour | idle ms | loaded ms | loaded / idle |",
        "|---|---|---|---:|---:|---:|",
    ]
    for work, by_setting in results.items():
        for setting, by_neighbour in by_setting.items():
            idle = statistics.median(by_neighbour["idle"])
            for name, values in by_neighbour.items():
                if name == "idle" or not values:
                    continue
                loaded = statistics.median(values)
                rows.append(
                    f"| {work} | {setting} | {name} | {idle:.1f} | {loaded:.1f} | "
                    f"{loaded / idle:.2f}x |"
                )
    return rows


def run_round(
    clients: Mapping[str, RawClient],
    work: list[Workload],
    round_: int,
    phase: str,
    results: dict[str, dict[str, dict[str, list[float]]]],
    args: argparse.Namespace,
) -> None:
    """One pass over the settings (their order rotated by ``round_``), both workloads each."""
    settings = list(clients)
    shift = round_ % len(settings)
    for setting in settings[shift:] + settings[:shift]:
        for w in work:
            repeats = args.mlp_repeats if w.name == "mlp_tanh" else args.batch_repeats
            into = results[w.name][setting][phase]
            measure(clients[setting], w, repeats, args.cell_limit_s, into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the settings")
    parser.add_argument("--mlp-repeats", type=int, default=7, help="per setting and round")
    parser.add_argument("--batch-repeats", type=int, default=3, help="per setting and round")
    parser.add_argument("--cell-limit-s", type=float, default=6.0, help="per workload pass")
    parser.add_argument("--neighbours", nargs="+", default=list(NEIGHBOURS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    neighbours = [n for n in args.neighbours if n != "jax_jit" or jax_importable()]
    skipped = sorted(set(args.neighbours) - set(neighbours))
    print(
        f"# contention: {os.cpu_count()} CPUs (shared with other work: noisy), load average "
        f"at start {os.getloadavg()}; settings {args.settings}; neighbours {neighbours}"
        + (f" (not importable, skipped: {skipped})" if skipped else "")
        + "; --workers 2 is not measured: the service does not build workers yet"
    )
    work = workloads()
    capacity = max(w.min_bytes for w in work) + (1 << 20)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        w.name: {s: {"idle": [], **{n: [] for n in neighbours}} for s in args.settings}
        for w in work
    }
    # Each neighbour phase's worst case, so that a stuck phase still ends.
    phase_s = args.rounds * len(args.settings) * len(work) * (args.cell_limit_s + 5) + 60
    with ExitStack() as stack:
        urls = {s: stack.enter_context(setting_server(s)) for s in args.settings}
        clients = {s: RawClient(url, capacity) for s, url in urls.items()}
        for client in clients.values():
            stack.callback(client.close)
            for w in work:  # warm-up, not measured
                measure(client, w, 2, 30, [])
        for phase in ["idle", *neighbours, "idle"]:
            with ExitStack() as running:
                if phase != "idle":
                    running.enter_context(neighbour(phase, phase_s))
                for round_ in range(args.rounds):
                    run_round(clients, work, round_, phase, results, args)
            print(f"# {phase} done, load average {os.getloadavg()}", flush=True)
    for row in table(results):
        print(row)
    print(f"# load average at end {os.getloadavg()}")
    medians = {
        f"{w}/{s}/{n}": round(statistics.median(v), 2)
        for w, by_s in results.items()
        for s, by_n in by_s.items()
        for n, v in by_n.items()
        if v
    }
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
