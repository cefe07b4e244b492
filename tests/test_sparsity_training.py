"""Sparsity in training on the digits CNN: accuracy, RB density, checkpoint resume (issue 5's must-shows)."""
import io

import onnx
import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress import compile_for_compression
from fxcompress.passes import MagnitudeSparsity, Quantize, RBSparsity
from fxcompress.testing import evaluate_accuracy
from training import digits_setup, fine_tune, report


def magnitude_50(**kw):
    return MagnitudeSparsity(sparsity_init=0.25, sparsity_target=0.5, sparsity_target_epoch=2,
                             sparsity_freeze_epoch=2, **kw)


def test_digits_magnitude_50_within_1pct_of_fp32(train_seed):
    model, train, test, fp32 = digits_setup(train_seed)
    ctrl, gm = compile_for_compression(model, [magnitude_50()], example_inputs=(next(iter(train))[0],),
                                       copy=True)
    # the masks are final from epoch 2; two epochs under them: with one (3 epochs) the worst of 6 runs
    # (seeds 0-2 x AVX2/default ATen) dropped 1.11 points, with two 0.67 at worst (docs/testing.md)
    fine_tune(ctrl, gm, train, epochs=4)
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-4) and stats["frozen"]
    acc = evaluate_accuracy(gm, test)
    report("magnitude_50", train_seed, fp32=fp32, acc=acc, drop=fp32 - acc)
    assert acc >= fp32 - 0.01, (acc, fp32)
    assert evaluate_accuracy(ctrl.strip(), test) == acc


def test_digits_magnitude_50_plus_int8_within_1pct_of_fp32_and_exported_zeros(train_seed, tmp_path):
    import onnxruntime as ort
    model, train, test, fp32 = digits_setup(train_seed)
    ctrl, gm = compile_for_compression(model, [magnitude_50(), Quantize(bits=8)],
                                       example_inputs=(next(iter(train))[0],), copy=True)
    ctrl.initialize(train)
    fine_tune(ctrl, gm, train, epochs=3)
    acc = evaluate_accuracy(gm, test)
    assert acc >= fp32 - 0.01, (acc, fp32)
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-4)

    path = ctrl.export_onnx(tmp_path / "digits_sparse_int8.onnx")
    onnx_model = onnx.load(path)
    int_weights = [onnx.numpy_helper.to_array(i) for i in onnx_model.graph.initializer
                   if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) >= 2]
    assert len(int_weights) == 4, "every conv and linear weight is stored as int8"
    assert sum(int((w == 0).sum()) for w in int_weights) == stats["masked_params"]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in test:
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        correct += int((out.argmax(-1) == y.numpy()).sum())
        total += len(y)
    # ONNX Runtime's default session runs the QDQ graph in its own integer kernels (VNNI where the CPU
    # has it): a few images may flip against torch, which the 1% margin covers (docs/testing.md).
    # measured (docs/testing.md): -0.67 to 0.44 points below fp32 in torch and ONNX Runtime alike
    report("magnitude_50_int8", train_seed, fp32=fp32, acc=acc, ort=correct / total, drop=fp32 - min(acc, correct / total))
    assert correct / total >= fp32 - 0.01


RB_EPOCHS, RB_TARGET_EPOCH, RB_FREEZE_EPOCH = 5, 1, 3


def train_rb_to_half_density(seed: int):
    """NNCF's RB recipe, scaled to the digits: the density loss asks for 50% from epoch 1 on, the
    weights train under sampled masks while the logits find which weights to keep, the masks
    freeze at epoch 3 and epochs 3-4 train the weights under that final mask. Returns
    ``(ctrl, gm, test_loader, fp32_accuracy, densities)``, the densities of the deterministic masks
    after each epoch."""
    model, train, test, fp32 = digits_setup(seed)
    ctrl, gm = compile_for_compression(
        model, [RBSparsity(sparsity_init=0.0, sparsity_target=0.5, sparsity_target_epoch=RB_TARGET_EPOCH,
                           sparsity_freeze_epoch=RB_FREEZE_EPOCH)],
        example_inputs=(next(iter(train))[0],), copy=True)
    logits = [p for n, p in gm.named_parameters() if n.endswith("_mask.logits")]
    weights = [p for n, p in gm.named_parameters() if not n.endswith("_mask.logits")]
    optimizer_groups = [{"params": weights, "lr": 1e-3}, {"params": logits, "lr": 0.1}]
    densities = []
    for _ in range(RB_EPOCHS):
        fine_tune(ctrl, gm, train, epochs=1, betas=(0.5, 0.999), params=optimizer_groups)
        densities.append(1 - ctrl.statistics().to_dict()["rb_sparsity"]["sparsity"])
    return ctrl, gm, test, fp32, densities


