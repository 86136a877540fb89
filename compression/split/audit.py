"""The empirical privacy of a split: what an inversion attack recovers from the token representations the vendor
receives. `attack` is the one call of a pipeline stage: the customer's privatization of its examples (as sent),
the attacks of privacy.audit.inversion (nearest neighbour at the embeddings; deeper, the strongest of a linear model
and the nearest public representation after or before the mechanism, all from PUBLIC text pushed through the public
bottom model), top-1 recovery and EP. Not here: the attacks' math.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from compression.data import Split, encode, length_chunks, lengths_of, load_split
from compression.models import TextClassifier
from compression.split.customer import Customer, DXConfig, vocabulary_table
from compression.split.training import SplitConfig
from privacy.audit.inversion import (
    InversionResult,
    LinearInversion,
    PublicNeighbourInversion,
    nearest_neighbour_attack,
    score,
)
from privacy.mechanisms.dx import NoiseStream

LEARNED = ("linear", "neighbour", "neighbour_clean")  # the attacks that learn from public text
KINDS = ("auto", "nearest", "learned", *LEARNED)


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """kind: "nearest" (embedding split only); from public text: "linear", "neighbour" (the nearest public
    representation after the mechanism), "neighbour_clean" (the nearest one before it: noise on one side of every
    distance only); "learned" (all three; the result is the one that recovers most, every recovery kept in
    `candidates`), or "auto" (nearest at split 0, learned deeper).
    max_private_examples: how many of the customer's examples are attacked (the first ones of the attacked text).
    max_public_tokens: the learned attacks' public tokens. ridge: its regularisation, relative to the features'
    mean variance."""

    kind: Literal["auto", "nearest", "learned", "linear", "neighbour", "neighbour_clean"] = "auto"
    max_private_examples: int = 500
    max_public_tokens: int = 200_000
    ridge: float = 1e-3

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class RandomEtas:
    """The attacker's stand-in for CTI on public text: it knows the two eta levels and the contributing fraction,
    not which tokens are contributing, so each token draws its level at random."""

    eta_contributing: float
    eta_other: float
    fraction: float
    generator: torch.Generator

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        high = torch.rand(input_ids.shape, generator=self.generator) < self.fraction
        levels = torch.tensor([self.eta_other, self.eta_contributing], dtype=torch.float64)
        return levels[high.long()]


def public_corpus(data_dir: str, *, tokenizer, tasks: Sequence[str] = ("cola", "mrpc", "stsb"),
                  max_length: int = 64) -> dict:
    """Every sentence of the train splits of `tasks` (public text, labels unused), encoded one sentence at a time."""
    from compression.data import GLUE_TASKS

    sentences = [text for task in tasks
                 for column in load_split(GLUE_TASKS[task], data_dir=data_dir, split="train").texts for text in column]
    return encode(Split((sentences,), [0] * len(sentences)), tokenizer, max_length=max_length)


Batches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def representations(customer: Customer, data: dict, *, special_ids: Sequence[int], max_tokens: int | None = None,
                    batch_size: int = 64) -> Batches:
    """(index, hidden, input_ids, mask) of `data`'s batches after the customer's bottom model, before noise, until
    `max_tokens` real non-special tokens: computed once per split depth and privatized per configuration
    (`privatized_tokens(..., clean=)`), e.g. the public text of the learned attack."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    out, count = [], 0
    for index in length_chunks(torch.arange(len(data["input_ids"])), lengths_of(data), batch_size):
        hidden, input_ids, mask = customer.represent(data, index)
        out.append((index, hidden, input_ids, mask))
        count += int((mask.bool() & ~torch.isin(input_ids, special)).sum())
        if max_tokens is not None and count >= max_tokens:
            break
    return out


