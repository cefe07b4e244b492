"""Transformer blocks (self-attention in its many written forms, feed-forward, LayerNorm), the
sequence head and the :func:`attention_blocks` strategy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from ..models import ModelCase, seeded
from .base import _SEEDS, ADD_FORMS, MAX_CHANNELS, GeneratedNet, _act_str, _activate, _add, _finish, _make_act

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
