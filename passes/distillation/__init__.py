"""Knowledge distillation (NNCF's ``"knowledge_distillation"``): the uncompressed model teaches the compressed one.

- ``losses``: output flattening (tensor, tuple, dict, HF ``ModelOutput``) and the softmax / MSE losses;
- ``algorithm``: the ``KnowledgeDistillation`` pass (frozen teacher snapshot), its controller part
  (hooks on the student, ``ctrl.loss()``) and the lowering pass that drops the hooks.
"""
from .algorithm import KnowledgeDistillation, KnowledgeDistillationController, RemoveDistillationHooks
from .losses import distillation_loss, output_leaves

__all__ = ["KnowledgeDistillation", "KnowledgeDistillationController", "RemoveDistillationHooks",
           "distillation_loss", "output_leaves"]
