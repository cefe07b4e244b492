"""Does every architecture's int8 export load and agree in ONNX Runtime and OpenVINO?

For each model: ``Quantize(bits=8, quantize_outputs=True)`` (the output gets a quantizer,
so "one step at the output" is defined), ``initialize()`` on a few random batches,
``export_onnx()``, then

- ONNX Runtime at every optimization level (``all`` = the default session,
  ``ext``, ``basic``, ``none``): loads? max |error| at the output in steps of the
  output quantizer, against the fake-quantized graph;
- OpenVINO CPU with ``INFERENCE_PRECISION_HINT=f32``: loads? the same error;
  convs/matmuls that run in integers (``openvino_compute_layers``);
- per quantizer (``--per-quantizer``, default ONNX Runtime's default session and
  OpenVINO): every activation quantizer, computed by the runtime and by the
  fake-quantized graph from the same exact values of the quantizers upstream,
  in that quantizer's steps (``fxcompress.testing.agreement``; one runtime call
  per model): more than one step there is a lowering or runtime difference, not
  an amplified rounding flip.

Models: the project's zoo and blocks (MobileNetV3-like, ShuffleNet-like,
ConvNeXt-like, attention), a tiny Hugging Face BERT and GPT-2 when
``transformers`` is installed, and torchvision / timm models (random weights,
nothing downloaded) when those are installed (``--zoo torchvision``).

    .venv/bin/python benchmarks/check_export_runtimes.py                 # project models, ~5 min on 2 cores
    .venv/bin/python benchmarks/check_export_runtimes.py --models mobilenet_v3_blocks --per-quantizer ort_all
    /path/to/venv-with-torchvision/bin/python benchmarks/check_export_runtimes.py --zoo torchvision
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

ROOT = use_this_checkout()

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import (ORT_LEVELS, openvino_compile, openvino_compute_layers, openvino_infer,  # noqa: E402
                                run_onnxruntime)
from fxcompress.testing import build  # noqa: E402
from fxcompress.testing.agreement import quantizer_agreement  # noqa: E402

LEVELS = ORT_LEVELS


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------------

class _HuggingFaceOutput(nn.Module):
    """A Hugging Face model taking one tensor by keyword and giving one field of its output (``fixed``:
    further keyword arguments of every call)."""

    def __init__(self, model: nn.Module, input_name: str, output: str, **fixed):
        super().__init__()
        self.model, self.input_name, self.output, self.fixed = model, input_name, output, fixed

    def forward(self, x):
        return getattr(self.model(**{self.input_name: x}, **self.fixed), self.output)


def _token_ids():
    return (torch.randint(0, 100, (2, 8)),)


def _bert():
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return _HuggingFaceOutput(BertModel(config).eval(), "input_ids", "last_hidden_state"), _token_ids()


def _gpt2():
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return (_HuggingFaceOutput(GPT2Model(config).eval(), "input_ids", "last_hidden_state", use_cache=False),
            _token_ids())


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return _HuggingFaceOutput(BertForSequenceClassification(config).eval(), "input_ids", "logits"), _token_ids()


def _hf_vit():
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    model = ViTModel(config, add_pooling_layer=False).eval()
    return _HuggingFaceOutput(model, "pixel_values", "last_hidden_state"), (torch.randn(2, 3, 32, 32),)


def project_models() -> dict:
    from fxcompress.testing import strategies as blocks  # needs hypothesis (dev extras)

    def zoo(name):
        return lambda: (lambda c: (c.model, c.example_inputs))(build(name))

    out = {name: zoo(name) for name in ("resnet_tiny", "mobilenet_v2_tiny", "densenet_tiny", "mlp",
                                        "transformer_encoder_tiny_features")}
    out.update({name: (lambda f=factory: (f(), (torch.randn(2, 3, 16, 16),)))
                for name, factory in blocks.EXAMPLE_BLOCK_NETS.items()})
    if importlib.util.find_spec("transformers") is not None:
        out.update({"hf_bert": _bert, "hf_gpt2": _gpt2})
    return out


def torchvision_models() -> dict:
    import timm
    import torchvision.models as tv
    image = lambda size=64: (torch.randn(2, 3, size, size),)  # noqa: E731
    out = {name: (lambda n=name: (getattr(tv, n)(weights=None).eval(), image()))
           for name in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                        "efficientnet_b0", "mnasnet1_0", "shufflenet_v2_x1_0", "regnet_x_400mf", "regnet_y_400mf",
                        "convnext_tiny", "squeezenet1_1", "densenet121")}
    out["googlenet"] = lambda: (tv.googlenet(weights=None, aux_logits=False, init_weights=True).eval(), image())
    out["timm_vit_tiny"] = lambda: (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
                                    .eval(), image())
    out.update({"hf_bert": _bert, "hf_bert_classifier": _bert_classifier, "hf_gpt2": _gpt2, "hf_vit": _hf_vit})
    return out


# -- checks ------------------------------------------------------------------------------------

def _output_step(gm) -> float:
    """One step of the quantizer on the model's output (quantize_outputs=True puts one there)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if module is None or not hasattr(module, "effective_scale"):
        raise RuntimeError("the output is not quantized")
    return float(module.effective_scale().detach().max())


