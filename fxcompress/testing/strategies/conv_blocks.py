"""Image (NCHW) blocks and how they are drawn: conv+BN+activation, residual, merge (concat or
sum of branches), pooling, squeeze-excite, rare convs (Conv1d / Conv3d / ConvTranspose2d), and the
classifier head."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from .base import (ADD_FORMS, CAT_FORMS, FLATTEN_FORMS, MAX_CHANNELS, _act_str, _activate, _add,
                   _cat_channels, _flatten, _make_act, activations)

@dataclass(frozen=True)
class ConvSpec:
    """One Conv2d (optionally + BatchNorm2d + activation)."""

    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    groups: int
    bias: bool
    bn: bool
    act: str

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def __str__(self) -> str:
        g = ""
        if self.groups > 1:
            g = ",dw" if self.groups == self.in_ch else f",g{self.groups}"
        return (f"conv{self.kernel}x{self.kernel}({self.in_ch}->{self.out_ch},s{self.stride},"
                f"p{self.padding}{g}{',bias' if self.bias else ''})"
                f"{'+bn' if self.bn else ''}{_act_str(self.act)}")


class ConvBNAct(nn.Module):
    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, spec.padding,
                              groups=spec.groups, bias=spec.bias)
        self.bn = nn.BatchNorm2d(spec.out_ch) if spec.bn else None
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return _activate(x, self.act_kind, self.act)


@dataclass(frozen=True)
class ConvBlockSpec:
    conv: ConvSpec

    def build(self) -> nn.Module:
        return ConvBNAct(self.conv)

    def __str__(self) -> str:
        return str(self.conv)


@dataclass(frozen=True)
class ResidualSpec:
    """body convs + shortcut (identity when ``shortcut`` is None), add, activation."""

    body: tuple[ConvSpec, ...]
    shortcut: ConvSpec | None
    add: str
    act: str

    def build(self) -> nn.Module:
        return ResidualBlock(self)

    def __str__(self) -> str:
        sc = "identity" if self.shortcut is None else str(self.shortcut)
        return (f"residual(body=[{', '.join(map(str, self.body))}], shortcut={sc}, "
                f"add='{self.add}'){_act_str(self.act)}")


class ResidualBlock(nn.Module):
    def __init__(self, spec: ResidualSpec):
        super().__init__()
        self.body = nn.Sequential(*(ConvBNAct(c) for c in spec.body))
        self.shortcut = ConvBNAct(spec.shortcut) if spec.shortcut is not None else None
        self.add_form = spec.add
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.body(x)
        out = _add(out, identity, self.add_form)
        return _activate(out, self.act_kind, self.act)


@dataclass(frozen=True)
class MergeSpec:
    """Parallel branches of one input, merged by channel concat or by sum.

    Branch entries are a :class:`ConvSpec`, ``"identity"``, ``"maxpool3"`` or
    ``"avgpool3"`` (3x3, stride 1, pad 1)."""

    branches: tuple[Any, ...]
    merge: str  # "cat" or "add"
    form: str   # a CAT_FORMS or ADD_FORMS entry
    act: str

    def build(self) -> nn.Module:
        return MergeBlock(self)

    def __str__(self) -> str:
        return (f"merge_{self.merge}('{self.form}', branches=[{', '.join(map(str, self.branches))}])"
                f"{_act_str(self.act)}")


class MergeBlock(nn.Module):
    def __init__(self, spec: MergeSpec):
        super().__init__()
        kinds = []
        mods = []
        for b in spec.branches:
            if isinstance(b, ConvSpec):
                kinds.append("module")
                mods.append(ConvBNAct(b))
            elif b == "identity":
                kinds.append("identity")
            elif b == "maxpool3":
                kinds.append("module")
                mods.append(nn.MaxPool2d(3, 1, 1))
            elif b == "avgpool3":
                kinds.append("module")
                mods.append(nn.AvgPool2d(3, 1, 1))
            else:
                raise ValueError(f"unknown branch {b!r}")
        self.kinds = tuple(kinds)
        self.branches = nn.ModuleList(mods)
        self.merge = spec.merge
        self.form = spec.form
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        j = 0
        for kind in self.kinds:
            if kind == "identity":
                outs.append(x)
            else:
                outs.append(self.branches[j](x))
                j += 1
        if self.merge == "cat":
            y = _cat_channels(outs, self.form)
        else:
            form = self.form
            y = reduce(lambda a, b: _add(a, b, "+" if form == "+=" else form), outs)
        return _activate(y, self.act_kind, self.act)


POOL_KINDS = ("maxpool2", "avgpool2", "maxpool3s2p1", "avgpool3s2p1", "adaptive_avg_half",
              "adaptive_max_half")


@dataclass(frozen=True)
class PoolSpec:
    kind: str
    functional: bool
    out_hw: tuple[int, int]

    def build(self) -> nn.Module:
        return PoolBlock(self)

    def __str__(self) -> str:
        return f"{self.kind}({'functional' if self.functional else 'module'})"


def _pool_out(kind: str, h: int, w: int) -> tuple[int, int]:
    if kind in ("maxpool2", "avgpool2"):
        return h // 2, w // 2
    if kind in ("maxpool3s2p1", "avgpool3s2p1"):
        return (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return max(1, h // 2), max(1, w // 2)


class PoolBlock(nn.Module):
    def __init__(self, spec: PoolSpec):
        super().__init__()
        self.kind = spec.kind
        self.functional = spec.functional
        self.out_hw = spec.out_hw
        self.pool: nn.Module | None = None
        if not spec.functional:
            self.pool = {
                "maxpool2": lambda: nn.MaxPool2d(2),
                "avgpool2": lambda: nn.AvgPool2d(2),
                "maxpool3s2p1": lambda: nn.MaxPool2d(3, 2, 1),
                "avgpool3s2p1": lambda: nn.AvgPool2d(3, 2, 1),
                "adaptive_avg_half": lambda: nn.AdaptiveAvgPool2d(spec.out_hw),
                "adaptive_max_half": lambda: nn.AdaptiveMaxPool2d(spec.out_hw),
            }[spec.kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            return self.pool(x)
        if self.kind == "maxpool2":
            return F.max_pool2d(x, 2)
        if self.kind == "avgpool2":
            return F.avg_pool2d(x, 2)
        if self.kind == "maxpool3s2p1":
            return F.max_pool2d(x, 3, 2, 1)
        if self.kind == "avgpool3s2p1":
            return F.avg_pool2d(x, 3, 2, 1)
        if self.kind == "adaptive_avg_half":
            return F.adaptive_avg_pool2d(x, self.out_hw)
        return F.adaptive_max_pool2d(x, self.out_hw)


@dataclass(frozen=True)
class SESpec:
    """Squeeze-excite: x * gate(conv1x1(act(conv1x1(pool(x)))))."""

    channels: int
    reduced: int
    pool: str   # "F.adaptive_avg_pool2d" or "mean"
    act: str
    gate: str   # "nn.Sigmoid", "torch.sigmoid", "F.hardsigmoid"
    mul: str    # "*" or "torch.mul"

    def build(self) -> nn.Module:
        return SEBlock(self)

    def __str__(self) -> str:
        return (f"squeeze_excite({self.channels}->{self.reduced}->{self.channels}, pool={self.pool}, "
                f"act={self.act}, gate={self.gate}, mul='{self.mul}')")


class SEBlock(nn.Module):
    def __init__(self, spec: SESpec):
        super().__init__()
        self.fc1 = nn.Conv2d(spec.channels, spec.reduced, 1)
        self.fc2 = nn.Conv2d(spec.reduced, spec.channels, 1)
        self.pool = spec.pool
        self.act_kind = spec.act
        self.act = _make_act(spec.act)
        self.gate_kind = spec.gate
        self.gate = nn.Sigmoid() if spec.gate == "nn.Sigmoid" else None
        self.mul = spec.mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            s = x.mean((2, 3), keepdim=True)
        else:
            s = F.adaptive_avg_pool2d(x, 1)
        s = _activate(self.fc1(s), self.act_kind, self.act)
        s = self.fc2(s)
        if self.gate is not None:
            s = self.gate(s)
        elif self.gate_kind == "torch.sigmoid":
            s = torch.sigmoid(s)
        else:
            s = F.hardsigmoid(s)
        if self.mul == "torch.mul":
            return torch.mul(x, s)
        return x * s


@dataclass(frozen=True)
class RareConvSpec:
    """A Conv1d / Conv3d / ConvTranspose2d inside an image network.

    ``conv1d``: ``x.flatten(2)`` -> Conv1d over H*W -> [BatchNorm1d] -> view back.
    ``conv3d``: ``x.unsqueeze(2)`` -> Conv3d with kernel (1, k, k) -> [BatchNorm3d]
    -> ``squeeze(2)``.  ``conv_transpose2d``: ConvTranspose2d -> [BatchNorm2d]."""

    op: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    output_padding: int
    groups: int
    bias: bool
    bn: bool
    act: str

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel, self.stride, self.padding
        if self.op == "conv_transpose2d":
            return ((h - 1) * s - 2 * p + k + self.output_padding,
                    (w - 1) * s - 2 * p + k + self.output_padding)
        if self.op == "conv1d":
            return h, w
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def build(self) -> nn.Module:
        return RareConvBlock(self)

    def __str__(self) -> str:
        k = self.kernel
        kern = {"conv1d": f"{k}", "conv3d": f"1x{k}x{k}", "conv_transpose2d": f"{k}x{k}"}[self.op]
        g = f",g{self.groups}" if self.groups > 1 else ""
        op = f",op{self.output_padding}" if self.output_padding else ""
        return (f"{self.op}{kern}({self.in_ch}->{self.out_ch},s{self.stride},p{self.padding}{op}{g}"
                f"{',bias' if self.bias else ''}){'+bn' if self.bn else ''}{_act_str(self.act)}")


class RareConvBlock(nn.Module):
    def __init__(self, spec: RareConvSpec):
        super().__init__()
        self.op = spec.op
        k, s, p = spec.kernel, spec.stride, spec.padding
        if spec.op == "conv1d":
            self.conv = nn.Conv1d(spec.in_ch, spec.out_ch, k, 1, p, groups=spec.groups,
                                  bias=spec.bias)
            self.bn = nn.BatchNorm1d(spec.out_ch) if spec.bn else None
        elif spec.op == "conv3d":
            self.conv = nn.Conv3d(spec.in_ch, spec.out_ch, (1, k, k), (1, s, s), (0, p, p),
                                  groups=spec.groups, bias=spec.bias)
            self.bn = nn.BatchNorm3d(spec.out_ch) if spec.bn else None
        elif spec.op == "conv_transpose2d":
            self.conv = nn.ConvTranspose2d(spec.in_ch, spec.out_ch, k, s, p,
                                           output_padding=spec.output_padding,
                                           groups=spec.groups, bias=spec.bias)
            self.bn = nn.BatchNorm2d(spec.out_ch) if spec.bn else None
        else:
            raise ValueError(f"unknown op {spec.op!r}")
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "conv1d":
            y = self.conv(x.flatten(2))
            if self.bn is not None:
                y = self.bn(y)
            y = y.view(x.size(0), -1, x.size(2), x.size(3))
        elif self.op == "conv3d":
            y = self.conv(x.unsqueeze(2))
            if self.bn is not None:
                y = self.bn(y)
            y = y.squeeze(2)
        else:
            y = self.conv(x)
            if self.bn is not None:
                y = self.bn(y)
        return _activate(y, self.act_kind, self.act)


HEAD_POOLS = ("nn.AdaptiveAvgPool2d(1)", "F.adaptive_avg_pool2d(x,1)", "x.mean((2,3))",
              "nn.AdaptiveMaxPool2d(1)", "nn.AdaptiveAvgPool2d(2)", "none")


@dataclass(frozen=True)
class HeadSpec:
    pool: str
    flatten: str
    in_features: int
    hidden: int | None
    hidden_act: str
    dropout: float
    out_features: int

    def __str__(self) -> str:
        hid = ""
        if self.hidden is not None:
            hid = f" -> linear({self.in_features}->{self.hidden}){_act_str(self.hidden_act)}"
            if self.dropout:
                hid += f"+dropout({self.dropout})"
        last_in = self.hidden if self.hidden is not None else self.in_features
        return (f"{self.pool} -> {self.flatten}{hid} -> linear({last_in}->{self.out_features})")


class Head(nn.Module):
    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.pool_kind = spec.pool
        self.pool = {
            "nn.AdaptiveAvgPool2d(1)": lambda: nn.AdaptiveAvgPool2d(1),
            "nn.AdaptiveMaxPool2d(1)": lambda: nn.AdaptiveMaxPool2d(1),
            "nn.AdaptiveAvgPool2d(2)": lambda: nn.AdaptiveAvgPool2d(2),
        }.get(spec.pool, lambda: None)()
        self.flatten_form = spec.flatten
        self.flatten = nn.Flatten() if spec.flatten == "nn.Flatten()" else None
        self.hidden = None
        if spec.hidden is not None:
            self.hidden = nn.Linear(spec.in_features, spec.hidden)
            self.hidden_act_kind = spec.hidden_act
            self.hidden_act = _make_act(spec.hidden_act)
            self.dropout = nn.Dropout(spec.dropout)
        self.fc = nn.Linear(spec.hidden if spec.hidden is not None else spec.in_features,
                            spec.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        elif self.pool_kind == "F.adaptive_avg_pool2d(x,1)":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.pool_kind == "x.mean((2,3))":
            x = x.mean((2, 3))
        if self.flatten is not None:
            x = self.flatten(x)
        else:
            x = _flatten(x, self.flatten_form)
        if self.hidden is not None:
            x = _activate(self.hidden(x), self.hidden_act_kind, self.hidden_act)
            x = self.dropout(x)
        return self.fc(x)


# --------------------------- drawing -------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _draw_groups_and_out(draw: Any, c_in: int, out_ch: int | None, max_out: int
                         ) -> tuple[int, int]:
    """Draw (groups, out_channels) valid for a conv with ``c_in`` inputs."""
    options = ["regular"]
    if c_in > 1 and (c_in <= max_out if out_ch is None else out_ch % c_in == 0):
        options.append("depthwise")
    grouped = [d for d in _divisors(c_in) if 1 < d < c_in and d <= max_out
               and (out_ch is None or out_ch % d == 0)]
    if grouped:
        options.append("grouped")
    kind = draw(st.sampled_from(options))
    if kind == "regular":
        return 1, out_ch if out_ch is not None else draw(st.integers(1, max_out))
    if kind == "depthwise":
        if out_ch is not None:
            return c_in, out_ch
        mults = [m for m in (1, 2) if c_in * m <= max_out]
        return c_in, c_in * draw(st.sampled_from(mults))
    g = draw(st.sampled_from(grouped))
    return g, out_ch if out_ch is not None else g * draw(st.integers(1, max_out // g))


def _draw_conv(draw: Any, c_in: int, h: int, w: int, *, out_ch: int | None = None,
               stride: int | None = None, same_padding: bool = False,
               max_out: int = MAX_CHANNELS, act: bool = True) -> ConvSpec:
    small = min(h, w)
    kernels = [1, 3] + ([5] if small >= 5 or same_padding else [])
    k = draw(st.sampled_from(kernels))
    if stride is None:
        stride = draw(st.sampled_from([1, 2])) if small >= 4 and not same_padding else 1
    if same_padding:
        pad = k // 2
    else:
        pads = [k // 2] + ([0] if k > 1 and small >= k else [])
        pad = draw(st.sampled_from(pads))
    groups, out = _draw_groups_and_out(draw, c_in, out_ch, max_out)
    return ConvSpec(c_in, out, k, stride, pad, groups, draw(st.booleans()),
                    draw(st.booleans()), draw(activations()) if act else "none")


def _draw_conv_block(draw: Any, c: int, h: int, w: int):
    spec = _draw_conv(draw, c, h, w)
    return ConvBlockSpec(spec), (spec.out_ch, *spec.out_hw(h, w))


def _draw_residual(draw: Any, c: int, h: int, w: int):
    stride = draw(st.sampled_from([1, 2])) if min(h, w) >= 4 else 1
    c_out = draw(st.one_of(st.just(c), st.integers(1, MAX_CHANNELS)))
    n_body = draw(st.integers(1, 2))
    if n_body == 1:
        body = (_draw_conv(draw, c, h, w, out_ch=c_out, stride=stride, same_padding=True),)
    else:
        first = _draw_conv(draw, c, h, w, stride=stride, same_padding=True)
        h1, w1 = first.out_hw(h, w)
        second = _draw_conv(draw, first.out_ch, h1, w1, out_ch=c_out, stride=1,
                            same_padding=True)
        body = (first, second)
    shortcut = None
    if stride != 1 or c_out != c or draw(st.booleans()):
        shortcut = ConvSpec(c, c_out, 1, stride, 0, 1, False, draw(st.booleans()), "none")
    spec = ResidualSpec(body, shortcut, draw(st.sampled_from(ADD_FORMS)), draw(activations()))
    return spec, (c_out, *body[0].out_hw(h, w))


def _draw_merge(draw: Any, c: int, h: int, w: int):
    merge = draw(st.sampled_from(["cat", "add"]))
    if merge == "cat":
        n = draw(st.integers(2, 3))
        branches: list[Any] = []
        used = 0
        for i in range(n):
            avail = MAX_CHANNELS - used - (n - i - 1)  # leave >= 1 channel per later branch
            kinds = ["conv"] + (["identity", "maxpool3", "avgpool3"] if c <= avail else [])
            kind = draw(st.sampled_from(kinds))
            if kind == "conv":
                b = _draw_conv(draw, c, h, w, stride=1, same_padding=True, max_out=avail)
                used += b.out_ch
                branches.append(b)
            else:
                used += c
                branches.append(kind)
        spec = MergeSpec(tuple(branches), "cat", draw(st.sampled_from(CAT_FORMS)),
                         draw(activations()))
        return spec, (used, h, w)
    c_out = draw(st.one_of(st.just(c), st.integers(1, MAX_CHANNELS)))
    first = _draw_conv(draw, c, h, w, out_ch=c_out, stride=1, same_padding=True)
    if c_out == c and draw(st.booleans()):
        second: Any = "identity"
    else:
        second = _draw_conv(draw, c, h, w, out_ch=c_out, stride=1, same_padding=True)
    spec = MergeSpec((first, second), "add", draw(st.sampled_from(ADD_FORMS)),
                     draw(activations()))
    return spec, (c_out, h, w)


def _draw_pool(draw: Any, c: int, h: int, w: int):
    kind = draw(st.sampled_from(POOL_KINDS))
    out = _pool_out(kind, h, w)
    return PoolSpec(kind, draw(st.booleans()), out), (c, *out)


def _draw_se(draw: Any, c: int, h: int, w: int):
    spec = SESpec(c, draw(st.integers(1, max(1, c // 2))),
                  draw(st.sampled_from(["F.adaptive_avg_pool2d", "mean"])),
                  draw(st.sampled_from(["nn.ReLU", "F.relu", "F.silu", "none"])),
                  draw(st.sampled_from(["nn.Sigmoid", "torch.sigmoid", "F.hardsigmoid"])),
                  draw(st.sampled_from(["*", "torch.mul"])))
    return spec, (c, h, w)


def _draw_rare(draw: Any, c: int, h: int, w: int):
    ops = ["conv1d", "conv3d", "conv_transpose2d"]
    op = draw(st.sampled_from(ops))
    bias, bn, act = draw(st.booleans()), draw(st.booleans()), draw(activations())
    if op == "conv_transpose2d":
        variants = [(3, 1, 1, 0)]  # kernel, stride, padding, output_padding
        if max(h, w) <= 8:
            variants += [(2, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0)]
        k, s, p, op_ = draw(st.sampled_from(variants))
        groups, out = _draw_groups_and_out(draw, c, None, MAX_CHANNELS)
        spec = RareConvSpec(op, c, out, k, s, p, op_, groups, bias, bn, act)
    else:
        k = draw(st.sampled_from([1, 3]))
        s = draw(st.sampled_from([1, 2])) if op == "conv3d" and min(h, w) >= 4 else 1
        groups, out = _draw_groups_and_out(draw, c, None, MAX_CHANNELS)
        spec = RareConvSpec(op, c, out, k, s, k // 2, 0, groups, bias, bn, act)
    return spec, (spec.out_ch, *spec.out_hw(h, w))


def _draw_head(draw: Any, c: int, h: int, w: int) -> HeadSpec:
    pools = [p for p in HEAD_POOLS
             if not (p == "none" and c * h * w > 4096)
             and not (p == "nn.AdaptiveAvgPool2d(2)" and min(h, w) < 2)]
    pool = draw(st.sampled_from(pools))
    if pool == "none":
        in_features = c * h * w
    elif pool == "nn.AdaptiveAvgPool2d(2)":
        in_features = c * 4
    else:
        in_features = c
    flatten = draw(st.sampled_from(FLATTEN_FORMS))
    hidden = draw(st.one_of(st.none(), st.integers(1, MAX_CHANNELS)))
    hidden_act = draw(activations()) if hidden is not None else "none"
    dropout = draw(st.sampled_from([0.0, 0.5])) if hidden is not None else 0.0
    return HeadSpec(pool, flatten, in_features, hidden, hidden_act, dropout,
                    draw(st.integers(1, 10)))
