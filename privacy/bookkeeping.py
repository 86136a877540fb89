"""Book-keeping per-example clipping (Bu et al. 2023): one backward records layer inputs and output gradients, giving
per-example norms and the clipped sum (no second backward). Assumes batch-first rows whose losses depend on their own
row only (padding then gets zero gradient), modules of `bk_layers.RULES` called once per forward, and every trainable
parameter used only through its module's forward (checked after each backward: a bare functional use would escape the
clipping, opacus #820). No noise here."""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Literal

import torch
from torch import nn

from privacy.bookkeeping_layers import RULES, GramCache, Rule, trainable_param

log = logging.getLogger(__name__)


class _OutputGradientTap(torch.autograd.Function):
    """Identity on a layer's output that hands the output gradient to `on_grad`.

    The layer ran with detached parameters, so autograd computes no parameter gradients; the trainable
    parameters are inputs here only so that the output requires grad even when the layer's input does not.
    """

    @staticmethod
    def forward(ctx, on_grad, out, *params):
        ctx.on_grad, ctx.num_params = on_grad, len(params)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_grad(grad)
        return None, grad if ctx.needs_input_grad[1] else None, *([None] * ctx.num_params)


def _supported_layers(module: nn.Module) -> list[tuple[str, nn.Module, Rule]]:
    """Modules with trainable parameters, each with its rule; a clear error for anything book-keeping cannot clip."""
    layers, owners = [], {}
    for name, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = RULES.get(type(sub))
        if rule is None:
            raise ValueError(f"book-keeping cannot clip trainable parameter {name}.{own[0][0]} of unsupported "
                             f"module type "
                             f"{type(sub).__name__}; supported: {sorted(t.__name__ for t in RULES)} "
                             "(freeze it with requires_grad_(False) or use mode='hooks')")
        for n, p in own:
            if n not in rule.params:
                raise ValueError(f"book-keeping does not know parameter {name}.{n} of {type(sub).__name__}")
            if p in owners:
                raise ValueError(f"book-keeping does not support shared parameters: {name}.{n} is also {owners[p]}")
            owners[p] = f"{name}.{n}"
        if "forward" in sub.__dict__:
            raise ValueError(f"{name} already has an instance-level forward (is another engine attached?)")
        layers.append((name, sub, rule))
    return layers


