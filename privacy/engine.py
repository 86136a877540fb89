"""DP-SGD engine: Poisson sampling, per-example clipping (Opacus ghost clipping), Gaussian noise.

Assumptions: add-or-remove-one-example neighbouring relation; every step samples each example
independently with probability `sample_rate` (Poisson), which is what the accountant assumes. A logical
batch may be split into physical chunks of any composition: clipping is per example, so the clipped sum
does not depend on the split. Not here: accounting (accounting.py) and budgets (ledger.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

log = logging.getLogger(__name__)


class PoissonSampler:
    """Yields, for each of `num_steps` steps, the indices of the examples sampled with probability `sample_rate`.

    Its state (the generator and the step reached) can be saved and restored, so a resumed run draws
    exactly the batches an uninterrupted one would.
    """

    def __init__(self, *, num_examples: int, sample_rate: float, num_steps: int, seed: int):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_examples, self.sample_rate, self.num_steps = num_examples, sample_rate, num_steps
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.num_steps):
            draws = torch.rand(self.num_examples, generator=self.generator)
            yield (draws < self.sample_rate).nonzero().flatten()


class PrivateModel:
    """A module and optimizer made private: `backward(per_example_loss)` per physical chunk, `step()` per logical batch.

    `step()` adds N(0, (noise_multiplier * max_grad_norm)^2) to every coordinate of the clipped sum and
    divides by `expected_batch_size` (the Poisson mean), then applies the wrapped optimizer's update.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, secure_mode: bool = False, seed: int | None = None):
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, {max_grad_norm}")
        self.module = GradSampleModuleFastGradientClipping(
            module, batch_first=True, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        generator = None if secure_mode or seed is None else torch.Generator().manual_seed(seed)
        self.optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
            secure_mode=secure_mode)
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self._pending = False

    @property
    def noise_generator(self) -> torch.Generator | None:
        return self.optimizer.generator

    def backward(self, loss_per_example: torch.Tensor) -> None:
        """Clip each example's gradient to `max_grad_norm` and add the chunk's clipped sum to the logical batch."""
        if loss_per_example.dim() != 1:
            raise ValueError(f"need one loss per example (shape [B]), got {tuple(loss_per_example.shape)}")
        if self._pending:  # keep earlier chunks' clipped sums (Opacus accumulates on a skipped step)
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad()
        DPTensorFastGradientClipping(self.module, self.optimizer, loss_per_example, "sum").backward()
        self._pending = True

    def step(self) -> None:
        """Noise the clipped sum of the logical batch and update. An empty batch still makes a noise-only step."""
        if not self._pending:
            for p in self.optimizer.params:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self._pending = False

    def close(self) -> None:
        """Remove the Opacus hooks and per-example state: the module is a plain module again."""
        self.module._close()
        for p in self.module._module.parameters():
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad

    def per_example_norms(self) -> torch.Tensor:
        """Unclipped gradient norms of the last chunk (tests and diagnostics only; never log them)."""
        return self.module.per_sample_gradient_norms
