"""Which scalar (or outputs) an operator differentiates, and what it plans with.

The operators select scalars exactly as ``compute_hessian`` / ``compute_jacobian`` do (an
int ``output_index``, a list of them, an ``Objective``, or a single-output model), so
this module reuses ``engine.api``'s private helpers rather than copying them: it is the
one place in the package that touches them, so that a change there is one change here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hessian_service.engine import api
from hessian_service.engine.objectives import Objective

# One sample's flat inputs [n] and its target row -> the selected scalar (0-dim).
ScalarFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# One sample's flat inputs [n] and its target row -> the selected outputs [k].
OutputsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Setup:
    """One request's selection and the sizes its plan needs, found before any work."""

    api_name: str
    sample_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    batch: int
    n: int  # inputs per sample
    activation_numel: int  # elements one forward pass of one sample creates
    itemsize: int
    selection: api._Selection
    targets: torch.Tensor  # [B] or [B, m]: the objective's rows (zeros without one)
    all_outputs: bool = False  # a Jacobian product of every output, in its own shape

    @property
    def outputs(self) -> int:
        """Flat outputs per sample."""
        return math.prod(self.output_shape)

    @property
    def count(self) -> int:
        """Selected scalars per sample (1 for an int index or an objective)."""
        return self.selection.count

    @property
    def squeeze(self) -> bool:
        """One int index or an objective: the selected axis is dropped."""
        return self.selection.squeeze


def prepare(
    api_name: str,
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: api.OutputIndex,
    objective: Objective | None,
    one_scalar: bool,
) -> Setup:
    """Check ``model``/``x`` and select scalars, before any work.

    ``one_scalar`` (Hessian operators): exactly one scalar, an int index, an objective or
    the only output of a single-output model; a list is refused. Otherwise (Jacobian
    products) no index means every output.
    """
    api._check_input(api_name, model, x)
    if one_scalar and output_index is not None and not isinstance(output_index, int):
        raise ValueError(
            f"{api_name}: output_index must be one int (one scalar's Hessian), got {output_index!r}"
        )
    with api.AUTODIFF_LOCK:  # the profile's forward hooks must not meet another pass
        profile = api._profile(model, x)
    m = math.prod(profile.output_shape)
    selection = api._select(api_name, output_index, objective, m, default_all=not one_scalar)
    batch = x.shape[0]
    return Setup(
        api_name=api_name,
        sample_shape=tuple(x.shape[1:]),
        output_shape=profile.output_shape,
        batch=batch,
        n=int(x[0].numel()),
        activation_numel=profile.activation_numel,
        itemsize=x.element_size(),
        selection=selection,
        targets=api._targets(selection, batch, m, x),
        all_outputs=not one_scalar and output_index is None and objective is None,
    )


def outputs_fn(model: nn.Module, setup: Setup) -> OutputsFn:
    """One sample's flat inputs and target -> its selected scalars ``[k]``."""
    scalars = api._scalars_fn(model, setup.selection)
    shape = setup.sample_shape

    def selected(flat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scalars(flat.reshape(shape), target)

    return selected


def scalar_fn(model: nn.Module, setup: Setup) -> ScalarFn:
    """One sample's flat inputs and target -> the one selected scalar (0-dim)."""
    selected = outputs_fn(model, setup)

    def scalar(flat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return selected(flat, target)[0]

    return scalar


def objective_rows(
    setup: Setup, start: int, stop: int, objective: Objective | None
) -> Objective | None:
    """``objective`` for samples ``start:stop`` only: its per-sample targets sliced, so
    that a chunk of samples can go to ``compute_hessian`` on its own."""
    if objective is None or objective.target is None:
        return objective
    return Objective(objective.kind, objective.index, setup.targets[start:stop])
