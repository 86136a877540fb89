"""Crash-safe resumption of one `dp_train` call: what a checkpoint must match, and the restore/save around the loop.

The checkpoint file itself (atomic, owner-only) is privacy.checkpoint; when to save and what goes in it is here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from privacy.checkpoint import TrainingCheckpoint, data_digest, load_checkpoint, save_checkpoint, tensors_digest
from privacy.distributed import rank_and_world
from privacy.engine import PoissonSampler, PrivateModel

log = logging.getLogger(__name__)


def run_settings(model: torch.nn.Module, data: dict, masks: dict[str, torch.Tensor] | None, *, config,
                 method, noise_multiplier: float, sample_rate: float, num_steps: int, secure_mode: bool,
                 seeded: bool) -> dict:
    """What a checkpoint must match to be resumed: sigma, q, total steps, n, every hyperparameter but
    `checkpoint_every`, the method, and digests of the data, the starting model (masks applied) and the masks."""
    hyperparameters = {k: v for k, v in vars(config).items() if k != "checkpoint_every"}
    return {"noise_multiplier": float(noise_multiplier), "sample_rate": sample_rate, "num_steps": num_steps,
            "num_examples": len(data["labels"]), "secure_mode": secure_mode, "seeded": seeded, **hyperparameters,
            "method": repr(method), "data": data_digest(data), "model": tensors_digest(model.state_dict()),
            "masks": tensors_digest(masks or {})}


class StageCheckpoints:
    """Restores and saves one `dp_train` call's state in a folder (privacy.checkpoint); inert without one.

    A resumed run is bitwise the uninterrupted one: same batches, noise and dropout (CPU RNG). The checkpoint holds
    the noise and sampler generator states, secrets of the mechanism: the file is owner-only and the caller deletes
    the folder once the stage's outputs are saved (privacy.checkpoint).
    """

    def __init__(self, directory: str | Path | None, *, every: int, settings: dict | None):
        self.directory = Path(directory) if directory is not None else None
        self.every, self.settings = every, settings

    def restore(self, model: torch.nn.Module, private: PrivateModel, sampler: PoissonSampler) -> int:
        """Load a matching checkpoint into model, optimizer, sampler and RNGs; return its step (0: none). Data-parallel
        (privacy.distributed): every rank calls it; rank 0 reads the file and sends it to the others."""
        if self.directory is None:
            return 0
        rank, world = rank_and_world()
        checkpoint = load_checkpoint(self.directory, settings=self.settings) if rank == 0 else None
        if world > 1:
            box = [checkpoint]
            dist.broadcast_object_list(box, src=0)
            checkpoint = box[0]
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
        torch.set_rng_state(checkpoint.torch_rng if world == 1 else checkpoint.torch_rng[rank].clone())  # own storage
        log.info("resuming DP training at step %d/%d from %s", checkpoint.step, sampler.num_steps, self.directory)
        return checkpoint.step

    def save(self, step: int, model: torch.nn.Module, private: PrivateModel, sampler: PoissonSampler) -> None:
        """Checkpoint after `step` if it is a multiple of `checkpoint_every` or the last step. Data-parallel: every rank
        calls it; rank 0 writes one file with every rank's dropout RNG state (rows of `torch_rng`), the rest being
        equal on all ranks (model, optimizer, the shared sampler) or rank 0's alone (the noise generator)."""
        if self.directory is None or (step % self.every and step != sampler.num_steps):
            return
        rank, world = rank_and_world()
        torch_rng = torch.get_rng_state()
        if world > 1:
            rows = [torch.empty_like(torch_rng) for _ in range(world)]
            dist.all_gather(rows, torch_rng)
            torch_rng = torch.stack(rows)
        if rank != 0:
            return
        save_checkpoint(self.directory, TrainingCheckpoint(
            step=step, settings=self.settings, sampler=sampler.state_dict(),
            parameters={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            optimizer=private.optimizer.state_dict(),
            noise_generator=private.noise_generator.get_state(), torch_rng=torch_rng,
            history=[(self.settings["noise_multiplier"], self.settings["sample_rate"], step)]))
