"""The contract between the sample runner (cli.py, runner.py) and each task.

A task (classification, segmentation, detection) knows its models, its on-disk datasets,
its loss and its metric; everything else (command line, training loop, checkpoints,
logging, distributed training, export) is task-independent and lives in runner.py.
"""
from __future__ import annotations

import pathlib

import torch
from torch.utils.data import Dataset


class SampleError(Exception):
    """A user error in a command line, config or data layout: one line, names the problem.
    The CLI prints `fxcompress: error: <message>` to stderr and exits with code 2, writing nothing."""


class Task:  # base class; subclasses override
    name: str = ""            # "classification" | "segmentation" | "detection"
    metric_name: str = ""     # "top1" | "mIoU" | "mAP@0.5"  (higher is better, in [0, 1])

    def known_models(self) -> list[str]:
        """Model names this task can build here (for inference of the task and for errors)."""
        raise NotImplementedError

    def build_model(self, name: str, num_classes: int, config: dict) -> torch.nn.Module:
        """The model called `name`; SampleError for an unknown name (listing the known ones)."""
        raise NotImplementedError

    def build_datasets(self, data_dir: pathlib.Path, config: dict) -> tuple[Dataset, Dataset, int]:
        """(train, val, num_classes); SampleError naming the path and the expected layout."""
        raise NotImplementedError

    def collate_fn(self):
        """The DataLoader collate_fn (None: PyTorch's default)."""
        return None

    def targets_to(self, targets, device):
        return targets.to(device)

    def criterion(self, config: dict):
        """callable(outputs, targets) -> scalar loss."""
        raise NotImplementedError

    def evaluate(self, model, loader, device) -> float:
        """Deterministic metric over the whole loader (model in eval mode, no grad)."""
        raise NotImplementedError

    def example_input(self, config: dict) -> torch.Tensor:
        """A batch shaped as config["input_info"]["sample_size"]."""
        raise NotImplementedError

    def export_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What goes to ONNX."""
        return model
