"""KnowledgeDistillation: the frozen teacher, the loss over outputs of any structure, hooks, DDP, HF models."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import Config, compile_for_compression
from fxcompress.errors import CheckpointError, ConfigError, UnsupportedModelError
from fxcompress.passes import KnowledgeDistillation, MagnitudeSparsity
from fxcompress.passes.distillation.algorithm import _StudentHook

HALF_SPARSE = dict(sparsity_init=0.5, sparsity_target=0.5, sparsity_target_epoch=0)


class TwoLayer(nn.Module):
    def __init__(self, out=10):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, out)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class Structured(nn.Module):
    """Returns a dict with logits, an integer prediction and a rank-1 float value, and a tuple."""

    def __init__(self):
        super().__init__()
        self.body = TwoLayer()

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "prediction": logits.argmax(-1), "score": logits.sum(-1),
                "pair": (logits * 2, x.sum())}


def compile_kd(model, kd=None, extra=None, x=None, **kwargs):
    passes = [KnowledgeDistillation(**(kd or {"type": "softmax", "temperature": 2.0}))]
    passes += extra if extra is not None else [MagnitudeSparsity(**HALF_SPARSE)]
    return compile_for_compression(model, passes, x if x is not None else torch.randn(4, 16), **kwargs)


def manual_softmax(student, teacher, temperature, scale=1.0):
    return scale * temperature ** 2 * -(F.softmax(teacher / temperature, -1)
                                        * F.log_softmax(student / temperature, -1)).sum(-1).mean()


# -- config ----------------------------------------------------------------------------------------

def test_config_entry_and_pass_are_interchangeable_and_run_first():
    config = Config.from_dict({"input_info": {"sample_size": [4, 16]}, "compression": [
        {"algorithm": "magnitude_sparsity", **HALF_SPARSE},
        {"algorithm": "knowledge_distillation", "type": "softmax", "temperature": 3}]})
    assert [p.algorithm for p in config.passes] == ["knowledge_distillation", "magnitude_sparsity"]
    assert config.passes[0].params == KnowledgeDistillation(type="softmax", temperature=3).params
    assert KnowledgeDistillation(type="softmax").params["temperature"] == 1.0  # NNCF's default
    ctrl, _ = compile_for_compression(TwoLayer(), config)
    assert [p.algorithm for p in ctrl.parts] == ["knowledge_distillation", "magnitude_sparsity"]


@pytest.mark.parametrize("params, field", [
    ({}, "'type' is a required property"),
    ({"type": "kl"}, "KnowledgeDistillation.type"),
    ({"type": "softmax", "temperature": 0}, "KnowledgeDistillation.temperature"),
    ({"type": "mse", "temperature": 2.0}, "KnowledgeDistillation.temperature: applies to type 'softmax' only"),
    ({"type": "mse", "scale": -1}, "KnowledgeDistillation.scale"),
    ({"type": "mse", "temprature": 2}, "did you mean 'temperature'"),
])
def test_bad_parameters_are_config_errors_naming_the_field(params, field):
    with pytest.raises(ConfigError, match=field):
        KnowledgeDistillation(**params)


def test_distillation_after_a_compression_pass_is_an_error_and_leaves_the_model_alone():
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"already compressed by magnitude_sparsity.*put KnowledgeDistillation"):
        compile_for_compression(model, [MagnitudeSparsity(**HALF_SPARSE), KnowledgeDistillation(type="mse")],
                                torch.randn(4, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kd", [{"type": "softmax", "temperature": 2.0, "scale": 0.5}, {"type": "mse", "scale": 3.0}])
def test_loss_is_nncf_formula_against_the_original_model(kd):
    model = TwoLayer().eval()
    original = copy.deepcopy(model)
    ctrl, gm = compile_kd(model, kd)
    x = torch.randn(8, 16)
    gm.train()
    student = gm(x)
    with torch.no_grad():
        teacher = original(x)  # eval mode: running statistics, the original weights
    if kd["type"] == "softmax":
        expected = manual_softmax(student, teacher, 2.0, 0.5)
    else:
        expected = 3.0 * F.mse_loss(student, teacher)
    loss = ctrl.loss()
    assert loss.requires_grad and float(loss.detach()) > 0
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # only the latest training forward counts: an eval forward or one without gradients clears it
    gm.eval()
    gm(x)
    assert float(ctrl.loss()) == 0.0
    gm.train()
    with torch.no_grad():
        gm(x)
    assert float(ctrl.loss()) == 0.0


def test_loss_over_the_matching_floating_point_outputs_of_a_dict_and_tuple():
    model = Structured().eval()
    original = copy.deepcopy(model)
    ctrl, gm = compile_kd(model, {"type": "softmax", "temperature": 1.0})
    x = torch.randn(8, 16)
    gm.train()
    out = gm(x)
    with torch.no_grad():
        ref = original(x)
    # logits and pair[0] are [batch, classes]; the integer prediction, the rank-1 score and the
    # input-only pair[1] are skipped
    expected = manual_softmax(out["logits"], ref["logits"], 1.0) + manual_softmax(out["pair"][0], ref["pair"][0], 1.0)
    torch.testing.assert_close(ctrl.loss(), expected, rtol=1e-6, atol=1e-7)


class IntegerOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x).argmax(-1), self.fc(x).sum(-1)


def test_model_without_distillable_output_is_a_clear_error_at_compile():
    with pytest.raises(UnsupportedModelError, match=r"nothing to distill.*output\[0\]: int64 \[4\].*"
                                                    r"output\[1\]: float32 \[4\]"):
        compile_kd(IntegerOutput(), {"type": "mse"})


def test_student_without_gradient_is_a_clear_error_in_training():
    ctrl, gm = compile_kd(TwoLayer(), {"type": "mse"})
    gm.requires_grad_(False)
    gm.train()
    with pytest.raises(UnsupportedModelError, match="carries gradient.*no gradient"):
        gm(torch.randn(4, 16))


# -- the teacher -----------------------------------------------------------------------------------

def test_teacher_is_a_frozen_snapshot_of_the_original_weights():
    model = TwoLayer().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ctrl, gm = compile_kd(model)  # copy=False: gm trains the user's tensors in place
    teacher = ctrl.parts[0].teacher
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm.train()
    for _ in range(3):
        x = torch.randn(8, 16)
        loss = F.cross_entropy(gm(x), torch.randint(0, 10, (8,))) + ctrl.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the shared weights moved (the optimizer's writes); the graph owns its BN statistics ...
    assert not torch.equal(model.fc1.weight, original["fc1.weight"])
    assert not torch.equal(gm.bn.running_mean, original["bn.running_mean"])
    assert torch.equal(model.bn.running_mean, original["bn.running_mean"])
    # ... the teacher's did not: bitwise the original, frozen, in eval mode, no gradients
    assert teacher.state_dict().keys() == original.keys()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in original.items())
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    stats = ctrl.statistics()["knowledge_distillation"].summary
    assert stats["teacher_parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["teacher_memory_bytes"] == sum(t.numel() * 4 for t in original.values() if t.is_floating_point()) \
        + 8  # bn.num_batches_tracked (int64)
    assert stats["last_loss"] > 0


def test_hooks_are_inert_in_copies_and_gone_after_lowering():
    ctrl, gm = compile_kd(TwoLayer())
    clone = copy.deepcopy(gm)
    clone.train()
    clone(torch.randn(4, 16))  # trains without a controller: no distillation
    hooks = [h for h in list(gm._forward_hooks.values()) + list(gm._forward_pre_hooks.values())]
    assert len(hooks) == 2 and all(isinstance(h, _StudentHook) for h in hooks)
    assert all(pickle.loads(pickle.dumps(h))._part is None for h in hooks)
    stripped = ctrl.strip()
    assert not stripped._forward_hooks and not stripped._forward_pre_hooks
    x = torch.randn(4, 16)
    gm.eval()
    torch.testing.assert_close(stripped(x), gm(x))


def test_controller_checkpoint_round_trip():
    ctrl, _ = compile_kd(TwoLayer())
    state = ctrl.state_dict()
    ctrl.load_state_dict(state)
    other, _ = compile_kd(TwoLayer(), {"type": "mse"})
    with pytest.raises(CheckpointError, match="saved with type 'softmax'"):
        other.load_state_dict(state)


# -- Hugging Face models -----------------------------------------------------------------------------

def test_hugging_face_model_output_distils_the_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    original = copy.deepcopy(model)
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [KnowledgeDistillation(type="softmax", temperature=2.0),
                                                   MagnitudeSparsity(**HALF_SPARSE)], example_inputs=inputs)
    gm.train()
    torch.manual_seed(1)
    out = gm(**inputs)
    with torch.no_grad():
        ref = original(**inputs)
    # a dict output (the traced ModelOutput): its [batch, labels] logits are distilled
    assert isinstance(out, dict) and isinstance(ref, dict) and "logits" in out
    torch.testing.assert_close(ctrl.loss(), manual_softmax(out["logits"], ref["logits"], 2.0), rtol=1e-5, atol=1e-6)
    (F.cross_entropy(out["logits"], torch.tensor([0, 2])) + ctrl.loss()).backward()


# -- DistributedDataParallel -------------------------------------------------------------------------

def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ctrl, gm = compile_kd(TwoLayer().eval(), {"type": "softmax", "temperature": 2.0}, copy=True)
        ddp = DDP(gm)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        ddp.train()
        ddp(x[rank * 8:(rank + 1) * 8])  # each rank its half of the batch
        loss = ctrl.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out[rank] = {"loss": float(loss), "weights": {k: v.detach().clone() for k, v in gm.state_dict().items()
                                                      if k.endswith("weight")}}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (as the quantization DDP test)
def test_distributed_data_parallel_averages_the_distillation_gradients():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    # one process on the whole batch: the mean of the two half-batch losses, one SGD step
    ctrl, gm = compile_kd(TwoLayer().eval(), {"type": "softmax", "temperature": 2.0}, copy=True)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    gm.train()
    losses = []
    for half in (x[:8], x[8:]):
        gm(half)
        losses.append(ctrl.loss())
    optimizer.zero_grad()
    (sum(losses) / 2).backward()  # BN in training mode sees each half alone, as each rank does
    optimizer.step()
    assert out[0]["loss"] > 0 and out[0]["loss"] != out[1]["loss"]
    for name, value in gm.state_dict().items():
        if name.endswith("weight"):
            torch.testing.assert_close(out[0]["weights"][name], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[1]["weights"][name], value, rtol=1e-5, atol=1e-6)
