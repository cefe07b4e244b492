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

The package is split by what it generates: :mod:`.base` (op forms, the net container),
:mod:`.conv_blocks`, :mod:`.deployment_blocks`, :mod:`.cnn` (:func:`conv_nets`), :mod:`.mlp`
(:func:`mlps`) and :mod:`.attention` (:func:`attention_blocks`).  It is the only part of the
testing kit that imports hypothesis.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..models import ModelCase
# Every public name of the former single module stays importable from the package.
from .attention import AttentionBlock, AttentionNetSpec, AttentionSpec, SequenceHead, attention_blocks
from .base import (ACTIVATION_KINDS, ADD_FORMS, CAT_FORMS, FLATTEN_FORMS, FUNCTIONAL_ACTIVATIONS,
                   MAX_CHANNELS, MODULE_ACTIVATIONS, GeneratedNet, activations)
from .cnn import DEPLOYMENT_BLOCKS, EXAMPLE_BLOCK_NETS, ConvNetSpec, conv_nets
from .conv_blocks import (HEAD_POOLS, POOL_KINDS, ConvBlockSpec, ConvBNAct, ConvSpec, Head, HeadSpec,
                          MergeBlock, MergeSpec, PoolBlock, PoolSpec, RareConvBlock, RareConvSpec,
                          ResidualBlock, ResidualSpec, SEBlock, SESpec)
from .deployment_blocks import (MOBILE_ACTIVATIONS, SHUFFLE_FORMS, ConvNeXtBlock, ConvNeXtSpec,
                                InvertedResidual, InvertedResidualSpec, ShuffleSpec, ShuffleUnit,
                                channel_shuffle)
from .mlp import (ConcatLinear, ConcatLinearSpec, LinearBlock, LinearHead, LinearSpec, MLPSpec,
                  ResidualLinear, ResidualLinearSpec, mlps)

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
