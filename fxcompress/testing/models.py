"""Small hand-written architectures for testing a graph compiler.

Every model here is a plain ``nn.Module`` built from standard torch modules,
deterministic given ``seed`` (weights are drawn from a private copy of the
global RNG, which is left untouched), fast on CPU, and traceable by
``torch.fx.symbolic_trace`` -- except :class:`ModelNeedingLeaf`, which needs its
:class:`DataDependentGate` submodule treated as a leaf.  The forward code
deliberately mixes module and functional forms (``nn.ReLU`` and ``F.relu``,
``x + y`` and ``torch.add``, ``torch.flatten`` and ``x.view(x.size(0), -1)``)
because a compiler must treat them alike.

Each model has ``example_input(batch=2, seed=0)`` returning one input tensor.
:data:`ARCHITECTURES` maps a name to a factory returning
``(model, example_inputs)`` with the model in eval mode and its normalization
layers randomized (see :func:`randomize_norm_layers_`) so that BatchNorm is not
an identity.

This module imports only torch: no hypothesis, no other part of fxcompress.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ModelCase",
    "seeded",
    "randomize_norm_layers_",
    "BasicBlockTiny",
    "ResNetTiny",
    "BasicBlock",
    "ResNet",
    "resnet18_like",
    "InvertedResidual",
    "MobileNetV2Tiny",
    "DenseNetTiny",
    "MultiHeadSelfAttention",
    "TransformerEncoderLayerTiny",
    "TransformerEncoderTiny",
    "MLP",
    "DataDependentGate",
    "ModelNeedingLeaf",
    "DigitsCNN",
    "ResidualDigitsCNN",
    "ARCHITECTURES",
    "LEAF_MODULES",
    "leaf_modules_for",
    "build",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@dataclass(repr=False)
class ModelCase:
    """A model plus matching example inputs and a readable description.

    ``repr`` shows only the description (the spec the model was built from), so a
    failing hypothesis example reads as the architecture that broke.  ``spec`` (when
    set) is the object the model was built from; ``spec.build()`` rebuilds an
    identical model.
    """

    model: nn.Module
    example_inputs: tuple[Any, ...]
    description: str
    spec: Any = field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"ModelCase({self.description})"

    __str__ = __repr__


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded to ``seed``, restoring it after.

    ``seed=None`` uses (and advances) the global RNG as usual.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed))


@torch.no_grad()
def randomize_norm_layers_(
    model: nn.Module, seed: int = 0, *, negative_fraction: float = 0.2
) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters, in place.

    BatchNorm: running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5)
    with about ``negative_fraction`` of the channels negated (BN folding must handle
    negative scales), bias ~ N(0, 0.2).  LayerNorm / GroupNorm: weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.2).  Deterministic given ``seed``; returns ``model``.
    """
    g = _generator(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.track_running_stats and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if m.affine:
                w = torch.rand(c, generator=g) + 0.5
                sign = torch.where(torch.rand(c, generator=g) < negative_fraction, -1.0, 1.0)
                m.weight.copy_(w * sign)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


# ---------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------


class BasicBlockTiny(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn + shortcut, then ReLU.

    The shortcut is the identity, or ``downsample`` = Sequential(conv1x1 stride s, bn)
    when the stride or the channel count changes.  ``add`` picks how the residual is
    written: ``"+"``, ``"torch.add"`` or ``"+="``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, add: str = "+"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        if add not in ("+", "torch.add", "+="):
            raise ValueError(f"add must be '+', 'torch.add' or '+=', got {add!r}")
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.add == "torch.add":
            out = torch.add(out, identity)
        elif self.add == "+=":
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class ResNetTiny(nn.Module):
    """A tiny ResNet: stem conv-bn-relu, three BasicBlocks (identity residual,
    a stride-2 block with a 1x1-conv ``downsample`` branch, another stride-2
    block), adaptive avgpool, flatten, linear.

    Input: float ``[B, in_channels, 32, 32]`` (any size >= 8 works).
    Output: ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 3,
                 *, seed: int | None = 0):
        super().__init__()
        self.in_channels = in_channels
        with seeded(seed):
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = BasicBlockTiny(width, width, 1, add="+")
            self.layer2 = BasicBlockTiny(width, 2 * width, 2, add="torch.add")
            self.layer3 = BasicBlockTiny(2 * width, 4 * width, 2, add="+=")
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def example_input(self, batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
        return _randn(batch, self.in_channels, size, size, seed=seed)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (same attribute names and forward)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet layout with BasicBlocks and a configurable base width.

    Attribute names match torchvision (``conv1``, ``bn1``, ``relu``, ``maxpool``,
    ``layer1``..``layer4``, ``layerN.i.conv1``, ``layerN.0.downsample.0``,
    ``avgpool``, ``fc``), so NNCF-style scopes written for torchvision carry over,
    and so do state_dict keys (with ``width=64``).
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000,
                 width: int = 64, in_channels: int = 3, *, seed: int | None = 0):
        super().__init__()
        self.in_channels = in_channels
        with seeded(seed):
            self.inplanes = width
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(width, layers[0])
            self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
            self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
            self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(8 * width, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def example_input(self, batch: int = 2, seed: int = 0, size: int = 224) -> torch.Tensor:
        return _randn(batch, self.in_channels, size, size, seed=seed)


def resnet18_like(num_classes: int = 1000, width: int = 64, *, seed: int | None = 0) -> ResNet:
    """The ResNet-18 topology (torchvision layout and names); ``width=64`` is the real
    ResNet-18 (11,689,512 parameters with 1000 classes).  Meant for 224x224 inputs;
    any input >= 32x32 works."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width, seed=seed)


# ---------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------


class ConvBNReLU6(nn.Sequential):
    """Conv2d-BatchNorm2d-ReLU6 as a Sequential (torchvision's Conv2dNormActivation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand conv-bn-ReLU6] - 3x3 depthwise conv-bn-ReLU6 -
    1x1 project conv-bn, plus ``x +`` when stride is 1 and channels are equal."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),                # project
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Tiny(nn.Module):
    """A tiny MobileNetV2: stem conv stride 2, four inverted residual blocks (two with
    residual adds), a grouped 1x1 conv (groups=4) with functional ReLU6, adaptive
    avgpool, ``x.view(x.size(0), -1)``, dropout, linear.

    Input: float ``[B, in_channels, 32, 32]``.  Output: ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, seed: int | None = 0):
        super().__init__()
        self.in_channels = in_channels
        with seeded(seed):
            self.features = nn.Sequential(
                ConvBNReLU6(in_channels, 8, stride=2),
                InvertedResidual(8, 8, 1, expand_ratio=1),
                InvertedResidual(8, 16, 2, expand_ratio=2),
                InvertedResidual(16, 16, 1, expand_ratio=2),
                InvertedResidual(16, 24, 2, expand_ratio=2),
            )
            self.conv_last = nn.Conv2d(24, 32, 1, bias=False, groups=4)  # grouped conv
            self.bn_last = nn.BatchNorm2d(32)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.relu6(self.bn_last(self.conv_last(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = x.view(x.size(0), -1)
        return self.classifier(x)

    def example_input(self, batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
        return _randn(batch, self.in_channels, size, size, seed=seed)


# ---------------------------------------------------------------------------
# DenseNet
# ---------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """torchvision's dense layer: cat(list of features) - bn-relu-conv1x1 - bn-relu-conv3x3."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(in_channels + i * growth_rate,
                                                     growth_rate, bn_size)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetTiny(nn.Module):
    """A tiny DenseNet (torchvision layout): stem conv, dense block (3 layers,
    growth 8, every layer concatenating all previous features with ``torch.cat``),
    transition (bn-relu-conv1x1-avgpool, halving channels), dense block (2 layers),
    final bn, functional ReLU, adaptive avgpool, flatten, linear.

    Channels: 16 -> 40 -> 20 -> 36.  Input: float ``[B, in_channels, 16, 16]``.
    Output: ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, growth_rate: int = 8,
                 *, seed: int | None = 0):
        super().__init__()
        self.in_channels = in_channels
        with seeded(seed):
            c = 16
            feats: "OrderedDict[str, nn.Module]" = OrderedDict(
                conv0=nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
                norm0=nn.BatchNorm2d(c),
                relu0=nn.ReLU(inplace=True),
            )
            feats["denseblock1"] = _DenseBlock(3, c, growth_rate, bn_size=2)
            c += 3 * growth_rate
            feats["transition1"] = _Transition(c, c // 2)
            c //= 2
            feats["denseblock2"] = _DenseBlock(2, c, growth_rate, bn_size=2)
            c += 2 * growth_rate
            feats["norm5"] = nn.BatchNorm2d(c)
            self.features = nn.Sequential(feats)
            self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)

    def example_input(self, batch: int = 2, seed: int = 0, size: int = 16) -> torch.Tensor:
        return _randn(batch, self.in_channels, size, size, seed=seed)


# ---------------------------------------------------------------------------
# Transformer encoder
# ---------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """Self-attention written out as in Hugging Face BERT: ``query``/``key``/``value``
    linears, ``matmul(q, k^T) / sqrt(d)``, softmax, dropout, ``matmul(p, v)``, heads
    merged, output projection ``out_proj``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.all_head_size = dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), x.size(1), self.num_heads, self.head_dim)
        return x.permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1)
        probs = self.dropout(probs)
        context = torch.matmul(probs, v)
        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(x.size(0), x.size(1), self.all_head_size)
        return self.out_proj(context)


class TransformerEncoderLayerTiny(nn.Module):
    """Post-LayerNorm encoder layer (as BERT): x = LN(x + attn(x)); x = LN(x + FFN(x)),
    FFN = linear - GELU - linear."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attention = MultiHeadSelfAttention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, ff_dim)
        self.act = nn.GELU()
        self.output = nn.Linear(ff_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        h = self.output(self.act(self.intermediate(x)))
        return self.norm2(torch.add(x, self.dropout(h)))


class TransformerEncoderTiny(nn.Module):
    """A tiny transformer encoder classifier.

    ``input_mode="tokens"`` (default): input is int64 token ids ``[B, T]`` (values in
    ``[0, vocab_size)``, ``T <= max_len``), embedded with ``nn.Embedding`` plus a
    learned positional parameter.  ``input_mode="features"``: input is float
    ``[B, T, in_features]`` mapped by a linear ``input_proj``.  Then
    ``num_layers`` post-LN encoder layers (explicit multi-head self-attention with
    ``query``/``key``/``value`` linears, GELU feed-forward), mean pooling over
    tokens, linear ``classifier``.  Output: ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 4, *, input_mode: str = "tokens",
                 vocab_size: int = 32, in_features: int = 12, dim: int = 16,
                 num_heads: int = 2, ff_dim: int = 32, num_layers: int = 2,
                 max_len: int = 16, seq_len: int = 8, dropout: float = 0.1,
                 seed: int | None = 0):
        super().__init__()
        if input_mode not in ("tokens", "features"):
            raise ValueError(f"input_mode must be 'tokens' or 'features', got {input_mode!r}")
        self.input_mode = input_mode
        self.vocab_size = vocab_size
        self.in_features = in_features
        self.seq_len = seq_len
        with seeded(seed):
            if input_mode == "tokens":
                self.embedding = nn.Embedding(vocab_size, dim)
            else:
                self.input_proj = nn.Linear(in_features, dim)
            self.pos_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)
            self.layers = nn.ModuleList(
                TransformerEncoderLayerTiny(dim, num_heads, ff_dim, dropout)
                for _ in range(num_layers)
            )
            self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mode == "tokens":
            h = self.embedding(x)
        else:
            h = self.input_proj(x)
        h = h + self.pos_embedding[: x.size(1)]
        for layer in self.layers:
            h = layer(h)
        pooled = h.mean(dim=1)
        return self.classifier(pooled)

    def example_input(self, batch: int = 2, seed: int = 0, seq_len: int | None = None) -> torch.Tensor:
        t = self.seq_len if seq_len is None else seq_len
        if self.input_mode == "tokens":
            return torch.randint(0, self.vocab_size, (batch, t), generator=_generator(seed))
        return _randn(batch, t, self.in_features, seed=seed)


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear-ReLU-Dropout stack: ``torch.flatten(x, 1)``, then for each hidden width
    a Linear, a ReLU (``nn.ReLU`` on even layers, ``F.relu`` on odd ones) and
    ``nn.Dropout``; then the linear ``head``.

    Input: float ``[B, in_features]`` (or anything flattening to it).
    Output: ``[B, num_classes]``.
    """

    def __init__(self, in_features: int = 16, hidden: Sequence[int] = (32, 32),
                 num_classes: int = 10, dropout: float = 0.1, *, seed: int | None = 0):
        super().__init__()
        self.in_features = in_features
        with seeded(seed):
            widths = [in_features, *hidden]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
            self.relu = nn.ReLU()
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = self.relu(x) if i % 2 == 0 else F.relu(x)
            x = self.dropout(x)
        return self.head(x)

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return _randn(batch, self.in_features, seed=seed)


# ---------------------------------------------------------------------------
# A model that needs a leaf module to trace
# ---------------------------------------------------------------------------


class DataDependentGate(nn.Module):
    """Gates its input with Python control flow on the data: plain fx tracing fails
    here ("symbolically traced variables cannot be used as inputs to control flow");
    tracing works when this module is a leaf."""

    def __init__(self, channels: int):
        super().__init__()
        self.logit = nn.Parameter(torch.linspace(-1.0, 1.0, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * torch.sigmoid(self.logit).view(1, -1, 1, 1)
        return x * 0.5


class ModelNeedingLeaf(nn.Module):
    """conv-bn, ``gate`` (a :class:`DataDependentGate`), relu, conv-relu, adaptive
    avgpool, flatten, linear.  Trace it with ``DataDependentGate`` as a leaf
    (:attr:`leaf_modules`).

    Input: float ``[B, in_channels, 16, 16]``.  Output: ``[B, num_classes]``.
    """

    leaf_modules: tuple[type[nn.Module], ...] = (DataDependentGate,)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, seed: int | None = 0):
        super().__init__()
        self.in_channels = in_channels
        with seeded(seed):
            self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.gate = DataDependentGate(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.gate(x)
        x = torch.relu(x)
        x = self.conv2(x).relu()
        x = self.pool(x)
        x = x.flatten(1)
        return self.fc(x)

    def example_input(self, batch: int = 2, seed: int = 0, size: int = 16) -> torch.Tensor:
        return _randn(batch, self.in_channels, size, size, seed=seed)


# ---------------------------------------------------------------------------
# Digits CNN
# ---------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """CNN for the 8x8 sklearn digits: conv1(1->16)-bn1-relu, conv2(16->32)-bn2-relu,
    maxpool 2 (8x8 -> 4x4), conv3(32->32)-bn3-relu, flatten (512) -> ``fc`` (->10).

    Input: float ``[B, 1, 8, 8]`` (normalized as in :mod:`fxcompress.testing.data`).
    Output: logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, *, seed: int | None = 0):
        super().__init__()
        with seeded(seed):
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(32)
            self.pool = nn.MaxPool2d(2)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(32)
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)

    def example_input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return _randn(batch, 1, 8, 8, seed=seed)