def check(name: str, model: nn.Module, inputs: tuple, folder: Path, per_quantizer=("ort_all", "ov"),
          bn_adaptation: bool = True) -> dict:
    model.eval()
    init = {} if bn_adaptation else {"initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}}
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8, quantize_outputs=True, **init)],
                                       example_inputs=inputs)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(x if not x.is_floating_point() else torch.randn(x.shape, generator=g) for x in inputs)
               for _ in range(3)]
    ctrl.initialize(batches)
    gm.eval()
    path = ctrl.export_onnx(folder / f"{name}.onnx")
    with torch.no_grad():
        expected = gm(*inputs).numpy()
    step = _output_step(gm)
    row = {"model": name}
    for level in LEVELS:
        try:
            runtime = run_onnxruntime(path, *inputs, threads=1, level=level)[0]
            row[f"ort_{level}"] = float(np.abs(runtime - expected).max()) / step
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row[f"ort_{level}"] = f"FAIL: {str(exc).splitlines()[0][:120]}"
    try:
        compiled = openvino_compile(path, precision="f32")
        row["ov"] = float(np.abs(openvino_infer(compiled, *inputs)[0] - expected).max()) / step
        # attention's MatMuls counted one by one (AVX-512 CPUs fuse them into one Subgraph otherwise)
        report = openvino_compute_layers(openvino_compile(path, precision="f32", fuse_attention=False))
        row["ov_int8"] = f"{len(report.integer)}/{len(report.layers)}"
    except Exception as exc:  # noqa: BLE001
        row["ov"] = f"FAIL: {str(exc).splitlines()[0][:120]}"
    if per_quantizer:
        lowered = ctrl.lower()
        for runtime in per_quantizer:
            agreement = quantizer_agreement(gm, lowered, path, inputs, runtime)
            log(f"  {agreement}")
            worst = agreement.worst(1)
            row[f"q_{runtime}"] = f"{agreement.max_steps:.2f}" + (f" ({worst[0].name})" if worst and
                                                                   agreement.max_steps > 1.001 else "")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("project", "torchvision"), default="project")
    parser.add_argument("--models", nargs="*", help="only these")
    parser.add_argument("--per-quantizer", nargs="*", default=["ort_all", "ov"], metavar="RUNTIME",
                        help="runtimes (ort_all, ort_ext, ort_basic, ort_none, ov) for the per-quantizer check "
                             "(none: skip it)")
    parser.add_argument("--no-bn-adaptation", action="store_true",
                        help="initialize() without BatchNorm adaptation (the model's own statistics)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    factories = project_models() if args.zoo == "project" else torchvision_models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in factories.items():
            if args.models and name not in args.models:
                continue
            log(f"{name} ...")
            try:
                model, inputs = factory()
                rows.append(check(name, model, inputs, Path(tmp), args.per_quantizer, not args.no_bn_adaptation))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
                traceback.print_exc()
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"})
            log(rows[-1])
    print(table(rows))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def table(rows) -> str:
    head = ("| model | ORT default (all) | ORT extended | ORT basic | ORT disabled | OpenVINO f32 | "
            "per quantizer, ORT default | per quantizer, OpenVINO | OV int8 convs/matmuls |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | export failed: {r['error']} |||||||")
            continue
        lines.append("| " + " | ".join([r["model"]] + [_cell(r.get(k)) for k in
                                                       ("ort_all", "ort_ext", "ort_basic", "ort_none", "ov",
                                                        "q_ort_all", "q_ov", "ov_int8")]) + " |")
    return "\n".join(lines) + "\n\nerrors: max |runtime - fake-quantized| at the output, in steps of the output " \
                              "quantizer (FAIL: the session does not load); per quantizer: the largest error of any " \
                              "activation quantizer, runtime against graph from the same exact upstream values, in its steps " \
                              "(fxcompress.testing.agreement)"


if __name__ == "__main__":
    main()
