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

from compression.models import TextClassifier, fresh_encoder_like, load_classifier


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    alpha: float = 0.5          # lambda: weight of the KD term; 0 = plain task loss, 1 = pure KD
    temperature: float = 2.0
    init: str = "every_other"   # key of STUDENT_INITS: every_other (zero-shot from the teacher), pretrained, random
    layer_map: tuple[int, ...] | None = None   # layers kept in the student (default: every other)
    student: str | None = None  # init "pretrained": a public model (hub name or folder); default: the teacher's base

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


def _keep_layers(model: TextClassifier, layer_map: tuple[int, ...] | None) -> TextClassifier:
    """A copy of `model` with only the layers in `layer_map` (default 0, 2, 4, ...), for any model family."""
    layer_map = tuple(range(0, model.num_layers, 2)) if layer_map is None else tuple(layer_map)
    bad = [i for i in layer_map if not 0 <= i < model.num_layers]
    if bad or not layer_map:
        raise ValueError(f"layer_map {list(layer_map)}: entries must lie in 0..{model.num_layers - 1} "
                         f"(the model's {model.num_layers} layers), at least one")
    student = copy.deepcopy(model)
    student.family.set_layers(student.encoder, [copy.deepcopy(model.layers[i]) for i in layer_map])
    return student


def every_other_layer(teacher: TextClassifier, config: DistillConfig | None = None, **_) -> TextClassifier:
    """"Zero-shot" from the DP teacher: its embeddings, head and the layers in `config.layer_map`."""
    return _keep_layers(teacher, config.layer_map if config else None)


def random_init(teacher: TextClassifier, config: DistillConfig | None = None, **_) -> TextClassifier:
    """Baseline: the zero-shot student's shape with freshly initialised weights."""
    student = every_other_layer(teacher, config)
    student.encoder = fresh_encoder_like(student)
    nn.init.normal_(student.head.weight, std=0.02)
    nn.init.zeros_(student.head.bias)
    return student


def pretrained_init(teacher: TextClassifier, config: DistillConfig | None = None, *, base: str | None = None,
                    teacher_vocab: dict | None = None) -> TextClassifier:
    """A public pretrained model with a fresh head: `config.student` (all its layers, or `config.layer_map`), else
    `base`, the teacher's own public starting point, cut to `config.layer_map` (default every other layer, so the
    student is compact). Public weights: no privacy cost. Its vocabulary must equal the teacher's
    (`teacher_vocab`), since both read the same tokenised private data."""
    name = (config.student if config else None) or base
    if not name:
        raise ValueError("distill.method.student: init 'pretrained' needs a model name or path")
    student, tokenizer = load_classifier(name, num_labels=teacher.num_labels, pooling=teacher.pooling,
                                         dropout=teacher.dropout.p)
    if teacher_vocab is not None and tokenizer is not None and tokenizer.get_vocab() != teacher_vocab:
        raise ValueError(f"distill.method.student={name!r}: its tokenizer differs from the teacher's; "
                         "a pretrained student must share the teacher's vocabulary")
    explicit = config is not None and config.student is not None
    if explicit and not config.layer_map:
        return student
    return _keep_layers(student, config.layer_map if config else None)


STUDENT_INITS: dict[str, Callable[..., TextClassifier]] = {
    "every_other": every_other_layer, "random": random_init, "pretrained": pretrained_init}


def make_student(teacher: TextClassifier, config: DistillConfig, **context) -> TextClassifier:
    """The student for `config.init`; `context` (base, teacher_vocab) reaches initialisers that use it."""
    return STUDENT_INITS[config.init](teacher, config, **context)
