"""Linear stacks: linear (+norm, activation, dropout), residual and concat blocks over vectors,
flattened images or sequences, and the :func:`mlps` strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from hypothesis import strategies as st

from ..models import ModelCase, seeded
from .base import (_SEEDS, ADD_FORMS, FLATTEN_FORMS, MAX_CHANNELS, GeneratedNet, _act_str,
                   _activate, _add, _finish, _make_act, activations)

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
