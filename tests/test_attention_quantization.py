"""Int8 attention (issue 15): what OpenVINO's CPU plugin needs, and the placement that gives it.

The minimal ONNX graphs pin the runtime facts docs/transformers.md records ("Int8 attention");
the compile tests check ``Quantize(quantize_attention=...)``: scaled_dot_product_attention
decomposed into matmul / softmax / matmul computing what SDPA computes, quantizers on both inputs
of both matmuls, and none when the option is off.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.passes import Quantize
from fxcompress.quantizers import FakeQuantizer

# -- the runtime facts, on a minimal attention graph --------------------------------------------------

B, H, S, D = 2, 2, 16, 8


def _attention_onnx(q_dtype, probs_dtype, v_dtype):
    """softmax(q·kᵀ · scale + mask)·v on [b, H, s, D] inputs; a dtype of None leaves that input float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits, nodes = [], []

    def qdq(x, dtype, name, scale):
        if dtype is None:
            return x
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"))
        zero_point = 128 if dtype is np.uint8 and name != "p" else 0  # a signed grid written as uint8
        inits.append(numpy_helper.from_array(np.array(zero_point, dtype), f"{name}_zp"))
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_zp"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_zp"], [f"{name}_dq"]))
        return f"{name}_dq"

    q, k, v = (qdq(t, q_dtype if t != "v" else v_dtype, t, 0.05) for t in "qkv")
    inits.append(numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale"))
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", [q, "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)]
    probs = qdq("probs", probs_dtype, "p", 1 / 255)
    nodes.append(helper.make_node("MatMul", [probs, v], ["out"]))
    shape = ["b", H, "s", D]
    inputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, shape) for t in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 1, "s"]))
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("q_dtype, probs_dtype, v_dtype, integer", [
    (np.int8, np.uint8, np.int8, [True, True]),     # what the export writes
    (np.int8, None, np.int8, [True, False]),        # softmax output not quantized: softmax·V in f32
    (np.uint8, np.uint8, np.uint8, [False, True]),  # uint8 q/k (zero point 128): Q·Kᵀ in f32
    (None, np.uint8, np.int8, [False, True]),       # each MatMul needs both of its inputs quantized
])
def test_openvino_runs_attention_matmuls_in_integers_only_with_these_inputs(q_dtype, probs_dtype, v_dtype,
                                                                            integer, tmp_path):
    pytest.importorskip("openvino")
    import onnx
    from fxcompress.runtime import openvino_compile, openvino_compute_layers
    path = tmp_path / "attention.onnx"
    onnx.save(_attention_onnx(q_dtype, probs_dtype, v_dtype), path)
    # unfused: AVX-512 CPUs otherwise run the block as one Subgraph (tests/test_export_runtimes.py
    # checks that it stays integer there)
    report = openvino_compute_layers(openvino_compile(path, precision="f32", fuse_attention=False))
    assert [layer.layer_type for layer in report.layers] == ["MatMul", "MatMul"], report
    assert [layer.integer for layer in report.layers] == integer, report


# -- the placement ----------------------------------------------------------------------------------------

class _Attention(torch.nn.Module):
    """Self-attention in SDPA form with a boolean key mask (and optionally a causal mask)."""

    def __init__(self, causal=False, dim=16, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads, self.causal = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads, causal

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        mask = keep[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if self.causal else mask, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def _compile(model, inputs, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_for_compression(model, [Quantize(**params)], example_inputs=inputs)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[1, 4:] = 0
    return torch.randn(2, 6, 16, generator=g), keep


@pytest.mark.parametrize("causal", [False, True])
def test_decomposed_attention_computes_what_sdpa_computes(causal):
    torch.manual_seed(0)
    model = _Attention(causal).eval()
    ctrl, gm = _compile(model, _inputs(), quantize_attention=True)
    assert "scaled_dot_product_attention" not in gm.code and "softmax" in gm.code
    for module in gm.modules():
        if isinstance(module, FakeQuantizer):
            module.enabled = False
    x, keep = _inputs(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, keep), model(x, keep), rtol=1e-5, atol=1e-6)


def test_both_attention_matmuls_get_quantizers_on_both_inputs():
    torch.manual_seed(0)
    ctrl, gm = _compile(_Attention().eval(), _inputs(), quantize_attention=True)
    matmuls = [n for n in gm.graph.nodes if n.target is torch.matmul]
    assert len(matmuls) == 2
    names = {}
    for matmul in matmuls:
        for operand in matmul.args[:2]:
            while operand.op != "call_module":          # through the view / transpose of q, k, v
                operand = operand.args[0]
            quantizer = gm.get_submodule(operand.target)
            assert isinstance(quantizer, FakeQuantizer) and quantizer.spec.mode == "symmetric"
            names[operand.target] = quantizer.spec.signed
    # q, k, v signed; the softmax output unsigned (OpenVINO: i8 x i8, u8 x i8)
    assert sorted(names.values()) == [False, True, True, True], names
    assert ctrl.parts[0].statistics().summary["quantize_attention"] is True


def test_quantize_attention_false_leaves_attention_in_float():
    torch.manual_seed(0)
    ctrl, gm = _compile(_Attention().eval(), _inputs(), quantize_attention=False)
    assert "scaled_dot_product_attention" in gm.code
    quantizers = [n for n, m in gm.named_modules() if isinstance(m, FakeQuantizer)]
    assert all("attention" not in n for n in quantizers), quantizers
    skipped = ctrl.parts[0].statistics().to_dict()["skipped"]
    assert {"scope": "scaled_dot_product_attention", "reason": "scaled_dot_product_attention left fused "
            "(quantize_attention is false): its matmuls run in float"} in skipped, skipped
