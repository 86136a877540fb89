"""The vendor of a split fine-tuning: the public model's blocks above the split, what it trains there (adapter.py)
and, in the standard split, the head. It sees only the bytes of `Crossing`s and `Gradient`s and answers `Reply`s.
Plain optimisation on privatized representations (the privacy is the customer's local d_chi noise, not DP-SGD).
Not here: the transport (transport.py) or the customer's loop (training.py).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from compression.losses import task_loss
from compression.methods import merge
from compression.models import TextClassifier
from compression.split.adapter import VENDOR_LORA, VENDOR_METHODS, prepare_vendor, vendor_config
from compression.split.crossing import Crossing, Gradient, Reply, from_bytes, to_bytes

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True, kw_only=True)
class VendorConfig:
    """method: what trains above the split, a config of the compression.methods registry (adapter.VENDOR_METHODS;
    default `VENDOR_LORA`: LoRA on every linear map of the vendor's blocks), applied to the blocks above the split
    only. learning_rate: those parameters'; head_learning_rate: the head's (standard split). optimizer: "adamw" or
    "sgd" (with `momentum`). seed: dropout (the vendor's own randomness, not private)."""

    method: object = field(default_factory=lambda: VENDOR_LORA)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if getattr(self.method, "name", None) not in VENDOR_METHODS:
            raise ValueError(f"method must be a config of one of {VENDOR_METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.learning_rate > 0 and self.head_learning_rate > 0):
            raise ValueError("learning rates must be > 0")


class Vendor:
    """Serves routes over bytes: "train" (standard split: a labelled Crossing -> one optimiser step, Reply(loss)),
    "eval" (Crossing -> Reply(logits)); U-shaped split (`u_shaped`, the head stays with the customer): "forward"
    (Crossing -> Reply(features), graph kept), "backward" (Gradient -> one step), "features" (evaluation).
    on_receive(route, payload): called with every message as received (tests assert what the vendor saw)."""

    def __init__(self, model: TextClassifier, *, split_layer: int, config: VendorConfig, u_shaped: bool = False,
                 on_receive: Callable[[str, bytes], None] | None = None):
        self.split_layer, self.config, self.u_shaped, self.on_receive = split_layer, config, u_shaped, on_receive
        self.model, params = prepare_vendor(copy.deepcopy(model), split_layer=split_layer, method=config.method)
        head = {id(p) for p in self.model.head.parameters()}
        if u_shaped:
            self.model.head = None
        groups = [{"params": [p for p in params if id(p) not in head], "lr": config.learning_rate}]
        if not u_shaped:
            groups.append({"params": [p for p in params if id(p) in head], "lr": config.head_learning_rate})
        extra = {"momentum": config.momentum} if config.optimizer == "sgd" else {}
        self.optimizer = OPTIMIZERS[config.optimizer]([g for g in groups if g["params"]],
                                                      weight_decay=config.weight_decay, **extra)
        self.loss = task_loss(self.model.num_labels)
        self.num_steps, self._pending = 0, None
        torch.manual_seed(config.seed)
        self.model.train()
        routes = {"forward": self._forward, "backward": self._backward, "features": self._features} if u_shaped \
            else {"train": self._train, "eval": self._eval}
        self.routes: dict[str, Callable[[bytes], bytes]] = routes

    def handle(self, route: str, payload: bytes) -> bytes:
        """Answer one message; KeyError for a route this vendor does not serve."""
        if route not in self.routes:
            raise KeyError(f"unknown route {route!r}; served: {sorted(self.routes)}")
        if self.on_receive is not None:
            self.on_receive(route, payload)
        return to_bytes(self.routes[route](payload))

    def _run(self, crossing: Crossing) -> torch.Tensor:
        hidden, mask = crossing.hidden, crossing.attention_mask.long()
        return self.model.pool(hidden, mask, start_layer=self.split_layer)

    def _step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1

    def _train(self, payload: bytes) -> Reply:
        crossing = from_bytes(payload, expect=Crossing)
        if crossing.labels is None:
            raise ValueError("a training Crossing needs labels in the standard split")
        logits = self.model.head(self.model.dropout(self._run(crossing)))
        loss = self.loss(logits, crossing.labels, None).mean()
        loss.backward()
        self._step()
        return Reply(loss=loss.detach().float())

    @torch.no_grad()
    def _eval(self, payload: bytes) -> Reply:
        crossing = from_bytes(payload, expect=Crossing)
        self.model.eval()
        try:
            logits = self.model.head(self._run(crossing))
        finally:
            self.model.train()
        return Reply(logits=logits.float())

    def _forward(self, payload: bytes) -> Reply:
        features = self._run(from_bytes(payload, expect=Crossing))
        self._pending = features
        return Reply(features=features.detach().float())

    def _backward(self, payload: bytes) -> Reply:
        if self._pending is None:
            raise RuntimeError("backward without a pending forward")
        gradient = from_bytes(payload, expect=Gradient).features
        self._pending.backward(gradient.to(self._pending.dtype))
        self._pending = None
        self._step()
        return Reply()

    @torch.no_grad()
    def _features(self, payload: bytes) -> Reply:
        self.model.eval()
        try:
            return Reply(features=self._run(from_bytes(payload, expect=Crossing)).float())
        finally:
            self.model.train()

    def export(self) -> TextClassifier:
        """The vendor's fine-tuned model as plain weights (adapters merged); in the U-shaped split it has no head."""
        method = vendor_config(self.config.method, num_layers=self.model.num_layers, split_layer=self.split_layer)
        return merge(copy.deepcopy(self.model), method)
