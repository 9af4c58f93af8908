"""The engine's vocabulary as enums: what is derived, which path is asked for, what ran.

Three things used to be plain strings compared all over the service, one of them by
suffix. Each is now one enum whose values are the strings that appear on the wire and in
the capability report, so responses do not change:

- ``DerivativeKind``: what a request derives (``jacobian``, ``hessian``, or one of the
  matrix-free operators: ``hvp``, ``jvp``, ``vjp``, ``hessian/diagonal``, ...).
- ``EnginePath``: the path a caller asks for (the ``method=`` argument of the engine's
  functions, and the choice the load-time probe records): ``auto``, ``structured``,
  ``generic`` or ``autograd``.
- ``Algorithm``: what actually ran (``DerivativeResult.method``, the response's
  ``metadata.method``): the path plus, on the generic path, the AD mode.

They are ``str`` subclasses, so comparisons with the old strings keep working and
``str()`` / f-strings give the bare value (as ``enum.StrEnum`` does on Python 3.11+).
"""

from __future__ import annotations

from enum import Enum


class _WireEnum(str, Enum):
    """A string enum whose ``str()`` is its value, on every supported Python."""

    def __str__(self) -> str:
        return str(self.value)


class DerivativeKind(_WireEnum):
    """What one request derives of the selected scalars: first or second derivatives."""

    JACOBIAN = "jacobian"
    HESSIAN = "hessian"
    # The matrix-free operators (engine.operators): each value is its route without the
    # leading slash, as "jacobian" and "hessian" are.
    HVP = "hvp"  # Hessian-vector products H v
    JVP = "jvp"  # Jacobian-vector products J v
    VJP = "vjp"  # vector-Jacobian products u^T J
    HESSIAN_DIAGONAL = "hessian/diagonal"
    HESSIAN_TRACE = "hessian/trace"
    HESSIAN_EIGEN = "hessian/eigen"


class EnginePath(_WireEnum):
    """The path a caller asks the engine for."""

    AUTO = "auto"  # structured, else graph, else generic, else the row loop
    STRUCTURED = "structured"  # closed-form layer-by-layer propagation (engine.structured)
    GRAPH = "graph"  # node rules on the captured ATen graph (engine.graph)
    GENERIC = "generic"  # vectorized torch.func transforms (engine.generic)
    AUTOGRAD = "autograd"  # the per-row torch.autograd loop (engine.rowloop)

    @property
    def skips_structured(self) -> bool:
        """True when the caller asked for a path other than the structured one."""
        return self in (EnginePath.GENERIC, EnginePath.AUTOGRAD, EnginePath.GRAPH)

    @property
    def tries_graph(self) -> bool:
        """True when the graph path may run (asked for, or ``auto``)."""
        return self in (EnginePath.AUTO, EnginePath.GRAPH)


class Algorithm(_WireEnum):
    """What computed a result: the path, and on the generic path the AD mode."""

    STRUCTURED = "structured"
    GRAPH_INPUT = "graph:input-tangents"  # node rules, tangents of every input element
    GRAPH_CUT = "graph:cut"  # node rules from a narrower cut c: J_c^T H_c J_c
    GRAPH_ZERO = "graph:zero"  # no node has curvature: known zeros, nothing computed
    FORWARD_OVER_REVERSE = "generic:forward-over-reverse"  # Hessians: jacfwd(jacrev)
    REVERSE_OVER_REVERSE = "generic:reverse-over-reverse"  # Hessians without forward AD
    REVERSE = "generic:reverse"  # Jacobians: one VJP per selected output row
    FORWARD = "generic:forward"  # Jacobians: one JVP per input, when inputs are fewer
    ROW_LOOP = "autograd:row-loop"  # one torch.autograd.grad call per matrix row

    @property
    def path(self) -> EnginePath:
        """The path this algorithm belongs to."""
        return EnginePath(self.value.partition(":")[0])
