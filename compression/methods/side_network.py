"""The ladder side network of method `side` (Sung et al. 2022, Ladder Side-Tuning): small copies of a BERT-like
backbone's layers fed, through trainable down-projections ("ladders") and scalar gates, by the frozen backbone's hidden
states. Plain torch modules over the family's own layer class; depends only on torch and transformers because
compression.export copies this source into exported folders. Not here: its initialisation from the backbone (side.py).
"""
import copy

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


class Gate(nn.Module):
    """`mu * side + (1 - mu) * ladder` with `mu = sigmoid(alpha / temperature)`, alpha one trainable scalar (0 at the
    start: mu = 1/2). alpha is the weight of a bias-free `nn.Linear(1, 1)` applied to one 1 per example, so every DP
    engine clips it as a Linear weight (a bare 1-element parameter belongs to no module type they know)."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.alpha.weight)

    def forward(self, side: torch.Tensor, ladder: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha(side.new_ones(side.shape[0], 1))  # [B, 1]: alpha, once per example
        mu = torch.sigmoid(alpha / self.temperature).view(-1, *([1] * (side.dim() - 1)))
        return mu * side + (1 - mu) * ladder


class LadderSide(nn.Module):
    """The side network: `s = down_0(h_0)`; then for each kept backbone layer i (k = 1, 2, ...),
    `s = gate_k(layer_k(s), down_k(h_{i+1}))`, where `h_0` is the backbone's embedding output and `h_{i+1}` its
    output after layer i. With the down-projections selecting the kept hidden dimensions and the layers unreduced
    copies, `s` after the last layer is the backbone's output.

    spec (JSON-ready): backbone_hidden_size; hidden_size, intermediate_size (the side layers' widths; the head count is
    the backbone's, each head `hidden_size / num_attention_heads` wide); layers (the backbone layer indices the side
    layers follow); temperature (of the gates); attention_dropout (of the side layers' attention probabilities; a spec
    without it keeps the backbone's).
    """

    def __init__(self, encoder_config, spec: dict, layer_class: type):
        super().__init__()
        self.spec = dict(spec)
        self.config = self.side_config(encoder_config, spec)
        width, side_width = spec["backbone_hidden_size"], spec["hidden_size"]
        self.layers = nn.ModuleList(layer_class(self.config) for _ in spec["layers"])
        self.downs = nn.ModuleList(nn.Linear(width, side_width) for _ in range(len(spec["layers"]) + 1))
        self.gates = nn.ModuleList(Gate(spec["temperature"]) for _ in spec["layers"])

    @staticmethod
    def side_config(encoder_config, spec: dict):
        """The backbone's config with the side layers' widths, count and attention dropout."""
        config = copy.deepcopy(encoder_config)
        config.hidden_size, config.intermediate_size = spec["hidden_size"], spec["intermediate_size"]
        config.num_hidden_layers = len(spec["layers"])
        if "attention_dropout" in spec:
            config.attention_probs_dropout_prob = spec["attention_dropout"]
        return config

    @property
    def taps(self) -> list[int]:
        """Indices into the backbone's hidden states (0: the embedding output, i + 1: after layer i) that the
        ladders read, in order."""
        return [0] + [i + 1 for i in self.spec["layers"]]

    def forward(self, taps: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """taps `[B, L, K, H]` (the backbone's hidden states at `self.taps`), attention_mask `[B, L]` (1 on real
        tokens) -> the side network's output `[B, L, hidden_size]`."""
        hidden = self.downs[0](taps[:, :, 0])
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for k, (layer, gate) in enumerate(zip(self.layers, self.gates), start=1):
            out = layer(hidden, attention_mask=mask)
            hidden = gate(out[0] if isinstance(out, tuple) else out, self.downs[k](taps[:, :, k]))
        return hidden
