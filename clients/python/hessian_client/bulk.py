"""Many inputs -> one file of Hessians (or Jacobians), with memory that stays flat.

``run`` sends the inputs in batches of ``batch_size`` with at most ``concurrency``
requests in flight, asks for the binary encoding, and streams each response's bytes
straight to their place in the output file: no response is ever held whole, so 10,000
784x784 Hessians (25 GB) cost the client the same memory as 10.

Failure and resume (the choice, documented): results go to ``<out>.partial`` and a
resume record ``<out>.partial.json`` lists the batches that are complete. Each request
is retried on 429/503 and connection failures (the client's retry policy). When a batch
still fails -- the server went away for good -- the run stops, leaves ``<out>.partial``
and the record, never writes ``<out>``, and raises ``HessianServiceError`` saying how
many batches are saved. Calling again with ``resume=True`` (same inputs and options)
sends only the missing batches; the file is renamed to ``<out>`` only when all are in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeAlias

import httpx
import numpy as np

from hessian_client._arrays import Encoding, Kind, Result, as_array
from hessian_client._wire import (
    HEADER_LENGTH,
    NUMPY_DTYPES,
    HessianServiceError,
    binary_layout,
    derivative_body,
)
from hessian_client.files import PARTIAL_SUFFIX, Inputs, OutputFile

InputsLike: TypeAlias = "np.ndarray | str | os.PathLike[str] | Any"
RECORD_SUFFIX = PARTIAL_SUFFIX + ".json"


class DerivativeClient(Protocol):
    """What ``run`` needs of a client; ``hessian_client.Client`` is one.

    A protocol rather than ``Client`` itself: the client calls ``run``, so ``run``
    importing the client would make the two modules import each other.
    """

    def model(self, name: str) -> dict[str, Any]:
        """The model's description (``run`` reads its ``input_shape``)."""
        ...

    def compute(
        self,
        kind: Kind,
        model: str,
        x: Any,
        *,
        output_index: int | list[int] | None = None,
        objective: dict[str, Any] | None = None,
        layout: str = "matrix",
        precision: str = "float32",
        encoding: Encoding = "binary",
    ) -> Result:
        """One whole answer (``run`` sends one sample first to learn the result's shape)."""
        ...

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        consume: Callable[[httpx.Response], Any] | None = None,
    ) -> Any:
        """Send with the client's retries; ``consume`` reads the streamed response."""
        ...


