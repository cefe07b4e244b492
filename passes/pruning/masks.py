"""The module filter pruning inserts while fine-tuning: a 0/1 vector along one axis.

``ChannelMask`` sits on a weight edge (``conv1_weight -> conv1_weight_mask ->
conv2d``: zeroes pruned filters), on a bias edge (``conv1_bias_mask``), after a
BatchNorm (``bn1_output_mask``: zeroes its pruned channels whatever gamma and
beta are) and, where the analysis cannot prove pruned channels are already zero,
before a consumer (``layer2_0_conv1_input_mask``). The original weights stay
trainable parameters; the mask is a buffer, so it travels in ``gm.state_dict()``.

``straight_through=True`` (``zero_grad: false`` in the config, then on every
mask of the model) keeps the forward value ``x * mask`` but passes the gradient
unmasked, so pruned filters get the gradient the unmasked model would give them,
keep learning, and can come back when the masks are recomputed at the next epoch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ChannelMask", "ChannelMaskedLayerNorm", "is_channel_mask"]


class ChannelMask(nn.Module):
    """``x * mask`` with ``mask`` (shape ``[C]``) broadcast along ``axis`` of a ``ndim``-dimensional input."""

    def __init__(self, num_channels: int, axis: int, ndim: int, straight_through: bool = False):
        super().__init__()
        if not 0 <= axis < ndim:
            raise ValueError(f"axis {axis} is not an axis of a {ndim}-d tensor")
        self.register_buffer("mask", torch.ones(num_channels))
        self.axis = axis
        self.ndim = ndim
        self.straight_through = straight_through
        # Precomputed so forward has no shape queries (the graph re-traces with plain fx).
        self.view_shape = (num_channels,) + (1,) * (ndim - axis - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.view(self.view_shape).to(x.dtype)
        if self.straight_through:
            return x - (x * (1 - mask)).detach()
        return x * mask

    @torch.no_grad()
    def set(self, keep: torch.Tensor):
        """Set the mask from a boolean keep vector (our own buffer: no parameter is touched)."""
        self.mask.copy_(keep.to(self.mask.dtype).to(self.mask.device))

    def extra_repr(self) -> str:
        kept = int(self.mask.sum().item())
        st = ", straight_through" if self.straight_through else ""
        return f"axis={self.axis}, kept={kept}/{self.mask.numel()}{st}"


def is_channel_mask(module) -> bool:
    return isinstance(module, ChannelMask)


class ChannelMaskedLayerNorm(nn.Module):
    """``F.layer_norm`` over the last axis with statistics of the kept channels only, zero at pruned ones.

    Filter pruning puts it in place of a LayerNorm over a pruned channel axis while fine-tuning
    (``norm.weight`` / ``norm.bias`` stay the user's parameters, passed in by the graph), so the
    masked model computes what the folded one (a LayerNorm over the kept channels) will: a plain
    LayerNorm with zeros at pruned channels would average over them too.
    """

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.register_buffer("mask", torch.ones(num_channels))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if bool(self.mask.all()):
            return F.layer_norm(x, (self.mask.numel(),), weight, bias, self.eps)
        mask = self.mask.to(x.dtype)
        kept = mask.sum()
        mean = (x * mask).sum(-1, keepdim=True) / kept
        centered = (x - mean) * mask
        var = (centered * centered).sum(-1, keepdim=True) / kept
        y = centered * torch.rsqrt(var + self.eps)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y * mask

    @torch.no_grad()
    def set(self, keep: torch.Tensor):
        self.mask.copy_(keep.to(self.mask.dtype).to(self.mask.device))

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum().item())}/{self.mask.numel()}, eps={self.eps}"
