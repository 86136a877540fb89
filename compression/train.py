"""DP fine-tuning of a `TextClassifier` on tokenised examples: the training loop and its batching helpers.

The top `trainable_layers` encoder layers and the head train; the frozen bottom runs once per stage and
its hidden states are cached (public weights applied to each example: no privacy cost, no extra access
pattern). Not here: the DP mechanics (privacy.engine) and the budget (privacy.ledger).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from compression.models import TextClassifier
from privacy.checkpoint import TrainingCheckpoint, data_digest, load_checkpoint, save_checkpoint, tensors_digest
from privacy.engine import PoissonSampler, PrivateModel
from privacy.noise import make_generator

log = logging.getLogger(__name__)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
# "bias_norm" trains only the 1-D tensors (biases, LayerNorm) of the trainable layers, BitFit-style, besides the
# whole head: ~30k instead of ~10M noised coordinates on MiniLM, so far less DP noise per step (SST-2, 8k examples,
# epsilon 3.97: a MiniLM teacher reaches 81.4% this way over all six layers, 78.3% training its top layer whole).
TrainableParams = Literal["all", "bias_norm"]
TRAINABLE_PARAMS = get_args(TrainableParams)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, index) -> [B]


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
    max_grad_norm: float = 1.0       # per-example clipping bound C
    trainable_layers: int = 1        # top encoder layers that train besides the head (0: head only)
    trainable_params: TrainableParams = "all"  # of those layers: all, or biases + LayerNorm only
    seed: int = 0
    engine: Literal["ghost", "hooks", "bk"] = "bk"   # per-example clipping: privacy.engine (bk fastest, bench/)
    clipping: Literal["flat", "per_layer"] = "flat"
    checkpoint_every: int = 50       # steps between crash-safe checkpoints (0: never); needs a checkpoint_dir

    def __post_init__(self):
        for name in ("epochs", "batch_size", "physical_batch_size", "learning_rate", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.trainable_params not in TRAINABLE_PARAMS:
            raise ValueError(f"trainable_params must be one of {list(TRAINABLE_PARAMS)}, "
                             f"got {self.trainable_params!r}")

    def sample_rate(self, num_examples: int) -> float:
        return min(1.0, self.batch_size / num_examples)

    def num_steps(self, num_examples: int) -> int:
        return max(1, math.ceil(self.epochs / self.sample_rate(num_examples)))


@dataclass(frozen=True)
class TrainResult:
    num_steps: int
    sample_rate: float
    noise_multiplier: float
    seconds: float
    resumed_from: int = 0  # steps restored from a checkpoint (0: trained from the start)


def task_loss(num_labels: int) -> LossFn:
    """Per-example cross-entropy (classification) or squared error (regression, num_labels=1)."""
    if num_labels == 1:
        return lambda logits, labels, index: (logits.squeeze(-1) - labels.float()) ** 2
    return lambda logits, labels, index: F.cross_entropy(logits, labels, reduction="none")


def pad(sequences: Sequence[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token tensors or 2-D hidden-state tensors; returns (padded, attention_mask)."""
    length = max(len(s) for s in sequences)
    out = sequences[0].new_full((len(sequences), length, *sequences[0].shape[1:]), value)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return out, mask