class Progress:
    """A one-line progress bar on stderr: done/total, percent, rate, time left."""

    def __init__(self, total: int, label: str, *, enabled: bool, stream: TextIO | None = None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._first = 0
        self._shown = 0.0

    def start(self, done: int) -> None:
        self.done = self._first = done
        self._start = time.monotonic()
        self._show(force=True)

    def update(self, count: int) -> None:
        self.done += count
        self._show(force=self.done == self.total)

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._shown < 0.2):
            return
        self._shown = now
        fraction = self.done / self.total if self.total else 1.0
        rate = (self.done - self._first) / max(now - self._start, 1e-9)
        left = f"{(self.total - self.done) / rate:5.0f} s" if rate > 0 else "    ? s"
        bar = "#" * int(fraction * 30)
        self.stream.write(
            f"\r{self.label}: {self.done}/{self.total} |{bar:<30}| {100 * fraction:5.1f}% "
            f"{rate:7.1f}/s, {left} left"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class ResumeRecord:
    """``<out>.partial.json``: a first line saying what is computed, then one line per
    finished batch. Appending a line is all a finished batch costs."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.path = out.with_name(out.name + RECORD_SUFFIX)
        self.fingerprint = fingerprint
        self._file: TextIO | None = None

    def load(self) -> set[int]:
        """Finished batches of an earlier run with the same fingerprint (else refuse)."""
        if not self.path.exists():
            return set()
        lines = self.path.read_text().splitlines()
        try:
            earlier = json.loads(lines[0])
        except (IndexError, ValueError):
            return set()
        if earlier != self.fingerprint:
            differ = sorted(k for k in self.fingerprint if earlier.get(k) != self.fingerprint[k])
            raise HessianServiceError(
                f"resume: {self.path} was written for other inputs or options (they differ "
                f"in {', '.join(differ)}); run without resume=True to start over"
            )
        return {int(line) for line in lines[1:] if line.strip().isdigit()}

    def open(self, fresh: bool) -> None:
        self._file = self.path.open("w" if fresh else "a")
        if fresh:
            self._file.write(json.dumps(self.fingerprint, sort_keys=True) + "\n")
            self._file.flush()

    def finished(self, batch: int) -> None:
        assert self._file is not None
        self._file.write(f"{batch}\n")
        self._file.flush()

    def close(self, remove: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove:
            self.path.unlink(missing_ok=True)


def _digest(inputs: Inputs, batch_size: int) -> str:
    """A hash of every input, so that a resume never mixes two input sets."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((inputs.shape, inputs.dtype.str)).encode())
    for start in range(0, len(inputs), batch_size):
        digest.update(inputs.batch(start, min(start + batch_size, len(inputs))).tobytes())
    return digest.hexdigest()


class _Stream:
    """Reads one binary-framed response and writes its ``kind`` output into the file."""

    def __init__(
        self, output: OutputFile, kind: str, first: int, shape: tuple[int, ...], datatype: str
    ):
        self.output, self.kind, self.first = output, kind, first
        self.shape, self.datatype = list(shape), datatype

    def _region(self, body: dict[str, Any]) -> tuple[int, int, int]:
        layout = binary_layout(body)
        for tensor, offset, size in layout:
            if tensor["name"] == self.kind:
                if tensor["shape"] != self.shape or tensor["datatype"] != self.datatype:
                    raise HessianServiceError(
                        f"bulk: expected {self.kind} {self.shape} {self.datatype}, got "
                        f"{tensor['shape']} {tensor['datatype']}"
                    )
                return offset, size, sum(s for _, _, s in layout)
        raise HessianServiceError(f"bulk: the response carries no binary {self.kind!r}")

    def __call__(self, response: httpx.Response) -> None:
        length_text = response.headers.get(HEADER_LENGTH)
        if length_text is None:
            raise HessianServiceError(f"bulk: the response has no {HEADER_LENGTH} header")
        header_length = int(length_text)
        head = bytearray()
        region: tuple[int, int, int] | None = None
        position = 0  # bytes of the binary tail seen so far
        for received in response.iter_bytes():
            chunk = memoryview(received)
            if region is None:
                head += chunk
                if len(head) < header_length:
                    continue
                region = self._region(json.loads(head[:header_length]))
                chunk = memoryview(bytes(head[header_length:]))
            offset, size, _ = region
            low, high = max(position, offset), min(position + len(chunk), offset + size)
            if low < high:
                self.output.write(self.first, low - offset, chunk[low - position : high - position])
            position += len(chunk)
        if region is None or position != region[2]:
            raise HessianServiceError("bulk: the response ended before all its bytes arrived")


def run(
    client: DerivativeClient,
    kind: Kind,
    model: str,
    inputs: InputsLike,
    *,
    out: str | os.PathLike[str],
    output_index: int | list[int] | None = None,
    objective: dict[str, Any] | None = None,
    layout: str = "matrix",
    precision: str = "float32",
    batch_size: int = 16,
    concurrency: int = 2,
    progress: bool = True,
    resume: bool = False,
    inputs_key: str | None = None,
) -> Path:
    """Compute ``kind`` for every input and write them, in order, to ``out``.

    ``inputs``: an array ``[N, *input_shape]``, a ``.npy`` path or a safetensors path
    (``inputs_key`` picks the tensor when it holds several). ``out``: ``.npy`` or
    ``.safetensors`` (one tensor named ``kind``), ``[N, *result_shape]``. Returns the
    path of the finished file. See the module's docstring for failures and ``resume``.
    """
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be at least 1")
    source = Inputs(
        inputs if isinstance(inputs, (str, os.PathLike)) else as_array(inputs), inputs_key
    )
    sample_shape = list(client.model(model)["input_shape"])
    if len(source.shape) != len(sample_shape) + 1 or list(source.shape[1:]) != sample_shape:
        raise HessianServiceError(
            f"bulk: inputs must be [N, {', '.join(map(str, sample_shape))}] for {model!r}, "
            f"got {list(source.shape)}"
        )
    total = len(source)
    options: dict[str, Any] = {
        "output_index": output_index,
        "objective": objective,
        "layout": layout,
    }
    options["precision"] = precision

    def body(start: int, stop: int) -> dict[str, Any]:
        x = source.batch(start, stop)
        return derivative_body(model, x, encoding="binary", **options)

    # One sample first: the server says what one result looks like.
    probe = client.compute(kind, model, source.batch(0, 1), encoding="binary", **options)
    item_shape = tuple(probe.value.shape[1:])
    datatype = next(k for k, v in NUMPY_DTYPES.items() if np.dtype(v) == probe.value.dtype)
    out_path = Path(out)
    fingerprint = {
        "kind": kind,
        "model": model,
        "model_version": probe.model_version,
        **options,
        "batch_size": batch_size,
        "inputs": _digest(source, batch_size),
        "result_shape": [total, *item_shape],
        "datatype": datatype,
    }
    record = ResumeRecord(out_path, fingerprint)
    done = record.load() if resume else set()
    batches = [(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    output = OutputFile(out_path, (total, *item_shape), probe.value.dtype, kind, keep=bool(done))
    record.open(fresh=not done)
    bar = Progress(total, f"{kind} {model}", enabled=progress)
    bar.start(sum(stop - start for i, (start, stop) in enumerate(batches) if i in done))
    lock = threading.Lock()
    failed = threading.Event()

    def task(index: int) -> None:
        if failed.is_set():
            return
        start, stop = batches[index]
        stream = _Stream(output, kind, start, (stop - start, *item_shape), datatype)
        client.request("POST", f"/{kind}", json=body(start, stop), consume=stream)
        with lock:
            record.finished(index)
            bar.update(stop - start)

    todo = [i for i in range(len(batches)) if i not in done]
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bulk") as pool:
        futures = [pool.submit(task, index) for index in todo]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failures = [f.exception() for f in finished if f.exception() is not None]
        if failures:
            failed.set()
            error = failures[0]
            for future in futures:
                future.cancel()
    bar.close()
    if error is not None:
        output.close()
        record.close(remove=False)
        saved = len(record.load())
        raise HessianServiceError(
            f"bulk {kind}: stopped after {saved} of {len(batches)} batches: {error}. The "
            f"finished batches are in {output.partial} (not {out_path}); call again with "
            "resume=True to send only the rest",
            status=getattr(error, "status", None),
            problem=getattr(error, "problem", None),
        ) from error
    path = output.finish()
    record.close(remove=True)
    return path
