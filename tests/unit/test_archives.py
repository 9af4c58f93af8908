"""Model files are checked before anything loads them: pickles that would run code are
refused, real archives pass, and the refused payloads are live (they would have run)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hessian_service.repository.archives import (
    UnsafeModelFile,
    check_model_file,
    pickle_globals,
    pickle_streams,
)
from hessian_service.repository.loaders import WEIGHTS_ONLY_SWITCH, load_checked_module
from tests.byom import (
    Payload,
    SoftMLP,
    TinyConv,
    export_bytes,
    legacy_torch_save,
    payload_constant_export,
    raw_pickle,
    seeded,
    torch_save_zip,
    torchscript_bytes,
    with_entry_added,
    with_entry_appended,
    with_entry_replaced,
)

LIMIT = 1 << 30
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The control: unpickling the payload does create the marker file."""
    marker = tmp_path / "ran"
    pickle.loads(raw_pickle(marker))  # our own payload, on purpose
    assert marker.exists()


@pytest.mark.parametrize(
    ("fmt", "build"),
    [
        ("torchscript", lambda: torchscript_bytes(seeded(SoftMLP()))),
        (
            "torchscript",
            lambda: torchscript_bytes(seeded(TinyConv()), trace_input=torch.randn(2, 1, 6, 6)),
        ),
        ("export", lambda: export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)),
        (
            "export",
            lambda: export_bytes(seeded(TinyConv()), torch.randn(1, 1, 6, 6), dynamic_batch=False),
        ),
    ],
    ids=["script", "trace", "export-dynamic", "export-static"],
)
def test_real_archives_pass(tmp_path: Path, fmt: str, build: object) -> None:
    assert callable(build)
    check_model_file(_write(tmp_path, "model", build()), fmt, max_unpacked_bytes=LIMIT)  # type: ignore[arg-type]


def test_safetensors_pass(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.ones(3, 2)}, str(path))
    check_model_file(path, "zoo", max_unpacked_bytes=LIMIT)


def _evil_files(marker: Path) -> dict[str, bytes]:
    script = torchscript_bytes(seeded(SoftMLP()))
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    return {
        "raw pickle": raw_pickle(marker),
        "torch.save zip": torch_save_zip(marker),
        "TorchScript with a payload data.pkl": with_entry_replaced(
            script, "data.pkl", raw_pickle(marker)
        ),
        "export with a payload nested checkpoint": with_entry_replaced(
            exported, "sample_inputs/model.pt", torch_save_zip(marker)
        ),
    }


