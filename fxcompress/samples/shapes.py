"""Small datasets of drawn shapes in the standard on-disk layouts, for tests and a quick start.

Each image holds 1 to `max_shapes` non-overlapping filled rectangles, ellipses and triangles of random
colours on a noisy background; the class of a shape is its geometry, never its colour. The boxes and
masks are known exactly: a box is the drawn shape's bounding box, a mask pixel is the class index of
the shape drawn there (0 background) with a one-pixel 255 ("ignore") outline, as in Pascal VOC.

    python -m fxcompress.samples.shapes DIR [--layout voc|camvid] [--train N] [--val N] [--size S] [--seed S]

or `write_shapes_dataset(DIR)`. The same seed writes the same files.
"""
from __future__ import annotations

import argparse
import pathlib
from xml.etree import ElementTree

import numpy as np

CLASSES = ("rectangle", "ellipse", "triangle")
IGNORE_INDEX = 255


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (index i -> RGB), 256 entries flattened, as in the VOC devkit."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _draw_image(rng: np.random.Generator, size: int, max_shapes: int):
    """(RGB image, index mask, objects [(class name, (xmin, ymin, xmax, ymax) VOC 1-based inclusive)])."""
    from PIL import Image, ImageDraw

    background = rng.integers(0, 110, size=3)
    pixels = np.clip(background + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    mask = Image.new("L", (size, size), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    boxes, objects = [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(30):  # non-overlapping placement, so every box and mask is complete
            w, h = (int(v) for v in rng.integers(size // 5, size // 2 + 1, size=2))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x, y, x + w - 1, y + h - 1)  # PIL's inclusive pixel corners
            if all(box[0] > b[2] + 1 or box[2] < b[0] - 1 or box[1] > b[3] + 1 or box[3] < b[1] - 1 for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        label = int(rng.integers(0, len(CLASSES)))
        colour = tuple(int(v) for v in rng.integers(140, 256, size=3))
        for draw, fill, outline in ((draw_image, colour, None), (draw_mask, label + 1, IGNORE_INDEX)):
            if label == 0:
                draw.rectangle(box, fill=fill, outline=outline)
            elif label == 1:
                draw.ellipse(box, fill=fill, outline=outline)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])],
                             fill=fill, outline=outline)
        objects.append((CLASSES[label], (box[0] + 1, box[1] + 1, box[2] + 1, box[3] + 1)))
    return image, mask, objects


def _annotation_xml(image_id: str, size: int, objects) -> bytes:
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "filename").text = f"{image_id}.jpg"
    size_el = ElementTree.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ElementTree.SubElement(size_el, key).text = str(value)
    for name, (xmin, ymin, xmax, ymax) in objects:
        obj = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(obj, "name").text = name
        ElementTree.SubElement(obj, "difficult").text = "0"
        bndbox = ElementTree.SubElement(obj, "bndbox")
        for key, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ElementTree.SubElement(bndbox, key).text = str(value)
    return ElementTree.tostring(root)


def write_shapes_dataset(root, num_train: int = 64, num_val: int = 32, image_size: int = 64,
                         seed: int = 0, max_shapes: int = 3, layout: str = "voc") -> pathlib.Path:
    """Write the dataset under `root` and return it.

    layout "voc": JPEGImages/*.jpg, SegmentationClass/*.png (VOC palette), Annotations/*.xml,
    ImageSets/{Main,Segmentation}/{train,val}.txt and classes.txt (the foreground class names),
    usable by both the detection and the segmentation sample.
    layout "camvid": {train,val}/*.png with grayscale index masks in {train,val}annot/*.png."""
    from PIL import Image

    if layout not in ("voc", "camvid"):
        raise ValueError(f"layout must be 'voc' or 'camvid', not {layout!r}")
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": [f"{i:06d}" for i in range(num_train)],
              "val": [f"{i:06d}" for i in range(num_train, num_train + num_val)]}
    if layout == "voc":
        for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Main", "ImageSets/Segmentation"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        palette = voc_palette()
    for split, ids in splits.items():
        if layout == "camvid":
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            image, mask, objects = _draw_image(rng, image_size, max_shapes)
            if layout == "camvid":
                image.save(root / split / f"{image_id}.png")
                mask.save(root / f"{split}annot" / f"{image_id}.png")
                continue
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            indexed = mask.copy()
            indexed.putpalette(palette)  # an "L" image with a palette becomes "P", indices unchanged
            indexed.save(root / "SegmentationClass" / f"{image_id}.png")
            (root / "Annotations" / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, image_size, objects))
        if layout == "voc":
            listing = "".join(f"{i}\n" for i in ids)
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text(listing)
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(listing)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxcompress.samples.shapes",
                                     description="Write a small dataset of drawn shapes.")
    parser.add_argument("root")
    parser.add_argument("--layout", choices=("voc", "camvid"), default="voc")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_shapes_dataset(args.root, args.train, args.val, args.size, args.seed, layout=args.layout)
    print(f"wrote {args.train} train + {args.val} val images ({args.layout} layout) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
