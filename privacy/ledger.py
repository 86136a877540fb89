"""The privacy ledger: the study's privacy spend as data (one plain entry per DP training stage), its
composed epsilon, the budget check made before a stage trains, and per-stage noise planning.
Not here: the epsilon arithmetic itself (accounting.py) or the DP-SGD mechanism (engine.py).

Assumptions, as in accounting.py: add-or-remove-one-training-example neighbours, Poisson sampling,
Gaussian noise; every stage runs on the same private data set, so all stages compose. Entries hold
hyperparameters and a data fingerprint only, never private data.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import files
from .accounting import ACCOUNTANTS, BudgetError, DPEvent, compose_epsilon
from .mechanisms import get_mechanism
from .noise import NOISE_SOURCES

FORMAT = "dpcompress.ledger/1"
SAMPLINGS = ("poisson",)  # what the accountants assume
UNITS = ("example",)      # unit of privacy the accountants assume


class BudgetExceededError(BudgetError):
    """A stage would bring the study's composed epsilon over its budget."""


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One finished DP stage on the private data.

    noise_multiplier, sample_rate, num_steps: the stage's DP-SGD run, or its Gaussian-sum release (see `DPEvent`).
    max_grad_norm: per-example clipping (or normalisation) norm (L2), recorded for audit; it does not enter epsilon.
    mechanism: a name in the mechanism registry (privacy.mechanisms).
    epsilon_after: epsilon of the whole ledger composed up to and including this entry, at `delta`
        with `accountant`.
    dataset_fingerprint: keyed fingerprint (HMAC, privacy.fingerprint) of the private data used ("" if unknown).
    noise: where the noise and the sampling came from (privacy.noise.NOISE_SOURCES); "seeded" means the test mode,
        with NO differential-privacy guarantee.
    """

    stage: str
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    max_grad_norm: float
    epsilon_after: float
    delta: float
    accountant: str
    sampling: str = "poisson"
    unit: str = "example"
    dataset_fingerprint: str = ""
    mechanism: str = "dp_sgd"
    noise: str = "secret"

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage:
            raise ValueError(f"stage must be a non-empty string, got {self.stage!r}")
        _ = self.event  # validates noise_multiplier, sample_rate, num_steps
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not self.epsilon_after >= 0:
            raise ValueError(f"epsilon_after must be >= 0, got {self.epsilon_after!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; known: {sorted(ACCOUNTANTS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS} (what the accountants assume), "
                             f"got {self.sampling!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {self.noise!r}")
        get_mechanism(self.mechanism).check(self.event)

    @property
    def event(self) -> DPEvent:
        return DPEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                       num_steps=self.num_steps)


@dataclass(frozen=True)
class Ledger:
    """An immutable, ordered record of the study's DP stages; `append` returns a new ledger."""

    entries: tuple[LedgerEntry, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        for entry in self.entries:
            if not isinstance(entry, LedgerEntry):
                raise TypeError(f"ledger entries must be LedgerEntry, got {type(entry).__name__}")
        names = self.stage_names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate stage names in ledger: {duplicates}")

    @property
    def has_guarantee(self) -> bool:
        """False if any entry's noise was seeded (the test mode): then no epsilon of this ledger is a guarantee."""
        return all(entry.noise != "seeded" for entry in self.entries)

    def stage_names(self) -> list[str]:
        return [entry.stage for entry in self.entries]

    def events(self) -> list[DPEvent]:
        return [entry.event for entry in self.entries]

    def epsilon(self, *, delta: float, accountant: str = "prv") -> float:
        """Epsilon of all entries composed, at `delta` (recomputed, not read from epsilon_after)."""
        return compose_epsilon(self.events(), delta=delta, accountant=accountant)

    def check_fits(self, *, stage: str, event: DPEvent, target_epsilon: float, delta: float,
                   accountant: str = "prv") -> float:
        """Composed epsilon after adding `event`; call BEFORE training the stage.

        Raises BudgetExceededError if it exceeds `target_epsilon` (relative slack 1e-9 for rounding),
        and ValueError if `stage` is already recorded (`append` would refuse it after training).
        """
        if stage in self.stage_names():
            raise ValueError(f"stage '{stage}' is already in the ledger")
        epsilon = compose_epsilon([*self.events(), event], delta=delta, accountant=accountant)
        if epsilon > target_epsilon * (1 + 1e-9):
            raise BudgetExceededError(
                f"stage '{stage}' would bring epsilon to {epsilon:.3f} (delta={delta:g}, {accountant}), "
                f"over the study budget {target_epsilon:.3f} by {epsilon - target_epsilon:.3f}"
            )
        return epsilon

    def append(self, entry: LedgerEntry) -> Ledger:
        """A new ledger with `entry` added; refuses a stage name already present."""
        if entry.stage in self.stage_names():
            raise ValueError(f"stage '{entry.stage}' is already in the ledger")
        return Ledger((*self.entries, entry))

    def record(self, *, stage: str, event: DPEvent, max_grad_norm: float, delta: float,
               accountant: str = "prv", dataset_fingerprint: str = "", mechanism: str = "dp_sgd",
               noise: str = "secret") -> Ledger:
        """`append` an entry for `event`, with epsilon_after computed from this ledger plus `event`."""
        epsilon_after = compose_epsilon([*self.events(), event], delta=delta, accountant=accountant)
        return self.append(LedgerEntry(
            stage=stage, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate,
            num_steps=event.num_steps, max_grad_norm=max_grad_norm, epsilon_after=epsilon_after,
            delta=delta, accountant=accountant, dataset_fingerprint=dataset_fingerprint, mechanism=mechanism,
            noise=noise,
        ))

    def to_json(self) -> str:
        data = {"format": FORMAT, "entries": [asdict(entry) for entry in self.entries]}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a privacy ledger (expected format {FORMAT!r})")
        known = {f.name for f in fields(LedgerEntry)}
        entries = []
        for item in data.get("entries", []):
            unknown = sorted(set(item) - known)
            if unknown:
                raise ValueError(f"unknown ledger entry keys: {unknown}")
            entries.append(LedgerEntry(**item))
        return cls(tuple(entries))

    def save(self, path: str | os.PathLike) -> None:
        """Write the ledger as pretty JSON with sorted keys, atomically (privacy.files)."""
        files.write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ledger:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def union_epsilon(ledgers: Sequence[Ledger], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of releasing every model whose ledger is given: the composition of all distinct stages
    (a stage shared by several lineages, like the teacher, counts once)."""
    entries = {e.stage: e for ledger in ledgers for e in ledger.entries}
    return compose_epsilon([e.event for e in entries.values()], delta=delta, accountant=accountant)
