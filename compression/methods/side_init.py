"""The side network's shape and its initialisation from the backbone by structured pruning (as Ladder-Side-Tuning,
Sung et al. 2022): one r-fold smaller set of hidden dimensions for the whole residual stream, and in each layer the
r-fold smaller sets of query/key and value dimensions per head and of FFN neurons, each the largest by weight
magnitude (L2); every matrix is sliced to them. Data-free: a function of the weights only. BERT-like layers.
"""
from __future__ import annotations

import torch
from torch import nn

from compression.families import require_structured
from compression.pruning.structured import magnitude_scores


def side_spec(model, *, reduction: int, drop_layers: tuple[int, ...], temperature: float,
              attention_dropout: float = 0.0) -> dict:
    """The `LadderSide` spec for `model` (a BERT-like `TextClassifier` with uniform layers): widths divided by
    `reduction` (each head's by it, rounded down, at least 1; the head count kept), no side layer for the backbone
    layers in `drop_layers`."""
    require_structured(model, "method 'side'")
    config = model.encoder.config
    heads, head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(model.layers):
        if layer.attention.self.query.out_features != config.hidden_size or \
                layer.intermediate.dense.out_features != config.intermediate_size:
            raise ValueError(f"method 'side' needs a backbone with uniform layers; layer {index} is pruned")
    bad = sorted(i for i in drop_layers if not 0 <= i < model.num_layers)
    if bad:
        raise ValueError(f"drop_layers {bad} outside 0..{model.num_layers - 1}")
    kept = [i for i in range(model.num_layers) if i not in set(drop_layers)]
    if not kept:
        raise ValueError("drop_layers removes every side layer; keep at least one")
    return {"reduction": reduction, "backbone_hidden_size": config.hidden_size,
            "hidden_size": heads * max(1, head_size // reduction),
            "intermediate_size": max(1, config.intermediate_size // reduction), "layers": kept,
            "temperature": temperature, "attention_dropout": attention_dropout}


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, in increasing index order (all of them: the identity)."""
    return torch.argsort(scores, descending=True, stable=True)[:count].sort().values


def _per_head(scores: torch.Tensor, head_size: int, count: int) -> torch.Tensor:
    """The `count` largest of each head's `head_size` scores, as indices into the concatenated heads."""
    heads = scores.view(-1, head_size)
    return torch.cat([_top(s, count) + h * head_size for h, s in enumerate(heads)])


def hidden_scores(model, layers: list[int]) -> torch.Tensor:
    """L2 norm, per hidden dimension, of the weights of `layers` that read it (columns of query, key, value and
    intermediate.dense) or write it (rows of attention.output.dense and output.dense)."""
    total = 0.0
    for layer in (model.layers[i] for i in layers):
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value, layer.intermediate.dense):
            total = total + linear.weight.detach().float().pow(2).sum(0)
        for linear in (layer.attention.output.dense, layer.output.dense):
            total = total + linear.weight.detach().float().pow(2).sum(1)
    return total.sqrt()


@torch.no_grad()
def _copy(target: nn.Module, source: nn.Module, rows: torch.Tensor, columns: torch.Tensor | None = None) -> None:
    """target's weight (and bias) = source's, rows `rows` (and columns `columns` of a 2-D weight)."""
    weight = source.weight.detach()[rows]
    target.weight.copy_(weight if columns is None else weight[:, columns])
    if source.bias is not None:
        target.bias.copy_(source.bias.detach()[rows])


def _init_layer(side_layer: nn.Module, layer: nn.Module, hidden: torch.Tensor, *, head_size: int, side_head: int,
                neurons: torch.Tensor) -> None:
    """Slice one backbone layer into its side copy: hidden dims `hidden`, per-head dims, FFN neurons `neurons`."""
    attention, side = layer.attention.self, side_layer.attention.self
    query_key = _per_head(attention.query.weight.detach().float().pow(2).sum(1)
                          + attention.key.weight.detach().float().pow(2).sum(1), head_size, side_head)
    value = _per_head(attention.value.weight.detach().float().pow(2).sum(1)
                      + layer.attention.output.dense.weight.detach().float().pow(2).sum(0), head_size, side_head)
    _copy(side.query, attention.query, query_key, hidden)
    _copy(side.key, attention.key, query_key, hidden)
    _copy(side.value, attention.value, value, hidden)
    _copy(side_layer.attention.output.dense, layer.attention.output.dense, hidden, value)
    _copy(side_layer.attention.output.LayerNorm, layer.attention.output.LayerNorm, hidden)
    _copy(side_layer.intermediate.dense, layer.intermediate.dense, neurons, hidden)
    _copy(side_layer.output.dense, layer.output.dense, hidden, neurons)
    _copy(side_layer.output.LayerNorm, layer.output.LayerNorm, hidden)


@torch.no_grad()
def init_from_backbone(side, model, head: nn.Linear) -> torch.Tensor:
    """Initialise `side` (a `LadderSide` of `side_spec(model, ...)`) and the side `head` from `model` by structured
    pruning: layers sliced, down-projections selecting the kept hidden dimensions, the head reading them. Returns the
    kept hidden dimensions. With reduction 1 and no dropped layer the side network reproduces the backbone."""
    spec, config = side.spec, model.encoder.config
    head_size = config.hidden_size // config.num_attention_heads
    side_head = spec["hidden_size"] // config.num_attention_heads
    hidden = _top(hidden_scores(model, spec["layers"]), spec["hidden_size"])
    neurons = magnitude_scores(model).neurons
    for side_layer, i in zip(side.layers, spec["layers"]):
        _init_layer(side_layer, model.layers[i], hidden, head_size=head_size, side_head=side_head,
                    neurons=_top(neurons[i], spec["intermediate_size"]))
    for down in side.downs:
        down.weight.zero_()
        down.weight[torch.arange(len(hidden)), hidden] = 1.0
        down.bias.zero_()
    _copy(head, model.head, torch.arange(model.num_labels), hidden)
    return hidden
