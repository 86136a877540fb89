"""Statistics of the inputs of a model's prunable linear layers, released with DP: feature norms for Wanda
pruning scores (Wanda: |W_ij| * ||x_j||, Sun et al. 2023) and second moments for weight reconstruction after
pruning. The mechanisms are `privacy.mechanisms.gaussian_sum`; this module only picks the statistic.

Per example and per distinct layer input x ([L, d]), the statistic is the token mean of x_j^2 (or of x x^T) over
the example's real tokens (padding excluded). Linear layers fed the same tensor (query, key, value) share one chunk.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from compression.data import padded_batches
from compression.pruning.masks import prunable
from privacy.mechanisms.gaussian_sum import GaussianSum, SecondMomentSum

log = logging.getLogger(__name__)


def _layer_inputs(model: nn.Module, include: str, input_ids, mask, token_types) -> tuple[dict, dict]:
    """One forward pass; returns ({chunk key: [B, L, d] inputs}, {weight name: chunk key})."""
    modules = dict(model.named_modules())
    names = [n[: -len(".weight")] for n in prunable(model, include) if n.endswith(".weight")]
    chunks, owner, by_tensor, alive, hooks = {}, {}, {}, [], []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            key = by_tensor.setdefault(id(x), name)  # the first layer to see this tensor names the chunk
            alive.append(x)  # held until the pass ends, so no other tensor can take its id
            owner[name + ".weight"] = key
            if key == name:
                chunks[key] = x.detach()
        return record

    for name in names:
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"{name} is a {type(modules[name]).__name__}: activation scores need nn.Linear layers")
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        model(input_ids, mask, token_types)
    finally:
        for h in hooks:
            h.remove()
    return chunks, owner


def _token_mean_squares(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, d] inputs -> [B, d]: each example's token mean of x^2 over its real tokens."""
    real = mask.unsqueeze(-1).double()
    return (x.double().pow(2) * real).sum(1) / real.sum(1).clamp_min(1)


def _accumulate(model, data, include, batch_size, make, add):
    """One pass over `data` (a dataset, or a list of them): per batch, the layer inputs go to `add(total, inputs,
    mask)`; `total = make(keys)` on the first batch. Returns (total, {weight name: chunk key})."""
    model.eval()
    total, owner = None, None
    for dataset in data if isinstance(data, list | tuple) else [data]:
        for _, input_ids, mask, token_types in padded_batches(dataset, batch_size):
            inputs, owner = _layer_inputs(model, include, input_ids, mask, token_types)
            total = total or make(sorted(inputs))
            add(total, inputs, mask)
    if total is None:
        raise ValueError("input statistics need at least one example")
    return total, owner


def _second_moment_sum(model, data, include, batch_size, public):
    return _accumulate(model, data, include, batch_size, lambda keys: SecondMomentSum(keys, public=public),
                       lambda total, inputs, mask: total.add(inputs, mask))


@torch.no_grad()
def dp_second_moments(model: nn.Module, data: dict, *, include: str, noise_multiplier: float, batch_size: int = 64,
                      secure_mode: bool = False, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{weight name: [d_in, d_in] noisy sum of per-example normalised token-mean x x^T} for the prunable linear
    weights, from ONE release over every example of `data` (`privacy.mechanisms.gaussian_sum.SecondMomentSum`:
    sample rate 1, one
    step, sensitivity 1). Account it as DPEvent(noise_multiplier, sample_rate=1, num_steps=1) before calling.
    The square roots of the diagonals serve as input norms (`input_norms_from`)."""
    total, owner = _second_moment_sum(model, data, include, batch_size, public=False)
    released = total.release(noise_multiplier=noise_multiplier, secure_mode=secure_mode, generator=generator)
    log.info("released second moments of %d layer inputs over %d examples (sigma %.3g)", len(released),
             total.count, noise_multiplier)
    return {weight: released[key] for weight, key in owner.items()}


@torch.no_grad()
def public_second_moments(model: nn.Module, data: dict | list[dict], *, include: str, batch_size: int = 64
                          ) -> dict[str, torch.Tensor]:
    """The same statistic as `dp_second_moments`, without noise, from PUBLIC calibration text (a dataset or a list
    of them, summed; no privacy cost). Query, key and value get the same matrix."""
    total, owner = _second_moment_sum(model, data, include, batch_size, public=True)
    sums = total.noiseless()
    return {weight: sums[key] for weight, key in owner.items()}


def public_statistics(model: nn.Module, sources: list[dict], *, include: str) -> dict:
    """What a pruning round reads, from PUBLIC texts: {"second_moments", "input_norms"}, no noise, no privacy cost."""
    moments = public_second_moments(model, sources, include=include)
    return {"second_moments": moments, "input_norms": input_norms_from(moments)}


def release_statistics(model: nn.Module, data: dict, *, include: str, reconstruct: bool, noise_multiplier: float,
                       secure_mode: bool = False, generator: torch.Generator | None = None) -> dict:
    """What a pruning round reads, from the PRIVATE data in one DP release (sample rate 1, one step, sensitivity 1):
    second moments and the input norms on their diagonals when the round reconstructs, else the input norms alone.
    Account it as DPEvent(noise_multiplier, sample_rate=1, num_steps=1) before calling."""
    kwargs = {"include": include, "noise_multiplier": noise_multiplier, "secure_mode": secure_mode,
              "generator": generator}
    if reconstruct:
        moments = dp_second_moments(model, data, **kwargs)
        return {"second_moments": moments, "input_norms": input_norms_from(moments)}
    return {"input_norms": dp_input_norms(model, data, **kwargs)}


def input_norms_from(second_moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Input feature norms sqrt(max(0, diag)) from released second moments (post-processing)."""
    return {w: torch.diagonal(h).clamp_min(0).sqrt().float() for w, h in second_moments.items()}


@torch.no_grad()
def dp_input_norms(model: nn.Module, data: dict, *, include: str, noise_multiplier: float, batch_size: int = 64,
                   secure_mode: bool = False, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """{weight name: [d_in] noisy input feature norms} for the prunable linear weights, from ONE Gaussian-sum release
    over every example of `data` (the private training set): sample rate 1, one step, sensitivity 1 (see
    `privacy.mechanisms.gaussian_sum`). Account it as DPEvent(noise_multiplier, sample_rate=1, num_steps=1) before
    calling.

    The norms are sqrt(max(0, noisy sum)); only their ratios within a tensor matter to per-tensor and per-row masks.
    """
    total, owner = _accumulate(model, data, include, batch_size, GaussianSum, lambda total, inputs, mask: total.add(
        [_token_mean_squares(inputs[k], mask) for k in total.keys]))
    released = total.release(noise_multiplier=noise_multiplier, secure_mode=secure_mode, generator=generator)
    log.info("released input norms of %d layer inputs over %d examples (sigma %.3g)", len(released), total.count,
             noise_multiplier)
    return {weight: released[key].clamp_min(0).sqrt() for weight, key in owner.items()}
