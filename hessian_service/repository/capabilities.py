"""Probe a loaded model once: what the engine can do with it, and what to expect.

The probe runs at load time on a small seeded input and records: whether ``vmap`` (of a
per-sample gradient, the way the engine vectorizes) and forward-mode AD (``jvp``) work
on the model, which engine path serves its Hessians (what ``method="auto"`` ran on a
trial sample, or the ``autograd`` row loop for models the automatic path cannot
transform), whether its Hessian is zero everywhere or almost everywhere (from its
module types or, for TorchScript and torch.export models, from the operators in its
graph), whether it holds random operations, and its size.
The derivative endpoints read the stored report to choose their method: nothing is
probed again per request.

Every model, uploaded or from the zoo, is served with ``method="auto"`` (the engine picks
its fastest path per request, exactly as for an in-process module) unless a trial shows
that the automatic path fails on it; only then is the row loop recorded for that kind
(Hessian or Jacobian), after a trial of it too. The probe checks what serving runs, not
something stricter: a plain ``vmap`` of a ``torch.export`` module that flattens with
``x.view(x.size(0), -1)`` fails on ``aten::sym_size`` (it has no batching rule), while
``vmap`` of its gradient, which is what the engine runs, works.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from hessian_service.engine import (
    AUTODIFF_LOCK,
    Algorithm,
    Curvature,
    DerivativeKind,
    EnginePath,
    classify,
    classify_ops,
    compute_hessian,
    compute_jacobian,
    graph_report,
    structured,
)

DROPOUT_OPS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "native_dropout"})
RANDOM_OPS = frozenset(
    [
        "rand",
        "randn",
        "rand_like",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "bernoulli",
        "bernoulli_",
        "normal",
        "normal_",
        "uniform_",
        "exponential_",
        "multinomial",
        "poisson",
    ]
)
RANDOM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_ATEN_IN_TEXT = re.compile(r"aten::(\w+)")
# Above this many Hessian entries (n x n for one sample, 256 MB in float32) the probe does
# not compute a trial Hessian.
MAX_PROBE_HESSIAN_ENTRIES = 1 << 26


@dataclass(frozen=True)
class Capabilities:
    """What the probe found; ``hessian_method``/``jacobian_method`` go to the engine."""

    device: str
    dtype: str
    batch: str  # "any": the model takes a batch; "one": exported with a batch of 1
    vmap: bool
    forward_mode: bool
    engine_path: EnginePath  # the path auto took on the trial (or autograd): its Hessians
    hessian_method: EnginePath  # the method argument for /hessian: auto, or autograd
    jacobian_method: EnginePath  # ... and for /jacobian (autograd when auto failed)
    curvature: Curvature
    random_ops: bool
    random_evidence: tuple[str, ...]
    parameters: int
    parameter_bytes: int
    buffer_bytes: int
    precisions: tuple[str, ...]
    notes: tuple[str, ...]
    # The graph engine's view of the model's output-0 Hessian: nodes per rule, the cut,
    # the executor, or why it cannot run (engine.graph_report).
    graph: dict[str, object] = field(default_factory=dict)

    def method_for(self, kind: DerivativeKind) -> EnginePath:
        """The engine path the probe chose for derivatives of ``kind``."""
        return {
            DerivativeKind.HESSIAN: self.hessian_method,
            DerivativeKind.JACOBIAN: self.jacobian_method,
        }[kind]

    @property
    def hessian_zero(self) -> str:
        """``everywhere`` | ``almost_everywhere`` | ``no``: what the curvature implies."""
        return {
            Curvature.AFFINE: "everywhere",
            Curvature.PIECEWISE_LINEAR: "almost_everywhere",
        }.get(self.curvature, "no")


def graph_ops(module: nn.Module) -> set[str] | None:
    """The ATen operator names a TorchScript or torch.fx (torch.export) module calls, or
    None for an eager module (its module types say more)."""
    if isinstance(module, torch.jit.ScriptModule):
        return set(_ATEN_IN_TEXT.findall(str(module.inlined_graph)))
    if isinstance(module, torch.fx.GraphModule):
        ops = set()
        for node in module.graph.nodes:
            if node.op == "call_function":
                name = str(getattr(node.target, "__name__", node.target))
                ops.add(name.removeprefix("aten.").split(".")[0])
        return ops
    inner = getattr(module, "inner", None)  # loaders.OneSampleAtATime
    return graph_ops(inner) if isinstance(inner, nn.Module) else None


def curvature_of(module: nn.Module) -> Curvature:
    """From module types (eager models) or graph operators (TorchScript, torch.export);
    anything unknown gives ``GENERAL``, so a zero claim is only made when it is sure."""
    ops = graph_ops(module)
    return classify(module) if ops is None else classify_ops(ops)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _random_evidence(module: nn.Module, x: torch.Tensor) -> tuple[bool, list[str]]:
    evidence: list[str] = []
    random = False
    for name, sub in module.named_modules():
        if isinstance(sub, RANDOM_MODULES) and sub.training:
            evidence.append(f"module {name or type(sub).__name__} is a dropout in training mode")
            random = True
    ops = graph_ops(module) or set()
    for op in sorted(ops & RANDOM_OPS):
        evidence.append(f"calls the random operator aten::{op}")
        random = True
    for op in sorted(ops & DROPOUT_OPS):
        evidence.append(f"calls aten::{op} (inactive when exported or scripted in eval mode)")
    with torch.no_grad():
        first, second = module(x), module(x)
    if not torch.equal(first, second):
        evidence.append("two forward passes on the same input differ")
        random = True
    return random, evidence


def _works(check: object) -> tuple[bool, str | None]:
    try:
        assert callable(check)
        check()
    except Exception as error:  # any failure means "no", with the reason as a note
        return False, _first_line(error)
    return True, None


def _method_for(
    kind: DerivativeKind, module: nn.Module, x1: torch.Tensor, notes: list[str]
) -> tuple[EnginePath, Algorithm]:
    """The method for derivatives of ``kind`` and what ran on the trial sample ``x1``:
    ``auto`` when a trial of it works, else the autograd row loop once a trial of that
    works (when it fails too, its error fails the load). When ``auto`` itself ended in
    the row loop (its faster paths failed), the row loop is recorded, so that requests
    do not pay for those failures again."""
    compute = compute_hessian if kind is DerivativeKind.HESSIAN else compute_jacobian
    try:
        result = compute(module, x1, output_index=0, method=EnginePath.AUTO)
    except Exception as error:  # the automatic path cannot run it: the row loop will
        notes.append(f"{kind} by the automatic path: {_first_line(error)}; using the row loop")
        result = compute(module, x1, output_index=0, method=EnginePath.AUTOGRAD)
        return EnginePath.AUTOGRAD, result.method
    if result.method.path is EnginePath.AUTOGRAD:
        return EnginePath.AUTOGRAD, result.method
    return EnginePath.AUTO, result.method


def _choose_methods(
    module: nn.Module, x: torch.Tensor, vmap_ok: bool, notes: list[str]
) -> tuple[EnginePath, EnginePath, EnginePath]:
    """``(engine_path, hessian_method, jacobian_method)``.

    Each kind is tried on one sample on its own (a model whose Hessians the graph path
    serves may still need the row loop for Jacobians); ``engine_path`` is the path its
    Hessian took there. When one ``n x n`` matrix is too large to compute just to find
    out, the ``vmap`` check decides instead and the path is read from the network's
    layers.
    """
    n = x[0].numel()
    if n * n > MAX_PROBE_HESSIAN_ENTRIES:
        notes.append(f"Hessian probe skipped: {n} x {n} entries is too large for a trial")
        if not vmap_ok:
            return EnginePath.AUTOGRAD, EnginePath.AUTOGRAD, EnginePath.AUTOGRAD
        parsed = structured.parse(module, tuple(x.shape[1:])) is not None
        path = EnginePath.STRUCTURED if parsed else EnginePath.GENERIC
        return path, EnginePath.AUTO, EnginePath.AUTO
    hessian_method, ran = _method_for(DerivativeKind.HESSIAN, module, x[:1], notes)
    jacobian_method, _ = _method_for(DerivativeKind.JACOBIAN, module, x[:1], notes)
    return ran.path, hessian_method, jacobian_method


def probe(
    module: nn.Module,
    sample_shape: list[int],
    *,
    batch: str,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Capabilities:
    """Probe ``module`` (frozen, on ``device``, in ``dtype``: by default those of its
    first parameter or buffer) on a seeded input.

    Holds the engine's ``AUTODIFF_LOCK`` throughout: derivative requests wait for the
    probe (about a second) instead of sharing torch's process-wide forward-AD state.
    """
    with AUTODIFF_LOCK:
        return _probe(module, sample_shape, batch=batch, device=device, dtype=dtype)


def _probe(
    module: nn.Module,
    sample_shape: list[int],
    *,
    batch: str,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> Capabilities:
    reference = next(iter([*module.parameters(), *module.buffers()]), None)
    if device is None:
        device = reference.device if reference is not None else torch.device("cpu")
    if dtype is None:
        dtype = reference.dtype if reference is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *sample_shape, generator=generator).to(device=device, dtype=dtype)
    notes: list[str] = []

    def one(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = module(sample.unsqueeze(0))
        return out

    def gradient(sample: torch.Tensor) -> torch.Tensor:
        slope: torch.Tensor = grad(lambda s: one(s).sum())(sample)
        return slope

    def vmapped() -> None:
        # vmap over samples of a gradient, as the engine runs it: a plain vmap of the
        # forward pass is stricter than that (aten::sym_size has no batching rule, while
        # under grad it reads the size of the sample).
        with torch.no_grad():
            batched = vmap(gradient)(x)
            looped = torch.stack([gradient(sample) for sample in x])
        if not torch.allclose(batched, looped, rtol=1e-5, atol=1e-6):
            raise ValueError("vmap gives different gradients than a loop over the samples")

    def forward_mode() -> None:
        jvp(one, (x[0],), (torch.ones_like(x[0]),))

    vmap_ok, vmap_error = _works(vmapped)
    jvp_ok, jvp_error = _works(forward_mode)
    notes += [f"vmap: {vmap_error}"] if vmap_error else []
    notes += [f"forward mode: {jvp_error}"] if jvp_error else []
    engine_path, hessian_method, jacobian_method = _choose_methods(module, x, vmap_ok, notes)

    random, evidence = _random_evidence(module, x)
    precisions = [str(dtype).removeprefix("torch.")]
    other = torch.float64 if dtype == torch.float32 else torch.float32
    works, why_not = _works(lambda: copy.deepcopy(module).to(other)(x[:1].to(other)))
    if works:
        precisions.append(str(other).removeprefix("torch."))
    else:
        notes.append(f"{other}: {why_not}")
    return Capabilities(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        vmap=vmap_ok,
        forward_mode=jvp_ok,
        engine_path=engine_path,
        hessian_method=hessian_method,
        jacobian_method=jacobian_method,
        curvature=curvature_of(module),
        random_ops=random,
        random_evidence=tuple(evidence),
        parameters=sum(p.numel() for p in module.parameters()),
        parameter_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
        precisions=tuple(precisions),
        notes=tuple(notes),
        graph=_graph_view(module, x),
    )


def _graph_view(module: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """What the graph engine makes of one sample's output-0 Hessian (planned, not run)."""
    try:
        return graph_report(module, x[:1], output_index=0)
    except Exception as error:  # a model the engine refuses is reported, not fatal
        return {"supported": False, "reason": _first_line(error)}
