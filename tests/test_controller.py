"""Controller: initialize over any batch format, loss, statistics, checkpoints that resume exactly."""
import pytest
import torch

from fxcompress import CheckpointError, compile_for_compression, load_state
from fxcompress.data import batch_to_inputs
from fxcompress.testing import models as zoo
from toy_passes import ScaleAfterActivations


def _compiled(init=0.5):
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    model.eval()
    ctrl, gm = compile_for_compression(model, [ScaleAfterActivations(init=init)], inputs)
    return model, inputs, ctrl, gm


def test_checkpoint_round_trip_gives_identical_outputs_and_controller_state(tmp_path):
    model, inputs, ctrl, gm = _compiled()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(3):
        loss = gm(*inputs).square().mean() + ctrl.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.scheduler.step()
    ctrl.scheduler.epoch_step()
    ctrl.initialize([inputs[0]])
    torch.save(gm.state_dict(), tmp_path / "gm.pt")
    torch.save(ctrl.state_dict(), tmp_path / "ctrl.pt")

    _, _, ctrl2, gm2 = _compiled()
    load_state(gm2, torch.load(tmp_path / "gm.pt", weights_only=True))
    ctrl2.load_state_dict(torch.load(tmp_path / "ctrl.pt", weights_only=True))
    gm.eval(), gm2.eval()
    assert torch.equal(gm(*inputs), gm2(*inputs))
    assert ctrl2.state_dict() == ctrl.state_dict()
    assert ctrl2.state_dict()["toy_gain"]["scheduler"] == {"current_epoch": 1, "current_step": 0, "global_step": 3}
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()


def test_load_state_strips_ddp_prefix_and_names_bad_keys():
    _, inputs, _, gm = _compiled()
    state = {f"module.{k}": v for k, v in gm.state_dict().items()}
    _, _, _, gm2 = _compiled(init=3.0)
    load_state(gm2, state)
    assert torch.equal(gm(*inputs), gm2(*inputs))

    bad = dict(gm.state_dict())
    bad.pop("relu_gain.gain")
    bad["conv1.weight"] = torch.zeros(1)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_state(gm2, bad)
    message = str(info.value)
    assert "missing keys ['relu_gain.gain']" in message
    assert "unexpected keys ['extra.weight']" in message
    assert "conv1.weight: checkpoint (1,) vs model" in message
    assert torch.equal(gm(*inputs), gm2(*inputs))  # nothing was loaded


def test_controller_checkpoint_for_other_setup_is_rejected():
    _, _, ctrl, _ = _compiled()
    with pytest.raises(CheckpointError, match="missing \\['toy_gain'\\], unexpected \\['quantization'\\]"):
        ctrl.load_state_dict({"quantization": {}})


@pytest.mark.parametrize("make_batch", [
    lambda x, y: x,
    lambda x, y: (x, y),
    lambda x, y: [x, y],
    lambda x, y: ((x,), y),
    lambda x, y: {"x": x, "labels": y},
])
def test_initialize_accepts_the_usual_batch_formats(make_batch):
    model, inputs, ctrl, gm = _compiled()
    x = inputs[0]
    loader = [make_batch(x, torch.zeros(x.shape[0], dtype=torch.long)) for _ in range(3)]
    ctrl.initialize(loader)
    # 8 samples at batch 2: the toy part stops after 4 batches; the loader has 3.
    assert ctrl.parts[0].seen_batches == 3


def test_initialize_with_input_fn_and_bad_batches():
    _, inputs, ctrl, _ = _compiled()
    ctrl.initialize([{"pixels": inputs[0]}], input_fn=lambda b: (b["pixels"],))
    assert ctrl.parts[0].seen_batches == 1
    with pytest.raises(TypeError, match="pass input_fn="):
        batch_to_inputs("not a batch")


def test_statistics_table_and_dict():
    _, _, ctrl, _ = _compiled()
    stats = ctrl.statistics()
    d = stats.to_dict()
    assert d["toy_gain"]["num_gains"] == len(ctrl.parts[0].gains)
    assert d["toy_gain"]["layers"][0] == {"name": "relu_gain", "gain": 0.5}
    text = str(stats)
    assert text.startswith("== toy_gain ==") and "relu_gain" in text and "0.5" in text
