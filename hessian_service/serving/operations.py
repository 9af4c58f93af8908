"""One ``Operation`` per derivative kind: everything that differs between the endpoints.

The request checks (``serving.request``), the service, the batcher's key and the response
builder (``serving.response``) ask the request's operation instead of branching on its
kind: how many matrix axes one selected scalar has, whether no selection means "every
output" or is an error, the engine function, the shape of the ``tensor`` layout, what to
suggest when a result is too large, the notes that explain a result, and the one 2-D
grid the png encoding draws of it. A new endpoint (a Hessian-vector product, a trace,
eigenvalues) is one more ``Operation`` here, its engine function and a thin route.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from hessian_service.engine import (
    Curvature,
    DerivativeKind,
    DerivativeResult,
    EnginePath,
    Objective,
    compute_hessian,
    compute_jacobian,
    operators,
)
from hessian_service.engine.operators import rows
from hessian_service.engine.progress import NO_PROGRESS, Progress
from hessian_service.units import format_bytes
from hessian_service.wire.operator_schemas import EigenRequest, EstimateRequest, ProductRequest
from hessian_service.wire.schemas import DerivativeRequest


class Operation(ABC):
    """What one derivative kind computes, and how its result is shaped and explained."""

    kind: ClassVar[DerivativeKind]
    # Matrix axes per selected scalar over the n inputs: 1 (a row [n]) or 2 ([n, n]).
    axes_per_scalar: ClassVar[int]
    # With neither output_index nor objective: every output (True) or an error unless the
    # model has one output (False).
    all_outputs_by_default: ClassVar[bool]
    # Its per-scalar result is a symmetric n x n matrix (a Hessian): the request may ask
    # for a block of its rows (``rows``) and for its upper triangle (``layout: packed``).
    symmetric_matrix: ClassVar[bool] = False
    # The body its endpoint validates (what POST /jobs validates a job's "request" with).
    request_schema: ClassVar[type[BaseModel]] = DerivativeRequest
    # True: the engine function reports no progress of its own, so a job runs it a few
    # samples at a time (serving.jobs); False: ``compute`` passes ``selection.progress``
    # to an engine function that advances it per chunk.
    chunks_by_sample: ClassVar[bool] = False
    # False: each request is its own batch (its operands are its own; serving.merging).
    merges: ClassVar[bool] = True

    @property
    def probed_kind(self) -> DerivativeKind:
        """The kind whose load-time probe choice (``LoadedModel.method``) applies."""
        return self.kind

    def entries_per_scalar(self, n: int) -> int:
        """Result entries per selected scalar of one sample with ``n`` inputs."""
        return int(n**self.axes_per_scalar)

    def leading_shape(
        self, matrix_shape: Sequence[int], output_shape: Sequence[int], all_outputs: bool
    ) -> list[int]:
        """The result's axes before the per-scalar ``[n]`` / ``[n, n]`` ones, for the
        ``tensor`` layout: ``[B]``, ``[B, k]`` or, for every output, ``[B, *output_shape]``."""
        leading = list(matrix_shape[: -self.axes_per_scalar])
        return [leading[0], *output_shape] if all_outputs else leading

    def smaller_alternative(self, batch: int, scalars: int, n: int, itemsize: int) -> str:
        """What to ask for instead when this result is over the size limit."""
        return "ask for fewer output indices"

    def notes(self, curvature: Curvature, objective: Objective | None, zero: bool) -> list[str]:
        """Sentences that explain a result a user might take for an error."""
        return [f"Every entry of the {self.kind} is exactly zero at this input."] if zero else []

    def picture(self, selected: torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
        """One sample's result (``DerivativeResult.selected`` without its batch axis) as
        the one 2-D grid the png encoding draws; a Hessian's ``[n, n]`` as it is (the
        request checks refuse the ``[k, n, n]`` of a list of indices)."""
        return selected

    @abstractmethod
    def compute(
        self, module: nn.Module, x: torch.Tensor, selection: Selection
    ) -> DerivativeResult | OperatorOutcome:
        """Run this operation's engine function on the batch ``x``."""


