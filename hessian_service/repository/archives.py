"""Refuse model files that would run code when loaded, before anything loads them.

Safetensors files are plain tensors. TorchScript (``torch.jit.save``) and ``torch.export``
(``.pt2``) archives are zip files with pickled parts, and ``torch.export.load`` reads
some parts with ``torch.load`` (falling back to ``weights_only=False``) or even plain
``pickle.loads``, and loads AOTInductor shared libraries it finds. So an archive is read
member by member, and each member is held to what torch itself writes there:

- what torch unpickles (``*.pkl``, ``*.debug_pkl``) is exactly one pickle: a protocol
  header, opcodes read with ``pickletools`` (which parses, never executes), and its STOP
  as the member's last byte. Several pickles back to back -- a legacy ``torch.save``
  stream -- are refused, and every global they name is checked against a short
  allow-list of tensor-rebuilding functions;
- what ``torch.export.load`` reads with ``torch.load`` (sample inputs, pickled weights
  and constants) is a ``torch.save`` zip holding one such pickle, scanned recursively;
- what would load native code or Python objects (``data/aotinductor/``, custom and
  opaque constants, ExecuTorch and MTIA payloads) is refused outright;
- everything else is bytes torch never interprets: counted, not parsed.

The bytes actually inflated are counted while reading, across nested zips, and reading
stops at the limit: the sizes a zip declares are only a first, cheap check. A raw pickle,
or a ``torch.save`` checkpoint in place of an archive, is refused with a message saying
what to send instead.
"""

from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO, Literal

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
# torch writes protocol 2 by default; torch.save(pickle_protocol=...) allows up to 5.
PICKLE_PROTOCOLS = range(2, 6)
ZIP_MAGIC = b"PK\x03\x04"
MAX_NESTING = 2
SAFETENSORS_MAX_HEADER = 100 << 20
MAX_CONFIG_BYTES = 16 << 20  # a weights or constants config of torch.export (JSON)
# A pickle torch writes is metadata that points at raw storages: kilobytes to a few MB.
MAX_PICKLE_BYTES = 64 << 20
CHUNK = 1 << 20

# torch.export's archive layout (torch._C._export.pt2_archive_constants), relative to the
# archive's root folder.
EXPORT_REFUSED_DIRS = {
    "data/aotinductor/": "AOTInductor shared libraries (native code)",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia": "MTIA kernels",
    "xl_model_weights/": "external weights",
}
EXPORT_CONFIGS = {
    "data/weights/": ("_weights_config.json", "weight_"),
    "data/constants/": ("_constants_config.json", "tensor_"),
}


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


def _stream_globals(stream: IO[bytes]) -> set[tuple[str, str]]:
    """The globals of the one pickle that starts at ``stream``'s position; the stream is
    left just after its STOP. Raises whatever ``pickletools`` raises on a bad pickle.

    ``STACK_GLOBAL`` takes its two names from the stack: they are known only when the
    two operations before it (memo writes aside, which leave the stack alone) pushed
    strings, directly or from the memo; otherwise the global is reported as ``?.?``,
    which is never allowed.
    """
    found: set[tuple[str, str]] = set()
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # values pushed since the last other operation
    for opcode, arg, _ in pickletools.genops(stream):
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
    return found


def pickle_globals(data: bytes) -> set[tuple[str, str]] | None:
    """The globals the first pickle in ``data`` names, or None when it does not parse.

    ``pickletools.genops`` only parses opcodes; nothing is imported or called.
    """
    try:
        return _stream_globals(io.BytesIO(data))
    except Exception:  # any parse failure: not a (complete) pickle
        return None


def pickle_streams(data: bytes) -> list[set[tuple[str, str]]] | None:
    """The globals of every pickle stored back to back in ``data``, to its last byte
    (a legacy ``torch.save`` stream is several), or None when a part does not parse."""
    stream = io.BytesIO(data)
    streams: list[set[tuple[str, str]]] = []
    try:
        while stream.tell() < len(data):
            streams.append(_stream_globals(stream))
    except Exception:
        return None
    return streams


def _refused_names(names: set[tuple[str, str]]) -> list[str]:
    return sorted(f"{m}.{n}" for m, n in names if not _is_allowed(m, n))


