"""What the vendor trains, behind one small interface: `prepare_vendor(model, split_layer=, method=)` returns the
parameters to optimise. A method is a `compression.methods.Method` (full, bitfit, bias_norm, and a LoRA method when
one is registered there) or this module's own `split_lora` (a small LoRA adapter on the vendor's blocks); only
layers at or above the split ever train (the customer's blocks and the embeddings are public and frozen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compression.methods import Method, get_method, train_only


@dataclass(frozen=True, kw_only=True)
class SplitLoRAConfig:
    """LoRA (Hu et al. 2022) on the linear maps named `targets` inside every block: W x + (alpha / rank) B A x, A
    random and B zero at the start, so training starts from the pretrained function."""

    name: Literal["split_lora"] = "split_lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "output.dense")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """The plain linear map with the update folded in."""
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_b @ self.lora_a
        return self.base


def _targets(model, config: SplitLoRAConfig):
    for layer in model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in config.targets):
                parent_name, _, child = name.rpartition(".")
                yield (layer.get_submodule(parent_name) if parent_name else layer), child, module


def _add_lora(model, config: SplitLoRAConfig):
    torch.manual_seed(0)  # the adapters' initialisation is public, like the pretrained weights
    for parent, child, linear in list(_targets(model, config)):
        setattr(parent, child, LoRALinear(linear, rank=config.rank, alpha=config.alpha))
    return model


def _merge_lora(model, config: SplitLoRAConfig):
    for layer in model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module.merged())
    return model


SPLIT_LORA = Method(name="split_lora", config=SplitLoRAConfig, prepare=_add_lora, merge=_merge_lora,
                    trainable=lambda model, config: train_only(model, start=0, select=lambda n, p: "lora_" in n))
_LOCAL = {SPLIT_LORA.name: SPLIT_LORA}


def vendor_method(name: str) -> Method:
    """This module's `split_lora`, or the method `name` of the compression.methods registry."""
    return _LOCAL[name] if name in _LOCAL else get_method(name)


def prepare_vendor(model, *, split_layer: int, method) -> tuple[nn.Module, list[nn.Parameter]]:
    """The vendor's model (`method.prepare` applied) and the parameters it trains: what `method` selects in blocks
    `split_layer..` and the head; everything below the split is frozen."""
    chosen = vendor_method(method.name)
    model = chosen.prepare(model, method)
    chosen.trainable(model, method)
    above = {id(p) for layer in list(model.layers)[split_layer:] for p in layer.parameters()}
    for p in model.encoder.parameters():
        if id(p) not in above:
            p.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]
