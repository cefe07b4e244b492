"""The detection sample: an own small SSD, and torchvision's SSD300-VGG16 / SSDlite320-MobileNetV3
when torchvision is installed; Pascal VOC layout; the multibox loss; VOC mAP@0.5.

Sample config keys read here: `model`, `model_params` (ssd_small: width, num_maps, aspect_ratios;
torchvision: its builder's keyword arguments), `classes` (else <data>/classes.txt, else VOC's 20),
`input_info.sample_size`, and an optional `detection` object: `neg_pos_ratio` (3),
`match_iou` (0.5), `score_threshold` (0.01), `nms_iou` (0.45), `max_detections` (200).
"""
from __future__ import annotations

import pathlib

import torch
from torch import nn

from fxcompress.samples import voc
from fxcompress.samples.metrics import DetectionAP
from fxcompress.samples.ssd import MultiBoxLoss, SmallSSD, TorchvisionSSDHeads, postprocess
from fxcompress.samples.task import SampleError, Task

TORCHVISION_MODELS = ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large")
DETECTION_DEFAULTS = {"neg_pos_ratio": 3, "match_iou": 0.5, "score_threshold": 0.01, "nms_iou": 0.45,
                      "max_detections": 200}


def _torchvision_detection():
    try:
        import torchvision.models.detection as detection
    except ImportError:
        return None
    return detection


def detection_settings(config: dict) -> dict:
    settings = config.get("detection", {})
    if not isinstance(settings, dict):
        raise SampleError(f"config key 'detection' must be an object, not {type(settings).__name__}")
    unknown = sorted(set(settings) - set(DETECTION_DEFAULTS))
    if unknown:
        raise SampleError(f"config key 'detection.{unknown[0]}' is unknown (known: {', '.join(DETECTION_DEFAULTS)})")
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SampleError(f"config key 'detection.{key}' must be a non-negative number, not {value!r}")
    return {**DETECTION_DEFAULTS, **settings}


class DetectionTask(Task):
    name = "detection"
    metric_name = "mAP@0.5"

    def __init__(self):
        self.priors: torch.Tensor | None = None  # [N, 4] (cx, cy, w, h), set by build_model
        self.settings = dict(DETECTION_DEFAULTS)

    def known_models(self) -> list[str]:
        return ["ssd_small"] + (list(TORCHVISION_MODELS) if _torchvision_detection() is not None else [])

    def build_model(self, name: str, num_classes: int, config: dict) -> nn.Module:
        if config.get("pretrained"):
            raise SampleError(f"config key 'pretrained': the {self.name} sample loads no pretrained weights "
                              f"(nothing downloads); give fp32 weights with --weights")
        params = config.get("model_params", {})
        if not isinstance(params, dict):
            raise SampleError(f"config key 'model_params' must be an object, not {type(params).__name__}")
        self.settings = detection_settings(config)
        height, width = voc.input_size(config)
        if name == "ssd_small":
            try:
                model = SmallSSD(num_classes, **params)
            except (TypeError, ValueError) as error:
                raise SampleError(f"config key 'model_params' for ssd_small: {error}") from error
        elif name in TORCHVISION_MODELS and _torchvision_detection() is not None:
            builder = getattr(_torchvision_detection(), name)
            try:  # never download: weights come from --weights
                model = TorchvisionSSDHeads(builder(weights=None, weights_backbone=None, num_classes=num_classes,
                                                    **params))
            except (TypeError, ValueError) as error:
                raise SampleError(f"config key 'model_params' for {name}: {error}") from error
        else:
            raise SampleError(f"config key 'model': unknown detection model {name!r} "
                              f"(known: {', '.join(self.known_models())})")
        self.priors = model.priors(height, width)
        return model

    def build_datasets(self, data_dir: pathlib.Path, config: dict):
        data_dir = pathlib.Path(data_dir)
        if not data_dir.is_dir():
            raise SampleError(f"data directory {data_dir} does not exist")
        size = voc.input_size(config)
        classes = voc.class_names(data_dir, config)
        # VOC practice: train without the "difficult" objects; evaluation ignores them (metrics.DetectionAP).
        train = voc.VOCDetection(data_dir, "train", classes, size, augment=True, keep_difficult=False)
        val = voc.VOCDetection(data_dir, "val", classes, size)
        return train, val, len(classes) + 1  # + the background class 0

    def collate_fn(self):
        return voc.detection_collate

    def targets_to(self, targets, device):
        return [{key: value.to(device) for key, value in target.items()} for target in targets]

    def _priors(self) -> torch.Tensor:
        if self.priors is None:
            raise RuntimeError("DetectionTask.build_model must run before the loss or the evaluation")
        return self.priors

    def criterion(self, config: dict):
        settings = detection_settings(config)
        return MultiBoxLoss(self._priors, int(settings["neg_pos_ratio"]), float(settings["match_iou"]))

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> float:
        model.eval()
        metric = None
        for images, targets in loader:
            loc, conf = model(images.to(device))
            if metric is None:
                metric = DetectionAP(conf.shape[-1], iou_threshold=0.5)
            detections = postprocess(loc, conf, self._priors(), self.settings["score_threshold"],
                                     self.settings["nms_iou"], max_detections=int(self.settings["max_detections"]))
            for detection, target in zip(detections, targets):
                metric.update(detection, target)
        return metric.mean_ap() if metric is not None else 0.0

    def example_input(self, config: dict) -> torch.Tensor:
        return torch.randn(*voc.sample_size(config), generator=torch.Generator().manual_seed(0))
