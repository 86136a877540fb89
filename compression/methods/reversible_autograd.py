"""The computation of a reversible adapter stack (after MEFT, Liao et al. 2023): two streams through the adapted layers,
a forward that keeps no intermediate activations, and a backward that reconstructs each layer's inputs from its outputs
and recomputes that one layer with autograd. Not here: the method's config and parameters (methods.reversible).

Layer n maps its inputs (x1, x2) to
    y1 = lambda_ * x1 + F_n(x2)      F_n = the frozen pretrained layer followed by a residual adapter
    y2 = beta * x2 + G_n(y1)         G_n = an adapter
and the next layer reads (y2, y1): the streams swap, so every F reads the pretrained path. The top layer is F alone on
x2 (its output is the stack's), so the layer below it needs no G either (its y2 only reaches the top's unread x1).
Inverse: x2 = (y2 - G_n(y1)) / beta, x1 = (y1 - F_n(x2)) / lambda_.

Precision: the division by a small lambda_ amplifies errors ~1/lambda_ per layer. The streams are held in float64
while the layers compute in the model's dtype, so F and G mostly read the forward's rounded inputs again and the
first inversions are exact to float64 rounding; once a float32 rounding in a layer flips, the error grows ~10x per
layer at lambda_ 0.1. The forward therefore stores the streams every `segment` layers, bounding the chain
(tests/test_compression_methods_reversible.py measures the error over MiniLM's depth).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

Layer = Callable[[torch.Tensor], torch.Tensor]  # a pretrained layer with its attention mask bound


@dataclass(frozen=True)
class Coupling:
    """One call's pieces: the pretrained layers (bottom first), the adapters of F (one per layer) and of G (one per
    layer but the top two), the scale factors and the dtypes."""

    layers: list[Layer]
    f_adapters: list[nn.Module]
    g_adapters: list[nn.Module]
    lambda_: float
    beta: float
    dtype: torch.dtype          # the layers' compute dtype
    stream_dtype: torch.dtype   # the two streams' dtype

    def f(self, n: int, x2: torch.Tensor) -> torch.Tensor:
        """F_n in the compute dtype: the pretrained layer, then the residual adapter."""
        y = self.layers[n](x2.to(self.dtype))
        return y + self.f_adapters[n](y)

    def g(self, n: int, y1: torch.Tensor) -> torch.Tensor:
        """G_n in the stream dtype (zero for the layer below the top)."""
        if n >= len(self.g_adapters):
            return torch.zeros_like(y1)
        return self.g_adapters[n](y1.to(self.dtype)).to(self.stream_dtype)

    def step(self, n: int, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer n (not the top): inputs (x1, x2) -> the next layer's inputs (y2, y1)."""
        y1 = self.lambda_ * x1 + self.f(n, x2).to(self.stream_dtype)
        y2 = self.beta * x2 + self.g(n, y1)
        return y2, y1


def run_streams(coupling: Coupling, hidden: torch.Tensor, *, keep: set[int] = frozenset(),
                rng_states: list | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple]]:
    """The streams (x1, x2) entering the top layer (both start as `hidden`), and those entering each layer in `keep`.
    `rng_states` collects the RNG state before each layer (dropout is replayed in the backward)."""
    x1 = x2 = hidden.to(coupling.stream_dtype)
    kept = {}
    for n in range(len(coupling.layers) - 1):
        if rng_states is not None:
            rng_states.append(_rng_state(hidden.device))
        if n in keep:
            kept[n] = (x1, x2)
        x1, x2 = coupling.step(n, x1, x2)
    if rng_states is not None:
        rng_states.append(_rng_state(hidden.device))
    return x1, x2, kept


def run(coupling: Coupling, hidden: torch.Tensor) -> torch.Tensor:
    """The stack's output with ordinary autograd (every activation stored): evaluation and the oracle of the tests."""
    _, x2, _ = run_streams(coupling, hidden)
    return coupling.f(len(coupling.layers) - 1, x2)


def kept_layers(num_layers: int, segment: int) -> set[int]:
    """Layers (of a stack of `num_layers`) whose input streams the forward stores, so that the backward reconstructs
    at most `segment` layers in a row below the top (0: none stored, memory constant in depth)."""
    top = num_layers - 1
    return set() if segment == 0 else {n for n in range(1, top) if (top - n) % segment == 0}


