"""The structured derivative path for layered networks: exact, dense-matmul only.

For a network of affine maps and elementwise non-linearities, the input Hessian of a
scalar ``s`` is exactly (derivation: docs/engine.md, "The structured path's Hessian")

    H = J_out^T H_obj J_out + sum_l J_l^T diag(g_l * sigma_l''(z_l)) J_l

where ``z_l`` is the input of non-linearity ``l``, ``J_l = dz_l/dx`` and ``g_l`` the
gradient of ``s`` with respect to that non-linearity's output. A network is split at its
first ``Linear`` into

- a *head* (convolutions of any stride, dilation and groups, average, adaptive-average
  and max pooling, batch norm, elementwise functions, flatten): every unit there
  depends only on its receptive field, a small patch of the input, so its Jacobian is
  kept as one small dense patch per unit (``Patches``) and its Hessian term is a
  ``K x K`` block per position, scattered into ``H`` -- never an ``n x n`` product. Up
  to the second convolution the patches factor as a per-unit scale times the first
  kernel, so that convolution's patches are one convolution of the scale with a
  composed kernel, and the first layer's blocks are one product. A grouped or dilated
  kernel is the dense kernel over its receptive field with zeros off its groups and
  between its taps; the blocks skip the entries no unit depends on. A max pool is
  routing: each output unit copies the patch of the input unit it selects at ``x`` (it
  is piecewise linear: no curvature term). An adaptive pool next to the first Linear is
  taken into it (``W P``); elsewhere, one with even windows is an average pool;
- a *tail* (Linear, BatchNorm1d, elementwise functions): its curvature is propagated
  backward in each layer's width (``W^T H W``; ``diag(s') H diag(s') + diag(g s'')``)
  down to the output of the first ``Linear``, ``H_h``, and enters ``H`` once as
  ``A^T H_h A`` with ``A = W_1 J_u`` the Jacobian of that output.

So an MLP costs a few products in its hidden widths plus one ``n x h x n`` product, and a
CNN costs its receptive-field blocks. Anything else is not supported here: ``parse``
returns None and the caller falls back to the generic path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.weak import WeakIdKeyDictionary

from hessian_service.engine.structure import computes_as
from hessian_service.engine.symmetric import symmetric_matmul

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
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
AVG_POOLS: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
ADAPTIVE_POOLS: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
MAX_POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d)
ONE_D: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.MaxPool1d,
)
SPATIAL: tuple[type[nn.Module], ...] = (*CONVS, *AVG_POOLS, *MAX_POOLS)
SUPPORTED: tuple[type[nn.Module], ...] = (
    *ELEMENTWISE,
    *PASS_THROUGH,
    *BATCHNORMS,
    *SPATIAL,
    nn.Flatten,
    nn.Linear,
)

# Up to this many rows of the first Linear are pulled back through the head by
# broadcasting; more go through einsum's batched matmul (measured on 2 CPU cores).
SMALL_HEAD_ROWS = 32

# One sample's flattened output and its target row -> the objective's scalar value.
ObjectiveFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Network:
    """A supported network: ``head`` up to the first Linear, ``tail`` from it on."""

    head: list[nn.Module]
    tail: list[nn.Module]


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The layers of nested plain ``nn.Sequential`` containers, in order; any other
    module (a Sequential subclass with its own forward, as a residual block, included)
    is one leaf."""
    if isinstance(model, nn.Sequential) and computes_as(model, (nn.Sequential,)):
        return [leaf for child in model for leaf in _leaves(child)]
    return [model]


def _pair(value: int | tuple[int, ...] | str) -> tuple[int, int] | None:
    if isinstance(value, str):
        return None
    values = (value,) if isinstance(value, int) else tuple(value)
    return (values * 2)[:2] if len(values) == 1 else (values[0], values[1])


def _spatial_supported(layer: nn.Module, rank: int) -> bool:
    """Whether a window layer is one the patches can pass: the right rank for its class,
    zero padding, no ceil mode, and a pool that returns its values only."""
    expected_rank = 2 if isinstance(layer, ONE_D) else 3
    if rank != expected_rank:
        return False
    if isinstance(layer, CONVS):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    if isinstance(layer, ADAPTIVE_POOLS):
        return True
    if isinstance(layer, nn.AvgPool1d):
        return not layer.ceil_mode and layer.count_include_pad
    if isinstance(layer, nn.AvgPool2d):
        return not layer.ceil_mode and layer.count_include_pad and layer.divisor_override is None
    if isinstance(layer, MAX_POOLS):
        return not layer.ceil_mode and not layer.return_indices
    return False


@dataclass(frozen=True)
class _Geometry:
    """A window layer's kernel, stride, padding and dilation in 2-D (a 1-D layer has
    height 1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """The output's spatial size (floor mode), as torch computes it."""
        rows, cols = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, k, step, pad, dil in zip(
                in_hw, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )
        return rows, cols


def _adaptive_out(
    layer: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d, in_hw: tuple[int, int]
) -> tuple[int, int]:
    """An adaptive pool's output size in 2-D (``None`` entries keep the input's size)."""
    size = layer.output_size
    if isinstance(layer, nn.AdaptiveAvgPool1d):
        value = size if isinstance(size, int) or size is None else size[0]
        return (1, in_hw[1] if value is None else value)
    values = (size, size) if isinstance(size, int) or size is None else tuple(size)
    rows, cols = (
        given if value is None else value for given, value in zip(in_hw, values, strict=True)
    )
    return rows, cols


def _geometry(layer: nn.Module, in_hw: tuple[int, int]) -> _Geometry | None:
    """The window of a convolution or pool on an input of spatial size ``in_hw``; None for
    an adaptive pool whose windows are uneven (an input size its output size does not
    divide): those are not one window slid with a fixed stride."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        kernel = _pair(layer.kernel_size) or (1, 1)
        stride, padding = _pair(layer.stride) or (1, 1), _pair(layer.padding) or (0, 0)
        dilation = _pair(layer.dilation) or (1, 1)
    elif isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        out_hw = _adaptive_out(layer, in_hw)
        if any(size % out for size, out in zip(in_hw, out_hw, strict=True)):
            return None
        kernel = (in_hw[0] // out_hw[0], in_hw[1] // out_hw[1])
        return _Geometry(kernel, kernel, (0, 0))
    else:
        assert isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d))
        kernel = _pair(layer.kernel_size) or (1, 1)
        stride = _pair(layer.stride if layer.stride else layer.kernel_size) or kernel
        padding = _pair(layer.padding) or (0, 0)
        dilation = (1, 1)
        if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)):
            dilation = _pair(layer.dilation) or (1, 1)
    if isinstance(layer, ONE_D):  # 1-D as 2-D with height 1
        return _Geometry((1, kernel[1]), (1, stride[1]), (0, padding[1]), (1, dilation[1]))
    return _Geometry(kernel, stride, padding, dilation)


def _adaptive_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """``P [out, size]``: row ``i`` averages torch's adaptive window
    ``[floor(i size / out), ceil((i + 1) size / out))`` along one axis."""
    i = torch.arange(out, device=like.device).reshape(-1, 1)
    start, end = (i * size) // out, ((i + 1) * size + out - 1) // out
    j = torch.arange(size, device=like.device).reshape(1, -1)
    inside = ((j >= start) & (j < end)).to(like.dtype)
    return inside / (end - start).to(like.dtype)


class _PooledLinear(nn.Module):
    """An adaptive average pool, a Flatten and the first Linear, as ONE linear map of
    the pool's input: the tail's first layer.

    Uneven windows (13 -> 2: rows 0-6 and 6-12) are no fixed-stride window, so the
    patches cannot pass them, and wide even ones (global pooling) would cost a window
    pass of kernel-many taps; but the pool is linear and separable, ``P_h X P_w^T`` per
    channel, so ``W P`` (``W [h, C oh ow]`` times the pool as a ``C oh ow x C H W``
    matrix, formed as ``W`` contracted with ``P_h`` and ``P_w``) is exactly the Linear
    seen from the pool's input, whose patches the head has. It is formed from the
    current weight at each read (``h C H W`` products: nothing cached to go stale).
    """

    def __init__(
        self,
        pool: nn.Module,
        linear: nn.Linear,
        units: tuple[int, int, int],
        out_hw: tuple[int, int],
    ) -> None:
        super().__init__()
        self.pool, self.linear = pool, linear
        self.units, self.out_hw = units, out_hw
        one_d = isinstance(pool, nn.AdaptiveAvgPool1d)
        self.sample_shape = (units[0], units[2]) if one_d else units
        self.out_features = linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        """``W P``: ``[h, C H W]``, on the pool's input units."""
        channels, height, width = self.units
        weight = self.linear.weight
        rows = _adaptive_matrix(height, self.out_hw[0], weight)
        cols = _adaptive_matrix(width, self.out_hw[1], weight)
        per_unit = weight.reshape(-1, channels, *self.out_hw)
        folded = torch.einsum("hcyx,yi,xj->hcij", per_unit, rows, cols)
        return folded.reshape(weight.shape[0], -1)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(flat.reshape(-1, *self.sample_shape))
        out: torch.Tensor = self.linear(pooled.flatten(1))
        return out


