"""The study's privacy budget: one (epsilon, delta) for everything trained on the private data, and its split."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from privacy.accounting import DPEvent
from privacy.mechanisms import require_composable
from privacy.noise import noise_source

DELTA_EXPONENT = 1.1  # default delta = n ** -DELTA_EXPONENT for n private training examples
DEFAULT_SHARES = {"teacher": 0.5, "prune": 0.25, "structured": 0.25, "distill": 0.25}


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """Target (epsilon, delta) for the whole study under add/remove-one-example DP.

    `delta=None` means n^-1.1 for n private training examples; a delta >= 1/n is refused (`resolve_delta`).
    `shares` maps a kind of stage (`teacher`, `prune`, `structured`, `distill`, ...) to its fraction of the budget
    (the rounds of a kind share it); they are renormalised over the stages that run. `scope` "study": everything the
    study trains composes into (epsilon, delta); "line": each model line (teacher + its pruning rounds, structured
    rounds or student) does, with the teacher taking `shares["teacher"]` (< 1) of epsilon in every line (see
    `privacy.planning.plan_lines`). `fixed_noise` maps a stage name (`teacher`, `prune_1`, ..., `distill`) to a noise
    multiplier it uses as given instead of a calibrated one; the other stages are calibrated around it.
    `reproducible_noise`: TEST MODE. Noise and sampling are seeded from the config, so the models have NO DP
    guarantee; their ledgers say `noise: seeded` and they are never registered with an epsilon.
    `dataset_budget`: the lifetime epsilon of the private dataset across every study on it (the persistent dataset
    ledger, privacy.dataset_ledger), at this study's delta; None means `epsilon`. `dataset_ledger`: where that
    ledger lives (a path or a database URL); None means $DPCOMPRESS_LEDGER_URL or ~/.dpcompress/ledger.db.
    """

    epsilon: float = 8.0
    delta: float | None = None
    accountant: Literal["prv", "rdp", "pld"] = "prv"
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    scope: Literal["study", "line"] = "study"
    secure_mode: bool = False
    fixed_noise: dict[str, float] = field(default_factory=dict)
    reproducible_noise: bool = False
    dataset_budget: float | None = None
    dataset_ledger: str | None = None

    def __post_init__(self):
        if not 0 < self.epsilon < math.inf:  # also refuses NaN
            raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        for kind, share in self.shares.items():
            if isinstance(share, bool) or not share >= 0:
                raise ValueError(f"shares[{kind!r}] must be a fraction >= 0, got {share!r}")
        for stage, sigma in self.fixed_noise.items():
            if not sigma > 0:
                raise ValueError(f"fixed_noise[{stage!r}] must be a noise multiplier > 0, got {sigma}")
        if self.reproducible_noise and self.secure_mode:
            raise ValueError("reproducible_noise (seeded test mode) and secure_mode exclude each other")
        if self.dataset_budget is not None and not self.epsilon <= self.dataset_budget < math.inf:
            raise ValueError(f"dataset_budget must be a finite epsilon >= epsilon ({self.epsilon}): the study alone "
                             f"spends epsilon, got {self.dataset_budget}")

    @property
    def lifetime_epsilon(self) -> float:
        """The dataset's lifetime budget across studies (`dataset_budget`, default this study's epsilon)."""
        return self.dataset_budget if self.dataset_budget is not None else self.epsilon

    def resolve_delta(self, num_examples: int) -> float:
        """`delta`, or n^-1.1 by default. A delta >= 1/n is refused: at delta = 1/n, a mechanism that publishes one
        training example chosen at random, whole, is (0, delta)-DP, so such a delta promises nothing."""
        if self.delta is None:
            return float(num_examples) ** -DELTA_EXPONENT
        if self.delta >= 1.0 / num_examples:
            raise ValueError(
                f"privacy.delta={self.delta:g} is >= 1/n = {1.0 / num_examples:.3g} for n = {num_examples} private "
                f"examples: publishing one random example in full would meet it. Use delta well below 1/n, e.g. "
                f"n^-{DELTA_EXPONENT} = {float(num_examples) ** -DELTA_EXPONENT:.3g} (the default when delta is unset)")
        return self.delta


    def share(self, kind: str) -> float:
        """The budget fraction of a kind of stage (0 for a kind the mapping does not name)."""
        return float(self.shares.get(kind, 0.0))


@dataclass(frozen=True, kw_only=True)
class StageBudget:
    """One private stage as the study's plan accounted it: its DP event (sigma, q, steps), mechanism, the target its
    ledger must stay under, and the noise source. The one source of these numbers for the stage's task, its ledger
    entry, its progress line and `dpcompress budget plan`."""

    event: DPEvent
    mechanism: str
    target_epsilon: float
    delta: float
    accountant: str = "prv"
    secure_mode: bool = False
    seeded: bool = False    # test mode: noise and sampling reproducible from the config, NO guarantee

    def __post_init__(self):
        require_composable(self.mechanism)

    @property
    def noise_multiplier(self) -> float:
        return self.event.noise_multiplier

    @property
    def noise(self) -> str:
        """Where this stage's noise comes from (privacy.noise.NOISE_SOURCES)."""
        return noise_source(secure_mode=self.secure_mode, seeded=self.seeded)
