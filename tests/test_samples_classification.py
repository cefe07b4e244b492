"""The classification sample end to end on real data: scikit-learn's digits written as an ImageFolder
tree, DigitsCNN, magnitude sparsity + int8 for two epochs through `fxcompress train`.

One run (module fixture) is checked for its metric, its files and its ONNX export (ONNX Runtime's
default session and OpenVINO); a second run stops after one epoch and resumes to the same end,
bitwise."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fxcompress.samples import write_digits_imagefolder
from fxcompress.samples.classification import ClassificationTask
from fxcompress.samples.cli import main
from fxcompress.samples.config import validate
from fxcompress.samples.task import SampleError

CONFIG = {
    "model": "digits_cnn",
    "input_info": {"sample_size": [1, 1, 8, 8]},
    "batch_size": 64,
    "epochs": 2,
    "optimizer": {"type": "adam", "base_lr": 0.003, "schedule_type": "multistep", "steps": [1], "gamma": 0.5},
    "compression": [
        {"algorithm": "magnitude_sparsity",
         "params": {"schedule": "polynomial", "sparsity_target": 0.5, "sparsity_target_epoch": 1}},
        {"algorithm": "quantization",
         "initializer": {"range": {"num_init_samples": 256},
                         "batchnorm_adaptation": {"num_bn_adaptation_samples": 256}}},
    ],
}


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "digits_sparsity_int8.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def trained(digits_tree, config_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run") / "full"
    onnx = log_dir / "model.onnx"
    code = main(["train", "--config", str(config_file), "--data", str(digits_tree), "--log-dir", str(log_dir),
                 "--to-onnx", str(onnx)])
    assert code == 0
    return log_dir


def test_the_digits_tree_has_the_standard_split(digits_tree):
    counts = {split: sum(1 for _ in (digits_tree / split).rglob("*.png")) for split in ("train", "val")}
    assert counts == {"train": 1347, "val": 450}
    assert sorted(p.name for p in (digits_tree / "train").iterdir()) == [str(d) for d in range(10)]


def test_training_improves_on_the_untrained_model_and_reaches_the_sparsity_target(trained):
    result = json.loads((trained / "result.json").read_text())
    # The untrained DigitsCNN guesses (10 classes); two compressed epochs on 1347 digits reach > 85%.
    assert result["fp32_metric"] < 0.25
    assert result["metric"] > 0.85
    assert result["levels"] == {"magnitude_sparsity_level": 0.5}
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "loss", "metric"] and len(rows) == 3
    assert float(rows[2].split(",")[2]) == pytest.approx(result["metric"])
    for name in ("last.pth", "best.pth", "history.png", "statistics.txt"):
        assert (trained / name).is_file(), name
    assert (trained / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(trained / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["metric"] == result["metric"]
    assert {"model", "controller", "optimizer", "lr_scheduler", "rng"} <= set(checkpoint)
    # The sparsity target is reached in epoch 2, so that epoch is the first and only "best".
    assert torch.load(trained / "best.pth", weights_only=True)["epoch"] == 1


def _val_set(digits_tree):
    config = validate(CONFIG)
    _, val, _ = ClassificationTask().build_datasets(digits_tree, config)
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = np.array([val[i][1] for i in range(len(val))])
    return images.numpy(), labels


def test_the_onnx_export_runs_in_onnx_runtime_and_openvino_with_the_trained_accuracy(trained, digits_tree):
    import onnxruntime as ort
    import openvino as ov
    images, labels = _val_set(digits_tree)
    metric = json.loads((trained / "result.json").read_text())["metric"]
    session = ort.InferenceSession(str(trained / "model.onnx"))  # the default session: all optimizations
    ort_top1 = float((session.run(None, {session.get_inputs()[0].name: images})[0].argmax(1) == labels).mean())
    compiled = ov.Core().compile_model(str(trained / "model.onnx"), "CPU")
    ov_top1 = float((compiled(images)[compiled.output(0)].argmax(1) == labels).mean())
    # The export equals the fake-quantized graph within one quantization step: only near-ties of
    # the two best logits may flip, a few of the 450 images at most.
    assert abs(ort_top1 - metric) <= 3 / 450
    assert abs(ov_top1 - metric) <= 3 / 450


def test_resuming_after_one_epoch_ends_bitwise_where_the_uninterrupted_run_ends(trained, digits_tree, config_file,
                                                                               tmp_path, capsys):
    log_dir = tmp_path / "interrupted"
    args = ["train", "--config", str(config_file), "--data", str(digits_tree), "--log-dir", str(log_dir)]
    assert main(args + ["--epochs", "1"]) == 0
    assert main(["train", "--config", str(config_file), "--data", str(digits_tree),
                 "--resume", str(log_dir / "last.pth")]) == 0   # the log dir is the checkpoint's
    assert "resumed from epoch 1" in capsys.readouterr().out
    full = torch.load(trained / "last.pth", weights_only=True)
    resumed = torch.load(log_dir / "last.pth", weights_only=True)
    for key in ("model", "optimizer"):
        state_a, state_b = full[key], resumed[key]
        flat_a, flat_b = _flatten(state_a), _flatten(state_b)
        assert flat_a.keys() == flat_b.keys()
        different = [k for k in flat_a if not _equal(flat_a[k], flat_b[k])]
        assert not different, f"{key}: {different[:5]}"
    assert _flatten(full["controller"]).keys() == _flatten(resumed["controller"]).keys()
    assert all(_equal(a, b) for a, b in zip(_flatten(full["controller"]).values(),
                                            _flatten(resumed["controller"]).values()))
    assert resumed["metric"] == full["metric"] and resumed["history"][-1]["loss"] == full["history"][-1]["loss"]
    assert (log_dir / "log.csv").read_text().splitlines()[1:] != []
    assert len((log_dir / "log.csv").read_text().splitlines()) == 3  # one row per epoch across both runs


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_test_and_export_read_the_checkpoint(trained, digits_tree, config_file, tmp_path, capsys):
    metric = json.loads((trained / "result.json").read_text())["metric"]
    assert main(["test", "--config", str(config_file), "--data", str(digits_tree),
                 "--resume", str(trained / "best.pth")]) == 0
    assert f"compressed top1: {metric:.4f}" in capsys.readouterr().out
    onnx = tmp_path / "from_checkpoint.onnx"
    # export needs no data: the checkpoint holds the trained state and its number of classes
    assert main(["export", "--config", str(config_file), "--resume", str(trained / "best.pth"),
                 "--to-onnx", str(onnx)]) == 0
    import onnxruntime as ort
    images, _ = _val_set(digits_tree)
    outputs = [ort.InferenceSession(str(path)).run(None, {"x": images[:64]})[0]
               for path in (onnx, trained / "model.onnx")]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_the_digits_dataset_needs_no_data_directory_and_fits_the_input_size():
    config = validate({**CONFIG, "dataset": "digits", "input_info": {"sample_size": [1, 3, 16, 12]}})
    train, val, classes = ClassificationTask().build_datasets(None, config)
    assert (len(train), len(val), classes) == (1347, 450, 10)
    assert train[0][0].shape == (3, 16, 12)


def _write_cifar(folder, name, images, labels, label_key=b"labels"):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), label_key: list(labels)}, f)


def test_cifar10_on_disk_format_is_read_with_its_labels_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    batches = [rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8) for _ in range(6)]
    for i, images in enumerate(batches[:5]):
        _write_cifar(folder, f"data_batch_{i + 1}", images, [i, i, 9, 0])
    _write_cifar(folder, "test_batch", batches[5], [3, 1, 4, 1])
    config = validate({**CONFIG, "input_info": {"sample_size": [1, 3, 32, 32]}})
    train, val, classes = ClassificationTask().build_datasets(tmp_path, config)
    assert (len(train), len(val), classes) == (20, 4, 10)
    assert [int(val[i][1]) for i in range(4)] == [3, 1, 4, 1] and int(train[4][1]) == 1
    # pixel (c, y, x) of the first test image, normalized with CIFAR-10's mean and std
    expected = (batches[5][0, 2, 5, 7] / 255.0 - 0.4465) / 0.2616
    assert float(val[0][0][2, 5, 7]) == pytest.approx(expected, abs=1e-6)


def test_a_cifar_file_holding_other_objects_is_refused_not_unpickled(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({b"data": print}))  # a callable: never called, never loaded
    (folder / "test").write_bytes(pickle.dumps({b"data": print}))
    config = validate({**CONFIG, "input_info": {"sample_size": [1, 3, 32, 32]}})
    with pytest.raises(SampleError, match="not a CIFAR batch file"):
        ClassificationTask().build_datasets(tmp_path, config)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet_tiny", "resnet18_like", "mobilenet_v2_tiny"])
def test_the_own_models_take_the_configured_channels_and_classes(name):
    sizes = [(1, 8, 8)] if name == "digits_cnn" else [(1, 16, 16), (3, 32, 32)]
    for channels, height, width in sizes:
        config = validate({**CONFIG, "model": name, "input_info": {"sample_size": [1, channels, height, width]}})
        model = ClassificationTask().build_model(name, 7, config).eval()
        assert model(torch.zeros(2, channels, height, width)).shape == (2, 7)
    with pytest.raises(SampleError, match=r"config key 'input_info.sample_size': model 'digits_cnn' takes \[1, 1, 8, 8\]"):
        ClassificationTask().build_model("digits_cnn", 10, validate({**CONFIG, "input_info": {"sample_size": [1, 3, 8, 8]}}))


REFERENCE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "classification").glob("*.json"))


def test_there_is_a_reference_config_for_each_algorithm():
    assert [p.stem for p in REFERENCE_CONFIGS] == [
        "digits_binarization", "digits_filter_pruning", "digits_fp32", "digits_int8", "digits_mixed_precision",
        "digits_sparsity_int8"]


@pytest.mark.parametrize("path", REFERENCE_CONFIGS, ids=lambda p: p.stem)
def test_each_reference_config_validates_and_compiles(path):
    from fxcompress.samples.config import read_config
    from fxcompress.samples.runner import compile_model
    from fxcompress.samples.tasks import task_for_config
    config = validate(read_config(path))
    task = task_for_config(config)
    model = task.build_model(config["model"], 10, config)
    ctrl, gm = compile_model(task, model, config)
    expected = {"digits_fp32": [], "digits_int8": ["quantization"], "digits_mixed_precision": ["quantization", "mixed_precision"],
                "digits_sparsity_int8": ["magnitude_sparsity", "quantization"], "digits_filter_pruning": ["filter_pruning"],
                "digits_binarization": ["binarization"]}[path.stem]
    assert list(ctrl) == expected


def test_levels_and_full_compression_follow_the_schedules_and_stages():
    from fxcompress.samples.config import read_config
    from fxcompress.samples.runner import compile_model, compression_levels, fully_compressed
    seen = {}
    for name in ("digits_binarization", "digits_sparsity_int8", "digits_int8"):
        config = validate(read_config(REFERENCE_CONFIGS[0].parent / f"{name}.json"))
        task = ClassificationTask()
        ctrl, _ = compile_model(task, task.build_model("digits_cnn", 10, config), config)
        seen[name] = []
        for _ in range(4):
            seen[name].append((compression_levels(ctrl), fully_compressed(ctrl)))
            ctrl.scheduler.epoch_step()
    # binarization: float, activations binarized, then weights too (start epochs 1 and 2)
    assert seen["digits_binarization"][:3] == [({"binarization_level": 0.0}, False),
                                               ({"binarization_level": 0.5}, False),
                                               ({"binarization_level": 1.0}, True)]
    # sparsity 0.1 -> 0.5 at epoch 3 (polynomial); plain quantization is no schedule and always "full"
    assert [fully for _, fully in seen["digits_sparsity_int8"]] == [False, False, False, True]
    assert seen["digits_sparsity_int8"][3][0] == {"magnitude_sparsity_level": 0.5}
    assert seen["digits_int8"] == [({}, True)] * 4