def check_single_pickle(where: str, data: bytes) -> None:
    """Refuse ``data`` unless it is exactly one pickle, as torch writes it, naming only
    allowed globals: a protocol 2-5 header, and the STOP opcode as the last byte."""
    streams = pickle_streams(data)
    every = set().union(*streams) if streams else set()
    refused = _refused_names(every)
    if refused:
        raise UnsafeModelFile(
            f"{where} is a pickle that names {', '.join(refused[:5])}: loading it would run "
            "code, so it is refused"
        )
    if len(data) < 2 or data[0] != PICKLE_PROTO or data[1] not in PICKLE_PROTOCOLS:
        raise UnsafeModelFile(
            f"{where}: expected a pickle of protocol 2 to 5, as torch writes, got "
            f"{_what_it_is(data[:4])}; it is refused"
        )
    if streams is None:
        raise UnsafeModelFile(f"{where}: not one complete pickle; it is refused")
    if len(streams) != 1:
        raise UnsafeModelFile(
            f"{where} holds {len(streams)} pickles back to back (a legacy torch.save stream "
            "or bytes appended after the pickle); torch writes exactly one, so it is refused"
        )


class _Inflation:
    """The bytes actually inflated while reading an archive, nested zips included,
    against one limit: reading stops as soon as the limit is passed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0

    def read(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, *, cap: int = 0
    ) -> bytes:
        """The member's bytes, counted chunk by chunk; ``cap`` (when set) also bounds
        this member alone, whatever size it declares."""
        chunks: list[bytes] = []
        size = 0

        def keep(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if cap and size > cap:
                raise UnsafeModelFile(f"{where}: inflates to over {cap} bytes; it is refused")
            chunks.append(chunk)

        self._stream(archive, info, where, keep)
        return b"".join(chunks)

    def drain(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> None:
        """Inflate and count a member whose bytes torch never interprets."""
        self._stream(archive, info, where, lambda _chunk: None)

    def _stream(
        self,
        archive: zipfile.ZipFile,
        info: zipfile.ZipInfo,
        where: str,
        keep: Callable[[bytes], None],
    ) -> None:
        try:
            with archive.open(info) as member:
                while chunk := member.read(CHUNK):
                    self.total += len(chunk)
                    if self.total > self.limit:
                        raise UnsafeModelFile(
                            f"{where}: the archive inflates to over {self.limit} bytes, the "
                            "limit; it is refused (reading stopped there)"
                        )
                    keep(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            if isinstance(error, UnsafeModelFile):
                raise
            raise UnsafeModelFile(f"{where}: a corrupt zip member ({error})") from None


def _members(label: str, archive: zipfile.ZipFile, limit: int) -> list[tuple[str, zipfile.ZipInfo]]:
    """Each file member with its name below the archive's one root folder."""
    infos = [info for info in archive.infolist() if not info.is_dir()]
    declared = sum(info.file_size for info in infos)
    if declared > limit:
        raise UnsafeModelFile(
            f"{label} unpacks to {declared} bytes, over the limit of {limit} bytes"
        )
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise UnsafeModelFile(f"{label}: a zip with two members of one name; it is refused")
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise UnsafeModelFile(
            f"{label}: expected every member under one root folder, as torch writes"
        )
    return [(info.filename.split("/", 1)[1], info) for info in infos]


def _is_pickle_name(name: str) -> bool:
    return name.endswith((".pkl", ".debug_pkl"))


def _read_pickle(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: _Inflation
) -> None:
    """Read a member torch unpickles (bounded by ``MAX_PICKLE_BYTES``) and check it."""
    if info.file_size > MAX_PICKLE_BYTES:
        raise UnsafeModelFile(f"{where}: a pickle over {MAX_PICKLE_BYTES} bytes is refused")
    check_single_pickle(where, budget.read(archive, info, where, cap=MAX_PICKLE_BYTES))


def _scan_torchscript(label: str, archive: zipfile.ZipFile, budget: _Inflation) -> None:
    members = _members(label, archive, budget.limit)
    for name, info in members:
        where = f"{label}:{info.filename}"
        if _is_pickle_name(name):
            _read_pickle(archive, info, where, budget)
        else:  # tensor storages, code, version files: never unpickled by torch.jit.load
            budget.drain(archive, info, where)


