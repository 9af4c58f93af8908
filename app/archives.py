"""Refuse model files that would run code when loaded, before anything loads them.

Safetensors files are plain tensors. TorchScript (``torch.jit.save``) and ``torch.export``
(``.pt2``) archives are zip files whose pickled parts name Python globals; ``torch.load``
with ``weights_only=False`` (which ``torch.export.load`` uses for some parts) would import
and call whatever those pickles name. So every pickle in an archive, including pickles in
zip files nested inside it, is read opcode by opcode with ``pickletools`` (which parses,
never executes) and the archive is refused when any pickle names a global outside a short
allow-list of tensor-rebuilding functions. A raw pickle, or a ``torch.save`` checkpoint in
place of an archive, is refused with a message saying what to send instead.
"""

from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Literal

Format = Literal["zoo", "torchscript", "export"]

# Globals that TorchScript and torch.export archives name in their pickles (collected from
# torch 2.13's own archives): tensor storage and rebuild helpers, TorchScript list
# builders, and OrderedDict. ``__torch__.*`` are TorchScript classes, which Python's
# unpickler cannot import at all.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch.jit._pickle", "build_intlist"),
        ("torch.jit._pickle", "build_doublelist"),
        ("torch.jit._pickle", "build_boollist"),
        ("torch.jit._pickle", "build_tensorlist"),
        ("torch.jit._pickle", "restore_type_tag"),
    }
)
STORAGES = frozenset(
    f"{kind}Storage"
    for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte")
) | {"BoolStorage"}
PICKLE_PROTO = 0x80
ZIP_MAGIC = b"PK\x03\x04"
MAX_NESTING = 2
SAFETENSORS_MAX_HEADER = 100 << 20


class UnsafeModelFile(ValueError):
    """A model file that is refused: what it is, and what to send instead."""


def _is_allowed(module: str, name: str) -> bool:
    if module == "__torch__" or module.startswith("__torch__."):
        return True
    if module == "torch" and name in STORAGES:
        return True
    return (module, name) in ALLOWED_GLOBALS


STRING_PUSHES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"})
MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def pickle_globals(data: bytes) -> set[tuple[str, str]] | None:
    """The globals a pickle names, or None when ``data`` does not parse as a pickle.

    ``pickletools.genops`` only parses opcodes; nothing is imported or called.
    ``STACK_GLOBAL`` takes its two names from the stack: they are known only when the
    two operations before it (memo writes aside, which leave the stack alone) pushed
    strings, directly or from the memo; otherwise the global is reported as ``?.?``,
    which is never allowed.
    """
    found: set[tuple[str, str]] = set()
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # values pushed since the last other operation
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in STRING_PUSHES:
                pushed.append(str(arg))
                continue
            if name in MEMO_GETS:
                pushed.append(memo.get(int(str(arg))))
                continue
            if name == "MEMOIZE" or name in MEMO_PUTS:
                index = len(memo) if name == "MEMOIZE" else int(str(arg))
                memo[index] = pushed[-1] if pushed else None
                continue
            if name in ("GLOBAL", "INST"):
                module, _, attribute = str(arg).partition(" ")
                found.add((module, attribute))
            elif name == "STACK_GLOBAL":
                module_name = pushed[-2] if len(pushed) >= 2 else None
                attribute_name = pushed[-1] if pushed else None
                if module_name is None or attribute_name is None:
                    found.add(("?", "?"))
                else:
                    found.add((module_name, attribute_name))
            pushed = []
    except Exception:  # any parse failure: not a (complete) pickle
        return None
    return found


def _check_pickle(label: str, data: bytes) -> None:
    names = pickle_globals(data)
    if names is None:
        return
    refused = sorted(f"{m}.{n}" for m, n in names if not _is_allowed(m, n))
    if refused:
        raise UnsafeModelFile(
            f"{label} is a pickle that names {', '.join(refused[:5])}: loading it would run "
            "code, so it is refused"
        )


def _scan_zip(label: str, archive: zipfile.ZipFile, depth: int, max_unpacked: int) -> None:
    total = sum(info.file_size for info in archive.infolist())
    if total > max_unpacked:
        raise UnsafeModelFile(
            f"{label} unpacks to {total} bytes, over the limit of {max_unpacked} bytes"
        )
    for info in archive.infolist():
        if info.is_dir():
            continue
        data = archive.read(info)
        where = f"{label}:{info.filename}"
        if data[:4] == ZIP_MAGIC:
            if depth >= MAX_NESTING:
                raise UnsafeModelFile(f"{where} nests zip files too deeply")
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                _scan_zip(where, inner, depth + 1, max_unpacked)
            continue
        _check_pickle(where, data)


def _what_it_is(head: bytes) -> str:
    if head[:1] == bytes([PICKLE_PROTO]):
        return "a raw Python pickle (torch.save with the legacy format, or pickle.dump)"
    if head[:4] == ZIP_MAGIC:
        return "a zip archive"
    return "not a recognised model file"


def _check_safetensors(file: BinaryIO, size: int) -> None:
    head = file.read(9)
    if len(head) < 9:
        raise UnsafeModelFile("file: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or not 2 <= header_len <= min(size - 8, SAFETENSORS_MAX_HEADER):
        raise UnsafeModelFile(
            f"file: expected safetensors weights (safetensors.torch.save_file) for format "
            f"'zoo', got {_what_it_is(head)}; it is refused without being loaded"
        )
    try:
        json.loads(head[8:] + file.read(header_len - 1))
    except ValueError:
        raise UnsafeModelFile("file: the safetensors header is not valid JSON") from None


def check_model_file(path: Path, fmt: Format, *, max_unpacked_bytes: int) -> None:
    """Raise ``UnsafeModelFile`` unless ``path`` is a well-formed file of format ``fmt``
    whose pickles (if any) name only allowed globals. Reads, never loads."""
    size = path.stat().st_size
    with path.open("rb") as file:
        if fmt == "zoo":
            _check_safetensors(file, size)
            return
        head = file.read(4)
        file.seek(0)
        expected = (
            "a TorchScript archive (torch.jit.save)"
            if fmt == "torchscript"
            else "a torch.export archive (torch.export.save)"
        )
        if head != ZIP_MAGIC or not zipfile.is_zipfile(file):
            raise UnsafeModelFile(
                f"file: expected {expected} for format {fmt!r}, got {_what_it_is(head)}; "
                "it is refused without being loaded"
            )
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            if fmt == "torchscript":
                looks_right = any("/code/" in n for n in names) and any(
                    n.endswith("/constants.pkl") for n in names
                )
            else:
                looks_right = any(n.endswith("/archive_format") for n in names)
            if not looks_right:
                raise UnsafeModelFile(
                    f"file: expected {expected} for format {fmt!r}, got a zip archive without "
                    "its layout (a torch.save checkpoint is a pickle and is refused); "
                    "send weights as safetensors with format 'zoo' instead"
                )
            _scan_zip("file", archive, 0, max_unpacked_bytes)
