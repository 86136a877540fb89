"""`side`: Ladder-Side-Tuning (Sung et al. 2022) under DP. A ladder side network (side_network.py), r-fold narrower
than the backbone and initialised from it by structured pruning (side_init.py), reads the frozen backbone's hidden
states through down-projections and gates; only it, its down-projections, gates and head train. The backbone runs
without autograd: `dp_train` computes its hidden states once per stage (`StagePlan.features`) and the DP steps run the
side network alone, so training memory scales with the side network. BERT-like backbones (bert, roberta).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from compression import export_side  # noqa: F401  (registers the side model's export)
from compression.methods import Method, StagePlan, register_method
from compression.methods.side_init import init_from_backbone, side_spec
from compression.methods.side_network import LadderSide
from compression.models import SAVED_KINDS, TextClassifier

_SIDE_FILE = "side_network.pt"


@dataclass(frozen=True, kw_only=True)
class SideConfig:
    """reduction: r, the side network's widths (hidden, each head, FFN) are the backbone's divided by it (8 gives
    ~1/60 of the layers' parameters). drop_layers: backbone layer indices (0-based) with no side layer nor ladder.
    temperature: T of the gates, mu = sigmoid(alpha / T). attention_dropout: dropout on the side layers' attention
    probabilities (0 by default: with any, PyTorch's scaled-dot-product attention falls back to its math kernel, which
    keeps every layer's `[B, heads, L, L]` attention maps for backward, the bulk of the side network's training
    memory; the side layers' other dropouts are the backbone's)."""

    name: Literal["side"] = "side"
    reduction: int = 8
    drop_layers: tuple[int, ...] = ()
    temperature: float = 0.1
    attention_dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 1:
            raise ValueError(f"reduction must be an integer >= 1, got {self.reduction!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.drop_layers):
            raise ValueError(f"drop_layers must be layer indices, got {self.drop_layers!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")


class SideClassifier(TextClassifier):
    """A frozen backbone (`encoder`, run without autograd) whose hidden states feed `side`, a `LadderSide`; its output
    is pooled as the backbone's would be and classified by `head` (`[num_labels, side hidden]`).

    Saved by `save_classifier` (the side network as an extra file) and exported by `compression.export.export_hf` (a
    remote-code class that runs the backbone, then the side network)."""

    kind = "side"

    def __init__(self, encoder, *, side: LadderSide, num_labels: int, pooling: str | None = None,
                 dropout: float = 0.1):
        super().__init__(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout)
        self.side = side
        self.head = nn.Linear(side.spec["hidden_size"], num_labels)

    @torch.no_grad()
    def backbone_states(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The backbone's hidden states the ladders read, `[B, L, K, H]` (K = `len(side.taps)`), without autograd."""
        family = self.family
        hidden = family.embed(self.encoder, input_ids, attention_mask, token_type_ids)
        states, mask = [hidden], family.attention_mask(self.encoder, hidden, attention_mask)
        for layer in self.layers[: max(self.side.taps)]:
            hidden = family.run_layer(layer, hidden, mask)
            states.append(hidden)
        return torch.stack([states[i] for i in self.side.taps], dim=2)

    def side_logits(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's states (`backbone_states`, cached or not): side network, pooling, head."""
        return self.head(self.dropout(self.pool_states(self.side(states, attention_mask), attention_mask)))

    def hidden_states(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.side(self.backbone_states(input_ids, attention_mask, token_type_ids), attention_mask)

    def features(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.pool_states(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)

    def top(self, hidden, attention_mask, *, start_layer):
        raise ValueError("a side model trains its side network only (method 'side'); the backbone stays frozen")

    def save_parts(self, directory: Path) -> dict:
        torch.save(self.side.state_dict(), directory / _SIDE_FILE)
        return {"kind": self.kind, "parts": self.side.spec}


def _load_saved(model: TextClassifier, spec: dict, directory: Path) -> SideClassifier:
    side = LadderSide(model.encoder.config, spec, type(model.layers[0]))
    side.load_state_dict(torch.load(directory / _SIDE_FILE, weights_only=True))
    out = SideClassifier(model.encoder, side=side, num_labels=model.num_labels, pooling=model.pooling,
                         dropout=model.dropout.p)
    return out.eval()


SAVED_KINDS["side"] = _load_saved


def _prepare(model: TextClassifier, config: SideConfig) -> SideClassifier:
    """A side model on `model`'s backbone (shared, not copied), initialised from it by structured pruning; a side
    model is returned as it is (it trains on)."""
    if isinstance(model, SideClassifier):
        return model
    spec = side_spec(model, reduction=config.reduction, drop_layers=config.drop_layers,
                     temperature=config.temperature, attention_dropout=config.attention_dropout)
    with torch.random.fork_rng(devices=[]):  # the modules' own init draws from the global RNG: leave it untouched
        side = LadderSide(model.encoder.config, spec, type(model.layers[0])).to(model.head.weight)
        out = SideClassifier(model.encoder, side=side, num_labels=model.num_labels, pooling=model.pooling,
                             dropout=model.dropout.p).to(model.head.weight)
    init_from_backbone(side, model, out.head)
    return out.train(model.training)


def _trainable(model, config: SideConfig) -> int:
    """Freeze the backbone; the side network (layers, down-projections, gates) and the head train. No backbone layer
    needs autograd: returns `num_layers`."""
    if not isinstance(model, SideClassifier):
        raise ValueError("side: the model has no side network; call compression.methods.prepare(model, config) first")
    for p in model.parameters():
        p.requires_grad_(False)
    model.side.requires_grad_(True)
    model.head.requires_grad_(True)
    return model.num_layers


def _plan(model, config: SideConfig) -> StagePlan:
    _trainable(model, config)
    return StagePlan(module=model, features=model.backbone_states, logits=model.side_logits)


register_method(Method(name="side", config=SideConfig, trainable=_trainable, prepare=_prepare, plan=_plan,
                       masks=False))
