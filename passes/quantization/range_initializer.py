"""Setting the quantizers' ranges: weights from the weights, activations from calibration data.

``RangeInitializer`` is the part of the quantization controller that measures: it
knows the quantizers of one ``Quantize`` pass and their ``RangeInitConfig``
(``range_init.py``: the statistics and the range types), runs the calibration
data through the float model (every quantizer of the pass off, eval mode, all
restored after) and sets the ranges. The controller decides when (initialize,
a staged start, a resumed run) and what else runs around it (smoothing, bias
correction, BatchNorm adaptation, averaging across ranks).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.fx

from fxcompress.data import CalibrationData, count_samples, preserved_modes, progress_bar
from fxcompress.errors import RangeInitError
from fxcompress.weights import edge_value

from .policy import is_softmax_output
from .range_init import RangeCollector, weight_range

__all__ = ["RangeInitializer"]


class RangeInitializer:
    """Sets the ranges of ``quantizers`` (``QuantizerInfo``; the list is shared with the controller)."""

    def __init__(self, quantizers: list):
        self.quantizers = quantizers

    @property
    def activation_quantizers(self) -> list:
        return [q for q in self.quantizers if q.group == "activations"]

    def needs_data(self) -> bool:
        return any(q.range_init.num_init_samples > 0 for q in self.activation_quantizers)

    @staticmethod
    def _quantizer_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
        return {n.target: n for n in gm.graph.nodes if n.op == "call_module"}

    @torch.no_grad()
    def init_weight_ranges(self, gm: torch.fx.GraphModule):
        """Weight ranges from the weights themselves (no data needed): each quantizer sees the parameter
        through the transforms before it (masks)."""
        nodes = self._quantizer_nodes(gm)
        for q in self.quantizers:
            if q.group != "weights":
                continue
            node = nodes.get(q.name)
            value = edge_value(gm, node.args[0]) if node is not None and node.args else None
            if value is None:
                continue
            low, high = weight_range(value, q.module.spec, q.range_init)
            q.module.set_range(low, high)

    @torch.no_grad()
    def init_activation_ranges(self, gm: torch.nn.Module, data: CalibrationData,
                               forward: torch.nn.Module | None = None):
        """One pass over the data with all quantizers disabled, observing each activation quantizer's input.

        ``forward``: what runs instead of ``gm``, a module computing the same over the same quantizer
        modules (fast bias correction's ``statistics_module``, which observes more on the way).
        """
        targets = [q for q in self.activation_quantizers if q.range_init.num_init_samples > 0]
        collectors = {q.name: RangeCollector(q.range_init, q.module.spec, seed=i) for i, q in enumerate(targets)}
        active = {q.name: True for q in targets}
        hooks = []
        for q in targets:
            def hook(module, args, name=q.name):
                if active[name]:
                    collectors[name].update(args[0])
            hooks.append(q.module.register_forward_pre_hook(hook))
        total = max(q.range_init.num_init_samples for q in targets)
        seen = batches = 0
        with self.quantizers_off(gm):
            try:
                for args, kwargs in progress_bar(data.batches(total), "quantization: range init"):
                    for q in targets:
                        active[q.name] = seen < q.range_init.num_init_samples
                    (forward or gm)(*args, **kwargs)
                    seen += count_samples(args, kwargs)
                    batches += 1
            finally:
                for h in hooks:
                    h.remove()
        if batches == 0:
            raise ValueError("initialize: the data loader yielded no batches")
        unseen, ranges = [], {}
        for q in targets:
            result = collectors[q.name].range()
            if result is None:
                unseen.append(q.name)
            elif not all(bool(torch.isfinite(bound).all()) for bound in result):
                raise self._non_finite_range(gm, q.name, result)
            else:
                ranges[q.name] = result
        for name in self._probability_quantizers(gm, ranges):
            low, high = ranges[name]
            ranges[name] = (torch.zeros_like(low), torch.ones_like(high))
        for q in targets:  # only once every range is finite: no half-initialized model
            if q.name in ranges:
                q.module.set_range(*ranges[q.name])
        if unseen:
            warnings.warn(f"quantization: {len(unseen)} activation quantizers saw no data during range init "
                          f"({', '.join(unseen[:5])}); their ranges stay unset", stacklevel=4)

    def _probability_quantizers(self, gm, names) -> list[str]:
        """Quantizers of softmax outputs (attention probabilities, through dropout): their range is all of
        [0, 1], not the calibrated maximum. On x86 without VNNI the runtimes' u8 x s8 kernels add products
        in int16 pairs (``vpmaddubsw``), which saturate when the calibrated maximum is below 1 (two
        neighbouring probabilities near it: 2 * 255 * 128 > 32767); probabilities summing to at most 1
        keep every pair within 256 * 127 (docs/export.md, "Agreement")."""
        nodes = self._quantizer_nodes(gm)
        return [name for name in names if nodes.get(name) is not None and nodes[name].args
                and is_softmax_output(nodes[name].args[0], gm)]

    def _non_finite_range(self, gm, name: str, bounds) -> RangeInitError:
        node = self._quantizer_nodes(gm).get(name) if isinstance(gm, torch.fx.GraphModule) else None
        producer = node.args[0] if node is not None and node.args else None
        where = f" on the output of node '{producer.name}' ({producer.format_node()})" \
            if isinstance(producer, torch.fx.Node) else ""
        low, high = float(bounds[0].min()), float(bounds[1].max())
        return RangeInitError(
            f"quantization: activation quantizer '{name}'{where} observed non-finite values during range "
            f"initialization (range [{low}, {high}]): a range must be finite. Exclude the node with "
            f"ignored_scopes, or check the calibration data for inf/NaN")

    @contextlib.contextmanager
    def quantizers_off(self, gm: torch.nn.Module):
        """Every quantizer of this part disabled (the float model), ``gm`` in eval mode; all restored after."""
        enabled = {q.name: q.module.enabled for q in self.quantizers}
        with preserved_modes(gm):
            try:
                for q in self.quantizers:
                    q.module.enabled = False
                gm.eval()
                yield
            finally:
                for q in self.quantizers:
                    q.module.enabled = enabled[q.name]

    def float_pass(self, gm: torch.nn.Module, data: CalibrationData):
        """The float model over the range-init samples (activation smoothing's statistics)."""
        total = max(q.range_init.num_init_samples for q in self.activation_quantizers)
        with self.quantizers_off(gm):
            data.run(gm, total, progress="quantization: activation smoothing", purpose="activation smoothing")
