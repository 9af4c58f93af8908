"""Model files -> ``nn.Module``: one loader per manifest ``format``.

- ``zoo``: an architecture from the trusted ``repository.zoo`` plus safetensors weights;
- ``torchscript``: a ``torch.jit.save`` archive, loaded with ``torch.jit.load``;
- ``export``: a ``torch.export.save`` archive (``.pt2``); its ``.module()`` is served.

TorchScript and torch.export archives carry code and pickles: every file is checked by
``repository.archives.check_model_file`` first, so a pickle naming anything but tensor-rebuilding
globals is refused before a loader touches it. A model exported with a fixed batch of one
is wrapped so that it takes any batch (one sample at a time), and a TorchScript module is
wrapped so that the JIT never optimizes it (``UnoptimizedScript``).

Defence in depth: ``torch.export.load`` reads sample inputs and pickled payloads with
``torch.load``, and retries with ``weights_only=False`` when the safe load fails. torch's
own switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes every ``torch.load`` in the process
weights-only, whatever its call site asks for, so that retry can never unpickle code even
if a payload got past the scanner. This module sets it when imported, and every load
checks it is still set.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.jit._fuser import optimized_execution

from hessian_service.repository import zoo
from hessian_service.repository.archives import Format, check_model_file

WEIGHTS_ONLY_SWITCH = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNSAFE_SWITCH = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def force_weights_only_loads() -> None:
    """Make every ``torch.load`` of this process weights-only (torch reads the switch on
    each call), and drop the opposite switch, which would otherwise make torch refuse."""
    os.environ[WEIGHTS_ONLY_SWITCH] = "1"
    os.environ.pop(UNSAFE_SWITCH, None)


force_weights_only_loads()

DEFAULT_FILES: dict[str, str] = {
    "zoo": "weights.safetensors",
    "torchscript": "model.pt",
    "export": "model.pt2",
}


class OneSampleAtATime(nn.Module):
    """Runs a module that only accepts a batch of one on each sample of a batch.

    ``torch.export`` without a dynamic batch dimension guards ``x.size(0) == 1``; the
    engine's per-sample transforms call the model on batches of one, so derivatives are
    unaffected, and plain forward passes over a batch go through this loop.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out: torch.Tensor = self.inner(x)
            return out
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])


class UnoptimizedScript(nn.Module):
    """Runs a TorchScript module with the JIT's graph optimizations off, on every call.

    The JIT's profiling executor records a ScriptModule's first runs and then caches an
    optimized plan (differentiable subgraphs with their own symbolic backward) that does
    not compose with ``torch.func``: once the plan exists, the engine's ``vmap``-ed
    derivatives fail with "accessing `data` under vmap transform is not allowed" or come
    out wrong, depending only on how many calls came before (the load-time probe's own
    checks were enough). ``torch.jit.optimized_execution(False)`` is thread-local, so it
    is set here, around each call, on whichever thread runs the model: the module's
    graph then runs op by op, as eager code does, for the engine, the probe and plain
    forward passes alike. Graph capture (``make_fx``) traces through it unchanged.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with optimized_execution(False):
            out: torch.Tensor = self.inner(x)
        return out


def _load_zoo(path: Path, architecture: str | None) -> nn.Module:
    if architecture is None:
        raise ValueError("format 'zoo' needs an 'architecture' from hessian_service.repository.zoo")
    module = zoo.build(architecture)
    module.load_state_dict(load_file(str(path)), strict=True)
    return module


def _load_torchscript(path: Path) -> nn.Module:
    # map_location keeps tensors saved on a CUDA machine loadable here; the registry
    # moves the module to its device afterwards.
    module: nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
        str(path), map_location="cpu"
    )
    return UnoptimizedScript(module)


def _load_export(path: Path) -> nn.Module:
    # From a buffer: torch.export.load wants a path ending in .pt2, a buffer may be any.
    program = torch.export.load(io.BytesIO(path.read_bytes()))
    module: nn.Module = program.module()
    return module


def load_module(
    path: Path, fmt: Format, *, architecture: str | None, max_unpacked_bytes: int
) -> nn.Module:
    """Check ``path`` (``UnsafeModelFile`` when refused), then load it as ``fmt``."""
    check_model_file(path, fmt, max_unpacked_bytes=max_unpacked_bytes)
    return load_checked_module(path, fmt, architecture=architecture)


def load_checked_module(path: Path, fmt: Format, *, architecture: str | None) -> nn.Module:
    """Load ``path`` as ``fmt``, trusting that ``check_model_file`` passed it; torch.load
    stays weights-only all the same."""
    if os.environ.get(WEIGHTS_ONLY_SWITCH) != "1" or UNSAFE_SWITCH in os.environ:
        force_weights_only_loads()
    if fmt == "zoo":
        return _load_zoo(path, architecture)
    if fmt == "torchscript":
        return _load_torchscript(path)
    return _load_export(path)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (where the module allows it) and parameters that need no gradient.

    An exported program's module refuses ``eval()``: its train/eval behaviour was fixed
    when it was exported (``model.eval()`` before ``torch.export.export``).
    """
    with contextlib.suppress(NotImplementedError):
        module.eval()
    # ScriptModules refuse requires_grad_(); setting each parameter's flag works for all.
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def accepts_batches(module: nn.Module, sample: torch.Tensor) -> bool:
    """Whether ``module`` runs on a batch of two (an export with a static batch does not)."""
    try:
        with torch.no_grad():
            module(torch.cat([sample, sample]))
    except (RuntimeError, AssertionError, ValueError):
        return False
    return True
