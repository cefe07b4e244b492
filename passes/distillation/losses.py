"""Distillation losses over model outputs of any structure (tensor, tuple, dict, HF ``ModelOutput``).

An output is flattened into *leaves*: ``(path, tensor)`` pairs where the path is
the sequence of tuple indices and dict keys that leads to the tensor (a plain
tensor output is the leaf with path ``()``; a Hugging Face ``ModelOutput`` is an
ordered dict, so its leaves are ``("logits",)``, ...). The student's leaves that
can be distilled are paired with the teacher's leaf at the same path.

A leaf is distilled when it is a floating-point tensor that carries gradient
(NNCF's rule: integer ids, masks and detached values are skipped) and has the
rank the loss needs:

- ``softmax``: ``[batch, classes]`` or ``[batch, tokens, classes]``; the loss is
  NNCF's ``scale * T**2 * mean(-sum(softmax(t / T) * log_softmax(s / T), -1))``,
  the cross-entropy of the student's softened distribution against the
  teacher's (the KL divergence plus the teacher's entropy, so the same
  gradients), averaged over the batch (and tokens);
- ``mse``: any tensor of rank >= 2 (a rank-0/1 output is most likely a loss
  value); the loss is ``scale * mean((s - t) ** 2)``.

The loss of several leaves is their sum.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["output_leaves", "distillable_leaves", "describe_leaves", "distillation_loss", "KD_TYPES"]

KD_TYPES = ("softmax", "mse")
_RANKS = {"softmax": (2, 3), "mse": None}  # None: any rank >= 2


def output_leaves(output, path: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """Every tensor in ``output`` with the tuple indices / dict keys that lead to it."""
    if isinstance(output, torch.Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    else:
        return []
    leaves = []
    for key, value in items:
        leaves.extend(output_leaves(value, path + (key,)))
    return leaves


def _rank_fits(kd_type: str, tensor: torch.Tensor) -> bool:
    ranks = _RANKS[kd_type]
    return tensor.dim() in ranks if ranks else tensor.dim() >= 2


def distillable_leaves(output, kd_type: str, need_grad: bool = True) -> list[tuple[tuple, torch.Tensor]]:
    """The leaves the loss uses: floating point, of the right rank, and (``need_grad``) carrying gradient."""
    return [(path, t) for path, t in output_leaves(output)
            if t.is_floating_point() and _rank_fits(kd_type, t) and (t.requires_grad or not need_grad)]


def _format_path(path: tuple) -> str:
    return "output" + "".join(f"[{k!r}]" for k in path)


def describe_leaves(output) -> str:
    """``output['logits']: float32 [4, 10], ...`` for error messages."""
    leaves = output_leaves(output)
    if not leaves:
        return f"no tensor at all (the model returned {type(output).__name__})"
    return ", ".join(f"{_format_path(p)}: {str(t.dtype).replace('torch.', '')} {list(t.shape)}"
                     f"{'' if t.requires_grad else ' (no gradient)'}" for p, t in leaves)


def softmax_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    p_teacher = F.softmax(teacher / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(-1).mean() * (temperature * temperature)


def distillation_loss(student_output, teacher_output, kd_type: str, temperature: float, scale: float
                      ) -> torch.Tensor | None:
    """The summed loss over the matching leaves; None when the student has no distillable leaf."""
    teacher = dict(output_leaves(teacher_output))
    total = None
    for path, s in distillable_leaves(student_output, kd_type):
        t = teacher.get(path)
        if t is None or t.shape != s.shape:
            got = "nothing" if t is None else f"shape {list(t.shape)}"
            raise RuntimeError(f"knowledge_distillation: the teacher's {_format_path(path)} is {got}, the "
                               f"student's has shape {list(s.shape)}; teacher and student must return the "
                               f"same structure")
        t = t.to(s.dtype)
        value = softmax_loss(s, t, temperature) if kd_type == "softmax" else F.mse_loss(s, t)
        total = value if total is None else total + value
    return None if total is None else scale * total
