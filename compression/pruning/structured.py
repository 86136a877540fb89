"""Structured pruning of a BERT-style `TextClassifier`: score attention heads, FFN neurons and whole layers, and
remove them physically (smaller weight matrices, not masks), in rounds toward target kept fractions.

Scores cost no privacy: they read the (DP) weights, or gradients the caller has already privatised. Not here: the
DP fine-tuning between rounds (compression.train). Pure library: torch only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from compression.families import require_structured

if TYPE_CHECKING:
    from compression.models import TextClassifier

log = logging.getLogger(__name__)
ORIGINAL_LAYERS = "original_num_hidden_layers"  # encoder config attribute set by the first `remove_layers`
SCOPES = ("global", "layer")
DROP_LAYERS = ("score", "top")


@dataclass(frozen=True)
class UnitScores:
    """Importance (higher: keep) of the current units: `heads[i]` `[num_heads_i]`, `neurons[i]` `[ffn_i]`, and
    `layers` `[num_layers]`."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor


# --- scores --------------------------------------------------------------------------------------------------------

def _head_size(layer: nn.Module) -> int:
    return int(layer.attention.self.attention_head_size)


def _unit_sums(parts: list[tuple[nn.Linear, int]], values: Callable[[nn.Parameter], torch.Tensor],
               unit_size: int) -> torch.Tensor:
    """Sum of `values(weight)` over each unit's output rows (dim 0) or input columns (dim 1) of the `parts`."""
    total = 0.0
    for linear, dim in parts:
        per_index = values(linear.weight).sum(dim=1 - dim)  # one value per row (dim 0) or per column (dim 1)
        total = total + per_index.view(-1, unit_size).sum(1)
    return total


@torch.no_grad()
def _scores(model: TextClassifier, values: Callable[[nn.Parameter], torch.Tensor],
            finish: Callable[[torch.Tensor], torch.Tensor]) -> UnitScores:
    """`finish` of the per-unit sums of `values`; a layer's sum is the sum of its units' (which cover its weights)."""
    require_structured(model, "structured scores")
    heads, neurons, layers = [], [], []
    for layer in model.layers:
        attention = layer.attention
        head = _unit_sums([(attention.self.query, 0), (attention.self.key, 0), (attention.self.value, 0),
                           (attention.output.dense, 1)], values, _head_size(layer))
        neuron = _unit_sums([(layer.intermediate.dense, 0), (layer.output.dense, 1)], values, 1)
        heads.append(finish(head))
        neurons.append(finish(neuron))
        layers.append(finish(head.sum() + neuron.sum()))
    return UnitScores(heads=heads, neurons=neurons, layers=torch.stack(layers))


def magnitude_scores(model: TextClassifier, grads: Mapping[str, torch.Tensor] | None = None) -> UnitScores:
    """L2 norm of each unit's weights (biases not counted): a head's rows of query/key/value and columns of
    attention.output.dense; a neuron's row of intermediate.dense and column of output.dense; a layer's six Linear
    weights. Data-free: a function of the weights only. `grads` is ignored."""
    return _scores(model, lambda w: w.detach().float() ** 2, torch.sqrt)


def taylor_scores(model: TextClassifier, grads: Mapping[str, torch.Tensor] | None = None) -> UnitScores:
    """First-order Taylor importance: the sum of |w * g| over a unit's weights (the same weights as the magnitude
    score; a layer sums all of its six Linear weights).

    `grads` maps `model.named_parameters()` names to gradients the caller has already privatised, e.g. the noisy
    DP-SGD updates accumulated over the previous stage: the score is then post-processing of DP outputs and costs
    no privacy. Never pass clean or per-example gradients of private data.
    """
    if grads is None:
        raise ValueError("scorer 'taylor' needs grads: parameter name -> accumulated noisy (DP) gradient")
    by_id = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith(model.family.layer_prefix):
            if name not in grads:
                raise ValueError(f"scorer 'taylor': grads lacks {name!r} (every encoder layer weight is needed)")
            if tuple(grads[name].shape) != tuple(p.shape):
                raise ValueError(f"scorer 'taylor': grads[{name!r}] has shape {tuple(grads[name].shape)}, "
                                 f"the weight {tuple(p.shape)}")
            by_id[id(p)] = grads[name]
    return _scores(model, lambda w: (w.detach().float() * by_id[id(w)].to(w.device).float()).abs(), lambda s: s)


Scorer = Callable[..., UnitScores]  # (model, grads=None) -> UnitScores
SCORERS: dict[str, Scorer] = {"magnitude": magnitude_scores, "taylor": taylor_scores}


# --- physical removal ----------------------------------------------------------------------------------------------

