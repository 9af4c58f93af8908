"""The engine's public surface: input Jacobians and Hessians of any ``nn.Module``.

``model`` takes one batched tensor; ``x`` is a batch ``[B, *sample_shape]``. Results are
flat matrices over ``n = prod(sample_shape)`` inputs: ``hessian`` gives ``[B, n, n]``
(``[B, k, n, n]`` for a list of ``k`` output indices) and ``jacobian`` gives ``[B, m, n]``.
Arguments are checked before any computation and errors start with the function's name,
as in ``torch.func``. The HTTP service calls exactly these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from app.engine import generic, structured
from app.engine.objectives import Objective
from app.engine.planner import DEFAULT_MEMORY_BUDGET_BYTES, Plan, plan_hessian, plan_jacobian
from app.engine.structure import Curvature, classify

HESSIAN_METHODS = ("auto", "structured", "generic")
JACOBIAN_METHODS = ("auto", "generic")
OutputIndex = int | Sequence[int] | None


@dataclass(frozen=True)
class DerivativeResult:
    """A computed derivative with what a caller needs to describe it.

    ``matrix`` is ``[B, k, n, n]`` (Hessian) or ``[B, k, n]`` (Jacobian), where ``k`` is the
    number of selected scalars; ``output`` is the model's output at ``x``, ``[B, *out]``.
    """

    matrix: torch.Tensor
    output: torch.Tensor
    method: str
    plan: Plan
    curvature: Curvature
    squeeze_scalars: bool


@dataclass(frozen=True)
class _Selection:
    indices: torch.Tensor | None  # raw outputs to select, or None for an objective
    objective: Objective | None
    squeeze: bool  # one int index (or an objective): drop the k axis

    @property
    def count(self) -> int:
        return 1 if self.indices is None else int(self.indices.numel())


def _select(
    api: str, output_index: OutputIndex, objective: Objective | None, m: int, *, default_all: bool
) -> _Selection:
    if objective is not None:
        if output_index is not None:
            raise ValueError(f"{api}: give output_index or objective, not both")
        return _Selection(indices=None, objective=objective, squeeze=True)
    if output_index is None:
        if default_all:
            return _Selection(torch.arange(m), None, squeeze=False)
        if m == 1:
            return _Selection(torch.zeros(1, dtype=torch.long), None, squeeze=True)
        raise ValueError(
            f"{api}: output_index is required when the model has {m} outputs "
            "(or give an objective that reduces them to one scalar)"
        )
    indices = [output_index] if isinstance(output_index, int) else list(output_index)
    if not indices:
        raise ValueError(f"{api}: output_index must not be an empty list")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < m:
            raise ValueError(f"{api}: output_index {index!r} is out of range for {m} outputs")
    if objective is None and isinstance(output_index, int):
        return _Selection(torch.tensor(indices), None, squeeze=True)
    return _Selection(torch.tensor(indices), None, squeeze=False)


def _check_input(api: str, model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{api}: x must be a batch [B, *sample_shape] with at least 2 dims")
    if not x.is_floating_point():
        raise ValueError(f"{api}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{api}: x must hold at least one sample")


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The model's output at ``x`` and the activation count of one sample's forward pass."""
    numel = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal numel
        if isinstance(output, torch.Tensor):
            numel += output[:1].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            output = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return output, max(numel, int(output[:1].numel()))


