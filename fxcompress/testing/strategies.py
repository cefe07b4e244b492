"""Hypothesis strategies drawing random, valid, fx-traceable models.

Each strategy draws a *spec* (a frozen dataclass: channels, kernel sizes, strides,
which blocks, which forms of each op), builds the model from it with weights
seeded from a drawn integer, and returns a :class:`ModelCase`
``(model, example_inputs, description)``; the description is the spec, so a
failing example prints as the architecture that broke, and ``case.spec.build()``
rebuilds an identical case.

* :func:`conv_nets` -- image CNNs ``[B, C, H, W]`` (8..16 px, <= 32 channels):
  conv (regular, depthwise, grouped; any padding/stride/bias; optional BN),
  residual blocks (identity or 1x1 projection shortcut, ``+``/``torch.add``/
  ``.add``/``+=``), merge blocks (``torch.cat``/``torch.concat`` on dim 1 or -3 of
  conv/identity/pool branches, or a sum of branches), pooling (max/avg/adaptive,
  module or functional), squeeze-excite gating (``x * sigmoid(...)``), and a head
  (global pooling or none, every flatten form, optional hidden layer, linear).
  With ``include_rare_ops=True`` some blocks are Conv1d, Conv3d or ConvTranspose2d
  (and some attention blocks use ``F.scaled_dot_product_attention``).
* :func:`mlps` -- Linear stacks over ``[B, F]``, flattened images or sequences
  ``[B, T, F]`` with BatchNorm1d/LayerNorm, dropout, residual and concat blocks.
* :func:`attention_blocks` -- transformer blocks over ``[B, T, D]``: explicit
  multi-head self-attention (``query``/``key``/``value`` or fused ``qkv``),
  several scaling/softmax/mask forms, pre- or post-LayerNorm, feed-forward.
* :func:`models` -- one of the above.

Every model is in eval mode with randomized BatchNorm running statistics and
affine parameters (some negative scales), is deterministic, and returns a single
tensor unless ``multi_output=True`` (then a tensor, a ``(logits, features)`` tuple
or a ``{"logits", "features"}`` dict).  Activations come in module and functional
forms (``nn.ReLU``, ``nn.ReLU(inplace=True)``, ``F.relu``, ``torch.relu``,
``x.relu()``, ReLU6, GELU, sigmoid, SiLU, hardswish, ...).

This is the only module of the testing kit that imports hypothesis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from .models import ModelCase, randomize_norm_layers_, seeded

__all__ = [
    "ModelCase",
    "conv_nets",
    "mlps",
    "attention_blocks",
    "models",
    "activations",
    "MODULE_ACTIVATIONS",
    "FUNCTIONAL_ACTIVATIONS",
    "ConvNetSpec", "ConvSpec", "ConvBlockSpec", "ResidualSpec", "MergeSpec", "PoolSpec",
    "SESpec", "RareConvSpec", "HeadSpec",
    "MLPSpec", "LinearSpec", "ResidualLinearSpec", "ConcatLinearSpec",
    "AttentionNetSpec", "AttentionSpec",
    "InvertedResidualSpec", "ShuffleSpec", "ConvNeXtSpec", "channel_shuffle", "deployment_models",
    "EXAMPLE_BLOCK_NETS",
]

MAX_CHANNELS = 32
_SEEDS = st.integers(0, 2**31 - 1)

# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------

MODULE_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "nn.ReLU": nn.ReLU,
    "nn.ReLU(inplace)": lambda: nn.ReLU(inplace=True),
    "nn.ReLU6": nn.ReLU6,
    "nn.GELU": nn.GELU,
    "nn.Sigmoid": nn.Sigmoid,
    "nn.SiLU": nn.SiLU,
    "nn.Hardswish": nn.Hardswish,
    "nn.LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "nn.Tanh": nn.Tanh,
}

FUNCTIONAL_ACTIVATIONS: tuple[str, ...] = (
    "F.relu", "torch.relu", "x.relu()", "F.relu6", "F.gelu", "torch.sigmoid",
    "x.sigmoid()", "F.silu", "F.hardswish", "F.hardtanh(0,6)", "x.clamp(min=0)",
    "F.leaky_relu", "torch.tanh",
)

ACTIVATION_KINDS: tuple[str, ...] = ("none", *MODULE_ACTIVATIONS, *FUNCTIONAL_ACTIVATIONS)


def activations() -> st.SearchStrategy[str]:
    """Names of activations (``"none"``, module forms ``"nn.*"``, functional forms)."""
    return st.sampled_from(ACTIVATION_KINDS)


def _make_act(kind: str) -> nn.Module | None:
    if kind in MODULE_ACTIVATIONS:
        return MODULE_ACTIVATIONS[kind]()
    if kind != "none" and kind not in FUNCTIONAL_ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}")
    return None


def _activate(x: torch.Tensor, kind: str, module: nn.Module | None) -> torch.Tensor:
    """Apply activation ``kind`` (``module`` is its nn.Module for module forms).
    ``kind`` is a Python string, so fx traces only the branch taken."""
    if module is not None:
        return module(x)
    if kind == "none":
        return x
    if kind == "F.relu":
        return F.relu(x)
    if kind == "torch.relu":
        return torch.relu(x)
    if kind == "x.relu()":
        return x.relu()
    if kind == "F.relu6":
        return F.relu6(x)
    if kind == "F.gelu":
        return F.gelu(x)
    if kind == "torch.sigmoid":
        return torch.sigmoid(x)
    if kind == "x.sigmoid()":
        return x.sigmoid()
    if kind == "F.silu":
        return F.silu(x)
    if kind == "F.hardswish":
        return F.hardswish(x)
    if kind == "F.hardtanh(0,6)":
        return F.hardtanh(x, 0.0, 6.0)
    if kind == "x.clamp(min=0)":
        return x.clamp(min=0)
    if kind == "F.leaky_relu":
        return F.leaky_relu(x, 0.1)
    if kind == "torch.tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown activation {kind!r}")


ADD_FORMS: tuple[str, ...] = ("+", "torch.add", "x.add(y)", "+=", "y + x")


def _add(x: torch.Tensor, y: torch.Tensor, form: str) -> torch.Tensor:
    """x + y written as ``form``; ``x`` must be a fresh tensor for ``+=``."""
    if form == "+":
        return x + y
    if form == "torch.add":
        return torch.add(x, y)
    if form == "x.add(y)":
        return x.add(y)
    if form == "+=":
        x += y
        return x
    if form == "y + x":
        return y + x
    raise ValueError(f"unknown add form {form!r}")


CAT_FORMS: tuple[str, ...] = ("torch.cat([..], 1)", "torch.cat((..), dim=1)",
                              "torch.concat([..], dim=1)", "torch.cat([..], -3)")


def _cat_channels(xs: list[torch.Tensor], form: str) -> torch.Tensor:
    """Concatenate NCHW tensors along channels, written as ``form``."""
    if form == "torch.cat([..], 1)":
        return torch.cat(xs, 1)
    if form == "torch.cat((..), dim=1)":
        return torch.cat(tuple(xs), dim=1)
    if form == "torch.concat([..], dim=1)":
        return torch.concat(xs, dim=1)
    if form == "torch.cat([..], -3)":
        return torch.cat(xs, -3)
    raise ValueError(f"unknown cat form {form!r}")


def _act_str(kind: str) -> str:
    return "" if kind == "none" else f"+{kind}"


# ---------------------------------------------------------------------------
# conv-net specs and modules
# ---------------------------------------------------------------------------


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
FLATTEN_FORMS = ("torch.flatten(x,1)", "x.view(x.size(0),-1)", "x.flatten(1)", "nn.Flatten()",
                 "x.reshape(x.size(0),-1)")


def _flatten(x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "torch.flatten(x,1)":
        return torch.flatten(x, 1)
    if form == "x.view(x.size(0),-1)":
        return x.view(x.size(0), -1)
    if form == "x.flatten(1)":
        return x.flatten(1)
    if form == "x.reshape(x.size(0),-1)":
        return x.reshape(x.size(0), -1)
    raise ValueError(f"unknown flatten form {form!r}")


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


class GeneratedNet(nn.Module):
    """blocks (a ModuleList run in order) then a head; returns the head's output,
    or ``(logits, features)`` / ``{"logits", "features"}`` per ``output_kind``."""

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, output_kind: str = "tensor",
                 input_flatten: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.output_kind = output_kind
        self.input_flatten = input_flatten
        self.flatten = nn.Flatten() if input_flatten == "nn.Flatten()" else None

    def forward(self, x: torch.Tensor) -> Any:
        if self.flatten is not None:
            x = self.flatten(x)
        elif self.input_flatten is not None:
            x = _flatten(x, self.input_flatten)
        for block in self.blocks:
            x = block(x)
        features = x
        logits = self.head(x)
        if self.output_kind == "tuple":
            return logits, features
        if self.output_kind == "dict":
            return {"logits": logits, "features": features}
        return logits


def _finish(model: nn.Module, seed: int, input_shapes: Sequence[tuple[int, ...]]
            ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    randomize_norm_layers_(model, seed=seed + 1)
    model.eval()
    g = torch.Generator()
    g.manual_seed(seed + 2)
    inputs = tuple(torch.randn(*shape, generator=g) for shape in input_shapes)
    return model, inputs


@dataclass(frozen=True)
class ConvNetSpec:
    seed: int
    input_shape: tuple[int, int, int, int]
    blocks: tuple[Any, ...]
    head: HeadSpec
    output_kind: str = "tensor"

    def build(self) -> ModelCase:
        with seeded(self.seed):
            net = GeneratedNet([b.build() for b in self.blocks], Head(self.head), self.output_kind)
        model, inputs = _finish(net, self.seed, [self.input_shape])
        return ModelCase(model, inputs, str(self), spec=self)

    def __str__(self) -> str:
        blocks = "; ".join(f"{i}: {b}" for i, b in enumerate(self.blocks))
        out = "" if self.output_kind == "tensor" else f", outputs={self.output_kind}"
        return (f"conv_net(input={list(self.input_shape)}, seed={self.seed}{out}, "
                f"blocks=[{blocks}], head=[{self.head}])")


# --------------------------- conv-net drawing -------------------------------


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


# --------------------- deployment blocks (MobileNet, ShuffleNet, ConvNeXt) ---------------------

MOBILE_ACTIVATIONS: tuple[str, ...] = ("nn.ReLU6", "F.relu6", "F.hardtanh(0,6)", "nn.Hardswish", "F.hardswish",
                                       "nn.SiLU", "F.silu")


@dataclass(frozen=True)
class InvertedResidualSpec:
    """MobileNetV2/V3 block: [1x1 expand+BN+act] -> kxk depthwise+BN+act -> [squeeze-excite]
    -> 1x1 project+BN, plus the input when the shape allows (stride 1, same channels)."""

    in_ch: int
    hidden: int        # == in_ch: no expansion conv
    out_ch: int
    kernel: int
    stride: int
    act: str           # a MOBILE_ACTIVATIONS entry
    se: SESpec | None

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch

    def build(self) -> nn.Module:
        return InvertedResidual(self)

    def __str__(self) -> str:
        se = f", {self.se}" if self.se is not None else ""
        return (f"inverted_residual({self.in_ch}->{self.hidden}->{self.out_ch}, dw{self.kernel}x{self.kernel}"
                f" s{self.stride}, act={self.act}{se}{', +x' if self.residual else ''})")


class InvertedResidual(nn.Module):
    def __init__(self, spec: InvertedResidualSpec):
        super().__init__()
        k = spec.kernel
        self.expand = (ConvBNAct(ConvSpec(spec.in_ch, spec.hidden, 1, 1, 0, 1, False, True, spec.act))
                       if spec.hidden != spec.in_ch else None)
        self.depthwise = ConvBNAct(ConvSpec(spec.hidden, spec.hidden, k, spec.stride, k // 2, spec.hidden, False,
                                            True, spec.act))
        self.se = SEBlock(spec.se) if spec.se is not None else None
        self.project = ConvBNAct(ConvSpec(spec.hidden, spec.out_ch, 1, 1, 0, 1, False, True, "none"))
        self.residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


SHUFFLE_FORMS: tuple[str, ...] = ("view+transpose+view", "reshape+permute+flatten")


def channel_shuffle(x: torch.Tensor, groups: int, form: str) -> torch.Tensor:
    """ShuffleNet's channel shuffle written as ``form``."""
    n, c, h, w = x.shape
    if form == "view+transpose+view":
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
    if form == "reshape+permute+flatten":
        return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
    raise ValueError(f"unknown shuffle form {form!r}")