def _keep(linear: nn.Linear, index: torch.Tensor, *, dim: int) -> None:
    """Keep the output rows (dim 0, with their bias entries) or input columns (dim 1) `index` of `linear`, in place."""
    index = index.to(linear.weight.device)
    with torch.no_grad():
        weight = linear.weight.index_select(dim, index).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def _kept(count: int, remove: Sequence[int], *, what: str) -> torch.Tensor:
    """Indices in 0..count-1 not in `remove`; ValueError for an index out of range or for removing all `count`."""
    remove = {int(i) for i in remove}
    bad = sorted(i for i in remove if not 0 <= i < count)
    if bad:
        raise ValueError(f"{what}: indices {bad} outside 0..{count - 1}")
    if len(remove) == count:
        raise ValueError(f"{what}: removing all {count} is refused (remove the whole layer with remove_layers)")
    return torch.tensor([i for i in range(count) if i not in remove], dtype=torch.long)


def _plan(model: TextClassifier, units: Mapping[int, Sequence[int]], count: Callable[[nn.Module], int],
          what: str) -> dict[int, torch.Tensor]:
    """Validate every layer's removal before any change, so a bad entry leaves the model untouched."""
    require_structured(model, f"removing {what}")
    bad = sorted(i for i in units if not 0 <= i < model.num_layers)
    if bad:
        raise ValueError(f"{what}: layer indices {bad} outside 0..{model.num_layers - 1}")
    return {i: _kept(count(model.layers[i]), remove, what=f"layer {i} {what}") for i, remove in units.items()}


def _num_heads(layer: nn.Module) -> int:
    return layer.attention.self.query.out_features // _head_size(layer)


def remove_heads(model: TextClassifier, heads: Mapping[int, Sequence[int]]) -> None:
    """Remove attention heads in place: `{layer index: [head indices]}`, indices into the layer's current heads.

    Query/key/value lose the heads' rows and bias entries, attention.output.dense their input columns; the
    attention module's `num_attention_heads` and `all_head_size` follow. Removing every head of a layer raises
    ValueError: remove the layer instead (`remove_layers`). Optimizers built before hold stale parameters.
    """
    for i, keep in _plan(model, heads, _num_heads, "heads").items():
        layer = model.layers[i]
        size = _head_size(layer)
        rows = (keep[:, None] * size + torch.arange(size)).flatten()
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            _keep(linear, rows, dim=0)
        _keep(layer.attention.output.dense, rows, dim=1)
        attention.num_attention_heads, attention.all_head_size = len(keep), len(keep) * size


def remove_neurons(model: TextClassifier, neurons: Mapping[int, Sequence[int]]) -> None:
    """Remove FFN neurons in place: `{layer index: [neuron indices]}`, indices into the layer's current FFN width.

    intermediate.dense loses the neurons' rows and bias entries, output.dense their input columns. Removing every
    neuron of a layer raises ValueError (remove the layer instead).
    """
    for i, keep in _plan(model, neurons, lambda layer: layer.intermediate.dense.out_features, "neurons").items():
        _keep(model.layers[i].intermediate.dense, keep, dim=0)
        _keep(model.layers[i].output.dense, keep, dim=1)


def remove_layers(model: TextClassifier, layers: Sequence[int]) -> None:
    """Remove whole encoder layers in place (indices into the current layers); at least one layer must remain.

    Sets the encoder config's `num_hidden_layers`, and on the first removal records the count before it as
    `original_num_hidden_layers` (the reference for `StructuredConfig.target_layers`).
    """
    keep = _kept(model.num_layers, layers, what="layers").tolist()
    config = model.encoder.config
    if not hasattr(config, ORIGINAL_LAYERS):
        setattr(config, ORIGINAL_LAYERS, model.num_layers)
    model.family.set_layers(model.encoder, [model.layers[i] for i in keep])


def layer_shapes(model: TextClassifier) -> list[dict[str, int]]:
    """Each layer's `{"num_heads": ..., "intermediate_size": ...}`, read from its weight shapes."""
    require_structured(model, "layer_shapes")
    return [{"num_heads": _num_heads(layer), "intermediate_size": layer.intermediate.dense.out_features}
            for layer in model.layers]


def shrink_to_shapes(model: TextClassifier, shapes: Sequence[Mapping[str, int]]) -> None:
    """Cut every layer down to `shapes` (as from `layer_shapes`) by dropping its last heads and neurons; used to
    rebuild a saved shrunken model before loading its weights. The layer count must already match."""
    if len(shapes) != model.num_layers:
        raise ValueError(f"layer_shapes has {len(shapes)} layers, the model {model.num_layers}")
    current = layer_shapes(model)
    for key, remove in (("num_heads", remove_heads), ("intermediate_size", remove_neurons)):
        if any(s[key] > c[key] for s, c in zip(shapes, current)):
            raise ValueError(f"layer_shapes {key} {[s[key] for s in shapes]} exceed the model's")
        remove(model, {i: range(s[key], c[key]) for i, (s, c) in enumerate(zip(shapes, current)) if s[key] < c[key]})


