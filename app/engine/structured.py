"""The structured Hessian path: curvature propagated backward through a layered network.

For a network of affine maps and elementwise non-linearities, the input Hessian of a
scalar ``s`` is exactly ``J_out^T H_obj J_out + sum_l J_l^T diag(g_l * sigma_l''(z_l)) J_l``
(DESIGN.md). Propagating it backward, layer by layer, gives it with dense matrix products
only, in the width of each layer rather than the width of the input:

- affine ``y = W a + b``:      ``g_a = W^T g_y``,  ``H_a = W^T H_y W``;
- elementwise ``a = sigma(z)``: ``g_z = sigma'(z) g_a``,
  ``H_z = diag(sigma'(z)) H_a diag(sigma'(z)) + diag(g_a * sigma''(z))``.

The curvature starts as zero (a raw output) or as the objective's Hessian with respect to
the output, and stays diagonal until the first affine map from the top, which keeps the
narrow top of an MLP almost free. Networks with other modules (convolutions, custom
forwards) are not supported here; ``supports`` says so and the caller falls back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import grad, hessian, vmap

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
)
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Flatten)

# One sample's flattened output and its target row -> the objective's scalar value.
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flatten(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _flatten(child)]
    return [model]


def layers(model: nn.Module, sample_shape: tuple[int, ...]) -> list[nn.Module] | None:
    """The network as a list of supported layers, or None when this path cannot run it.

    Supported: (nested) ``nn.Sequential`` of Linear, BatchNorm1d, elementwise
    non-linearities, Identity, Dropout and Flatten, in eval mode, where every Linear and
    BatchNorm1d sees a flat per-sample vector.
    """
    flat = len(sample_shape) == 1
    result = _flatten(model)
    for layer in result:
        if layer.training and isinstance(layer, (nn.Dropout, nn.BatchNorm1d)):
            return None
        if isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return None
            flat = True
        elif isinstance(layer, (nn.Linear, nn.BatchNorm1d)):
            if not flat or (isinstance(layer, nn.BatchNorm1d) and layer.running_var is None):
                return None
        elif not isinstance(layer, ELEMENTWISE + PASS_THROUGH):
            return None
    return result


def supports(model: nn.Module, sample_shape: tuple[int, ...]) -> bool:
    """Whether the structured path can compute this network's input Hessian."""
    return layers(model, sample_shape) is not None


def _elementwise_derivatives(
    layer: nn.Module, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma'(z)`` and ``sigma''(z)`` of an elementwise module, by double backward.

    Elementwise means the Jacobian is diagonal, so the gradient of ``sum(sigma(z))`` is
    exactly ``sigma'(z)`` and the gradient of ``sum(sigma'(z))`` is ``sigma''(z)``.
    """
    with torch.enable_grad():
        at = z.detach().requires_grad_(True)
        (first,) = torch.autograd.grad(layer(at).sum(), at, create_graph=True)
        if not first.requires_grad:  # piecewise linear: no second derivative
            return first.detach(), torch.zeros_like(z)
        (second,) = torch.autograd.grad(first.sum(), at, allow_unused=True)
    return first.detach(), (second if second is not None else torch.zeros_like(z)).detach()


def _batchnorm_scale(layer: nn.BatchNorm1d, like: torch.Tensor) -> torch.Tensor:
    assert layer.running_var is not None
    scale = torch.rsqrt(layer.running_var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    return scale.to(like.dtype)


class _Curvature:
    """The Hessian with respect to the current layer's output, ``[B, k, d, d]``.

    Held as zero, as a diagonal ``[B, k, d]``, or dense, whichever is exact and cheapest.
    """

    def __init__(self, dense: torch.Tensor | None = None) -> None:
        self.dense = dense
        self.diagonal: torch.Tensor | None = None

    def through_linear(self, weight: torch.Tensor) -> None:
        if self.diagonal is not None:
            self.dense = (weight * self.diagonal.unsqueeze(-1)).transpose(-1, -2) @ weight
            self.diagonal = None
        elif self.dense is not None:
            self.dense = weight.transpose(-1, -2) @ (self.dense @ weight)

    def scale(self, factor: torch.Tensor) -> None:
        """``diag(factor) H diag(factor)``."""
        if self.diagonal is not None:
            self.diagonal = self.diagonal * factor * factor
        elif self.dense is not None:
            self.dense = factor.unsqueeze(-1) * self.dense * factor.unsqueeze(-2)

    def add_diagonal(self, values: torch.Tensor) -> None:
        if self.dense is not None:
            self.dense = self.dense + torch.diag_embed(values)
        elif self.diagonal is not None:
            self.diagonal = self.diagonal + values
        else:
            self.diagonal = values

    def materialize(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        if self.diagonal is not None:
            return torch.diag_embed(self.diagonal)
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


def hessian_of_layers(
    network: list[nn.Module],
    x: torch.Tensor,
    *,
    indices: torch.Tensor | None,
    objective: ObjectiveFn | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Input Hessians ``[B, k, n, n]`` of ``k`` raw outputs, or of one objective (k = 1)."""
    batch = x.shape[0]
    activation = x.reshape(batch, -1)
    inputs: list[torch.Tensor] = []
    for layer in network:
        inputs.append(activation)
        if not isinstance(layer, (nn.Flatten, nn.Identity, nn.Dropout)):
            activation = layer(activation)
    output = activation  # [B, m]

    curvature = _Curvature()
    if objective is None:
        assert indices is not None
        eye = torch.eye(output.shape[1], dtype=output.dtype, device=output.device)
        gradient = eye[indices.to(output.device)].expand(batch, -1, -1)  # [B, k, m]
    else:
        gradient = vmap(grad(objective))(output, targets).unsqueeze(1)  # [B, 1, m]
        curvature.dense = vmap(hessian(objective))(output, targets).unsqueeze(1)

    for layer, layer_input in zip(reversed(network), reversed(inputs), strict=True):
        if isinstance(layer, nn.Linear):
            curvature.through_linear(layer.weight)
            gradient = gradient @ layer.weight
        elif isinstance(layer, nn.BatchNorm1d):
            factor = _batchnorm_scale(layer, layer_input).reshape(1, 1, -1)
            curvature.scale(factor)
            gradient = gradient * factor
        elif isinstance(layer, ELEMENTWISE):
            first, second = _elementwise_derivatives(layer, layer_input)
            first, second = first.unsqueeze(1), second.unsqueeze(1)  # [B, 1, d]
            curvature.scale(first)
            if bool(second.any()):
                curvature.add_diagonal(gradient * second)
            gradient = gradient * first
    n = activation.shape[1] if not inputs else inputs[0].shape[1]
    return curvature.materialize((batch, gradient.shape[1], n, n), x)
