"""Fine-tuning methods, one registry entry each (as PEFT's `register_peft_method`): which parameters of a stage's
model train with DP, how the stage's model is built from the model it starts from, and how it is turned back into
plain weights to save and export. A stage's config names one: `method: {name: bias_norm, layers: all}`.

Not here: the DP training loop (compression.train), which asks the method what trains.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field

Layers = int | Literal["all"]  # the top N encoder layers (0: the head alone), or every layer
ENGINES = ("bookkeeping", "ghost", "hooks")


def _same(model, config):
    return model


@dataclass(frozen=True, kw_only=True)
class Method:
    """A fine-tuning method.

    config: its frozen config dataclass, with a `name: Literal[...]` field (the registry key).
    trainable: `(model, config) -> first layer` sets `requires_grad` on what trains (the head always trains) and
        returns the index of the first encoder layer autograd must run through (the layers below are frozen and
        their outputs are cached once per stage).
    prepare: `(model, config) -> model` builds the stage's model in place (e.g. adds adapters) and returns it; it
        keeps what an earlier stage of the same method built. Default: nothing to build.
    merge: `(model, config) -> model` plain weights for saving and export; default: the model itself.
    engines: the DP engine modes whose per-example clipping is exact for the parameters it trains.
    """

    name: str
    config: type
    trainable: Callable[[Any, Any], int]
    prepare: Callable[[Any, Any], Any] = _same
    merge: Callable[[Any, Any], Any] = _same
    engines: tuple[str, ...] = ENGINES


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def make_trainable(model, config) -> int:
    """Apply the method `config` names to `model` in place (`Method.prepare`, then `Method.trainable`): returns the
    first layer autograd runs through."""
    method = get_method(config.name)
    if method.prepare(model, config) is not model:
        raise ValueError(f"method {config.name!r}: prepare must build the stage's model in place")
    return method.trainable(model, config)


def first_trainable_layer(model, layers: Layers) -> int:
    """Index of the first of the top `layers` encoder layers ("all" or more than the model has: every layer)."""
    if layers == "all":
        return 0
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"layers must be an integer >= 0 or 'all', got {layers!r}")
    return max(0, model.num_layers - layers)


def train_only(model, *, start: int, select: Callable[[str, Any], bool]) -> int:
    """Freeze everything, then let train the parameters of layers `start..` for which `select(name, param)` holds,
    and the whole head; returns `start`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers[start:]:
        for name, p in layer.named_parameters():
            p.requires_grad_(bool(select(name, p)))
    for p in model.head.parameters():
        p.requires_grad_(True)
    return start


from compression.methods import bitfit, full, reversible  # noqa: E402, F401  (importing registers the built-in methods)

# a discriminated union over the registered methods' configs (built from the registry, hence typing.Union)
MethodConfig = Annotated[Union[tuple(m.config for m in METHODS.values())], Field(discriminator="name")]  # noqa: UP007
DEFAULT = full.FullConfig()
