"""`reversible`: reversible adapters after MEFT (Liao et al. 2023, "Make Pre-trained Model Reversible"), the
activation-memory half of DP-MemArc. The top `layers` pretrained layers become a two-stream reversible stack (the math
and the recomputing backward are in reversible_autograd.py); only the adapters and the head train, and training keeps
no per-layer activations: the backward reconstructs each layer's inputs from its outputs. `prepare` returns a
`ReversibleClassifier` (the model's encoder and head, shared, plus the stack); there is nothing to merge: it is saved
(`save_parts`) and exported (reversible_export.py) with its stack.

Starting point: MEFT initialises adapter weights from N(0, 0.02^2) (zero biases), so every adapter starts near zero
and F starts near the pretrained layer; the stale stream enters the pretrained path scaled by `lambda_`, which keeps
the network near the pretrained function for small `lambda_` (the top layer reads the pretrained path alone). Exact
only for `layers: 1`; the reconstruction divides by `lambda_`, hence the float64 streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from compression.methods import Layers, Method, first_trainable_layer, register_method
from compression.methods.reversible_autograd import Coupling, ReversibleFunction, run
from compression.methods.reversible_export import DPCompressAdapter as Adapter
from compression.models import SAVED_KINDS, TextClassifier

_STACK_FILE = "reversible_stack.pt"


@dataclass(frozen=True, kw_only=True)
class ReversibleConfig:
    """`layers`: how many top layers become reversible (at least 1, or "all"); `bottleneck`: the adapters' width;
    `lambda_`, `beta`: the scale factors of the stale stream and of the pretrained stream (both > 0); `init_std`:
    the adapters' initial weight std (MEFT: 0.02); `seed`: their initialisation (a generator of its own);
    `segment`: the backward reconstructs at most this many layers in a row (the forward stores the two streams
    every `segment` layers): the reconstruction error grows ~10x per layer at lambda_ 0.1 in float32 (measured in
    tests/test_compression_methods_reversible.py); 0 stores none (memory constant in depth)."""

    name: Literal["reversible"] = "reversible"
    layers: Layers = "all"
    bottleneck: int = 32
    lambda_: float = 0.1
    beta: float = 1.0
    init_std: float = 0.02
    seed: int = 0
    segment: int = 3

    def __post_init__(self):
        if self.layers != "all" and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                     or self.layers < 1):
            raise ValueError(f"reversible: layers must be an integer >= 1 or 'all', got {self.layers!r}")
        if self.bottleneck < 1 or self.lambda_ <= 0 or self.beta <= 0 or self.init_std < 0 or self.segment < 0:
            raise ValueError(f"reversible: need bottleneck >= 1, lambda_ > 0, beta > 0, init_std >= 0 and segment >= 0,"
                             f" got {self.bottleneck}, {self.lambda_}, {self.beta}, {self.init_std}, {self.segment}")


class ReversibleStack(nn.Module):
    """The adapters of layers `first_layer..num_layers - 1` and the scale factors; runs those layers of a
    `TextClassifier` as a reversible stack (`ReversibleClassifier.stack`).

    `recompute` False runs the same function with ordinary autograd (every activation stored: the tests' oracle);
    `stream_dtype` is the streams' dtype (float64: see reversible_autograd)."""

    stream_dtype = torch.float64

    def __init__(self, *, hidden_size: int, first_layer: int, num_layers: int, bottleneck: int, lambda_: float,
                 beta: float, segment: int = 0):
        super().__init__()
        size = num_layers - first_layer
        if size < 1:
            raise ValueError(f"reversible: no layers from {first_layer} in a model of {num_layers}")
        self.first_layer, self.num_layers, self.bottleneck = first_layer, num_layers, bottleneck
        self.lambda_, self.beta, self.segment, self.recompute = lambda_, beta, segment, True
        self.f = nn.ModuleList(Adapter(hidden_size, bottleneck) for _ in range(size))
        # G of every layer but the top two (their y2 reaches no output: reversible_autograd)
        self.g = nn.ModuleList(Adapter(hidden_size, bottleneck) for _ in range(size - 2))

    def spec(self) -> dict:
        """JSON-ready: what builds this stack again (classifier.json's `parts` of a saved reversible model)."""
        return {"first_layer": self.first_layer, "num_layers": self.num_layers, "bottleneck": self.bottleneck,
                "lambda_": self.lambda_, "beta": self.beta, "segment": self.segment}

    def coupling(self, model: TextClassifier, mask, dtype: torch.dtype) -> Coupling:
        run_layer = model.family.run_layer
        layers = [lambda x, layer=layer: run_layer(layer, x, mask) for layer in model.layers[self.first_layer:]]
        return Coupling(layers=layers, f_adapters=list(self.f), g_adapters=list(self.g), lambda_=self.lambda_,
                        beta=self.beta, dtype=dtype, stream_dtype=self.stream_dtype)

    def forward(self, model: TextClassifier, hidden: torch.Tensor, mask) -> torch.Tensor:
        """Layers `first_layer..` of `model` on `hidden` `[B, L, H]`, `mask` as the family's layers take it."""
        coupling = self.coupling(model, mask, hidden.dtype)
        params = [p for m in (self, *model.layers[self.first_layer:]) for p in m.parameters() if p.requires_grad]
        if self.recompute and torch.is_grad_enabled() and (hidden.requires_grad or params):
            return ReversibleFunction.apply(coupling, self.segment, hidden, *params)
        return run(coupling, hidden)


class ReversibleClassifier(TextClassifier):
    """A `TextClassifier` whose layers `stack.first_layer..` run as a reversible adapter stack (`stack`); the layers
    below run as usual, so `dp_train` caches them. Saved with its stack (`save_parts`), exported by
    reversible_export.py."""

    kind = "reversible"

    def __init__(self, encoder, *, stack: ReversibleStack, num_labels: int, pooling: str | None = None,
                 dropout: float = 0.1):
        super().__init__(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout)
        if stack.num_layers != self.num_layers:
            raise ValueError(f"a reversible stack for {stack.num_layers} layers on a model of {self.num_layers}")
        self.stack = stack

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return hidden
        split = min(stop, self.stack.first_layer)
        if start > split or split < stop < self.num_layers:
            raise ValueError(f"layers {start}..{stop} cut into the reversible stack of layers "
                             f"{self.stack.first_layer}..{self.num_layers - 1}, which runs whole")
        hidden = super().run_layers(hidden, attention_mask, start=start, stop=split)
        if split == stop:
            return hidden
        return self.stack(self, hidden, self.family.attention_mask(self.encoder, hidden, attention_mask))

    def save_parts(self, directory: Path) -> dict:
        torch.save(self.stack.state_dict(), directory / _STACK_FILE)
        return {"kind": self.kind, "parts": self.stack.spec()}


def _classifier(model: TextClassifier, spec: dict) -> ReversibleClassifier:
    """`model`'s encoder and head (shared, not copied) with a new stack of `spec` (weights as its modules draw them,
    from a fork of the global RNG: left untouched)."""
    weight = model.head.weight
    with torch.random.fork_rng(devices=[]):
        stack = ReversibleStack(hidden_size=model.encoder.config.hidden_size, **spec).to(weight)
        out = ReversibleClassifier(model.encoder, stack=stack, num_labels=model.num_labels, pooling=model.pooling,
                                   dropout=model.dropout.p)
    out.head = model.head
    return out.train(model.training)


def _load_saved(model: TextClassifier, spec: dict, directory: Path) -> ReversibleClassifier:
    out = _classifier(model, spec)
    out.stack.load_state_dict(torch.load(directory / _STACK_FILE, weights_only=True))
    return out.eval()


SAVED_KINDS["reversible"] = _load_saved


def _prepare(model: TextClassifier, config: ReversibleConfig) -> ReversibleClassifier:
    """A reversible model over `model`'s top `config.layers` layers (its encoder and head shared), adapters drawn
    from `config.seed`; a reversible model (an earlier stage's) is returned as it is, with the configured
    `segment` (which changes memory only), if its stack is the configured one."""
    spec = {"first_layer": first_trainable_layer(model, config.layers), "num_layers": model.num_layers,
            "bottleneck": config.bottleneck, "lambda_": config.lambda_, "beta": config.beta,
            "segment": config.segment}
    if isinstance(model, ReversibleClassifier):
        if {**model.stack.spec(), "segment": config.segment} != spec:
            raise ValueError(f"the model already has a stack {model.stack.spec()}, not the configured {spec}")
        model.stack.segment = config.segment
        return model
    out = _classifier(model, spec)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for adapter in (*out.stack.f, *out.stack.g):
            for linear in (adapter.down, adapter.up):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * config.init_std)
                linear.bias.zero_()
    return out


def _trainable(model: TextClassifier, config: ReversibleConfig) -> int:
    """Freeze everything but the stack's adapters and the head; autograd starts at the stack's first layer."""
    if not isinstance(model, ReversibleClassifier):
        raise ValueError("reversible: the model has no reversible stack; call compression.methods.prepare(model, "
                         "config) first")
    for p in model.parameters():
        p.requires_grad_(False)
    model.stack.requires_grad_(True)
    model.head.requires_grad_(True)
    return model.stack.first_layer


# Every engine clips exactly: book-keeping's taps fire in the recomputing backward, Opacus' hooks and ghost clipping
# see the recomputed activations (tests/test_compression_methods_reversible.py: each against the microbatch oracle).
# Nothing to merge: the stack is saved and exported as it is.
register_method(Method(name="reversible", config=ReversibleConfig, trainable=_trainable, prepare=_prepare))
