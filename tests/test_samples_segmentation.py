"""The segmentation sample: mean IoU against hand-computed values, the VOC and CamVid readers and
their layout errors, UNet, training on drawn shapes, int8 export to ONNX Runtime and OpenVINO."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fxcompress.samples import voc
from fxcompress.samples.metrics import ConfusionMatrix
from fxcompress.samples.segmentation import SegmentationTask
from fxcompress.samples.shapes import write_shapes_dataset
from fxcompress.samples.task import SampleError
from fxcompress.samples.unet import UNet
from samples_helpers import export_int8_and_run, loaders, resume_matches_uninterrupted, run_cli, train_epochs

SIZE = 32
CONFIG = {"model": "unet", "model_params": {"depth": 3, "width": 8},
          "input_info": {"sample_size": [1, 3, SIZE, SIZE]}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=96, num_val=32, image_size=SIZE, seed=0)


def test_mean_iou_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    predicted = torch.tensor([[0, 1, 1], [1, 2, 0]])
    matrix = ConfusionMatrix(4, ignore_index=255)
    matrix.update(predicted, target)
    # The 255 pixel is skipped: (t0,p0), (t0,p1), (t1,p1) x2, (t2,p2).
    assert matrix.matrix[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    iou = matrix.iou_per_class()
    assert iou[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert torch.isnan(iou[3])  # class 3 occurs nowhere: left out of the mean
    assert matrix.mean_iou() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # Accumulation is over pixels, not a mean of per-batch values.
    matrix.update(torch.tensor([3, 3]), torch.tensor([0, 3]))
    assert matrix.iou_per_class().tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1 / 2])


def test_unet_keeps_the_input_size_and_checks_it():
    model = UNet(num_classes=5, depth=3, width=4, up_mode="upsample")
    assert model(torch.zeros(2, 3, 16, 24)).shape == (2, 5, 16, 24)
    task = SegmentationTask()
    with pytest.raises(SampleError, match=r"divisible by 4, not 30x32"):
        task.build_model("unet", 3, {**CONFIG, "input_info": {"sample_size": [1, 3, 30, 32]}})
    with pytest.raises(SampleError, match=r"model_params.*unet.*wdith"):
        task.build_model("unet", 3, {**CONFIG, "model_params": {"wdith": 3}})
    with pytest.raises(SampleError, match=r"unknown segmentation model 'unte' \(known: unet"):
        task.build_model("unte", 3, CONFIG)


def test_loss_skips_the_ignore_index_and_names_a_mask_value_out_of_range():
    criterion = SegmentationTask().criterion({})
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]).T.reshape(1, 2, 3, 1)
    loss = criterion(logits, torch.tensor([[[0], [1], [255]]]))
    expected = torch.nn.functional.cross_entropy(logits[..., :2, :], torch.tensor([[[0], [1]]]))
    assert float(loss) == pytest.approx(float(expected))
    with pytest.raises(SampleError, match=r"a mask holds class index 7, but the model predicts 2 classes"):
        criterion(logits, torch.tensor([[[0], [7], [255]]]))


def test_voc_reader_returns_the_drawn_masks(shapes):
    task = SegmentationTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    assert (len(train), len(val), num_classes) == (96, 32, 4)
    image, mask = val[0]
    assert image.shape == (3, SIZE, SIZE) and mask.dtype == torch.int64
    from PIL import Image
    drawn = np.asarray(Image.open(shapes / "SegmentationClass" / "000096.png"))
    assert torch.equal(mask, torch.from_numpy(drawn.astype(np.int64)))
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255} and 255 in mask.unique().tolist()


def test_camvid_layout(tmp_path):
    root = write_shapes_dataset(tmp_path, num_train=4, num_val=2, image_size=SIZE, layout="camvid")
    train, val, num_classes = SegmentationTask().build_datasets(root, CONFIG)
    assert (len(train), len(val), num_classes) == (4, 2, 4)  # classes.txt: 3 shapes + background
    (root / "classes.txt").unlink()
    assert SegmentationTask().build_datasets(root, CONFIG)[2] == voc.CAMVID_NUM_CLASSES
    (root / "valannot" / "000005.png").unlink()
    with pytest.raises(SampleError, match=r"valannot/000005.png does not exist \(expected CamVid layout"):
        SegmentationTask().build_datasets(root, CONFIG)


def test_layout_errors_name_the_path(tmp_path):
    task = SegmentationTask()
    with pytest.raises(SampleError, match=rf"data directory {tmp_path / 'nope'} does not exist"):
        task.build_datasets(tmp_path / "nope", CONFIG)
    with pytest.raises(SampleError, match=r"neither in the Pascal VOC segmentation layout.* nor in the CamVid"):
        task.build_datasets(tmp_path, CONFIG)
    root = write_shapes_dataset(tmp_path / "voc", num_train=3, num_val=2, image_size=SIZE)
    (root / "SegmentationClass" / "000001.png").unlink()
    with pytest.raises(SampleError, match=r"SegmentationClass/000001.png does not exist \(expected Pascal VOC"):
        task.build_datasets(root, CONFIG)
    write_shapes_dataset(root, num_train=3, num_val=2, image_size=SIZE)
    (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(SampleError, match=r"ImageSets/Segmentation/val.txt does not exist"):
        task.build_datasets(root, {**CONFIG, "dataset": "voc"})
    from PIL import Image
    Image.new("RGB", (SIZE, SIZE)).save(root / "rgb.png")
    with pytest.raises(SampleError, match=r"rgb.png: a mask must be an index-colour \(P\) or grayscale"):
        voc.load_mask(root / "rgb.png", (SIZE, SIZE))
    with pytest.raises(SampleError, match=r"input_info.sample_size' must be \[N, 3, H, W\]"):
        task.build_datasets(root, {"input_info": {"sample_size": [1, 3, "32", 32]}})


@pytest.mark.slow  # the command-line run below trains the same way (with compression)
def test_training_improves_mean_iou(shapes):
    torch.manual_seed(0)
    task = SegmentationTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    model = task.build_model("unet", num_classes, CONFIG)
    train_loader, val_loader = loaders(task, train, val, batch_size=4)
    untrained = task.evaluate(model, val_loader, "cpu")
    train_epochs(task, model, train_loader, CONFIG, epochs=2, lr=1e-2)
    trained = task.evaluate(model, val_loader, "cpu")
    assert trained == task.evaluate(model, val_loader, "cpu")  # deterministic
    # Predicting background everywhere scores about 0.2 (its IoU over the 4 classes present).
    assert untrained < 0.3 and trained > untrained + 0.15, (untrained, trained)


@pytest.mark.slow  # the same export runs end to end through the command line below
def test_int8_export_runs_in_onnxruntime_and_openvino(shapes, tmp_path):
    torch.manual_seed(0)
    task = SegmentationTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    model = task.build_model("unet", num_classes, CONFIG)
    expected, ort_outputs, ov_outputs = export_int8_and_run(task, model, CONFIG, loaders(task, val, val, 8)[1],
                                                            tmp_path / "unet.onnx")
    assert ort_outputs[0].shape == expected[0].shape == (1, num_classes, SIZE, SIZE)
    # Within a few steps of the output quantizer-free logits' scale: rounding flips at .5 boundaries.
    scale = float(np.abs(expected[0]).max())
    assert np.abs(ort_outputs[0] - expected[0]).max() < 0.05 * scale
    assert np.abs(ov_outputs[0] - expected[0]).max() < 0.05 * scale
    assert (ort_outputs[0].argmax(1) == expected[0].argmax(1)).mean() > 0.95


# -- end to end through `fxcompress train|test|export` ----------------------------------------
CLI_CONFIG = {**CONFIG, "batch_size": 4, "epochs": 2, "optimizer": {"type": "adam", "base_lr": 0.01},
              "compression": [
                  {"algorithm": "magnitude_sparsity",
                   "params": {"schedule": "polynomial", "sparsity_target": 0.3, "sparsity_target_epoch": 1}},
                  {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 32},
                                                                "batchnorm_adaptation": {"num_bn_adaptation_samples": 32}}}]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "unet_sparsity_int8.json"
    path.write_text(json.dumps(CLI_CONFIG))
    return path


@pytest.fixture(scope="module")
def trained(shapes, config_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--config", config_file, "--data", shapes, "--log-dir", log_dir,
                   "--to-onnx", log_dir / "model.onnx", "--seed", 0) == 0
    return log_dir


def _val_arrays(shapes):
    _, val, _ = SegmentationTask().build_datasets(shapes, CLI_CONFIG)
    return torch.stack([val[i][0] for i in range(len(val))]).numpy(), torch.stack([val[i][1] for i in range(len(val))])


def test_cli_training_improves_mean_iou_and_the_export_keeps_it(trained, shapes):
    result = json.loads((trained / "result.json").read_text())
    assert result["metric_name"] == "mIoU" and result["levels"] == {"magnitude_sparsity_level": 0.3}
    assert result["fp32_metric"] < 0.3 and result["metric"] > result["fp32_metric"] + 0.15, result
    images, masks = _val_arrays(shapes)
    import onnxruntime as ort
    import openvino as ov
    session = ort.InferenceSession(str(trained / "model.onnx"))  # the default session
    compiled = ov.Core().compile_model(str(trained / "model.onnx"), "CPU")
    for logits in (session.run(None, {session.get_inputs()[0].name: images})[0],
                   compiled(images)[compiled.output(0)]):
        matrix = ConfusionMatrix(4)
        matrix.update(torch.from_numpy(np.asarray(logits)).argmax(1), masks)
        # Equal within one quantization step: only near-tie pixels may flip class.
        assert matrix.mean_iou() == pytest.approx(result["metric"], abs=0.01)


def test_cli_resume_ends_bitwise_where_the_uninterrupted_run_ends(trained, shapes, config_file, tmp_path, capsys):
    resume_matches_uninterrupted(config_file, shapes, trained, tmp_path, capsys)


def test_cli_test_reads_the_checkpoint(trained, shapes, config_file, capsys):
    # (`export --resume` is the runner's, tested with classification; `train --to-onnx` above exports.)
    metric = json.loads((trained / "result.json").read_text())["metric"]
    assert run_cli("test", "--config", config_file, "--data", shapes, "--resume", trained / "last.pth") == 0
    assert f"compressed mIoU: {metric:.4f}" in capsys.readouterr().out


def test_cli_a_layout_error_is_one_line_and_exit_code_2(tmp_path, config_file, capsys):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    log_dir = tmp_path / "log"
    assert run_cli("train", "--config", config_file, "--data", tmp_path, "--log-dir", log_dir) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"fxcompress: error: {tmp_path / 'SegmentationClass'} does not exist "
                     f"(expected {voc.VOC_SEGMENTATION_LAYOUT})")
    assert not log_dir.exists()


@pytest.mark.slow  # Hessian traces take a while
def test_cli_mixed_precision_takes_hessian_traces_of_the_segmentation_loss(shapes, tmp_path):
    # HAWQ's default loss, cross-entropy without an ignore index, fails on VOC's 255 pixels:
    # the runner gives it the task's loss.
    config = {**CLI_CONFIG, "epochs": 1, "compression": {
        "algorithm": "quantization", "initializer": {
            "range": {"num_init_samples": 16},
            "precision": {"type": "hawq", "bits": [4, 8], "compression_ratio": 1.5, "num_data_points": 16,
                          "iter_number": 10}}}}
    path = tmp_path / "hawq.json"
    path.write_text(json.dumps(config))
    assert run_cli("train", "--config", path, "--data", shapes, "--log-dir", tmp_path / "run") == 0
    statistics = (tmp_path / "run" / "statistics.txt").read_text()
    assert "mixed_precision" in statistics and re.search(r"bits: \{4: \d+, 8: \d+\}", statistics), statistics
