"""Random computation graphs through the engine, in float64, against torch.func.

hypothesis draws a recipe: n = 2..6 inputs, then 2..6 nodes, each reading earlier nodes
(the input included), so the graphs are DAGs with fan-out and joins, not chains. Nodes:
Linear + activation (tanh, sigmoid, softplus, gelu, silu, sin), residual adds and
subtractions, gating products of two activations, concatenations, slices, LayerNorm and
RMSNorm (with random affine weights), and divisions ``a / (1 + b**2)``; widths 2..8. A
linear head gives 3 outputs. The engine's Hessians of outputs 0 and 2 (or of a
cross-entropy objective) and its Jacobian of all outputs must equal ``torch.func.hessian``
and ``torch.func.jacrev`` of one sample, computed here, to 1e-10 relative:
``max|a - b| <= 1e-10 * max(1, max|ref|)``.

Bounded and reproducible for CI: 25 (Hessians) and 40 (Jacobians) examples, derandomized,
no example database, plus one explicit graph with every node kind and activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from hessian_service.engine import Objective, ObjectiveKind, compute_hessian, compute_jacobian

RELATIVE = 1e-10
OUTPUTS = 3
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
    "sin": torch.sin,
}
KINDS = ("dense", "residual", "gate", "concat", "slice", "norm", "divide")


@dataclass(frozen=True)
class Step:
    """One node of a recipe: ``kind`` applied to earlier nodes ``sources`` (indices into
    the values so far, 0 being the input), with its width and activation(s) where the
    kind has them; ``start``/``stop`` for a slice, ``rms`` for a norm, ``subtract`` for a
    residual."""

    kind: str
    sources: tuple[int, ...]
    width: int = 0
    activations: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    rms: bool = False
    subtract: bool = False


@dataclass(frozen=True)
class Recipe:
    """A drawn graph: its input width, its nodes in order, the weights' seed and which
    scalar the Hessian is of."""

    n: int
    steps: tuple[Step, ...]
    seed: int
    objective: bool  # cross-entropy towards class 1 instead of raw outputs 0 and 2


class RandomGraph(nn.Module):
    """Interprets a ``Recipe``: each step's value from earlier values, then a linear
    head on the last one. Parametrized layers live in a ModuleDict keyed by step."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        widths = [recipe.n]
        layers: dict[str, nn.Module] = {}
        for position, step in enumerate(recipe.steps):
            key = str(position)
            first = widths[step.sources[0]]
            if step.kind == "dense":
                layers[key] = nn.Linear(first, step.width)
                widths.append(step.width)
            elif step.kind == "residual":
                layers[key] = nn.Linear(first, first)
                widths.append(first)
            elif step.kind == "gate":
                layers[key + "a"] = nn.Linear(first, step.width)
                layers[key + "b"] = nn.Linear(widths[step.sources[1]], step.width)
                widths.append(step.width)
            elif step.kind == "concat":
                widths.append(first + widths[step.sources[1]])
            elif step.kind == "slice":
                widths.append(step.stop - step.start)
            elif step.kind == "norm":
                norm = nn.RMSNorm(first) if step.rms else nn.LayerNorm(first)
                norm.weight.data.uniform_(0.5, 1.5)
                if isinstance(norm, nn.LayerNorm):
                    norm.bias.data.uniform_(-0.5, 0.5)
                layers[key] = norm
                widths.append(first)
            elif step.kind == "divide":
                layers[key] = nn.Linear(widths[step.sources[1]], first)
                widths.append(first)
            else:
                raise AssertionError(step.kind)
        self.layers = nn.ModuleDict(layers)
        self.head = nn.Linear(widths[-1], OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for position, step in enumerate(self.recipe.steps):
            key = str(position)
            a = values[step.sources[0]]
            if step.kind == "dense":
                value = ACTIVATIONS[step.activations[0]](self.layers[key](a))
            elif step.kind == "residual":
                branch = ACTIVATIONS[step.activations[0]](self.layers[key](a))
                value = a - branch if step.subtract else a + branch
            elif step.kind == "gate":
                b = values[step.sources[1]]
                left = ACTIVATIONS[step.activations[0]](self.layers[key + "a"](a))
                value = left * ACTIVATIONS[step.activations[1]](self.layers[key + "b"](b))
            elif step.kind == "concat":
                value = torch.cat([a, values[step.sources[1]]], dim=1)
            elif step.kind == "slice":
                value = a[:, step.start : step.stop]
            elif step.kind == "norm":
                value = self.layers[key](a)
            else:  # divide
                value = a / (1 + self.layers[key](values[step.sources[1]]) ** 2)
            values.append(value)
        out: torch.Tensor = self.head(values[-1])
        return out


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    n = draw(st.integers(2, 6), label="n")
    widths = [n]
    steps: list[Step] = []
    # Kinds and activations as drawn permutations (then cycled): every recipe mixes
    # several of each, where independent draws cluster on a few in derandomized runs.
    kinds = draw(st.permutations(KINDS))
    order = draw(st.permutations(sorted(ACTIVATIONS)))
    used = 0

    def next_activation() -> str:
        nonlocal used
        used += 1
        return order[(used - 1) % len(order)]

    for position in range(draw(st.integers(2, 6), label="nodes")):
        kind = kinds[position]
        source = st.integers(0, len(widths) - 1)
        first = draw(source)
        width = draw(st.integers(2, 8))
        if kind == "dense":
            step = Step(kind, (first,), width=width, activations=(next_activation(),))
        elif kind == "residual":
            step = Step(
                kind, (first,), activations=(next_activation(),), subtract=draw(st.booleans())
            )
        elif kind == "gate":
            pair = (next_activation(), next_activation())
            step = Step(kind, (first, draw(source)), width=width, activations=pair)
        elif kind == "concat":
            step = Step(kind, (first, draw(source)))
        elif kind == "slice":
            start = draw(st.integers(0, widths[first] - 1))
            stop = draw(st.integers(start + 1, widths[first]))
            step = Step(kind, (first,), start=start, stop=stop)
        elif kind == "norm":
            if widths[first] < 2:  # a norm of one feature is constant
                step = Step("dense", (first,), width=width, activations=(next_activation(),))
            else:
                step = Step(kind, (first,), rms=draw(st.booleans()))
        else:
            step = Step("divide", (first, draw(source)))
        steps.append(step)
        widths.append(_width(step, widths))
    return Recipe(
        n=n,
        steps=tuple(steps),
        seed=draw(st.integers(0, 2**31 - 1)),
        objective=draw(st.booleans()),
    )


def _width(step: Step, widths: list[int]) -> int:
    first = widths[step.sources[0]]
    if step.kind in ("dense", "gate"):
        return step.width
    if step.kind == "concat":
        return first + widths[step.sources[1]]
    if step.kind == "slice":
        return step.stop - step.start
    return first  # residual, norm, divide keep the first source's width


def build(recipe: Recipe) -> tuple[nn.Module, torch.Tensor]:
    """The recipe's model in float64 (seeded, frozen, eval) and a seeded batch of 2."""
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = RandomGraph(recipe).double().eval().requires_grad_(False)
    x = torch.randn(2, recipe.n, generator=generator, dtype=torch.float64)
    return model, x


def assert_relative_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    scale = max(1.0, float(reference.abs().max()))
    worst = float((actual - reference).abs().max())
    assert worst <= RELATIVE * scale, f"max|a-b| {worst:.3e} > {RELATIVE:.0e} * {scale:.3e}"


def _outputs(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def outputs(sample: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(sample.unsqueeze(0)).reshape(-1)
        return out

    return outputs


# Every kind and every activation in one graph, whatever the draws give: input 4 ->
# dense 6 (sin) -> gate of input and node 1 (softplus * tanh) -> residual subtraction on
# node 2 (gelu) -> concat of nodes 1 and 3 -> slice of it -> LayerNorm -> divide by node 1
# -> RMSNorm -> dense (silu) -> residual add (sigmoid).
EVERYTHING = Recipe(
    n=4,
    steps=(
        Step("dense", (0,), width=6, activations=("sin",)),
        Step("gate", (0, 1), width=5, activations=("softplus", "tanh")),
        Step("residual", (2,), activations=("gelu",), subtract=True),
        Step("concat", (1, 3)),
        Step("slice", (4,), start=2, stop=9),
        Step("norm", (5,)),
        Step("divide", (6, 1)),
        Step("norm", (7,), rms=True),
        Step("dense", (8,), width=4, activations=("silu",)),
        Step("residual", (9,), activations=("sigmoid",)),
    ),
    seed=19,
    objective=False,
)


def bounded(examples: int) -> settings:
    """CI-safe hypothesis settings: ``examples`` drawn graphs, the same ones every run
    (derandomized, no database), no deadline (the engine's first call on a new model
    traces it)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def test_the_explicit_example_has_every_kind_and_activation() -> None:
    assert {step.kind for step in EVERYTHING.steps} == set(KINDS)
    assert {name for step in EVERYTHING.steps for name in step.activations} == set(ACTIVATIONS)


@bounded(25)  # each drawn model is a first call: the graph engine traces it
@given(recipe=recipes())
@example(recipe=EVERYTHING)
@example(recipe=replace(EVERYTHING, objective=True))
def test_random_graph_hessian_equals_torch_func(recipe: Recipe) -> None:
    model, x = build(recipe)
    outputs = _outputs(model)
    if recipe.objective:
        result = compute_hessian(
            model, x, objective=Objective(kind=ObjectiveKind.CROSS_ENTROPY, target=torch.tensor(1))
        )

        def scalars(sample: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs(sample).unsqueeze(0), torch.tensor([1])).unsqueeze(0)

    else:
        result = compute_hessian(model, x, output_index=[0, 2])

        def scalars(sample: torch.Tensor) -> torch.Tensor:
            return outputs(sample)[torch.tensor([0, 2])]

    reference = torch.stack([torch.func.hessian(scalars)(sample) for sample in x])
    assert_relative_close(result.matrix, reference)


@bounded(40)
@given(recipe=recipes())
@example(recipe=EVERYTHING)
def test_random_graph_jacobian_equals_jacrev(recipe: Recipe) -> None:
    model, x = build(recipe)
    reference = torch.stack([torch.func.jacrev(_outputs(model))(sample) for sample in x])
    result = compute_jacobian(model, x)
    assert_relative_close(result.matrix, reference)
    assert_relative_close(result.output.reshape(2, OUTPUTS), model(x))
