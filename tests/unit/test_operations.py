"""The enums' wire values and the per-kind operations: what the endpoints ask instead of
branching on strings.

The values are the strings responses and capability reports carried before the enums
existed, so clients see no change; each operation's answers are checked against the
old per-kind rules they replace (result entries, default selection, layout shape, the
413 hint and the notes).
"""

from __future__ import annotations

import json

import orjson
import pytest
import torch

from hessian_service.engine import (
    Algorithm,
    Curvature,
    DerivativeKind,
    EnginePath,
    Objective,
    ObjectiveKind,
)
from hessian_service.serving.operations import OPERATIONS, operation_for


def test_enum_values_are_the_wire_strings() -> None:
    assert [str(kind) for kind in DerivativeKind] == [
        "jacobian",
        "hessian",
        "hvp",
        "jvp",
        "vjp",
        "hessian/diagonal",
        "hessian/trace",
        "hessian/eigen",
    ]
    assert [str(path) for path in EnginePath] == [
        "auto",
        "structured",
        "graph",
        "generic",
        "autograd",
    ]
    assert [str(algorithm) for algorithm in Algorithm] == [
        "structured",
        "graph:input-tangents",
        "graph:cut",
        "graph:zero",
        "generic:forward-over-reverse",
        "generic:reverse-over-reverse",
        "generic:reverse",
        "generic:forward",
        "autograd:row-loop",
    ]
    assert [str(kind) for kind in ObjectiveKind] == [
        "sum",
        "log_softmax",
        "mse",
        "cross_entropy",
        "weighted_sum",
    ]
    # What the codecs write: the bare value, as before.
    assert orjson.dumps({"method": Algorithm.ROW_LOOP}) == b'{"method":"autograd:row-loop"}'
    assert json.dumps(EnginePath.GENERIC) == '"generic"'
    assert f"/{DerivativeKind.HESSIAN}" == "/hessian"


@pytest.mark.parametrize(
    ("algorithm", "path"),
    [
        (Algorithm.STRUCTURED, EnginePath.STRUCTURED),
        (Algorithm.FORWARD_OVER_REVERSE, EnginePath.GENERIC),
        (Algorithm.REVERSE_OVER_REVERSE, EnginePath.GENERIC),
        (Algorithm.REVERSE, EnginePath.GENERIC),
        (Algorithm.FORWARD, EnginePath.GENERIC),
        (Algorithm.ROW_LOOP, EnginePath.AUTOGRAD),
    ],
)
def test_each_algorithm_belongs_to_its_path(algorithm: Algorithm, path: EnginePath) -> None:
    assert algorithm.path is path


def test_only_auto_and_structured_may_take_the_structured_path() -> None:
    assert {path for path in EnginePath if path.skips_structured} == {
        EnginePath.GRAPH,
        EnginePath.GENERIC,
        EnginePath.AUTOGRAD,
    }
    assert {path for path in EnginePath if path.tries_graph} == {
        EnginePath.AUTO,
        EnginePath.GRAPH,
    }


def test_objective_takes_names_or_members_and_refuses_others() -> None:
    assert Objective("sum").kind is ObjectiveKind.SUM
    assert Objective(ObjectiveKind.LOG_SOFTMAX, index=3).describe() == "log_softmax[3]"
    assert Objective("mse", target=torch.zeros(2)).describe() == "mse"
    with pytest.raises(ValueError, match="kind must be one of"):
        Objective("hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_softmax needs an index"):
        Objective("log_softmax")
    with pytest.raises(ValueError, match="cross_entropy needs a target"):
        Objective("cross_entropy")


def test_every_kind_has_one_operation() -> None:
    assert set(OPERATIONS) == set(DerivativeKind)
    for kind, operation in OPERATIONS.items():
        assert operation.kind is kind
        assert operation_for(str(kind)) is operation


def test_result_entries_and_default_selection_per_kind() -> None:
    jacobian, hessian = operation_for("jacobian"), operation_for("hessian")
    assert (jacobian.entries_per_scalar(784), hessian.entries_per_scalar(784)) == (784, 784**2)
    assert jacobian.all_outputs_by_default and not hessian.all_outputs_by_default
    # The tensor layout: every output keeps the model's output shape; else [B] or [B, k].
    assert jacobian.leading_shape([2, 10, 784], [2, 5], all_outputs=True) == [2, 2, 5]
    assert jacobian.leading_shape([2, 3, 784], [10], all_outputs=False) == [2, 3]
    assert hessian.leading_shape([2, 784, 784], [10], all_outputs=False) == [2]
    assert hessian.leading_shape([2, 3, 784, 784], [10], all_outputs=False) == [2, 3]


def test_the_413_hint_names_a_smaller_request() -> None:
    # One 784-input sample, one scalar, float32: the Jacobian would be 784 x 4 bytes.
    assert operation_for("hessian").smaller_alternative(1, 1, 784, 4) == (
        "/jacobian would return 3.1 KiB"
    )
    assert operation_for("jacobian").smaller_alternative(1, 1, 784, 4) == (
        "ask for fewer output indices"
    )


def test_notes_explain_zeros_by_curvature_only_for_hessians() -> None:
    hessian, jacobian = operation_for("hessian"), operation_for("jacobian")
    linear = Objective("sum")
    curved = Objective("cross_entropy", target=torch.tensor(1))
    (affine,) = hessian.notes(Curvature.AFFINE, None, zero=True)
    assert "identically zero" in affine
    assert hessian.notes(Curvature.AFFINE, linear, zero=True) == [affine]
    (piecewise,) = hessian.notes(Curvature.PIECEWISE_LINEAR, None, zero=False)
    assert "zero almost everywhere" in piecewise and "objective" in piecewise
    (through,) = hessian.notes(Curvature.PIECEWISE_LINEAR, curved, zero=False)
    assert "J^T H_objective J" in through
    assert hessian.notes(Curvature.GENERAL, None, zero=False) == []
    assert hessian.notes(Curvature.GENERAL, None, zero=True) == [
        "Every entry of the hessian is exactly zero at this input."
    ]
    # An affine model's Hessian under a curved objective is not zero by construction.
    assert hessian.notes(Curvature.AFFINE, curved, zero=False) == []
    assert jacobian.notes(Curvature.AFFINE, None, zero=False) == []
    assert jacobian.notes(Curvature.AFFINE, None, zero=True) == [
        "Every entry of the jacobian is exactly zero at this input."
    ]
