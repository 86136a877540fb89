"""DP fine-tuning of a `TextClassifier` on tokenised examples: the training loop.

The stage's fine-tuning method (compression.methods) says what trains and what is frozen (its `StagePlan`); the frozen
part runs once per stage and its per-example outputs are cached in memory (public weights applied to each example: no
privacy cost, no extra access pattern; private data all the same, never logged or written). Not here: the DP mechanics
(privacy.engine), the budget (privacy.ledger), crash-safe resumption (compression.resume).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compression.data import length_chunks, pad, padded_batches
from compression.losses import LossFn, task_loss
from compression.methods import DEFAULT, get_method, stage_plan
from compression.models import TextClassifier
from compression.parallel import run_ranks
from compression.resume import StageCheckpoints, run_settings
from privacy.accounting import DPEvent
from privacy.distributed import own_examples, rank_and_world, shared_seed, sum_over_ranks
from privacy.engine import PoissonSampler, PrivateModel
from privacy.noise import make_generator

log = logging.getLogger(__name__)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
# the factor on the configured learning rates at step `step` (1-based) of `steps`: a function of the step alone, so a
# resumed run sets the same rates as an uninterrupted one
LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, steps: 1.0,
    "linear": lambda step, steps: (steps - step + 1) / steps,
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of one DP training stage. Batch sizes count examples; `epochs` may be fractional."""

    epochs: float = 3.0
    batch_size: int = 512            # expected logical batch (Poisson mean): sample_rate = batch_size / n
    physical_batch_size: int = 64    # examples per forward/backward chunk (memory only, no privacy effect)
    learning_rate: float = 2.0       # head
    encoder_learning_rate: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9            # sgd only
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: the rates x (steps - step + 1) / steps
    max_grad_norm: float = 1.0       # per-example clipping bound C
    seed: int = 0
    engine: Literal["ghost", "hooks", "bookkeeping"] = "bookkeeping"  # per-example clipping (privacy.engine)
    clipping: Literal["flat", "per_layer"] = "flat"
    checkpoint_every: int = 50       # steps between crash-safe checkpoints (0: never); needs a checkpoint_dir
    processes: int = 1               # data-parallel ranks (torch.distributed, compression.parallel); same result

    def __post_init__(self):
        for name in ("epochs", "batch_size", "physical_batch_size", "learning_rate", "max_grad_norm"):
            value = getattr(self, name)  # an infinite clipping norm would void the DP guarantee; NaN breaks steps
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"processes must be an integer >= 1, got {self.processes!r}")

    def sample_rate(self, num_examples: int) -> float:
        return min(1.0, self.batch_size / num_examples)

    def num_steps(self, num_examples: int) -> int:
        return max(1, math.ceil(self.epochs / self.sample_rate(num_examples)))

    def event(self, num_examples: int, *, noise_multiplier: float) -> DPEvent:
        """The DP event of training on `num_examples` at `noise_multiplier` (what the planner accounts)."""
        return DPEvent(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate(num_examples),
                       num_steps=self.num_steps(num_examples))


@dataclass(frozen=True)
class TrainResult:
    num_steps: int
    sample_rate: float
    noise_multiplier: float
    seconds: float
    resumed_from: int = 0  # steps restored from a checkpoint (0: trained from the start)


