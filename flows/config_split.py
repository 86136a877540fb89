"""The `split` section of a study: Split-and-Privatize (compression.split) as a branch of the study flow, one cached
stage per configuration (split depth, d_chi eta, CTI on/off), an inversion attack per depth, and a table. Typed like
flows/config.py (frozen, unknown keys refused, every error names its field); `split_configs` derives the library's
configs from it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from compression.data import DataConfig
from compression.methods import MethodConfig
from compression.split import VENDOR_LORA, AttackConfig, CTIConfig, DXConfig, SplitConfig, VendorConfig
from compression.split.adapter import VENDOR_METHODS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _infinity(value):
    """`inf` (a YAML string: YAML reads only `.inf` as a number) is math.inf: no noise."""
    return math.inf if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity") else value


# a d_chi eta per unit of L2 distance: > 0, or inf for no noise (plain split fine-tuning)
Eta = Annotated[float, Field(allow_inf_nan=True), BeforeValidator(_infinity)]


class SplitAttackSection(_Section):
    """The inversion attacks (compression.split.audit) on each configuration. `kind` "auto": nearest neighbour in the
    embedding table at a split at the embeddings; deeper, "learned": the strongest of a linear inversion and the
    nearest public representation after and before the mechanism ("linear", "neighbour", "neighbour_clean": that one
    alone), all from `public` text pushed through the public bottom; "nearest" needs every split at 0. The attacked
    text is the study's dev split, held out from training, as the customer sends it: its first `max_examples`
    examples. `public`: data sections of public text (train splits, labels unused; default CoLA, MRPC and STS-B from
    data.dir), disjoint from the private data (checked)."""
    public: list[DataConfig] = [DataConfig(task="cola"), DataConfig(task="mrpc"), DataConfig(task="stsb")]
    kind: Literal["auto", "nearest", "learned", "linear", "neighbour", "neighbour_clean"] = "auto"
    max_examples: int = Field(500, gt=0)
    max_public_tokens: int = Field(100_000, gt=0)
    ridge: float = Field(1e-3, gt=0)

    @field_validator("public")
    @classmethod
    def _some_public_text(cls, public: list[DataConfig]) -> list[DataConfig]:
        if not public:
            raise ValueError("the learned attack needs public text: one or more data sections")
        return public


class SplitSection(_Section):
    """Split fine-tuning of the pretrained model between the customer (embeddings, the first k blocks, the d_chi noise)
    and the vendor (the rest, `method`, the head), for every k in `splits` (0: the embedding output), eta in `etas`
    (inf: no noise, the baseline of its depth) and CTI setting in `cti` (on: contributing tokens get `cti_ratio`
    times the eta of the others, same average; only with noise). Local d_chi privacy per token representation, not
    central DP: never composed into the study's epsilon. Off by default."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, ser_json_inf_nan="strings")
    enabled: bool = False
    splits: list[int] = [0, 2, 4]
    etas: list[Eta] = [math.inf, 50.0, 25.0]
    cti: list[bool] = [False, True]
    cti_tokens: int = Field(500, gt=0)
    cti_ratio: float = Field(4.0, ge=1)
    cti_score: Literal["tfidf", "log_odds"] = "tfidf"  # how contributing tokens are ranked (split/contributing.py)
    snap_to_vocab: bool = False  # at the embedding split: send the nearest vocabulary embedding (same guarantee)
    method: MethodConfig = VENDOR_LORA  # what the vendor trains in its blocks (full, bitfit, bias_norm or lora)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(5e-4, gt=0)       # the vendor's method
    head_learning_rate: float = Field(1e-3, gt=0)
    max_train_examples: int | None = Field(None, gt=0)  # a seeded sample of the study's training data; None: all
    seed: int = 0  # batch order, the subsample and the vendor's dropout (public; the noise is secret)
    attack: SplitAttackSection = SplitAttackSection()

    @field_validator("splits")
    @classmethod
    def _depths(cls, splits: list[int]) -> list[int]:
        if not splits or len(set(splits)) != len(splits) or min(splits) < 0:
            raise ValueError(f"give one or more distinct block counts >= 0 (0: the embedding output), got {splits}")
        return splits

    @field_validator("etas")
    @classmethod
    def _etas(cls, etas: list[float]) -> list[float]:
        if any(math.isnan(e) or not e > 0 for e in etas) or len(set(etas)) != len(etas):
            raise ValueError(f"give distinct etas > 0 (inf: no noise), got {etas}")
        if math.inf not in etas:
            raise ValueError("include inf (plain split fine-tuning without noise): every depth's gains and costs are "
                             "read against it")
        return etas

    @field_validator("cti")
    @classmethod
    def _cti(cls, cti: list[bool]) -> list[bool]:
        if not cti or len(set(cti)) != len(cti):
            raise ValueError(f"give false, true or both, once each, got {cti}")
        return cti

    @field_validator("method")
    @classmethod
    def _vendor_method(cls, method):
        if method.name not in VENDOR_METHODS:
            raise ValueError(f"the vendor trains one of {', '.join(VENDOR_METHODS)} in its blocks, not "
                             f"{method.name!r}")
        return method

    @model_validator(mode="after")
    def _snap_needs_the_embedding_split(self):
        if self.snap_to_vocab and 0 not in self.splits:
            raise ValueError("split.snap_to_vocab applies at the embedding split: add 0 to split.splits")
        if self.attack.kind == "nearest" and any(self.splits):
            raise ValueError("split.attack.kind nearest reads the embedding table: it needs every split at 0 (auto "
                             "uses it there and a learned attack deeper)")
        return self


def split_configs(section: SplitSection) -> dict[str, SplitConfig]:
    """Stage name -> the library config of every configuration, depth by depth: the depth's baseline (no noise, no
    CTI) first, then each CTI setting at each finite eta (CTI without noise changes nothing: not run)."""
    grid = [(k, eta, cti) for k in section.splits for eta, cti in
            [(math.inf, False), *((e, c) for c in section.cti for e in section.etas if not math.isinf(e))]]
    vendor = VendorConfig(method=section.method, learning_rate=section.learning_rate,
                          head_learning_rate=section.head_learning_rate, seed=section.seed)
    return {stage_name(k, eta, cti): SplitConfig(
        split_layer=k, dx=DXConfig(eta=eta, snap=section.snap_to_vocab and k == 0),
        cti=CTIConfig(enabled=cti, num_tokens=section.cti_tokens, eta_ratio=section.cti_ratio,
                      score=section.cti_score), vendor=vendor,
        epochs=section.epochs, batch_size=section.batch_size, seed=section.seed) for k, eta, cti in grid}


def stage_name(split_layer: int, eta: float, cti: bool) -> str:
    """e.g. split_k0_plain (no noise), split_k2_eta50, split_k2_eta50_cti."""
    return f"split_k{split_layer}_" + ("plain" if math.isinf(eta) else f"eta{eta:g}") + ("_cti" if cti else "")


def public_sources(section: SplitSection, data: DataConfig) -> list[DataConfig]:
    """The attack's public data sections, each without a `dir` reading the private data's folder (data.dir)."""
    return [source if source.dir else dataclasses.replace(source, dir=data.dir) for source in section.attack.public]


def attack_config(section: SplitSection) -> AttackConfig:
    """The library's attack settings ("auto": nearest at 0, learned deeper)."""
    a = section.attack
    return AttackConfig(kind=a.kind, max_private_examples=a.max_examples, max_public_tokens=a.max_public_tokens,
                        ridge=a.ridge)
