"""What every generator shares: size limits, the forms an op is written in (activations,
additions, concatenations, flattens: module, functional and method forms, so fx sees each),
the :class:`GeneratedNet` container and :func:`_finish` (eval mode, randomized norm statistics,
seeded inputs)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from ..models import randomize_norm_layers_

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