@dataclass(frozen=True)
class Selection:
    """What to derive and how, for the engine: the outputs or objective, the path the
    load-time probe chose, and the working-memory budget."""

    output_index: int | list[int] | None
    objective: Objective | None
    method: EnginePath
    memory_budget_bytes: int
    # Counts products and carries a job's cancel flag (``engine.progress``); operations
    # whose engine function works in chunks pass it on. Not an engine keyword of
    # ``options()``: compute_hessian / compute_jacobian take none.
    progress: Progress = NO_PROGRESS
    # What a matrix-free operator takes besides the selection (its vectors, budgets);
    # None for the dense kinds.
    operands: Operands | None = None
    # rows.start, rows.stop of a symmetric operation's matrices (None: all); not an
    # engine keyword of ``options()`` either: the operation picks the engine function.
    rows: tuple[int, int] | None = None
    # Diagonals and traces: a forward-Laplacian pass asked for this often with one shape
    # is compiled in the background (HESSIAN_COMPILE_AFTER; 0: never).
    compile_after: int = 0

    def options(self) -> dict[str, Any]:
        """The engine functions' keyword arguments (shallow: the objective's tensors are
        passed, never copied)."""
        return {
            "output_index": self.output_index,
            "objective": self.objective,
            "method": self.method,
            "memory_budget_bytes": self.memory_budget_bytes,
        }


