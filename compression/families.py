"""Model families: how `TextClassifier` drives a bare HF base model (`AutoModel`) of one `model_type`, a registry.

A family says where the transformer layers are, how the embeddings are computed with explicit `[B, L]` position
ids, which attention mask the layers take, what follows the last layer and the default pooling. Not a model zoo:
weights and layer code stay HF's. Also teaches the book-keeping DP engine GPT-2's `Conv1D` (privacy.bookkeeping_layers).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.pytorch_utils import Conv1D

from privacy.bookkeeping_layers import LinearCapture, Rule, register_rule

# (base model, input_ids [B, L], token_type_ids [B, L], position_ids [B, L]) -> hidden states before layer 0
Embeddings = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
POSITIONS = ("index", "after_padding")


@dataclass(frozen=True, kw_only=True)
class Family:
    """How to run one kind of HF base model layer by layer (inputs right-padded, `attention_mask` 1 on real tokens).

    Fields:
        layers_path: dotted path of the transformer layers' `nn.ModuleList` inside the base model.
        num_layers_attr: the config attribute holding the layer count.
        embeddings: `(base, input_ids, token_type_ids, position_ids)` -> `[B, L, H]`, everything before layer 0.
        positions: "index" (0..L-1) or "after_padding" (RoBERTa/fairseq: `pad_token_id` + the running count of real
            tokens, `pad_token_id` on padding).
        token_types: whether the embeddings read token-type ids (only if the config has more than one type).
        causal: decoder (causal and padding mask) or encoder (padding mask only).
        final: what follows the last layer (GPT-2's `ln_f`), or None.
        pooling: the default pooling: "mean" for encoders, "last" (the last real token) for decoders.
        structured: the layers have BERT's module names (attention.self.query, intermediate.dense, ...), so heads
            and FFN neurons can be pruned structurally (compression.pruning.structured).
        roles: `(role, path)` pairs naming a layer's Linear/Conv1D modules by what they do (query, key, value,
            attention_output, ffn_in, ffn_out), path relative to the layer; several roles may share a module (GPT-2's
            fused query/key/value). Adapters (compression.methods.lora) find their targets here.
    """

    layers_path: str
    num_layers_attr: str
    embeddings: Embeddings
    positions: Literal["index", "after_padding"] = "index"
    token_types: bool = True
    causal: bool = False
    final: Callable[[PreTrainedModel, torch.Tensor], torch.Tensor] | None = None
    pooling: str = "mean"
    structured: bool = False
    roles: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    @property
    def layer_prefix(self) -> str:
        """Name prefix of the transformer layers' parameters inside a `TextClassifier` (what pruning selects)."""
        return f"encoder.{self.layers_path}."

    def layers(self, base: PreTrainedModel) -> nn.ModuleList:
        return attrgetter(self.layers_path)(base)

    def set_layers(self, base: PreTrainedModel, layers) -> None:
        """Replace the base model's layers with `layers` and set the config's layer count to match."""
        parent, _, name = self.layers_path.rpartition(".")
        setattr(attrgetter(parent)(base) if parent else base, name, nn.ModuleList(layers))
        setattr(base.config, self.num_layers_attr, len(self.layers(base)))

    def reads_token_types(self, config) -> bool:
        return self.token_types and getattr(config, "type_vocab_size", 2) > 1

    def position_ids(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                     ) -> torch.Tensor:
        """Explicit `[B, L]` position ids (Opacus needs per-example shapes, opacus #841)."""
        if self.positions == "index":
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).contiguous()
        real = attention_mask.long()
        return real.cumsum(1) * real + base.config.pad_token_id

    def embed(self, base: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Hidden states `[B, L, H]` before the first layer; token types are zeros where the model has one type."""
        if not self.reads_token_types(base.config):
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(base, input_ids, token_type_ids, self.position_ids(base, input_ids, attention_mask))

    def attention_mask(self, base: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The mask HF's own forward gives the layers (4-D, or None where the attention backend needs none)."""
        if self.causal:
            return create_causal_mask(base.config, hidden, attention_mask, None)
        return create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask)

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
        out = layer(hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, base: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
        """What follows the last layer (identity for encoders)."""
        return hidden if self.final is None else self.final(base, hidden)


FAMILIES: dict[str, Family] = {}


def register_family(model_types: str | tuple[str, ...], family: Family) -> None:
    """Register `family` under one or more HF `model_type`s (aliases share a family)."""
    for model_type in (model_types,) if isinstance(model_types, str) else model_types:
        FAMILIES[model_type] = family


def family_of(encoder: PreTrainedModel) -> Family:
    """The family of a bare HF base model, by its `config.model_type`; ValueError naming the supported ones."""
    model_type = getattr(encoder.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} has no registered family; supported: {sorted(FAMILIES)} "
                         "(compression.families.register_family)")
    return FAMILIES[model_type]


