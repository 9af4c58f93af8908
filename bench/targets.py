"""Issue 19's speed targets, checked against one run's peer table.

Each target names a row, the peer (or peer group) it is measured against and the ratio
(peer time / our time) it needs. "best JAX" is the fastest of the row's JAX variants; "best
of JAX and torch.compile" the faster of that and the row's compiled torch peer; every row
also needs at least 0.95x its best peer. A target whose peer did not run (a failed compile,
``--quick``) reads "not measured", never met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.peer_table import TORCH_COMPILE, RowResult


@dataclass(frozen=True)
class Target:
    row: str  # the row's key, bench/families.py
    against: (
        str  # "torch.func", "best JAX", "best of JAX and torch.compile", "best peer", or a peer
    )
    needed: float


_MLPS = ("hessian/residual_mlp_784/B1", "hessian/layernorm_gelu_mlp_784/B1")
_CNNS = (
    "hessian/cnn_bn_silu_28/B1",
    "hessian/cnn_relu_maxpool_28/B1",
    "hessian/depthwise_dilated_cnn_28/B1",
)

TARGETS: tuple[Target, ...] = (
    Target("hessian/pinn_tanh/B4096", "torch.func", 3.0),
    Target("hessian/pinn_tanh/B4096", "best JAX", 1.0),
    *(Target(row, "torch.func", 2.5) for row in _MLPS),
    *(Target(row, "best of JAX and torch.compile", 1.5) for row in _MLPS),
    *(Target(row, "torch.func", 10.0) for row in _CNNS),
    *(Target(row, "best JAX", 5.0) for row in _CNNS),
    # "no slower than today": the run read 3.1x and 30x torch.func.hessian.
    Target("hessian/mlp_tanh/B1", "torch.func", 3.1),
    Target("hessian/digits_cnn/B1", "torch.func", 30.0),
    Target("jacobian/mlp_tanh/B1", "jax.jit(jax.jacrev)", 1.0),
    # Issue 17: the PINN's Laplacian through POST /hessian/trace's engine call.
    Target("trace/pinn_tanh/B4096", "torch.func", 3.0),
    Target("trace/pinn_tanh/B4096", "best JAX", 1.0),
)
EVERY_ROW_VS_BEST_PEER = 0.95


def _peer(result: RowResult, against: str) -> str | None:
    """The measured peer a target's ``against`` means on this row, if it ran."""
    peers = result.peers
    if against == "torch.func":
        prefixes = ("torch.func", "vmap(torch.func", "trace(torch.func", "vmap(trace(torch.func")
        return next((p for p in peers if p.startswith(prefixes)), None)
    if against == "best JAX":
        return result.best(result.jax_peers)
    if against == "best of JAX and torch.compile":
        compiled = [p for p in peers if p.startswith(TORCH_COMPILE)]
        return result.best(result.jax_peers + compiled)
    if against == "best peer":
        return result.best(peers)
    return against if against in result.measured else None


def check(results: list[RowResult]) -> list[dict[str, Any]]:
    """One line per target of the rows that ran (and the 0.95x-best-peer floor per row):
    the figure, the peer it was measured against, and whether it is met."""
    ran = [result.row.key for result in results]
    by_key = {result.row.key: result for result in results if result.measured}
    targets = [target for target in TARGETS if target.row in ran] + [
        Target(key, "best peer", EVERY_ROW_VS_BEST_PEER) for key in ran
    ]
    lines = []
    for target in targets:
        result = by_key.get(target.row)
        peer = _peer(result, target.against) if result is not None else None
        ratio = result.ratio(peer) if result is not None and peer is not None else None
        lines.append(
            {
                "row": target.row,
                "against": target.against,
                "peer": peer,
                "needed": target.needed,
                "ratio": ratio,
                "met": ratio is not None and ratio >= target.needed,
            }
        )
    return lines


def table(lines: list[dict[str, Any]]) -> str:
    """Markdown: target, row, the peer that stood for it, the figure, met or not."""
    out = [
        "| row | against | needed | ratio | met | peer |",
        "|---|---|---:|---:|---|---|",
    ]
    for line in lines:
        ratio = "not measured" if line["ratio"] is None else f"{line['ratio']:.2f}x"
        out.append(
            f"| {line['row']} | {line['against']} | {line['needed']:g}x | {ratio} | "
            f"{'yes' if line['met'] else 'no'} | {line['peer'] or ''} |"
        )
    return "\n".join(out)


def summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON entries: how many targets are met, and the unmet ones by name."""
    unmet = [
        f"{line['row']} vs {line['against']} >= {line['needed']:g}x"
        for line in lines
        if not line["met"]
    ]
    return {
        "targets/met": f"{len(lines) - len(unmet)}/{len(lines)}",
        "targets/unmet": unmet,
    }
