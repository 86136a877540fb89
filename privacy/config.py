"""The study's privacy budget: one (epsilon, delta) for everything trained on the private data, and its split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """Target (epsilon, delta) for the whole study under add/remove-one-example DP.

    `delta=None` means 1/n for n private training examples. Shares are fractions of the budget given to
    the teacher, to all pruning rounds together, and to distillation; they are renormalised over the
    stages that run. `scope` "study": everything the study trains composes into (epsilon, delta); "line": each
    model line (teacher + its pruning rounds, structured rounds or student) does, with the teacher taking
    `teacher_share` (< 1) of epsilon in every line (see `privacy.ledger.plan_lines`). `fixed_noise` maps a stage name (`teacher`, `prune_1`, ..., `distill`) to a noise
    multiplier it uses as given instead of a calibrated one; the other stages are calibrated around it.
    """

    epsilon: float = 8.0
    delta: float | None = None
    accountant: Literal["prv", "rdp", "pld"] = "prv"
    teacher_share: float = 0.5
    prune_share: float = 0.25
    distill_share: float = 0.25
    structured_share: float = 0.25
    scope: Literal["study", "line"] = "study"
    secure_mode: bool = False
    fixed_noise: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        for name in ("teacher_share", "prune_share", "distill_share", "structured_share"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for stage, sigma in self.fixed_noise.items():
            if not sigma > 0:
                raise ValueError(f"fixed_noise[{stage!r}] must be a noise multiplier > 0, got {sigma}")

    def resolve_delta(self, num_examples: int) -> float:
        return self.delta if self.delta is not None else 1.0 / num_examples


@dataclass(frozen=True, kw_only=True)
class StageBudget:
    """What one training stage is allowed: its calibrated sigma and the study-wide target it must fit under."""

    noise_multiplier: float
    target_epsilon: float
    delta: float
    accountant: str = "prv"
    secure_mode: bool = False
    seeded: bool = False    # test mode: noise and sampling reproducible from the config, NO guarantee
