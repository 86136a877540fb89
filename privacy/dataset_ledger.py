"""The dataset ledger: one lifetime privacy budget per private dataset, shared by every study that trains on it,
kept in a persistent store (SQLite file or PostgreSQL) with race-free reservations. Not here: a study's own
per-stage ledger (ledger.py), the epsilon arithmetic (accounting.py), storage details (ledger_store.py).

Assumptions: the unit of privacy is one example of the dataset, identified by an opaque string (a keyed fingerprint
of the whole source file, given by the caller). Every release is treated as touching every example of the dataset,
with its sampling rate relative to the subsample it trained on: composing all releases is then an upper bound on
the dataset's epsilon (add-or-remove-one neighbours, Poisson sampling, as in accounting.py). Releases are composed
at the caller's delta with the caller's accountant, whatever delta each study used.

Protocol of a study run: `reserve` the planned stages after planning, `begin` right before each private stage
trains, `commit` after its outputs are saved, `release` in `finally`. A use of the data that is not a central DP
release (a non-private baseline; split fine-tuning under local d_chi noise) is recorded by `record_uncomposed`:
listed in the history with what it guarantees, never composed into (nor refused by) the lifetime budget.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Self

import sqlalchemy as sa

from . import ledger_store as store
from .accounting import BudgetError, DPEvent, compose_epsilon
from .ledger_store import NONPRIVATE, RESERVED, SPENT, Release, default_ledger_url, releases
from .mechanisms import get_mechanism
from .noise import NOISE_SOURCES

__all__ = ["DatasetBudgetError", "DatasetLedger", "Release", "default_ledger_url"]

log = logging.getLogger(__name__)
RESERVATION_TTL_S = 48 * 3600.0
RELATIVE_SLACK = 1e-9  # rounding allowance on the budget, as in Ledger.check_fits

Planned = Sequence[tuple[str, DPEvent, str]]  # (stage name, event, mechanism)


class DatasetBudgetError(BudgetError):
    """Releases on a dataset would compose to more than its lifetime budget."""


class DatasetLedger:
    """The releases of every study on every dataset in one store, and the lifetime-budget checks made on them.

    url: a SQLAlchemy URL (sqlite:///path, postgresql://...) or a plain path (a SQLite file, created with mode
    0600). create: create the file and the schema if missing (False: FileNotFoundError for a missing SQLite file,
    for read-only use). reservation_ttl_s: reservations older than this are dropped as stale.
    """

    def __init__(self, url: str | os.PathLike, *, create: bool = True,
                 reservation_ttl_s: float = RESERVATION_TTL_S) -> None:
        self.url = store.resolve_url(url)
        self.reservation_ttl_s = reservation_ttl_s
        self._engine = store.open_engine(self.url, create=create)
        if create:
            store.create_schema(self._engine)
        else:  # best effort: a store it cannot reach or read fails on first use, where the callers report it
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                store.upgrade_schema(self._engine)

    def __repr__(self) -> str:
        return f"DatasetLedger({self.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def reserve(self, *, dataset: str, study: str, study_key: str, run_id: str, planned: Planned,
                epsilon_budget: float, delta: float, accountant: str = "prv") -> list[str]:
        """Reserve the planned releases of run `run_id` on `dataset`; returns the stage names reserved.

        Stages already spent on `dataset` by the same `study_key` are expected cache hits and reserve nothing.
        Composes, at `delta` with `accountant`, every spent release of the dataset, every live reservation of
        other runs and the stages to reserve; DatasetBudgetError if that exceeds `epsilon_budget`. Replaces any
        earlier reservations of the same run (a retried run reserves once). One exclusive transaction.
        """
        _check_args(dataset=dataset, epsilon_budget=epsilon_budget, planned=planned)
        with store.transaction(self._engine, exclusive=True) as conn:
            rows = self._live_rows(conn, dataset)
            conn.execute(sa.delete(releases).where(releases.c.dataset == dataset, releases.c.run_id == run_id,
                                                   releases.c.status == RESERVED))
            rows = [r for r in rows if not (r.status == RESERVED and r.run_id == run_id)]
            todo = _not_cached(rows, planned, study_key=study_key)
            if todo:  # a rerun served from the cache adds nothing, whatever was spent since
                _check_budget(rows, todo, dataset=dataset, study=study, epsilon_budget=epsilon_budget, delta=delta,
                              accountant=accountant)
            now = store.timestamp(store.utc_now())
            for stage, event, mechanism in todo:
                conn.execute(sa.insert(releases).values(_reserved_row(
                    dataset=dataset, study=study, study_key=study_key, run_id=run_id, stage=stage, event=event,
                    mechanism=mechanism, delta=delta, accountant=accountant, now=now)))
        log.info("run %s reserved %s on dataset %s", run_id, [s for s, _, _ in todo], dataset)
        return [stage for stage, _, _ in todo]

    def check(self, *, dataset: str, study: str, study_key: str, planned: Planned, epsilon_budget: float,
              delta: float, accountant: str = "prv") -> float:
        """What `reserve` would decide, read-only (nothing reserved, stale reservations only skipped): the dataset's
        epsilon with the stages of `planned` that are not cached for `study_key`; DatasetBudgetError (naming the
        studies that spent the budget) if over `epsilon_budget`. A check before a run, not a guarantee: another run
        may reserve in between."""
        _check_args(dataset=dataset, epsilon_budget=epsilon_budget, planned=planned)
        now = store.utc_now()
        with store.transaction(self._engine, exclusive=False) as conn:
            rows = [r for r in store.select_rows(conn, releases.c.dataset == dataset)
                    if not (r.status == RESERVED and store.is_stale(r, now=now, ttl_s=self.reservation_ttl_s))]
        return _check_budget(rows, _not_cached(rows, planned, study_key=study_key), dataset=dataset, study=study,
                             epsilon_budget=epsilon_budget, delta=delta, accountant=accountant)

    def begin(self, *, dataset: str, study: str, study_key: str, run_id: str, stage: str, event: DPEvent,
              mechanism: str, epsilon_budget: float, delta: float, accountant: str = "prv") -> float:
        """Call right BEFORE `stage` trains or releases: the last, race-free budget check; returns the epsilon
        composed with it.

        Composes every spent release and every live reservation of the dataset (this run's included), with this
        run's reservation for `stage` replaced by `event` (inserted if the run has none: a stage assumed to be a
        cache hit that retrains spends again). DatasetBudgetError if over `epsilon_budget`. One exclusive
        transaction: two processes can never both pass and overspend.
        """
        _check_args(dataset=dataset, epsilon_budget=epsilon_budget, planned=[(stage, event, mechanism)])
        with store.transaction(self._engine, exclusive=True) as conn:
            rows = self._live_rows(conn, dataset)
            mine = [r.id for r in rows if r.status == RESERVED and r.run_id == run_id and r.stage == stage]
            others = [r for r in rows if r.id not in mine]
            epsilon = _check_budget(others, [(stage, event, mechanism)], dataset=dataset, study=study,
                                    epsilon_budget=epsilon_budget, delta=delta, accountant=accountant)
            conn.execute(sa.delete(releases).where(releases.c.id.in_(mine)))
            conn.execute(sa.insert(releases).values(_reserved_row(
                dataset=dataset, study=study, study_key=study_key, run_id=run_id, stage=stage, event=event,
                mechanism=mechanism, delta=delta, accountant=accountant, now=store.timestamp(store.utc_now()))))
        return epsilon

    def commit(self, *, dataset: str, run_id: str, stage: str, stage_key: str, max_grad_norm: float,
               noise: str) -> Release:
        """After `stage`'s outputs are saved: its reservation becomes a spent release with `stage_key` (the
        stage's output/cache key), `max_grad_norm` (L2 clipping norm, for audit) and `noise` (one of
        privacy.noise.NOISE_SOURCES).
        Idempotent for the same stage_key; LookupError if the run never began the stage (or its reservation was
        dropped as stale: a stage that ran longer than the TTL, see `reservation_ttl_s`)."""
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        if not stage_key or not max_grad_norm > 0:
            raise ValueError(f"commit needs a stage_key and max_grad_norm > 0, got {stage_key!r}, {max_grad_norm!r}")
        ours = (releases.c.dataset == dataset, releases.c.run_id == run_id, releases.c.stage == stage)
        with store.transaction(self._engine, exclusive=True) as conn:
            reserved = select_first(conn, *ours, releases.c.status == RESERVED)
            if reserved is not None:
                conn.execute(sa.update(releases).where(releases.c.id == reserved.id).values(
                    status=SPENT, stage_key=stage_key, max_grad_norm=max_grad_norm, noise=noise,
                    spent_at=store.timestamp(store.utc_now())))
            done = select_first(conn, *ours, releases.c.status == SPENT, releases.c.stage_key == stage_key)
        if done is None:
            raise LookupError(f"run {run_id} has no reservation for stage '{stage}' on dataset {dataset}: "
                              f"call begin before the stage trains")
        return done

    def release(self, *, run_id: str) -> int:
        """Delete every remaining reservation of `run_id` (stages that never began); returns how many."""
        with store.transaction(self._engine, exclusive=True) as conn:
            result = conn.execute(sa.delete(releases).where(releases.c.run_id == run_id,
                                                            releases.c.status == RESERVED))
        return result.rowcount

    def record_nonprivate(self, *, dataset: str, study: str, study_key: str, run_id: str, stage: str,
                          stage_key: str) -> Release:
        """Record a model trained on `dataset` WITHOUT differential privacy (a non-private baseline).

        It is listed by `history` (mechanism "nonprivate", infinite epsilon) but skipped by every composition:
        its results carry no guarantee, and counting it would make the dataset's budget infinite, refusing every
        later study. Whoever releases such a model gives up the dataset's guarantee; the row makes that visible.
        Idempotent for the same (run_id, stage, stage_key).
        """
        return self.record_uncomposed(dataset=dataset, study=study, study_key=study_key, run_id=run_id, stage=stage,
                                      stage_key=stage_key, mechanism=NONPRIVATE, guarantee=None)

    def record_uncomposed(self, *, dataset: str, study: str, study_key: str, run_id: str, stage: str, stage_key: str,
                          mechanism: str, guarantee: str | None, eta: float | None = None, noise: str = "") -> Release:
        """Record a use of `dataset` that is not a central (epsilon, delta)-DP release, so enters no composition:
        mechanism "nonprivate" (no guarantee at all), or a mechanism registered with composes=False, e.g. "dx" with
        its `eta` (a local d_chi guarantee per token representation, not per example). `guarantee`: what it does
        guarantee, in words (the unit, and what is unprotected). noise: a privacy.noise source, or "" for none.

        Listed by `history`, never counted by `reserve`, `check` or `begin` (an epsilon over examples it does not
        have: not an overspend, and not a spend of the lifetime budget either). Idempotent for the same (run_id,
        stage, stage_key, mechanism).
        """
        if mechanism != NONPRIVATE and store.composes(mechanism):
            raise ValueError(f"mechanism {mechanism!r} composes into epsilon: reserve, begin and commit it")
        if mechanism != NONPRIVATE and not (eta is not None and 0 < eta < math.inf):
            raise ValueError(f"a {mechanism} release needs its finite eta > 0, got {eta!r} (no noise: nonprivate)")
        if noise and noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES} or empty, got {noise!r}")
        with store.transaction(self._engine, exclusive=True) as conn:
            ours = (releases.c.dataset == dataset, releases.c.run_id == run_id, releases.c.stage == stage,
                    releases.c.stage_key == stage_key, releases.c.mechanism == mechanism)
            if select_first(conn, *ours) is None:
                now = store.timestamp(store.utc_now())
                conn.execute(sa.insert(releases).values(
                    dataset=dataset, study=study, study_key=study_key, run_id=run_id, stage=stage,
                    stage_key=stage_key, mechanism=mechanism, accountant="", noise=noise, status=SPENT,
                    owner=store.owner(), created_at=now, spent_at=now, eta=eta, guarantee=guarantee))
            return select_first(conn, *ours)

    def history(self, dataset: str | None = None) -> list[Release]:
        """Spent releases of `dataset` (every dataset if None), oldest first; uncomposed ones (non-private, local)
        included."""
        conditions = [releases.c.status == SPENT] + ([releases.c.dataset == dataset] if dataset is not None else [])
        with store.transaction(self._engine, exclusive=False) as conn:
            return store.select_rows(conn, *conditions)

    def epsilon(self, dataset: str, *, delta: float, accountant: str = "prv") -> float:
        """Epsilon of every spent central DP release on `dataset` composed at `delta` (uncomposed ones skipped)."""
        return compose_epsilon(_events(self.history(dataset)), delta=delta, accountant=accountant)

    def datasets(self) -> list[str]:
        """Datasets with at least one spent release, sorted."""
        query = sa.select(releases.c.dataset).where(releases.c.status == SPENT).distinct()
        with store.transaction(self._engine, exclusive=False) as conn:
            return sorted(conn.scalars(query))

    def _live_rows(self, conn: sa.Connection, dataset: str) -> list[Release]:
        """Spent rows and live reservations of `dataset`, after deleting stale reservations (of any dataset)."""
        now = store.utc_now()
        stale = [r for r in store.select_rows(conn, releases.c.status == RESERVED)
                 if store.is_stale(r, now=now, ttl_s=self.reservation_ttl_s)]
        if stale:
            log.warning("dropping %d stale reservation(s): %s", len(stale), sorted({r.owner for r in stale}))
            conn.execute(sa.delete(releases).where(releases.c.id.in_([r.id for r in stale])))
        return store.select_rows(conn, releases.c.dataset == dataset)


def select_first(conn: sa.Connection, *conditions) -> Release | None:
    rows = store.select_rows(conn, *conditions)
    return rows[0] if rows else None


def _events(rows: Sequence[Release]) -> list[DPEvent]:
    return [r.event for r in rows if r.event is not None]


def _not_cached(rows: Sequence[Release], planned: Planned, *, study_key: str) -> list:
    """The planned stages not already spent by the same study (those are cache hits: a rerun adds nothing)."""
    cached = {r.stage for r in rows if r.status == SPENT and r.study_key == study_key and r.event is not None}
    return [(stage, event, mechanism) for stage, event, mechanism in planned if stage not in cached]


def _reserved_row(*, dataset, study, study_key, run_id, stage, event: DPEvent, mechanism, delta, accountant,
                  now: str) -> dict:
    return {"dataset": dataset, "study": study, "study_key": study_key, "run_id": run_id, "stage": stage,
            "stage_key": "", "noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate,
            "num_steps": event.num_steps, "mechanism": mechanism, "delta": delta, "accountant": accountant,
            "noise": "", "status": RESERVED, "owner": store.owner(), "created_at": now}


def _check_args(*, dataset: str, epsilon_budget: float, planned: Planned) -> None:
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty string, got {dataset!r}")
    if not epsilon_budget > 0:
        raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget!r}")
    names = [stage for stage, _, _ in planned]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate planned stages: {names}")
    for stage, event, mechanism in planned:
        if not isinstance(event, DPEvent):
            raise TypeError(f"stage '{stage}': expected a DPEvent, got {type(event).__name__}")
        try:
            get_mechanism(mechanism).check(event)
        except ValueError as err:
            raise ValueError(f"stage '{stage}': {err}") from None


def _check_budget(counted: Sequence[Release], adding: Planned, *, dataset: str, study: str, epsilon_budget: float,
                  delta: float, accountant: str) -> float:
    """Epsilon of `counted` and `adding` composed; DatasetBudgetError if over `epsilon_budget`."""
    epsilon = compose_epsilon([*_events(counted), *(e for _, e, _ in adding)], delta=delta, accountant=accountant)
    if epsilon > epsilon_budget * (1 + RELATIVE_SLACK):
        raise DatasetBudgetError(_refusal(counted, adding, epsilon, dataset=dataset, study=study,
                                          epsilon_budget=epsilon_budget, delta=delta, accountant=accountant))
    return epsilon


def _refusal(counted: Sequence[Release], adding: Planned, epsilon: float, *, dataset: str, study: str,
             epsilon_budget: float, delta: float, accountant: str) -> str:
    """The refusal: the budget, what the dataset has spent and by whom, what this study would add, the way out."""
    spent = [r for r in counted if r.status == SPENT and r.event is not None]
    held = [r for r in counted if r.status == RESERVED]
    spent_epsilon = compose_epsilon(_events(spent), delta=delta, accountant=accountant)
    before = compose_epsilon(_events(counted), delta=delta, accountant=accountant)
    studies = {}
    for r in spent:
        count, _ = studies.get(r.study, (0, ""))
        studies[r.study] = (count + 1, r.spent_at[:10])
    by_whom = "; ".join(f"study '{name}' ({count} release{'s' * (count > 1)}, last on {last})"
                        for name, (count, last) in studies.items()) or "none"
    reserved = (f"; runs in progress hold reservations for {len(held)} more "
                f"(epsilon {before:.3f} with them)" if held else "")
    return (f"dataset {dataset} has a lifetime budget of epsilon = {epsilon_budget:g} (delta = {delta:g}, "
            f"{accountant} accountant) for all studies together; it has already spent epsilon = {spent_epsilon:.3f} "
            f"in {len(spent)} release(s), by: {by_whom}{reserved}. Study '{study}' would add "
            f"{epsilon - before:.3f} ({', '.join(s for s, _, _ in adding)}), bringing it to {epsilon:.3f}. "
            f"To raise the dataset's lifetime budget deliberately, set privacy.dataset_budget "
            f"(e.g. --set privacy.dataset_budget={math.ceil(epsilon):g}); it binds every study on this dataset.")