def length_chunks(index: torch.Tensor, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split example indices into chunks of similar length (less padding), at most `size` each; none for no index."""
    order = index[torch.argsort(lengths[index], stable=True)]
    return [chunk for chunk in order.split(size) if len(chunk)]


@torch.no_grad()
def cache_prefix(model: TextClassifier, data: dict, *, num_layers: int, chunk_size: int = 128) -> list[torch.Tensor]:
    """Hidden states after the first `num_layers` layers, one unpadded `[len_i, H]` tensor per example."""
    ids = [torch.as_tensor(x) for x in data["input_ids"]]
    types = [torch.as_tensor(x) for x in data["token_type_ids"]]
    lengths = torch.tensor([len(x) for x in ids])
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    was_training = model.training
    model.eval()
    for chunk in length_chunks(torch.arange(len(ids)), lengths, chunk_size):
        input_ids, mask = pad([ids[i] for i in chunk])
        token_types, _ = pad([types[i] for i in chunk])
        hidden = model.embed(input_ids, mask, token_types, num_layers=num_layers)
        for row, i in enumerate(chunk.tolist()):
            out[i] = hidden[row, : len(ids[i])].clone()
    model.train(was_training)
    return out


def configure_trainable(model: TextClassifier, trainable_layers: int, params: str = "all") -> int:
    """Freeze all but the top `trainable_layers` layers (all of them if the model has fewer, e.g. a shrunk model or
    a shallow student) and the head; return the first trainable layer. `params="bias_norm"`: of those layers only
    the biases and LayerNorm parameters (every 1-D tensor) train; the head trains whole either way."""
    if trainable_layers < 0:
        raise ValueError(f"trainable_layers must be >= 0, got {trainable_layers}")
    if params not in TRAINABLE_PARAMS:
        raise ValueError(f"params must be one of {list(TRAINABLE_PARAMS)}, got {params!r}")
    start = max(0, model.num_layers - trainable_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers[start:]:
        for p in layer.parameters():
            p.requires_grad_(params == "all" or p.dim() == 1)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return start


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


def _run_settings(model: TextClassifier, data: dict, masks: dict[str, torch.Tensor] | None, *,
                  config: TrainConfig, noise_multiplier: float, secure_mode: bool, seeded: bool) -> dict:
    """What a checkpoint must match to be resumed: sigma, q, total steps, n, every hyperparameter but
    `checkpoint_every`, and digests of the data, the starting model (masks applied) and the masks."""
    n = len(data["labels"])
    hyperparameters = {k: v for k, v in vars(config).items() if k != "checkpoint_every"}
    return {"noise_multiplier": float(noise_multiplier), "sample_rate": config.sample_rate(n),
            "num_steps": config.num_steps(n), "num_examples": n, "secure_mode": secure_mode, "seeded": seeded,
            **hyperparameters,
            "data": data_digest(data), "model": tensors_digest(model.state_dict()),
            "masks": tensors_digest(masks or {})}


class _Checkpoints:
    """Restores and saves one `dp_train` call's state in a folder (privacy.checkpoint); inert without one.

    A resumed run is bitwise the uninterrupted one: same batches, noise and dropout (CPU RNG). The checkpoint holds
    the noise and sampler generator states, secrets of the mechanism: the file is owner-only and the caller deletes
    the folder once the stage's outputs are saved (privacy.checkpoint).
    """

    def __init__(self, directory: str | Path | None, *, every: int, settings: dict | None):
        self.directory = Path(directory) if directory is not None else None
        self.every, self.settings = every, settings

    def restore(self, model: TextClassifier, private: PrivateModel, sampler: PoissonSampler) -> int:
        """Load a matching checkpoint into model, optimizer, sampler and RNGs; return its step (0: none)."""
        if self.directory is None:
            return 0
        checkpoint = load_checkpoint(self.directory, settings=self.settings)
        if checkpoint is None:
            return 0
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if set(params) != set(checkpoint.parameters):
            raise ValueError(f"checkpoint in {self.directory} holds other parameters than the model trains")
        with torch.no_grad():
            for name, value in checkpoint.parameters.items():
                params[name].copy_(value)
        private.optimizer.load_state_dict(checkpoint.optimizer)
        sampler.load_state_dict(checkpoint.sampler)
        private.noise_generator.set_state(checkpoint.noise_generator)
        torch.set_rng_state(checkpoint.torch_rng)
        log.info("resuming DP training at step %d/%d from %s", checkpoint.step, sampler.num_steps, self.directory)
        return checkpoint.step

    def save(self, step: int, model: TextClassifier, private: PrivateModel, sampler: PoissonSampler) -> None:
        """Checkpoint after `step` if it is a multiple of `checkpoint_every` or the last step."""
        if self.directory is None or (step % self.every and step != sampler.num_steps):
            return
        save_checkpoint(self.directory, TrainingCheckpoint(
            step=step, settings=self.settings, sampler=sampler.state_dict(),
            parameters={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            optimizer=private.optimizer.state_dict(),
            noise_generator=private.noise_generator.get_state(), torch_rng=torch.get_rng_state(),
            history=[(self.settings["noise_multiplier"], self.settings["sample_rate"], step)]))


def dp_train(model: TextClassifier, data: dict, *, config: TrainConfig, noise_multiplier: float,
             loss_fn: LossFn | None = None, masks: dict[str, torch.Tensor] | None = None,
             on_step: Callable[[int, dict], None] | None = None, secure_mode: bool = False,
             noise_seed: int | None = None, checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train `model` in place with DP-SGD/DP-AdamW for `config.num_steps(n)` Poisson-sampled steps.

    Args:
        data: `compression.data.encode` output (unpadded `input_ids`, `token_type_ids`, `labels`).
        noise_multiplier: sigma, calibrated by the caller against the study budget.
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
            after the last, before `on_step`. A checkpoint there with the same settings (`_run_settings`) is
            resumed; the run ends as an uninterrupted one would, with the same steps and sigma. The caller
            must pass the same starting model and `loss_fn`, and delete the folder once outputs are saved.
    """
    labels = torch.as_tensor(data["labels"])
    n = len(labels)
    q, steps = config.sample_rate(n), config.num_steps(n)
    loss_fn = loss_fn or task_loss(model.num_labels)
    apply_masks(model, masks)
    start = configure_trainable(model, config.trainable_layers, config.trainable_params)
    directory = checkpoint_dir if config.checkpoint_every else None
    settings = None if directory is None else _run_settings(
        model, data, masks, config=config, noise_multiplier=noise_multiplier, secure_mode=secure_mode,
        seeded=noise_seed is not None)
    checkpoints = _Checkpoints(directory, every=config.checkpoint_every, settings=settings)
    hidden = cache_prefix(model, data, num_layers=start)
    lengths = torch.tensor([len(h) for h in hidden])
    private = PrivateModel(model, make_optimizer(model, config), noise_multiplier=noise_multiplier,
                           max_grad_norm=config.max_grad_norm, expected_batch_size=config.batch_size,
                           mode=config.engine, clipping=config.clipping, secure_mode=secure_mode,
                           generator=make_generator(None if noise_seed is None else noise_seed + 1))
    # Sampling must be secret for the accountant's guarantee: seeded by the OS unless in the seeded test mode.
    sampler = PoissonSampler(num_examples=n, sample_rate=q, num_steps=steps, seed=noise_seed)
    began = time.monotonic()
    log.info("DP training: n=%d q=%.4g steps=%d sigma=%.4g C=%g", n, q, steps, noise_multiplier,
             config.max_grad_norm)
    # Dropout draws from the global RNG, seeded from the config (dropout is not part of the mechanism), so a stage's
    # result does not depend on what ran before it in the process; the caller's RNG state is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        resumed_from = checkpoints.restore(model, private, sampler)
        model.train()
        try:
            for step, index in enumerate(sampler, start=resumed_from + 1):
                total = 0.0
                for chunk in length_chunks(index, lengths, config.physical_batch_size):
                    states, mask = pad([hidden[i] for i in chunk])
                    logits = model.classify(states, mask, start_layer=start)  # hooks live on the submodules
                    losses = loss_fn(logits, labels[chunk], chunk)
                    total += float(losses.detach().sum())
                    private.backward(losses)
                private.step()
                apply_masks(model, masks)
                checkpoints.save(step, model, private, sampler)
                if on_step:
                    on_step(step, {"loss": total / max(1, len(index)), "batch_size": len(index),
                                   "num_steps": steps})
        finally:
            private.close()
    return TrainResult(num_steps=steps, sample_rate=q, noise_multiplier=noise_multiplier,
                       seconds=time.monotonic() - began, resumed_from=resumed_from)
