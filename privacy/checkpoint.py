"""Crash-safe checkpoints of one DP training stage: an atomically replaced file holding everything needed to
resume it exactly (parameters, optimizer, sampler and noise RNG, privacy spend so far) and the settings it
belongs to. Not here: when to save or how a model is restored (compression.train), the study ledger (ledger.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import files
from .accounting import DPEvent

log = logging.getLogger(__name__)

FORMAT = "dpcompress.checkpoint/1"
FILE_NAME = "checkpoint.pt"
_TEMP_PREFIX, _TEMP_SUFFIX = f".{FILE_NAME}-", ".tmp"  # privacy.files' temp names
Settings = dict[str, int | float | str | bool | None]


@dataclass(frozen=True, kw_only=True)
class TrainingCheckpoint:
    """The state of a DP training stage after `step` logical steps (update applied, masks re-applied).

    settings: the run's fingerprint (sigma, q, total steps, seed, n, data and model digests, ...); a checkpoint
        only resumes a run with equal settings.
    parameters: name -> value of the trainable parameters (frozen ones are covered by the model digest).
    optimizer: the wrapped optimizer's `state_dict()` (momentum buffers, Adam moments).
    sampler: `PoissonSampler.state_dict()`: its step and generator state.
    noise_generator, torch_rng: states of the noise generator and of torch's global CPU RNG (dropout). The noise
        and sampler states are the secret seeds of the mechanism: they exist only here, never in a release.
    history: the accountant history spent so far in this stage, `[(noise_multiplier, sample_rate, num_steps)]`.

    Assumptions: the file is internal state of the mechanism, never a release. It is as sensitive as a
    model trained on the private data, and more: with the noise generator's state the noise of later steps
    could be recomputed and subtracted from a released model. It is written owner-only (0600, in a 0700 folder);
    delete it once the stage's outputs are saved.
    """

    step: int
    settings: Settings
    parameters: dict[str, torch.Tensor]
    optimizer: dict
    sampler: dict
    noise_generator: torch.Tensor | None = None
    torch_rng: torch.Tensor | None = None
    history: list[tuple[float, float, int]]

    def __post_init__(self) -> None:
        if sum(int(steps) for _, _, steps in self.history) != self.step:
            raise ValueError(f"history counts {self.history} steps, checkpoint is at step {self.step}")
        if int(self.sampler["step"]) != self.step:
            raise ValueError(f"sampler is at step {self.sampler['step']}, checkpoint at step {self.step}")

    def events(self) -> list[DPEvent]:
        """The history as `DPEvent`s, for `privacy.accounting.compose_epsilon`."""
        return [DPEvent(noise_multiplier=s, sample_rate=q, num_steps=int(k)) for s, q, k in self.history]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and exact bytes of `tensors` (a state_dict, masks, ...)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_digest(data: Mapping[str, Sequence]) -> str:
    """sha256 of the examples in order: `input_ids`, `token_type_ids` (if any) and `labels`."""
    digest = hashlib.sha256()
    for key in ("input_ids", "token_type_ids"):
        for row in data.get(key, ()):
            row = torch.as_tensor(row, dtype=torch.int64)
            digest.update(len(row).to_bytes(8, "little") + row.numpy().tobytes())
        digest.update(f"|{key}|".encode())
    digest.update(torch.as_tensor(data["labels"]).to(torch.float64).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(directory: str | os.PathLike, checkpoint: TrainingCheckpoint) -> Path:
    """Write `checkpoint` to `directory/checkpoint.pt` atomically (privacy.files: temp file, fsync, rename, fsync of
    the folder): a crash at any point leaves the previous checkpoint or the new one. The folder is made owner-only
    (0700) and the file 0600: it holds the noise generator's state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    payload = {"format": FORMAT, **{f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}}
    return files.torch_save(payload, directory / FILE_NAME, mode=0o600)


def load_checkpoint(directory: str | os.PathLike, *, settings: Settings) -> TrainingCheckpoint | None:
    """The checkpoint in `directory` if there is one written with exactly `settings`; else None.

    A checkpoint with other settings, or one that cannot be read, is ignored with a warning (the caller
    trains from step 0 and overwrites it), never resumed. Leftover temp files of a killed save are removed.
    Assumes one writer per folder.
    """
    directory = Path(directory)
    for leftover in directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    path = directory / FILE_NAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT!r}")
        checkpoint = TrainingCheckpoint(**{f.name: payload[f.name] for f in fields(TrainingCheckpoint)})
    except Exception as err:  # a damaged or foreign file must not stop training, nor be trusted
        log.warning("ignoring unreadable checkpoint %s (%s): training starts from step 0", path, err)
        return None
    changed = settings_diff(checkpoint.settings, settings)
    if changed:
        log.warning("ignoring checkpoint %s written with other settings (%s): training starts from step 0",
                    path, "; ".join(changed))
        return None
    return checkpoint


def settings_diff(stored: Settings, current: Settings) -> list[str]:
    """Human-readable differences `key: stored -> current` (empty when the settings are equal)."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]