@dataclass(frozen=True)
class ShuffleSpec:
    """ShuffleNetV2 unit (stride 1): split channels in two halves, one through
    1x1(+grouped)+BN+ReLU -> 3x3 depthwise+BN -> 1x1+BN+ReLU, concat, channel shuffle."""

    channels: int       # even
    branch_groups: int  # groups of the branch's first 1x1 conv (ShuffleNetV1-style grouped 1x1 when > 1)
    split: str          # "chunk" or "slice"
    shuffle: str        # a SHUFFLE_FORMS entry

    def build(self) -> nn.Module:
        return ShuffleUnit(self)

    def __str__(self) -> str:
        g = f"g{self.branch_groups}," if self.branch_groups > 1 else ""
        return f"shuffle_unit({self.channels}, {g}split={self.split}, shuffle='{self.shuffle}')"


class ShuffleUnit(nn.Module):
    def __init__(self, spec: ShuffleSpec):
        super().__init__()
        half = spec.channels // 2
        self.branch = nn.Sequential(
            ConvBNAct(ConvSpec(half, half, 1, 1, 0, spec.branch_groups, False, True, "nn.ReLU")),
            ConvBNAct(ConvSpec(half, half, 3, 1, 1, half, False, True, "none")),
            ConvBNAct(ConvSpec(half, half, 1, 1, 0, 1, False, True, "nn.ReLU")))
        self.split, self.shuffle = spec.split, spec.shuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            half = x.shape[1] // 2
            a, b = x[:, :half], x[:, half:]
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2, self.shuffle)