@torch.no_grad()
def cache_features(module: torch.nn.Module, features: Callable, data: dict, *, chunk_size: int = 128
                   ) -> list[torch.Tensor]:
    """`features(input_ids, attention_mask, token_type_ids)` (a `StagePlan`'s) of every example, with `module` in
    eval mode and no autograd: one unpadded `[len_i, ...]` tensor per example (in memory; private data)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(data["input_ids"])
    was_training = module.training
    module.eval()
    for chunk, input_ids, mask, token_types in padded_batches(data, chunk_size):
        hidden = features(input_ids, mask, token_types)
        for row, i in enumerate(chunk.tolist()):
            out[i] = hidden[row, : len(data["input_ids"][i])].clone()
    module.train(was_training)
    return out


def make_optimizer(model: TextClassifier, config: TrainConfig) -> torch.optim.Optimizer:
    head = [p for p in model.head.parameters() if p.requires_grad]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": head, "lr": config.learning_rate}]
    if body:
        groups.append({"params": body, "lr": config.encoder_learning_rate})
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {config.optimizer!r}")
    extra = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
    return OPTIMIZERS[config.optimizer](groups, **extra)


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Hold pruned weights at exactly zero (called after every noisy step)."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def dp_train(model: TextClassifier, data: dict, *, config: TrainConfig, method=DEFAULT,
             noise_multiplier: float | None = None, event: DPEvent | None = None, loss_fn: LossFn | None = None,
             masks: dict[str, torch.Tensor] | None = None, on_step: Callable[[int, dict], None] | None = None,
             secure_mode: bool = False, noise_seed: int | None = None,
             checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train `model` in place with DP-SGD/DP-AdamW: `event.num_steps` steps, each Poisson-sampling the examples at
    `event.sample_rate`, with noise multiplier `event.noise_multiplier`.

    Args:
        data: `compression.data.encode` output (unpadded `input_ids`, `token_type_ids`, `labels`).
        method: the fine-tuning method's config (compression.methods): what trains. Default: `full` on the top layer.
            `model` must be what `compression.methods.prepare(model, method)` returned (adapters, side network); the
            caller merges afterwards (`compression.methods.merge`).
        event: the stage's DP event as the study's plan accounted it (the one source of sigma, q and steps); its q
            and steps must be what `config` gives for this data. Or `noise_multiplier` alone, the rest from `config`.
        loss_fn: per-example loss `(logits, labels, example_index) -> [B]`; default: the task loss.
        masks: parameter name -> {0,1} mask; masked weights are zero before and after every step.
        on_step: called as `on_step(step, {"loss": ..., "batch_size": ...})` after each step (loss and batch size
            are computed on private data: local console progress only, never a tracking server, Prefect's logs or an
            exported file). It must not draw from torch's global RNG. After a resume, steps continue from the
            checkpoint's step.
        secure_mode: Opacus' secure Gaussian sampling (privacy.noise).
        noise_seed: None (the default): the noise and the Poisson sampling draw from generators seeded by the OS.
            An int seeds both (TEST MODE: the run is reproducible and has no DP guarantee).
        checkpoint_dir: folder for crash-safe checkpoints, saved every `config.checkpoint_every` steps and
            after the last, before `on_step`. A checkpoint there with the same settings (`resume.run_settings`) is
            resumed; the run ends as an uninterrupted one would, with the same steps and sigma. The caller
            must pass the same starting model and `loss_fn`, and delete the folder once outputs are saved.
    """
    labels = torch.as_tensor(data["labels"])
    n = len(labels)
    event = _stage_event(config, n, noise_multiplier=noise_multiplier, event=event)
    q, steps, sigma = event.sample_rate, event.num_steps, event.noise_multiplier
    loss_fn = loss_fn or task_loss(model.num_labels)
    apply_masks(model, masks)
    chosen = get_method(method.name)
    if config.engine not in chosen.engines:
        raise ValueError(f"method {method.name!r} needs engine {' or '.join(chosen.engines)}, got {config.engine!r}")
    if masks and not chosen.masks:
        raise ValueError(f"method {method.name!r} cannot hold pruning masks (its merge would fill them in)")
    settings = None if not (checkpoint_dir and config.checkpoint_every) else run_settings(
        model, data, masks, config=config, method=method, noise_multiplier=sigma, sample_rate=q, num_steps=steps,
        secure_mode=secure_mode, seeded=noise_seed is not None)
    began = time.monotonic()
    log.info("DP training: n=%d q=%.4g steps=%d sigma=%.4g C=%g processes=%d", n, q, steps, sigma,
             config.max_grad_norm, config.processes)
    run = dict(model=model, data=data, config=config, method=method, event=event, loss_fn=loss_fn, masks=masks,
               secure_mode=secure_mode, noise_seed=noise_seed, checkpoint_dir=checkpoint_dir, settings=settings)
    if config.processes == 1:
        resumed_from = train_rank(**run, on_step=on_step)
    else:
        resumed_from = run_ranks(train_rank, run, processes=config.processes, on_step=on_step)
    return TrainResult(num_steps=steps, sample_rate=q, noise_multiplier=sigma,
                       seconds=time.monotonic() - began, resumed_from=resumed_from)


