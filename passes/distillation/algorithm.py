"""``KnowledgeDistillation`` (NNCF's ``"knowledge_distillation"``) and its controller part.

The teacher is the model as traced, before any compression pass: the pass takes a
frozen snapshot of it (``copy.deepcopy`` of the uncompressed GraphModule: its own
copy of every parameter and buffer, in eval mode, without gradients). A snapshot
is needed because the compressed GraphModule shares its parameter tensors with
the user's model (``copy=False``, as torch.fx does): fine-tuning the student
updates those tensors in place, and a teacher sharing them would drift with it.
The snapshot costs one extra copy of the model's parameters and buffers.

The student is the compressed GraphModule. Two hooks on it do the work, so the
user's training loop does not change:

- a forward pre-hook, when the student runs in training mode with gradients
  enabled, runs the teacher on the same inputs under ``torch.no_grad()`` (nothing
  of the teacher is kept for backward; its activations are freed before the
  student's forward starts) and keeps only the teacher's outputs;
- a forward hook computes the distillation loss between the student's and the
  teacher's outputs (``losses``) and drops the teacher's outputs.

``ctrl.loss()`` then includes the loss of the latest training forward; any other
forward (eval mode, ``torch.no_grad()``) clears it. Under DistributedDataParallel
the hooks sit on the inner GraphModule, so each rank distills its own shard and
DDP averages the gradients as usual.

The hooks are inert in copies of the GraphModule (``copy.deepcopy``, pickling,
``torch.save``: the copy has no controller), and the lowering pass removes them,
so ``ctrl.strip()`` and ``ctrl.export_onnx()`` see a plain graph.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.fx

from fxcompress.algorithm import CompressionPass
from fxcompress.registry import register_algorithm
from fxcompress.controller import ControllerPart, StatisticsSection
from fxcompress.errors import CheckpointError, ConfigError, UnsupportedModelError
from fxcompress.lowering import LoweringPhase
from fxcompress.pass_manager import Pass, PassContext, PassResult

from .losses import KD_TYPES, describe_leaves, distillable_leaves, distillation_loss, output_leaves

__all__ = ["KnowledgeDistillation", "KnowledgeDistillationController", "RemoveDistillationHooks"]

_RANK_RULE = {"softmax": "a floating-point [batch, classes] or [batch, tokens, classes] output (logits)",
              "mse": "a floating-point output of rank >= 2"}


@register_algorithm
class KnowledgeDistillation(CompressionPass):
    """``KnowledgeDistillation(type="softmax", temperature=2.0, scale=1.0)`` or ``KnowledgeDistillation(type="mse")``.

    Put it first in the pass list (a JSON config may list it anywhere: the config
    runs it first); see docs/distillation.md.
    """
    algorithm = "knowledge_distillation"
    schema = {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": list(KD_TYPES)},
        "temperature": {"type": "number", "exclusiveMinimum": 0},
        "scale": {"type": "number", "exclusiveMinimum": 0},
    }}
    defaults = {"scale": 1.0}  # nncf/config/schemata/defaults.py: KNOWLEDGE_DISTILLATION_SCALE
    # A JSON config builds this pass before every other (Config._build_passes): the teacher
    # must be the graph before any compression.
    runs_first = True

    @classmethod
    def check(cls, params: dict, prefix: str):
        if params["type"] == "mse" and "temperature" in params:
            raise ConfigError(f"{prefix}.temperature: applies to type 'softmax' only (type is 'mse')",
                              path=f"{prefix}.temperature")
        if params["type"] == "softmax":
            params.setdefault("temperature", 1.0)  # KNOWLEDGE_DISTILLATION_TEMPERATURE

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        compressed = sorted({str(n.meta["inserted_by"]) for n in gm.graph.nodes if n.meta.get("inserted_by")})
        if compressed:
            raise ConfigError(f"{type(self).__name__}: the graph was already compressed by {', '.join(compressed)}; "
                              f"the teacher must be the uncompressed model: put KnowledgeDistillation(...) first "
                              f"in the pass list", path="compression")
        if any(isinstance(h, _StudentHook) for h in gm._forward_hooks.values()):
            raise ConfigError(f"{type(self).__name__}: the model already has a knowledge_distillation pass; "
                              f"use one per model", path="compression")
        teacher = frozen_teacher(gm)
        if ctx.example_inputs or ctx.example_kwargs:
            with torch.no_grad():
                example_output = ctx.run(teacher)
            kd_type = self.params["type"]
            if not distillable_leaves(example_output, kd_type, need_grad=False):
                raise UnsupportedModelError(
                    f"{type(self).__name__}(type={kd_type!r}): nothing to distill: type {kd_type!r} needs "
                    f"{_RANK_RULE[kd_type]}, and the model returns {describe_leaves(example_output)}"
                    + ("; type 'mse' takes outputs of any rank >= 2" if kd_type == "softmax" else ""))
        part = KnowledgeDistillationController(gm, teacher, self.params["type"], self.params.get("temperature"),
                                               self.params["scale"])
        return PassResult(gm, modified=False, controller=part)


def frozen_teacher(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` (own parameters and buffers) in eval mode, without gradients."""
    teacher = copy.deepcopy(gm)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _first_tensor_device(args, kwargs) -> torch.device | None:
    leaves = output_leaves(args) + output_leaves(kwargs)
    return leaves[0][1].device if leaves else None