def _scalars_fn(model: nn.Module, selection: _Selection) -> generic.ScalarsFn:
    indices = selection.indices
    objective = selection.objective

    def scalars(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        if objective is None:
            assert indices is not None
            return out.index_select(0, indices.to(out.device))
        value: torch.Tensor = objective.scalar(out, target)
        return value.unsqueeze(0)

    return scalars


def _targets(selection: _Selection, batch: int, m: int, x: torch.Tensor) -> torch.Tensor:
    objective = selection.objective
    if objective is None:
        return torch.zeros(batch, dtype=x.dtype, device=x.device)
    return objective.per_sample_targets(batch, m).to(x.device)


def _check_method(api: str, method: str, methods: tuple[str, ...]) -> None:
    if method not in methods:
        raise ValueError(f"{api}: method must be one of {methods}, got {method!r}")


def _structured_hessian(
    network: list[nn.Module],
    x: torch.Tensor,
    selection: _Selection,
    targets: torch.Tensor,
    batch_chunk: int,
) -> torch.Tensor:
    objective = selection.objective
    pieces = [
        structured.hessian_of_layers(
            network,
            x[start : start + batch_chunk],
            indices=selection.indices,
            objective=objective.scalar if objective is not None else None,
            targets=targets[start : start + batch_chunk],
        )
        for start in range(0, x.shape[0], batch_chunk)  # chunks of samples, not of rows
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def compute_hessian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> DerivativeResult:
    """Input Hessians of selected outputs (or of an objective) for each sample of ``x``.

    ``memory_budget_bytes`` bounds the working memory: it sets how many basis vectors
    and samples go through the network at once (the ``chunk_size`` of ``torch.func``);
    a smaller budget is slower, never different.
    """
    _check_input("hessian", model, x)
    _check_method("hessian", method, HESSIAN_METHODS)
    network = structured.layers(model, tuple(x.shape[1:])) if method != "generic" else None
    if method == "structured" and network is None:
        raise ValueError(
            "hessian: method='structured' supports Sequential networks of Linear, "
            "BatchNorm1d, Flatten, Dropout and elementwise non-linearities; use 'auto'"
        )
    output, activation_numel = _forward(model, x)
    batch, m = x.shape[0], int(output[0].numel())
    selection = _select("hessian", output_index, objective, m, default_all=False)
    plan = plan_hessian(
        n=int(x[0].numel()),
        batch=batch,
        activation_numel=activation_numel,
        itemsize=x.element_size(),
        memory_budget_bytes=memory_budget_bytes,
        num_scalars=selection.count,
    )
    targets = _targets(selection, batch, m, x)
    if network is not None:
        plan = replace(plan, method="structured:backward", basis_chunk=int(x[0].numel()))
        with torch.no_grad():
            matrix = _structured_hessian(network, x, selection, targets, plan.batch_chunk)
        return DerivativeResult(
            matrix=matrix,
            output=output,
            method=plan.method,
            plan=plan,
            curvature=classify(model),
            squeeze_scalars=selection.squeeze,
        )
    scalars = _scalars_fn(model, selection)
    with torch.no_grad():
        try:
            matrix = generic.hessian(scalars, x, targets, plan)
        except NotImplementedError:  # an operator without forward-mode AD of its backward
            plan = replace(plan, method="generic:reverse-over-reverse")
            matrix = generic.hessian(scalars, x, targets, plan)
    return DerivativeResult(
        matrix=matrix,
        output=output,
        method=plan.method,
        plan=plan,
        curvature=classify(model),
        squeeze_scalars=selection.squeeze,
    )


def compute_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> DerivativeResult:
    """Input Jacobians of selected outputs (all by default) for each sample of ``x``."""
    _check_input("jacobian", model, x)
    _check_method("jacobian", method, JACOBIAN_METHODS)
    output, activation_numel = _forward(model, x)
    batch, m = x.shape[0], int(output[0].numel())
    selection = _select("jacobian", output_index, objective, m, default_all=True)
    plan = plan_jacobian(
        n=int(x[0].numel()),
        rows=selection.count,
        batch=batch,
        activation_numel=activation_numel,
        itemsize=x.element_size(),
        memory_budget_bytes=memory_budget_bytes,
    )
    scalars, targets = _scalars_fn(model, selection), _targets(selection, batch, m, x)
    with torch.no_grad():
        try:
            matrix = generic.jacobian(scalars, x, targets, plan)
        except NotImplementedError:  # an operator without forward-mode AD
            if plan.method == "generic:reverse":
                raise
            plan = replace(
                plan, method="generic:reverse", basis_chunk=min(plan.basis_chunk, selection.count)
            )
            matrix = generic.jacobian(scalars, x, targets, plan)
    return DerivativeResult(
        matrix=matrix,
        output=output,
        method=plan.method,
        plan=plan,
        curvature=classify(model),
        squeeze_scalars=selection.squeeze,
    )


def hessian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> torch.Tensor:
    """``[B, n, n]`` for one output index or an objective, ``[B, k, n, n]`` for a list of k."""
    result = compute_hessian(
        model,
        x,
        output_index=output_index,
        objective=objective,
        method=method,
        memory_budget_bytes=memory_budget_bytes,
    )
    return result.matrix[:, 0] if result.squeeze_scalars else result.matrix


def jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> torch.Tensor:
    """``[B, m, n]`` for all outputs (or a list of m indices), ``[B, n]`` for one index."""
    result = compute_jacobian(
        model,
        x,
        output_index=output_index,
        objective=objective,
        method=method,
        memory_budget_bytes=memory_budget_bytes,
    )
    return result.matrix[:, 0] if result.squeeze_scalars else result.matrix