def train_rank(*, model: TextClassifier, data: dict, config: TrainConfig, method, event, loss_fn: LossFn,
               masks: dict[str, torch.Tensor] | None, secure_mode: bool, noise_seed: int | None,
               checkpoint_dir: str | Path | None, settings: dict | None,
               on_step: Callable[[int, dict], None] | None = None) -> int:
    """`dp_train`'s loop on this process's rank (privacy.distributed; one process: rank 0 of 1, the whole data).
    Returns the step resumed from. With several ranks, rank i % world holds example i; every rank draws the same
    Poisson mask (one shared secret seed) and keeps its own examples, rank 0 alone adds noise, only rank 0 calls
    `on_step` and writes checkpoints; every rank ends with the same model."""
    rank, world = rank_and_world()
    labels = torch.as_tensor(data["labels"])
    n, q, steps, sigma = len(labels), event.sample_rate, event.num_steps, event.noise_multiplier
    plan = stage_plan(model, method)
    directory = checkpoint_dir if config.checkpoint_every else None
    checkpoints = StageCheckpoints(directory, every=config.checkpoint_every, settings=settings)
    mine = own_examples(torch.arange(n), rank=rank, world=world)
    hidden = _own_features(plan, data, mine)
    lengths = torch.tensor([len(h) for h in hidden])
    optimizer = make_optimizer(plan.module, config)
    rates = [group["lr"] for group in optimizer.param_groups]
    private = PrivateModel(plan.module, optimizer, noise_multiplier=sigma,
                           max_grad_norm=config.max_grad_norm, expected_batch_size=config.batch_size,
                           mode=config.engine, clipping=config.clipping, secure_mode=secure_mode,
                           generator=make_generator(None if noise_seed is None else noise_seed + 1),
                           distributed=world > 1)
    # Sampling must be secret for the accountant's guarantee: seeded by the OS unless in the seeded test mode.
    seed = noise_seed if world == 1 else shared_seed(noise_seed)
    sampler = PoissonSampler(num_examples=n, sample_rate=q, num_steps=steps, seed=seed)
    # Dropout draws from the global RNG, seeded from the config (dropout is not part of the mechanism; rank r uses
    # seed + r), so a stage's result does not depend on what ran before it in the process; the caller's RNG state
    # is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + rank)
        resumed_from = checkpoints.restore(model, private, sampler)
        plan.module.train()
        try:
            for step, index in enumerate(sampler, start=resumed_from + 1):
                total = torch.zeros(2, dtype=torch.float64)  # loss sum, examples: progress only
                for chunk in length_chunks(own_examples(index, rank=rank, world=world), lengths,
                                           config.physical_batch_size):
                    states, mask = pad([hidden[i] for i in chunk])
                    logits = plan.logits(states, mask)  # hooks live on the submodules
                    losses = loss_fn(logits, labels[chunk], chunk)
                    total += torch.tensor([float(losses.detach().sum()), len(chunk)], dtype=torch.float64)
                    private.backward(losses)
                factor = LR_SCHEDULES[config.lr_schedule](step, steps)
                for group, rate in zip(optimizer.param_groups, rates):  # after a restore too: the step decides
                    group["lr"] = rate * factor
                private.step()
                apply_masks(model, masks)
                checkpoints.save(step, model, private, sampler)
                sum_over_ranks([total])  # the whole batch's progress figures on rank 0's console
                if on_step:
                    on_step(step, {"loss": float(total[0]) / max(1, int(total[1])), "batch_size": int(total[1]),
                                   "num_steps": steps, "lr_factor": factor})
        finally:
            private.close()
    return resumed_from


def _own_features(plan, data: dict, mine: torch.Tensor) -> list[torch.Tensor]:
    """The cached features of this rank's examples at their global positions (empty elsewhere)."""
    if len(mine) == len(data["labels"]):
        return cache_features(plan.module, plan.features, data)
    rows = mine.tolist()
    own = cache_features(plan.module, plan.features, {k: [data[k][i] for i in rows] for k in
                                                      ("input_ids", "token_type_ids")})
    hidden = [torch.empty(0)] * len(data["labels"])
    for i, h in zip(rows, own):
        hidden[i] = h
    return hidden


def _stage_event(config: TrainConfig, num_examples: int, *, noise_multiplier: float | None,
                 event: DPEvent | None) -> DPEvent:
    """The event to train: `event` (checked against what `config` gives for this data), or one at
    `noise_multiplier` (>= 0: 0 trains without noise, the non-private baseline)."""
    if (event is None) == (noise_multiplier is None):
        raise ValueError("dp_train needs exactly one of event= (the plan's) and noise_multiplier=")
    if event is None:
        if noise_multiplier == 0:  # not a DP event (DPEvent needs sigma > 0): a baseline without privacy
            return _NoNoise(config.sample_rate(num_examples), config.num_steps(num_examples))
        return config.event(num_examples, noise_multiplier=noise_multiplier)
    if not math.isclose(event.sample_rate, config.sample_rate(num_examples)) or \
            event.num_steps != config.num_steps(num_examples):
        raise ValueError(f"the plan's event (q={event.sample_rate:.6g}, {event.num_steps} steps) is not what the "
                         f"training config gives for n={num_examples} (q={config.sample_rate(num_examples):.6g}, "
                         f"{config.num_steps(num_examples)} steps): plan and stage disagree")
    return event


@dataclass(frozen=True)
class _NoNoise:
    sample_rate: float
    num_steps: int
    noise_multiplier: float = 0.0