@dataclass(frozen=True)
class ConvNeXtSpec:
    """ConvNeXt block: kxk depthwise -> permute to NHWC -> LayerNorm -> Linear(c, e*c) -> GELU
    -> Linear(e*c, c) -> [layer scale] -> permute back -> + x."""

    channels: int
    kernel: int
    expansion: int
    layer_scale: bool
    permute: str        # "permute" or "x.permute"

    def build(self) -> nn.Module:
        return ConvNeXtBlock(self)

    def __str__(self) -> str:
        return (f"convnext({self.channels}, dw{self.kernel}x{self.kernel}, LN, x{self.expansion} mlp"
                f"{', layer scale' if self.layer_scale else ''}, {self.permute})")


class ConvNeXtBlock(nn.Module):
    def __init__(self, spec: ConvNeXtSpec):
        super().__init__()
        c = spec.channels
        self.dwconv = nn.Conv2d(c, c, spec.kernel, padding=spec.kernel // 2, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, spec.expansion * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(spec.expansion * c, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c)) if spec.layer_scale else None
        self.permute_form = spec.permute

    def _permute(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return torch.permute(x, dims) if self.permute_form == "permute" else x.permute(*dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._permute(self.dwconv(x), (0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self._permute(y, (0, 3, 1, 2))


def _draw_inverted_residual(draw: Any, c: int, h: int, w: int):
    hidden = c * draw(st.sampled_from([m for m in (1, 2, 4) if c * m <= MAX_CHANNELS] or [1]))
    stride = draw(st.sampled_from([1, 2])) if min(h, w) >= 4 else 1
    out = draw(st.one_of(st.just(c), st.integers(1, MAX_CHANNELS)))
    se = None
    if draw(st.booleans()):
        se = SESpec(hidden, max(1, hidden // 4), "F.adaptive_avg_pool2d", "nn.ReLU",
                    draw(st.sampled_from(["F.hardsigmoid", "nn.Sigmoid"])), draw(st.sampled_from(["*", "torch.mul"])))
    spec = InvertedResidualSpec(c, hidden, out, draw(st.sampled_from([3, 5])), stride,
                                draw(st.sampled_from(MOBILE_ACTIVATIONS)), se)
    return spec, (out, (h - 1) // stride + 1, (w - 1) // stride + 1)


def _draw_shuffle(draw: Any, c: int, h: int, w: int):
    half = c // 2
    groups = draw(st.sampled_from([g for g in _divisors(half) if g <= 4]))
    return ShuffleSpec(c, groups, draw(st.sampled_from(["chunk", "slice"])),
                       draw(st.sampled_from(SHUFFLE_FORMS))), (c, h, w)


def _draw_convnext(draw: Any, c: int, h: int, w: int):
    spec = ConvNeXtSpec(c, draw(st.sampled_from([3, 7])), draw(st.sampled_from([2, 4])), draw(st.booleans()),
                        draw(st.sampled_from(["permute", "x.permute"])))
    return spec, (c, h, w)


_BLOCK_DRAWERS: dict[str, Callable[..., Any]] = {
    "conv": _draw_conv_block,
    "residual": _draw_residual,
    "pool": _draw_pool,
    "merge": _draw_merge,
    "squeeze_excite": _draw_se,
    "rare_conv": _draw_rare,
    "inverted_residual": _draw_inverted_residual,
    "shuffle_unit": _draw_shuffle,
    "convnext": _draw_convnext,
}
DEPLOYMENT_BLOCKS: tuple[str, ...] = ("inverted_residual", "shuffle_unit", "convnext")


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


@st.composite
def conv_nets(draw: Any, *, include_rare_ops: bool = False, min_blocks: int = 2,
              max_blocks: int = 4, batch_size: int = 2, multi_output: bool = False,
              deployment_blocks: bool = False) -> ModelCase:
    """Random valid CNNs over ``[batch_size, C, H, W]`` inputs (C in {1, 3, 4},
    H, W in 8..16), ``min_blocks..max_blocks`` blocks (the first a conv, residual
    or merge block; later ones also pooling, squeeze-excite and, with
    ``include_rare_ops=True``, Conv1d / Conv3d / ConvTranspose2d), then a head.
    ``deployment_blocks=True`` adds MobileNet inverted residuals (ReLU6/hardswish/SiLU,
    squeeze-excite), ShuffleNet units (channel split, concat, channel shuffle, grouped
    1x1) and ConvNeXt blocks (depthwise conv, permutes, LayerNorm, linears)."""
    seed = draw(_SEEDS)
    c0 = draw(st.sampled_from([3, 1, 4]))
    h0 = draw(st.integers(8, 16))
    w0 = draw(st.one_of(st.just(h0), st.integers(8, 16)))
    c, h, w = c0, h0, w0
    kinds = ["conv", "residual", "pool", "merge", "squeeze_excite"]
    if include_rare_ops:
        kinds.append("rare_conv")
    if deployment_blocks:
        kinds += DEPLOYMENT_BLOCKS
    blocks = []
    if not 1 <= min_blocks <= max_blocks:
        raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {min_blocks}, {max_blocks}")
    for i in range(draw(st.integers(min_blocks, max_blocks))):
        allowed = [k for k in kinds if not (k == "pool" and min(h, w) < 2)
                   and not (k == "shuffle_unit" and c % 2)]
        if i == 0:
            allowed = ["conv", "residual", "merge"]
        kind = draw(st.sampled_from(allowed))
        spec, (c, h, w) = _BLOCK_DRAWERS[kind](draw, c, h, w)
        assert c >= 1 and h >= 1 and w >= 1, (spec, c, h, w)
        blocks.append(spec)
    head = _draw_head(draw, c, h, w)
    output_kind = draw(st.sampled_from(["tensor", "tuple", "dict"])) if multi_output else "tensor"
    spec = ConvNetSpec(seed, (batch_size, c0, h0, w0), tuple(blocks), head, output_kind)
    return spec.build()


# ---------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    bias: bool
    norm: str    # "none", "batchnorm", "layernorm"
    act: str
    dropout: float

    def build(self) -> nn.Module:
        return LinearBlock(self)

    def __str__(self) -> str:
        norm = {"none": "", "batchnorm": "+bn", "layernorm": "+ln"}[self.norm]
        drop = f"+dropout({self.dropout})" if self.dropout else ""
        return (f"linear({self.in_features}->{self.out_features}{',bias' if self.bias else ''})"
                f"{norm}{_act_str(self.act)}{drop}")


class LinearBlock(nn.Module):
    def __init__(self, spec: LinearSpec):
        super().__init__()
        self.fc = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.norm = {"none": lambda: None,
                     "batchnorm": lambda: nn.BatchNorm1d(spec.out_features),
                     "layernorm": lambda: nn.LayerNorm(spec.out_features)}[spec.norm]()
        self.act_kind = spec.act
        self.act = _make_act(spec.act)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.norm is not None:
            x = self.norm(x)
        x = _activate(x, self.act_kind, self.act)
        if self.dropout is not None:
            x = self.dropout(x)
        return x


@dataclass(frozen=True)
class ResidualLinearSpec:
    """x + fc2(act(fc1(x))), then an activation."""

    features: int
    hidden: int
    inner_act: str
    add: str
    act: str

    def build(self) -> nn.Module:
        return ResidualLinear(self)

    def __str__(self) -> str:
        return (f"residual_linear({self.features}->{self.hidden}{_act_str(self.inner_act)}"
                f"->{self.features}, add='{self.add}'){_act_str(self.act)}")


class ResidualLinear(nn.Module):
    def __init__(self, spec: ResidualLinearSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.features, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.features)
        self.inner_kind = spec.inner_act
        self.inner = _make_act(spec.inner_act)
        self.add_form = spec.add
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(_activate(self.fc1(x), self.inner_kind, self.inner))
        return _activate(_add(h, x, self.add_form), self.act_kind, self.act)


@dataclass(frozen=True)
class ConcatLinearSpec:
    """torch.cat([act(fc_a(x)), fc_b(x)], dim=-1)."""

    in_features: int
    out_a: int
    out_b: int
    act: str

    def build(self) -> nn.Module:
        return ConcatLinear(self)

    def __str__(self) -> str:
        return (f"concat_linear(cat[linear({self.in_features}->{self.out_a}){_act_str(self.act)}, "
                f"linear({self.in_features}->{self.out_b})], dim=-1)")


class ConcatLinear(nn.Module):
    def __init__(self, spec: ConcatLinearSpec):
        super().__init__()
        self.fc_a = nn.Linear(spec.in_features, spec.out_a)
        self.fc_b = nn.Linear(spec.in_features, spec.out_b)
        self.act_kind = spec.act
        self.act = _make_act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _activate(self.fc_a(x), self.act_kind, self.act)
        return torch.cat([a, self.fc_b(x)], dim=-1)


class LinearHead(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@dataclass(frozen=True)
class MLPSpec:
    seed: int
    input_shape: tuple[int, ...]
    input_flatten: str | None
    blocks: tuple[Any, ...]
    out_in_features: int
    out_features: int
    out_bias: bool
    output_kind: str = "tensor"

    def build(self) -> ModelCase:
        with seeded(self.seed):
            net = GeneratedNet([b.build() for b in self.blocks],
                               LinearHead(self.out_in_features, self.out_features, self.out_bias),
                               self.output_kind, input_flatten=self.input_flatten)
        model, inputs = _finish(net, self.seed, [self.input_shape])
        return ModelCase(model, inputs, str(self), spec=self)

    def __str__(self) -> str:
        flat = f"{self.input_flatten} -> " if self.input_flatten else ""
        blocks = "; ".join(f"{i}: {b}" for i, b in enumerate(self.blocks))
        out = "" if self.output_kind == "tensor" else f", outputs={self.output_kind}"
        return (f"mlp(input={list(self.input_shape)}, seed={self.seed}{out}, {flat}"
                f"blocks=[{blocks}], head=linear({self.out_in_features}->{self.out_features}"
                f"{',bias' if self.out_bias else ''}))")


@st.composite
def mlps(draw: Any, *, max_blocks: int = 3, batch_size: int = 2,
         multi_output: bool = False) -> ModelCase:
    """Random Linear stacks.  Input: ``[B, F]``, ``[B, C, h, w]`` (flattened first,
    every flatten form) or ``[B, T, F]`` (linears act on the last dim; no
    BatchNorm1d there)."""
    seed = draw(_SEEDS)
    input_kind = draw(st.sampled_from(["vector", "image", "sequence"]))
    flatten = None
    if input_kind == "vector":
        f = draw(st.integers(1, MAX_CHANNELS))
        shape: tuple[int, ...] = (batch_size, f)
    elif input_kind == "image":
        cc, hh, ww = draw(st.integers(1, 3)), draw(st.integers(2, 4)), draw(st.integers(2, 4))
        f = cc * hh * ww
        shape = (batch_size, cc, hh, ww)
        flatten = draw(st.sampled_from(FLATTEN_FORMS))
    else:
        t, f = draw(st.integers(1, 4)), draw(st.integers(1, MAX_CHANNELS))
        shape = (batch_size, t, f)
    norms = ["none", "layernorm"] + (["batchnorm"] if input_kind != "sequence" else [])
    blocks: list[Any] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(["linear", "residual", "concat"]))
        if kind == "linear":
            out = draw(st.integers(1, MAX_CHANNELS))
            blocks.append(LinearSpec(f, out, draw(st.booleans()), draw(st.sampled_from(norms)),
                                     draw(activations()), draw(st.sampled_from([0.0, 0.1, 0.5]))))
            f = out
        elif kind == "residual":
            blocks.append(ResidualLinearSpec(f, draw(st.integers(1, MAX_CHANNELS)),
                                             draw(activations()), draw(st.sampled_from(ADD_FORMS)),
                                             draw(activations())))
        else:
            a = draw(st.integers(1, MAX_CHANNELS // 2))
            b = draw(st.integers(1, MAX_CHANNELS // 2))
            blocks.append(ConcatLinearSpec(f, a, b, draw(activations())))
            f = a + b
    output_kind = draw(st.sampled_from(["tensor", "tuple", "dict"])) if multi_output else "tensor"
    spec = MLPSpec(seed, shape, flatten, tuple(blocks), f, draw(st.integers(1, 10)),
                   draw(st.booleans()), output_kind)
    return spec.build()


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """One transformer block: self-attention + feed-forward, each with a residual."""

    dim: int
    heads: int
    seq_len: int
    pre_norm: bool
    fused_qkv: bool
    bias: bool
    split: str       # "view+transpose" or "reshape+permute"
    key_t: str       # "transpose(-1,-2)", "transpose(2,3)", "permute(0,1,3,2)"
    scale: str       # "div", "mul", "prescale_q"
    softmax: str     # "F.softmax", "torch.softmax", "x.softmax"
    mask: str        # "none", "additive", "masked_fill"
    sdpa: bool       # F.scaled_dot_product_attention instead of explicit ops
    attn_dropout: float
    add: str
    ffn_hidden: int
    ffn_act: str

    def build(self) -> nn.Module:
        return AttentionBlock(self)

    def __str__(self) -> str:
        if self.sdpa:
            core = f"F.scaled_dot_product_attention(causal={self.mask != 'none'})"
        else:
            core = (f"qk=matmul(q,k.{self.key_t}), scale={self.scale}, {self.softmax}, "
                    f"mask={self.mask}, dropout={self.attn_dropout}")
        return (f"attention(dim={self.dim}, heads={self.heads}, "
                f"{'pre' if self.pre_norm else 'post'}-LN, "
                f"{'fused qkv' if self.fused_qkv else 'query/key/value'}"
                f"{',bias' if self.bias else ''}, split={self.split}, {core}, add='{self.add}', "
                f"ffn={self.dim}->{self.ffn_hidden}{_act_str(self.ffn_act)}->{self.dim})")


class AttentionBlock(nn.Module):
    def __init__(self, spec: AttentionSpec):
        super().__init__()
        d = spec.dim
        self.spec_heads = spec.heads
        self.head_dim = d // spec.heads
        self.dim = d
        self.fused_qkv = spec.fused_qkv
        if spec.fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, bias=spec.bias)
        else:
            self.query = nn.Linear(d, d, bias=spec.bias)
            self.key = nn.Linear(d, d, bias=spec.bias)
            self.value = nn.Linear(d, d, bias=spec.bias)
        self.out_proj = nn.Linear(d, d, bias=spec.bias)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, spec.ffn_hidden)
        self.fc2 = nn.Linear(spec.ffn_hidden, d)
        self.ffn_act_kind = spec.ffn_act
        self.ffn_act = _make_act(spec.ffn_act)
        self.attn_dropout = nn.Dropout(spec.attn_dropout)
        self.pre_norm = spec.pre_norm
        self.split = spec.split
        self.key_t = spec.key_t
        self.scale_form = spec.scale
        self.softmax_form = spec.softmax
        self.mask_form = spec.mask
        self.sdpa = spec.sdpa
        self.add_form = spec.add
        self.scale = 1.0 / math.sqrt(self.head_dim)
        t = spec.seq_len
        if spec.mask == "additive":
            self.register_buffer("attn_mask", torch.triu(torch.full((t, t), -1e4), diagonal=1))
        elif spec.mask == "masked_fill":
            self.register_buffer("attn_mask", torch.ones(t, t, dtype=torch.bool).triu(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "view+transpose":
            return x.view(x.size(0), x.size(1), self.spec_heads, self.head_dim).transpose(1, 2)
        return x.reshape(x.size(0), x.size(1), self.spec_heads, self.head_dim).permute(0, 2, 1, 3)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=self.mask_form != "none")
        else:
            if self.scale_form == "prescale_q":
                q = q * self.scale
            if self.key_t == "transpose(-1,-2)":
                kt = k.transpose(-1, -2)
            elif self.key_t == "transpose(2,3)":
                kt = k.transpose(2, 3)
            else:
                kt = k.permute(0, 1, 3, 2)
            scores = torch.matmul(q, kt)
            if self.scale_form == "div":
                scores = scores / math.sqrt(self.head_dim)
            elif self.scale_form == "mul":
                scores = scores * self.scale
            if self.mask_form == "additive":
                scores = scores + self.attn_mask
            elif self.mask_form == "masked_fill":
                scores = scores.masked_fill(self.attn_mask, float("-inf"))
            if self.softmax_form == "F.softmax":
                probs = F.softmax(scores, dim=-1)
            elif self.softmax_form == "torch.softmax":
                probs = torch.softmax(scores, -1)
            else:
                probs = scores.softmax(dim=-1)
            probs = self.attn_dropout(probs)
            ctx = probs @ v
        ctx = ctx.transpose(1, 2).reshape(x.size(0), x.size(1), self.dim)
        return self.out_proj(ctx)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_activate(self.fc1(x), self.ffn_act_kind, self.ffn_act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = _add(self._attention(self.norm1(x)), x, self.add_form)
            x = _add(self._ffn(self.norm2(x)), x, self.add_form)
            return x
        x = self.norm1(_add(self._attention(x), x, self.add_form))
        return self.norm2(_add(self._ffn(x), x, self.add_form))


class SequenceHead(nn.Module):
    """"mean": mean over tokens; "first": x[:, 0]; "none": the sequence itself.
    Then an optional final LayerNorm before pooling and a linear classifier."""

    def __init__(self, dim: int, pool: str, final_norm: bool, out_features: int):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim) if final_norm else None
        self.classifier = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.pool == "mean":
            x = x.mean(dim=1)
        elif self.pool == "first":
            x = x[:, 0]
        return self.classifier(x)


@dataclass(frozen=True)
class AttentionNetSpec:
    seed: int
    input_shape: tuple[int, int, int]
    input_proj: int | None   # project input features -> dim with a Linear
    blocks: tuple[AttentionSpec, ...]
    final_norm: bool
    pool: str
    out_features: int
    output_kind: str = "tensor"

    def build(self) -> ModelCase:
        dim = self.blocks[0].dim
        with seeded(self.seed):
            mods: list[nn.Module] = []
            if self.input_proj is not None:
                mods.append(nn.Linear(self.input_shape[-1], dim))
            mods += [b.build() for b in self.blocks]
            net = GeneratedNet(mods, SequenceHead(dim, self.pool, self.final_norm,
                                                  self.out_features), self.output_kind)
        model, inputs = _finish(net, self.seed, [self.input_shape])
        return ModelCase(model, inputs, str(self), spec=self)

    def __str__(self) -> str:
        dim = self.blocks[0].dim
        proj = f"input_proj=linear({self.input_shape[-1]}->{dim}), " if self.input_proj else ""
        blocks = "; ".join(f"{i}: {b}" for i, b in enumerate(self.blocks))
        out = "" if self.output_kind == "tensor" else f", outputs={self.output_kind}"
        return (f"attention_net(input={list(self.input_shape)}, seed={self.seed}{out}, {proj}"
                f"blocks=[{blocks}], head=[{'ln -> ' if self.final_norm else ''}pool={self.pool}"
                f" -> linear({dim}->{self.out_features})])")


@st.composite
def attention_blocks(draw: Any, *, max_blocks: int = 2, batch_size: int = 2,
                     include_rare_ops: bool = False, multi_output: bool = False) -> ModelCase:
    """Random transformer blocks over float ``[batch_size, T, D]`` inputs (T in 1..8,
    D = heads * head_dim <= 32, or any width with a linear input projection).
    ``include_rare_ops=True`` sometimes uses ``F.scaled_dot_product_attention``."""
    seed = draw(_SEEDS)
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([h for h in (2, 4, 8) if heads * h <= MAX_CHANNELS]))
    dim = heads * head_dim
    t = draw(st.integers(1, 8))
    in_features = draw(st.one_of(st.none(), st.integers(1, MAX_CHANNELS)))
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        blocks.append(AttentionSpec(
            dim=dim, heads=heads, seq_len=t,
            pre_norm=draw(st.booleans()),
            fused_qkv=draw(st.booleans()),
            bias=draw(st.booleans()),
            split=draw(st.sampled_from(["view+transpose", "reshape+permute"])),
            key_t=draw(st.sampled_from(["transpose(-1,-2)", "transpose(2,3)", "permute(0,1,3,2)"])),
            scale=draw(st.sampled_from(["div", "mul", "prescale_q"])),
            softmax=draw(st.sampled_from(["F.softmax", "torch.softmax", "x.softmax"])),
            mask=draw(st.sampled_from(["none", "additive", "masked_fill"])),
            sdpa=draw(st.booleans()) if include_rare_ops else False,
            attn_dropout=draw(st.sampled_from([0.0, 0.1])),
            add=draw(st.sampled_from(ADD_FORMS)),
            ffn_hidden=draw(st.integers(1, MAX_CHANNELS)),
            ffn_act=draw(st.sampled_from(["nn.GELU", "F.gelu", "nn.ReLU", "F.relu", "F.silu",
                                          "none"])),
        ))
    output_kind = draw(st.sampled_from(["tensor", "tuple", "dict"])) if multi_output else "tensor"
    spec = AttentionNetSpec(
        seed, (batch_size, t, in_features if in_features is not None else dim),
        in_features, tuple(blocks), draw(st.booleans()),
        draw(st.sampled_from(["mean", "first", "none"])), draw(st.integers(1, 10)), output_kind)
    return spec.build()


def models(*, include_rare_ops: bool = False, multi_output: bool = False
           ) -> st.SearchStrategy[ModelCase]:
    """One of :func:`conv_nets`, :func:`mlps`, :func:`attention_blocks`."""
    return st.one_of(
        conv_nets(include_rare_ops=include_rare_ops, multi_output=multi_output),
        mlps(multi_output=multi_output),
        attention_blocks(include_rare_ops=include_rare_ops, multi_output=multi_output),
    )


def deployment_models() -> st.SearchStrategy[ModelCase]:
    """Models the way deployed architectures are built: conv nets with MobileNet / ShuffleNet /
    ConvNeXt blocks, and attention blocks (explicit or ``F.scaled_dot_product_attention``)."""
    return st.one_of(conv_nets(deployment_blocks=True, max_blocks=3),
                     attention_blocks(include_rare_ops=True, max_blocks=1))


def _example_net(*blocks: Any, channels: int, seed: int = 0) -> nn.Module:
    stem = ConvSpec(3, blocks[0].in_ch if hasattr(blocks[0], "in_ch") else channels, 3, 2, 1, 1, False, True,
                    "nn.Hardswish")
    head = HeadSpec("nn.AdaptiveAvgPool2d(1)", "torch.flatten(x,1)", channels, 16, "nn.Hardswish", 0.0, 10)
    return ConvNetSpec(seed, (2, 3, 16, 16), (ConvBlockSpec(stem), *blocks), head).build().model


def _se(c: int) -> SESpec:
    return SESpec(c, max(1, c // 4), "F.adaptive_avg_pool2d", "nn.ReLU", "F.hardsigmoid", "*")


# Fixed nets of the deployment blocks on [2, 3, 16, 16] inputs (a stem conv, the blocks, a pooled
# linear head), for benchmarks and example-based tests.
EXAMPLE_BLOCK_NETS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v3_blocks": lambda: _example_net(
        InvertedResidualSpec(8, 8, 8, 3, 1, "nn.ReLU6", _se(8)),
        InvertedResidualSpec(8, 32, 16, 5, 2, "nn.Hardswish", _se(32)),
        InvertedResidualSpec(16, 48, 16, 3, 1, "nn.Hardswish", None), channels=16),
    "shufflenet_blocks": lambda: _example_net(
        ShuffleSpec(16, 1, "chunk", "view+transpose+view"), ShuffleSpec(16, 2, "slice", "reshape+permute+flatten"),
        channels=16),
    "convnext_blocks": lambda: _example_net(
        ConvNeXtSpec(16, 7, 4, True, "permute"), ConvNeXtSpec(16, 3, 2, False, "x.permute"), channels=16),
}
