"""White-box one-run audit of `privacy.engine.PrivateModel` with Dirac gradient canaries (Steinke, Nasr and Jagielski
2023, Section 7): train on the included canaries as a training stage would, score each canary by the parameter change
along its own clipped gradient. A test harness (seeded, no guarantee of its own); the bound is in bound.py."""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privacy.engine import PoissonSampler, PrivateModel

log = logging.getLogger(__name__)

# Every parameter tensor of CanaryModel, in round-robin order: canary i lives in TENSORS[i % 5].
TENSORS = ("linear.weight", "linear.bias", "norm.weight", "norm.bias", "embedding.weight")
_MODULE_OF = (0, 0, 1, 1, 2)  # the output (linear, norm, embedding) each tensor's canaries read
_PAIRED = (True, False, True, False, False)  # read at both positions with opposite signs: the bias parts cancel


class CanaryModel(nn.Module):
    """A Linear, a LayerNorm and an Embedding side by side, each run on the whole batch over two positions.

    An example's loss reads one output coordinate of one module (its route); its gradient is then one coordinate of
    one parameter tensor and does not depend on the parameters (the loss is affine in them). Weight canaries feed a
    one-hot input at position 0 and a zero input at position 1 read with the opposite sign, so the bias gradient
    cancels; bias canaries feed zero inputs, so the weight gets no gradient.
    """

    def __init__(self, *, width: int, in_features: int = 4, embedding_dim: int = 16):
        super().__init__()
        self.linear = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        self.embedding = nn.Embedding(math.ceil(width / embedding_dim), embedding_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example loss, shape [B]."""
        outs = (self.linear(batch["linear_input"]), self.norm(batch["norm_input"]), self.embedding(batch["ids"]))
        loss = 0.0
        for i, out in enumerate(outs):
            read = out.gather(2, batch["read"][:, i, None, None].expand(-1, 2, 1)).squeeze(2)  # [B, 2]
            loss = loss + (read * batch["read_weight"][:, i]).sum(1)
        return loss


def canary_inputs(model: CanaryModel, canaries: torch.Tensor, *, gradient_scale: float) -> dict[str, torch.Tensor]:
    """The batch of canaries `canaries` (indices): canary i is coordinate i // 5 of tensor TENSORS[i % 5], its
    unclipped gradient `gradient_scale` times a one-hot (times the normalised input for the LayerNorm weight)."""
    batch, kind, coord = len(canaries), canaries % len(TENSORS), canaries // len(TENSORS)
    rows = torch.arange(batch)
    in_features, width = model.linear.in_features, model.norm.normalized_shape[0]
    dim = model.embedding.embedding_dim
    linear_input, norm_input = torch.zeros(batch, 2, in_features), torch.zeros(batch, 2, width)
    linear_input[rows[kind == 0], 0, coord[kind == 0] % in_features] = 1.0
    norm_input[rows[kind == 2], 0, coord[kind == 2]] = 1.0
    ids = torch.where(kind == 4, coord // dim, 0)[:, None].expand(-1, 2).contiguous()
    module = torch.tensor(_MODULE_OF)[kind]
    read = torch.zeros(batch, 3, dtype=torch.long)
    read[rows, module] = torch.where(kind == 4, coord % dim, coord)
    read_weight = torch.zeros(batch, 3, 2)
    read_weight[rows, module, 0] = gradient_scale
    read_weight[rows, module, 1] = torch.where(torch.tensor(_PAIRED)[kind], -gradient_scale, 0.0)
    return {"linear_input": linear_input, "norm_input": norm_input, "ids": ids, "read": read,
            "read_weight": read_weight}


@dataclass(frozen=True, kw_only=True)
class CanaryScores:
    """scores[i] = <theta_0 - theta_T, u_i>, u_i canary i's clipped gradient direction, in units of max_grad_norm
    (the learning rate is expected_batch_size / max_grad_norm): an included canary gains 1 per step it is sampled
    (1 / sqrt(5) with per-layer clipping), the noise adds N(0, noise_multiplier^2) per step. tensors[i]: the
    parameter tensor u_i lives in (a group for `audit_from_scores`)."""

    scores: np.ndarray     # [m] float64
    included: np.ndarray   # [m] bool
    tensors: tuple[str, ...]


def run_canaries(*, num_canaries: int, sample_rate: float, num_steps: int, noise_multiplier: float,
                 max_grad_norm: float = 1.0, mode: Literal["bookkeeping", "ghost", "hooks"] = "bookkeeping",
                 clipping: Literal["flat", "per_layer"] = "flat", physical_batch_size: int = 512,
                 seed: int = 0) -> CanaryScores:
    """Include each of `num_canaries` canaries with probability 1/2, train on the included ones, score every canary.

    Training is a stage's loop: a PoissonSampler at `sample_rate` over the included canaries for `num_steps` steps,
    `PrivateModel.backward` per chunk of at most `physical_batch_size`, `PrivateModel.step` per logical batch, SGD
    without momentum, noise `noise_multiplier` * `max_grad_norm`, expected batch size sample_rate * (included).
    Every unclipped canary gradient has norm >= max_grad_norm (checked), so each is clipped to exactly
    max_grad_norm (C / sqrt(5), its one tensor's bound, with clipping="per_layer"). `seed` seeds the inclusion, the
    model, the batches and the noise: a reproducible harness, not a private run.
    """
    generator = torch.Generator().manual_seed(seed)
    included = torch.rand(num_canaries, generator=generator) < 0.5
    sampler_seed, noise_seed = torch.randint(2**62, (2,), generator=generator).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CanaryModel(width=math.ceil(num_canaries / len(TENSORS)))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, included.nonzero().flatten(), sample_rate=sample_rate, num_steps=num_steps,
           noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, mode=mode, clipping=clipping,
           physical_batch_size=physical_batch_size, sampler_seed=sampler_seed, noise_seed=noise_seed)
    moved = {n: start[n] - p.detach() for n, p in model.named_parameters()}
    scores = _scores(moved, num_canaries=num_canaries)
    tensors = tuple(TENSORS[i % len(TENSORS)] for i in range(num_canaries))
    return CanaryScores(scores=scores, included=included.numpy(), tensors=tensors)


def _train(model: CanaryModel, members: torch.Tensor, *, sample_rate, num_steps, noise_multiplier, max_grad_norm,
           mode, clipping, physical_batch_size, sampler_seed, noise_seed) -> None:
    expected = max(1, round(sample_rate * len(members)))
    optimizer = torch.optim.SGD(model.parameters(), lr=expected / max_grad_norm)
    private = PrivateModel(model, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                           expected_batch_size=expected, mode=mode, clipping=clipping,
                           generator=torch.Generator().manual_seed(noise_seed))
    sampler = PoissonSampler(num_examples=len(members), sample_rate=sample_rate, num_steps=num_steps,
                             seed=sampler_seed)
    try:
        for index in sampler:
            for chunk in members[index].split(physical_batch_size):
                private.backward(model(canary_inputs(model, chunk, gradient_scale=2 * max_grad_norm)))
            private.step()
    finally:
        private.close()
    log.debug("canary run: %d members, %d steps, mode %s, %s clipping", len(members), num_steps, mode, clipping)


def canary_gradients(model: CanaryModel, canaries: torch.Tensor, *, gradient_scale: float) -> dict[str, torch.Tensor]:
    """Each canary's unclipped gradient by autograd on that example alone (vmapped): name -> [len(canaries), *shape]."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(theta, example):
        return functional_call(model, theta, ({k: v.unsqueeze(0) for k, v in example.items()},)).squeeze(0)

    return vmap(grad(loss), in_dims=(None, 0))(params, canary_inputs(model, canaries, gradient_scale=gradient_scale))


@functools.lru_cache(maxsize=4)
def canary_directions(num_canaries: int, *, chunk_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(flat index, sign) of each canary's gradient direction inside its tensor TENSORS[i % 5], from autograd.

    The gradients do not depend on the parameters (the loss is affine in them), so they are computed once per
    size. The direction of a gradient in one tensor is also its clipped gradient's, flat or per layer. Raises if a
    gradient is not one coordinate of its own tensor, or if its norm is below C (it would not be clipped to
    exactly C; checked at C = 1 with the training's gradient_scale = 2 * C: both scale together).
    """
    with torch.random.fork_rng(devices=[]):
        model = CanaryModel(width=math.ceil(num_canaries / len(TENSORS)))
    names = [n for n, _ in model.named_parameters()]
    index, sign = [], []
    for canaries in torch.arange(num_canaries).split(chunk_size):
        grads = canary_gradients(model, canaries, gradient_scale=2.0)
        flat = torch.cat([grads[n].flatten(1) for n in names], dim=1)  # [B, all coordinates]
        offsets = torch.tensor([0, *np.cumsum([p.numel() for p in model.parameters()])])
        home = torch.tensor([names.index(TENSORS[i]) for i in (canaries % len(TENSORS)).tolist()])
        top = flat.abs().argmax(dim=1)
        rows = torch.arange(len(canaries))
        inside = (top >= offsets[home]) & (top < offsets[home + 1])
        if (flat.count_nonzero(dim=1) != 1).any() or not inside.all() or (flat[rows, top].abs() < 1.0).any():
            raise RuntimeError("a canary's gradient is not one coordinate of its own tensor with norm >= C")
        index.append(top - offsets[home])
        sign.append(flat[rows, top].sign())
    index, sign = torch.cat(index).numpy(), torch.cat(sign).numpy()
    index.setflags(write=False)  # cached: shared by every caller
    sign.setflags(write=False)
    return index, sign


def _scores(moved: dict[str, torch.Tensor], *, num_canaries: int) -> np.ndarray:
    """<moved, u_i> for each canary, u_i its clipped gradient's direction (a signed coordinate)."""
    index, sign = canary_directions(num_canaries)
    scores = np.empty(num_canaries)
    for t, name in enumerate(TENSORS):
        values = moved[name].double().flatten().numpy()
        scores[t::len(TENSORS)] = values[index[t::len(TENSORS)]] * sign[t::len(TENSORS)]
    return scores
