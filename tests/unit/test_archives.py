"""Model files are checked before anything loads them: pickles that would run code are
refused, real archives pass, and the refused payloads are live (they would have run)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.archives import UnsafeModelFile, check_model_file, pickle_globals
from tests.byom import (
    Payload,
    SoftMLP,
    TinyConv,
    export_bytes,
    raw_pickle,
    seeded,
    torch_save_zip,
    torchscript_bytes,
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
