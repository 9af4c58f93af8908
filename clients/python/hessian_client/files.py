"""Input and output files for bulk runs: read lazily, write in place, rename when done.

Inputs come from an array, a ``.npy`` file (memory-mapped) or a safetensors file (read
one slice at a time), so a large input set is never loaded whole. Results are written
to ``<out>.partial`` at their final offsets with ``os.pwrite`` -- not through a memory
map, whose dirty pages would count in the client's resident memory -- and the file is
renamed to ``<out>`` only once every batch is in it. Both ``.npy`` and safetensors keep
their data after a header whose size is known up front, so the header is written first.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from hessian_client._wire import HessianServiceError

SAFETENSORS_DTYPES = {"<f4": "F32", "<f8": "F64", "<f2": "F16"}
PARTIAL_SUFFIX = ".partial"


class Inputs:
    """A sequence of inputs ``[N, *sample_shape]`` read a batch at a time."""

    def __init__(self, source: np.ndarray | str | os.PathLike[str], key: str | None = None):
        self._slice: Any = None
        if isinstance(source, np.ndarray):
            self._array: np.ndarray | None = source
            self.shape = tuple(source.shape)
            self.dtype = source.dtype
            return
        path = Path(source)
        if path.suffix == ".npy":  # read by offset: a memory map would grow the RSS
            self._array = None
            self._path = path
            with path.open("rb") as file:
                version = npy_format.read_magic(file)
                read_header = (
                    npy_format.read_array_header_1_0
                    if version == (1, 0)
                    else npy_format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(file)
                self._data_offset = file.tell()
            if fortran or dtype.hasobject:
                raise HessianServiceError(f"{path}: expected a C-ordered numeric array")
            self.shape, self.dtype = tuple(shape), dtype
        elif path.suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError as exc:  # optional: the client needs only httpx and numpy
                raise HessianServiceError(
                    f"{path}: reading .safetensors inputs needs the safetensors package "
                    "(`pip install 'hessian-client[safetensors]'`), or pass a .npy file"
                ) from exc

            opener: Any = safe_open  # untyped; kept open for get_slice reads
            self._array = None
            self._handle = opener(str(path), framework="numpy")
            keys = list(self._handle.keys())
            if key is None and len(keys) != 1:
                raise HessianServiceError(
                    f"{path}: holds tensors {keys}; name the one to use (inputs_key)"
                )
            self._slice = self._handle.get_slice(key or keys[0])
            self.shape = tuple(self._slice.get_shape())
            codes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
            self.dtype = np.dtype(codes.get(self._slice.get_dtype(), "<f4"))
        else:
            raise HessianServiceError(f"{path}: expected a .npy or .safetensors file")

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    def batch(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start`` to ``stop`` as an in-memory array."""
        if self._array is not None:
            return np.array(self._array[start:stop])
        if self._slice is not None:
            return np.asarray(self._slice[start:stop])
        sample = math.prod(self.shape[1:])
        offset = self._data_offset + start * sample * self.dtype.itemsize
        flat = np.fromfile(
            self._path, dtype=self.dtype, count=(stop - start) * sample, offset=offset
        )
        return flat.reshape(stop - start, *self.shape[1:])


def _npy_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    npy_format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def _safetensors_header(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    code = SAFETENSORS_DTYPES.get(dtype.str)
    if code is None:
        raise HessianServiceError(f"safetensors output: unsupported dtype {dtype}")
    size = math.prod(shape) * dtype.itemsize
    meta = {name: {"dtype": code, "shape": list(shape), "data_offsets": [0, size]}}
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class OutputFile:
    """``[N, *item_shape]`` results written in place into ``<path>.partial``.

    ``.npy`` unless the path ends in ``.safetensors`` (then one tensor called ``name``).
    ``finish()`` syncs and renames to ``path``; until then ``path`` is never touched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        name: str,
        *,
        keep: bool = False,
    ) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.shape, self.dtype = shape, np.dtype(dtype).newbyteorder("<")
        if self.path.suffix == ".safetensors":
            header = _safetensors_header(name, shape, self.dtype)
        else:
            header = _npy_header(shape, self.dtype)
        self.data_offset = len(header)
        self.item_bytes = math.prod(shape[1:]) * self.dtype.itemsize
        total = self.data_offset + math.prod(shape) * self.dtype.itemsize
        reuse = keep and self.partial.exists() and self.partial.stat().st_size == total
        flags = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC)
        self._fd = os.open(self.partial, flags, 0o644)
        if not reuse:
            os.pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, total)  # sparse until written

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Bytes at ``offset`` within the results that start at item ``index``."""
        os.pwrite(self._fd, data, self.data_offset + index * self.item_bytes + offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> Path:
        """Flush to disk and rename the finished file into place (atomic on one disk)."""
        os.fsync(self._fd)
        self.close()
        os.replace(self.partial, self.path)
        return self.path


def save(path: str | os.PathLike[str], array: np.ndarray, name: str) -> Path:
    """Write one array as ``.npy`` or safetensors, by the same write-then-rename path."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    output = OutputFile(path, tuple(array.shape), array.dtype, name)
    output.write(0, 0, array.reshape(-1).view(np.uint8).data)
    return output.finish()
