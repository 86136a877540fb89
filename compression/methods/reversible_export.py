"""The portable half of `reversible`: the adapter module both training and exported folders use, and the exported
folder's remote-code class, which runs the stack layer by layer (forward only) inside the HF base model's own
forward. Not here: training (methods.reversible) and the generic export (compression.export)."""
from __future__ import annotations

import torch
from torch import nn

from compression.export import (
    PORTABLE,
    PORTABLE_CLASSES,
    DPCompressConfig,
    DPCompressForSequenceClassification,
    Portable,
    modeling_source,
)


class DPCompressAdapter(nn.Module):
    """Bottleneck adapter `up(gelu(down(x)))`."""

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)

    def forward(self, x):
        return self.up(nn.functional.gelu(self.down(x)))


class DPCompressReversibleLayer(nn.Module):
    """One pretrained layer of a reversible adapter stack (dpcompress `reversible`, after MEFT), for inference.

    Between the stack's layers the hidden states carry both streams, float64, concatenated on the last axis
    `[B, L, 2H]` as (x1, x2); the bottom layer reads `[B, L, H]` (both streams start equal), the top returns
    `[B, L, H]`.
    Layer: y1 = lambda_ * x1 + F(x2), y2 = beta * x2 + G(y1), F = the layer then a residual adapter, G an adapter
    (none on the top two layers); the next layer reads (y2, y1). The top returns F(x2).
    """

    def __init__(self, layer, *, hidden_size, bottleneck, lambda_, beta, bottom, top, has_g):
        super().__init__()
        self.layer, self.lambda_, self.beta, self.bottom, self.top = layer, lambda_, beta, bottom, top
        self.f = DPCompressAdapter(hidden_size, bottleneck)
        self.g = DPCompressAdapter(hidden_size, bottleneck) if has_g else None

    def forward(self, hidden_states, *args, **kwargs):
        dtype = self.f.up.weight.dtype
        if self.bottom:
            x1 = x2 = hidden_states.to(torch.float64)
        else:
            x1, x2 = hidden_states.chunk(2, dim=-1)
        out = self.layer(x2.to(dtype), *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        f = y + self.f(y)
        if self.top:
            result = f
        else:
            y1 = self.lambda_ * x1 + f.to(torch.float64)
            y2 = self.beta * x2 + (0.0 if self.g is None else self.g(y1.to(dtype)).to(torch.float64))
            result = torch.cat([y2, y1], dim=-1)
        return (result, *out[1:]) if isinstance(out, tuple) else result


class DPCompressReversibleConfig(DPCompressConfig):
    """DPCompressConfig plus `reversible`, the stack's spec (first_layer, bottleneck, lambda_, beta)."""

    model_type = "dpcompress_reversible"
    reversible: dict | None = None


class DPCompressReversibleForSequenceClassification(DPCompressForSequenceClassification):
    """The dpcompress classifier whose layers `config.reversible["first_layer"]..` are a reversible adapter stack
    (`config.reversible`: first_layer, bottleneck, lambda_, beta)."""

    config_class = DPCompressReversibleConfig

    def __init__(self, config):
        super().__init__(config)
        spec, layers = config.reversible, self.encoder
        for name in config.layers_path.split("."):
            layers = getattr(layers, name)
        first, hidden = spec["first_layer"], self.classifier.in_features
        size = len(layers) - first
        for k in range(size):
            layers[first + k] = DPCompressReversibleLayer(
                layers[first + k], hidden_size=hidden, bottleneck=spec["bottleneck"], lambda_=spec["lambda_"],
                beta=spec["beta"], bottom=k == 0, top=k == size - 1, has_g=k < size - 2)


def portable(model, state: dict[str, torch.Tensor]) -> Portable:
    """`compression.export.PORTABLE` for a `ReversibleClassifier`: the classes above, the stack's spec, and the plain
    weights with the stack's layers' moved under `.layer.` plus the adapters."""
    stack = model.stack
    first = stack.first_layer
    spec = {"first_layer": first, "bottleneck": stack.bottleneck, "lambda_": stack.lambda_, "beta": stack.beta}
    prefix, state = f"encoder.{model.family.layers_path}.", dict(state)
    for key in [k for k in state if k.startswith(prefix)]:
        index, _, rest = key[len(prefix):].partition(".")
        if int(index) >= first:
            state[f"{prefix}{index}.layer.{rest}"] = state.pop(key)
    for part, adapters in (("f", stack.f), ("g", stack.g)):
        for k, adapter in enumerate(adapters):
            state.update({f"{prefix}{first + k}.{part}.{n}": t for n, t in adapter.state_dict().items()})
    classes = (*PORTABLE_CLASSES, DPCompressAdapter, DPCompressReversibleLayer, DPCompressReversibleConfig,
               DPCompressReversibleForSequenceClassification)
    return Portable(DPCompressReversibleConfig, DPCompressReversibleForSequenceClassification,
                    modeling_source(classes), {"reversible": spec}, state)


PORTABLE["reversible"] = portable
