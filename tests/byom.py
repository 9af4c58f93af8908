"""Networks the service has never seen, their archives, and pickle payloads (tests only).

The architectures live here and nowhere in ``app/``: the service can only run them from
the TorchScript or torch.export archives built below.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class SoftMLP(nn.Module):
    """6 -> 16 -> 16 -> 3 with softplus, GELU and a skip connection (not a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 16)
        self.second = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.softplus(self.first(x))
        hidden = hidden + F.gelu(self.second(hidden))
        return self.out(hidden) * torch.tanh(x[:, :1])


class TinyConv(nn.Module):
    """A conv net on ``[1, 6, 6]`` with a residual GELU block and a sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.conv(x))
        hidden = hidden + torch.sigmoid(self.mix(hidden)) * hidden
        return self.head(hidden.flatten(1))


class ReluMLP(nn.Module):
    """Linear, ReLU, Linear: piecewise linear, so its Hessian is zero almost everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Branchy(nn.Module):
    """Data-dependent control flow: ``vmap`` cannot run it, plain autograd can."""

    def __init__(self, inputs: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(inputs, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > -1e9):
            return torch.tanh(self.a(x)) ** 2
        return self.a(x)


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with weights drawn from a fixed seed, in eval mode."""
    torch.manual_seed(seed)
    for parameter in module.parameters():
        nn.init.normal_(parameter, std=0.5)
    return module.eval()


def torchscript_bytes(module: nn.Module, *, trace_input: torch.Tensor | None = None) -> bytes:
    buffer = io.BytesIO()
    scripted = (
        torch.jit.trace(module, trace_input)
        if trace_input is not None
        else torch.jit.script(module)
    )
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def export_bytes(module: nn.Module, example: torch.Tensor, *, dynamic_batch: bool) -> bytes:
    """A ``torch.export.save`` archive; with ``dynamic_batch`` the batch size may vary
    (``example`` then needs two samples or more: export specializes a size of one).

    The dynamic shapes are given by position, not by ``forward``'s argument name, so this
    works for any one-input module (``nn.Sequential`` names its argument ``input``)."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (os.fspath(self.marker), "w"))


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_save_zip(marker: Path) -> bytes:
    """A ``torch.save`` checkpoint (zip) whose ``data.pkl`` is the payload."""
    buffer = io.BytesIO()
    torch.save({"weights": torch.ones(2), "evil": Payload(marker)}, buffer)
    return buffer.getvalue()


def with_entry_replaced(archive: bytes, suffix: str, data: bytes) -> bytes:
    """``archive`` with the entry whose name ends in ``suffix`` replaced by ``data``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content = data if info.filename.endswith(suffix) else source.read(info)
            target.writestr(info, content)
    return out.getvalue()


class Float32Only(nn.Module):
    """Multiplies by a float32 constant made in ``forward``: float64 inputs fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(torch.tanh(x), torch.ones(4, 2))


def legacy_torch_save(marker: Path) -> bytes:
    """A legacy ``torch.save`` stream: several pickles back to back (magic number,
    protocol, system info, then the object, which holds the payload), then raw storage.
    A scanner that stops at the first STOP sees only the magic number."""
    buffer = io.BytesIO()
    torch.save(
        {"x": torch.ones(2), "evil": Payload(marker)}, buffer, _use_new_zipfile_serialization=False
    )
    return buffer.getvalue()


def with_entry_appended(archive: bytes, suffix: str, extra: bytes) -> bytes:
    """``archive`` with ``extra`` appended to the entry whose name ends in ``suffix``."""
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        name = next(n for n in source.namelist() if n.endswith(suffix))
        return with_entry_replaced(archive, suffix, source.read(name) + extra)


def with_entry_added(archive: bytes, relative: str, data: bytes) -> bytes:
    """``archive`` with a new entry ``<root>/<relative>`` holding ``data``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        root = source.namelist()[0].split("/", 1)[0]
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr(f"{root}/{relative}", data)
    return out.getvalue()


def payload_constant_export(marker: Path) -> bytes:
    """A real torch.export archive whose constants config names an opaque object, which
    ``torch.export.load`` would read with plain ``pickle.loads``."""
    exported = export_bytes(seeded(SoftMLP()), torch.randn(2, 6), dynamic_batch=True)
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False}}}
    with_config = with_entry_replaced(
        exported, "constants/model_constants_config.json", json.dumps(config).encode()
    )
    return with_entry_added(with_config, "data/constants/opaque_obj_0", raw_pickle(marker))
