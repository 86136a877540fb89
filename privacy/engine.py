"""DP-SGD engine: Poisson sampling, per-example clipping (Opacus ghost clipping or hooks, or book-keeping), noise.

Assumptions: add-or-remove-one-example neighbouring relation; every step samples each example
independently with probability `sample_rate` (Poisson), which is what the accountant assumes. A logical
batch may be split into physical chunks of any composition: clipping is per example, so the clipped sum
does not depend on the split. Not here: accounting (accounting.py) and budgets (ledger.py).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Literal

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from opacus.optimizers.optimizer import _generate_noise, _mark_as_processed
from torch import nn

from privacy.bookkeeping import BookKeeping
from privacy.distributed import draws_noise, sum_over_ranks
from privacy.noise import make_generator

log = logging.getLogger(__name__)


class PoissonSampler:
    """Yields, for each of `num_steps` steps, the indices of the examples sampled with probability `sample_rate`.

    Its state (the generator and the step reached) can be saved and restored, so a resumed run draws
    exactly the batches an uninterrupted one would. One pass: iteration continues from `step` to `num_steps`.
    """

    def __init__(self, *, num_examples: int, sample_rate: float, num_steps: int, seed: int | None = None,
                 start_step: int = 0):
        """`seed` None (the default) seeds the draws from the OS: the batches must stay secret for the guarantee.
        `start_step` > 0 replays (and discards) the first `start_step` draws from `seed`."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
        self.num_examples, self.sample_rate, self.num_steps = num_examples, sample_rate, num_steps
        self.generator = make_generator(seed)
        self.step = 0  # steps drawn so far
        while self.step < start_step:
            self._draw()

    def _draw(self) -> torch.Tensor:
        draws = torch.rand(self.num_examples, generator=self.generator)
        self.step += 1
        return (draws < self.sample_rate).nonzero().flatten()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.step < self.num_steps:
            yield self._draw()

    def state_dict(self) -> dict:
        """The step reached and the generator state after its draw: restoring it continues the same stream."""
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= int(state["step"]) <= self.num_steps:
            raise ValueError(f"sampler step must be in [0, {self.num_steps}], got {state['step']}")
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


