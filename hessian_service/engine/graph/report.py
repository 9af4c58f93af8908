"""What the graph engine says about a model: nodes per rule, the cut, or why it cannot run.

The capability report (``GET /models/{name}``) shows this, so a user can see which of
their model's nodes the fast path covers and, when it falls back, which node caused it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hessian_service.engine.graph.cache import Unsupported
from hessian_service.engine.graph.plan import GraphPlan
from hessian_service.engine.graph.rules import RuleKind, op_name


@dataclass(frozen=True)
class GraphReport:
    """A plan summarised for people: ``supported`` False means the model falls back
    (``fallback_node`` names the node at fault when there is one)."""

    supported: bool
    nodes_by_rule: dict[str, int]
    curvature_ops: list[str]
    cut_size: int | None
    cut_is_input: bool | None
    executor: str | None
    reason: str | None
    fallback_node: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "supported": self.supported,
            "nodes_by_rule": self.nodes_by_rule,
            "curvature_ops": self.curvature_ops,
            "cut_size": self.cut_size,
            "cut_is_input": self.cut_is_input,
            "executor": self.executor,
            "reason": self.reason,
            "fallback_node": self.fallback_node,
        }


def report(found: GraphPlan | Unsupported) -> GraphReport:
    """The report of a cached plan (or of why there is none)."""
    if isinstance(found, Unsupported):
        return GraphReport(
            supported=False,
            nodes_by_rule={},
            curvature_ops=[],
            cut_size=None,
            cut_is_input=None,
            executor=None,
            reason=found.reason,
            fallback_node=found.node,
        )
    counts = {kind.value: 0 for kind in RuleKind if kind is not RuleKind.UNSUPPORTED}
    for rule in found.rules.values():
        counts[rule.kind.value] += 1
    return GraphReport(
        supported=True,
        nodes_by_rule=counts,
        curvature_ops=sorted({op_name(node) for node in found.curvature}),
        cut_size=found.cut_size,
        cut_is_input=found.cut_is_input,
        executor="direct" if found.direct_reason is None else "vmap",
        reason=found.direct_reason,
        fallback_node=None,
    )
