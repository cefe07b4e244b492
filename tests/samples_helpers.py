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


def run_cli(*args) -> int:
    from fxcompress.samples.cli import main
    return main([str(a) for a in args])


def assert_nested_equal(a, b, path="checkpoint"):
    """Checkpoints (nested dicts/lists of tensors and numbers) equal bitwise, naming the first difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_nested_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def resume_matches_uninterrupted(config_file, data, full_dir, tmp_path, capsys):
    """Train one epoch, resume to the config's end: the last checkpoint equals the uninterrupted run's."""
    log_dir = tmp_path / "interrupted"
    assert run_cli("train", "--config", config_file, "--data", data, "--log-dir", log_dir, "--epochs", 1) == 0
    assert run_cli("train", "--config", config_file, "--data", data, "--resume", log_dir / "last.pth") == 0
    assert "resumed from epoch 1" in capsys.readouterr().out
    full = torch.load(full_dir / "last.pth", weights_only=True)
    resumed = torch.load(log_dir / "last.pth", weights_only=True)
    for key in ("model", "optimizer", "controller", "metric", "history"):
        if key == "history":  # wall-clock seconds differ
            for row in full[key] + resumed[key]:
                row.pop("seconds")
        assert_nested_equal(full[key], resumed[key], key)
