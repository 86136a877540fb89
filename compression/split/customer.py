"""The customer of a split fine-tuning: the private text, the embeddings and the first `split_layer` blocks of the
public model (frozen), and the privatization of every token representation it sends. It emits `Crossing`s only.
Not here: the noise itself (privacy.mechanisms.dx), what crosses back (vendor.py) or the loop (training.py).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compression.data import collate
from compression.models import TextClassifier
from compression.split.contributing import CTIConfig, TokenEtas, fit_token_etas
from compression.split.crossing import Crossing
from privacy.audit.inversion import nearest_rows
from privacy.mechanisms.dx import NoiseStream, sample_noise


@dataclass(frozen=True, kw_only=True)
class DXConfig:
    """The d_chi mechanism on every sent token representation: `eta` per unit of Euclidean distance (math.inf: no
    noise, plain split learning); `snap`: at a split at the embeddings, replace each noisy vector by the nearest
    vocabulary embedding output at its position (post-processing: the guarantee is unchanged)."""

    eta: float = math.inf
    snap: bool = False

    def __post_init__(self):
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 (math.inf: no noise), got {self.eta!r}")


def bottom_model(model: TextClassifier, split_layer: int) -> TextClassifier:
    """A frozen copy of `model` cut after its first `split_layer` blocks, without a head: what the customer holds."""
    if not 0 <= split_layer <= model.num_layers:
        raise ValueError(f"split_layer must be in 0..{model.num_layers}, got {split_layer!r}")
    bottom = copy.deepcopy(model)
    bottom.family.set_layers(bottom.encoder, list(bottom.layers)[:split_layer])
    bottom.head = None
    for p in bottom.parameters():
        p.requires_grad_(False)
    return bottom.eval()


def token_type_count(model: TextClassifier) -> int:
    """How many token types the model's embeddings read (1 where they read none)."""
    config = model.encoder.config
    return config.type_vocab_size if model.family.reads_token_types(config) else 1


@torch.no_grad()
def embedding_outputs(model: TextClassifier, *, position: int, token_type: int = 0) -> torch.Tensor:
    """`[V, H]`: the embedding layer's output for every vocabulary token at 0-based `position` with `token_type`."""
    family, base = model.family, model.encoder
    was_training = model.training
    model.eval()
    ids = torch.arange(base.config.vocab_size).unsqueeze(1)
    ones = torch.ones(1, position + 1, dtype=torch.long)
    position_id = family.position_ids(base, ones, ones)[0, -1]
    out = family.embeddings(base, ids, torch.full_like(ids, token_type), position_id.expand_as(ids).contiguous())
    model.train(was_training)
    return out[:, 0]


def vocabulary_table(model: TextClassifier) -> Callable[[int], torch.Tensor]:
    """position -> `[V * T, H]`, the embedding outputs of every token under each of the T token types (row r is token
    r % V): the candidates of snapping and of the nearest-neighbour attack."""
    types = token_type_count(model)
    return lambda position: torch.cat([embedding_outputs(model, position=position, token_type=t)
                                       for t in range(types)])


class Customer:
    """The data owner's party. `noise`: the secret source of every draw (a NoiseStream seeded from the OS unless a test
    passes one); each example's noise is a function of its index, so an example resent in a later epoch is the same
    release. `fit_contributing` turns on contributing-token identification (per-token eta, same average)."""

    def __init__(self, model: TextClassifier, *, split_layer: int, dx: DXConfig, noise: NoiseStream | None = None):
        if dx.snap and split_layer != 0:
            raise ValueError("snap needs a split at the embeddings (split_layer 0)")
        self.bottom = bottom_model(model, split_layer)
        self.split_layer, self.dx = split_layer, dx
        self.noise = NoiseStream() if noise is None else noise
        self.token_etas: TokenEtas | None = None
        self._table = vocabulary_table(self.bottom) if dx.snap else None

    def fit_contributing(self, train: dict, config: CTIConfig) -> None:
        """Contributing tokens from the customer's (encoded) training data; they stay here (see contributing.py)."""
        if config.enabled:
            self.token_etas = fit_token_etas(train["input_ids"], train["labels"], eta=self.dx.eta, config=config,
                                             vocab_size=self.bottom.encoder.config.vocab_size)

    def etas(self, input_ids: torch.Tensor) -> torch.Tensor:
        """eta of every position of `input_ids` `[B, L]` (float64)."""
        if self.token_etas is None:
            return torch.full(input_ids.shape, self.dx.eta, dtype=torch.float64)
        return self.token_etas(input_ids)

    @torch.no_grad()
    def privatize(self, hidden: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor,
                  index: torch.Tensor, *, namespace: str) -> torch.Tensor:
        """`hidden` `[B, L, H]` with one d_chi draw per real token (example `index[b]`'s own generator), snapped if
        configured, and zeros on padding."""
        out = hidden.clone()
        etas = self.etas(input_ids)
        if not bool(torch.isinf(etas).all()):
            for row, example in enumerate(index.tolist()):
                length = int(attention_mask[row].sum())
                generator = self.noise.generator(namespace, example)
                out[row, :length] += sample_noise((length, out.shape[-1]), eta=etas[row, :length],
                                                  generator=generator, dtype=out.dtype)
        if self._table is not None:
            out = self._snap(out, attention_mask)
        return out * attention_mask.unsqueeze(-1).to(out.dtype)

    def _snap(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        for position in range(hidden.shape[1]):
            rows = attention_mask[:, position].bool()
            if rows.any():
                candidates = self._table(position)
                hidden[rows, position] = candidates[nearest_rows(hidden[rows, position], candidates)]
        return hidden

    @torch.no_grad()
    def represent(self, data: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden `[B, L, H]` after the bottom model, before any noise; input_ids; attention_mask) of the examples
        `index` of encoded `data`. Un-noised: never sent as is (`privatize` it)."""
        input_ids, mask, token_types = collate(data, index)
        return self.bottom.embed(input_ids, mask, token_types, num_layers=self.split_layer), input_ids, mask

    @torch.no_grad()
    def crossing(self, data: dict, index: torch.Tensor, *, namespace: str, labels: bool) -> Crossing:
        """The batch of examples `index` of encoded `data`, as it crosses: privatized representations, the mask, and
        the labels if `labels` (training in the standard split)."""
        hidden, input_ids, mask = self.represent(data, index)
        hidden = self.privatize(hidden, mask, input_ids, index, namespace=namespace)
        return Crossing(hidden=hidden.float().contiguous(), attention_mask=mask.to(torch.uint8),
                        labels=data["labels"][index] if labels else None)
