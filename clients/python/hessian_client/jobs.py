"""Jobs from the client: ``submit`` a derivative request, ``wait`` with a progress bar,
fetch the ``result``, or ``cancel``.

```python
job = Client(url).submit("hessian", model="digits_cnn", x=batch, output_index=2)
job.wait(timeout=600)          # a progress bar on stderr, from the server's counts
H = job.result().value         # the /hessian answer, as numpy: [B, 784, 784]
```

A job runs on the server in chunks (``POST /jobs``); this module only polls
``GET /jobs/{id}`` and reads ``GET /jobs/{id}/result`` with the same decoding as a direct
call (json, base64 or the binary framing). httpx and numpy only, as the rest of the client.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import numpy as np

from hessian_client._arrays import as_array
from hessian_client._wire import HessianServiceError, decode_response, tensor_object

FINISHED = frozenset({"succeeded", "failed", "cancelled"})


class _Requester(Protocol):
    def request(self, method: str, path: str, *, json: Any = None) -> Any:
        """Send with the client's retries; raise ``HessianServiceError`` on an error."""
        ...


def job_request(**fields: Any) -> dict[str, Any]:
    """An endpoint's body from keyword arguments: ``x`` (an array, tensor or nested
    list) becomes ``inputs``; any other array-like value (``vectors``, an mse ``target``)
    a base64 tensor object named after its field; ``encoding`` defaults to binary."""
    body: dict[str, Any] = {"encoding": "binary"}
    for name, value in fields.items():
        if value is None:
            continue
        if name == "x":
            body["inputs"] = [tensor_object(as_array(value))]
        elif isinstance(value, np.ndarray) or hasattr(value, "__array__"):
            body[name] = tensor_object(as_array(value), name)
        else:
            body[name] = value
    return body


@dataclass(frozen=True)
class JobResult:
    """A finished job's answer: the endpoint's body, and each output as an array."""

    body: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def value(self) -> np.ndarray:
        """The first output: the Hessian, Jacobian, products, diagonal, eigenvalues, ..."""
        return next(iter(self.arrays.values()))

    @property
    def metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = self.body.get("metadata", {})
        return metadata


class ProgressBar:
    """One line on ``stream``: state, products done of total, percent, time left (the
    server's estimate); redrawn when the count or state changed, and at the end."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label, self.stream = label, stream or sys.stderr
        self._shown: tuple[Any, ...] | None = None

    def show(self, status: dict[str, Any], *, force: bool = False) -> None:
        progress = status.get("progress") or {}
        done, total = int(progress.get("done", 0)), int(progress.get("total", 0))
        seen = (status.get("state"), done, total)
        if not force and seen == self._shown:
            return
        self._shown = seen
        fraction = float(progress.get("fraction", 0.0))
        left = progress.get("seconds_left")
        eta = f"{left:6.1f} s left" if isinstance(left, int | float) else "     ? s left"
        bar = "#" * int(fraction * 30)
        self.stream.write(
            f"\r{self.label} {status.get('state', '?'):<9} |{bar:<30}| {100 * fraction:5.1f}% "
            f"{done}/{total} products, {eta}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class Job:
    """A job on the server: poll it, wait for it, fetch its result, cancel it."""

    def __init__(self, client: _Requester, body: dict[str, Any]) -> None:
        self.client = client
        self.id: str = body["id"]
        self.operation: str = body.get("operation", "")
        self.last: dict[str, Any] = body

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.operation!r}, state={self.state!r})"

    @property
    def state(self) -> str:
        """The state at the last poll."""
        return str(self.last.get("state", ""))

    def status(self) -> dict[str, Any]:
        """``GET /jobs/{id}``: state, progress (done, total, fraction, seconds_left), times."""
        self.last = self.client.request("GET", f"/jobs/{self.id}").json()
        return self.last

    def wait(
        self,
        *,
        timeout: float | None = None,
        progress: bool = True,
        poll_s: float = 0.25,
        stream: TextIO | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is finished and return its last status; a progress bar on
        ``stream`` (stderr) unless ``progress=False``. Raises ``TimeoutError`` after
        ``timeout`` seconds (the job runs on: ``cancel()`` stops it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(f"{self.operation} {self.id[:8]}", stream) if progress else None
        try:
            while True:
                status = self.status()
                finished = status.get("state") in FINISHED
                if bar is not None:
                    bar.show(status, force=finished)
                if finished:
                    return status
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"job {self.id} still {status.get('state')} after {timeout} s"
                    )
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()

    def result(self, *, encoding: str = "binary") -> JobResult:
        """The endpoint's answer (``GET /jobs/{id}/result``); a failed job raises its
        ``HessianServiceError`` (the problem the endpoint would have answered), an
        unfinished or cancelled one a 409."""
        response = self.client.request("GET", f"/jobs/{self.id}/result?encoding={encoding}")
        decoded = decode_response(response.content, response.headers)
        return JobResult(decoded.body, decoded.arrays)

    def cancel(self) -> dict[str, Any] | None:
        """``DELETE /jobs/{id}``: a live job stops at its next chunk (its status comes
        back); a finished one is deleted (None)."""
        response = self.client.request("DELETE", f"/jobs/{self.id}")
        if response.status_code == 204:
            return None
        self.last = response.json()
        return self.last


def submit(client: _Requester, operation: str, request: dict[str, Any]) -> Job:
    """``POST /jobs`` with ``request`` for ``operation`` (``hessian``, ``/hessian/trace``)."""
    if not isinstance(operation, str) or not operation:
        raise HessianServiceError(f"submit: operation must be an endpoint name, got {operation!r}")
    response = client.request("POST", "/jobs", json={"operation": operation, "request": request})
    return Job(client, response.json())