# --- rounds --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class StructuredConfig:
    """Structured pruning in `rounds` rounds. After the last one the model keeps `target_layers` of its original
    layers and, in each kept layer on average, `target_heads` of its original heads and `target_ffn` of its original
    FFN width. Round r keeps t ** (r / rounds) of each (equal steps in log kept fraction, as `PruneSchedule`)."""

    target_layers: float = 0.5   # kept fraction of the original layers (at least one layer stays)
    target_heads: float = 0.5    # kept fraction of the original heads per kept layer (at least one each)
    target_ffn: float = 0.5      # kept fraction of the original FFN width per kept layer (at least one neuron each)
    rounds: int = 2
    scorer: str = "magnitude"    # key of SCORERS; "taylor" needs privatised grads
    scope: Literal["global", "layer"] = "global"  # heads/neurons: one ranking over all layers, or equal per layer
    # which layers go: "score" the lowest-scoring, "top" the highest ones (data-free; the best of the layer-dropping
    # strategies in Sajjad et al., "On the effect of dropping layers of pre-trained transformer models", 2023)
    drop_layers: Literal["score", "top"] = "score"

    def __post_init__(self):
        for name in ("target_layers", "target_heads", "target_ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {self.scorer!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.drop_layers not in DROP_LAYERS:
            raise ValueError(f"drop_layers must be one of {DROP_LAYERS}, got {self.drop_layers!r}")

    def kept_after(self, round_index: int) -> dict[str, float]:
        """Kept fractions `{"layers", "heads", "ffn"}` after round `round_index` (1-based)."""
        step = round_index / self.rounds
        return {"layers": self.target_layers**step, "heads": self.target_heads**step, "ffn": self.target_ffn**step}


def round_targets(model: TextClassifier, config: StructuredConfig, round_index: int) -> dict[str, int]:
    """Counts after round `round_index`: `num_layers`, `heads_per_layer` and `ffn_per_layer` (in global scope, the
    per-layer average: the total is `num_layers` times it). The original shapes come from the encoder config."""
    encoder, kept = model.encoder.config, config.kept_after(round_index)
    original_layers = getattr(encoder, ORIGINAL_LAYERS, encoder.num_hidden_layers)
    return {"num_layers": max(1, round(original_layers * kept["layers"])),
            "heads_per_layer": max(1, round(encoder.num_attention_heads * kept["heads"])),
            "ffn_per_layer": max(1, round(encoder.intermediate_size * kept["ffn"]))}


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return torch.argsort(scores, stable=True)[:k].tolist() if k > 0 else []


def _choose(scores: list[torch.Tensor], per_layer: int, scope: str) -> dict[int, list[int]]:
    """Units to remove so that `per_layer` remain per layer (scope "layer") or `per_layer * len(scores)` in all
    (scope "global": lowest scores overall; each layer's best unit is protected, so every layer keeps one)."""
    if scope == "layer":
        return {i: _lowest(s, len(s) - per_layer) for i, s in enumerate(scores) if len(s) > per_layer}
    excess = sum(len(s) for s in scores) - per_layer * len(scores)
    protected = torch.cat([s.float().index_fill(0, s.argmax().view(1), float("inf")) for s in scores])
    layer_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    offset = torch.cat([torch.arange(len(s)) for s in scores])
    chosen: dict[int, list[int]] = {}
    for j in _lowest(protected, excess):
        chosen.setdefault(int(layer_of[j]), []).append(int(offset[j]))
    return chosen


def structured_round(model: TextClassifier, config: StructuredConfig, round_index: int,
                     grads: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Round `round_index` (1-based) of `config.rounds`, in place: score every unit once on the model as it enters
    (`config.scorer`; `grads` as `taylor_scores` takes them), remove the lowest-scoring layers (or the top ones:
    `drop_layers`), then the lowest-scoring heads and FFN neurons of the kept layers, down to `round_targets`.
    Units already gone are not restored: in global scope a later round may end above its head/FFN target if the
    layers it removes were the pruned ones. Returns a JSON-ready report (shapes, targets, parameter counts before
    and after)."""
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 1 <= round_index <= config.rounds:
        raise ValueError(f"round_index must be in 1..{config.rounds}, got {round_index!r}")
    before = sum(p.numel() for p in model.parameters())
    scores = SCORERS[config.scorer](model, grads)
    targets = round_targets(model, config, round_index)
    if config.drop_layers == "top":
        dropped = list(range(targets["num_layers"], model.num_layers))
    else:
        dropped = sorted(_lowest(scores.layers, model.num_layers - targets["num_layers"]))
    kept = [i for i in range(model.num_layers) if i not in dropped]
    if dropped:
        remove_layers(model, dropped)
    heads = _choose([scores.heads[i] for i in kept], targets["heads_per_layer"], config.scope)
    neurons = _choose([scores.neurons[i] for i in kept], targets["ffn_per_layer"], config.scope)
    remove_heads(model, heads)
    remove_neurons(model, neurons)
    shapes = layer_shapes(model)
    report = {"round": round_index, "rounds": config.rounds, "scorer": config.scorer, "scope": config.scope,
              "drop_layers": config.drop_layers,
              "targets": targets, "layers_removed": dropped, "layers_kept": kept, "num_layers": model.num_layers,
              "heads": [s["num_heads"] for s in shapes], "ffn": [s["intermediate_size"] for s in shapes],
              "parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters())}
    log.info("structured round %d/%d: layers %s, heads %s, ffn %s, parameters %d -> %d", round_index,
             config.rounds, kept, report["heads"], report["ffn"], before, report["parameters_after"])
    return report