def require_structured(model, what: str) -> None:
    """ValueError unless `model`'s (a `TextClassifier`) layers have BERT's module names, which structured pruning
    of heads and FFN neurons edits; `what` names the operation refused."""
    if not model.family.structured:
        supported = sorted(t for t, f in FAMILIES.items() if f.structured)
        raise ValueError(f"{what} needs BERT-like layers ({', '.join(supported)}); model_type "
                         f"{model.encoder.config.model_type!r} has other layer modules")


# --- the families ----------------------------------------------------------------------------------------------------

def _bert_embeddings(base, input_ids, token_type_ids, position_ids):
    return base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)


def _distilbert_embeddings(base, input_ids, token_type_ids, position_ids):
    return base.embeddings(input_ids, None, position_ids)


def _gpt2_embeddings(base, input_ids, token_type_ids, position_ids):
    return base.drop(base.wte(input_ids) + base.wpe(position_ids))  # GPT2Model.forward without its cache


_BERT_ROLES = (("query", "attention.self.query"), ("key", "attention.self.key"), ("value", "attention.self.value"),
               ("attention_output", "attention.output.dense"), ("ffn_in", "intermediate.dense"),
               ("ffn_out", "output.dense"))
BERT = Family(layers_path="encoder.layer", num_layers_attr="num_hidden_layers", embeddings=_bert_embeddings,
              structured=True, roles=_BERT_ROLES)
ROBERTA = Family(layers_path="encoder.layer", num_layers_attr="num_hidden_layers", embeddings=_bert_embeddings,
                 positions="after_padding", structured=True, roles=_BERT_ROLES)
DISTILBERT = Family(layers_path="transformer.layer", num_layers_attr="n_layers", embeddings=_distilbert_embeddings,
                    token_types=False,
                    roles=(("query", "attention.q_lin"), ("key", "attention.k_lin"), ("value", "attention.v_lin"),
                           ("attention_output", "attention.out_lin"), ("ffn_in", "ffn.lin1"), ("ffn_out", "ffn.lin2")))
GPT2 = Family(layers_path="h", num_layers_attr="n_layer", embeddings=_gpt2_embeddings, token_types=False,
              causal=True, final=lambda base, hidden: base.ln_f(hidden), pooling="last",
              roles=(("query", "attn.c_attn"), ("key", "attn.c_attn"), ("value", "attn.c_attn"),
                     ("attention_output", "attn.c_proj"), ("ffn_in", "mlp.c_fc"), ("ffn_out", "mlp.c_proj")))

register_family("bert", BERT)
register_family(("roberta", "xlm-roberta", "camembert"), ROBERTA)
register_family("distilbert", DISTILBERT)
register_family("gpt2", GPT2)


# --- GPT-2's Conv1D for the book-keeping engine --------------------------------------------------------------------

def _conv1d(module: Conv1D, x: torch.Tensor) -> torch.Tensor:
    """`y = x W + b` (W stored `[in, out]`) with detached parameters, as `Conv1D.forward` computes it."""
    out = torch.addmm(module.bias.detach(), x.reshape(-1, x.shape[-1]), module.weight.detach())
    return out.view(*x.shape[:-1], module.nf)


class Conv1DCapture(LinearCapture):
    """LinearCapture's math (a Conv1D is a Linear with weight `W^T`); the weight's clipped sum transposed back."""

    def clipped_sums(self, factors):
        out = super().clipped_sums(factors)
        if self.weight is not None:
            out[self.weight] = out[self.weight].t().contiguous()
        return out


register_rule(Conv1D, Rule(("weight", "bias"), _conv1d, Conv1DCapture))