def parse(model: nn.Module, sample_shape: tuple[int, ...]) -> Network | None:
    """Split a supported network into head and tail; None when this path cannot run it.

    Supported: (nested) ``nn.Sequential`` in eval mode of Conv1d/Conv2d (zero padding;
    any stride, dilation and groups), AvgPool1d/2d, AdaptiveAvgPool1d/2d, MaxPool1d/2d,
    BatchNorm1d/2d, Flatten, Linear, Identity, Dropout and elementwise non-linearities,
    where every Linear sees a flat per-sample vector; each computing what its torch class
    does (no overridden forward, no forward hooks). An adaptive pool that only a Flatten
    (or identities) separates from the first Linear is taken into it (``_PooledLinear``);
    elsewhere in the head its output size must divide its input size.
    """
    layers = _leaves(model)
    if not all(computes_as(layer, SUPPORTED) for layer in layers):
        return None
    first_linear = next(
        (i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)), len(layers)
    )
    rank = len(sample_shape)  # 1: [n], 2: [C, L], 3: [C, H, W]
    flat = rank == 1
    units = None if flat else _canonical(sample_shape)  # per-sample [C, H, W] so far
    folded: tuple[int, tuple[int, int, int], tuple[int, int]] | None = None
    for position, layer in enumerate(layers):
        if layer.training and isinstance(layer, (*PASS_THROUGH, *BATCHNORMS)):
            return None
        if isinstance(layer, ELEMENTWISE + PASS_THROUGH):
            continue
        if isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return None
            flat = True
        elif isinstance(layer, BATCHNORMS):
            if layer.running_var is None or layer.running_mean is None:
                return None
            if isinstance(layer, nn.BatchNorm2d) and (flat or rank != 3):
                return None
        elif isinstance(layer, nn.Linear):
            if not flat:
                return None
        elif (
            position >= first_linear or flat or units is None or not _spatial_supported(layer, rank)
        ):
            return None
        else:
            in_hw = (units[1], units[2])
            between = layers[position + 1 : first_linear]
            if isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and (
                first_linear < len(layers)
                and all(isinstance(other, (nn.Flatten, *PASS_THROUGH)) for other in between)
            ):
                # Next to the first Linear, which takes it in: uneven windows have no
                # fixed stride for the patches, and even wide ones cost a window pass of
                # kernel-many taps (global pooling at 28x28: 13.5 ms against 6.4 ms).
                out_hw = _adaptive_out(layer, in_hw)
                folded = (position, units, out_hw)
            else:
                geometry = _geometry(layer, in_hw)
                if geometry is None:  # uneven adaptive windows inside the head
                    return None
                out_hw = geometry.out_hw(in_hw)
            channels = units[0]
            if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                if layer.in_channels != channels:
                    return None
                channels = layer.out_channels
            if min(out_hw) < 1:
                return None
            units = (channels, *out_hw)
    if folded is None:
        return Network(layers[:first_linear], layers[first_linear:])
    position, pool_units, out_hw = folded
    linear = layers[first_linear]
    assert isinstance(linear, nn.Linear)
    if linear.in_features != pool_units[0] * out_hw[0] * out_hw[1]:
        return None
    pooled = _PooledLinear(layers[position], linear, pool_units, out_hw)
    return Network(layers[:position], [pooled, *layers[first_linear + 1 :]])


def _run(layer: nn.Module, activation: torch.Tensor, *, observed: bool = True) -> torch.Tensor:
    """``layer(activation)``, leaving ``activation`` as it was: an in-place activation
    (``nn.ReLU(inplace=True)``, ``nn.ELU(inplace=True)``, ...) would overwrite the
    pre-activation its derivatives are taken at, or a leaf that autograd needs.

    ``observed=False`` calls ``forward`` itself, past module-wide hooks, for the
    engine's own derivative probes: the layers have no hooks of their own (``parse``
    takes only layers that ``computes_as`` their class),
    and an observing tool's hooks (``FlopCounterMode``'s module tracker) would count the
    probe and break its ``autograd.grad``."""
    source = activation.clone() if getattr(layer, "inplace", False) else activation
    output: torch.Tensor = layer(source) if observed else layer.forward(source)
    return output


Derivatives = tuple[torch.Tensor, torch.Tensor | None]  # sigma'(z), sigma''(z) or None


def elementwise_derivatives(
    layer: nn.Module, z: torch.Tensor, output: torch.Tensor | None = None
) -> Derivatives:
    """``sigma'(z)`` and ``sigma''(z)`` of an elementwise module; the second is None
    where it is zero everywhere (piecewise-linear layers), so callers skip its terms.

    Closed forms for tanh, sigmoid and ReLU, from ``output = sigma(z)`` when the caller
    has it (the forward pass does: tanh of a CNN activation is not cheap to recompute).
    Otherwise double backward: elementwise means a diagonal Jacobian, so the gradient
    of ``sum(sigma(z))`` is exactly ``sigma'(z)`` and the gradient of ``sum(sigma'(z))``
    is ``sigma''(z)``.
    """
    if type(layer) is nn.Tanh:
        t = torch.tanh(z) if output is None else output
        first = 1 - t.square()
        return first, first.mul(t).mul_(-2)
    if type(layer) is nn.Sigmoid:
        s = torch.sigmoid(z) if output is None else output
        first = s * (1 - s)
        return first, first * (1 - 2 * s)
    if type(layer) is nn.ReLU:
        return (z > 0).to(z.dtype), None
    with torch.enable_grad():
        at = z.detach().requires_grad_(True)
        probe = _run(layer, at, observed=False)
        (first,) = torch.autograd.grad(probe.sum(), at, create_graph=True)
        if not first.requires_grad:  # piecewise linear: no second derivative
            return first.detach(), None
        (second,) = torch.autograd.grad(first.sum(), at, allow_unused=True)
    if second is None or not bool(second.any()):
        return first.detach(), None
    return first.detach(), second.detach()