def privatized_tokens(customer: Customer, data: dict, *, namespace: str, special_ids: Sequence[int],
                      max_tokens: int | None = None, batch_size: int = 64, clean: Batches | None = None):
    """(representations `[N, H]`, positions `[N]`, token ids `[N]`) of the real, non-special tokens of `data` as the
    customer sends them (noise from its stream under `namespace`), in example order, at most `max_tokens`.
    clean: `representations(...)` of `data` at the customer's split depth, computed earlier (else computed here)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    clean = clean if clean is not None else representations(customer, data, special_ids=special_ids,
                                                              max_tokens=max_tokens, batch_size=batch_size)
    reps, positions, tokens = [], [], []
    for index, hidden, input_ids, mask in clean:
        sent = customer.privatize(hidden, mask, input_ids, index, namespace=namespace).float()
        keep = mask.bool() & ~torch.isin(input_ids, special)
        reps.append(sent[keep])
        positions.append(torch.arange(input_ids.shape[1]).expand_as(input_ids)[keep])
        tokens.append(input_ids[keep])
    out = torch.cat(reps), torch.cat(positions), torch.cat(tokens)
    return tuple(t[:max_tokens] for t in out) if max_tokens is not None else out


def _subset(data: dict, count: int) -> dict:
    count = min(count, len(data["input_ids"]))
    return {"input_ids": data["input_ids"][:count], "token_type_ids": data["token_type_ids"][:count],
            "labels": data["labels"][:count]}


def attack(model: TextClassifier, private: dict, public: dict, *, config: SplitConfig, special_ids: Sequence[int],
           attack_config: AttackConfig | None = None, noise: NoiseStream | None = None, attacked: dict | None = None,
           public_clean: Batches | None = None) -> InversionResult:
    """Top-1 token recovery and EP of an inversion attack on the split `config` (split layer, dx, CTI).

    private: the customer's encoded training data (CTI is fit on all of it). attacked: the text whose representations
    are attacked as the customer sends them, its first `max_private_examples` (default: `private` itself; a held-out
    text of the customer's, e.g. its dev split, keeps the training text out of the reported recovery). public: encoded
    public text for the learned attack (and the chance level). special_ids: token ids left out of the score ([CLS],
    [SEP], padding). noise: the customer's noise (default: fresh, from the OS). public_clean: `representations` of
    `public` at this split depth (the same for every eta and CTI setting at the depth), to compute them once.
    """
    attack_config = attack_config or AttackConfig()
    kind = attack_config.kind if attack_config.kind != "auto" else (
        "nearest" if config.split_layer == 0 else "learned")
    customer = Customer(model, split_layer=config.split_layer, dx=config.dx, noise=noise)
    customer.fit_contributing(private, config.cti)
    target = _subset(private if attacked is None else attacked, attack_config.max_private_examples)
    observed, positions, truth = privatized_tokens(customer, target, namespace="train" if attacked is None else
                                                   "attacked", special_ids=special_ids)
    vocab_size = model.encoder.config.vocab_size
    public_tokens = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids in public["input_ids"]])
    public_tokens = public_tokens[~torch.isin(public_tokens, torch.tensor(sorted(set(special_ids))))]
    majority = int(torch.bincount(public_tokens, minlength=vocab_size).argmax())
    if kind == "nearest":
        if config.split_layer != 0:
            raise ValueError("the nearest-neighbour attack needs a split at the embeddings (split_layer 0)")
        predicted = nearest_neighbour_attack(observed, positions, table=vocabulary_table(customer.bottom),
                                             vocab_size=vocab_size)
        return score(predicted, truth, attack=kind, majority_token=majority, vocab_size=vocab_size)
    names = LEARNED if kind == "learned" else (kind,)
    # (the attack, whether it learns from public text after the mechanism or before it)
    learned = {"linear": (lambda: LinearInversion(vocab_size=vocab_size, ridge=attack_config.ridge), True),
               "neighbour": (PublicNeighbourInversion, True), "neighbour_clean": (PublicNeighbourInversion, False)}
    if public_clean is None:  # the public bottom's outputs once, whether noised for one attack or kept clean
        public_clean = representations(customer, public, special_ids=special_ids,
                                       max_tokens=attack_config.max_public_tokens)
    public_sent = {noisy: _public_features(model, customer, public, config=config, special_ids=special_ids,
                                           attack_config=attack_config, clean=public_clean, noisy=noisy)
                   for noisy in {learned[name][1] for name in names}}
    results = []
    for name in names:
        make, noisy = learned[name]
        results.append(score(make().fit(*public_sent[noisy]).predict(observed), truth, attack=name,
                             majority_token=majority, vocab_size=vocab_size))
    best = max(results, key=lambda r: r.recovery)
    return replace(best, candidates={r.attack: r.recovery for r in results}) if len(results) > 1 else best


def _public_features(model: TextClassifier, customer: Customer, public: dict, *, config: SplitConfig,
                     special_ids: Sequence[int], attack_config: AttackConfig,
                     clean: Batches | None = None, noisy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(representations `[N, H]`, token ids `[N]`) of public text as the attacker's own customer sends it: the same
    public bottom and mechanism, its own noise; with CTI, random per-token levels (it does not know the contributing
    set). Without `noisy`, before the mechanism. What the learned attacks learn from."""
    dx = config.dx if noisy else DXConfig()
    simulated = Customer(model, split_layer=config.split_layer, dx=dx, noise=NoiseStream())
    levels = customer.token_etas
    if noisy and levels is not None and not math.isinf(config.dx.eta):
        simulated.token_etas = RandomEtas(levels.eta_contributing, levels.eta_other, levels.fraction,
                                          torch.Generator().manual_seed(0))
    features, _, tokens = privatized_tokens(simulated, public, namespace="public", special_ids=special_ids,
                                            max_tokens=attack_config.max_public_tokens, clean=clean)
    return features, tokens
