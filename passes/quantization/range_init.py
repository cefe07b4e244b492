"""Range initialization of quantizers.

Range types (NNCF's names and semantics, ``initializer.range.type``):

- ``mixed_min_max`` (default): activations per tensor take the *mean over samples*
  of the per-sample maximum (and, when asymmetric, of the per-sample minimum;
  symmetric ranges use the absolute maximum); per-channel quantizers and
  weights take the minimum of minima / maximum of maxima;
- ``min_max``: global minimum and maximum over all samples;
- ``mean_min_max``: mean over batches of each batch's minimum and maximum;
- ``threesigma``: median +- 3 median absolute deviations of the observed values;
- ``percentile``: the ``min_percentile`` / ``max_percentile`` percentiles of all
  observed values (defaults 0.1 and 99.9);
- ``mean_percentile``: those percentiles per sample, averaged over samples;
- ``mse``: the range minimizing the mean squared error of fake quantization
  over the observed values (a search over shrunk ranges).

Weights get their ranges from the weights themselves (one "sample", per output
channel when per-channel), no data needed. Activations are observed with forward
pre-hooks on the quantizer modules while the quantizers are disabled (so all
statistics come from the float model in one pass over ``num_init_samples``).
Statistics that need the values themselves (percentiles, median, MSE) keep a
bounded random subsample (``RESERVOIR_SIZE`` values per quantizer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fxcompress.ops import reference
from fxcompress.quantizers import QuantSpec, range_to_qparams
from fxcompress.scopes import ScopeSet

__all__ = ["RANGE_TYPES", "RangeInitConfig", "RangeInitRules", "RangeCollector", "weight_range",
           "RESERVOIR_SIZE"]

RANGE_TYPES = ("mixed_min_max", "min_max", "mean_min_max", "threesigma", "percentile", "mean_percentile",
               "mse")
DEFAULT_NUM_INIT_SAMPLES = 256
DEFAULT_MIN_PERCENTILE = 0.1
DEFAULT_MAX_PERCENTILE = 99.9
RESERVOIR_SIZE = 1 << 20
_NEEDS_VALUES = frozenset({"threesigma", "percentile", "mse"})


@dataclass(frozen=True)
class RangeInitConfig:
    type: str = "mixed_min_max"
    num_init_samples: int = DEFAULT_NUM_INIT_SAMPLES
    min_percentile: float = DEFAULT_MIN_PERCENTILE
    max_percentile: float = DEFAULT_MAX_PERCENTILE

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RangeInitConfig":
        d = dict(d or {})
        params = dict(d.get("params", {}))
        return cls(type=d.get("type", "mixed_min_max"),
                   num_init_samples=int(d.get("num_init_samples", DEFAULT_NUM_INIT_SAMPLES)),
                   min_percentile=float(params.get("min_percentile",
                                                   d.get("min_percentile", DEFAULT_MIN_PERCENTILE))),
                   max_percentile=float(params.get("max_percentile",
                                                   d.get("max_percentile", DEFAULT_MAX_PERCENTILE))))

    def to_dict(self) -> dict:
        out = {"type": self.type, "num_init_samples": self.num_init_samples}
        if "percentile" in self.type:
            out["min_percentile"], out["max_percentile"] = self.min_percentile, self.max_percentile
        return out


@dataclass(frozen=True)
class _RangeRule:
    config: RangeInitConfig
    group: str | None
    target_scopes: ScopeSet
    ignored_scopes: ScopeSet

    def matches(self, group: str, scopes: tuple[str, ...]) -> bool:
        if self.group is not None and self.group != group:
            return False
        paths = [s for s in scopes if s]
        if self.ignored_scopes and any(self.ignored_scopes.matches(p) for p in paths):
            return False
        return not self.target_scopes or any(self.target_scopes.matches(p) for p in paths)


class RangeInitRules:
    """``initializer.range``: one config for all quantizers, or a list of per-scope configs.

    A list entry applies to the quantizers of its ``target_quantizer_group`` whose
    scopes match its ``target_scopes`` and none of its ``ignored_scopes``; the
    first matching entry wins; a quantizer no entry matches gets the defaults.
    A ``scope_overrides`` entry with its own ``initializer.range`` wins over both.
    """

    def __init__(self, spec: Mapping | list | None):
        self.rules: list[_RangeRule] = []
        self.default = RangeInitConfig()
        if isinstance(spec, list):
            for i, item in enumerate(spec):
                self.rules.append(_RangeRule(
                    RangeInitConfig.from_dict(item), item.get("target_quantizer_group"),
                    ScopeSet(item.get("target_scopes"), f"initializer.range[{i}].target_scopes"),
                    ScopeSet(item.get("ignored_scopes"), f"initializer.range[{i}].ignored_scopes")))
        elif spec is not None:
            self.default = RangeInitConfig.from_dict(spec)

    def scope_sets(self) -> list[ScopeSet]:
        return [s for r in self.rules for s in (r.target_scopes, r.ignored_scopes) if s]

    def for_quantizer(self, group: str, scopes: tuple[str, ...], override: Mapping | None = None
                      ) -> RangeInitConfig:
        if override and "initializer" in override and "range" in override["initializer"]:
            return RangeInitConfig.from_dict(override["initializer"]["range"])
        for rule in self.rules:
            if rule.matches(group, scopes):
                return rule.config
        return self.default

    @property
    def max_samples(self) -> int:
        return max([self.default.num_init_samples] + [r.config.num_init_samples for r in self.rules])


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``[C, N]`` view of ``x``: C = size of ``axis`` (1 when per tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile (q in [0, 1]) of a 2-D tensor, by order statistic (no size limit)."""
    n = v.shape[-1]
    k = int(round(q * (n - 1))) + 1
    return v.kthvalue(min(max(k, 1), n), dim=-1).values


