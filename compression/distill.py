"""DPKD students: how a student is initialised from the DP teacher (a registry: every other layer, a public pretrained
model, random). The KD loss is compression.losses; the teacher's soft labels on private examples are post-processing
of a DP teacher and cost no extra privacy; the student's own training on those examples is DP. Pure library.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compression.evaluate import predict
from compression.losses import KDConfig, LossFn, kd_against
from compression.models import TextClassifier, fresh_encoder_like, load_classifier


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """How a DPKD student starts (the KD weight and temperature are the stage's `kd`, compression.losses)."""

    init: str = "every_other"   # key of STUDENT_INITS: every_other (zero-shot from the teacher), pretrained, random
    layer_map: tuple[int, ...] | None = None   # layers kept in the student (default: every other)
    pretrained: str | None = None  # init "pretrained": a public model (hub name or folder); default: the teacher's base

    def __post_init__(self):
        if self.init not in STUDENT_INITS:
            raise ValueError(f"init must be one of {sorted(STUDENT_INITS)}, got {self.init!r}")


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


def every_other_layer(teacher: TextClassifier, config: StudentConfig | None = None, **_) -> TextClassifier:
    """"Zero-shot" from the DP teacher: its embeddings, head and the layers in `config.layer_map`."""
    return _keep_layers(teacher, config.layer_map if config else None)


def random_init(teacher: TextClassifier, config: StudentConfig | None = None, *, seed: int = 0,
                **_) -> TextClassifier:
    """Baseline: the zero-shot student's shape with freshly initialised weights, drawn from `seed` (a public
    initialisation, not privacy randomness) so that a line's rerun, in any process, starts from the same student."""
    student = every_other_layer(teacher, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.encoder = fresh_encoder_like(student)
        nn.init.normal_(student.head.weight, std=0.02)
        nn.init.zeros_(student.head.bias)
    return student


def pretrained_init(teacher: TextClassifier, config: StudentConfig | None = None, *, base: str | None = None,
                    teacher_vocab: dict | None = None, seed: int = 0, **_) -> TextClassifier:
    """A public pretrained model with a fresh head: `config.pretrained` (all its layers, or `config.layer_map`), else
    `base`, the teacher's own public starting point, cut to `config.layer_map` (default every other layer, so the
    student is compact), its fresh head drawn from `seed`. Public weights: no privacy cost. Its vocabulary must equal
    the teacher's (`teacher_vocab`), since both read the same tokenised private data."""
    name = (config.pretrained if config else None) or base
    if not name:
        raise ValueError("distill.student.pretrained: init 'pretrained' needs a model name or path")
    student, tokenizer = load_classifier(name, num_labels=teacher.num_labels, pooling=teacher.pooling,
                                         dropout=teacher.dropout.p, seed=seed)
    if teacher_vocab is not None and tokenizer is not None and tokenizer.get_vocab() != teacher_vocab:
        raise ValueError(f"distill.student.pretrained={name!r}: its tokenizer differs from the teacher's; "
                         "a pretrained student must share the teacher's vocabulary")
    explicit = config is not None and config.pretrained is not None
    if explicit and not config.layer_map:
        return student
    return _keep_layers(student, config.layer_map if config else None)


STUDENT_INITS: dict[str, Callable[..., TextClassifier]] = {
    "every_other": every_other_layer, "random": random_init, "pretrained": pretrained_init}


def make_student(teacher: TextClassifier, config: StudentConfig, **context) -> TextClassifier:
    """The student for `config.init`; `context` (base, teacher_vocab, seed) reaches initialisers that use it."""
    return STUDENT_INITS[config.init](teacher, config, **context)


def distillation_loss(teacher: TextClassifier, data: dict, kd: KDConfig) -> LossFn:
    """A stage's per-example loss with KD from `teacher`: its soft labels on every training example of `data`, computed
    once (post-processing of a DP model: no privacy cost), against which `compression.losses.kd_loss` is taken."""
    return kd_against(torch.as_tensor(predict(teacher, data)), kd)
