"""Scale and threshold initialization of activation binarizers from data (``ctrl.initialize(loader)``).

Statistics of every activation binarizer's *float* input are collected over
``initializer.range.num_init_samples`` samples (binarizers pass their input
through while observing; weights binarize if the current stage says so).
Then, per binarizer:

``S`` (``initializer.range.type``; NNCF's range-init names):
- ``percentile`` (default): the ``max_percentile`` (99.9) percentile of all
  input values: NNCF's lazy init takes the smallest of the top 0.1% values;
- ``mean_percentile``: the mean over batches of the per-batch percentile;
- ``min_max``: the largest value; ``mean_min_max``: the mean of per-batch maxima.

``T_c = tau_c * S`` (``initializer.threshold.type``, fxcompress's key):
- ``mean_matching`` (default): ``T_c`` is the ``1 - m_c / S`` quantile of
  channel ``c``, with ``m_c`` the mean of the channel clipped to ``[0, S]``, so
  that the binarized channel keeps its mean: ``E[out_c] = S * P(x_c > T_c) = m_c``.
  Channels keep firing in proportion to their activity, and the next layer's
  BatchNorm sees the means it was trained with; a fixed ``S / 2`` turns most
  channels of small activity off (their values lie far below a scale set by
  the largest values of the tensor);
- ``half``: ``T_c = S / 2`` (NNCF's initial threshold; it minimizes each
  element's binarization error ``|x - out|`` for a given ``S``).

``tau_c`` is kept in ``[0.01, 0.99]``. Values are subsampled per channel (a uniform
sample of at most ``_POOL_PER_CHANNEL`` values per channel) for quantiles, so memory stays
bounded on large inputs. (``initializer.batchnorm_adaptation`` then runs
``fxcompress.batchnorm.adapt_batchnorm`` in the current stage: the controller does that.)
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from fxcompress.data import CalibrationData

from .modules import ActivationBinarizer

__all__ = ["RANGE_TYPES", "THRESHOLD_TYPES", "initialize_binarizers", "BinarizerStatistics", "quantile"]

RANGE_TYPES = ("percentile", "mean_percentile", "min_max", "mean_min_max")
THRESHOLD_TYPES = ("mean_matching", "half")
TAU_RANGE = (0.01, 0.99)
_POOL_PER_CHANNEL = 4096


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile (0..1) of a flat tensor by linear interpolation, any size (kthvalue based)."""
    values = values.reshape(-1).float()
    n = values.numel()
    pos = q * (n - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    a = values.kthvalue(lo + 1).values
    if hi == lo:
        return a
    b = values.kthvalue(hi + 1).values
    return a + (b - a) * (pos - lo)


class BinarizerStatistics:
    """What one binarizer saw: per-batch extremes/percentiles and a per-channel uniform subsample.

    The subsample keeps every value until it holds ``_POOL_PER_CHANNEL`` per
    channel; then it is thinned to half and later batches are sampled at the
    halved rate, and so on, so every observed value has the same chance to be in it.
    """

    def __init__(self, percentile: float, generator: torch.Generator):
        self.percentile = percentile
        self.generator = generator
        self.batch_max: list[float] = []
        self.batch_percentile: list[float] = []
        self.pool: list[torch.Tensor] = []    # [C, k] pieces
        self.rate = 1.0

    def _take(self, values: torch.Tensor, fraction: float) -> torch.Tensor:
        n = values.shape[1]
        k = n if fraction >= 1.0 else int(round(n * fraction))
        if k >= n:
            return values
        idx = torch.randperm(n, generator=self.generator)[:k].to(values.device)
        return values[:, idx]

    @torch.no_grad()
    def observe(self, x: torch.Tensor):
        x = x.detach().float()
        channels = x.shape[1]
        per_channel = x.transpose(0, 1).reshape(channels, -1)
        self.batch_max.append(float(per_channel.max()))
        self.batch_percentile.append(float(quantile(per_channel, self.percentile / 100.0)))
        self.pool.append(self._take(per_channel, self.rate).cpu())
        while sum(p.shape[1] for p in self.pool) > _POOL_PER_CHANNEL:
            self.pool = [self._take(torch.cat(self.pool, dim=1), 0.5)]
            self.rate /= 2

    @property
    def observed(self) -> bool:
        return bool(self.batch_max)

    def scale(self, range_type: str) -> float:
        if range_type == "min_max":
            return max(self.batch_max)
        if range_type == "mean_min_max":
            return sum(self.batch_max) / len(self.batch_max)
        if range_type == "mean_percentile":
            return sum(self.batch_percentile) / len(self.batch_percentile)
        return float(quantile(torch.cat(self.pool, dim=1), self.percentile / 100.0))

    def relative_threshold(self, scale: float, threshold_type: str) -> torch.Tensor:
        pool = torch.cat(self.pool, dim=1)
        if threshold_type == "half":
            return torch.full((pool.shape[0],), 0.5)
        mean = pool.clamp(0.0, scale).mean(dim=1)
        fire = (mean / scale).clamp(0.0, 1.0)  # the fraction of elements that should be above T
        taus = torch.stack([quantile(pool[c], float(1.0 - fire[c])) for c in range(pool.shape[0])]) / scale
        return taus.clamp(*TAU_RANGE)


@torch.no_grad()
def initialize_binarizers(gm: nn.Module, binarizers: list[ActivationBinarizer], data: CalibrationData,
                          initializer: dict, seed: int = 0):
    """Set ``S`` and ``T`` of every binarizer from statistics of its float input (see module docstring)."""
    rng = initializer["range"]
    num_samples = rng["num_init_samples"]
    if num_samples > 0:
        generator = torch.Generator().manual_seed(seed)
        stats = {id(b): BinarizerStatistics(rng["params"]["max_percentile"], generator)
                 for b in binarizers}
        hooks, enabled = [], {}
        for b in binarizers:
            enabled[id(b)] = b.enabled
            b.enabled = False  # observe the float input; the module passes it through
            hooks.append(b.register_forward_pre_hook(lambda m, args: stats[id(m)].observe(args[0])))
        try:
            data.run(gm, num_samples, progress="binarization: activation statistics")
        finally:
            for h in hooks:
                h.remove()
            for b in binarizers:
                b.enabled = enabled[id(b)]
        unseen = [b for b in binarizers if not stats[id(b)].observed]
        if unseen:
            warnings.warn(f"binarization: {len(unseen)} activation binarizer(s) saw no data during initialize "
                          f"(a branch the data never takes?); they keep their scale and threshold", stacklevel=3)
        for b in binarizers:
            st = stats[id(b)]
            if not st.observed:
                continue
            scale = st.scale(rng["type"])
            if not math.isfinite(scale) or scale <= 0:
                scale = 1.0  # an input that never goes above 0 (dead): any positive scale binarizes it to 0
            b.set_scale_threshold(scale, st.relative_threshold(scale, initializer["threshold"]["type"]))
