"""Distillation on public text: a compressed student learns to mimic the DP teacher on texts that are not private.

The teacher is a DP release, the student is derived from DP releases, and the texts are public, so this training is
post-processing: it costs no privacy and reads no private example. It is ordinary training (no clipping, no noise)
and therefore never touches the private data; stages that run it still DP fine-tune on the private data afterwards.
Loss per text: T^2 KL(teacher_T || student_T) on the logits (squared error for regression) plus `hidden_weight`
times the squared error between the pooled representations, scaled by the teacher's mean squared pooled norm.
Pure library.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compression.data import collate, lengths_of, padded_batches
from compression.losses import kd_term
from compression.models import TextClassifier
from compression.train import apply_masks


@dataclass(frozen=True, kw_only=True)
class PublicDistillConfig:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5      # AdamW over every student weight; 50 warm-up steps, then linear decay to 0
    temperature: float = 2.0
    hidden_weight: float = 1.0       # weight of the pooled-representation term (0: logits only)
    split_pairs: bool = True         # a sentence pair becomes two single texts (for single-sentence tasks)
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.epochs, int | float) and self.epochs > 0):
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight!r}")


def public_texts(sources: Sequence[dict], *, split_pairs: bool = True) -> dict:
    """The texts of encoded public datasets (`compression.data.encode` output; labels unused), as one
    `{"input_ids", "token_type_ids"}` collection. With `split_pairs`, a pair (token types 0 then 1) becomes its first
    segment and `[first token] + second segment`."""
    ids_out, types_out = [], []
    for data in sources:
        for ids, types in zip(data["input_ids"], data["token_type_ids"]):
            ids, types = torch.as_tensor(ids), torch.as_tensor(types)
            second = types == 1
            if not split_pairs or not bool(second.any()):
                ids_out.append(ids)
                types_out.append(types)
                continue
            tail = torch.cat([ids[:1], ids[second]])
            ids_out += [ids[~second], tail]
            types_out += [torch.zeros_like(ids[~second]), torch.zeros_like(tail)]
    return {"input_ids": ids_out, "token_type_ids": types_out}


def _outputs(model: TextClassifier, ids, mask, types) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = model.features(ids, mask, types)
    return pooled, model.head(model.dropout(pooled))


@torch.no_grad()
def teacher_targets(teacher: TextClassifier, texts: dict, *, batch_size: int = 128) -> dict:
    """The teacher's pooled representation `[N, H]` and logits `[N, C]` for every text, in input order (eval mode)."""
    teacher.eval()
    count = len(texts["input_ids"])
    pooled = torch.empty(count, teacher.head.in_features)
    logits = torch.empty(count, teacher.num_labels)
    for chunk, ids, mask, types in padded_batches(texts, batch_size):
        pooled[chunk], logits[chunk] = _outputs(teacher, ids, mask, types)
    return {"pooled": pooled, "logits": logits}


def distill_loss(pooled, logits, target_pooled, target_logits, *, temperature: float, hidden_weight: float,
                 hidden_scale: float) -> torch.Tensor:
    """Mean over the batch of the logit term plus `hidden_weight` * ||pooled - target||^2 / `hidden_scale`."""
    soft = kd_term(logits, target_logits, temperature=temperature)
    hidden = ((pooled - target_pooled) ** 2).sum(-1) / hidden_scale
    return (soft + hidden_weight * hidden).mean()


def _batches(num_texts: int, lengths: torch.Tensor, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random epoch in batches of `size`; texts of similar length share a batch (sorted within windows of 50
    batches), and the batches come in random order."""
    perm = torch.randperm(num_texts, generator=generator)
    batches = []
    for window in perm.split(50 * size):
        window = window[torch.argsort(lengths[window], stable=True)]
        batches += [b for b in window.split(size) if len(b) == size]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def public_distill(student: TextClassifier, teacher: TextClassifier, texts: dict, *,
                   config: PublicDistillConfig, targets: dict | None = None,
                   masks: dict[str, torch.Tensor] | None = None,
                   on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train every weight of `student` in place to mimic `teacher` on public `texts` (see module doc); `masks` hold
    pruned weights at zero after every step. `targets`: `teacher_targets` output, if already computed. Seeded
    (batches and dropout): a rerun gives the same student. Returns `{"num_steps", "loss_first", "loss_last"}`
    (losses on public texts only)."""
    count = len(texts["input_ids"])
    if count < config.batch_size:
        raise ValueError(f"public distillation needs at least batch_size={config.batch_size} texts, got {count}")
    targets = targets if targets is not None else teacher_targets(teacher, texts)
    scale = float(targets["pooled"].pow(2).sum(-1).mean().clamp(min=1e-12))
    lengths = lengths_of(texts)
    num_steps = max(1, math.ceil(config.epochs * (count // config.batch_size)))
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0)
    warmup = min(50, max(1, num_steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / num_steps))
    generator = torch.Generator().manual_seed(config.seed)
    apply_masks(student, masks)
    student.train()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):  # dropout draws from a seeded stream
        torch.manual_seed(config.seed)
        while len(losses) < num_steps:
            for index in _batches(count, lengths, config.batch_size, generator)[:num_steps - len(losses)]:
                pooled, logits = _outputs(student, *collate(texts, index))
                loss = distill_loss(pooled, logits, targets["pooled"][index], targets["logits"][index],
                                    temperature=config.temperature, hidden_weight=config.hidden_weight,
                                    hidden_scale=scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                apply_masks(student, masks)
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(len(losses), {"loss": losses[-1], "num_steps": num_steps})
    student.eval()
    return {"num_steps": num_steps, "loss_first": losses[0], "loss_last": losses[-1]}