def _batchnorm_scale(layer: nn.Module, units: tuple[int, int, int]) -> torch.Tensor:
    """The eval-mode scale of a batch norm, shaped [C, H, W] (or [C, 1, 1]) to broadcast."""
    assert isinstance(layer, _BatchNorm)
    running_var, weight = layer.get_buffer("running_var"), layer.weight
    scale = torch.rsqrt(running_var + layer.eps)
    if weight is not None:
        scale = scale * weight
    if scale.numel() == units[0]:
        return scale.reshape(-1, 1, 1)
    return scale.reshape(units)


def _canonical(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    """A per-sample shape as units [C, H, W]: [n] -> [1, 1, n], [C, L] -> [C, 1, L].

    A flat input is one channel of ``n`` positions, so its identity patches are ``n``
    one-entry patches rather than one ``n x n`` identity: nothing of size ``n^2`` is built
    per call, and a non-linearity before the first Linear has ``1 x 1`` Hessian blocks
    (its diagonal) instead of one dense ``n x n`` block."""
    if len(shape) == 1:
        return (1, 1, shape[0])
    if len(shape) == 2:
        return (shape[0], 1, shape[1])
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    raise ValueError(f"structured: unsupported sample shape {tuple(shape)}")


# Patch geometry depends only on shapes, so its index and mask tensors are cached across calls.
_INDEX_CACHE: dict[tuple[object, ...], torch.Tensor] = {}
_PAIRS_CACHE: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}

# The patch entries (flat positions in K) that some unit depends on, when that is a
# small part of the patch (a dilated kernel's holes); None for all of them.
Support = tuple[int, ...]

# Blocks are computed and scattered over their support only when it is at most this
# share of the patch: a dilated 3x3 kernel fills 9 of its 25 entries (two dilated
# layers: 25 of 81), so its blocks shrink 7x-10x; gathering costs more than it saves
# when nearly all entries are kept.
SPARSE_SUPPORT = 0.75


def _support(local: torch.Tensor) -> Support | None:
    """The entries of the last axis (a patch, flat) that are nonzero anywhere in
    ``local``, or None when they are more than ``SPARSE_SUPPORT`` of it. Exact: an entry
    zero in every unit's local Jacobian adds exactly zero to every block."""
    size = local.shape[-1]
    nonzero = local.reshape(-1, size).ne(0).any(0).nonzero().reshape(-1)
    if nonzero.numel() > SPARSE_SUPPORT * size:
        return None
    return tuple(nonzero.tolist())


# Composed kernels depend on two weights only, so one is kept per convolution weight
# (weakly, by identity) with copies of both weights it was built from: reused only
# while they compare equal, which also catches changes made through ``.data``.
_COMPOSED_CACHE = WeakIdKeyDictionary()


@dataclass(frozen=True)
class _ComposedEntry:
    weight: torch.Tensor
    base: torch.Tensor
    spacing: tuple[int, int, int, int, int]  # first stride, dilation, groups
    kernel: torch.Tensor

    def matches(
        self, weight: torch.Tensor, base: torch.Tensor, spacing: tuple[int, int, int, int, int]
    ) -> bool:
        return (
            spacing == self.spacing
            and base.shape == self.base.shape
            and torch.equal(weight, self.weight)
            and torch.equal(base, self.base)
        )