class RangeCollector:
    """Observes the tensors a quantizer sees and turns them into a ``(low, high)`` range."""

    def __init__(self, config: RangeInitConfig, spec: QuantSpec, *, is_weight: bool = False, seed: int = 0):
        self.config = config
        self.spec = spec
        self.axis = spec.axis if spec.per_channel else None
        self.is_weight = is_weight
        self.symmetric = spec.mode == "symmetric"
        self.lows: list[torch.Tensor] = []
        self.highs: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.num_values = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.per_sample: bool | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        x = x.detach().float()
        if x.numel() == 0:
            return
        self.updates += 1
        t = self.config.type
        if self.per_sample is None:
            self.per_sample = (not self.is_weight and self.axis is None and x.dim() > 1
                               and t in ("mixed_min_max", "mean_percentile"))
        if self.per_sample:
            rows = x.reshape(x.shape[0], -1)
            if t == "mixed_min_max":
                self.lows.append(rows.amin(dim=1))
                self.highs.append(rows.amax(dim=1))
            else:
                self.lows.append(_quantile(rows, self.config.min_percentile / 100))
                self.highs.append(_quantile(rows, self.config.max_percentile / 100))
            return
        v = _channels_first(x, self.axis)
        if t in _NEEDS_VALUES:
            self._keep(v)
        elif t == "mean_percentile":  # per channel or weights: percentiles of this batch
            self.lows.append(_quantile(v, self.config.min_percentile / 100))
            self.highs.append(_quantile(v, self.config.max_percentile / 100))
        else:  # min_max, mean_min_max, mixed_min_max per channel
            self.lows.append(v.amin(dim=1))
            self.highs.append(v.amax(dim=1))

    def _keep(self, v: torch.Tensor):
        cap_per_channel = max(RESERVOIR_SIZE // v.shape[0], 256)
        if v.shape[1] > cap_per_channel:
            idx = torch.randint(v.shape[1], (cap_per_channel,), generator=self.generator).to(v.device)
            v = v[:, idx]
        self.values.append(v)
        self.num_values += v.shape[1]
        if self.num_values > 2 * cap_per_channel:  # subsample what was kept so far
            allv = torch.cat(self.values, dim=1)
            idx = torch.randperm(allv.shape[1], generator=self.generator)[:cap_per_channel].to(allv.device)
            self.values, self.num_values = [allv[:, idx]], cap_per_channel

    def range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(low, high)``, per channel or of one element; None when nothing was observed."""
        if self.updates == 0:
            return None
        t = self.config.type
        if t in _NEEDS_VALUES:
            v = torch.cat(self.values, dim=1)
            if t == "percentile":
                low = _quantile(v, self.config.min_percentile / 100)
                high = _quantile(v, self.config.max_percentile / 100)
            elif t == "threesigma":
                median = v.median(dim=1).values
                mad = (v - median[:, None]).abs().median(dim=1).values
                low, high = median - 3 * mad, median + 3 * mad
            else:
                low, high = mse_range(v, self.spec)
            return self._symmetrize(low, high)
        if self.per_sample:  # one entry per sample, batches of any size
            lows, highs = torch.cat(self.lows).reshape(-1, 1), torch.cat(self.highs).reshape(-1, 1)
        else:               # one entry per batch (per channel)
            lows, highs = torch.stack(self.lows), torch.stack(self.highs)
        if t == "min_max" or (t == "mixed_min_max" and not self.per_sample):
            return self._symmetrize(lows.amin(dim=0), highs.amax(dim=0))
        # means over samples (mixed_min_max per tensor, mean_percentile) or batches (mean_min_max)
        if self.symmetric:
            absmax = torch.maximum(lows.abs(), highs.abs()).mean(dim=0)
            return self._symmetrize(-absmax, absmax, already_abs=True)
        return lows.mean(dim=0), highs.mean(dim=0)

    def _symmetrize(self, low, high, already_abs=False):
        """Symmetric ranges cover ``[-m, m]`` (signed) or ``[0, m]`` (unsigned)."""
        if not self.symmetric:
            return low, high
        m = high if already_abs else torch.maximum(low.abs(), high.abs())
        if self.spec.signed:
            return -m, m
        return torch.zeros_like(m), m


def _mse(v: torch.Tensor, spec: QuantSpec, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    scale, zp = range_to_qparams(spec, low, high)
    qmin, qmax = spec.quant_range
    deq = reference.fake_quantize(v, scale, zp, qmin, qmax, axis=0)  # the op's own definition, per row
    return (deq - v).pow(2).mean(dim=1)


@torch.no_grad()
def mse_range(v: torch.Tensor, spec: QuantSpec, steps: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row range ``[low, high]`` with the least fake-quantization MSE over the values ``v`` [C, N].

    Candidates shrink the observed range by factors from 1 down to 1/100
    (geometric); asymmetric ranges then refine each end separately.
    """
    low0, high0 = v.amin(dim=1), v.amax(dim=1)
    if spec.mode == "symmetric":
        m = torch.maximum(low0.abs(), high0.abs()) if spec.signed else high0.clamp_min(0)
        low0, high0 = -m, m
    factors = torch.logspace(0, -2, steps, device=v.device)

    def search(candidates):
        best_err = torch.full_like(low0, float("inf"))
        best_low, best_high = low0.clone(), high0.clone()
        for low, high in candidates:
            err = _mse(v, spec, low, high)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_low = torch.where(better, low, best_low)
            best_high = torch.where(better, high, best_high)
        return best_low, best_high

    low, high = search((low0 * f, high0 * f) for f in factors)
    if spec.mode == "asymmetric":
        fine = torch.linspace(0.5, 1.5, 21, device=v.device)
        high = search((low, (high * f).minimum(high0)) for f in fine)[1]
        low = search(((low * f).maximum(low0), high) for f in fine)[0]
    return low, high


def weight_range(weight: torch.Tensor, spec: QuantSpec, config: RangeInitConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of a weight quantizer from the weight tensor itself (per channel when per-channel)."""
    collector = RangeCollector(config, spec, is_weight=True)
    collector.update(weight)
    return collector.range()
