"""Readers for the Pascal VOC (segmentation and detection) and CamVid on-disk layouts.

Every reader checks its layout when it is built, so a wrong directory is one SampleError naming
the missing path and the expected layout, never a failure in the middle of an epoch.
Images are resized to the model's input size and normalized with ImageNet's mean and std.
"""
from __future__ import annotations

import pathlib
from xml.etree import ElementTree

import numpy as np
import torch
from torch.utils.data import Dataset

from fxcompress.samples.task import SampleError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
CAMVID_NUM_CLASSES = 12  # SegNet's CamVid annotations: 11 classes and 11 = "Unlabelled"
IGNORE_INDEX = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

VOC_SEGMENTATION_LAYOUT = ("Pascal VOC segmentation layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png "
                           "(index-colour masks, 255 = ignore), ImageSets/Segmentation/{train,val}.txt")
CAMVID_LAYOUT = "CamVid layout: train/, trainannot/, val/, valannot/ (images and index masks of the same names)"
VOC_DETECTION_LAYOUT = ("Pascal VOC detection layout: JPEGImages/<id>.jpg, Annotations/<id>.xml, "
                        "ImageSets/Main/{train,val}.txt")


def _pil():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow comes with matplotlib/torchvision
        raise SampleError("reading images needs Pillow: pip install pillow") from error
    return Image


def _require(path: pathlib.Path, layout: str) -> pathlib.Path:
    if not path.exists():
        raise SampleError(f"{path} does not exist (expected {layout})")
    return path