def invert(coupling: Coupling, n: int, y1: torch.Tensor, y2: torch.Tensor, *, rng_state=None,
           graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Layer n's inputs (x1, x2) from its outputs (y1, y2); with `graph`, also the recomputed (y1 leaf, G_n(y1),
    x2 leaf, F_n(x2)) for the backward through the layer."""
    with torch.set_grad_enabled(graph):
        y1_leaf = y1.detach().requires_grad_(graph)
        g = coupling.g(n, y1_leaf)
    x2 = (y2 - g.detach()) / coupling.beta
    with _replay(rng_state, y1.device), torch.set_grad_enabled(graph):
        x2_leaf = x2.detach().requires_grad_(graph)
        f = coupling.f(n, x2_leaf).to(coupling.stream_dtype)
    x1 = (y1 - f.detach()) / coupling.lambda_
    return x1, x2, (y1_leaf, g, x2_leaf, f)


class ReversibleFunction(torch.autograd.Function):
    """The stack as one autograd node: saves only the two streams entering the top layer (and the RNG states), and
    in the backward walks down the layers, reconstructing and recomputing one layer at a time.

    `params` (every trainable parameter the stack reads) get their gradients from the recomputed layers' own
    backward, run inside this one: the DP engines' per-example machinery sees it (book-keeping's output-gradient taps
    fire then, once per layer use; Opacus' hooks see the recomputed activations).
    """

    @staticmethod
    def forward(ctx, coupling: Coupling, segment: int, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        states: list = []
        x1, x2, kept = run_streams(coupling, hidden, keep=kept_layers(len(coupling.layers), segment),
                                   rng_states=states)
        out = coupling.f(len(coupling.layers) - 1, x2)
        ctx.coupling, ctx.states, ctx.params, ctx.kept = coupling, states, params, sorted(kept)
        ctx.save_for_backward(x1, x2, *(x for n in sorted(kept) for x in kept[n]))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        coupling, states = ctx.coupling, ctx.states
        x1, x2, *saved = ctx.saved_tensors
        kept = {n: (saved[2 * i], saved[2 * i + 1]) for i, n in enumerate(ctx.kept)}
        sums: list = [None] * len(ctx.params)
        with _replay(states[-1], x2.device), torch.enable_grad():
            x2_leaf = x2.detach().requires_grad_()
            out = coupling.f(len(coupling.layers) - 1, x2_leaf)
        dx1, dx2 = torch.zeros_like(x1), _pull(out, grad_out, x2_leaf, ctx.params, sums)  # the top reads x2 only
        for n in reversed(range(len(coupling.layers) - 1)):
            x1, x2 = kept.get(n + 1, (x1, x2))  # stored inputs replace the reconstructed ones
            # this layer's outputs are the inputs above it, swapped: (y1, y2) = (x2, x1)
            x1, x2, (y1_leaf, g, x2_leaf, f) = invert(coupling, n, x2, x1, rng_state=states[n], graph=True)
            dy1, dy2 = dx2, dx1
            if g.requires_grad:
                dy1 = dy1 + _pull(g, dy2, y1_leaf, ctx.params, sums)
            dx1, dx2 = coupling.lambda_ * dy1, coupling.beta * dy2 + _pull(f, dy1, x2_leaf, ctx.params, sums)
        grad_hidden = (dx1 + dx2).to(grad_out.dtype) if ctx.needs_input_grad[2] else None
        return None, None, grad_hidden, *sums


def _pull(out: torch.Tensor, grad: torch.Tensor, leaf: torch.Tensor, params, sums: list) -> torch.Tensor:
    """Backpropagate `grad` from `out` (one recomputed F or G): the gradient of `leaf`, its input; the parameters'
    are added to `sums`."""
    grads = torch.autograd.grad(out, [leaf, *params], grad, allow_unused=True)
    for i, g in enumerate(grads[1:]):
        if g is not None:
            sums[i] = g if sums[i] is None else sums[i] + g
    return grads[0]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replay(state, device: torch.device) -> Iterator[None]:
    """Run with the global RNG at `state` (dropout draws the forward's masks again), restoring it afterwards."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
