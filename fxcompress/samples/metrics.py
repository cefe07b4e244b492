"""The sample metrics: mean IoU (segmentation) and VOC mAP@0.5 (detection), plus box IoU and NMS.

Both metrics accumulate over a whole validation set and are deterministic: they depend on the
predictions only, never on batch order or size.
"""
from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Pixel counts `matrix[true, predicted]` over a dataset; pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """predicted, target: integer class maps of the same shape."""
        predicted, target = predicted.reshape(-1).cpu().long(), target.reshape(-1).cpu().long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        pairs = target[keep] * self.num_classes + predicted[keep]
        self.matrix += torch.bincount(pairs, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def iou_per_class(self) -> torch.Tensor:
        """IoU of each class (NaN for a class absent from both targets and predictions)."""
        m = self.matrix.double()
        intersection = m.diag()
        union = m.sum(0) + m.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))

    def mean_iou(self) -> float:
        """Mean over the classes that occur (in targets or predictions), as torchmetrics/NNCF do."""
        iou = self.iou_per_class()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if present.any() else 0.0


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix [len(a), len(b)] of boxes in (x1, y1, x2, y2), continuous coordinates."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first
    (torchvision.ops.nms's semantics: a box is dropped if its IoU with a kept box is > threshold)."""
    order = torch.argsort(scores, descending=True, stable=True)
    overlapping = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlapping[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.nms when torchvision imports (compiled, fast), else nms_reference."""
    try:
        from torchvision.ops import nms as tv_nms
    except ImportError:
        return nms_reference(boxes, scores, iou_threshold)
    return tv_nms(boxes, scores, iou_threshold)


def average_precision(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """VOC all-point interpolated AP (VOC2010+ devkit, `use_07_metric=False`): the area under the
    precision envelope (precision made non-increasing in recall), summed where recall changes."""
    r = torch.cat([torch.zeros(1, dtype=torch.float64), recall.double(), torch.ones(1, dtype=torch.float64)])
    p = torch.cat([torch.zeros(1, dtype=torch.float64), precision.double(), torch.zeros(1, dtype=torch.float64)])
    p = torch.flip(torch.cummax(torch.flip(p, [0]), 0).values, [0])
    steps = torch.nonzero(r[1:] != r[:-1]).flatten()
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


class DetectionAP:
    """VOC-style mAP: detections of each class over all images, sorted by score, each matched to the
    unmatched ground-truth box of its class and image with the highest IoU if that IoU >= threshold
    (true positive) else a false positive; detections matched to a `difficult` box count as neither,
    and difficult boxes are not in the recall's denominator. mAP averages the AP of the classes that
    have at least one non-difficult ground-truth box. Boxes are continuous (no VOC +1 pixel)."""

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, background: int | None = 0):
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.background = background
        self.images: list[tuple[dict, dict]] = []

    def update(self, detections: dict, ground_truth: dict) -> None:
        """One image. detections: boxes [n,4], scores [n], labels [n];
        ground_truth: boxes [m,4], labels [m], optional difficult [m] (bool)."""
        det = {k: detections[k].detach().cpu() for k in ("boxes", "scores", "labels")}
        gt = {k: ground_truth[k].detach().cpu() for k in ("boxes", "labels")}
        difficult = ground_truth.get("difficult")
        gt["difficult"] = (torch.zeros(len(gt["labels"]), dtype=torch.bool) if difficult is None
                           else difficult.detach().cpu().bool())
        self.images.append((det, gt))

    def class_ap(self, cls: int) -> float | None:
        """AP of one class; None when it has no non-difficult ground truth."""
        records = []  # (score, image index, IoUs of this detection with the image's boxes of the class)
        matches = []  # per image: (difficult flags, matched flags) of its boxes of the class
        positives = 0
        for index, (det, gt) in enumerate(self.images):
            mask, dmask = gt["labels"] == cls, det["labels"] == cls
            difficult = gt["difficult"][mask].tolist()
            matches.append((difficult, [False] * len(difficult)))
            positives += len(difficult) - sum(difficult)
            ious = box_iou(det["boxes"][dmask], gt["boxes"][mask]).tolist()
            records += [(score, index, row) for score, row in zip(det["scores"][dmask].tolist(), ious)]
        if positives == 0:
            return None
        # Stable sort on score alone: ties keep image order, so the result never depends on batching.
        records.sort(key=lambda r: -r[0])
        tp, fp = np.zeros(len(records)), np.zeros(len(records))
        for i, (_, index, ious) in enumerate(records):
            difficult, used = matches[index]
            best = max(range(len(ious)), key=ious.__getitem__) if ious else None
            if best is None or ious[best] < self.iou_threshold:
                fp[i] = 1
            elif difficult[best]:
                continue  # neither a true nor a false positive
            elif not used[best]:
                used[best] = True
                tp[i] = 1
            else:
                fp[i] = 1  # a duplicate of an object already found
        tp, fp = torch.from_numpy(np.cumsum(tp)), torch.from_numpy(np.cumsum(fp))
        recall = tp / positives
        precision = tp / (tp + fp).clamp(min=1e-12)
        return average_precision(recall, precision)

    def per_class(self) -> dict[int, float]:
        classes = [c for c in range(self.num_classes) if c != self.background]
        result = {}
        for cls in classes:
            ap = self.class_ap(cls)
            if ap is not None:
                result[cls] = ap
        return result

    def mean_ap(self) -> float:
        aps = self.per_class()
        return sum(aps.values()) / len(aps) if aps else 0.0
