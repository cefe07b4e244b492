"""SSD (Liu et al., 2016): a small own SSD, default boxes, box encoding, the multibox loss with hard
negative mining, and decoding with per-class NMS.

Every detector of the sample is a module whose forward returns the raw heads
`(loc [B, N, 4], conf [B, N, num_classes])` for N default boxes ("priors", [N, 4] as normalized
(cx, cy, w, h), in the heads' order); class 0 is the background. Decoding and NMS run outside the
module, so torch.fx traces it, every conv is compressible and the ONNX export is the network alone.
Box offsets are encoded with SSD's variances (0.1, 0.2), which are torchvision's SSD box-coder
weights (10, 10, 5, 5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.samples.metrics import box_iou, nms

VARIANCES = (0.1, 0.2)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)


def encode(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets of xyxy `boxes` relative to their (cx, cy, w, h) `priors` (the regression target)."""
    boxes = xyxy_to_cxcywh(boxes)
    centre = (boxes[..., :2] - priors[..., :2]) / (VARIANCES[0] * priors[..., 2:])
    size = torch.log(boxes[..., 2:].clamp(min=1e-6) / priors[..., 2:]) / VARIANCES[1]
    return torch.cat([centre, size], -1)


def decode(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """The inverse of encode: xyxy boxes from offsets and priors."""
    centre = priors[..., :2] + offsets[..., :2] * VARIANCES[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(offsets[..., 2:] * VARIANCES[1])
    return cxcywh_to_xyxy(torch.cat([centre, size], -1))


def default_boxes(feature_sizes, min_scale: float = 0.2, max_scale: float = 0.9,
                  aspect_ratios=(2.0,)) -> torch.Tensor:
    """SSD's default boxes for feature maps of sizes [(h, w), ...] (largest first): per location,
    a square of scale s_k, a square of scale sqrt(s_k s_k+1), and each ratio r and 1/r at s_k;
    scales linear from min_scale to max_scale. [N, 4] normalized (cx, cy, w, h), clipped to [0, 1],
    ordered by map, row, column, box (the heads' order)."""
    count = len(feature_sizes)
    scales = [min_scale + (max_scale - min_scale) * k / max(count - 1, 1) for k in range(count)] + [1.0]
    priors = []
    for k, (height, width) in enumerate(feature_sizes):
        shapes = [(scales[k], scales[k]), (math.sqrt(scales[k] * scales[k + 1]),) * 2]
        for ratio in aspect_ratios:
            shapes += [(scales[k] * math.sqrt(ratio), scales[k] / math.sqrt(ratio)),
                       (scales[k] / math.sqrt(ratio), scales[k] * math.sqrt(ratio))]
        for i in range(height):
            for j in range(width):
                for w, h in shapes:
                    priors.append(((j + 0.5) / width, (i + 0.5) / height, w, h))
    return torch.tensor(priors, dtype=torch.float32).clamp(0, 1)


def boxes_per_location(aspect_ratios=(2.0,)) -> int:
    return 2 + 2 * len(aspect_ratios)


def _conv_bn_relu(in_channels, out_channels, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SmallSSD(nn.Module):
    """A small SSD: a conv-BN-ReLU backbone down to stride 8, then `num_maps` feature maps at strides
    8, 16, 32, ..., each with a 3x3 loc head and a 3x3 conf head over boxes_per_location boxes."""

    def __init__(self, num_classes: int, width: int = 32, num_maps: int = 4, aspect_ratios=(2.0,)):
        super().__init__()
        if width < 1 or num_maps < 1:
            raise ValueError(f"width and num_maps must be >= 1 (got width={width}, num_maps={num_maps})")
        self.num_classes = num_classes
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.stem = nn.Sequential(_conv_bn_relu(3, width, 2), _conv_bn_relu(width, width, 1),
                                  _conv_bn_relu(width, 2 * width, 2), _conv_bn_relu(2 * width, 2 * width, 1),
                                  _conv_bn_relu(2 * width, 4 * width, 2), _conv_bn_relu(4 * width, 4 * width, 1))
        self.extras = nn.ModuleList(_conv_bn_relu(4 * width, 4 * width, 2) for _ in range(num_maps - 1))
        boxes = boxes_per_location(self.aspect_ratios)
        self.loc = nn.ModuleList(nn.Conv2d(4 * width, boxes * 4, 3, padding=1) for _ in range(num_maps))
        self.conf = nn.ModuleList(nn.Conv2d(4 * width, boxes * num_classes, 3, padding=1) for _ in range(num_maps))

    def features(self, x):
        maps = [self.stem(x)]
        for extra in self.extras:
            maps.append(extra(maps[-1]))
        return maps

    def forward(self, x):
        locs, confs = [], []
        for feature, loc, conf in zip(self.features(x), self.loc, self.conf):
            # [B, A*k, H, W] -> [B, H*W*A*k]: ordered by row, column, box like default_boxes.
            locs.append(torch.flatten(loc(feature).permute(0, 2, 3, 1), 1))
            confs.append(torch.flatten(conf(feature).permute(0, 2, 3, 1), 1))
        return (torch.cat(locs, 1).unflatten(1, (-1, 4)),
                torch.cat(confs, 1).unflatten(1, (-1, self.num_classes)))

    @torch.no_grad()
    def priors(self, height: int, width: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        probe = next(self.parameters())
        sizes = [tuple(f.shape[-2:]) for f in self.features(torch.zeros(1, 3, height, width, device=probe.device,
                                                                         dtype=probe.dtype))]
        self.train(was_training)
        return default_boxes(sizes, aspect_ratios=self.aspect_ratios)


class TorchvisionSSDHeads(nn.Module):
    """torchvision's SSD / SSDlite without its transform and post-processing: backbone + head,
    returning (loc, conf) as SmallSSD does (inputs come normalized from the sample's readers)."""

    def __init__(self, ssd: nn.Module):
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head
        self.anchor_generator = ssd.anchor_generator

    def forward(self, x):
        out = self.head(list(self.backbone(x).values()))
        return out["bbox_regression"], out["cls_logits"]

    @torch.no_grad()
    def priors(self, height: int, width: int) -> torch.Tensor:
        from torchvision.models.detection.image_list import ImageList

        was_training = self.training
        self.eval()
        probe = next(self.parameters())
        images = torch.zeros(1, 3, height, width, device=probe.device, dtype=probe.dtype)
        features = list(self.backbone(images).values())
        anchors = self.anchor_generator(ImageList(images, [(height, width)]), features)[0]
        self.train(was_training)
        scale = torch.tensor([width, height, width, height], dtype=anchors.dtype, device=anchors.device)
        return xyxy_to_cxcywh(anchors / scale).float().cpu()


def match(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor, iou_threshold: float = 0.5):
    """SSD's matching: each prior takes the ground-truth box it overlaps most (background 0 when that
    IoU < threshold), and each ground-truth box claims its best prior whatever the IoU.
    Returns (matched xyxy boxes [N, 4], labels [N])."""
    if len(gt_boxes) == 0:
        return torch.zeros_like(priors), torch.zeros(len(priors), dtype=torch.long, device=priors.device)
    overlaps = box_iou(gt_boxes, cxcywh_to_xyxy(priors))  # [m, N]
    best_gt_overlap, best_gt = overlaps.max(0)
    best_prior = overlaps.argmax(1)
    best_gt_overlap[best_prior] = 2.0  # keep them above any threshold
    best_gt[best_prior] = torch.arange(len(gt_boxes), device=priors.device)
    labels = gt_labels[best_gt].clone()
    labels[best_gt_overlap < iou_threshold] = 0
    return gt_boxes[best_gt], labels


class MultiBoxLoss:
    """Smooth-L1 on the matched priors' offsets plus cross-entropy on the matched priors and the
    hardest negatives (`neg_pos_ratio` per positive, ranked by their background loss), both summed
    and divided by the number of matched priors in the batch. `priors` is a callable returning the
    current [N, 4] priors (they are known once the model is built)."""

    def __init__(self, priors, neg_pos_ratio: int = 3, iou_threshold: float = 0.5):
        self.priors, self.neg_pos_ratio, self.iou_threshold = priors, neg_pos_ratio, iou_threshold

    def __call__(self, outputs, targets):
        loc, conf = outputs
        priors = self.priors().to(loc.device)
        if loc.shape[1] != len(priors):
            raise RuntimeError(f"the detector predicts {loc.shape[1]} boxes but has {len(priors)} default boxes")
        matched, labels = zip(*(match(t["boxes"], t["labels"], priors, self.iou_threshold) for t in targets))
        matched, labels = torch.stack(matched), torch.stack(labels)
        positive = labels > 0
        num_positive = positive.sum(1, keepdim=True)
        loc_loss = F.smooth_l1_loss(loc[positive], encode(matched, priors.expand_as(matched))[positive],
                                    reduction="sum")
        ce = F.cross_entropy(conf.reshape(-1, conf.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
        background_loss = ce.detach().masked_fill(positive, 0.0)
        rank = background_loss.argsort(1, descending=True).argsort(1)
        negative = rank < (self.neg_pos_ratio * num_positive).clamp(max=labels.shape[1] - 1)
        conf_loss = ce[positive | negative].sum()
        return (loc_loss + conf_loss) / num_positive.sum().clamp(min=1)


@torch.no_grad()
def postprocess(loc: torch.Tensor, conf: torch.Tensor, priors: torch.Tensor, score_threshold: float = 0.01,
                iou_threshold: float = 0.45, candidates: int = 400, max_detections: int = 200) -> list[dict]:
    """Per image: softmax scores, decoded boxes clipped to [0, 1], for every foreground class the boxes
    above score_threshold (the `candidates` best overall), per-class NMS, the `max_detections` best.
    Returns [{"boxes", "scores", "labels"}] per image (labels >= 1)."""
    scores = F.softmax(conf.float(), -1)
    boxes = decode(loc.float(), priors.to(loc.device)).clamp(0, 1)
    num_classes = conf.shape[-1]
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        fg = image_scores[:, 1:].reshape(-1)
        keep = torch.nonzero(fg > score_threshold).flatten()
        keep = keep[fg[keep].argsort(descending=True, stable=True)[:candidates]]
        labels = keep % (num_classes - 1) + 1
        kept_boxes, kept_scores = image_boxes[keep // (num_classes - 1)], fg[keep]
        # Shifting each class by 2 puts boxes of different classes apart: one NMS call is per-class NMS.
        chosen = nms(kept_boxes + 2.0 * labels[:, None].to(kept_boxes.dtype), kept_scores, iou_threshold)
        chosen = chosen[:max_detections]
        results.append({"boxes": kept_boxes[chosen], "scores": kept_scores[chosen], "labels": labels[chosen]})
    return results
