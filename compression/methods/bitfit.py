"""`bitfit`: only the bias terms of the top `layers` encoder layers train (Ben Zaken et al. 2022), besides the head;
`bias_norm`: the biases and the LayerNorm weights, i.e. every 1-D tensor (~30k noised coordinates on MiniLM instead
of ~10M, so far less DP noise per step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compression.methods import Layers, Method, first_trainable_layer, register_method, train_only
from compression.methods.full import FullConfig


@dataclass(frozen=True, kw_only=True)
class BitFitConfig(FullConfig):
    name: Literal["bitfit"] = "bitfit"
    layers: Layers = "all"


@dataclass(frozen=True, kw_only=True)
class BiasNormConfig(FullConfig):
    name: Literal["bias_norm"] = "bias_norm"
    layers: Layers = "all"


def _biases(model, config: BitFitConfig) -> int:
    return train_only(model, start=first_trainable_layer(model, config.layers),
                      select=lambda name, p: name.endswith("bias"))


def _one_dimensional(model, config: BiasNormConfig) -> int:
    return train_only(model, start=first_trainable_layer(model, config.layers), select=lambda name, p: p.dim() == 1)


register_method(Method(name="bitfit", config=BitFitConfig, trainable=_biases))
register_method(Method(name="bias_norm", config=BiasNormConfig, trainable=_one_dimensional))
