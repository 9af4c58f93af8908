"""Scalar objectives built on a network's flattened per-sample output.

Each objective maps one sample's output vector ``o`` (shape ``[m]``) to one scalar; a
raw output selection maps it to ``k`` scalars ``o[indices]``. Everything here is pure
torch so that ``torch.func`` transforms (vmap, jacrev, jacfwd) compose through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ObjectiveKind = Literal["sum", "log_softmax", "mse", "cross_entropy"]
OBJECTIVE_KINDS: tuple[ObjectiveKind, ...] = ("sum", "log_softmax", "mse", "cross_entropy")


@dataclass(frozen=True)
class Objective:
    """A scalar built on the network output.

    - ``sum``: ``sum(o)``.
    - ``log_softmax``: ``log_softmax(o)[index]``.
    - ``mse``: ``mean((o - target)**2)``, ``target`` shaped like one sample's output
      or ``[B, m]`` per sample (as ``torch.nn.functional.mse_loss``, reduction mean).
    - ``cross_entropy``: ``-log_softmax(o)[target]``, ``target`` a class index, or one
      index per sample (``[B]``), as ``torch.nn.functional.cross_entropy``.
    """

    kind: ObjectiveKind
    index: int | None = None
    target: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVE_KINDS:
            raise ValueError(f"Objective: kind must be one of {OBJECTIVE_KINDS}, got {self.kind!r}")
        if self.kind == "log_softmax" and self.index is None:
            raise ValueError("Objective: log_softmax needs an index")
        if self.kind in ("mse", "cross_entropy") and self.target is None:
            raise ValueError(f"Objective: {self.kind} needs a target")

    @property
    def curvature_of_objective_is_zero(self) -> bool:
        """True when the objective is linear in the output (its own Hessian is zero)."""
        return self.kind == "sum"

    def per_sample_targets(self, batch_size: int, output_numel: int) -> torch.Tensor:
        """Targets as one row per sample (``[B, m]`` for mse, ``[B]`` for cross_entropy).

        Objectives without a target get a dummy ``[B]`` zero vector so that every
        objective can be vmapped the same way.
        """
        if self.target is None:
            return torch.zeros(batch_size)
        target = self.target
        if self.kind == "mse":
            flat = target.reshape(-1) if target.numel() in (1, output_numel) else None
            if flat is not None:
                return flat.expand(output_numel).expand(batch_size, output_numel)
            return target.reshape(batch_size, output_numel)
        if target.numel() == 1:
            return target.reshape(()).expand(batch_size)
        return target.reshape(batch_size)

    def scalar(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The objective's value for one sample's flattened output and its target row."""
        if self.kind == "sum":
            return output.sum()
        if self.kind == "log_softmax":
            assert self.index is not None
            return torch.log_softmax(output, dim=0)[self.index]
        if self.kind == "mse":
            return ((output - target.to(output.dtype)) ** 2).mean()
        # cross_entropy: gather the target class without data-dependent Python control flow.
        log_probs = torch.log_softmax(output, dim=0)
        classes = torch.arange(output.shape[0], device=output.device)
        one_hot = (classes == target.long()).to(output.dtype)
        return -(log_probs * one_hot).sum()

    def describe(self) -> str:
        """Short human name, e.g. ``cross_entropy`` or ``log_softmax[2]``."""
        if self.kind == "log_softmax":
            return f"log_softmax[{self.index}]"
        return self.kind
