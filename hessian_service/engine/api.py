"""The engine's public surface: input Jacobians and Hessians of any ``nn.Module``.

``model`` takes one batched tensor; ``x`` is a batch ``[B, *sample_shape]``. Results are
flat matrices over ``n = prod(sample_shape)`` inputs: ``hessian`` gives ``[B, n, n]``
(``[B, k, n, n]`` for a list of ``k`` output indices) and ``jacobian`` gives ``[B, m, n]``.
Arguments are checked before any computation and errors start with the function's name,
as in ``torch.func``. The HTTP service calls exactly these functions.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

import torch
from torch import nn
from torch.jit._fuser import optimized_execution

from hessian_service.engine import generic, rowloop, structured
from hessian_service.engine.graph import cache as graph_cache
from hessian_service.engine.graph import compiled as graph_compiled
from hessian_service.engine.graph import direct as graph_direct
from hessian_service.engine.graph import hessian as graph_hessian
from hessian_service.engine.graph import laplacian as graph_laplacian
from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.graph.report import report as graph_report_of
from hessian_service.engine.methods import Algorithm, EnginePath
from hessian_service.engine.objectives import Objective
from hessian_service.engine.planner import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    Plan,
    plan_hessian,
    plan_jacobian,
    plan_structured_hessian,
    plan_structured_jacobian,
)
from hessian_service.engine.progress import NO_PROGRESS, Progress

# Every path serves both kinds; "autograd" (the per-row loop, engine.rowloop) is for models
# that torch.func transforms cannot run (the registry's capability probe picks it).
METHODS: tuple[str, ...] = tuple(str(path) for path in EnginePath)
OutputIndex = int | Sequence[int] | None
_P = ParamSpec("_P")
_R = TypeVar("_R")

# torch's forward-mode AD levels are process-wide, not per thread: two threads running
# jvp at once corrupt each other's levels ("Trying to access a forward AD level with an
# invalid index"). The entry points below, and anything else in the process that runs
# torch.func transforms (the registry's load-time probe), hold this lock.
AUTODIFF_LOCK = threading.RLock()

# The share of the memory budget a forward-Laplacian pass's carried columns may take.
LAPLACIAN_WORKING_SHARE = 2


def _serialized(function: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(function)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with AUTODIFF_LOCK:
            return function(*args, **kwargs)

    return locked


@dataclass(frozen=True)
class DerivativeResult:
    """A computed derivative with what a caller needs to describe it.

    ``matrix`` is ``[B, k, n, n]`` (Hessian) or ``[B, k, n]`` (Jacobian), where ``k`` is the
    number of selected scalars; ``output`` is the model's output at ``x``, ``[B, *out]``.
    """

    matrix: torch.Tensor
    output: torch.Tensor
    method: Algorithm  # what ran (the response's metadata.method)
    plan: Plan
    squeeze_scalars: bool

    @property
    def selected(self) -> torch.Tensor:
        """``matrix`` as the caller asked for it: without the ``k`` axis for one int index
        or an objective (``[B, n, n]`` / ``[B, n]``), with it for a list of indices."""
        return self.matrix[:, 0] if self.squeeze_scalars else self.matrix


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


@dataclass(frozen=True)
class _ForwardProfile:
    """What one forward pass of one sample says about a model: its per-sample output
    shape and how many activation elements that pass creates (for memory planning).
    (Not the registry's load-time capability probe: this is one measured forward pass.)"""

    output_shape: tuple[int, ...]
    activation_numel: int


# Profiles depend on the model and the input's shape, dtype and device only; they are kept
# as long as the model lives, so repeated requests skip the extra forward pass.
_PROFILES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], _ForwardProfile]] = (
    weakref.WeakKeyDictionary()
)


def _takes_no_hooks(model: nn.Module) -> bool:
    """TorchScript modules (anywhere inside) refuse forward hooks."""
    return any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