class JacobianOperation(Operation):
    """``POST /jacobian``: ``[B, k, n]`` rows, every output by default."""

    kind = DerivativeKind.JACOBIAN
    axes_per_scalar = 1
    all_outputs_by_default = True
    chunks_by_sample = True

    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> DerivativeResult:
        return compute_jacobian(module, x, **selection.options())

    def picture(self, selected: torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
        """The ``[k, n]`` rows; one row of an image model (input ``[..., H, W]`` with
        leading dimensions of 1) as its ``H x W`` image, the saliency picture; any other
        row as a ``1 x n`` strip."""
        rows = selected.reshape(-1, selected.shape[-1])
        if rows.shape[0] == 1 and len(sample_shape) >= 2 and math.prod(sample_shape[:-2]) == 1:
            return rows.reshape(*sample_shape[-2:])
        return rows


class HessianOperation(Operation):
    """``POST /hessian``: ``[B, k, n, n]``, of one selected output or an objective."""

    kind = DerivativeKind.HESSIAN
    axes_per_scalar = 2
    all_outputs_by_default = False
    symmetric_matrix = True
    chunks_by_sample = True

    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> DerivativeResult:
        if selection.rows is not None:  # a block of rows: products, or the dense slice
            start, stop = selection.rows  # (progress: a job counts samples, chunks_by_sample)
            return rows.hessian_rows(module, x, start, stop, **selection.options())
        return compute_hessian(module, x, **selection.options())

    def smaller_alternative(self, batch: int, scalars: int, n: int, itemsize: int) -> str:
        return f"/jacobian would return {format_bytes(batch * scalars * n * itemsize)}"

    def notes(self, curvature: Curvature, objective: Objective | None, zero: bool) -> list[str]:
        """The load-time curvature explains zeros (it also reads TorchScript and export
        graphs): an affine model's Hessian is zero, a piecewise-linear one's almost so."""
        network_curvature_free = objective is None or objective.curvature_of_objective_is_zero
        if curvature is Curvature.AFFINE and network_curvature_free:
            return [
                "The model is affine in its input (only affine layers such as Linear, Conv "
                "and average pooling), so its input Hessian is identically zero: this is the "
                "exact answer, not an error."
            ]
        if curvature is Curvature.PIECEWISE_LINEAR and network_curvature_free:
            return [
                "The model's non-linearities are piecewise linear (ReLU, max-pool, ...), so "
                "its input Hessian is zero almost everywhere (it is undefined only on the "
                "kinks). For curvature, ask for an objective such as cross_entropy or "
                "log_softmax."
            ]
        if curvature is Curvature.PIECEWISE_LINEAR:
            return [
                "The model's own curvature is zero almost everywhere (piecewise-linear "
                "non-linearities), so this Hessian is the objective's curvature seen through "
                "the network: J^T H_objective J."
            ]
        return super().notes(curvature, objective, zero)


@dataclass(frozen=True, eq=False)
class Operands:
    """What a matrix-free operator request adds to the selection, decoded and checked.

    Compared and hashed by identity, never by value: an estimate's or eigen-solve's
    budgets and seed are its own (its batch key is the request's identity); products,
    which merge, are keyed by their vectors' shape and dtype, and the vectors of a merged
    batch are concatenated sample by sample (``serving.merging``).
    """

    vectors: torch.Tensor | None = None  # [B, m, *in] (hvp, jvp) or [B, m, *out] (vjp)
    exact: bool | None = None  # diagonal, trace: true, false, or the planner's choice
    max_products: int | None = None  # diagonal, trace, eigen: products in all
    max_work: int | None = None  # diagonal, trace: the work bound the plan was made with
    seed: int = 0
    k: int = 5  # eigen
    which: str = "largest"  # eigen: largest | smallest | magnitude
    tol: float = 1e-6  # eigen


@dataclass(frozen=True)
class OperatorOutcome:
    """What a matrix-free operator computed, for the response: its named values, each
    with the batch axis first (``[B, ...]``), the model's output ``[B, *out]``, and the
    cost in products."""

    values: dict[str, torch.Tensor]  # in the response's order
    output: torch.Tensor
    products: int
    exact: bool
    method: str
    converged: bool | None = None

    @classmethod
    def of(
        cls,
        result: operators.ProductResult | operators.Estimate,
        values: dict[str, torch.Tensor],
        *,
        exact: bool,
    ) -> OperatorOutcome:
        """``values`` with the engine ``result``'s output, products and method."""
        return cls(
            values=values,
            output=result.output,
            products=result.products,
            exact=exact,
            method=result.method,
        )

    @property
    def elements(self) -> int:
        """Numbers in the response's tensors (how large its body will be)."""
        return sum(int(v.numel()) for v in self.values.values()) + int(self.output.numel())


class OperatorOperation(Operation):
    """A matrix-free operator of ``engine.operators``: one scalar's Hessian (or the
    Jacobian) applied to vectors, never formed. Each request is its own batch (but the
    products', which merge), and the engine function counts its products in
    ``selection.progress`` chunk by chunk."""

    axes_per_scalar = 1
    all_outputs_by_default = False
    merges = False
    # Its name in ``engine.operators.plan_operator`` (KINDS).
    plan_kind: ClassVar[str]
    # The kind of the engine function the probe chose a path for.
    probed: ClassVar[DerivativeKind] = DerivativeKind.HESSIAN

    @property
    def probed_kind(self) -> DerivativeKind:
        return self.probed

    @property
    def route(self) -> str:
        return f"/{self.kind}"

    @staticmethod
    def operands(selection: Selection) -> Operands:
        if selection.operands is None:
            raise ValueError("a matrix-free operator needs its operands in the selection")
        return selection.operands

    @staticmethod
    def engine_options(selection: Selection) -> dict[str, Any]:
        """The keyword arguments every engine operator takes."""
        return {
            "output_index": selection.output_index,
            "objective": selection.objective,
            "memory_budget_bytes": selection.memory_budget_bytes,
            "progress": selection.progress,
        }

    @abstractmethod
    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> OperatorOutcome:
        """Run the engine operator on the batch ``x`` with ``selection.operands``."""


class _ProductOperation(OperatorOperation):
    """``H v``, ``J v`` or ``u^T J`` for m vectors per sample: exact, m products each.
    Products merge: concurrent requests with the same m run as one batch, each sample
    with its own vectors (``serving.merging``)."""

    request_schema = ProductRequest
    merges = True
    # The response's name of the products.
    value_name: ClassVar[str]
    # The ``engine.operators`` function (a staticmethod: called without ``self``).
    engine: ClassVar[Callable[..., operators.ProductResult]]

    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> OperatorOutcome:
        vectors = self.operands(selection).vectors
        assert vectors is not None  # the request checks decoded them
        result = self.engine(module, x, vectors, **self.engine_options(selection))
        return OperatorOutcome.of(result, {self.value_name: result.values}, exact=True)


class HvpOperation(_ProductOperation):
    """``POST /hvp``: Hessian-vector products ``H v``, ``[B, m, *input_shape]``."""

    kind = DerivativeKind.HVP
    plan_kind = "hvp"
    value_name = "hvp"
    engine = staticmethod(operators.hessian_vector_products)


class JvpOperation(_ProductOperation):
    """``POST /jvp``: Jacobian-vector products ``J v``, ``[B, m, *output_shape]`` (every
    output by default; ``[B, m, k]`` for a list of k indices)."""

    kind = DerivativeKind.JVP
    plan_kind = "jvp"
    value_name = "jvp"
    all_outputs_by_default = True
    probed = DerivativeKind.JACOBIAN
    engine = staticmethod(operators.jacobian_vector_products)


class VjpOperation(_ProductOperation):
    """``POST /vjp``: vector-Jacobian products ``u^T J``, ``[B, m, *input_shape]``, for
    vectors ``u`` over the outputs."""

    kind = DerivativeKind.VJP
    plan_kind = "vjp"
    value_name = "vjp"
    all_outputs_by_default = True
    probed = DerivativeKind.JACOBIAN
    engine = staticmethod(operators.vector_jacobian_products)


class _EstimateOperation(OperatorOperation):
    """A diagonal or trace: exact (the graph engine, dense chunks, or HVPs with basis
    vectors) or a stochastic estimate with its standard error."""

    request_schema = EstimateRequest
    value_name: ClassVar[str]
    # The ``engine.operators`` function (a staticmethod: called without ``self``).
    engine: ClassVar[Callable[..., operators.Estimate]]

    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> OperatorOutcome:
        operands = self.operands(selection)
        result = self.engine(
            module,
            x,
            exact=operands.exact,
            max_products=operands.max_products,
            max_work=operands.max_work,
            seed=operands.seed,
            compile_after=selection.compile_after,
            **self.engine_options(selection),
        )
        values = {self.value_name: result.values}
        if result.standard_error is not None:
            values["standard_error"] = result.standard_error
        return OperatorOutcome.of(result, values, exact=result.exact)


class DiagonalOperation(_EstimateOperation):
    """``POST /hessian/diagonal``: the Hessian's diagonal, ``[B, *input_shape]``."""

    kind = DerivativeKind.HESSIAN_DIAGONAL
    plan_kind = "diagonal"
    value_name = "diagonal"
    engine = staticmethod(operators.hessian_diagonal)


class TraceOperation(_EstimateOperation):
    """``POST /hessian/trace``: the Hessian's trace (the Laplacian), ``[B]``."""

    kind = DerivativeKind.HESSIAN_TRACE
    plan_kind = "trace"
    value_name = "trace"
    engine = staticmethod(operators.hessian_trace)


class EigenOperation(OperatorOperation):
    """``POST /hessian/eigen``: k eigenpairs by Lanczos on Hessian-vector products."""

    kind = DerivativeKind.HESSIAN_EIGEN
    plan_kind = "eigen"
    request_schema = EigenRequest

    def compute(self, module: nn.Module, x: torch.Tensor, selection: Selection) -> OperatorOutcome:
        operands = self.operands(selection)
        result = operators.hessian_eigen(
            module,
            x,
            k=operands.k,
            which=operands.which,
            tol=operands.tol,
            max_products=operands.max_products,
            seed=operands.seed,
            **self.engine_options(selection),
        )
        return OperatorOutcome(
            values={
                "eigenvalues": result.values,
                "eigenvectors": result.vectors,
                "residuals": result.residuals,
            },
            output=result.output,
            products=result.products,
            exact=False,
            method="lanczos",
            converged=result.converged,
        )


OPERATIONS: dict[DerivativeKind, Operation] = {
    operation.kind: operation
    for operation in (
        JacobianOperation(),
        HessianOperation(),
        HvpOperation(),
        JvpOperation(),
        VjpOperation(),
        DiagonalOperation(),
        TraceOperation(),
        EigenOperation(),
    )
}


def operation_for(kind: DerivativeKind | str) -> Operation:
    """The operation of ``kind`` (its name is accepted too)."""
    return OPERATIONS[DerivativeKind(kind)]
