"""Filter pruning (NNCF's ``"filter_pruning"``): channels removed physically.

- ``dependency``: channel groups via explicit edges with index maps (``index_maps``: sympy
  algebra of reshapes), spread with a worklist;
- ``importance``: L1, L2, geometric median; normalization and interlayer ranking;
- ``selection``: per-group, global and FLOPs-budget selection;
- ``schedule``: exponential / exponential_with_bias / baseline progressive schedules;
- ``masks``: the ``ChannelMask`` modules used while fine-tuning;
- ``cost``: FLOPs and parameter counts, predicted and measured;
- ``fold``: the lowering pass that builds the smaller graph;
- ``algorithm``: the ``FilterPruning`` pass and its controller part.
"""
from .algorithm import FilterPruning, FilterPruningController
from .cost import model_cost
from .dependency import analyze_channels
from .fold import FoldPrunedChannels
from .masks import ChannelMask

__all__ = ["FilterPruning", "FilterPruningController", "FoldPrunedChannels", "ChannelMask", "analyze_channels",
           "model_cost"]