class _StudentHook:
    """The pre-hook (``stage="pre"``) or forward hook (``"post"``) on the student, bound to its controller.

    Holds the controller weakly (the GraphModule must not keep the teacher alive), and
    copies and pickles as an inert hook: a copy of the GraphModule has no controller.
    """

    def __init__(self, part: "KnowledgeDistillationController | None", stage: str):
        self._part = weakref.ref(part) if part is not None else None
        self.stage = stage

    def __call__(self, module, args, kwargs, *output):
        part = self._part() if self._part is not None else None
        if part is None:
            return None
        if self.stage == "pre":
            part.before_student(module, args, kwargs)
        else:
            part.after_student(output[0])
        return None

    def __deepcopy__(self, memo):
        return _StudentHook(None, self.stage)

    def __reduce__(self):
        return _StudentHook, (None, self.stage)


class KnowledgeDistillationController(ControllerPart):
    """Runs the frozen teacher next to the student and provides the distillation loss."""
    algorithm = "knowledge_distillation"

    def __init__(self, gm: torch.fx.GraphModule, teacher: torch.fx.GraphModule, kd_type: str,
                 temperature: float | None, scale: float):
        super().__init__()
        self.gm = gm
        self.teacher = teacher
        self.kd_type = kd_type
        self.temperature = temperature
        self.scale = float(scale)
        self._teacher_output = None
        self._loss: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        gm.register_forward_pre_hook(_StudentHook(self, "pre"), with_kwargs=True)
        gm.register_forward_hook(_StudentHook(self, "post"), with_kwargs=True)

    # -- the hooks ---------------------------------------------------------------------------------
    def before_student(self, module, args, kwargs):
        self._loss = None
        self._teacher_output = None
        if not (module.training and torch.is_grad_enabled()):
            return
        if module is not self.gm:
            raise UnsupportedModelError(
                "knowledge_distillation: the student ran as a replica of the compressed model (DataParallel?); "
                "the teacher lives on one device: use DistributedDataParallel, one process per device")
        device = _first_tensor_device(args, kwargs)
        if device is not None:
            self._move_teacher(device)
        with torch.no_grad():
            self._teacher_output = self.teacher(*args, **kwargs)

    def after_student(self, output):
        teacher_output, self._teacher_output = self._teacher_output, None
        if teacher_output is None:
            return
        loss = distillation_loss(output, teacher_output, self.kd_type, self.temperature or 1.0, self.scale)
        if loss is None:
            raise UnsupportedModelError(
                f"knowledge_distillation(type={self.kd_type!r}): the student's output has nothing to distill: "
                f"it needs {_RANK_RULE[self.kd_type]} that carries gradient, and the model returned "
                f"{describe_leaves(output)}")
        self._loss = loss
        self._last_loss = loss.detach()

    def _move_teacher(self, device: torch.device):
        current = next((t.device for t in self.teacher.parameters()), None) or \
            next((t.device for t in self.teacher.buffers()), None)
        if current is not None and current != device:
            self.teacher.to(device)

    # -- the controller API -------------------------------------------------------------------------
    def loss(self):
        """The distillation loss of the latest training forward of the student (None after any other forward)."""
        return self._loss

    def teacher_memory_bytes(self) -> int:
        """What the frozen snapshot costs: the bytes of the teacher's parameters and buffers."""
        tensors = list(self.teacher.parameters()) + list(self.teacher.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def statistics(self) -> StatisticsSection:
        summary = {"type": self.kd_type}
        if self.kd_type == "softmax":
            summary["temperature"] = self.temperature
        summary.update({
            "scale": self.scale,
            "teacher_parameters": sum(p.numel() for p in self.teacher.parameters()),
            "teacher_memory_bytes": self.teacher_memory_bytes(),
            "last_loss": float(self._last_loss) if self._last_loss is not None else None,
        })
        return StatisticsSection(self.algorithm, summary)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "type": self.kd_type}

    def load_state_dict(self, state: dict):
        if state.get("type") != self.kd_type:
            raise CheckpointError(f"knowledge_distillation checkpoint was saved with type {state.get('type')!r}, "
                                  f"this controller distills with type {self.kd_type!r}")
        self.scheduler.load_state_dict(state["scheduler"])

    def lowering_passes(self) -> list[Pass]:
        return [RemoveDistillationHooks()]


class RemoveDistillationHooks(Pass):
    """Lowering: drop the (inert) distillation hooks from the lowered copy; the graph is unchanged."""
    name = "remove_distillation_hooks"
    preserves_outputs = True
    lowering_order = LoweringPhase.REMOVE_HOOKS

    _HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                   "_forward_hooks_with_kwargs", "_forward_hooks_always_called")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        ids = [i for name in ("_forward_pre_hooks", "_forward_hooks")
               for i, hook in getattr(gm, name).items() if isinstance(hook, _StudentHook)]
        for name in self._HOOK_DICTS:
            hooks = getattr(gm, name, None)
            if hooks is not None:
                for i in ids:
                    hooks.pop(i, None)
        return PassResult(gm, modified=False)
