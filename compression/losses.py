"""Per-example losses of a stage: the task loss and the one knowledge-distillation term every stage shares.

Pure functions of logits; which teacher's logits (a DP model's: post-processing, no privacy cost) is the caller's
business. Not here: the DP training loop (train.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, index) -> [B]


@dataclass(frozen=True, kw_only=True)
class KDConfig:
    """Knowledge distillation from a teacher: `weight` of the KD term (0: the task loss alone, 1: pure KD) and the
    softmax `temperature`."""

    weight: float = 0.0
    temperature: float = 2.0

    def __post_init__(self):
        if isinstance(self.weight, bool) or not 0 <= self.weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {self.weight!r}")
        if isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


def task_loss(num_labels: int) -> LossFn:
    """Per-example cross-entropy (classification) or squared error (regression, num_labels=1). Picklable (module-level
    functions), as a data-parallel stage's loss must be (compression.parallel)."""
    return _squared_error if num_labels == 1 else _cross_entropy


def _squared_error(logits, labels, index):
    return (logits.squeeze(-1) - labels.float()) ** 2


def _cross_entropy(logits, labels, index):
    return F.cross_entropy(logits, labels, reduction="none")


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Per-example `T^2 KL(teacher_T || student_T)`, shape `[B]`; the squared error to the teacher's prediction for
    regression (one output)."""
    if student_logits.shape[-1] == 1:
        return ((student_logits - teacher_logits) ** 2).squeeze(-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            weight: float, temperature: float) -> torch.Tensor:
    """Per-example `(1 - weight) * task loss + weight * kd_term`, shape `[B]`."""
    task = task_loss(student_logits.shape[-1])(student_logits, labels, None)
    return (1 - weight) * task + weight * kd_term(student_logits, teacher_logits, temperature=temperature)


def kd_against(teacher_logits: torch.Tensor, config: KDConfig) -> LossFn:
    """A stage's loss: KD against `teacher_logits` `[N, C]` (one row per training example, indexed by the batch's
    example indices). Picklable (a partial of a module-level function), for data-parallel stages."""
    return partial(_kd_against, teacher_logits=teacher_logits, config=config)


def _kd_against(logits, labels, index, *, teacher_logits: torch.Tensor, config: KDConfig) -> torch.Tensor:
    return kd_loss(logits, teacher_logits[index], labels, weight=config.weight, temperature=config.temperature)
