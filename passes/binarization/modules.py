"""Binarizer modules: what the binarization pass inserts in front of every binarized convolution.

``conv2_weight -> conv2_weight_binarizer -> conv2d <- conv2_input_binarizer <- x``

- ``WeightBinarizer`` (on the weight edge): ``sign(w) * m`` with ``sign(0) = +1``,
  ``m = mean |w|`` per output channel (``mode="xnor"``, XNOR-Net) or over the
  whole tensor (``mode="dorefa"``), through the op library's ``xnor_binarize`` /
  ``dorefa_binarize`` (straight-through backward: the float weight trains).
  No parameters.
- ``ActivationBinarizer`` (on the input edge): ``S if x > T_c else 0`` per
  channel ``c`` (dim 1), through the op library's ``activation_binarize(x, S, tau)``
  with ``T_c = tau_c * S``. ``S`` and ``tau`` are functions of hidden trained
  parameters, as NNCF's ``ActivationBinarizationScaleThreshold``:

      S     = exp(log_scale)          log_scale: Parameter [1]
      tau_c = sigmoid(threshold_c)    threshold: Parameter [C] (logits)
      T_c   = tau_c * S

  The hidden parameters normalize the step size of an optimizer: a step on
  ``log_scale`` changes ``S`` by a *factor* whatever the activation range, and
  the threshold is relative to ``S`` and bounded in ``(0, S)``, so one learning
  rate fits every layer. The op's backward gives ``dL/dS`` counting the
  clipping error (``x > S``: 1) and the binarization error inside ``[0, S]``
  (``(out - x) / S``), i.e. PACT extended to binarization; autograd then chains
  through ``exp`` and ``sigmoid``.

Both carry ``enabled`` (a plain attribute, so tracers and ``torch.compile``
see a constant; the controller sets it from the staged schedule and saves
nothing of it: it is a function of the epoch). A disabled binarizer is an exact
identity. ``ActivationBinarizer.initialized`` is a buffer (checkpoints carry
it): an enabled binarizer that was never initialized (no ``ctrl.initialize``,
no checkpoint) sets ``S`` from its first training batch as NNCF does (the
99.9th percentile of the input).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fxcompress import ops
from fxcompress.gradients import scaled_gradient

__all__ = ["WeightBinarizer", "ActivationBinarizer", "BINARIZATION_MODES", "is_binarizer"]

BINARIZATION_MODES = ("xnor", "dorefa")
_MIN_SCALE = 1e-6
_TAU_LIMIT = 1e-4  # tau is kept in [1e-4, 1 - 1e-4] when set, so its logit stays finite


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_TAU_LIMIT, 1.0 - _TAU_LIMIT)
    return torch.log(p) - torch.log1p(-p)


class WeightBinarizer(nn.Module):
    """``forward(w) = xnor_binarize(w)`` or ``dorefa_binarize(w)`` when enabled, else ``w``."""

    def __init__(self, mode: str = "xnor"):
        super().__init__()
        if mode not in BINARIZATION_MODES:
            raise ValueError(f"binarization mode must be one of {BINARIZATION_MODES}, got {mode!r}")
        self.mode = mode
        self.enabled = False

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        return ops.xnor_binarize(w) if self.mode == "xnor" else ops.dorefa_binarize(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return self.binarize(w)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, enabled={self.enabled}"


class ActivationBinarizer(nn.Module):
    """``S if x > tau_c * S else 0`` with ``S = exp(log_scale)``, ``tau = sigmoid(threshold)``."""

    def __init__(self, num_channels: int, lr_multiplier: float | None = None):
        super().__init__()
        self.num_channels = int(num_channels)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.threshold = nn.Parameter(torch.zeros(self.num_channels))  # tau = 0.5: T = S / 2
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.lr_multiplier = lr_multiplier
        self.enabled = False

    # -- the trained quantities as functions of the hidden parameters --------------------------
    def scale(self) -> torch.Tensor:
        """``S`` (shape [1])."""
        return torch.exp(scaled_gradient(self.log_scale, self.lr_multiplier))

    def relative_threshold(self) -> torch.Tensor:
        """``tau`` in (0, 1) (shape [C]): the threshold as a fraction of ``S``."""
        return torch.sigmoid(scaled_gradient(self.threshold, self.lr_multiplier))

    @torch.no_grad()
    def absolute_threshold(self) -> torch.Tensor:
        """``T = tau * S`` per channel (shape [C]), as the op computes it (float32 product)."""
        return self.relative_threshold() * self.scale()

    @torch.no_grad()
    def set_scale_threshold(self, scale, relative_threshold=None):
        """Set ``S`` (> 0) and optionally ``tau`` (scalar or per channel, in (0, 1)); marks initialized.

        New tensors are assigned to ``.data`` (optimizers keep their references).
        """
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
            raise ValueError(f"activation binarizer scale must be one finite positive number, got {scale}")
        device = self.log_scale.device
        self.log_scale.data = torch.log(scale.clamp_min(_MIN_SCALE)).to(device).clone()
        if relative_threshold is not None:
            tau = torch.as_tensor(relative_threshold, dtype=torch.float32).reshape(-1).to(device)
            if tau.numel() not in (1, self.num_channels):
                raise ValueError(f"relative threshold needs 1 or {self.num_channels} values, got {tau.numel()}")
            self.threshold.data = _logit(tau.expand(self.num_channels)).clone()
        self.initialized = torch.ones((), dtype=torch.bool, device=self.initialized.device)

    @torch.no_grad()
    def _init_from_batch(self, x: torch.Tensor):
        """NNCF's lazy initialization: ``S`` = the smallest of the top 0.1% input values."""
        flat = x.detach().reshape(-1)
        k = max(1, round(flat.numel() * 0.001))
        value = flat.topk(k).values.min().float()
        self.set_scale_threshold(value if value > 0 else torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training and not bool(self.initialized):
            self._init_from_batch(x)
        return ops.activation_binarize(x, self.scale().to(x.dtype), self.relative_threshold().to(x.dtype))

    def extra_repr(self) -> str:
        s = math.exp(float(self.log_scale.detach()[0]))
        return f"channels={self.num_channels}, scale={s:.4g}, enabled={self.enabled}"


def is_binarizer(module: nn.Module) -> bool:
    return isinstance(module, (WeightBinarizer, ActivationBinarizer))
