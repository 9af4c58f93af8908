"""What a call returns, shared by ``client`` and ``bulk`` (which must not import each other).

``Result`` is one answer as numpy arrays; ``as_array`` turns what a caller passes into
numpy; ``converter`` decides, before any request is sent, whether a call hands back a
``torch.Tensor`` or the numpy array -- torch is optional (the ``torch`` extra), so a
caller who wants tensors without torch installed gets ``TorchNotInstalledError`` at once
instead of a numpy array in place of the promised tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hessian_client._wire import HessianServiceError

Kind = Literal["hessian", "jacobian"]
Encoding = Literal["binary", "base64", "json"]
TORCH_MISSING = (
    "torch is not installed, so no torch.Tensor can be returned (no request was sent): "
    "pass as_numpy=True for numpy arrays, or `pip install 'hessian-client[torch]'`"
)


class TorchNotInstalledError(HessianServiceError, ImportError):
    """A tensor result was asked for (``as_numpy=False``) and torch cannot be imported.

    Both a ``HessianServiceError`` (every failure of the client is one, so code that
    catches that catches this) and an ``ImportError`` (what it is: an optional dependency
    that is missing, so ``except ImportError`` works as for any such package).
    """

    def __init__(self) -> None:
        super().__init__(TORCH_MISSING)
        self.name = "torch"


@dataclass(frozen=True)
class Result:
    """A /hessian or /jacobian answer: the matrix, the model's output, the metadata."""

    value: np.ndarray
    output: np.ndarray
    metadata: dict[str, Any]
    model: str
    model_version: str


def as_array(x: Any) -> np.ndarray:
    """numpy, torch (any device) or nested lists as a numpy array."""
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _unchanged(array: np.ndarray) -> np.ndarray:
    return array


def converter(as_numpy: bool) -> Callable[[np.ndarray], Any]:
    """How a call hands back its matrix: the numpy array itself (``as_numpy``), or a
    ``torch.Tensor`` sharing a writable copy of it.

    Called before the request is sent, so that a missing torch costs no server work:
    raises ``TorchNotInstalledError`` when a tensor is wanted and torch cannot be imported.
    """
    if as_numpy:
        return _unchanged
    try:
        import torch
    except ImportError as exc:
        raise TorchNotInstalledError() from exc

    def to_tensor(array: np.ndarray) -> Any:
        return torch.from_numpy(array if array.flags.writeable else array.copy())

    return to_tensor
