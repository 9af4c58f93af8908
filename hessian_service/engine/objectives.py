"""Scalar objectives built on a network's flattened per-sample output.

Each objective maps one sample's output vector ``o`` (shape ``[m]``) to one scalar; a
raw output selection maps it to ``k`` scalars ``o[indices]``. Everything here is pure
torch so that ``torch.func`` transforms (vmap, jacrev, jacfwd) compose through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessian_service.engine.methods import _WireEnum


class ObjectiveKind(_WireEnum):
    """The objectives, by the names the API uses for them."""

    SUM = "sum"
    LOG_SOFTMAX = "log_softmax"
    MSE = "mse"
    CROSS_ENTROPY = "cross_entropy"
    WEIGHTED_SUM = "weighted_sum"

    @property
    def needs_index(self) -> bool:
        return self is ObjectiveKind.LOG_SOFTMAX

    @property
    def needs_target(self) -> bool:
        return self in (ObjectiveKind.MSE, ObjectiveKind.CROSS_ENTROPY, ObjectiveKind.WEIGHTED_SUM)

    @property
    def target_is_output_row(self) -> bool:
        """True when the target is shaped like one sample's output (mse's target,
        weighted_sum's weights), not a class index."""
        return self in (ObjectiveKind.MSE, ObjectiveKind.WEIGHTED_SUM)

    @property
    def is_linear(self) -> bool:
        """True when the objective is linear in the output: its own Hessian is zero."""
        return self in (ObjectiveKind.SUM, ObjectiveKind.WEIGHTED_SUM)


OBJECTIVE_KINDS: tuple[ObjectiveKind, ...] = tuple(ObjectiveKind)


def _sum(output: torch.Tensor, _target: torch.Tensor, _index: int | None) -> torch.Tensor:
    return output.sum()


def _log_softmax(output: torch.Tensor, _target: torch.Tensor, index: int | None) -> torch.Tensor:
    assert index is not None
    return torch.log_softmax(output, dim=0)[index]


def _mse(output: torch.Tensor, target: torch.Tensor, _index: int | None) -> torch.Tensor:
    return ((output - target.to(output.dtype)) ** 2).mean()


def _cross_entropy(output: torch.Tensor, target: torch.Tensor, _index: int | None) -> torch.Tensor:
    # Gather the target class without data-dependent Python control flow (vmap-safe).
    log_probs = torch.log_softmax(output, dim=0)
    classes = torch.arange(output.shape[0], device=output.device)
    one_hot = (classes == target.long()).to(output.dtype)
    return -(log_probs * one_hot).sum()


def _weighted_sum(output: torch.Tensor, weights: torch.Tensor, _index: int | None) -> torch.Tensor:
    return (output * weights.to(output.dtype)).sum()


# One sample's flat output, its target row and the objective's index -> the scalar.
_SCALARS: dict[ObjectiveKind, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    ObjectiveKind.SUM: _sum,
    ObjectiveKind.LOG_SOFTMAX: _log_softmax,
    ObjectiveKind.MSE: _mse,
    ObjectiveKind.CROSS_ENTROPY: _cross_entropy,
    ObjectiveKind.WEIGHTED_SUM: _weighted_sum,
}


@dataclass(frozen=True)
class Objective:
    """A scalar built on the network output.

    - ``sum``: ``sum(o)``.
    - ``log_softmax``: ``log_softmax(o)[index]``.
    - ``mse``: ``mean((o - target)**2)``, ``target`` shaped like one sample's output
      or ``[B, m]`` per sample (as ``torch.nn.functional.mse_loss``, reduction mean).
    - ``cross_entropy``: ``-log_softmax(o)[target]``, ``target`` a class index, or one
      index per sample (``[B]``), as ``torch.nn.functional.cross_entropy``.
    - ``weighted_sum``: ``sum(w * o)``, the weights ``w`` (held in ``target``) shaped like
      one sample's output or ``[B, m]``: a sensitivity-weighted output, as UM-Bridge's
      ``Gradient`` and ``ApplyHessian`` take it (``sens^T f``). Linear in the output, so
      its Hessian is ``sum_i w_i H_i``.
    """

    kind: ObjectiveKind
    index: int | None = None
    target: torch.Tensor | None = None

    def __post_init__(self) -> None:
        try:  # the names are accepted as well as the enum members
            object.__setattr__(self, "kind", ObjectiveKind(self.kind))
        except ValueError:
            kinds = [str(kind) for kind in ObjectiveKind]
            raise ValueError(f"Objective: kind must be one of {kinds}, got {self.kind!r}") from None
        if self.kind.needs_index and self.index is None:
            raise ValueError(f"Objective: {self.kind} needs an index")
        if self.kind.needs_target and self.target is None:
            raise ValueError(f"Objective: {self.kind} needs a target")

    @property
    def curvature_of_objective_is_zero(self) -> bool:
        """True when the objective is linear in the output (its own Hessian is zero)."""
        return self.kind.is_linear

    def per_sample_targets(self, batch_size: int, output_numel: int) -> torch.Tensor:
        """Targets as one row per sample (``[B, m]`` for mse and weighted_sum, ``[B]`` for
        cross_entropy).

        Objectives without a target get a dummy ``[B]`` zero vector so that every
        objective can be vmapped the same way.
        """
        if self.target is None:
            return torch.zeros(batch_size)
        target = self.target
        if self.kind.target_is_output_row:
            flat = target.reshape(-1) if target.numel() in (1, output_numel) else None
            if flat is not None:
                return flat.expand(output_numel).expand(batch_size, output_numel)
            return target.reshape(batch_size, output_numel)
        if target.numel() == 1:
            return target.reshape(()).expand(batch_size)
        return target.reshape(batch_size)

    def scalar(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The objective's value for one sample's flattened output and its target row."""
        return _SCALARS[self.kind](output, target, self.index)

    def describe(self) -> str:
        """Short human name, e.g. ``cross_entropy`` or ``log_softmax[2]``."""
        return f"{self.kind}[{self.index}]" if self.kind.needs_index else str(self.kind)
