"""The user's fine-tuning loop from the README and the digits setup, shared by the accuracy tests."""
import os

import torch
import torch.nn.functional as F

from fxcompress.testing import digits_loaders, evaluate_accuracy, train_digits_cnn


def digits_setup(seed: int):
    """``(model, train_loader, test_loader, fp32_accuracy)`` for one ``train_seed``.

    The seed picks the train/test split, the trained DigitsCNN (cached on disk), the batch order
    and the torch RNG (seeded here). The loaders are new on every call: no test sees where another
    left a shared loader's generator, so results do not depend on which tests ran before.
    """
    model = train_digits_cnn(seed=seed)
    train, test = digits_loaders(batch_size=64, seed=seed)
    fp32 = evaluate_accuracy(model, test)
    torch.manual_seed(seed)
    return model, train, test, fp32


def report(test: str, seed, **figures):
    """One line of figures per run: printed (``pytest -rP``) and, when ``FXCOMPRESS_FIGURES`` names a
    file, appended to it as it happens; benchmarks/accuracy_margins.sh measures the margins from them."""
    cap = torch.backends.cpu.get_cpu_capability()
    values = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    line = f"[figures] {test} seed={seed} cpu={cap} {values}"
    print(line)
    if os.environ.get("FXCOMPRESS_FIGURES"):
        with open(os.environ["FXCOMPRESS_FIGURES"], "a") as f:
            f.write(line + "\n")


def fine_tune(ctrl, gm, loader, epochs: int, *, lr: float = 1e-3, betas=(0.9, 0.999), params=None):
    """Adam on cross-entropy + ``ctrl.loss()``; ``scheduler.step()`` per batch, ``epoch_step()`` per epoch.

    ``params`` takes parameter groups (default: all of ``gm``'s parameters). Seed the RNG
    around the call where a test needs a fixed sequence.
    """
    optimizer = torch.optim.Adam(params if params is not None else gm.parameters(), lr=lr, betas=betas)
    for _ in range(epochs):
        gm.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(gm(x), y) + ctrl.loss()
            loss.backward()
            optimizer.step()
            ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    gm.eval()


def quantizer_scales_at_lower_lr(gm, lr):
    """Adam parameter groups: the weights at the loop's learning rate, quantizer scales at ``lr``.

    A quantizer's scale is a quantization step (range / 127, about 0.004 for these weights), and
    Adam moves every parameter by about its learning rate per step whatever its magnitude: at 1e-3 a
    per-channel weight scale loses a quarter of its value per step once its gradient points one way.
    Behind BatchNorm the train-mode output is blind to a filter's scale, so nothing stops it: with
    seed 1 and ATEN_CPU_CAPABILITY=default, conv1's scale of one kept filter fell from 0.0038 to
    0.00005 in epoch 1, BatchNorm's running variance lagged behind, and eval-mode accuracy fell to
    0.891 while train-mode accuracy stayed 0.984 (re-estimating the statistics gave 0.984 back;
    frozen weight scales gave 0.982). docs/quantization.md, "Learning rates".
    """
    from fxcompress.quantizers import FakeQuantizer
    scales = {id(p) for m in gm.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    return [{"params": [p for p in gm.parameters() if id(p) not in scales]},
            {"params": [p for p in gm.parameters() if id(p) in scales], "lr": lr}]
