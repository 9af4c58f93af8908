"""A finished job's result, kept once and answered in any encoding; its files in a job folder.

A result is kept as its binary encoding (the Open Inference Protocol framing: the JSON
response, then each output's raw little-endian bytes): the most compact form, the one
``GET /jobs/{id}/result`` sends as it is for ``encoding=binary``, and the one that turns
back into exactly the json or base64 body the endpoint would have sent (each output's
tensor rebuilt from its bytes and written by ``wire.codec`` as a direct request's is).
The same bytes are the result file in ``HESSIAN_JOB_DIR``.

The job folder holds, per job, ``<id>.json`` (its state record) and, once it succeeded,
``<id>.result`` (those bytes); both are written to a temporary name and renamed, so a
crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from hessian_service.wire import binary, codec
from hessian_service.wire.binary import BINARY_CONTENT_TYPE, HEADER_LENGTH, Encoded

# The encodings a result can be fetched in (png is a picture of one sample, not a body).
ENCODINGS = ("json", "base64", "binary")
RECORD_SUFFIX = ".json"
RESULT_SUFFIX = ".result"


@dataclass(frozen=True)
class StoredResult:
    """A result body in its binary encoding: ``blob[:header_length]`` is the JSON."""

    blob: bytes
    header_length: int

    @classmethod
    def of(cls, body: dict[str, Any]) -> StoredResult:
        """Keep ``body`` (its outputs' ``data`` as numpy arrays, as ``codec.tensor_object``
        leaves them for the binary encoding)."""
        encoded = binary.encode(body, lambda _output: True)
        length = int(encoded.headers.get(HEADER_LENGTH, len(encoded.body)))
        return cls(encoded.body, length)

    @property
    def nbytes(self) -> int:
        return len(self.blob)

    def header(self) -> dict[str, Any]:
        """The JSON part: the body with each output's ``binary_data_size``, no data."""
        header: dict[str, Any] = orjson.loads(self.blob[: self.header_length])
        return header

    def encoded(self, encoding: str) -> Encoded:
        """The body as the endpoint would have answered it in ``encoding``."""
        if encoding == "binary":
            if self.header_length == len(self.blob):  # no output carried bytes
                return Encoded(self.blob)
            headers = {HEADER_LENGTH: str(self.header_length)}
            return Encoded(self.blob, BINARY_CONTENT_TYPE, headers)
        header = self.header()
        outputs = header.get("outputs", [])
        tail = memoryview(self.blob)[self.header_length :]
        rebuilt = []
        for output, raw in zip(outputs, binary.take_binary(outputs, tail, "outputs"), strict=True):
            if raw is None:
                rebuilt.append(output)
                continue
            dtype = codec.TORCH_DTYPES[output["datatype"]]
            count = math.prod(output["shape"])
            tensor = (
                torch.frombuffer(bytearray(raw), dtype=dtype)
                if count
                else torch.empty(0, dtype=dtype)
            ).reshape(output["shape"])
            rest = {k: v for k, v in output.items() if k not in ("data", "parameters")}
            rebuilt.append(rest | codec.tensor_object(output["name"], tensor, encoding))
        return codec.encode_body({**header, "outputs": rebuilt}, encoding)


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path``, via a temporary file renamed over it (fsynced first)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class JobFolder:
    """Where a job store writes its records and results (``HESSIAN_JOB_DIR``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def record_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}{RECORD_SUFFIX}"

    def result_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}{RESULT_SUFFIX}"

    def write_record(self, job_id: str, record: dict[str, Any]) -> None:
        write_atomically(self.record_path(job_id), orjson.dumps(record))

    def write_result(self, job_id: str, result: StoredResult) -> None:
        write_atomically(self.result_path(job_id), result.blob)

    def read_result(self, job_id: str, header_length: int) -> StoredResult:
        return StoredResult(self.result_path(job_id).read_bytes(), header_length)

    def remove(self, job_id: str) -> None:
        for path in (self.record_path(job_id), self.result_path(job_id)):
            path.unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record; an unreadable one (a crash's leftover) is removed."""
        for leftover in self.root.glob(".*.tmp"):  # a write a crash interrupted
            leftover.unlink(missing_ok=True)
        records = []
        for path in sorted(self.root.glob(f"*{RECORD_SUFFIX}")):
            try:
                record = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                path.unlink(missing_ok=True)
                continue
            if isinstance(record, dict) and record.get("id") == path.stem:
                records.append(record)
        return records
