"""The segmentation sample: UNet (own) and torchvision's FCN / DeepLabV3 / LR-ASPP when torchvision
is installed; Pascal VOC or CamVid layout; cross-entropy with an ignore index; mean IoU.

Sample config keys read here: `model`, `model_params` (UNet: depth, width, batch_norm, up_mode;
torchvision: its builder's keyword arguments), `dataset` ("voc" | "camvid", else the layout found),
`num_classes`, `classes`, `ignore_index` (255), `input_info.sample_size`.
"""
from __future__ import annotations

import pathlib

import torch
from torch import nn

from fxcompress.samples import voc
from fxcompress.samples.metrics import ConfusionMatrix
from fxcompress.samples.task import SampleError, Task
from fxcompress.samples.unet import UNet

TORCHVISION_MODELS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                      "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")


def _torchvision_segmentation():
    try:
        import torchvision.models.segmentation as segmentation
    except ImportError:
        return None
    return segmentation


class MainOutput(nn.Module):
    """torchvision's segmentation models return {"out": ..., "aux": ...}; the sample (loss, metric,
    ONNX export) uses the main output only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


class SegmentationLoss(nn.CrossEntropyLoss):
    """Cross-entropy over pixels, skipping `ignore_index`; a mask value the model cannot predict is a
    SampleError naming it (cross-entropy itself fails deep inside torch, or silently on CUDA)."""

    def __init__(self, ignore_index: int):
        super().__init__(ignore_index=ignore_index)

    def forward(self, logits, masks):
        labelled = masks[masks != self.ignore_index]
        if labelled.numel() and (int(labelled.max()) >= logits.shape[1] or int(labelled.min()) < 0):
            bad = int(labelled.max()) if int(labelled.max()) >= logits.shape[1] else int(labelled.min())
            raise SampleError(f"a mask holds class index {bad}, but the model predicts {logits.shape[1]} classes "
                              f"(config keys 'num_classes', 'classes', 'ignore_index' {self.ignore_index})")
        return super().forward(logits, masks)


def _model_params(config: dict) -> dict:
    params = config.get("model_params", {})
    if not isinstance(params, dict):
        raise SampleError(f"config key 'model_params' must be an object, not {type(params).__name__}")
    return params


class SegmentationTask(Task):
    name = "segmentation"
    metric_name = "mIoU"

    def __init__(self):
        self.ignore_index = voc.IGNORE_INDEX

    def known_models(self) -> list[str]:
        return ["unet"] + (list(TORCHVISION_MODELS) if _torchvision_segmentation() is not None else [])

    def build_model(self, name: str, num_classes: int, config: dict) -> nn.Module:
        if config.get("pretrained"):
            raise SampleError(f"config key 'pretrained': the {self.name} sample loads no pretrained weights "
                              f"(nothing downloads); give fp32 weights with --weights")
        params = _model_params(config)
        if name == "unet":
            try:
                model = UNet(num_classes, **params)
            except (TypeError, ValueError) as error:
                raise SampleError(f"config key 'model_params' for unet: {error}") from error
            height, width = voc.input_size(config)
            if height % model.size_multiple or width % model.size_multiple:
                raise SampleError(f"config key 'input_info.sample_size': unet of depth {model.depth} needs "
                                  f"height and width divisible by {model.size_multiple}, not {height}x{width}")
            return model
        if name in TORCHVISION_MODELS and _torchvision_segmentation() is not None:
            builder = getattr(_torchvision_segmentation(), name)
            try:  # never download: weights come from --weights
                model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                                **{"aux_loss": False, **params})
            except (TypeError, ValueError) as error:
                raise SampleError(f"config key 'model_params' for {name}: {error}") from error
            return MainOutput(model)
        raise SampleError(f"config key 'model': unknown segmentation model {name!r} "
                          f"(known: {', '.join(self.known_models())})")

    def build_datasets(self, data_dir: pathlib.Path, config: dict):
        data_dir = pathlib.Path(data_dir)
        if not data_dir.is_dir():
            raise SampleError(f"data directory {data_dir} does not exist")
        self.ignore_index = int(config.get("ignore_index", voc.IGNORE_INDEX))
        size = voc.input_size(config)
        layout = voc.segmentation_layout(data_dir, config)
        read = voc.voc_segmentation if layout == "voc" else voc.camvid_segmentation
        train, val = read(data_dir, "train", size, augment=True), read(data_dir, "val", size)
        if config.get("num_classes") is not None:
            num_classes = config["num_classes"]
            if not isinstance(num_classes, int) or num_classes < 2:
                raise SampleError(f"config key 'num_classes' must be an integer >= 2, not {num_classes!r}")
        elif layout == "camvid" and not (data_dir / "classes.txt").is_file():
            num_classes = voc.CAMVID_NUM_CLASSES
        else:
            num_classes = len(voc.class_names(data_dir, config)) + 1  # index 0 is the background
        return train, val, num_classes

    def criterion(self, config: dict):
        return SegmentationLoss(int(config.get("ignore_index", self.ignore_index)))

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> float:
        model.eval()
        matrix = None
        for images, masks in loader:
            logits = model(images.to(device))
            if matrix is None:
                matrix = ConfusionMatrix(logits.shape[1], self.ignore_index)
            matrix.update(logits.argmax(1), masks)
        return matrix.mean_iou() if matrix is not None else 0.0

    def example_input(self, config: dict) -> torch.Tensor:
        return torch.randn(*voc.sample_size(config), generator=torch.Generator().manual_seed(0))