@pytest.mark.parametrize("fmt", ["zoo", "torchscript", "export"])
def test_pickles_are_refused_in_every_format(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "ran"
    for label, data in _evil_files(marker).items():
        with pytest.raises(UnsafeModelFile):
            check_model_file(_write(tmp_path, "upload", data), fmt, max_unpacked_bytes=LIMIT)  # type: ignore[arg-type]
        assert not marker.exists(), label


def test_a_payload_inside_a_real_archive_is_named(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    files = _evil_files(marker)
    with pytest.raises(UnsafeModelFile, match=r"data\.pkl is a pickle that names io\.open"):
        check_model_file(
            _write(tmp_path, "a", files["TorchScript with a payload data.pkl"]),
            "torchscript",
            max_unpacked_bytes=LIMIT,
        )
    with pytest.raises(UnsafeModelFile, match=r"model\.pt:.*names io\.open"):
        check_model_file(
            _write(tmp_path, "b", files["export with a payload nested checkpoint"]),
            "export",
            max_unpacked_bytes=LIMIT,
        )
    with pytest.raises(UnsafeModelFile, match="raw Python pickle"):
        check_model_file(
            _write(tmp_path, "c", files["raw pickle"]), "torchscript", max_unpacked_bytes=LIMIT
        )
    assert not marker.exists()


def test_unpacked_size_is_limited(tmp_path: Path) -> None:
    data = torchscript_bytes(seeded(SoftMLP()))
    with pytest.raises(UnsafeModelFile, match="unpacks to"):
        check_model_file(_write(tmp_path, "m", data), "torchscript", max_unpacked_bytes=1000)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_globals_sees_every_protocol(tmp_path: Path, protocol: int) -> None:
    data = pickle.dumps(Payload(tmp_path / "x"), protocol=protocol)
    assert pickle_globals(data) == {("io", "open")}
    assert _resolved_by_pickle(data) == ("io", "open")
    assert pickle_globals(b"\x00\x01not a pickle") is None


class _Recorder(pickle.Unpickler):
    """Python's own unpickler, stopped at the first global it would import."""

    def find_class(self, module: str, name: str) -> object:
        raise LookupError((module, name))


def _resolved_by_pickle(data: bytes) -> tuple[str, str]:
    with pytest.raises(LookupError) as caught:
        _Recorder(io.BytesIO(data)).load()
    resolved: tuple[str, str] = caught.value.args[0]
    return resolved


def test_stack_global_names_hidden_in_the_memo_are_not_trusted() -> None:
    """Names memoized early and fetched later resolve to the memo's strings, not to the
    strings pushed last; a pair that cannot be resolved is refused."""
    hidden = (
        b"\x80\x04"
        b"\x8c\x02io\x94"  # "io", MEMOIZE -> memo 0
        b"\x8c\x04open\x94"  # "open", MEMOIZE -> memo 1
        b"0"  # POP
        b"0"  # POP
        b"\x8c\x0bcollections\x8c\x0bOrderedDict"
        b"0"  # POP
        b"0"  # POP
        b"h\x00h\x01"  # BINGET 0, BINGET 1
        b"\x93"  # STACK_GLOBAL -> io.open
        b")R."  # EMPTY_TUPLE, REDUCE, STOP
    )
    assert pickle_globals(hidden) == {("io", "open")}
    assert _resolved_by_pickle(hidden) == ("io", "open")  # what the real unpickler asks for
    unresolved = b"\x80\x04\x8c\x02io\x8c\x04open\x86\x94h\x00\x93)R."  # names via a tuple
    assert pickle_globals(unresolved) == {("?", "?")}


# --- back-to-back pickles, torch.load'ed members, native code, bombs ------------------------


def _framing_attacks(marker: Path) -> dict[str, tuple[str, bytes, str]]:
    """label -> (format, file, what the refusal says). Each passed the first-STOP scanner."""
    script = torchscript_bytes(seeded(SoftMLP()))
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    legacy = legacy_torch_save(marker)
    return {
        "export, legacy torch.save sample inputs": (
            "export",
            with_entry_replaced(exported, "sample_inputs/model.pt", legacy),
            "legacy torch.save format is refused",
        ),
        "TorchScript, a payload pickle appended to data.pkl": (
            "torchscript",
            with_entry_appended(script, "/data.pkl", raw_pickle(marker)),
            "names io.open",
        ),
        "TorchScript, a harmless second pickle appended to data.pkl": (
            "torchscript",
            with_entry_appended(script, "/data.pkl", pickle.dumps([1, 2], protocol=2)),
            "2 pickles back to back",
        ),
        "TorchScript, bytes after the STOP of constants.pkl": (
            "torchscript",
            with_entry_appended(script, "/constants.pkl", b"trailing"),
            "not one complete pickle",
        ),
        "export, AOTInductor library": (
            "export",
            with_entry_added(exported, "data/aotinductor/model/model.so", b"\x7fELF"),
            "native code",
        ),
        "export, opaque constant read with pickle.loads": (
            "export",
            payload_constant_export(marker),
            "custom or opaque objects",
        ),
        "export, legacy weights file": (
            "export",
            with_entry_added(exported, "data/weights/model.pt", legacy),
            "legacy torch.export weights format",
        ),
    }


@pytest.mark.parametrize(
    "label", list(_framing_attacks(Path("unused")).keys()), ids=lambda label: label
)
def test_anything_but_the_framing_torch_writes_is_refused(tmp_path: Path, label: str) -> None:
    marker = tmp_path / "ran"
    fmt, data, message = _framing_attacks(marker)[label]
    with pytest.raises(UnsafeModelFile, match=re.escape(message)):
        check_model_file(_write(tmp_path, "model", data), fmt, max_unpacked_bytes=LIMIT)  # type: ignore[arg-type]
    assert not marker.exists()


def test_pickle_streams_reads_to_the_end() -> None:
    one = pickle.dumps({"a": 1}, protocol=2)
    evil = pickle.dumps(Payload(Path("x")), protocol=2)
    assert pickle_streams(one) == [set()]
    assert pickle_streams(one + evil) == [set(), {("io", "open")}]
    assert pickle_streams(one + b"junk") is None
    assert pickle_globals(one + evil) == set()  # the first stream alone hides the payload


def test_the_legacy_payload_is_live_without_the_weights_only_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the defence in depth below: torch.export.load's retry with
    weights_only=False does run a legacy sample-inputs payload when the switch is off."""
    marker = tmp_path / "ran"
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    evil = with_entry_replaced(exported, "sample_inputs/model.pt", legacy_torch_save(marker))
    monkeypatch.delenv(WEIGHTS_ONLY_SWITCH)
    # torch logs the fallback with a malformed format string, which may raise afterwards
    with contextlib.suppress(TypeError):
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()


@pytest.mark.parametrize("member", ["sample_inputs/model.pt"])
def test_a_payload_the_scanner_ignores_still_never_runs(tmp_path: Path, member: str) -> None:
    """Defence in depth: the loader itself, with the scanner skipped, on a payload that
    torch.export.load retries with weights_only=False. TORCH_FORCE_WEIGHTS_ONLY_LOAD (set
    by repository.loaders) turns the retry into a weights-only load, which refuses it."""
    marker = tmp_path / "ran"
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    evil = with_entry_replaced(exported, member, legacy_torch_save(marker))
    path = _write(tmp_path, "model.pt2", evil)
    assert os.environ[WEIGHTS_ONLY_SWITCH] == "1"
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checked_module(path, "export", architecture=None)
    assert not marker.exists()


def _with_zeros(archive: bytes, members: dict[str, int]) -> bytes:
    """``archive`` with deflated members of zeros, ``name -> size`` (tiny on disk)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        for name, size in members.items():
            target.writestr(name, b"\0" * size, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_a_zip_that_understates_its_sizes_is_refused(tmp_path: Path) -> None:
    """Headers declaring 100 bytes for a member that inflates to 64 MiB: reading stops
    at the declared size and the member is refused as corrupt."""
    script = _with_zeros(torchscript_bytes(seeded(SoftMLP())), {"archive/data/99": 64 << 20})
    data = bytearray(script)
    size = struct.pack("<I", 64 << 20)
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.rfind(header)
        assert data[at + offset : at + offset + 4] == size
        data[at + offset : at + offset + 4] = struct.pack("<I", 100)
    path = _write(tmp_path, "bomb.pt", bytes(data))
    with pytest.raises(UnsafeModelFile, match="corrupt zip member"):
        check_model_file(path, "torchscript", max_unpacked_bytes=LIMIT)


def test_inflated_bytes_are_counted_across_nested_zips(tmp_path: Path) -> None:
    """3 MiB at the top and 3 MiB inside the nested sample inputs: each zip declares less
    than the 4 MiB limit, together they inflate to more, and reading stops there."""
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    with zipfile.ZipFile(io.BytesIO(exported)) as source:
        name = next(n for n in source.namelist() if n.endswith("sample_inputs/model.pt"))
        inner = _with_zeros(source.read(name), {"archive/data/99": 3 << 20})
    data = _with_zeros(with_entry_replaced(exported, "sample_inputs/model.pt", inner), {})
    data = with_entry_added(data, "extra/zeros", b"\0" * (3 << 20))
    path = _write(tmp_path, "model.pt2", data)
    check_model_file(path, "export", max_unpacked_bytes=16 << 20)  # fits a larger limit
    with pytest.raises(UnsafeModelFile, match=r"inflates to over 4194304 bytes"):
        check_model_file(path, "export", max_unpacked_bytes=4 << 20)


def test_scanning_a_large_member_streams_it(tmp_path: Path) -> None:
    """A 1 MB archive with a 512 MiB member under the limit: the scan inflates it in
    chunks, so the scanning process's peak memory stays far below the member's size
    (reading it whole took RSS up by the member's size)."""
    script = torchscript_bytes(seeded(SoftMLP()))
    path = _write(tmp_path, "big.pt", _with_zeros(script, {"archive/data/99": 512 << 20}))
    assert path.stat().st_size < 1_100_000
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent.
    probe = (
        "import sys; from pathlib import Path; "
        "from hessian_service.repository.archives import check_model_file; "
        "check_model_file(Path(sys.argv[1]), 'torchscript', max_unpacked_bytes=1 << 30); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB while scanning a 512 MiB member"
