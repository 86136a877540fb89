"""`lora`: low-rank adapters (Hu et al. 2022) on chosen Linear/Conv1D modules of the top `layers` encoder layers, as
plain modules every DP engine clips exactly: the frozen base module plus two bias-free `nn.Linear` (A: in -> rank,
B: rank -> out, B zero-initialised), output `base(x) + alpha / rank * B(A(dropout(x)))`. Not PEFT (its wrapped layers
corrupt Opacus updates, opacus #820). `merge` folds `alpha / rank * B A` into the base weights and removes the adapters:
a plain `TextClassifier` again, saved, evaluated and exported as any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compression.methods import Layers, Method, first_trainable_layer, register_method


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """rank: the adapters' inner width r. alpha: the update is scaled by alpha / rank. targets: which modules of each
    adapted layer, by role (query, key, value, attention_output, ffn_in, ffn_out: compression.families maps them to
    each family's module names) or by path inside a layer (e.g. "attention.self.query"). layers: the top N encoder
    layers or "all". dropout: on the adapters' input. seed: of A's initialisation (B starts at zero, so the adapted
    model computes what the model it was given computes)."""

    name: Literal["lora"] = "lora"
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    layers: Layers = "all"
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not self.targets or any(not isinstance(t, str) or not t for t in self.targets):
            raise ValueError(f"targets must be a non-empty list of module roles or paths, got {self.targets!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.layers != "all" and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                     or self.layers < 1):
            raise ValueError(f"layers must be an integer >= 1 or 'all', got {self.layers!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _features(base: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear (weight `[out, in]`) or transformers' Conv1D (weight `[in, out]`)."""
    if type(base) is nn.Linear:
        return base.in_features, base.out_features
    if type(base) is Conv1D:
        return base.weight.shape[0], base.nf
    raise ValueError(f"lora adapts nn.Linear and Conv1D modules, not {type(base).__name__}")


class LoraLinear(nn.Module):
    """`base(x) + scale * lora_B(lora_A(dropout(x)))`: a frozen nn.Linear or Conv1D and its low-rank update."""

    def __init__(self, base: nn.Module, *, rank: int, scale: float, dropout: float, generator: torch.Generator):
        super().__init__()
        in_features, out_features = _features(base)
        self.base, self.scale = base, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        with torch.no_grad():  # A as nn.Linear initialises its weight, drawn from `generator`; B zero
            bound = 1 / math.sqrt(in_features)
            self.lora_A.weight.copy_(torch.rand(rank, in_features, generator=generator) * 2 * bound - bound)
            self.lora_B.weight.zero_()
        self.lora_A.to(base.weight)
        self.lora_B.to(base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base module with `scale * B A` added to its weight (in place): the same function, no adapter."""
        delta = self.scale * (self.lora_B.weight @ self.lora_A.weight)  # [out, in]
        self.base.weight.add_(delta if type(self.base) is nn.Linear else delta.t())
        return self.base


def target_paths(model, targets: tuple[str, ...]) -> list[str]:
    """Module paths inside a layer for `targets` (roles of `model.family.roles`, or paths), without repeats (GPT-2's
    query, key and value are one fused module)."""
    roles, layer, paths = dict(model.family.roles), model.layers[0], []
    for target in targets:
        path = roles.get(target, target)
        try:
            _features(layer.get_submodule(path))
        except AttributeError as err:
            raise ValueError(f"lora target {target!r}: no module {path!r} in a {type(layer).__name__}; roles: "
                             f"{sorted(roles)}") from err
        if path not in paths:
            paths.append(path)
    return paths


def adapters(model) -> list[tuple[int, LoraLinear]]:
    """`(layer index, adapter)` of every adapter in `model`'s encoder layers."""
    return [(i, m) for i, layer in enumerate(model.layers) for m in layer.modules() if isinstance(m, LoraLinear)]


def _prepare(model, config: LoraConfig):
    """Inject adapters into the top `config.layers` layers of `model` (in place; returned). Deterministic: A's draws
    come from `config.seed`."""
    if adapters(model):
        raise ValueError("lora: the model already has adapters (prepare once per stage; merge before another)")
    paths = target_paths(model, config.targets)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: leave it untouched
        for layer in model.layers[first_trainable_layer(model, config.layers):]:
            for path in paths:
                layer.set_submodule(path, LoraLinear(layer.get_submodule(path), rank=config.rank, scale=config.scale,
                                                     dropout=config.dropout, generator=generator))
    return model


def _trainable(model, config: LoraConfig) -> int:
    """Freeze everything but the adapters and the head; autograd starts at the lowest adapted layer."""
    found = adapters(model)
    if not found:
        raise ValueError("lora: the model has no adapters; call compression.methods.prepare(model, config) first")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, adapter in found:
        adapter.lora_A.requires_grad_(True)
        adapter.lora_B.requires_grad_(True)
    model.head.requires_grad_(True)
    return min(i for i, _ in found)


def _merge(model, config: LoraConfig):
    """Fold every adapter into its base module and remove it (in place; returned): a plain classifier."""
    for layer in model.layers:
        for path, module in list(layer.named_modules()):
            if isinstance(module, LoraLinear):
                layer.set_submodule(path, module.merged())
    return model


register_method(Method(name="lora", config=LoraConfig, trainable=_trainable, prepare=_prepare, merge=_merge,
                       masks=False))
