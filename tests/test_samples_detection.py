"""The detection sample: VOC mAP@0.5 and NMS against hand-built cases, SSD box coding, default boxes
and matching, the VOC detection reader and its layout errors, training on drawn shapes, int8 export
of the raw heads to ONNX Runtime and OpenVINO."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fxcompress.samples.detection import DetectionTask
from fxcompress.samples.metrics import DetectionAP, average_precision, nms, nms_reference
from fxcompress.samples.shapes import write_shapes_dataset
from fxcompress.samples import voc
from fxcompress.samples.ssd import MultiBoxLoss, SmallSSD, decode, default_boxes, encode, match, postprocess
from fxcompress.samples.task import SampleError
from samples_helpers import export_int8_and_run, loaders, resume_matches_uninterrupted, run_cli, train_epochs

SIZE = 64
CONFIG = {"model": "ssd_small", "model_params": {"width": 8}, "input_info": {"sample_size": [1, 3, SIZE, SIZE]}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=96, num_val=32, image_size=SIZE, seed=0)


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(-1, 4)


def test_average_precision_is_the_area_under_the_precision_envelope():
    # Precision 0.67 at recall 0.4 is raised to the later 0.75: 0.2 * 1 + 0.2 * 1 + 0.2 * 0.75.
    recall = torch.tensor([0.2, 0.4, 0.4, 0.6])
    precision = torch.tensor([1.0, 1.0, 2 / 3, 0.75])
    assert average_precision(recall, precision) == pytest.approx(0.55)


def test_map_hand_built():
    metric = DetectionAP(num_classes=4)
    a, b = _boxes([0, 0, 10, 10], [20, 20, 30, 30]), _boxes([0, 0, 10, 10], [50, 50, 60, 60])
    # Image 1, class 1: hit (0.9), miss (0.8), hit with IoU 0.81 (0.7):
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3 -> AP = 0.5 * 1 + 0.5 * 2/3.
    metric.update({"boxes": _boxes([0, 0, 10, 10], [100, 100, 110, 110], [21, 21, 30, 30]),
                   "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 1, 1])},
                  {"boxes": a, "labels": torch.tensor([1, 1])})
    # Image 2, class 2: a detection of a difficult box (neither TP nor FP), a hit, a duplicate (FP):
    # AP = 1. Class 3 has a detection but no ground truth: left out of the mean.
    metric.update({"boxes": _boxes([50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 5, 5]),
                   "scores": torch.tensor([0.95, 0.6, 0.5, 0.4]), "labels": torch.tensor([2, 2, 2, 3])},
                  {"boxes": b, "labels": torch.tensor([2, 2]), "difficult": torch.tensor([False, True])})
    assert metric.per_class() == pytest.approx({1: 0.5 + 0.5 * 2 / 3, 2: 1.0})
    assert metric.mean_ap() == pytest.approx((0.5 + 0.5 * 2 / 3 + 1.0) / 2)
    # IoU exactly 0.5 counts (VOC: >= threshold); a box found by no detection lowers recall.
    metric = DetectionAP(num_classes=2)
    metric.update({"boxes": _boxes([0, 0, 10, 10]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])},
                  {"boxes": _boxes([0, 0, 10, 20], [30, 30, 40, 40]), "labels": torch.tensor([1, 1])})
    assert metric.mean_ap() == pytest.approx(0.5)


def test_nms_hand_built():
    boxes = _boxes([0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.6])
    # Box 1 (best) suppresses box 0 (IoU 9/11) and box 3 if the threshold is below 45/105; box 2 is apart.
    assert nms_reference(boxes, scores, 0.5).tolist() == [1, 2, 3]
    assert nms_reference(boxes, scores, 0.43).tolist() == [1, 2, 3]
    assert nms_reference(boxes, scores, 0.42).tolist() == [1, 2]
    assert nms(boxes, scores, 0.42).tolist() == [1, 2]
    assert nms_reference(boxes, scores, 0.85).tolist() == [1, 0, 2, 3]


def test_nms_reference_agrees_with_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops")
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(300, 2, generator=generator) * 20], 1)
    scores = torch.rand(300, generator=generator)
    for threshold in (0.3, 0.5, 0.7):
        assert torch.equal(nms_reference(boxes, scores, threshold), tv_ops.nms(boxes, scores, threshold))


def test_box_coding_and_matching():
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]])
    boxes = _boxes([0.0, 0.1, 0.4, 0.5], [0.5, 0.5, 1.0, 1.0], [0.45, 0.45, 0.55, 0.55])
    offsets = encode(boxes, priors)
    # (cx - pcx) / (0.1 * pw): (0.2 - 0.25) / 0.05 = -1, (0.3 - 0.25) / 0.05 = 1; log(w / pw) / 0.2.
    assert offsets[0].tolist() == pytest.approx([-1.0, 1.0, np.log(0.8) / 0.2, np.log(0.8) / 0.2], abs=1e-6)
    assert torch.allclose(decode(offsets, priors), boxes, atol=1e-6)
    # Prior 0 overlaps box 0 (IoU 0.64 -> 0.64 >= 0.5), prior 1 is box 1 exactly; prior 2 overlaps
    # box 2 with IoU 0.25 only, but is box 2's best prior, so it is claimed anyway.
    matched, labels = match(boxes, torch.tensor([3, 1, 2]), priors, iou_threshold=0.5)
    assert labels.tolist() == [3, 1, 2] and torch.equal(matched, boxes)
    matched, labels = match(boxes[:2], torch.tensor([3, 1]), priors, iou_threshold=0.5)
    assert labels.tolist() == [3, 1, 0]  # prior 2: IoU < 0.5 with every box -> background
    assert match(boxes[:0], torch.tensor([], dtype=torch.long), priors)[1].tolist() == [0, 0, 0]


def test_multibox_loss_hard_negative_mining():
    # One object matched by prior 0; of the 4 background priors only the 3 with the highest
    # background loss count (neg_pos_ratio 3), so prior 4's loss (the smallest) is left out.
    priors = torch.tensor([[0.5, 0.5, 0.4, 0.4]] + [[0.1 + 0.2 * i, 0.1, 0.1, 0.1] for i in range(4)])
    target = [{"boxes": _boxes([0.3, 0.3, 0.7, 0.7]), "labels": torch.tensor([1])}]
    loc = torch.zeros(1, 5, 4)
    conf = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [0.0, 1.5], [0.0, 1.0], [0.0, -3.0]]])
    loss = MultiBoxLoss(lambda: priors)((loc, conf), target)
    ce = torch.nn.functional.cross_entropy(conf[0], torch.tensor([1, 0, 0, 0, 0]), reduction="none")
    assert float(loss) == pytest.approx(float(ce[:4].sum()))  # the matched prior's offsets are exact: loc loss 0


@pytest.mark.parametrize("size", [64, 96, 300])
def test_default_boxes_match_the_heads(size):
    model = SmallSSD(num_classes=3, width=4, num_maps=4).eval()
    loc, conf = model(torch.zeros(2, 3, size, size))
    priors = model.priors(size, size)
    assert loc.shape == (2, len(priors), 4) and conf.shape == (2, len(priors), 3)
    first = -(-size // 8)  # stride 8, padded convs round up
    assert len(default_boxes([(first, first)])) == first * first * 4
    assert float(priors.min()) >= 0 and float(priors.max()) <= 1


def test_voc_reader_boxes_are_the_drawn_ones(shapes):
    task = DetectionTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    assert (len(train), len(val), num_classes) == (96, 32, 4)
    from xml.etree import ElementTree
    root = ElementTree.parse(shapes / "Annotations" / "000096.xml").getroot()
    names = ["rectangle", "ellipse", "triangle"]
    expected = [[(float(o.findtext(f"bndbox/{k}")) - d) / SIZE for k, d in
                 (("xmin", 1), ("ymin", 1), ("xmax", 0), ("ymax", 0))] for o in root.iter("object")]
    image, target = val[0]
    assert image.shape == (3, SIZE, SIZE)
    assert target["boxes"].flatten().tolist() == pytest.approx(sum(expected, []))
    assert target["labels"].tolist() == [names.index(o.findtext("name")) + 1 for o in root.iter("object")]
    # The drawn masks agree with the boxes: each box holds pixels of its class, nothing outside a box is drawn.
    from PIL import Image
    mask = torch.from_numpy(np.asarray(Image.open(shapes / "SegmentationClass" / "000096.png")).astype(np.int64))
    outside = mask.clone()
    for box, label in zip(target["boxes"] * SIZE, target["labels"]):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        assert (mask[y1:y2, x1:x2] == label).any()
        outside[y1:y2, x1:x2] = 0
    assert int(outside.count_nonzero()) == 0


def test_layout_errors_name_the_path(tmp_path):
    task = DetectionTask()
    with pytest.raises(SampleError, match=r"does not exist \(expected Pascal VOC detection layout"):
        task.build_datasets(tmp_path, CONFIG)
    root = write_shapes_dataset(tmp_path / "voc", num_train=3, num_val=2, image_size=SIZE)
    (root / "Annotations" / "000004.xml").unlink()
    with pytest.raises(SampleError, match=r"Annotations/000004.xml does not exist"):
        task.build_datasets(root, CONFIG)
    (root / "Annotations" / "000004.xml").write_text("<annotation><size><width>64</width></size></annotation")
    with pytest.raises(SampleError, match=r"000004.xml: not a VOC annotation"):
        task.build_datasets(root, CONFIG)
    write_shapes_dataset(root, num_train=3, num_val=2, image_size=SIZE)
    with pytest.raises(SampleError, match=r"000000.xml: object class '\w+' is not one of the classes \(cat, dog\)"):
        task.build_datasets(root, {**CONFIG, "classes": ["cat", "dog"]})
    with pytest.raises(SampleError, match=r"config key 'detection.nms_iuo' is unknown"):
        task.build_model("ssd_small", 4, {**CONFIG, "detection": {"nms_iuo": 0.5}})
    with pytest.raises(SampleError, match=r"unknown detection model 'ssd' \(known: ssd_small"):
        task.build_model("ssd", 4, CONFIG)
    with pytest.raises(SampleError, match=r"'pretrained': the detection sample loads no pretrained weights"):
        task.build_model("ssd_small", 4, {**CONFIG, "pretrained": True})


@pytest.mark.slow  # the command-line run below trains the same way (with compression)
def test_training_improves_map(shapes):
    torch.manual_seed(0)
    task = DetectionTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    model = task.build_model("ssd_small", num_classes, CONFIG)
    train_loader, val_loader = loaders(task, train, val, batch_size=4)
    untrained = task.evaluate(model, val_loader, "cpu")
    train_epochs(task, model, train_loader, CONFIG, epochs=2, lr=1e-2)
    trained = task.evaluate(model, val_loader, "cpu")
    assert trained == task.evaluate(model, val_loader, "cpu")  # deterministic
    assert untrained < 0.05 and trained > untrained + 0.1, (untrained, trained)


@pytest.mark.slow  # the same export runs end to end through the command line below
def test_int8_export_of_the_raw_heads_runs_in_onnxruntime_and_openvino(shapes, tmp_path):
    torch.manual_seed(0)
    task = DetectionTask()
    train, val, num_classes = task.build_datasets(shapes, CONFIG)
    model = task.build_model("ssd_small", num_classes, CONFIG)
    expected, ort_outputs, ov_outputs = export_int8_and_run(task, model, CONFIG, loaders(task, val, val, 8)[1],
                                                            tmp_path / "ssd.onnx")
    num_priors = len(task.priors)
    assert [o.shape for o in ort_outputs] == [(1, num_priors, 4), (1, num_priors, num_classes)]
    for outputs in (ort_outputs, ov_outputs):
        for got, want in zip(outputs, expected):
            assert np.abs(got - want).max() < 0.05 * float(np.abs(want).max())


# -- end to end through `fxcompress train|test|export` ----------------------------------------
CLI_CONFIG = {**CONFIG, "batch_size": 4, "epochs": 2, "optimizer": {"type": "adam", "base_lr": 0.01},
              "compression": [
                  {"algorithm": "magnitude_sparsity",
                   "params": {"schedule": "polynomial", "sparsity_target": 0.3, "sparsity_target_epoch": 1}},
                  {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 32},
                                                                "batchnorm_adaptation": {"num_bn_adaptation_samples": 32}}}]}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "ssd_sparsity_int8.json"
    path.write_text(json.dumps(CLI_CONFIG))
    return path


@pytest.fixture(scope="module")
def trained(shapes, config_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--config", config_file, "--data", shapes, "--log-dir", log_dir,
                   "--to-onnx", log_dir / "model.onnx", "--seed", 0) == 0
    return log_dir


def test_cli_training_improves_map_and_the_export_keeps_it(trained, shapes):
    result = json.loads((trained / "result.json").read_text())
    assert result["metric_name"] == "mAP@0.5" and result["levels"] == {"magnitude_sparsity_level": 0.3}
    assert result["fp32_metric"] < 0.05 and result["metric"] > result["fp32_metric"] + 0.1, result
    task = DetectionTask()
    _, val, num_classes = task.build_datasets(shapes, CLI_CONFIG)
    task.build_model("ssd_small", num_classes, CLI_CONFIG)  # the default boxes
    images = torch.stack([val[i][0] for i in range(len(val))]).numpy()
    import onnxruntime as ort
    import openvino as ov
    session = ort.InferenceSession(str(trained / "model.onnx"))  # the default session
    compiled = ov.Core().compile_model(str(trained / "model.onnx"), "CPU")
    for loc, conf in (session.run(None, {session.get_inputs()[0].name: images}),
                      [compiled(images)[output] for output in compiled.outputs]):
        metric = DetectionAP(num_classes)
        for detection, i in zip(postprocess(torch.from_numpy(np.asarray(loc)), torch.from_numpy(np.asarray(conf)),
                                            task.priors), range(len(val))):
            metric.update(detection, val[i][1])
        # Equal within one quantization step: near-tie scores may reorder, a box may move a little.
        assert metric.mean_ap() == pytest.approx(result["metric"], abs=0.02)


def test_cli_resume_ends_bitwise_where_the_uninterrupted_run_ends(trained, shapes, config_file, tmp_path, capsys):
    resume_matches_uninterrupted(config_file, shapes, trained, tmp_path, capsys)


def test_cli_test_reads_the_checkpoint(trained, shapes, config_file, capsys):
    # (`export --resume` is the runner's, tested with classification; `train --to-onnx` above exports.)
    metric = json.loads((trained / "result.json").read_text())["metric"]
    assert run_cli("test", "--config", config_file, "--data", shapes, "--resume", trained / "last.pth") == 0
    assert f"compressed mAP@0.5: {metric:.4f}" in capsys.readouterr().out


def test_cli_a_layout_error_is_one_line_and_exit_code_2(tmp_path, config_file, capsys):
    root = write_shapes_dataset(tmp_path / "data", num_train=2, num_val=1, image_size=SIZE)
    (root / "ImageSets" / "Main" / "train.txt").unlink()
    log_dir = tmp_path / "log"
    assert run_cli("train", "--config", config_file, "--data", root, "--log-dir", log_dir) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"fxcompress: error: {root / 'ImageSets' / 'Main' / 'train.txt'} does not exist "
                     f"(expected {voc.VOC_DETECTION_LAYOUT})")
    assert not log_dir.exists()
