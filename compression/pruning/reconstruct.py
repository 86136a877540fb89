"""Weight reconstruction after pruning: each output row's surviving weights absorb what its pruned weights
contributed, under the second moment H of the layer's input (the optimal-brain-surgeon update for a fixed mask,
as in SparseGPT). H comes from a DP release (`compression.pruning.statistics.dp_second_moments`) or public text;
this is post-processing.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def psd_projection(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest positive semi-definite matrix (Frobenius): negative eigenvalues of the symmetric part set to 0.
    Noise can make a released second moment indefinite."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0)) @ vectors.T


@torch.no_grad()
def reconstruct(model: nn.Module, masks: dict[str, torch.Tensor], second_moments: dict[str, torch.Tensor], *,
                damping: float = 0.01) -> dict[str, float]:
    """Update every masked weight W [out, in] in place: per row, with K its kept and P its pruned inputs,
    W[K] += (H_KK + lam I)^-1 H_KP W[P] and W[P] = 0, which minimises E||(W' - W) x||^2 for x with second moment
    H (PSD-projected); lam = damping * mean(diag H). Returns {weight name: relative output error after / before}
    under H, a check that the update helped (1 means no better than zeroing)."""
    params = dict(model.named_parameters())
    ratios = {}
    cache: dict[int, torch.Tensor] = {}  # query, key and value share one H (one storage, also after torch.load)
    for name, mask in masks.items():
        raw = second_moments[name]
        if raw.data_ptr() not in cache:
            h = psd_projection(raw.double())
            cache[raw.data_ptr()] = h + damping * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype)
        h = cache[raw.data_ptr()]
        w = params[name].data.double()
        new = w * mask.double()
        for r in torch.nonzero((mask == 0).any(dim=1)).flatten().tolist():
            kept, pruned = mask[r].bool(), ~mask[r].bool()
            if kept.any():
                new[r, kept] += torch.linalg.solve(h[kept][:, kept], h[kept][:, pruned] @ w[r, pruned])
        ratios[name] = _error(new - w, h) / max(_error(w * mask.double() - w, h), 1e-300)
        params[name].data.copy_(new.to(params[name].dtype))
    log.info("reconstructed %d tensors; output error vs zeroing: median %.3f", len(ratios),
             float(torch.tensor(list(ratios.values())).median()) if ratios else 1.0)
    return ratios


def _error(delta: torch.Tensor, h: torch.Tensor) -> float:
    """sum over rows of delta_r H delta_r^T."""
    return float(((delta @ h) * delta).sum())
