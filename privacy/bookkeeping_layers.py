"""Book-keeping rules per layer type (Linear, LayerNorm, Embedding): a forward with detached parameters, and a capture
that turns a chunk's (input, output gradient) into per-example squared norms and clipped sums.
Assumes batch-first tensors (dim 0 indexes examples), each example's loss depending on its own row only."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Factors = dict[nn.Parameter, torch.Tensor]  # parameter -> per-example clip factor, shape [B]
_INSTANTIATE_CHUNK = 1 << 24  # elements of per-example weight gradients held at once


def use_ghost_norm(*, seq_len: int, in_features: int, out_features: int) -> bool:
    """Cheaper per-example weight norm for a Linear layer on `[B, T, d]` inputs and `[B, T, p]` outputs.

    Ghost norm (Gram matrices) costs ~B*T^2*(d+p) multiply-adds, instantiating per-example gradients
    ~B*T*d*p; ghost wins when T*(d+p) < d*p. Ties instantiate (no T x T workspace).
    """
    return seq_len * (in_features + out_features) < in_features * out_features


def trainable_param(module: nn.Module, name: str) -> nn.Parameter | None:
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


def _detached(module: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(module, name, None)
    return None if p is None else p.detach()


def _weighted_sum(factor: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    return torch.einsum("b,b...->...", factor.to(per_example.dtype), per_example)


class GramCache:
    """The last Gram matrix A A^T of a layer input: query, key and value read the same tensor, and their taps fire
    one after another in the backward pass, so one entry serves all three."""

    def __init__(self):
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def gram(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Gram of `a` (`[B, T, d]`), a reshape of the layer input `x`; keyed by `x`, the tensor the layers share."""
        if self._last is None or self._last[0] is not x:
            self._last = (x, torch.bmm(a, a.transpose(1, 2)))
        return self._last[1]

    def clear(self) -> None:
        self._last = None


class LinearCapture:
    """y = x W^T + b on `[B, d]` or `[B, ..., d]` inputs; keeps (x, grad_y) for the clipped sum."""

    def __init__(self, module: nn.Linear, x: torch.Tensor, grad: torch.Tensor, grams: GramCache):
        batch = x.shape[0]
        self.weight, self.bias = trainable_param(module, "weight"), trainable_param(module, "bias")
        self.a = x.reshape(batch, -1, x.shape[-1]) if self.weight is not None else None  # only W needs x
        self.g = grad.reshape(batch, -1, grad.shape[-1])
        self.sq_norms: dict[nn.Parameter, torch.Tensor] = {}
        if self.weight is not None:
            self.sq_norms[self.weight] = self._weight_sq_norms(x, grams)
        if self.bias is not None:
            self.bias_grads = self.g.sum(1)
            self.sq_norms[self.bias] = self.bias_grads.pow(2).sum(1)

    def _weight_sq_norms(self, x: torch.Tensor, grams: GramCache) -> torch.Tensor:
        (_, seq_len, d), p = self.a.shape, self.g.shape[-1]
        if use_ghost_norm(seq_len=seq_len, in_features=d, out_features=p):
            gram_g = torch.bmm(self.g, self.g.transpose(1, 2))
            return torch.linalg.vecdot(grams.gram(x, self.a).flatten(1), gram_g.flatten(1))
        step = max(1, _INSTANTIATE_CHUNK // (d * p))
        return torch.cat([torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))
                          for a, g in zip(self.a.split(step), self.g.split(step))])

    def clipped_sums(self, factors: Factors) -> dict[nn.Parameter, torch.Tensor]:
        out = {}
        if self.weight is not None:
            factor = factors[self.weight].to(self.g.dtype)[:, None, None]
            a, g = self.a, self.g  # sum_b c_b g_b^T a_b: scale the narrower of the two
            a, g = (a * factor, g) if a.shape[-1] < g.shape[-1] else (a, g * factor)
            out[self.weight] = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        if self.bias is not None:
            out[self.bias] = _weighted_sum(factors[self.bias], self.bias_grads)
        return out


class LayerNormCapture:
    """Affine LayerNorm: per-example gradients are only `[B, *normalized_shape]`, so they are instantiated."""

    def __init__(self, module: nn.LayerNorm, x: torch.Tensor, grad: torch.Tensor, grams: GramCache):
        outer = tuple(range(1, x.dim() - len(module.normalized_shape)))
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)  # (x - mean) / std, one pass
        self.grads: dict[nn.Parameter, torch.Tensor] = {}
        if (w := trainable_param(module, "weight")) is not None:
            self.grads[w] = (grad * x_hat).sum(outer) if outer else grad * x_hat
        if (b := trainable_param(module, "bias")) is not None:
            self.grads[b] = grad.sum(outer) if outer else grad
        self.sq_norms = {p: g.reshape(len(g), -1).pow(2).sum(1) for p, g in self.grads.items()}

    def clipped_sums(self, factors: Factors) -> dict[nn.Parameter, torch.Tensor]:
        return {p: _weighted_sum(factors[p], g) for p, g in self.grads.items()}


class EmbeddingCapture:
    """Lookup table: an example's gradient has one row per distinct id it uses (padding_idx excluded)."""

    def __init__(self, module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor, grams: GramCache):
        batch, vocab, dim = ids.shape[0], module.num_embeddings, grad.shape[-1]
        ids, grad = ids.reshape(batch, -1), grad.reshape(batch, -1, dim)
        if module.padding_idx is not None:
            grad = grad * (ids != module.padding_idx).unsqueeze(-1).to(grad.dtype)
        keys = ids + vocab * torch.arange(batch, device=ids.device).unsqueeze(1)  # (example, id) pairs
        unique, inverse = torch.unique(keys.flatten(), return_inverse=True)
        self.rows = grad.new_zeros(len(unique), dim).index_add_(0, inverse, grad.reshape(-1, dim))
        self.example, self.token = unique // vocab, unique % vocab
        self.weight = module.weight
        sq = grad.new_zeros(batch).index_add_(0, self.example, self.rows.pow(2).sum(1))
        self.sq_norms = {self.weight: sq}

    def clipped_sums(self, factors: Factors) -> dict[nn.Parameter, torch.Tensor]:
        scaled = self.rows * factors[self.weight].to(self.rows.dtype)[self.example].unsqueeze(1)
        return {self.weight: torch.zeros_like(self.weight).index_add_(0, self.token, scaled)}


def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight.detach(), _detached(module, "bias"))


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, _detached(module, "weight"), _detached(module, "bias"),
                        module.eps)


def _embedding(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(f"book-keeping supports nn.Embedding without max_norm, scale_grad_by_freq or sparse; "
                         f"got {module}")
    return F.embedding(ids, module.weight.detach(), module.padding_idx)


@dataclass(frozen=True)
class Rule:
    """How book-keeping handles one module type: its parameter names, a forward with detached parameters, a capture."""

    params: tuple[str, ...]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    capture: type


RULES: dict[type[nn.Module], Rule] = {}


def register_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Teach book-keeping a new module type (exact type match: a subclass may change the forward)."""
    RULES[module_type] = rule


register_rule(nn.Linear, Rule(("weight", "bias"), _linear, LinearCapture))
register_rule(nn.LayerNorm, Rule(("weight", "bias"), _layer_norm, LayerNormCapture))
register_rule(nn.Embedding, Rule(("weight",), _embedding, EmbeddingCapture))
