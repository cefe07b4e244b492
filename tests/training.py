"""The user's fine-tuning loop from the README, shared by the accuracy tests."""
import torch
import torch.nn.functional as F


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
