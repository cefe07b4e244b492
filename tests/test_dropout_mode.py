"""Dropout decided from ``self.training`` follows ``gm.train()``/``gm.eval()`` after tracing
(fxcompress/dropout.py): fx freezes the flag at the mode the model was traced in."""
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.dropout import DropoutRate
from fxcompress.passes import Quantize
from fxcompress.tracing import trace


class Attention(nn.Module):
    """transformers' two attention forms: SDPA with ``dropout_p=p if self.training else 0`` and
    eager attention with ``F.dropout(probs, p, training=self.training)``."""

    def __init__(self, sdpa: bool, p: float = 0.5):
        super().__init__()
        self.sdpa, self.p = sdpa, p
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        else:
            probs = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
            y = F.dropout(probs, self.p, training=self.training) @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, 16))


class ConstantDropout(nn.Module):
    """Dropout the model asks for whatever its mode (``training=True`` given explicitly in eval)."""

    def forward(self, x):
        return F.dropout(x, 0.5, training=True) + F.dropout(x, 0.5)


def _inputs():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sdpa", [True, False])
def test_a_model_traced_in_train_mode_stops_dropping_in_eval_mode(sdpa):
    model, x = Attention(sdpa).train(), _inputs()
    gm = trace(model, x)
    gm.eval()
    expected = model.eval()(x)
    assert torch.equal(gm(x), expected) and torch.equal(gm(x), expected)   # no dropout left
    # pickled and restored, the graph keeps the behaviour (the rate is a module, not a frozen constant)
    assert torch.equal(pickle.loads(pickle.dumps(gm))(x), expected)
    gm.train()
    model.train()
    torch.manual_seed(3)
    dropped = gm(x)
    torch.manual_seed(3)
    assert torch.equal(dropped, model(x))   # train mode: the same dropout as the model, draw for draw
    assert not torch.equal(dropped, expected)


def test_a_model_traced_in_eval_mode_drops_again_in_train_mode():
    model, x = Attention(sdpa=False).eval(), _inputs()
    gm = trace(model, x)
    gm.train()
    model.train()
    torch.manual_seed(4)
    dropped = gm(x)
    torch.manual_seed(4)
    assert torch.equal(dropped, model(x)) and not torch.equal(dropped, model.eval()(x))


def test_dropout_the_model_requests_in_every_mode_stays():
    model, x = ConstantDropout().eval(), _inputs()
    gm = trace(model, x)
    assert not any(isinstance(m, (nn.Dropout, DropoutRate)) for m in gm.modules())
    gm.eval()
    torch.manual_seed(5)
    first = gm(x)
    torch.manual_seed(5)
    assert torch.equal(first, model(x)) and not torch.equal(first, gm(x))


def test_quantized_sdpa_attention_compiled_in_train_mode_keeps_its_dropout_in_train_mode_only():
    model, x = Attention(sdpa=True).train(), _inputs()
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=x)
    kinds = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in kinds and kinds.count(torch.matmul) == 2   # decomposed
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in dropouts] == [0.5] and not any(isinstance(m, DropoutRate) for m in gm.modules())
    ctrl.initialize([(x,)])
    gm.eval()
    with torch.no_grad():
        first, second = gm(x), gm(x)
    assert torch.equal(first, second)
    # eval mode: the float model's output within the 8-bit error (here 0.03 of 0.43), not a dropped-out
    # one (p = 0.5 zeroes half the probabilities and doubles the rest)
    with torch.no_grad():
        reference = model.eval()(x)
        assert (first - reference).abs().max() < 0.1 * reference.abs().max()
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm(x), first)