def _composed_kernel(
    weight: torch.Tensor,
    base: torch.Tensor,
    first_stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``Q[(o, c0, u, v), c, i, j] = W[o, c, i, j] K[c, c0, u - S d i, v - S d j]`` as a
    conv2d weight ``[o * c0 * gh * gw, c, kh, kw]`` (see ``Patches._composed_window``);
    with groups, ``c`` runs over the ``Ci / groups`` channels of ``o``'s group."""
    # A Conv1d weight arrives as a fresh 4-D view each call: key on the tensor it views.
    owner = weight if weight._base is None else weight._base
    spacing = (*first_stride, *dilation, groups)
    cached: _ComposedEntry | None = _COMPOSED_CACHE.get(owner)  # type: ignore[no-untyped-call]
    if cached is not None and cached.matches(weight, base, spacing):
        return cached.kernel
    out_channels, channels, kh, kw = weight.shape  # channels: those of one group
    _, c0, rh, rw = base.shape
    Sh, Sw = first_stride[0] * dilation[0], first_stride[1] * dilation[1]
    grown = (rh + (kh - 1) * Sh, rw + (kw - 1) * Sw)
    # The first kernel's rows that each output channel's group reads: [o, c, c0, a, b]
    per_group = base.reshape(groups, 1, channels, c0, rh, rw)
    seen = per_group.expand(-1, out_channels // groups, -1, -1, -1, -1)
    seen = seen.reshape(out_channels, 1, 1, channels, c0, rh, rw).permute(0, 3, 1, 2, 4, 5, 6)
    # [o, c, i, j, c0, a, b]: every tap's weight times the first window's kernel
    products = weight.reshape(out_channels, channels, kh, kw, 1, 1, 1) * seen
    composed = weight.new_zeros(out_channels, c0, *grown, channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            composed[:, :, Sh * i : Sh * i + rh, Sw * j : Sw * j + rw, :, i, j] = products[
                :, :, i, j
            ].permute(0, 2, 3, 4, 1)
    kernel = composed.reshape(-1, channels, kh, kw)
    _COMPOSED_CACHE[owner] = _ComposedEntry(weight.clone(), base.clone(), spacing, kernel)
    return kernel


@dataclass
class Patches:
    """The Jacobian of a head activation ``[C, H, W]`` with respect to the input.

    Unit ``(c, y, x)`` depends only on the input patch whose origin is
    ``(stride * (y, x) - offset)``, of size ``size``, over all input channels; ``values``
    holds those local Jacobians, ``[B or 1, C, H, W, C0, rh, rw]``. ``identity`` marks the
    input itself (no layer applied yet), so products with it can be skipped.

    ``values`` is ``base`` times the per-unit factor ``pending`` (``[B or 1, C, H, W]``,
    or None), multiplied out only when something reads ``values``: the scaling by the
    last non-linearity's derivative is often never read (the next convolution uses
    ``factored``, and the patches after the last one are read only when the tail has
    curvature). Shapes, dtype and device come from ``base`` (its batch dim may be 1).
    """

    base: torch.Tensor
    input_units: tuple[int, int, int]
    stride: tuple[int, int] = (1, 1)
    offset: tuple[int, int] = (0, 0)
    identity: bool = True
    # After one window over the input and per-unit scalings only, ``values`` factor as
    # ``scale[b, c, y, x] * kernel[c, c0, i, j] * inside[y, x, i, j]``; kept as
    # ``(kernel, scale or None)`` so the next convolution and this layer's Hessian
    # blocks can use the factors (``_composed_window``, ``_add_blocks``).
    factored: tuple[torch.Tensor, torch.Tensor | None] | None = None
    pending: torch.Tensor | None = None
    # Whether a dilated window was passed: then the patches have entries no unit depends
    # on (the holes between taps), which the Hessian blocks skip (``_support``).
    holes: bool = False
    _indices: torch.Tensor | None = field(default=None, repr=False)
    _pairs: torch.Tensor | None = field(default=None, repr=False)
    _pairs_support: Support | None = field(default=None, repr=False)

    @property
    def values(self) -> torch.Tensor:
        if self.pending is not None:
            factor = self.pending
            self.base = self.base * factor.reshape(*factor.shape[:4], 1, 1, 1)
            self.pending = None
        return self.base

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        self.base, self.pending = values, None

    @classmethod
    def of_input(cls, units: tuple[int, int, int], like: torch.Tensor) -> Patches:
        channels, height, width = units
        eye = torch.eye(channels, dtype=like.dtype, device=like.device)
        values = eye.reshape(1, channels, 1, 1, channels, 1, 1).expand(
            1, channels, height, width, channels, 1, 1
        )
        return cls(base=values, input_units=units)

    @property
    def units(self) -> tuple[int, int, int]:
        return (self.base.shape[1], self.base.shape[2], self.base.shape[3])

    @property
    def patch(self) -> int:
        """K: the number of input entries one unit can depend on."""
        return int(self.base.shape[4] * self.base.shape[5] * self.base.shape[6])

    def scaled(self, factor: torch.Tensor) -> Patches:
        """``diag(factor) J`` for a per-unit factor ``[B or 1, C, H, W]`` (applied when
        ``values`` is read)."""
        pending = factor if self.pending is None else self.pending * factor
        factored = None
        if self.factored is not None:
            kernel, scale = self.factored
            factored = (kernel, factor if scale is None else scale * factor)
        return Patches(
            self.base,
            self.input_units,
            self.stride,
            self.offset,
            identity=False,
            factored=factored,
            pending=pending,
            holes=self.holes,
        )

    def through_window(self, window: Window) -> Patches:
        """Through a convolution, an average pool or a max pool."""
        if self.identity:
            return self._first_window(window)
        if self.factored is not None and window.weight is not None:
            return self._composed_window(window.weight, window)
        weight, (kh, kw) = window.weight, window.kernel
        (sh, sw), (ph, pw), (oh, ow) = window.stride, window.padding, window.out_hw
        (dh, dw), (Sh, Sw) = window.dilation, self.stride
        values = self.values
        channels, c0, rh, rw = values.shape[1], *values.shape[4:7]
        taps = kh * kw
        # Zero padding of the activation is zero padding of its patches.
        padded = F.pad(values, (0, 0, 0, 0, 0, 0, pw, pw, ph, ph))
        grown = self._grown(window)
        # Tap (i, j) sees the units at (stride * (y, x) + dilation * (i, j)) of the padded
        # activation: one strided view per tap, laid out [taps, rh, rw, B, oh, ow, c0, C]
        # so that the channel mix is one batched matmul and its result has the units
        # innermost.
        windows = torch.stack(
            [
                padded[
                    :,
                    :,
                    dh * i : dh * i + sh * (oh - 1) + 1 : sh,
                    dw * j : dw * j + sw * (ow - 1) + 1 : sw,
                ].permute(5, 6, 0, 2, 3, 4, 1)
                for i in range(kh)
                for j in range(kw)
            ]
        )
        out_channels = channels
        if window.routing is not None:  # max pooling: each unit copies its chosen tap
            chosen = F.one_hot(window.routing, taps).to(windows.dtype)  # [B, C, oh, ow, taps]
            mixed = windows * chosen.permute(4, 0, 2, 3, 1).unsqueeze(1).unsqueeze(1).unsqueeze(-2)
        elif weight is None:  # average pooling: per channel, equal weights
            mixed = windows / taps
        else:  # [taps, rh * rw * B * oh * ow * c0, C] @ [taps, C, Co]
            dense = _dense_kernel(weight, window.groups)  # groups as zeros; taps as they are
            out_channels = dense.shape[0]
            per_tap = dense.reshape(out_channels, channels, taps).permute(2, 1, 0)
            mixed = torch.bmm(windows.reshape(taps, -1, channels), per_tap)
        batch = mixed.numel() // (taps * rh * rw * oh * ow * c0 * out_channels)
        # Tap (i, j)'s patch lands at offset (Sh dh i, Sw dw j) of the grown patch: one
        # add of contiguous unit rows per tap.
        folded = mixed.new_zeros(*grown, batch * oh * ow * c0 * out_channels)
        for tap, contribution in enumerate(mixed.reshape(taps, rh, rw, -1).unbind(0)):
            i, j = divmod(tap, kw)
            top, left = Sh * dh * i, Sw * dw * j
            folded[top : top + rh, left : left + rw] += contribution
        new = (
            folded.reshape(*grown, batch, oh, ow, c0, out_channels)
            .permute(2, 6, 3, 4, 5, 0, 1)
            .contiguous()
        )
        return self._after(window, new)

    def _grown(self, window: Window) -> tuple[int, int]:
        """The patch extent after ``window``: each tap shifts by this patch's stride
        times the window's dilation."""
        (kh, kw), (dh, dw), (Sh, Sw) = window.kernel, window.dilation, self.stride
        rh, rw = self.base.shape[5], self.base.shape[6]
        return (rh + (kh - 1) * dh * Sh, rw + (kw - 1) * dw * Sw)

    def _after(
        self,
        window: Window,
        values: torch.Tensor,
        factored: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> Patches:
        """The patches of ``window``'s output, holding ``values``: strides multiply and
        the padding shifts the origin, in input units."""
        (Sh, Sw), (sh, sw), (ph, pw) = self.stride, window.stride, window.padding
        return Patches(
            values,
            self.input_units,
            (Sh * sh, Sw * sw),
            (self.offset[0] + Sh * ph, self.offset[1] + Sw * pw),
            identity=False,
            factored=factored,
            holes=self.holes or window.dilation != (1, 1),
        )

    def _first_window(self, window: Window) -> Patches:
        """The first window over the input itself: each unit's local Jacobian is the
        kernel (``1 / taps`` per channel for average pooling; a grouped or dilated
        convolution's as a dense kernel over its receptive field, ``_dense_kernel``),
        zeroed where it covers padding; for max pooling, one at the tap it copies."""
        channels = self.input_units[0]
        like = self.base
        if window.routing is not None:
            return self._first_max_window(window)
        if window.weight is None:
            kh, kw = window.kernel
            eye = torch.eye(channels, dtype=like.dtype, device=like.device) / (kh * kw)
            kernel_values = eye.reshape(channels, channels, 1, 1).expand(-1, -1, kh, kw)
        else:
            kernel_values = _dense_kernel(window.weight, window.groups, window.dilation)
        eh, ew = kernel_values.shape[2:]
        new = self._after(
            window,
            kernel_values.reshape(1, kernel_values.shape[0], 1, 1, channels, eh, ew),
            factored=(kernel_values, None),
        )
        new.values = new.values * new.inside_mask(window.out_hw, (eh, ew))
        return new

    def _first_max_window(self, window: Window) -> Patches:
        """A max pool over the input itself: unit ``(c, y, x)``'s local Jacobian is one
        at channel ``c`` and its chosen tap of the window's span, zero elsewhere."""
        assert window.routing is not None
        channels = self.input_units[0]
        (kh, kw), (dh, dw), (eh, ew) = window.kernel, window.dilation, window.extent
        batch, _, oh, ow = window.routing.shape
        chosen = F.one_hot(window.routing, kh * kw).to(self.base.dtype)
        spread = chosen.new_zeros(batch, channels, oh, ow, eh, ew)
        spread[..., ::dh, ::dw] = chosen.reshape(batch, channels, oh, ow, kh, kw)
        eye = torch.eye(channels, dtype=chosen.dtype, device=chosen.device)
        values = spread.unsqueeze(4) * eye.reshape(1, channels, 1, 1, channels, 1, 1)
        return self._after(window, values)

    def _composed_window(self, weight: torch.Tensor, window: Window) -> Patches:
        """A convolution after a factored first window, as ONE convolution of the scale.

        The new unit ``(o, y, x)`` sees input offset ``(u, v)`` of its grown patch through
        ``sum_{c, i, j} W[o, c, i, j] scale[c, s y + d i, s x + d j] K[c, c0, u - S d i,
        v - S d j]`` (``S`` the first window's stride, ``d`` this layer's dilation), and
        whether ``(u, v)`` lies inside the input does not depend on the tap. So the
        composed kernel ``Q[(o, c0, u, v), c, i, j] = W[o, c, i, j] K[c, c0, u - S d i,
        v - S d j]`` applied to the scale with this layer's stride, padding, dilation and
        groups (``c`` ranging over ``o``'s group) gives every local Jacobian at once; the
        padding's zeros in the scale stand for the zero-padded activation.
        """
        base, scale = self.factored if self.factored is not None else (None, None)
        assert base is not None
        channels, c0 = base.shape[:2]
        grown = self._grown(window)
        composed = _composed_kernel(weight, base, self.stride, window.dilation, window.groups)
        if scale is None:
            scale = weight.new_ones(1, channels, *self.base.shape[2:4])
        mixed = F.conv2d(
            scale,
            composed,
            stride=window.stride,
            padding=window.padding,
            dilation=window.dilation,
            groups=window.groups,
        )
        values = (
            mixed.reshape(-1, weight.shape[0], c0, *grown, *window.out_hw)
            .permute(0, 1, 5, 6, 2, 3, 4)
            .contiguous()  # the units' layout, which the blocks and later windows read
        )
        new = self._after(window, values)
        new.values = values.mul_(new.inside_mask(window.out_hw, grown))
        return new

    def block_mask(self, support: Support | None = None) -> torch.Tensor:
        """``inside[p, i] * inside[p, j]`` for every position's ``K x K`` block,
        ``[P, K, K]``, or over the ``support`` entries only (cached)."""
        height, width, c0, rh, rw = self.base.shape[2:7]
        key: tuple[object, ...] = ("block", self.input_units, self.stride, self.offset)
        key += (self.base.shape[2:], self.base.dtype, self.base.device, support)
        if key not in _INDEX_CACHE:
            if len(_INDEX_CACHE) >= 64:
                _INDEX_CACHE.clear()
            inside = self.inside_mask((height, width), (rh, rw)).reshape(height * width, 1, -1)
            inside = inside.expand(-1, c0, -1).reshape(height * width, -1)  # every channel
            if support is not None:
                inside = inside[:, list(support)]
            _INDEX_CACHE[key] = inside.unsqueeze(2) * inside.unsqueeze(1)
        return _INDEX_CACHE[key]

    def inside_mask(self, out_hw: tuple[int, int], extent: tuple[int, int]) -> torch.Tensor:
        """1 where a patch entry lies inside the input, 0 over its zero padding,
        ``[1, 1, oh, ow, 1, rh, rw]`` (cached: it depends on the geometry only)."""
        (oh, ow), (rh, rw) = out_hw, extent
        like = self.base
        key: tuple[object, ...] = ("inside", self.input_units, self.stride, self.offset)
        key += (extent, out_hw, like.dtype, like.device)
        if key not in _INDEX_CACHE:
            if len(_INDEX_CACHE) >= 64:
                _INDEX_CACHE.clear()
            rows, cols = self._inside(oh, rh, 0), self._inside(ow, rw, 1)
            mask = rows.reshape(oh, 1, rh, 1) & cols.reshape(1, ow, 1, rw)
            _INDEX_CACHE[key] = mask.reshape(1, 1, oh, ow, 1, rh, rw).to(like.dtype)
        return _INDEX_CACHE[key]

    def _inside(self, size: int, extent: int, axis: int) -> torch.Tensor:
        """Whether each (output position, patch offset) along ``axis`` (0: rows, 1:
        columns) falls inside the input rather than on its zero padding, ``[size, extent]``."""
        device = self.base.device
        starts = torch.arange(size, device=device) * self.stride[axis] - self.offset[axis]
        coordinate = starts.reshape(-1, 1) + torch.arange(extent, device=device).reshape(1, -1)
        return (coordinate >= 0) & (coordinate < self.input_units[1 + axis])

    def indices(self) -> torch.Tensor:
        """Flat input index of every patch entry, ``[P, K]``.

        Entries over the zero padding hold exactly zero (the padding's zeros propagate
        through every layer), so they are pointed at index 0, where adding them is a no-op.
        """
        if self._indices is None:
            key: tuple[object, ...] = (self.input_units, self.stride, self.offset)
            key += (tuple(self.base.shape[1:]), str(self.base.device))
            if key not in _INDEX_CACHE:
                if len(_INDEX_CACHE) >= 64:
                    _INDEX_CACHE.clear()
                _INDEX_CACHE[key] = self._compute_indices()
            self._indices = _INDEX_CACHE[key]
        return self._indices

    def pairs(self, n: int, support: Support | None = None) -> torch.Tensor:
        """Flat index into an ``n x n`` matrix of every entry of every position's
        ``K x K`` block, ``[P * K * K]`` (``[P * S * S]`` over a ``support`` of ``S``)."""
        if self._pairs is None or self._pairs_support != support:
            index = self.indices()
            key = (id(index), n, support)
            if key not in _PAIRS_CACHE or _PAIRS_CACHE[key][0] is not index:
                if len(_PAIRS_CACHE) >= 64:
                    _PAIRS_CACHE.clear()
                kept = index if support is None else index[:, list(support)]
                pairs = (kept.unsqueeze(2) * n + kept.unsqueeze(1)).reshape(-1)
                _PAIRS_CACHE[key] = (index, pairs)
            self._pairs, self._pairs_support = _PAIRS_CACHE[key][1], support
        return self._pairs

    def _compute_indices(self) -> torch.Tensor:
        c0, hin, win = self.input_units
        _, _, height, width, _, rh, rw = self.base.shape
        device = self.base.device
        ys = torch.arange(height, device=device) * self.stride[0] - self.offset[0]
        xs = torch.arange(width, device=device) * self.stride[1] - self.offset[1]
        rows = ys.reshape(-1, 1, 1, 1, 1) + torch.arange(rh, device=device).reshape(1, 1, 1, -1, 1)
        cols = xs.reshape(1, -1, 1, 1, 1) + torch.arange(rw, device=device).reshape(1, 1, 1, 1, -1)
        channel = torch.arange(c0, device=device).reshape(1, 1, -1, 1, 1)
        valid = (rows >= 0) & (rows < hin) & (cols >= 0) & (cols < win)
        flat = channel * (hin * win) + rows * win + cols
        valid = valid.expand(height, width, c0, rh, rw).reshape(height * width, -1)
        flat = torch.where(
            valid, flat.expand(height, width, c0, rh, rw).reshape(height * width, -1), 0
        )
        return flat


@dataclass
class _ActivationHessian:
    """The Hessian w.r.t. the current tail activation, ``[B, k, d, d]``: zero, diagonal
    ``[B, k, d]`` or dense -- whichever is exact and cheapest."""

    dense: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None

    def through_linear(self, weight: torch.Tensor) -> None:
        if self.diagonal is not None:  # (W^T diag) laid out contiguously: no copy in matmul
            self.dense = symmetric_matmul(weight.t() * self.diagonal.unsqueeze(-2), weight)
            self.diagonal = None
        elif self.dense is not None:
            self.dense = symmetric_matmul(weight.transpose(-1, -2), self.dense @ weight)

    def scale(self, factor: torch.Tensor) -> None:
        """``diag(factor) H diag(factor)``."""
        if self.diagonal is not None:
            self.diagonal = self.diagonal * factor * factor
        elif self.dense is not None:  # always a fresh product here, so scaled in place
            self.dense.mul_(factor.unsqueeze(-1)).mul_(factor.unsqueeze(-2))

    def add_diagonal(self, values: torch.Tensor) -> None:
        if self.dense is not None:  # always a fresh product here, so updated in place
            self.dense.diagonal(dim1=-2, dim2=-1).add_(values)
        elif self.diagonal is not None:
            self.diagonal = self.diagonal + values
        else:
            self.diagonal = values

    @property
    def is_zero(self) -> bool:
        """True when no curvature has reached this activation (a raw output so far)."""
        return self.dense is None and self.diagonal is None

    def sandwich(self, a: torch.Tensor) -> torch.Tensor | None:
        """``A^T H A`` for ``A [B or 1, h, n]``, or None when H is zero."""
        a = a.unsqueeze(1)
        if self.diagonal is not None:
            return symmetric_matmul(a.transpose(-1, -2), a * self.diagonal.unsqueeze(-1))
        if self.dense is not None:  # (A^T H) first: a contiguous left side, ~2% faster
            return symmetric_matmul(a.transpose(-1, -2) @ self.dense, a)
        return None


@dataclass
class _Forward:
    """What the backward passes need from one forward pass."""

    output: torch.Tensor  # [B, m]
    head_inputs: list[torch.Tensor] = field(default_factory=list)  # each layer's input
    head_patches: list[Patches | None] = field(default_factory=list)  # J of elementwise inputs
    head_output_shapes: list[torch.Size] = field(default_factory=list)  # per sample
    # (sigma'(z), sigma''(z) or None) of each elementwise head layer, None for others
    head_derivatives: list[Derivatives | None] = field(default_factory=list)
    tail_inputs: list[torch.Tensor] = field(default_factory=list)
    patches: Patches | None = None  # J of the head's output


@dataclass(frozen=True)
class Window:
    """A convolution (``weight [Co, Ci / groups, kh, kw]``), an average pool (``weight``
    and ``routing`` None) or a max pool (``routing``) in 2-D -- a 1-D layer has height 1
    -- with its output's spatial size.

    ``routing`` is the tap ``i * kw + j`` each output unit of a max pool copies at the
    current input, ``[B, C, oh, ow]``: a max pool is piecewise linear, locally the
    selection of one input unit per output unit (no curvature of its own)."""

    weight: torch.Tensor | None
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out_hw: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    routing: torch.Tensor | None = None

    @property
    def extent(self) -> tuple[int, int]:
        """The input span one output unit sees: ``dilation * (kernel - 1) + 1``."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        return (dh * (kh - 1) + 1, dw * (kw - 1) + 1)

    @classmethod
    def of(cls, layer: nn.Module, activation: torch.Tensor, out_hw: tuple[int, int]) -> Window:
        """``layer``'s window on ``activation`` (its input, ``[B, *sample]``)."""
        units = _canonical(activation.shape[1:])
        geometry = _geometry(layer, (units[1], units[2]))
        assert geometry is not None  # uneven adaptive pools are folded by parse
        kernel, stride, padding = geometry.kernel, geometry.stride, geometry.padding
        weight, groups, routing = None, 1, None
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            weight = layer.weight if layer.weight.dim() == 4 else layer.weight.unsqueeze(2)
            groups = layer.groups
        elif isinstance(layer, MAX_POOLS):
            routing = _max_taps(activation.reshape(-1, *units), geometry)
        return cls(weight, kernel, stride, padding, out_hw, geometry.dilation, groups, routing)


def _max_indices(activation: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """The flat ``H * W`` index each max-pool output unit takes its value from,
    ``[B, C, oh, ow]``, for a canonical ``[B, C, H, W]`` input: the index torch's own
    ``max_pool2d_with_indices`` picks (the first maximum of a window, the one its
    gradient goes to), so ties resolve as in autograd."""
    _, indices = F.max_pool2d(
        activation,
        geometry.kernel,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
        return_indices=True,
    )
    return indices


def _max_taps(activation: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """Which tap ``i * kw + j`` of its window each max-pool output unit copies,
    ``[B, C, oh, ow]`` (the padding's ``-inf`` is never a window's maximum)."""
    indices = _max_indices(activation, geometry)
    width = activation.shape[3]
    oh, ow = indices.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = geometry.stride, geometry.padding, geometry.dilation
    origin_rows = (torch.arange(oh, device=indices.device) * sh - ph).reshape(-1, 1)
    origin_cols = (torch.arange(ow, device=indices.device) * sw - pw).reshape(1, -1)
    rows = torch.div(indices // width - origin_rows, dh, rounding_mode="floor")
    cols = torch.div(indices % width - origin_cols, dw, rounding_mode="floor")
    return rows * geometry.kernel[1] + cols


def _dense_kernel(
    weight: torch.Tensor, groups: int, dilation: tuple[int, int] = (1, 1)
) -> torch.Tensor:
    """A convolution's weight as a dense kernel over its receptive field,
    ``[Co, Ci, extent_h, extent_w]``: zero across groups (a grouped convolution is a
    dense one whose off-group channels weigh zero) and between dilated taps (a dilated
    kernel is a wider one with zero taps between). Exact; it costs ``groups`` times the
    channel products and ``(extent / kernel)^2`` times the patch entries of the layer
    itself. The weight itself when there is neither."""
    dh, dw = dilation
    if groups == 1 and (dh, dw) == (1, 1):
        return weight
    out_channels, per_group = weight.shape[:2]
    if groups > 1:
        channels = torch.arange(per_group * groups, device=weight.device)
        same = torch.arange(out_channels, device=weight.device).reshape(-1, 1) // (
            out_channels // groups
        ) == (channels // per_group).reshape(1, -1)
        weight = weight[:, channels % per_group] * same.reshape(*same.shape, 1, 1)
    if (dh, dw) == (1, 1):
        return weight
    kh, kw = weight.shape[2:]
    dense = weight.new_zeros(*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[:, :, ::dh, ::dw] = weight
    return dense


def forward(network: Network, x: torch.Tensor, *, track_patches: bool) -> _Forward:
    """Run the network, recording layer inputs and (optionally) the head's patches."""
    batch = x.shape[0]
    activation = x
    record = _Forward(output=x)
    patches = Patches.of_input(_canonical(x.shape[1:]), x) if track_patches else None
    for layer in network.head:
        record.head_inputs.append(activation)
        record.head_patches.append(
            patches if isinstance(layer, ELEMENTWISE) and track_patches else None
        )
        output = _run(layer, activation)
        record.head_output_shapes.append(output.shape[1:])
        derivatives = (
            elementwise_derivatives(layer, activation, output)
            if isinstance(layer, ELEMENTWISE)
            else None
        )
        record.head_derivatives.append(derivatives)
        if patches is not None:
            # The units keep their layout through a Flatten: a non-linearity or batch
            # norm after it scales the same [C, H, W] units, now seen as one vector.
            units = patches.units
            if derivatives is not None:
                patches = patches.scaled(derivatives[0].reshape(batch, *units))
            elif isinstance(layer, BATCHNORMS):
                patches = patches.scaled(_batchnorm_scale(layer, units).unsqueeze(0))
            elif isinstance(layer, SPATIAL):
                out_units = _canonical(output.shape[1:])
                window = Window.of(layer, activation, out_units[1:])
                patches = patches.through_window(window)
        activation = output
    record.patches = patches
    activation = activation.reshape(batch, -1)
    for layer in network.tail:
        record.tail_inputs.append(activation)
        if not isinstance(layer, (*PASS_THROUGH, nn.Flatten)):
            activation = _run(layer, activation)
    record.output = activation.reshape(batch, -1)
    return record


def _head_backward(
    network: Network,
    record: _Forward,
    gradient: torch.Tensor,
    first_weight: torch.Tensor | None,
    *,
    to_input: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of the ``k`` scalars through the head.

    ``gradient`` is ``[B, k, h]`` at the output of the tail's first Linear
    (``first_weight``; at the head's output when there is none), as ``_tail_backward``
    returns it. Returns the gradient at the input, ``[B, k, n]`` (None unless
    ``to_input``: a Hessian needs only the gradients at the elementwise layers, so the
    layers below the first one are skipped, and none of the head when it has no
    elementwise layer, as in an MLP), and at each elementwise layer's output (None for
    other layers).
    """
    batch, scalars = gradient.shape[:2]
    at_outputs: list[torch.Tensor | None] = [None] * len(network.head)
    first_elementwise = next(
        (i for i, d in enumerate(record.head_derivatives) if d is not None), len(network.head)
    )
    stop = 0 if to_input else first_elementwise
    if stop == len(network.head) and not to_input:
        return None, at_outputs
    current = gradient if first_weight is None else gradient @ first_weight
    for position in range(len(network.head) - 1, stop - 1, -1):
        layer, layer_input = network.head[position], record.head_inputs[position]
        sample_in, sample_out = layer_input.shape[1:], record.head_output_shapes[position]
        current = current.reshape(batch, scalars, *sample_out)
        derivatives = record.head_derivatives[position]
        if derivatives is not None:
            at_outputs[position] = current
            current = current * derivatives[0].unsqueeze(1)
        elif isinstance(layer, BATCHNORMS):
            units = _canonical(sample_in)
            scaled = current.reshape(batch, scalars, *units) * _batchnorm_scale(layer, units)
            current = scaled.reshape(batch, scalars, *sample_in)
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            current = _conv_transposed(
                layer, current.reshape(batch * scalars, *sample_out), sample_in
            )
        elif isinstance(layer, MAX_POOLS):
            current = _max_pool_transposed(layer, layer_input, current)
        elif isinstance(layer, AVG_POOLS):
            with torch.enable_grad():
                probe = torch.zeros(
                    batch * scalars, *sample_in, dtype=current.dtype, device=current.device
                ).requires_grad_(True)
                pooled = layer(probe)
                (current,) = torch.autograd.grad(pooled, probe, current.reshape(pooled.shape))
    if not to_input:
        return None, at_outputs
    return current.reshape(batch, scalars, -1), at_outputs


def _conv_transposed(
    layer: nn.Conv1d | nn.Conv2d, gradient: torch.Tensor, sample_in: torch.Size
) -> torch.Tensor:
    """The gradient at a convolution's input from the one at its output: the transposed
    convolution, with the output padding that restores the input's size (a strided
    convolution drops the last rows and columns it does not reach)."""
    padding = layer.padding
    assert not isinstance(padding, str)  # string padding is not supported (parse)
    reached = [
        (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1
        for size, stride, pad, dilation, kernel in zip(
            gradient.shape[2:],
            layer.stride,
            padding,
            layer.dilation,
            layer.kernel_size,
            strict=True,
        )
    ]
    extra = [target - got for target, got in zip(sample_in[1:], reached, strict=True)]
    transposed = F.conv_transpose1d if isinstance(layer, nn.Conv1d) else F.conv_transpose2d
    return transposed(
        gradient,
        layer.weight,
        stride=layer.stride,
        padding=padding,
        output_padding=extra,
        groups=layer.groups,
        dilation=layer.dilation,
    )


def _max_pool_transposed(
    layer: nn.Module, layer_input: torch.Tensor, gradient: torch.Tensor
) -> torch.Tensor:
    """The gradient at a max pool's input, ``[B, k, *sample_in]``, from the one at its
    output ``[B, k, *sample_out]``: each output unit's gradient goes to the input unit it
    copied (added up where one unit is the maximum of overlapping windows)."""
    batch, scalars = gradient.shape[:2]
    channels, height, width = _canonical(layer_input.shape[1:])
    geometry = _geometry(layer, (height, width))
    assert geometry is not None
    indices = _max_indices(layer_input.reshape(batch, channels, height, width), geometry)
    chosen = indices.reshape(batch, 1, channels, -1).expand(-1, scalars, -1, -1)
    result = gradient.new_zeros(batch, scalars, channels, height * width)
    result.scatter_add_(3, chosen, gradient.reshape(batch, scalars, channels, -1))
    return result.reshape(batch, scalars, *layer_input.shape[1:])


def _pulled_back(patches: Patches, weight: torch.Tensor | None, n: int) -> torch.Tensor:
    """``A = W J_u`` as ``[B or 1, h, n]``: the rows of ``W`` (identity when None) pulled
    back through the head's patch Jacobian onto the input."""
    if patches.identity:
        if weight is None:
            return torch.eye(n, dtype=patches.base.dtype, device=patches.base.device)[None]
        return weight.unsqueeze(0)
    values = patches.values
    batch, channels, height, width = values.shape[:4]
    positions, k = height * width, patches.patch
    local = values.reshape(batch, channels, positions, k)
    index = patches.indices()
    if weight is None:  # dense J_u: one row per head-output unit
        rows = channels * positions
        source = local.reshape(batch, rows, k)
        flat = (torch.arange(rows, device=values.device).reshape(rows, 1) * n).reshape(
            channels, positions, 1
        )
        flat = (flat + index.unsqueeze(0)).reshape(-1)
        result = values.new_zeros(batch, rows * n)
        result.index_add_(1, flat, source.reshape(batch, -1))
        return result.reshape(batch, rows, n)
    h = weight.shape[0]
    rows_by_unit = weight.reshape(h, channels, positions)
    if h <= SMALL_HEAD_ROWS:  # tiny per-position products: broadcasting beats batched matmul
        source = (rows_by_unit.unsqueeze(0).unsqueeze(-1) * local.unsqueeze(1)).sum(2)
    else:
        source = torch.einsum("hcp,bcpk->bhpk", rows_by_unit, local)
    result = values.new_zeros(batch, h, n)
    result.index_add_(2, index.reshape(-1), source.reshape(batch, h, -1))
    return result


def _add_blocks(
    hessian_flat: torch.Tensor, patches: Patches, coefficient: torch.Tensor, n: int
) -> None:
    """``H += J^T diag(c) J`` for one elementwise layer, as receptive-field blocks.

    ``coefficient`` is ``[B, k, C, H, W]``; each position's ``K x K`` block is
    ``L_p^T diag(c_p) L_p`` over the channels and is scattered into ``H`` at the
    position's input patch.
    """
    batch, scalars = coefficient.shape[:2]
    channels, height, width = patches.units
    positions, k = height * width, patches.patch
    if patches.factored is not None:
        # Local Jacobians scale[c, p] * K[c, :] (masked): the blocks are ONE product of
        # the per-position channel weights with the kernel's per-channel outer products.
        kernel, scale = patches.factored
        if scale is not None:
            coefficient = coefficient * (scale * scale).unsqueeze(1)
        flat_kernel = kernel.reshape(channels, k)
        support = _support(flat_kernel) if patches.holes else None
        if support is not None:
            flat_kernel, k = flat_kernel[:, list(support)], len(support)
        outer = (flat_kernel.unsqueeze(2) * flat_kernel.unsqueeze(1)).reshape(channels, k * k)
        per_position = coefficient.reshape(batch * scalars, channels, positions).transpose(1, 2)
        blocks = (per_position @ outer).reshape(batch * scalars, positions, k, k)
        blocks = blocks.mul_(patches.block_mask(support))
    else:
        values = patches.values
        local = values.reshape(values.shape[0], channels, positions, k)
        support = _support(local) if patches.holes else None
        if support is not None:
            local = local[..., list(support)]
        weighted = coefficient.reshape(batch, scalars, channels, positions, 1) * local.unsqueeze(1)
        blocks = torch.einsum("bscpi,bcpj->bspij", weighted, local.expand(batch, -1, -1, -1))
    hessian_flat.index_add_(1, patches.pairs(n, support), blocks.reshape(batch * scalars, -1))


def _tail_backward(
    network: Network, record: _Forward, gradient: torch.Tensor, curvature: _ActivationHessian | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient and curvature down the tail, stopping at the first Linear's output.

    ``curvature`` (None for a Jacobian, which needs none) is updated in place.

    Returns the gradient at the first Linear's output ``[B, k, h]`` (at the head's
    output when the tail is empty) and that Linear's weight (None when the tail is
    empty); ``_head_backward`` takes the gradient on through it only when it is needed.
    """
    tail, inputs = network.tail, record.tail_inputs
    # Each layer's output is the next one's input; these are those of tail[1:].
    outputs = [*inputs[1:], record.output][1:]
    for layer, layer_input, layer_output in zip(
        reversed(tail[1:]), reversed(inputs[1:]), reversed(outputs), strict=True
    ):
        if isinstance(layer, nn.Linear):
            if curvature is not None:
                curvature.through_linear(layer.weight)
            gradient = gradient @ layer.weight
        elif isinstance(layer, nn.BatchNorm1d):
            factor = _batchnorm_scale(layer, (layer_input.shape[1], 1, 1)).reshape(1, 1, -1)
            if curvature is not None:
                curvature.scale(factor)
            gradient = gradient * factor
        elif isinstance(layer, ELEMENTWISE):
            first, second = elementwise_derivatives(layer, layer_input, layer_output)
            first = first.unsqueeze(1)
            if curvature is not None:
                curvature.scale(first)
                if second is not None:
                    curvature.add_diagonal(gradient * second.unsqueeze(1))
            gradient = gradient * first
    if not tail:
        return gradient, None
    first_linear = tail[0]
    assert isinstance(first_linear, (nn.Linear, _PooledLinear))
    return gradient, first_linear.weight


def _top(
    output: torch.Tensor,
    indices: torch.Tensor | None,
    objective: ObjectiveFn | None,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, _ActivationHessian]:
    """Gradient ``[B, k, m]`` and curvature of the selected scalars w.r.t. the output."""
    batch = output.shape[0]
    if objective is None:
        assert indices is not None
        eye = torch.eye(output.shape[1], dtype=output.dtype, device=output.device)
        return eye[indices.to(output.device)].expand(batch, -1, -1), _ActivationHessian()
    # Autograd on the batch, then all m Hessian rows in one batched backward: a third of
    # the time of vmap(grad) plus vmap(hessian) (~1 ms against ~3.5 ms for m = 10 on one
    # CPU; that overhead was a third of a small CNN's whole Hessian).
    with torch.enable_grad():
        at = output.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(vmap(objective)(at, targets).sum(), at, create_graph=True)
        if not gradient.requires_grad:  # a linear objective: no curvature of its own
            return gradient.detach().unsqueeze(1), _ActivationHessian()
        m = at.shape[1]
        basis = torch.eye(m, dtype=at.dtype, device=at.device).unsqueeze(1)
        (rows,) = torch.autograd.grad(
            gradient, at, basis.expand(m, batch, m), is_grads_batched=True
        )
    dense = rows.transpose(0, 1).unsqueeze(1)  # [B, 1, m, m], row i: d gradient_i / d o
    return gradient.detach().unsqueeze(1), _ActivationHessian(dense=dense)


# Non-linearities with no second derivative anywhere they are differentiable.
PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)

# A head without curvature pulls the first Linear's rows back by a backward pass when
# there are at most this many (measured on a ReLU/max-pool CNN at 28x28, 10 rows, one
# CPU: 0.6 ms against 2.7 ms for its patches).
BACKWARD_ROWS = SMALL_HEAD_ROWS


def _pull_back_by_rows(network: Network) -> bool:
    """Whether ``A = W_1 J_u`` is better had by a backward pass of ``W_1``'s rows than
    from patches: when the head adds no curvature term of its own (its non-linearities
    are piecewise linear), so its patches would serve ``A`` only, and ``W_1`` has few
    rows. Not for a head without windows (an MLP's is empty): its patches cost nothing."""
    head = network.head
    if (
        not network.tail
        or not any(isinstance(layer, SPATIAL) for layer in head)
        or any(
            isinstance(layer, ELEMENTWISE) and not isinstance(layer, PIECEWISE_LINEAR)
            for layer in head
        )
    ):
        return False
    first = network.tail[0]
    assert isinstance(first, (nn.Linear, _PooledLinear))
    return first.out_features <= BACKWARD_ROWS


def hessian_of(
    network: Network,
    x: torch.Tensor,
    *,
    indices: torch.Tensor | None,
    objective: ObjectiveFn | None,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input Hessians ``[B, k, n, n]`` of ``k`` raw outputs or one objective, and the
    model's output ``[B, m]``."""
    batch, n = x.shape[0], x[0].numel()
    pulled_by_rows = _pull_back_by_rows(network)
    record = forward(network, x, track_patches=not pulled_by_rows)
    gradient, curvature = _top(record.output, indices, objective, targets)
    scalars = gradient.shape[1]
    gradient, first_weight = _tail_backward(network, record, gradient, curvature)
    result = None
    if not curvature.is_zero:
        if record.patches is not None:
            pulled = _pulled_back(record.patches, first_weight, n)
        else:  # the rows of the first Linear, one backward pass through the head
            assert first_weight is not None
            rows = first_weight.shape[0]
            eye = torch.eye(rows, dtype=x.dtype, device=x.device).expand(batch, -1, -1)
            by_rows, _ = _head_backward(network, record, eye, first_weight)
            assert by_rows is not None
            pulled = by_rows
        result = curvature.sandwich(pulled)
    if result is None or result.shape[0] != batch:
        zeros = x.new_zeros(batch, scalars, n, n)
        result = zeros if result is None else zeros + result
    if pulled_by_rows:  # no curvature in the head: nothing more to add
        return result, record.output
    _, at_outputs = _head_backward(network, record, gradient, first_weight, to_input=False)
    flat = result.reshape(batch * scalars, n * n)
    for patches, derivatives, upstream in zip(
        record.head_patches, record.head_derivatives, at_outputs, strict=True
    ):
        if patches is None or upstream is None or derivatives is None:
            continue
        second = derivatives[1]
        if second is None:
            continue  # piecewise linear: no curvature of its own
        units = patches.units
        coefficient = upstream.reshape(batch, scalars, *units) * second.reshape(batch, 1, *units)
        _add_blocks(flat, patches, coefficient, n)
    return flat.reshape(batch, scalars, n, n), record.output


def jacobian_of(
    network: Network, x: torch.Tensor, *, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input Jacobians ``[B, k, n]`` of the selected raw outputs, and the output ``[B, m]``,
    by one batched backward pass of the ``k`` one-hot rows."""
    record = forward(network, x, track_patches=False)
    gradient, _ = _top(record.output, indices, None, x.new_zeros(x.shape[0]))
    gradient, first_weight = _tail_backward(network, record, gradient, None)
    rows, _ = _head_backward(network, record, gradient, first_weight)
    assert rows is not None
    return rows, record.output