class BookKeeping:
    """Per-example clipping for `module` by book-keeping; `backward` per physical chunk adds its clipped sum.

    Args:
        max_grad_norm: the bound C on each example's gradient norm (all trainable parameters together).
        clipping: "flat" clips each example's whole gradient to C; "per_layer" clips each parameter tensor's
            part to C / sqrt(L) for L trainable parameter tensors (as Opacus per-layer clipping), so the
            whole gradient still has norm <= C.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, clipping: Literal["flat", "per_layer"] = "flat"):
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        self.module, self.max_grad_norm, self.clipping = module, max_grad_norm, clipping
        self._layers = _supported_layers(module)
        self.params = [p for _, sub, rule in self._layers for n in rule.params
                       if (p := trainable_param(sub, n)) is not None]
        if not self.params:
            raise ValueError("book-keeping found no trainable parameters in the module")
        self.layer_bound = max_grad_norm / math.sqrt(len(self.params)) if clipping == "per_layer" else max_grad_norm
        self._captures: list = []
        self._captured: set[int] = set()
        self._grams = GramCache()
        self._summed: dict[nn.Parameter, torch.Tensor] = {}
        self._last_norms = torch.zeros(0)
        self._names = {p: f"{name}.{n}" for name, sub, rule in self._layers for n in rule.params
                       if (p := trainable_param(sub, n)) is not None}
        # the layers run with detached parameters: autograd reaching a parameter itself means a use outside them
        self._direct: set[str] = set()
        self._direct_hooks = [p.register_hook(partial(self._direct_use, self._names[p])) for p in self.params]
        for _, sub, rule in self._layers:
            sub.forward = partial(self._forward, sub, rule)
        log.debug("book-keeping attached to %d layers, %d parameter tensors", len(self._layers), len(self.params))

    def _forward(self, sub: nn.Module, rule: Rule, x: torch.Tensor) -> torch.Tensor:
        out = rule.forward(sub, x)
        if not torch.is_grad_enabled():
            return out
        params = [p for n in rule.params if (p := trainable_param(sub, n)) is not None]
        return _OutputGradientTap.apply(partial(self._capture, sub, rule, x, x._version), out, *params)

    def _capture(self, sub: nn.Module, rule: Rule, x: torch.Tensor, version: int, grad: torch.Tensor) -> None:
        if x._version != version:  # autograd checks its saved tensors; this input is held by book-keeping instead
            raise RuntimeError(f"book-keeping: the input of a {type(sub).__name__} was modified in place after the "
                               "forward")
        if id(sub) in self._captured:
            raise RuntimeError(f"book-keeping: {type(sub).__name__} ran more than once in one forward (shared layers "
                               "are "
                               "not supported: per-example gradients of the uses would have to be summed first)")
        self._captured.add(id(sub))
        self._captures.append(rule.capture(sub, x, grad, self._grams))

    def _direct_use(self, name: str, grad: torch.Tensor | None) -> None:
        if grad is not None:  # the taps hand their parameters None: autograd still calls the hook
            self._direct.add(name)

    def backward(self, loss_per_example: torch.Tensor) -> None:
        """One backward pass for the chunk; clip each example and add the chunk's clipped sum to the logical batch.

        Raises RuntimeError, before anything is added, if a trainable parameter was used outside the forward of its
        module (its gradient would escape the clipping) or has no per-example quantities from this backward."""
        self._captures, self._captured, self._direct = [], set(), set()
        try:
            if loss_per_example.requires_grad:
                loss_per_example.sum().backward()
        finally:
            self._grams.clear()
        captures, self._captures = self._captures, []
        sq_norms = {p: sq for cap in captures for p, sq in cap.sq_norms.items()}
        batch = len(loss_per_example)
        if batch:
            self._check_covered(sq_norms)
        total = loss_per_example.new_zeros(batch)
        for p, sq in sq_norms.items():
            if sq.shape != (batch,):  # a [1] norm would silently broadcast one example's norm to the whole chunk
                raise RuntimeError(f"book-keeping: a per-example norm of shape {tuple(sq.shape)} for a parameter of "
                                   f"shape "
                                   f"{tuple(p.shape)}; expected [{batch}] (one per example)")
            total = total + sq.detach().to(total)
        self._last_norms = total.sqrt()
        factors = self._clip_factors(sq_norms)
        with torch.no_grad():
            for cap in captures:
                for p, grad in cap.clipped_sums(factors).items():
                    self._summed[p] = self._summed[p] + grad if p in self._summed else grad

    def _check_covered(self, sq_norms: dict[nn.Parameter, torch.Tensor]) -> None:
        """Every trainable parameter's gradient came through the taps, as per-example quantities."""
        if self._direct:
            raise RuntimeError(f"book-keeping: trainable parameter {sorted(self._direct)[0]} was used outside the "
                               "forward of its module (e.g. a bare torch.nn.functional call): that use's gradient "
                               "would be neither clipped nor noised per example. Call the module itself, or freeze the "
                               "parameter")
        if missing := [name for p, name in self._names.items() if p not in sq_norms]:
            raise RuntimeError(f"book-keeping: trainable parameter {missing[0]} got no per-example gradient in this "
                               f"backward ({len(missing)} such): its module did not run on the chunk's examples (a "
                               "parameter used only through a bare functional call, or not used). Freeze what does "
                               "not train")

    def _clip_factors(self, sq_norms: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        if self.clipping == "per_layer":
            return {p: (self.layer_bound / (sq.sqrt() + 1e-6)).clamp(max=1.0) for p, sq in sq_norms.items()}
        factor = (self.max_grad_norm / (self._last_norms + 1e-6)).clamp(max=1.0)  # as Opacus
        return dict.fromkeys(sq_norms, factor)

    def per_example_norms(self) -> torch.Tensor:
        """Unclipped gradient norms (all trainable parameters) of the last chunk; never log them."""
        return self._last_norms

    def pop_clipped_sum(self) -> dict[nn.Parameter, torch.Tensor]:
        """The clipped sum over the chunks since the last call (zeros for parameters no example touched)."""
        summed, self._summed = self._summed, {}
        return {p: summed[p] if p in summed else torch.zeros_like(p) for p in self.params}

    def close(self) -> None:
        """Restore the modules' own forwards and drop accumulated state."""
        for _, sub, _ in self._layers:
            sub.__dict__.pop("forward", None)
        for hook in self._direct_hooks:
            hook.remove()
        self._summed, self._captures, self._direct_hooks = {}, [], []
