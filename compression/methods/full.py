"""`full`: every parameter of the top `layers` encoder layers trains, and the head (the usual fine-tuning)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compression.methods import Layers, Method, first_trainable_layer, register_method, train_only


@dataclass(frozen=True, kw_only=True)
class FullConfig:
    name: Literal["full"] = "full"
    layers: Layers = 1

    def __post_init__(self):
        if self.layers != "all" and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                     or self.layers < 0):
            raise ValueError(f"layers must be an integer >= 0 or 'all', got {self.layers!r}")


def _trainable(model, config: FullConfig) -> int:
    return train_only(model, start=first_trainable_layer(model, config.layers), select=lambda name, p: True)


register_method(Method(name="full", config=FullConfig, trainable=_trainable))
