"""engine.workload: the work estimate behind HESSIAN_MAX_WORK_PER_REQUEST.

The activation count is checked against an independent count (forward hooks on the
leaf modules, which here each run one operator) for an eager CNN, and must be the same
for its TorchScript and torch.export forms (the dispatch-level count sees their ops).
"""

from __future__ import annotations

import torch
from torch import nn

from hessian_service.engine import DerivativeKind, workload


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),  # a view: no new elements
        nn.Linear(3 * 3 * 3, 5),
    ).eval()


def _hooked_count(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    count = 0

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal count
        if not isinstance(module, nn.Flatten):
            count += output.numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, *sample_shape))
    for handle in hooks:
        handle.remove()
    return count


def test_activation_elements_match_a_hook_count_in_every_format() -> None:
    model, shape = _cnn(), (1, 8, 8)
    expected = _hooked_count(model, shape)
    assert expected == 3 * 6 * 6 * 2 + 3 * 3 * 3 + 5
    cpu = torch.device("cpu")
    exported = torch.export.export(model, (torch.zeros(1, *shape),)).module()
    for form in (model, torch.jit.script(model), exported):
        assert workload.activation_elements(form, shape, torch.float32, cpu) == expected


def test_a_forward_that_fails_gives_no_estimate() -> None:
    model = nn.Linear(3, 2)
    assert workload.activation_elements(model, (4,), torch.float32, torch.device("cpu")) is None


def test_passes_and_work() -> None:
    hessian, jacobian = DerivativeKind.HESSIAN, DerivativeKind.JACOBIAN
    assert workload.passes_per_sample(hessian, inputs=784, scalars=2) == 1568
    assert workload.passes_per_sample(jacobian, inputs=784, scalars=10) == 10
    assert workload.passes_per_sample(jacobian, inputs=2, scalars=10) == 2
    assert workload.work(hessian, samples=4096, inputs=2, scalars=1, activations=385) == (
        4096 * 2 * 385
    )