def _scan_torch_save(label: str, data: bytes, budget: _Inflation, depth: int) -> None:
    """A ``torch.save`` zip (what ``torch.load`` reads): one ``data.pkl`` pickle and raw
    storages. The legacy format (pickles back to back) is refused."""
    if data[:4] != ZIP_MAGIC:
        raise UnsafeModelFile(
            f"{label}: expected a torch.save zip here, got {_what_it_is(data[:4])} "
            "(the legacy torch.save format is refused; save with the default zip format)"
        )
    if depth > MAX_NESTING:
        raise UnsafeModelFile(f"{label} nests zip files too deeply")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise UnsafeModelFile(f"{label}: a corrupt zip ({error})") from None
    with archive:
        members = _members(label, archive, budget.limit)
        if "data.pkl" not in {name for name, _ in members}:
            raise UnsafeModelFile(f"{label}: a torch.save zip without its data.pkl")
        for name, info in members:
            where = f"{label}:{info.filename}"
            if _is_pickle_name(name):
                _read_pickle(archive, info, where, budget)
            else:
                budget.drain(archive, info, where)


def _export_config(where: str, data: bytes, prefix: str) -> dict[str, bool]:
    """A weights or constants config: payload file name -> stored as a pickle."""
    try:
        entries = json.loads(data)["config"]
        files = {str(e["path_name"]): bool(e.get("use_pickle", False)) for e in entries.values()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnsafeModelFile(f"{where}: not a torch.export payload config") from None
    for file in files:
        if not file.startswith(prefix) or "/" in file:
            raise UnsafeModelFile(
                f"{where} names the payload {file!r}: only tensors ({prefix}*) are accepted; "
                "custom or opaque objects load with pickle, so they are refused"
            )
    return files


def _scan_export(label: str, archive: zipfile.ZipFile, budget: _Inflation, depth: int) -> None:
    members = _members(label, archive, budget.limit)
    pickled: set[str] = set()  # payloads that torch.export.load reads with torch.load
    for name, info in members:
        where = f"{label}:{info.filename}"
        for folder, what in EXPORT_REFUSED_DIRS.items():
            if name.startswith(folder):
                raise UnsafeModelFile(
                    f"{where}: the archive carries {what}, which loading would run; "
                    "only exported programs are served, so it is refused"
                )
        for folder, (suffix, prefix) in EXPORT_CONFIGS.items():
            if name.startswith(folder) and name.endswith(suffix):
                if info.file_size > MAX_CONFIG_BYTES:
                    raise UnsafeModelFile(f"{where}: a config over {MAX_CONFIG_BYTES} bytes")
                files = _export_config(
                    where, budget.read(archive, info, where, cap=MAX_CONFIG_BYTES), prefix
                )
                pickled |= {folder + file for file, use_pickle in files.items() if use_pickle}
    for name, info in members:
        where = f"{label}:{info.filename}"
        payload_folder = next((f for f in EXPORT_CONFIGS if name.startswith(f)), None)
        if payload_folder is not None and name.endswith(EXPORT_CONFIGS[payload_folder][0]):
            continue  # a config, read above
        if name in pickled or name.startswith("data/sample_inputs/"):
            _scan_torch_save(where, budget.read(archive, info, where), budget, depth + 1)
        elif payload_folder is not None and name.endswith(".pt"):
            raise UnsafeModelFile(
                f"{where}: the legacy torch.export weights format (read with torch.load) is "
                "refused; export again with torch.export.save"
            )
        elif _is_pickle_name(name):
            _read_pickle(archive, info, where, budget)
        else:  # raw tensor payloads, graph JSON, versions, extra files: never unpickled
            budget.drain(archive, info, where)


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
    laid out as torch writes it, whose pickles name only allowed globals. Reads, never
    loads; inflates at most ``max_unpacked_bytes``."""
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
        try:
            archive = zipfile.ZipFile(file)
        except zipfile.BadZipFile as error:
            raise UnsafeModelFile(f"file: a corrupt zip ({error})") from None
        with archive:
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
            budget = _Inflation(max_unpacked_bytes)
            if fmt == "torchscript":
                _scan_torchscript("file", archive, budget)
            else:
                _scan_export("file", archive, budget, 0)