class ResidualDigitsCNN(nn.Module):
    """conv1 -> [conv2 -> conv3] + skip -> max pool -> conv4 -> fc, for the 8x8 digits: every channel
    group prunable, one of them joined by a residual add (the pruning-recovery and LeGR model).
    Initialized from the global RNG (callers seed it)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv4, self.bn4 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(F.relu(x + self.bn3(self.conv3(y))))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


def _factory(ctor: Callable[[], nn.Module], **input_kwargs: Any
             ) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def make() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model = ctor()
        randomize_norm_layers_(model, seed=1)
        model.eval()
        return model, (model.example_input(**input_kwargs),)  # type: ignore[operator]

    make.__doc__ = f"{getattr(ctor, '__name__', ctor)}: (model in eval mode, example inputs)"
    return make


#: name -> factory returning ``(model, example_inputs)``; the model is freshly built
#: (seed 0), in eval mode, with randomized norm layers; example_inputs is a tuple of
#: one tensor (batch 2).
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    # [2, 3, 32, 32] -> [2, 10]
    "resnet_tiny": _factory(ResNetTiny),
    # ResNet-18 topology at width 8 (16..64 channels), [2, 3, 32, 32] -> [2, 10]
    "resnet18_like": _factory(lambda: resnet18_like(num_classes=10, width=8), size=32),
    # [2, 3, 32, 32] -> [2, 10]
    "mobilenet_v2_tiny": _factory(MobileNetV2Tiny),
    # [2, 3, 16, 16] -> [2, 10]
    "densenet_tiny": _factory(DenseNetTiny),
    # int64 token ids [2, 8] in [0, 32) -> [2, 4]
    "transformer_encoder_tiny": _factory(TransformerEncoderTiny),
    # float [2, 8, 12] -> [2, 4]
    "transformer_encoder_tiny_features": _factory(
        lambda: TransformerEncoderTiny(input_mode="features")),
    # [2, 16] -> [2, 10]
    "mlp": _factory(MLP),
    # [2, 3, 16, 16] -> [2, 10]; needs DataDependentGate as a leaf
    "model_needing_leaf": _factory(ModelNeedingLeaf),
    # [2, 1, 8, 8] -> [2, 10]
    "digits_cnn": _factory(DigitsCNN),
}

#: name -> leaf module classes that architecture needs to trace (absent: none).
LEAF_MODULES: dict[str, tuple[type[nn.Module], ...]] = {
    "model_needing_leaf": ModelNeedingLeaf.leaf_modules,
}


def leaf_modules_for(name: str) -> tuple[type[nn.Module], ...]:
    """The module classes that must be leaves to fx-trace ``ARCHITECTURES[name]``
    (empty for plainly traceable models)."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return LEAF_MODULES.get(name, ())


def build(name: str) -> ModelCase:
    """``ARCHITECTURES[name]()`` as a :class:`ModelCase`."""
    model, inputs = ARCHITECTURES[name]()
    return ModelCase(model, inputs, name)
