"""BatchNorm adaptation: re-estimate the running statistics of the compressed graph on data.

Compression changes what a BatchNorm layer sees (quantized, sparse, pruned or binarized
inputs), so the statistics it was trained with no longer fit. Every algorithm's
``initializer.batchnorm_adaptation.num_bn_adaptation_samples`` runs ``adapt_batchnorm``
in ``ctrl.initialize(loader)``. As NNCF 2.x (``DataLoaderBNAdaptationRunner``):

- forward passes without gradients over the first ``num_samples`` samples (whole batches);
- only the BatchNorm layers run in train mode; everything else (dropout, quantizers,
  masks, binarizers) stays in eval; every module's train/eval flag is restored after;
- each layer keeps its own ``momentum``: the statistics continue from the trained ones as
  an exponential moving average, so after ``k`` batches the trained statistics weigh
  ``(1 - momentum) ** k`` (0.9 ** 63 = 0.001 for 2000 samples in batches of 32);
- after ``ctrl.distributed()`` the statistics are averaged across ranks
  (``average_batchnorm_statistics``: each algorithm's ``distributed()`` does it for the
  layers it adapted). Not before: without ``ctrl.distributed()`` no rank waits for the others.

The statistics are written in place into the graph's own buffers: ``compile_for_compression``
gives the GraphModule its own copy of every buffer (the user's model is never written), and
the tensor objects stay the same, so a DistributedDataParallel wrapper (which keeps
references to the buffers it broadcasts) still sees them.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from .data import CalibrationData
from .distributed import average_across_ranks

__all__ = ["DEFAULT_NUM_BN_ADAPTATION_SAMPLES", "BATCHNORM_ADAPTATION_SCHEMA", "batchnorm_layers",
           "adapt_batchnorm", "average_batchnorm_statistics"]

DEFAULT_NUM_BN_ADAPTATION_SAMPLES = 2000  # NNCF's num_bn_adaptation_samples default

# NNCF's ``initializer.batchnorm_adaptation`` block
BATCHNORM_ADAPTATION_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"num_bn_adaptation_samples": {"type": "integer", "minimum": 0}},
}


def batchnorm_layers(gm: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules with running statistics that the graph calls (all of them for a plain module).

    A BatchNorm another pass rewrote into ``F.batch_norm`` would not update its statistics
    in train mode, so only modules called as modules count.
    """
    if isinstance(gm, torch.fx.GraphModule):
        called = dict.fromkeys(gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module")
    else:
        called = dict.fromkeys(gm.modules())
    return [m for m in called if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def average_batchnorm_statistics(layers: list[nn.modules.batchnorm._BatchNorm]):
    """Average running means and variances across torch.distributed ranks (batch counts: rank 0's)."""
    average_across_ranks([t for bn in layers for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
                          if t is not None])


def adapt_batchnorm(gm: nn.Module, data: CalibrationData, num_samples: int,
                    progress: str | None = "BatchNorm adaptation") -> list[nn.Module]:
    """Re-estimate the running statistics of ``gm``'s BatchNorm layers on ``num_samples`` samples.

    Returns the layers adapted (empty when there are none or ``num_samples`` is 0).
    """
    layers = batchnorm_layers(gm)
    if not layers or num_samples <= 0:
        return []
    data.run(gm, num_samples, progress=progress, train_modules=layers, purpose="BatchNorm adaptation")
    return layers
