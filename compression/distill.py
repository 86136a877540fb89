"""Knowledge distillation: the per-example KD loss and student initialisers (a registry).

The teacher's soft labels on private examples are post-processing of a DP teacher: they cost no extra
privacy. The student's own training on those examples is DP (compression.train). Pure library.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compression.models import TextClassifier, fresh_encoder_like


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    alpha: float = 0.5          # lambda: weight of the KD term; 0 = plain task loss, 1 = pure KD
    temperature: float = 2.0
    init: str = "every_other"   # key of STUDENT_INITS
    layer_map: tuple[int, ...] | None = None   # teacher layers copied into the student (default: every other)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.init not in STUDENT_INITS:
            raise ValueError(f"init must be one of {sorted(STUDENT_INITS)}, got {self.init!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
            alpha: float, temperature: float) -> torch.Tensor:
    """Per-example `(1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)`, shape `[B]`.

    For regression (one output) the KD term is the squared error to the teacher's prediction.
    """
    if student_logits.shape[-1] == 1:
        task = (student_logits.squeeze(-1) - labels.float()) ** 2
        soft = (student_logits.squeeze(-1) - teacher_logits.squeeze(-1)) ** 2
        return (1 - alpha) * task + alpha * soft
    task = F.cross_entropy(student_logits, labels, reduction="none")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return (1 - alpha) * task + alpha * temperature**2 * kl


def every_other_layer(teacher: TextClassifier, layer_map: tuple[int, ...] | None = None) -> TextClassifier:
    """A shallower student: embeddings, head and the teacher layers in `layer_map` (default 0, 2, 4, ...)."""
    layer_map = layer_map or tuple(range(0, teacher.num_layers, 2))
    bad = [i for i in layer_map if not 0 <= i < teacher.num_layers]
    if bad:
        raise ValueError(f"layer_map entries {bad} outside the teacher's {teacher.num_layers} layers")
    student = copy.deepcopy(teacher)
    student.encoder.encoder.layer = nn.ModuleList(copy.deepcopy(teacher.layers[i]) for i in layer_map)
    student.encoder.config.num_hidden_layers = len(layer_map)
    return student


def random_init(teacher: TextClassifier, layer_map: tuple[int, ...] | None = None) -> TextClassifier:
    """Baseline: the student's shape with freshly initialised weights."""
    student = every_other_layer(teacher, layer_map)
    student.encoder = fresh_encoder_like(student)
    nn.init.normal_(student.head.weight, std=0.02)
    nn.init.zeros_(student.head.bias)
    return student


STUDENT_INITS: dict[str, Callable[..., TextClassifier]] = {"every_other": every_other_layer, "random": random_init}


def make_student(teacher: TextClassifier, config: DistillConfig) -> TextClassifier:
    return STUDENT_INITS[config.init](teacher, config.layer_map)