@pytest.mark.seeds(0, 1)
def test_rb_sparsity_reaches_its_target_density(train_seed):
    ctrl, gm, test, fp32, densities = train_rb_to_half_density(train_seed)
    stats = ctrl.statistics().to_dict()["rb_sparsity"]
    assert stats["frozen"] and stats["current_target"] == pytest.approx(0.5)
    assert abs(stats["sparsity"] - 0.5) <= 0.02, densities
    assert len(set(densities[RB_FREEZE_EPOCH - 1:])) == 1, f"the masks stay fixed once frozen: {densities}"
    assert ctrl.loss().item() == 0.0, "the loss is off once frozen"
    # measured (docs/testing.md): 0.980-0.991 and densities 0.4976-0.5016 over seeds 0-4 with ATen at AVX2
    # and at its baseline; the recipe without the frozen epochs scored 0.60-0.88
    acc = evaluate_accuracy(gm, test)
    report("rb_50", train_seed, fp32=fp32, acc=acc, density=densities[-1], densities=[round(d, 4) for d in densities])
    assert acc > 0.9, (acc, fp32, densities)
    plain = ctrl.strip()
    assert evaluate_accuracy(plain, test) == acc


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make", [
    lambda: MagnitudeSparsity(sparsity_init=0.1, sparsity_target=0.6, sparsity_target_epoch=2, sparsity_freeze_epoch=2,
                              update_per_optimizer_step=True, power=2),
    lambda: RBSparsity(sparsity_init=0.0, sparsity_target=0.4, sparsity_target_epoch=2, sparsity_freeze_epoch=2,
                       schedule="polynomial", update_per_optimizer_step=True),
], ids=["magnitude", "rb"])
@pytest.mark.filterwarnings("ignore:rb_sparsity. the masks froze")  # 12 steps of SGD do not reach RB's target
def test_resume_from_checkpoint_continues_the_same_sequence(make):
    model, train, _, _ = digits_setup(0)
    batches = [b for _, b in zip(range(4), train)]
    example = (batches[0][0],)

    def run(ctrl, gm, start, stop, record):
        opt = torch.optim.SGD(gm.parameters(), lr=0.05)
        for i in range(start, stop):
            torch.manual_seed(i)  # RB samples masks: same noise at the same step, resumed or not
            x, y = batches[i % len(batches)]
            gm.train()
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(gm(x), y) + ctrl.loss()).backward()
            opt.step()
            ctrl.scheduler.step()
            if (i + 1) % len(batches) == 0:
                ctrl.scheduler.epoch_step()
            part = ctrl.parts[0]
            record.append((part.scheduler.current_level, part.frozen,
                           [m.clone() for m in part.masks()]))

    straight = []
    c, g = compile_for_compression(model, [make()], example_inputs=example, copy=True)
    run(c, g, 0, 12, straight)

    first = []
    c1, g1 = compile_for_compression(model, [make()], example_inputs=example, copy=True)
    run(c1, g1, 0, 6, first)
    saved = roundtrip({"ctrl": c1.state_dict(), "gm": g1.state_dict()})
    resumed = []
    c2, g2 = compile_for_compression(model, [make()], example_inputs=example, copy=True)
    fxcompress.load_state(g2, saved["gm"])
    c2.load_state_dict(saved["ctrl"])
    run(c2, g2, 6, 12, resumed)

    both = first + resumed
    assert len(both) == len(straight)
    for step, (a, b) in enumerate(zip(both, straight)):
        assert a[0] == b[0] and a[1] == b[1], (step, a[:2], b[:2])
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2])), step
    for key, value in g.state_dict().items():
        assert torch.equal(value, g2.state_dict()[key]), key
    assert straight[-1][1], "the sequence reaches the freeze epoch"
    assert len({round(r[0], 6) for r in straight}) > 3, "the level changed along the way"