class PrivateModel:
    """A module and optimizer made private: `backward(per_example_loss)` per physical chunk, `step()` per logical batch.

    `step()` adds N(0, (noise_multiplier * max_grad_norm)^2) to every coordinate of the clipped sum and
    divides by `expected_batch_size` (the Poisson mean), then applies the wrapped optimizer's update.

    Args:
        mode: how per-example gradients are clipped; all give the same clipped sum. "ghost": Opacus ghost
            clipping (norms from activations and output gradients, then a second backward); "hooks": Opacus
            per-example gradients instantiated for every parameter (memory ~ batch x parameters); "bookkeeping":
            book-keeping (privacy.bookkeeping), one backward, Linear/Embedding/LayerNorm parameters only. Every
            mode refuses (RuntimeError in `backward`) a trainable parameter whose gradient the per-example machinery
            did not capture, e.g. one used through a bare torch.nn.functional call (it would escape the clipping,
            opacus #820).
        clipping: "flat" bounds each example's whole gradient by `max_grad_norm` (C); "per_layer" bounds each of
            the L trainable parameter tensors by C / sqrt(L) (total still <= C). Not with mode="ghost".
        secure_mode: Opacus' secure Gaussian sampling (robust to floating-point attacks on the noise).
        generator: the noise generator; None (the default) seeds a fresh one from the OS. Pass one only to resume
            a stream (its state from a checkpoint) or in tests: noise reproducible from anything public voids the
            guarantee.
        distributed: data-parallel over the initialised torch.distributed group (privacy.distributed): each rank
            calls `backward` on its own examples and every rank calls `step` together; `step` sums the ranks' clipped
            sums (one all-reduce) with the noise of rank 0 alone (drawn once per step) and every rank applies the same
            update. `expected_batch_size` is then the whole logical batch's (all ranks together).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int,
                 mode: Literal["ghost", "hooks", "bookkeeping"] = "ghost",
                 clipping: Literal["flat", "per_layer"] = "flat", secure_mode: bool = False,
                 generator: torch.Generator | None = None, distributed: bool = False):
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, "
                             f"{max_grad_norm}")
        if mode not in _BACKENDS:
            raise ValueError(f"mode must be one of {sorted(_BACKENDS)}, got {mode!r}")
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        if mode == "ghost" and clipping != "flat":
            raise ValueError("mode='ghost' supports clipping='flat' only; use mode='hooks' or 'bookkeeping' for "
                             "per_layer")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        # Seeded from the OS, never from the (public) config; torchcsprng has no build for this torch.
        generator = generator if generator is not None else make_generator()
        self.mode, self.clipping = mode, clipping
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self._backend = _BACKENDS[mode](module, optimizer, noise_multiplier=noise_multiplier,
                                        max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                        clipping=clipping, secure_mode=secure_mode, generator=generator)
        if distributed:
            _noise_once(self._backend)
        self.module, self.optimizer = self._backend.module, self._backend.optimizer

    @property
    def noise_generator(self) -> torch.Generator:
        return self._backend.generator

    def backward(self, loss_per_example: torch.Tensor) -> None:
        """Clip each example's gradient and add the chunk's clipped sum to the logical batch."""
        if loss_per_example.dim() != 1:
            raise ValueError(f"need one loss per example (shape [B]), got {tuple(loss_per_example.shape)}")
        self._backend.backward(loss_per_example)

    def step(self) -> None:
        """Noise the clipped sum of the logical batch and update. An empty batch still makes a noise-only step."""
        self._backend.step()

    def close(self) -> None:
        """Remove hooks and per-example state: the module is a plain module again."""
        self._backend.close()

    def per_example_norms(self) -> torch.Tensor:
        """Unclipped gradient norms of the last chunk (tests and diagnostics only; never log them)."""
        return self._backend.per_example_norms()


class _OpacusBackend:
    """ghost and hooks: chunks accumulate through Opacus's skip-step mechanism (clipped sums kept, no noise)."""

    def __init__(self, module, optimizer, *, ghost: bool, noise_multiplier, max_grad_norm, expected_batch_size,
                 clipping, secure_mode, generator):
        self.ghost = ghost
        self._names = {p: name for name, p in module.named_parameters() if p.requires_grad}
        kwargs = dict(noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                      loss_reduction="mean", generator=generator, secure_mode=secure_mode)
        if ghost:
            self.module = GradSampleModuleFastGradientClipping(
                module, batch_first=True, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
            self.optimizer = DPOptimizerFastGradientClipping(optimizer, max_grad_norm=max_grad_norm, **kwargs)
        else:
            self.module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
            if clipping == "per_layer":
                count = sum(p.requires_grad for g in optimizer.param_groups for p in g["params"])
                bounds = [max_grad_norm / math.sqrt(count)] * count
                self.optimizer = DPPerLayerOptimizer(optimizer, max_grad_norm=bounds, **kwargs)
            else:
                self.optimizer = DPOptimizer(optimizer, max_grad_norm=max_grad_norm, **kwargs)
        self.generator = self.optimizer.generator
        self._pending = False

    def backward(self, loss_per_example: torch.Tensor) -> None:
        if self._pending:  # keep earlier chunks' clipped sums (Opacus accumulates on a skipped step)
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad()
        if self.ghost:
            self._ghost_backward(loss_per_example)
        else:
            loss_per_example.sum().backward()
            if len(loss_per_example):
                self._check_grad_samples()
        self._pending = True

    def _ghost_backward(self, losses: torch.Tensor) -> None:
        """Opacus' two passes (as `DPTensorFastGradientClipping.backward`: norms, then the loss reweighted by the
        clipping coefficients), refusing, between them, a parameter the hooks gave no per-example norm."""
        params = self.optimizer.params
        for p in params:  # no stale norms from an earlier chunk
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        losses.sum().backward(retain_graph=True)
        if len(losses):
            _refuse_uncovered([self._names.get(p, "?") for p in params if getattr(p, "_norm_sample", None) is None],
                              "ghost clipping")
        self.optimizer.zero_grad()
        coeff = self.module.get_clipping_coef()
        self.module.disable_hooks()
        try:
            (coeff.to(losses.device) * losses).sum().backward()
        finally:
            self.module.enable_hooks()

    def _check_grad_samples(self) -> None:
        """Every trainable parameter has per-example gradients, and they sum to its ordinary gradient: a use outside
        the hooked modules (a bare functional call) adds to the latter only."""
        params = self.optimizer.params
        _refuse_uncovered([self._names.get(p, "?") for p in params if getattr(p, "grad_sample", None) is None],
                          "Opacus hooks")
        pairs = [(p, p.grad, p.grad_sample.sum(0).to(p.grad.dtype)) for p in params if p.grad is not None]
        # relative to the whole gradient: a parameter whose gradient is rounding noise (a key bias under softmax)
        # must not trip it
        scale = math.sqrt(sum(float(g.norm()) ** 2 + float(s.norm()) ** 2 for _, g, s in pairs))
        _refuse_uncovered([self._names.get(p, "?") for p, g, s in pairs if float((g - s).norm()) > 1e-4 * scale],
                          "Opacus hooks")

    def step(self) -> None:
        if not self._pending:
            for p in self.optimizer.params:
                if self.ghost:
                    p.grad = torch.zeros_like(p)
                else:  # an empty per-example batch: Opacus clips nothing and the sum is zero
                    p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self._pending = False

    def per_example_norms(self) -> torch.Tensor:
        if self.ghost:
            return self.module.per_sample_gradient_norms
        norms = [g.reshape(len(g), -1).norm(2, dim=1) for g in self.optimizer.grad_samples]
        return torch.stack(norms, dim=1).norm(2, dim=1)

    def close(self) -> None:
        self.module._close()
        for p in self.module._module.parameters():
            p.grad = None
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


def _refuse_uncovered(names: list[str], engine: str) -> None:
    if names:
        raise RuntimeError(f"{engine}: trainable parameter {names[0]} has no (or incomplete) per-example gradients "
                           f"from this backward ({len(names)} such): it was used outside the forward of a module "
                           "the engine hooks (e.g. a bare torch.nn.functional call), or not used; that gradient would "
                           "escape the per-example clipping. Call the module itself, or freeze the parameter")


class _BookKeepingBackend:
    """bookkeeping: clipped sums from privacy.bookkeeping, then Opacus's Gaussian noise (same secure-mode sampler)
    and scaling."""

    def __init__(self, module, optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, clipping,
                 secure_mode, generator):
        self.module, self.optimizer, self.generator = module, optimizer, generator
        self.clipper = BookKeeping(module, max_grad_norm=max_grad_norm, clipping=clipping)
        trainable = {id(p) for p in self.clipper.params}
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if missing := [i for i, p in enumerate(self.params) if id(p) not in trainable]:
            raise ValueError(f"optimizer parameters {missing} are not trainable parameters of the module")
        self.noise_std, self.expected_batch_size, self.secure_mode = (
            noise_multiplier * max_grad_norm, expected_batch_size, secure_mode)
        self.distributed = False  # set by _noise_once

    def backward(self, loss_per_example: torch.Tensor) -> None:
        self.clipper.backward(loss_per_example)

    def step(self) -> None:
        summed = self.clipper.pop_clipped_sum()
        noised = []
        for p in self.params:
            if self.distributed and not draws_noise():
                noised.append(summed[p].clone())
                continue
            noise = _generate_noise(std=self.noise_std, reference=summed[p], generator=self.generator,
                                    secure_mode=self.secure_mode)
            noised.append(summed[p] + noise)
        if self.distributed:
            sum_over_ranks(noised)
        for p, value in zip(self.params, noised):
            p.grad = value / self.expected_batch_size
        self.optimizer.step()
        self.optimizer.zero_grad()

    def per_example_norms(self) -> torch.Tensor:
        return self.clipper.per_example_norms()

    def close(self) -> None:
        self.clipper.close()
        for p in self.params:
            p.grad = None


def _noise_once(backend) -> None:
    """Make `backend` data-parallel: its step sums the ranks' clipped sums, rank 0's alone noised (privacy.distributed).
    Opacus' optimizers get it in `add_noise` (after their clipping and accumulation, before their scaling by the
    expected batch size); book-keeping in its own step."""
    if isinstance(backend, _BookKeepingBackend):
        backend.distributed = True
        return
    optimizer, own = backend.optimizer, backend.optimizer.add_noise

    def add_noise() -> None:
        if draws_noise():
            own()
        else:
            for p in optimizer.params:
                p.grad = p.summed_grad.clone().view_as(p)
                _mark_as_processed(p.summed_grad)
        sum_over_ranks([p.grad for p in optimizer.params])

    optimizer.add_noise = add_noise


_BACKENDS = {
    "ghost": lambda *a, **kw: _OpacusBackend(*a, ghost=True, **kw),
    "hooks": lambda *a, **kw: _OpacusBackend(*a, ghost=False, **kw),
    "bookkeeping": _BookKeepingBackend,
}