def _saved_tensor_numel(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output, and the elements autograd saves for the backward pass of one forward:
    the activation memory of a model whose layers cannot be hooked."""
    numel = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal numel
        numel += tensor.numel()
        return tensor

    # Unoptimized: a TorchScript plan optimized on a grad run gives wrong results under
    # vmap later (tests/unit/test_generic_robust.py).
    with (
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        optimized_execution(False),
    ):
        output = model(x.detach().requires_grad_(True))
    return output.detach(), numel


def _profile(model: nn.Module, x: torch.Tensor) -> _ForwardProfile:
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    known = _PROFILES.setdefault(model, {})
    if key in known:
        return known[key]
    numel = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal numel
        if isinstance(output, torch.Tensor):
            numel += output.numel()

    if _takes_no_hooks(model):
        output, numel = _saved_tensor_numel(model, x[:1])
        known[key] = _ForwardProfile(tuple(output.shape[1:]), max(numel, int(output.numel())))
        return known[key]
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            output = model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    known[key] = _ForwardProfile(tuple(output.shape[1:]), max(numel, int(output.numel())))
    return known[key]


def _selected(out: torch.Tensor, target: torch.Tensor, selection: _Selection) -> torch.Tensor:
    """The selected scalars ``[k]`` of one sample's flat output."""
    if selection.objective is None:
        assert selection.indices is not None
        return out.index_select(0, selection.indices.to(out.device))
    value: torch.Tensor = selection.objective.scalar(out, target)
    return value.unsqueeze(0)


def _scalars_fn(model: nn.Module, selection: _Selection) -> generic.ScalarsFn:
    def scalars(sample: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        return _selected(out, target, selection)

    return scalars


def _scalars_with_output_fn(model: nn.Module, selection: _Selection) -> generic.ScalarsWithOutputFn:
    def scalars(sample: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        return _selected(out, target, selection), out.detach()

    return scalars


def _selection_key(selection: _Selection) -> tuple[object, ...]:
    if selection.objective is not None:
        return ("objective", str(selection.objective.kind), selection.objective.index)
    assert selection.indices is not None
    return ("indices", tuple(int(i) for i in selection.indices))


def _sample_fn(model: nn.Module, selection: _Selection) -> graph_cache.SampleFn:
    """One sample ``[1, *shape]`` and its target -> (selected scalars, flat output)."""

    def sample_outputs(x1: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: torch.Tensor = model(x1).reshape(-1)
        return _selected(out, target, selection), out

    return sample_outputs


def graph_plan_for(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
) -> GraphPlan | graph_cache.Unsupported:
    """The graph engine's plan for Hessians of ``model`` at inputs shaped like ``x``
    (cached), or why it has none: what the capability report shows."""
    _check_input("hessian", model, x)
    m = _output_count(model, x)
    selection = _select("hessian", output_index, objective, m, default_all=False)
    targets = _targets(selection, x.shape[0], m, x)
    return graph_cache.graph_plan(
        model, x[:1], targets[0], _selection_key(selection), _sample_fn(model, selection)
    )


def graph_report(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
) -> dict[str, object]:
    """The graph engine's report for Hessians of ``model`` at inputs shaped like ``x``:
    nodes per rule, the cut, the executor, or the node that sends it elsewhere."""
    found = graph_plan_for(model, x, output_index=output_index, objective=objective)
    return graph_report_of(found).as_dict()


def _graph_hessian(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    selection: _Selection,
    path: EnginePath,
    memory_budget_bytes: int,
) -> tuple[torch.Tensor, Plan] | None:
    """The graph path's Hessians and plan, or None to fall back (``auto`` only)."""
    found = graph_cache.graph_plan(
        model, x[:1], targets[0], _selection_key(selection), _sample_fn(model, selection)
    )
    if isinstance(found, graph_cache.Unsupported):
        if path is EnginePath.GRAPH:
            raise ValueError(f"hessian: method='graph' cannot run this model: {found.reason}")
        return None
    n, k = int(x[0].numel()), selection.count
    per_sample = graph_hessian.bytes_per_sample(found, n, k, x.element_size())
    batch_chunk = max(1, min(x.shape[0], memory_budget_bytes // max(per_sample, 1)))
    method = (
        Algorithm.GRAPH_ZERO
        if found.is_zero
        else Algorithm.GRAPH_INPUT
        if found.cut_is_input
        else Algorithm.GRAPH_CUT
    )
    plan = Plan(
        method=method,
        basis_chunk=found.cut_size,
        batch_chunk=batch_chunk,
        estimated_bytes=per_sample * batch_chunk,
        basis=found.cut_size,
        batch=x.shape[0],
    )

    def chunk(xs: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if found.direct_reason is None:
            return graph_direct.hessian(found, xs, ts, k)[0], ts
        return graph_hessian.hessian(found, xs, ts, k), ts

    try:
        with torch.no_grad():
            matrix = _in_chunks(batch_chunk, x, targets, chunk)[0]
    except torch.OutOfMemoryError:
        raise  # the caller retries with a smaller budget: not a reason to change paths
    except (RuntimeError, NotImplementedError):
        if path is EnginePath.GRAPH:
            raise
        return None  # an operator without the AD rule the graph path needs: go generic
    return matrix, plan


@dataclass(frozen=True)
class SecondOrder:
    """An exact Hessian diagonal (``values`` ``[B, *sample_shape]``) or trace (``[B]``)
    from the graph engine's forward-Laplacian pass, with the model's output."""

    values: torch.Tensor
    output: torch.Tensor
    columns: int  # input columns carried per pass (the rest in further passes)
    passes: int  # forward passes over the network, all chunks of samples and columns
    method: str  # "graph:forward-laplacian" or "graph:zero"


def graph_second_order(
    model: nn.Module,
    x: torch.Tensor,
    *,
    trace: bool,
    output_index: int | None = None,
    objective: Objective | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    progress: Progress = NO_PROGRESS,
    compile_after: int = 0,
) -> SecondOrder | None:
    """The exact diagonal (or trace) of the input Hessian of one selected scalar, by the
    graph engine's forward-Laplacian pass (``graph/laplacian.py``): no matrix and no
    Hessian-vector products. ``None`` when the graph engine cannot run the model (an
    operator without a rule): the caller then uses Hessian-vector products.

    Memory: ``columns`` inputs are carried at a time (2 tangents each for a diagonal, 1
    plus one for a trace), as many as fit ``memory_budget_bytes`` for a chunk of samples.
    ``progress`` advances by the input columns done per sample, under ``AUTODIFF_LOCK``
    one chunk at a time, so that other work interleaves and a cancel stops it.

    ``compile_after``: when positive, a single-pass call (all columns and samples fit
    at once) whose shape was asked for that many times is compiled by ``torch.compile``
    in the background and then runs compiled (``graph/compiled.py``); 0 never compiles.
    """
    _check_input("hessian", model, x)
    if isinstance(output_index, list):
        raise ValueError("hessian: the diagonal and trace take one output_index, not a list")
    with AUTODIFF_LOCK:
        m = _output_count(model, x)
        selection = _select("hessian", output_index, objective, m, default_all=False)
        targets = _targets(selection, x.shape[0], m, x)
        found = graph_cache.graph_plan(
            model, x[:1], targets[0], _selection_key(selection), _sample_fn(model, selection)
        )
        if isinstance(found, graph_cache.Unsupported) or found.direct_reason is not None:
            return None
    batch, n = x.shape[0], int(x[0].numel())
    if found.is_zero:
        with AUTODIFF_LOCK, torch.no_grad():
            output = model(x)
        shape = (batch,) if trace else tuple(x.shape)
        progress.advance(batch * n)
        return SecondOrder(x.new_zeros(shape), output, n, 0, str(Algorithm.GRAPH_ZERO))
    per_column = graph_laplacian.bytes_per_column(found, x.element_size())
    width = 1 if trace else 2  # tangents carried per input column
    # The carried columns get half the budget: each node's temporaries (the squared
    # tangents, a product of two dependent operands) come on top of them, for a while.
    # With all of it, photo_digits_cnn's exact trace peaked at 176-258 MiB of a 256 MiB
    # budget over four runs (tests/unit/test_large_input_memory.py).
    columns_budget = memory_budget_bytes // LAPLACIAN_WORKING_SHARE
    columns = max(1, min(n, columns_budget // (per_column * width)))
    samples = max(1, min(batch, columns_budget // (per_column * width * columns)))
    progress.plan(batch * n)
    values: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    passes = 0
    if compile_after > 0 and columns >= n and samples >= batch:
        progress.check()
        with AUTODIFF_LOCK:
            value, flat = graph_compiled.second_order(
                found, x, targets, trace=trace, compile_after=compile_after
            )
        progress.advance(batch * n)
        values_all = value[:, 0] if trace else value[:, 0].reshape(x.shape)
        output = _shaped_output(model, x, flat)
        return SecondOrder(values_all, output, n, 1, "graph:forward-laplacian")
    for start in range(0, batch, samples):
        xs, ts = x[start : start + samples], targets[start : start + samples]
        progress.check()

        def advance(done: int, size: int = xs.shape[0]) -> None:
            progress.advance(done * size)  # raises Cancelled between column passes

        with AUTODIFF_LOCK:
            value, flat = graph_laplacian.second_order(
                found, xs, ts, trace=trace, columns=columns, on_chunk=advance
            )
        passes += -(-n // columns)
        values.append(value[:, 0] if trace else value[:, 0].reshape(xs.shape))
        outputs.append(flat)
    output = _shaped_output(model, x, torch.cat(outputs))
    return SecondOrder(torch.cat(values), output, columns, passes, "graph:forward-laplacian")


def _targets(selection: _Selection, batch: int, m: int, x: torch.Tensor) -> torch.Tensor:
    objective = selection.objective
    if objective is None:
        return torch.zeros(batch, dtype=x.dtype, device=x.device)
    return objective.per_sample_targets(batch, m).to(x.device)


def _path(api: str, method: EnginePath | str) -> EnginePath:
    """``method`` as an ``EnginePath`` (its name is accepted too), or a ValueError."""
    try:
        return EnginePath(method)
    except ValueError:
        raise ValueError(f"{api}: method must be one of {METHODS}, got {method!r}") from None


def _output_count(model: nn.Module, x: torch.Tensor) -> int:
    return math.prod(_profile(model, x).output_shape)


def _structured_network(
    api: str, model: nn.Module, x: torch.Tensor, path: EnginePath
) -> structured.Network | None:
    network = None if path.skips_structured else structured.parse(model, tuple(x.shape[1:]))
    if path is EnginePath.STRUCTURED and network is None:
        raise ValueError(
            f"{api}: method='structured' supports Sequential networks of Conv1d/2d (any "
            "stride, dilation, groups; zero padding), AvgPool1d/2d, AdaptiveAvgPool1d/2d, "
            "MaxPool1d/2d, BatchNorm, Flatten, Linear, Dropout and elementwise "
            "non-linearities; use method='auto' to fall back to the graph path"
        )
    return network


# The structured tail propagates an ``h x h`` curvature backward through every layer
# (O(h^3) per sample); the graph path pushes ``n`` tangents forward (O(n h^2)). With this
# few inputs per hidden unit the graph path wins (a 2-64-64-64-1 PINN: 35 ms against
# 168 ms for 4096 samples, one thread).
FEW_INPUTS_PER_WIDTH = 0.25


# A cut at most this wide, with nothing curved before it, makes the graph path cheaper
# than the structured one: J_c is that many backward passes and H_c is tiny (a ReLU CNN
# under cross-entropy: 10 logits, 10.4 ms against 14.8 ms, one thread). Zero curvature
# anywhere (a piecewise-linear network's raw output) costs nothing on the graph path.
NARROW_CUT = 32


def _has_spatial_head(network: structured.Network) -> bool:
    """Convolutions or pools before the first Linear: the structured path's patches win
    there even against a narrow cut (a ReLU/MaxPool CNN under cross-entropy: 5.6 ms
    against 8.7 ms on the graph path, one thread)."""
    return any(isinstance(layer, structured.SPATIAL) for layer in network.head)


def _narrow_graph(
    model: nn.Module, x: torch.Tensor, output_index: OutputIndex, objective: Objective | None
) -> bool:
    try:
        found = graph_plan_for(model, x, output_index=output_index, objective=objective)
    except ValueError:
        return False
    if isinstance(found, graph_cache.Unsupported) or found.direct_reason is not None:
        return False
    return found.is_zero or (not found.cut_is_input and found.cut_size <= NARROW_CUT)


def _few_inputs(network: structured.Network, n: int) -> bool:
    widths = [layer.out_features for layer in network.tail if isinstance(layer, nn.Linear)]
    return bool(widths) and n <= FEW_INPUTS_PER_WIDTH * max(widths)


def _in_chunks(
    batch_chunk: int,
    x: torch.Tensor,
    targets: torch.Tensor,
    compute: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``compute`` on chunks of samples (never of matrix rows).

    Each chunk's results are written straight into preallocated outputs, so the peak is
    the result plus one chunk's working memory (a concatenation would hold it twice).
    """
    batch = x.shape[0]
    first = compute(x[:batch_chunk], targets[:batch_chunk])
    if batch_chunk >= batch:
        return first
    outputs = tuple(piece.new_empty(batch, *piece.shape[1:]) for piece in first)
    for out, piece in zip(outputs, first, strict=True):
        out[:batch_chunk] = piece
    del first
    for start in range(batch_chunk, batch, batch_chunk):
        stop = start + batch_chunk
        for out, piece in zip(outputs, compute(x[start:stop], targets[start:stop]), strict=True):
            out[start:stop] = piece
    return outputs[0], outputs[1]


def _generic_hessian(
    scalars: generic.ScalarsFn, x: torch.Tensor, targets: torch.Tensor, plan: Plan
) -> torch.Tensor:
    def chunk(xs: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return generic.hessian(scalars, xs, ts, plan), ts

    return _in_chunks(plan.batch_chunk, x, targets, chunk)[0]


@_serialized
def compute_hessian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: EnginePath | str = EnginePath.AUTO,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> DerivativeResult:
    """Input Hessians of selected outputs (or of an objective) for each sample of ``x``.

    ``method``: ``auto`` (structured when the network supports it, else generic),
    ``structured``, ``generic`` or ``autograd`` (a per-row loop, for models that
    torch.func cannot transform). ``memory_budget_bytes`` bounds the working memory: it
    sets how many samples (and, on the generic path, basis vectors) are processed at
    once; a smaller budget is slower, never different.
    """
    _check_input("hessian", model, x)
    path = _path("hessian", method)
    network = _structured_network("hessian", model, x, path)
    batch, n = x.shape[0], int(x[0].numel())
    if (
        path is EnginePath.AUTO
        and network is not None
        and (
            _few_inputs(network, n)
            or (not _has_spatial_head(network) and _narrow_graph(model, x, output_index, objective))
        )
    ):
        network = None  # the graph path is faster: tangents of a few inputs, or a narrow cut
    if network is not None:
        m = _output_count(model, x)
        selection = _select("hessian", output_index, objective, m, default_all=False)
        plan = plan_structured_hessian(
            n=n,
            batch=batch,
            itemsize=x.element_size(),
            memory_budget_bytes=memory_budget_bytes,
            num_scalars=selection.count,
        )
        scalar = selection.objective.scalar if selection.objective is not None else None

        def structured_chunk(
            xs: torch.Tensor, ts: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return structured.hessian_of(
                network, xs, indices=selection.indices, objective=scalar, targets=ts
            )

        with torch.no_grad():
            matrix, flat_output = _in_chunks(
                plan.batch_chunk, x, _targets(selection, batch, m, x), structured_chunk
            )
        return _result(matrix, _shaped_output(model, x, flat_output), plan, selection)
    profile = _profile(model, x)
    with torch.no_grad():
        output = model(x)
    m = math.prod(profile.output_shape)
    selection = _select("hessian", output_index, objective, m, default_all=False)
    targets = _targets(selection, batch, m, x)
    if path.tries_graph:
        graph_result = _graph_hessian(model, x, targets, selection, path, memory_budget_bytes)
        if graph_result is not None:
            matrix, plan = graph_result
            return _result(matrix, output, plan, selection)
    plan = plan_hessian(
        n=n,
        batch=batch,
        activation_numel=profile.activation_numel,
        itemsize=x.element_size(),
        memory_budget_bytes=memory_budget_bytes,
        num_scalars=selection.count,
    )
    scalars = _scalars_fn(model, selection)
    if path is EnginePath.AUTOGRAD:
        return _row_loop_hessian(scalars, x, targets, output, plan, selection)
    with torch.no_grad():
        try:
            matrix = _generic_hessian(scalars, x, targets, plan)
        except NotImplementedError:  # an operator without forward-mode AD of its backward
            plan = replace(plan, method=Algorithm.REVERSE_OVER_REVERSE)
            try:
                matrix = _generic_hessian(scalars, x, targets, plan)
            except RuntimeError as error:
                if path is EnginePath.GENERIC or isinstance(error, torch.OutOfMemoryError):
                    raise
                return _row_loop_hessian(scalars, x, targets, output, plan, selection)
        except RuntimeError as error:  # vmap cannot run it (data-dependent control flow)
            if path is EnginePath.GENERIC or isinstance(error, torch.OutOfMemoryError):
                raise
            return _row_loop_hessian(scalars, x, targets, output, plan, selection)
    return _result(matrix, output, plan, selection)


def _row_loop_hessian(
    scalars: generic.ScalarsFn,
    x: torch.Tensor,
    targets: torch.Tensor,
    output: torch.Tensor,
    plan: Plan,
    selection: _Selection,
) -> DerivativeResult:
    """The end of the fallback chain: one autograd call per row runs any model that
    runs forward, Python control flow on values included."""
    matrix = rowloop.hessian(scalars, x, targets)
    return _result(matrix, output, replace(plan, method=Algorithm.ROW_LOOP), selection)


@_serialized
def compute_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: EnginePath | str = EnginePath.AUTO,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> DerivativeResult:
    """Input Jacobians of selected outputs (all by default) for each sample of ``x``.

    Structured (one batched backward pass of the selected one-hot rows) when the network
    supports it and there are no more rows than inputs; otherwise the generic path in
    reverse or forward mode, whichever needs fewer passes.
    """
    _check_input("jacobian", model, x)
    path = _path("jacobian", method)
    network = _structured_network("jacobian", model, x, path)
    batch, n = x.shape[0], int(x[0].numel())
    if network is not None and objective is None:
        m = math.prod(_profile(model, x).output_shape)
        selection = _select("jacobian", output_index, objective, m, default_all=True)
        if selection.count <= n:
            assert selection.indices is not None
            plan = plan_structured_jacobian(
                n=n,
                batch=batch,
                rows=selection.count,
                itemsize=x.element_size(),
                memory_budget_bytes=memory_budget_bytes,
            )
            indices = selection.indices

            def structured_chunk(
                xs: torch.Tensor, _ts: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                return structured.jacobian_of(network, xs, indices=indices)

            with torch.no_grad():
                matrix, flat_output = _in_chunks(
                    plan.batch_chunk, x, x.new_zeros(batch), structured_chunk
                )
            return _result(matrix, _shaped_output(model, x, flat_output), plan, selection)
    profile = _profile(model, x)
    m = math.prod(profile.output_shape)
    selection = _select("jacobian", output_index, objective, m, default_all=True)
    plan = plan_jacobian(
        n=n,
        rows=selection.count,
        batch=batch,
        activation_numel=profile.activation_numel,
        itemsize=x.element_size(),
        memory_budget_bytes=memory_budget_bytes,
    )
    scalars = _scalars_with_output_fn(model, selection)
    targets = _targets(selection, batch, m, x)
    if path is EnginePath.AUTOGRAD:
        matrix, flat_output = rowloop.jacobian(scalars, x, targets)
        plan = replace(plan, method=Algorithm.ROW_LOOP)
        return _result(matrix, flat_output.reshape(batch, *profile.output_shape), plan, selection)
    with torch.no_grad():
        if plan.method is Algorithm.REVERSE and selection.indices is not None:
            cotangents = torch.eye(m, dtype=x.dtype, device=x.device)[selection.indices]
            matrix, flat_output = generic.jacobian_of_outputs(
                lambda sample: model(sample.unsqueeze(0)).reshape(-1), x, cotangents, plan
            )
            return _result(
                matrix, flat_output.reshape(batch, *profile.output_shape), plan, selection
            )
        try:
            matrix, flat_output = generic.jacobian(scalars, x, targets, plan)
        except NotImplementedError:  # an operator without forward-mode AD
            if plan.method is Algorithm.REVERSE:
                raise
            plan = replace(
                plan,
                method=Algorithm.REVERSE,
                basis_chunk=min(plan.basis_chunk, selection.count),
                basis=selection.count,
            )
            matrix, flat_output = generic.jacobian(scalars, x, targets, plan)
    return _result(matrix, flat_output.reshape(batch, *profile.output_shape), plan, selection)


def _result(
    matrix: torch.Tensor, output: torch.Tensor, plan: Plan, selection: _Selection
) -> DerivativeResult:
    return DerivativeResult(
        matrix=matrix,
        output=output,
        method=plan.method,
        plan=plan,
        squeeze_scalars=selection.squeeze,
    )


def _shaped_output(model: nn.Module, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The structured path's flat ``[B, m]`` output in the model's own output shape."""
    return flat.reshape(flat.shape[0], *_profile(model, x).output_shape)


def hessian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: EnginePath | str = EnginePath.AUTO,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> torch.Tensor:
    """``[B, n, n]`` for one output index or an objective, ``[B, k, n, n]`` for a list of k."""
    return compute_hessian(
        model,
        x,
        output_index=output_index,
        objective=objective,
        method=method,
        memory_budget_bytes=memory_budget_bytes,
    ).selected


def jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output_index: OutputIndex = None,
    objective: Objective | None = None,
    method: EnginePath | str = EnginePath.AUTO,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> torch.Tensor:
    """``[B, m, n]`` for all outputs (or a list of m indices), ``[B, n]`` for one index."""
    return compute_jacobian(
        model,
        x,
        output_index=output_index,
        objective=objective,
        method=method,
        memory_budget_bytes=memory_budget_bytes,
    ).selected
