"""Image classification: models (torchvision's zoo, timm with ``timm:<name>``, the package's own
small models), datasets (ImageFolder layout, CIFAR-10/100 on-disk format, scikit-learn digits)
and the top-1 metric.

Every dataset yields ``(image [C, H, W] float, label)`` with C, H, W from
``input_info.sample_size`` (C is 1 or 3), so one model definition serves every dataset.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from fxcompress.samples.task import SampleError, Task
from fxcompress.testing import models as own

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Per-channel normalization of each source (ImageNet's for photographs in ImageFolder trees).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# The package's own models: name -> builder(num_classes, in_channels).
OWN_MODELS = {
    "digits_cnn": lambda n, c: own.DigitsCNN(num_classes=n),
    "resnet_tiny": lambda n, c: own.ResNetTiny(num_classes=n, in_channels=c),
    "resnet18_like": lambda n, c: own.ResNet((2, 2, 2, 2), num_classes=n, width=8, in_channels=c),
    "mobilenet_v2_tiny": lambda n, c: own.MobileNetV2Tiny(num_classes=n, in_channels=c),
}
# DigitsCNN's flatten -> fc fixes its input: one channel, 8x8.
_FIXED_INPUT = {"digits_cnn": (1, 8, 8)}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torchvision_models() -> list[str]:
    if not _installed("torchvision"):
        return []
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


class ClassificationTask(Task):
    name = "classification"
    metric_name = "top1"

    def known_models(self) -> list[str]:
        return sorted(OWN_MODELS) + _torchvision_models()

    def build_model(self, name: str, num_classes: int, config: dict) -> torch.nn.Module:
        _, channels, height, width = config["input_info"]["sample_size"]
        if name.startswith("timm:"):
            return self._timm_model(name[len("timm:"):], num_classes, channels, config)
        if name in OWN_MODELS:
            fixed = _FIXED_INPUT.get(name)
            if fixed is not None and fixed != (channels, height, width):
                raise SampleError(f"config key 'input_info.sample_size': model {name!r} takes [1, {fixed[0]}, "
                                  f"{fixed[1]}, {fixed[2]}] images, got {config['input_info']['sample_size']}")
            if config.get("pretrained"):
                raise SampleError(f"config key 'pretrained': model {name!r} has no pretrained weights "
                                  f"(give a checkpoint with --weights)")
            return OWN_MODELS[name](num_classes, channels)
        if name in _torchvision_models():
            return self._torchvision_model(name, num_classes, channels, config)
        raise SampleError(f"config key 'model': unknown classification model {name!r}; known: "
                          f"{', '.join(self.known_models()[:20])}"
                          f"{', ...' if len(self.known_models()) > 20 else ''}"
                          f"{'' if _installed('timm') else ' (torchvision and timm models when they are installed)'}")

    def _torchvision_model(self, name, num_classes, channels, config):
        import torchvision
        if channels != 3:
            raise SampleError(f"config key 'input_info.sample_size': torchvision's {name} takes 3-channel "
                              f"images, got {channels}")
        if not config.get("pretrained"):
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file():  # nothing downloads at run time
            raise SampleError(f"config key 'pretrained': {name}'s weights are not in the local cache "
                              f"({cached}); put them there or give a checkpoint with --weights")
        model = torchvision.models.get_model(name, weights=weights)
        if num_classes != len(weights.meta["categories"]):
            raise SampleError(f"config key 'pretrained': {name}'s pretrained head has "
                              f"{len(weights.meta['categories'])} classes, the dataset {num_classes}")
        return model

    def _timm_model(self, name, num_classes, channels, config):
        if not _installed("timm"):
            raise SampleError(f"config key 'model': 'timm:{name}' needs timm, which is not installed")
        import timm
        if name not in timm.list_models():
            raise SampleError(f"config key 'model': timm has no model {name!r}")
        if config.get("pretrained"):
            raise SampleError("config key 'pretrained': timm models load no weights here (nothing downloads); "
                              "give a checkpoint with --weights")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)

    # -- data ------------------------------------------------------------------------
    def build_datasets(self, data_dir, config):
        _, channels, height, width = config["input_info"]["sample_size"]
        if channels not in (1, 3):
            raise SampleError(f"config key 'input_info.sample_size': images have 1 or 3 channels, got {channels}")
        kind = config.get("dataset")
        if kind == "digits":
            return digits_datasets(channels, height, width, config.get("seed", 0))
        if data_dir is None:
            raise SampleError(f"--data: a data directory is needed for dataset {kind or 'imagefolder'!r} "
                              f"(\"dataset\": \"digits\" needs none)")
        data_dir = pathlib.Path(data_dir)
        if not data_dir.is_dir():
            raise SampleError(f"--data {data_dir}: no such directory")
        if kind is None:
            kind = "cifar" if _find_cifar(data_dir) else "imagefolder"
        if kind in ("cifar", "cifar10", "cifar100"):
            return cifar_datasets(data_dir, kind, channels, height, width)
        if kind in ("imagefolder", "imagenet"):
            return imagefolder_datasets(data_dir, channels, height, width)
        raise SampleError(f"config key 'dataset': unknown classification dataset {kind!r}; known: "
                          f"digits, imagefolder (alias imagenet), cifar10, cifar100")

    def targets_to(self, targets, device):
        return targets.to(device)

    def criterion(self, config):
        return torch.nn.CrossEntropyLoss()

    @torch.no_grad()
    def evaluate(self, model, loader, device) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        for images, targets in loader:
            logits = model(images.to(device))
            correct += int((logits.argmax(1).cpu() == targets).sum())
            total += len(targets)
        model.train(was_training)
        return correct / max(total, 1)

    def example_input(self, config):
        return torch.zeros(config["input_info"]["sample_size"])


# -- datasets ------------------------------------------------------------------------------
def _fit(images: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """[N, c, h, w] float images as [N, channels, height, width] (grey <-> RGB, bilinear resize)."""
    if images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1)
    if tuple(images.shape[2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.contiguous()


def digits_datasets(channels: int, height: int, width: int, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits (1347 train, 450 val images; offline)."""
    from fxcompress.testing.data import load_digits_tensors
    x_train, y_train, x_val, y_val = load_digits_tensors(seed=0)
    return (TensorDataset(_fit(x_train, channels, height, width), y_train),
            TensorDataset(_fit(x_val, channels, height, width), y_val), 10)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` read with Pillow, as torchvision's ImageFolder (classes sorted)."""

    def __init__(self, root: pathlib.Path, classes: list[str], channels: int, height: int, width: int):
        self.samples = [(path, index) for index, name in enumerate(classes)
                        for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
        self.mode = "L" if channels == 1 else "RGB"
        self.size = (width, height)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert(self.mode).resize(self.size, Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)
        return (tensor - self.mean) / self.std, label


def imagefolder_datasets(data_dir: pathlib.Path, channels: int, height: int, width: int):
    layout = f"expected the ImageFolder layout {data_dir}/train/<class>/<image> and {data_dir}/val/<class>/<image>"
    if not _installed("PIL"):
        raise SampleError("reading ImageFolder datasets needs Pillow (pip install pillow)")
    splits = {}
    for split in ("train", "val"):
        root = data_dir / split
        classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not classes:
            raise SampleError(f"--data {data_dir}: no class folders in {root}; {layout}")
        splits[split] = (root, classes)
    if splits["train"][1] != splits["val"][1]:
        raise SampleError(f"--data {data_dir}: train and val have different class folders "
                          f"({len(splits['train'][1])} vs {len(splits['val'][1])}); {layout}")
    train, val = (ImageFolderDataset(root, classes, channels, height, width) for root, classes in splits.values())
    for split, dataset in (("train", train), ("val", val)):
        if len(dataset) == 0:
            raise SampleError(f"--data {data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                              f"{data_dir / split}; {layout}")
    return train, val, len(splits["train"][1])


# CIFAR's python version: pickled dicts of numpy arrays. A restricted unpickler loads only those.
_CIFAR_LAYOUTS = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
                  "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels")}


class _ArrayUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch file")
        return super().find_class(module, name)


def _find_cifar(data_dir: pathlib.Path):
    """(kind, folder) of the CIFAR files in data_dir or its standard sub-folder, else None."""
    for kind, (folder, train_files, test_file, _) in _CIFAR_LAYOUTS.items():
        for root in (data_dir / folder, data_dir):
            if all((root / f).is_file() for f in [*train_files, test_file]):
                return kind, root
    return None


def _load_cifar_file(path: pathlib.Path, label_key: bytes):
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as error:
        raise SampleError(f"--data: {path} is not a CIFAR batch file of the python version ({error})") from None
    return torch.from_numpy(data).float() / 255.0, torch.from_numpy(labels)


def cifar_datasets(data_dir: pathlib.Path, kind: str, channels: int, height: int, width: int):
    found = _find_cifar(data_dir)
    wanted = None if kind == "cifar" else kind
    if found is None or (wanted is not None and found[0] != wanted):
        names = [wanted] if wanted else list(_CIFAR_LAYOUTS)
        expected = " or ".join(f"{data_dir}/{_CIFAR_LAYOUTS[k][0]}/{{{','.join(_CIFAR_LAYOUTS[k][1][:1] + ['...', _CIFAR_LAYOUTS[k][2]])}}}"
                               for k in names)
        raise SampleError(f"--data {data_dir}: no CIFAR python-version files; expected {expected}")
    kind, root = found
    _, train_files, test_file, label_key = _CIFAR_LAYOUTS[kind]
    parts = [_load_cifar_file(root / name, label_key) for name in train_files]
    x_train, y_train = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_val, y_val = _load_cifar_file(root / test_file, label_key)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x_train, x_val = ((x - mean) / std for x in (x_train, x_val))
    classes = 10 if kind == "cifar10" else 100
    return (TensorDataset(_fit(x_train, channels, height, width), y_train),
            TensorDataset(_fit(x_val, channels, height, width), y_val), classes)


def write_digits_imagefolder(root, *, size: int = 8) -> pathlib.Path:
    """scikit-learn's digits as an ImageFolder tree: ``root/{train,val}/<digit>/<n>.png``
    (the same 1347/450 split as ``"dataset": "digits"``), grey PNGs of ``size`` x ``size``."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=0.25, random_state=0,
                                          stratify=digits.target)
    root = pathlib.Path(root)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for n in indices:
            folder = root / split / str(digits.target[n])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[n])  # uint8 2-D: grey ("L")
            if size != 8:
                image = image.resize((size, size), Image.NEAREST)
            image.save(folder / f"{n:04d}.png")
    return root
