"""A compressed GraphModule under ``torch.compile``: one graph, no breaks at the quantizers or masks
(the ops have fake kernels and autograd formulas), and the same forward and gradients as eager.
Quantizers reach the compiler as ATen ops (fxcompress.ops.decomposed), so Inductor can fuse them.

AOTAutograd (``aot_eager`` and the capturing backend below) traces forward and backward with fake
tensors, as Inductor does, into the graphs Inductor compiles, without generating code, so these
tests need no C++ compiler and stay fast; Inductor itself is the ``slow`` test's and
benchmarks/bench_qat_step.py's.
"""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.passes import MagnitudeSparsity, Quantize
from fxcompress.quantizers import FakeQuantizer
from fxcompress.testing import DigitsCNN, ResNetTiny, TransformerEncoderTiny

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402

FAKE_QUANTIZE_OPS = (torch.ops.fxcompress.fake_quantize.default, torch.ops.fxcompress.fake_quantize_backward.default,
                     torch.ops.fxcompress.fake_quantize_learnable.default,
                     torch.ops.fxcompress.fake_quantize_learnable_backward.default)


def _compressed(passes):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(DigitsCNN(seed=0), passes, example_inputs=(x[:2],), copy=True)
    ctrl.initialize([x])
    gm.train()
    return gm, x


def test_compressed_graph_compiles_to_one_graph_with_eager_numerics():
    gm, x = _compressed([MagnitudeSparsity(sparsity_init=0.5), Quantize(bits=8)])  # masks and quantizers
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer) and m.enabled]
    graphs, aten_graphs = [], []

    def capture(graph_module, example_inputs):  # AOTAutograd's forward and backward graphs, run as they are
        aten_graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    def capturing_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_autograd(fw_compiler=capture, bw_compiler=capture)(graph_module, example_inputs)

    dynamo.reset()
    # fullgraph=True: a graph break anywhere (a quantizer, a mask) is an error, not a split
    compiled = torch.compile(gm, backend=capturing_backend, fullgraph=True)
    y = torch.randint(0, 10, (x.shape[0],))
    params = [p for p in gm.parameters() if p.requires_grad]
    # train mode: BatchNorm updates its running statistics, so each side gets its own copy
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    loss_compiled = F.cross_entropy(compiled(x), y)
    grads_compiled = torch.autograd.grad(loss_compiled, params)
    gm.load_state_dict(state)
    loss_eager = F.cross_entropy(gm(x), y)
    grads_eager = torch.autograd.grad(loss_eager, params)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1 and len(aten_graphs) == 2  # one graph; its forward and backward
    forward, backward = ([n.target for n in g.graph.nodes if n.op == "call_function"] for g in aten_graphs)
    # The quantizers reach the compiler as ATen ops (a round of x and of the zero point each), which
    # Inductor fuses with their neighbours; the masks stay ops.
    assert not any(op in FAKE_QUANTIZE_OPS for op in forward + backward)
    assert forward.count(torch.ops.aten.round.default) == 2 * len(quantizers) > 0
    assert torch.ops.fxcompress.apply_mask.default in forward
    scale_grads = 0
    for (name, p), a, b in zip([(n, p) for n, p in gm.named_parameters() if p.requires_grad], grads_compiled,
                               grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        scale_grads += "quantizer" in name and bool(b.abs().sum() > 0)
    assert scale_grads > 0  # the learnable ranges get gradients through the compiled graph too


def _qat_graph(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=(x,), copy=True)
    ctrl.initialize([x])
    return gm.train()


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_qat_graph_has_no_graph_breaks_and_keeps_every_quantizer_as_one_op(name):
    """The graphs bench_qat_step.py times under Inductor: a residual CNN (BN, residual adds) and a
    post-LN encoder (attention matmuls, softmax, GELU, LayerNorm, signed and unsigned quantizers).
    Each quantizer must be one autograd.Function (fxcompress.ops.decomposed: the op's formula in
    ATen ops) inside the single graph, none the op itself: a ``.item()`` or a branch on a value
    would show as a graph break, the op as a call Inductor cannot fuse."""
    torch.manual_seed(0)
    if name == "resnet":
        model, x = ResNetTiny(num_classes=10, width=8, seed=0), torch.randn(4, 3, 16, 16)
    else:
        model = TransformerEncoderTiny(num_classes=4, dim=16, num_heads=2, ff_dim=32, num_layers=1, dropout=0.0)
        x = model.example_input(batch=4)
    gm = _qat_graph(model, x)
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer) and m.enabled]
    dynamo.reset()
    explained = dynamo.explain(gm)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    targets = [n.target for n in explained.graphs[0].graph.nodes if n.op == "call_function"]
    for fake_quantize in (torch.ops.fxcompress.fake_quantize, torch.ops.fxcompress.fake_quantize_learnable):
        assert fake_quantize not in targets and fake_quantize.default not in targets
    assert len(quantizers) > 4 and [str(t) for t in targets].count("autograd_function_apply") == len(quantizers)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor's CPU backend needs a C++ compiler")
def test_qat_step_under_inductor_matches_eager():
    """Inductor itself, on the digits CNN's QAT graph (minutes to compile on a small machine): one
    graph, the generated code calls no fxcompress op (the quantizers fused in its loops), and the
    loss and gradients equal eager's. Tolerances: Inductor computes the fused BatchNorm in another
    float32 order than eager, so an activation at a rounding tie can land one step over."""
    gm, x = _compressed([Quantize(bits=8)])
    y = torch.randint(0, 10, (x.shape[0],))
    params = [p for p in gm.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    dynamo.reset()
    compiled = torch.compile(gm, backend="inductor", fullgraph=True)
    from torch._inductor.utils import run_and_get_code
    out, code = run_and_get_code(compiled, x)
    loss_compiled = F.cross_entropy(out, y)
    # the backward is compiled here or with the forward, depending on the torch version
    grads_compiled, backward_code = run_and_get_code(torch.autograd.grad, loss_compiled, params)
    code = code + backward_code
    assert code and not any("fxcompress" in c for c in code)
    gm.load_state_dict(state)
    loss_eager = F.cross_entropy(gm(x), y)
    grads_eager = torch.autograd.grad(loss_eager, params)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip([(n, p) for n, p in gm.named_parameters() if p.requires_grad], grads_compiled,
                               grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
