"""Registry of the DP mechanisms a study releases through: name -> how one release is accounted.

Each entry says what a release of that mechanism is as `privacy.accounting.DPEvent`s (what the accountants compose)
and refuses events that do not fit it. The ledger and the budget planner read this registry; a new mechanism is one
registry entry beside its implementation. Not here: the mechanisms' code (engine.py, gaussian_sum.py, dx.py) or epsilon.

A mechanism whose guarantee is not central (epsilon, delta)-DP over examples (`composes=False`: dx, a local metric
guarantee per token representation) is registered too, so that its name is known, but it is never composed: its
`check` refuses every event, and the planner, the ledgers and the dataset ledger refuse it by name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from privacy.accounting import DPEvent


@dataclass(frozen=True, kw_only=True)
class Mechanism:
    """name: the ledger's word for it. summary: one line for people. check: raises ValueError for an event that is
    not a release of this mechanism (e.g. a one-shot sum that claims several steps). composes: whether its releases
    are central (epsilon, delta)-DP events that the accountants compose; False for guarantees of another kind (a
    local metric guarantee), which are reported beside a study's epsilon, never inside it."""

    name: str
    summary: str
    check: Callable[[DPEvent], None] = lambda event: None
    composes: bool = True


MECHANISMS: dict[str, Mechanism] = {}


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    """Add `mechanism` to the registry (a name may be registered once)."""
    if mechanism.name in MECHANISMS:
        raise ValueError(f"mechanism {mechanism.name!r} is already registered")
    MECHANISMS[mechanism.name] = mechanism
    return mechanism


def get_mechanism(name: str) -> Mechanism:
    """The registered mechanism `name`; ValueError naming the known ones."""
    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism {name!r}; known: {sorted(MECHANISMS)}")
    return MECHANISMS[name]


def require_composable(name: str) -> Mechanism:
    """The registered mechanism `name` if its releases enter a central (epsilon, delta) composition; ValueError naming
    it otherwise (a dx release is reported beside epsilon, never composed into it)."""
    mechanism = get_mechanism(name)
    if not mechanism.composes:
        raise ValueError(f"mechanism {name!r} does not compose into a central (epsilon, delta): {mechanism.summary}")
    return mechanism


register_mechanism(Mechanism(
    name="dp_sgd", summary="DP-SGD: Poisson-sampled steps of per-example clipped gradients plus Gaussian noise "
                           "(privacy.engine)"))

from privacy.mechanisms import dx, gaussian_sum  # noqa: E402,F401  (registers "dx" and "gaussian_sum")
