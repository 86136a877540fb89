"""Fine-tuning methods, one registry entry each (as PEFT's `register_peft_method`): which parameters of a stage's
model train with DP, how the stage's model is built from the model it starts from (`prepare`), what the DP loop caches
and what it runs under autograd (`stage_plan`), and how the result becomes the model to save and export (`merge`).
A stage's config names one: `method: {name: bias_norm, layers: all}`.

The life of a stage: `model = prepare(model, config)` -> `compression.train.dp_train(model, ...)` -> `merge(model,
config)`. Not here: the DP training loop (compression.train), which asks the method what trains.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import Field
from torch import nn

Layers = int | Literal["all"]  # the top N encoder layers (0: the head alone), or every layer
ENGINES = ("bookkeeping", "ghost", "hooks")


def _same(model, config):
    return model


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """How `dp_train` runs a prepared stage model: `features` once per example before training, `logits` per step.

    module: what the DP engine and the optimizer wrap; every trainable parameter lives in it, and `train()`/`eval()`
        on it set the mode of everything `logits` runs. It needs a `head` (the head's learning rate).
    features: `(input_ids, attention_mask, token_type_ids)` `[B, L]` -> `[B, L, ...]`, run under `torch.no_grad()`
        with the module in eval mode, once per stage; each example's unpadded `[len_i, ...]` rows are cached in memory
        for the stage. They are computed on private examples: never logged, saved or returned.
    logits: `(features [B, L, ...] right-padded, attention_mask [B, L]) -> [B, num_labels]`, under autograd; each
        example's logits must depend on its own rows only (per-example clipping assumes it).
    """

    module: nn.Module
    features: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prefix_plan(model, start: int) -> StagePlan:
    """The plan of a method that trains parameters inside the classifier: layers `0..start-1` are frozen and cached,
    autograd runs through layers `start..` and the head (`TextClassifier.classify`)."""
    return StagePlan(module=model,
                     features=lambda ids, mask, types: model.embed(ids, mask, types, num_layers=start),
                     logits=lambda states, mask: model.classify(states, mask, start_layer=start))


@dataclass(frozen=True, kw_only=True)
class Method:
    """A fine-tuning method.

    config: its frozen config dataclass, with a `name: Literal[...]` field (the registry key).
    trainable: `(model, config) -> first layer` sets `requires_grad` on what trains (the head always trains) and
        returns the index of the first encoder layer autograd must run through (the layers below are frozen and
        their outputs are cached once per stage; `num_layers` when autograd runs through none).
    prepare: `(model, config) -> model` builds the stage's model (e.g. adds adapters, or builds a side network);
        default: the model itself. Deterministic (the same model and config give the same weights: a resumed run
        prepares again and must find its checkpoint's starting point).
    merge: `(model, config) -> model` the model to save and export; default: the model itself.
    plan: `(prepared model, config) -> StagePlan` what the DP loop caches and runs (calls `trainable` itself);
        default: `prefix_plan` at the layer `trainable` returns.
    engines: the DP engine modes whose per-example clipping is exact for the parameters it trains.
    masks: whether pruning masks can be held through training and survive `merge` (adapters merged into masked
        weights would fill them in).
    """

    name: str
    config: type
    trainable: Callable[[Any, Any], int]
    prepare: Callable[[Any, Any], Any] = _same
    merge: Callable[[Any, Any], Any] = _same
    plan: Callable[[Any, Any], StagePlan] | None = None
    engines: tuple[str, ...] = ENGINES
    masks: bool = True


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
    """Apply the method `config` names to `model` (`Method.trainable`): returns the first layer autograd runs
    through."""
    return get_method(config.name).trainable(model, config)


def prepare(model, config):
    """The stage's model for the method `config` names (`Method.prepare`): call before `dp_train`."""
    return get_method(config.name).prepare(model, config)


def merge(model, config):
    """The trained stage model as the model to save and export (`Method.merge`): call after `dp_train`."""
    return get_method(config.name).merge(model, config)


def stage_plan(model, config) -> StagePlan:
    """Make the method's parameters trainable on the prepared `model` and say how `dp_train` runs it."""
    method = get_method(config.name)
    if method.plan is not None:
        return method.plan(model, config)
    return prefix_plan(model, method.trainable(model, config))


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


from compression.methods import bitfit, full, lora, reversible, side  # noqa: E402, F401  (importing registers them)

# a discriminated union over the registered methods' configs (built from the registry, hence typing.Union)
MethodConfig = Annotated[Union[tuple(m.config for m in METHODS.values())], Field(discriminator="name")]  # noqa: UP007
DEFAULT = full.FullConfig()
