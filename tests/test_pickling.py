"""The GraphModule is a plain artefact (docs/design.md, "API details"): every compressed model
pickles, deep-copies and ``torch.save``s, computes bitwise the same outputs after each round
trip, and still trains: one optimizer step on the copy gives bitwise the parameters the same
step gives on the original."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.passes import Binarization, FilterPruning, MagnitudeSparsity, MixedPrecision, Quantize, RBSparsity
from fxcompress.testing import DigitsCNN, ResNetTiny, assert_modules_agree

QUICK_QUANT = {"range": {"num_init_samples": 16}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


def _pickle(gm):
    return pickle.loads(pickle.dumps(gm))


def _torch_save(gm):
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "deepcopy": copy.deepcopy, "torch.save": _torch_save}


def _batches(shape, n=2, seed=1, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(n)]


def _compressed(model, passes, example, initialize=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pass hints (e.g. pruning's schedule) are not the subject here
        ctrl, gm = compile_for_compression(model.eval(), passes, example_inputs=(example,), copy=True)
        if initialize:
            ctrl.initialize(_batches(tuple(example.shape)))
    return gm


def quantized():
    return _compressed(ResNetTiny(), [Quantize(bits=8, initializer=QUICK_QUANT)], ResNetTiny().example_input())


def magnitude_sparse_and_quantized():
    return _compressed(ResNetTiny(), [MagnitudeSparsity(sparsity_init=0.5), Quantize(bits=8, initializer=QUICK_QUANT)],
                       ResNetTiny().example_input())


def rb_sparse():
    return _compressed(DigitsCNN(seed=0), [RBSparsity(sparsity_init=0.3)], DigitsCNN(seed=0).example_input())


def pruned():
    # a pruned model before strip(): channel masks still in the graph
    return _compressed(ResNetTiny(), [FilterPruning(pruning_init=0.5, schedule="baseline", prune_first_conv=True)],
                       ResNetTiny().example_input())


def binarized():
    return _compressed(DigitsCNN(seed=0), [Binarization()], DigitsCNN(seed=0).example_input(batch=4))


def mixed_precision():
    return _compressed(DigitsCNN(seed=0), [Quantize(bits=8, initializer=QUICK_QUANT),
                                           MixedPrecision(bits=[4, 8], iter_number=2, num_data_points=16,
                                                          tolerance=0.0, seed=0)],
                       DigitsCNN(seed=0).example_input(batch=8))


MODELS = {f.__name__: f for f in (quantized, magnitude_sparse_and_quantized, rb_sparse, pruned, binarized,
                                  mixed_precision)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def compressed(request):
    gm = MODELS[request.param]()
    inputs = gm.meta["example_inputs"]
    return gm, inputs


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("round_trip", sorted(ROUND_TRIPS))
def test_round_trip_computes_bitwise_the_same(compressed, round_trip):
    gm, inputs = compressed
    restored = ROUND_TRIPS[round_trip](gm)
    assert isinstance(restored, torch.fx.GraphModule)
    assert restored.code == gm.code
    _assert_same_state(gm, restored)
    assert_modules_agree(gm, restored, inputs, atol=0.0, rtol=0.0, msg=round_trip)
    # the copy owns its tensors: it shares none with the original
    original = {t.data_ptr() for t in gm.state_dict().values() if t.numel()}
    assert not original & {t.data_ptr() for t in restored.state_dict().values() if t.numel()}


def _train_step(gm, batch):
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    x, y = batch
    torch.manual_seed(0)  # stochastic compression modules (RB masks) sample the same in both runs
    loss = F.cross_entropy(gm(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    gm.eval()
    return loss.item()


def test_unpickled_module_trains_exactly_as_the_original(compressed):
    gm, inputs = compressed
    original, restored = copy.deepcopy(gm), _pickle(gm)
    batch = _batches(tuple(inputs[0].shape), n=1, seed=5)[0]
    before = {k: v.clone() for k, v in restored.state_dict().items()}
    assert _train_step(original, batch) == _train_step(restored, batch)
    _assert_same_state(original, restored)
    assert any(not torch.equal(before[k], v) for k, v in restored.state_dict().items()), "nothing trained"
    assert_modules_agree(original, restored, inputs, atol=0.0, rtol=0.0)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_hugging_face_model_round_trips_bitwise():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # a padded sequence
    inputs = {"input_ids": torch.randint(0, 64, (2, 8), generator=g), "attention_mask": mask}
    ctrl, gm = compile_for_compression(_tiny_bert(), [Quantize(bits=8, preset="mixed")], example_inputs=inputs)
    ctrl.initialize([inputs])
    for name, round_trip in ROUND_TRIPS.items():
        restored = round_trip(gm)
        _assert_same_state(gm, restored)
        assert_modules_agree(gm, restored, inputs, atol=0.0, rtol=0.0, msg=name)
