"""Shared by the segmentation and detection sample tests: a plain training loop over a task's
loaders (the sample runner's own loop is tested in test_samples_cli.py) and the ONNX export check."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from fxcompress import compile_for_compression
from fxcompress.passes import Quantize
from fxcompress.runtime import openvino_compile, openvino_infer, run_onnxruntime


def loaders(task, train, val, batch_size):
    generator = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=task.collate_fn()),
            DataLoader(val, batch_size=batch_size, collate_fn=task.collate_fn()))


def train_epochs(task, model, train_loader, config, epochs, lr):
    criterion = task.criterion(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for images, targets in train_loader:
            loss = criterion(model(images), task.targets_to(targets, "cpu"))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def export_int8_and_run(task, model, config, calibration_loader, path):
    """Quantize to int8, export task.export_module(...) to ONNX; return the fake-quantized graph's
    outputs and those of ONNX Runtime's default session and OpenVINO on the example input."""
    model.eval()
    example = task.example_input(config)
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=(example,))
    ctrl.initialize(calibration_loader)
    gm.eval()
    with torch.no_grad():
        expected = gm(example)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert task.export_module(gm) is gm
    ctrl.export_onnx(path)
    ort_outputs = run_onnxruntime(path, example)
    ov_outputs = openvino_infer(openvino_compile(path), example)
    return [t.numpy() for t in expected], [np.asarray(o) for o in ort_outputs], [np.asarray(o) for o in ov_outputs]