def load_image(path: pathlib.Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image resized (bilinear) to size=(H, W), normalized, as a float tensor [3, H, W]."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    except OSError as error:
        raise SampleError(f"{path}: cannot read the image ({error})") from error
    return (pixels.permute(2, 0, 1) / 255.0 - MEAN) / STD


def load_mask(path: pathlib.Path, size: tuple[int, int]) -> torch.Tensor:
    """Class-index mask (a palette "P" or grayscale "L" PNG) resized (nearest) to size, long [H, W]."""
    Image = _pil()
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise SampleError(f"{path}: a mask must be an index-colour (P) or grayscale (L) PNG of class "
                                  f"indices, not mode {mask.mode}")
            mask = mask.resize((size[1], size[0]), Image.NEAREST)
            return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
    except OSError as error:
        raise SampleError(f"{path}: cannot read the mask ({error})") from error


def read_split(path: pathlib.Path, layout: str) -> list[str]:
    ids = [line.split()[0] for line in _require(path, layout).read_text().splitlines() if line.strip()]
    if not ids:
        raise SampleError(f"{path} lists no images (expected {layout})")
    return ids


def class_names(root: pathlib.Path, config: dict, default=VOC_CLASSES) -> list[str]:
    """Foreground class names: config["classes"], else <root>/classes.txt (one name a line), else VOC's 20."""
    if config.get("classes") is not None:
        names = config["classes"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise SampleError("config key 'classes' must be a non-empty list of class names")
        return list(names)
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            raise SampleError(f"{listing} lists no class names")
        return names
    return list(default)


class _FlipMixin:
    """Random horizontal flips for training (drawn from torch's RNG, which the runner seeds)."""
    augment = False

    def _flip(self) -> bool:
        return self.augment and bool(torch.rand(()) < 0.5)


class SegmentationFiles(Dataset, _FlipMixin):
    """(image [3,H,W] float, mask [H,W] long) pairs from a list of (image path, mask path)."""

    def __init__(self, pairs, size: tuple[int, int], augment: bool = False):
        self.pairs, self.size, self.augment = list(pairs), size, augment

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, mask_path = self.pairs[index]
        image, mask = load_image(image_path, self.size), load_mask(mask_path, self.size)
        if self._flip():
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def voc_segmentation(root: pathlib.Path, split: str, size, augment=False) -> SegmentationFiles:
    layout = VOC_SEGMENTATION_LAYOUT
    images, masks = _require(root / "JPEGImages", layout), _require(root / "SegmentationClass", layout)
    pairs = []
    for image_id in read_split(root / "ImageSets" / "Segmentation" / f"{split}.txt", layout):
        pairs.append((_require(images / f"{image_id}.jpg", layout), _require(masks / f"{image_id}.png", layout)))
    return SegmentationFiles(pairs, size, augment)


def camvid_segmentation(root: pathlib.Path, split: str, size, augment=False) -> SegmentationFiles:
    layout = CAMVID_LAYOUT
    images, masks = _require(root / split, layout), _require(root / f"{split}annot", layout)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SampleError(f"{images} holds no .png/.jpg images (expected {layout})")
    pairs = [(p, _require(masks / f"{p.stem}.png", layout)) for p in files]
    return SegmentationFiles(pairs, size, augment)


def segmentation_layout(root: pathlib.Path, config: dict) -> str:
    """config["dataset"] ("voc"/"camvid", NNCF's key; other names are free-form), else the layout found."""
    dataset = str(config.get("dataset", "")).lower()
    if dataset in ("voc", "camvid"):
        return dataset
    if (root / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    if (root / "train").is_dir() and (root / "trainannot").is_dir():
        return "camvid"
    raise SampleError(f"{root} is neither in the {VOC_SEGMENTATION_LAYOUT} nor in the {CAMVID_LAYOUT}")


class VOCDetection(Dataset, _FlipMixin):
    """(image [3,H,W], {"boxes": [n,4] (x1,y1,x2,y2) in [0,1], "labels": [n] (1-based), "difficult": [n]})."""

    def __init__(self, root: pathlib.Path, split: str, classes, size, augment=False, keep_difficult=True):
        layout = VOC_DETECTION_LAYOUT
        images, annotations = _require(root / "JPEGImages", layout), _require(root / "Annotations", layout)
        self.size, self.augment, self.keep_difficult = size, augment, keep_difficult
        self.index = {name: i + 1 for i, name in enumerate(classes)}
        self.items = []
        for image_id in read_split(root / "ImageSets" / "Main" / f"{split}.txt", layout):
            image = _require(images / f"{image_id}.jpg", layout)
            self.items.append((image, self._parse(_require(annotations / f"{image_id}.xml", layout))))

    def _parse(self, path: pathlib.Path) -> dict:
        """Boxes as fractions of the image size; VOC's 1-based inclusive pixel corners become
        continuous ones (xmin - 1, xmax)."""
        try:
            root = ElementTree.parse(path).getroot()
            width, height = float(root.findtext("size/width")), float(root.findtext("size/height"))
            boxes, labels, difficult = [], [], []
            for obj in root.iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in self.index:
                    raise SampleError(f"{path}: object class {name!r} is not one of the classes "
                                      f"({', '.join(self.index)}); set config 'classes' or write classes.txt")
                box = obj.find("bndbox")
                xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                boxes.append([(xmin - 1) / width, (ymin - 1) / height, xmax / width, ymax / height])
                labels.append(self.index[name])
                difficult.append(obj.findtext("difficult", "0").strip() == "1")
        except (ElementTree.ParseError, TypeError, ValueError, AttributeError) as error:
            raise SampleError(f"{path}: not a VOC annotation with size/width, size/height and "
                              f"object/bndbox/xmin..ymax ({error})") from error
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "difficult": torch.tensor(difficult, dtype=torch.bool)}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image_path, target = self.items[index]
        image = load_image(image_path, self.size)
        target = dict(target)
        if not self.keep_difficult:
            keep = ~target["difficult"]
            target = {k: v[keep] for k, v in target.items()}
        if self._flip():
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = 1.0 - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target


def detection_collate(batch):
    """Images stacked [B,3,H,W]; targets a list of per-image dicts (their box counts differ)."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def sample_size(config: dict) -> list[int]:
    """config["input_info"]["sample_size"] = [N, 3, H, W], checked."""
    info = config.get("input_info")
    if isinstance(info, list) and len(info) == 1:
        info = info[0]
    size = info.get("sample_size") if isinstance(info, dict) else None
    if not (isinstance(size, list) and len(size) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise SampleError(f"config key 'input_info.sample_size' must be [N, 3, H, W] (positive integers), "
                          f"not {size!r}")
    if size[1] != 3:
        raise SampleError(f"config key 'input_info.sample_size': images have 3 channels, not {size[1]}")
    return size


def input_size(config: dict) -> tuple[int, int]:
    """(H, W) of the model input."""
    size = sample_size(config)
    return size[2], size[3]
