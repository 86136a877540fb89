"""Tests for privacy.dataset_ledger: one lifetime budget per dataset across studies (refusal naming the earlier
study, cache-hit reruns, stages that begin unreserved, stale reservations, a real two-process race), history and
epsilon, non-private rows, the store's file and URLs."""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from privacy import ledger_store
from privacy.accounting import BudgetError, DPEvent, compose_epsilon
from privacy.dataset_ledger import DatasetBudgetError, DatasetLedger, default_ledger_url

DS, DELTA, ACC = "fp-sst2", 1e-5, "rdp"  # RDP: fast, and these tests check bookkeeping, not the accountant
TEACHER = DPEvent(noise_multiplier=1.0, sample_rate=0.02, num_steps=300)
DISTILL = DPEvent(noise_multiplier=1.5, sample_rate=0.05, num_steps=200)
PLAN = [("teacher", TEACHER, "dp_sgd"), ("distill", DISTILL, "dp_sgd")]
RACE_ROUNDS = 4


@functools.cache
def eps(*events: DPEvent) -> float:
    return compose_epsilon(events, delta=DELTA, accountant=ACC)


def one_fits_not_two() -> float:
    """A budget that one teacher release fits and two do not."""
    return (eps(TEACHER) + eps(TEACHER, TEACHER)) / 2


@pytest.fixture()
def ledger(tmp_path):
    with DatasetLedger(tmp_path / "home" / "ledger.db") as ledger:
        yield ledger


def budget_args(budget: float, **override) -> dict:
    return dict(dataset=DS, epsilon_budget=budget, delta=DELTA, accountant=ACC) | override


def spend(ledger, *, study: str, run_id: str, budget: float, study_key: str | None = None, plan=PLAN,
          dataset: str = DS) -> list[str]:
    """One study run through the whole protocol: reserve, begin/commit each reserved stage, release."""
    who = dict(study=study, study_key=study_key or study, run_id=run_id)
    args = budget_args(budget, dataset=dataset)
    reserved = ledger.reserve(planned=plan, **who, **args)
    for stage, event, mechanism in plan:
        if stage in reserved:
            ledger.begin(stage=stage, event=event, mechanism=mechanism, **who, **args)
            ledger.commit(dataset=dataset, run_id=run_id, stage=stage, stage_key=f"{stage}-{run_id}",
                          max_grad_norm=1.0, noise="secret")
    ledger.release(run_id=run_id)
    return reserved


def test_second_study_over_the_budget_is_refused_and_names_the_first(ledger):
    budget = 1.2 * eps(TEACHER, DISTILL)
    assert spend(ledger, study="first", run_id="r1", budget=budget) == ["teacher", "distill"]
    with pytest.raises(DatasetBudgetError) as info:
        ledger.reserve(study="second", study_key="second", run_id="r2", planned=PLAN, **budget_args(budget))
    message = str(info.value)
    assert isinstance(info.value, BudgetError)
    assert f"dataset {DS} has a lifetime budget of epsilon = {budget:g}" in message
    assert f"already spent epsilon = {eps(TEACHER, DISTILL):.3f} in 2 release(s)" in message
    today = datetime.now(UTC).date().isoformat()
    assert f"study 'first' (2 releases, last on {today})" in message
    assert "Study 'second' would add" in message and "privacy.dataset_budget" in message
    assert ledger.release(run_id="r2") == 0  # a refused reserve leaves nothing behind
    assert spend(ledger, study="second", run_id="r3", budget=budget, dataset="fp-other") == ["teacher", "distill"]


def test_rerun_of_the_same_study_reserves_nothing_and_passes(ledger):
    budget = 1.01 * eps(TEACHER, DISTILL)
    spend(ledger, study="first", run_id="r1", budget=budget)
    assert ledger.reserve(study="first", study_key="first", run_id="r2", planned=PLAN, **budget_args(budget)) == []
    assert ledger.epsilon(DS, delta=DELTA, accountant=ACC) == pytest.approx(eps(TEACHER, DISTILL))
    with pytest.raises(DatasetBudgetError):  # a changed config is another study: it spends again
        ledger.reserve(study="first", study_key="first-v2", run_id="r3", planned=PLAN, **budget_args(budget))


def test_a_stage_that_begins_without_reservation_is_counted(ledger):
    budget = 1.01 * eps(TEACHER, DISTILL)
    spend(ledger, study="first", run_id="r1", budget=budget)
    who = dict(study="first", study_key="first", run_id="r2", stage="distill", event=DISTILL, mechanism="dp_sgd")
    assert ledger.reserve(study="first", study_key="first", run_id="r2", planned=PLAN, **budget_args(budget)) == []
    with pytest.raises(DatasetBudgetError, match="would add"):  # the assumed cache hit retrains
        ledger.begin(**who, **budget_args(budget))
    assert ledger.begin(**who, **budget_args(10.0)) == pytest.approx(eps(TEACHER, DISTILL, DISTILL))
    ledger.commit(dataset=DS, run_id="r2", stage="distill", stage_key="distill-v2", max_grad_norm=1.0, noise="secure")
    assert [(r.run_id, r.stage) for r in ledger.history(DS)] == [("r1", "teacher"), ("r1", "distill"),
                                                                   ("r2", "distill")]
    assert ledger.epsilon(DS, delta=DELTA, accountant=ACC) == pytest.approx(eps(TEACHER, DISTILL, DISTILL))


def test_reservations_of_other_runs_count_and_a_run_replaces_its_own(ledger):
    budget, plan = one_fits_not_two(), [("teacher", TEACHER, "dp_sgd")]
    args = dict(planned=plan, **budget_args(budget))
    assert ledger.reserve(study="a", study_key="a", run_id="ra", **args) == ["teacher"]
    assert ledger.reserve(study="a", study_key="a", run_id="ra", **args) == ["teacher"]  # a retry: once
    with pytest.raises(DatasetBudgetError, match="hold reservations for 1 more"):
        ledger.reserve(study="b", study_key="b", run_id="rb", **args)
    with pytest.raises(DatasetBudgetError):
        ledger.begin(study="b", study_key="b", run_id="rb", stage="teacher", event=TEACHER, mechanism="dp_sgd",
                     **budget_args(budget))
    ledger.begin(study="a", study_key="a", run_id="ra", stage="teacher", event=TEACHER, mechanism="dp_sgd",
                 **budget_args(budget))  # its own reservation
    assert ledger.release(run_id="ra") == 1  # crashed before commit: nothing saved, nothing spent
    assert ledger.reserve(study="b", study_key="b", run_id="rb", **args) == ["teacher"]


def test_commit_is_idempotent_and_needs_begin(ledger):
    commit = dict(dataset=DS, run_id="r1", stage="teacher", stage_key="k-teacher", max_grad_norm=0.5, noise="secret")
    with pytest.raises(LookupError, match="call begin"):
        ledger.commit(**commit)
    ledger.begin(study="s", study_key="s", run_id="r1", stage="teacher", event=TEACHER, mechanism="dp_sgd",
                 **budget_args(10.0))
    first, again = ledger.commit(**commit), ledger.commit(**commit)
    assert first == again and len(ledger.history()) == 1
    assert (first.status, first.stage_key, first.max_grad_norm, first.noise) == ("spent", "k-teacher", 0.5, "secret")
    with pytest.raises(ValueError, match="noise"):
        ledger.commit(**commit | {"noise": "loud"})


def test_stale_reservations_are_dropped(ledger, monkeypatch):
    budget, plan = one_fits_not_two(), [("teacher", TEACHER, "dp_sgd")]
    args = dict(planned=plan, **budget_args(budget))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = ledger_store.owner().rpartition(":")[0]
    assert host.startswith(socket.gethostname())
    with monkeypatch.context() as m:  # a crashed process on this host
        m.setattr(ledger_store, "owner", lambda: f"{host}:{dead}")
        ledger.reserve(study="crashed", study_key="c", run_id="r-dead", **args)
    assert ledger.reserve(study="live", study_key="l", run_id="r-live", **args) == ["teacher"]
    assert ledger.release(run_id="r-live") == 1 and ledger.release(run_id="r-dead") == 0
    with monkeypatch.context() as m:  # another host, long ago
        m.setattr(ledger_store, "owner", lambda: "elsewhere:1")
        m.setattr(ledger_store, "utc_now", lambda: datetime.now(UTC) - timedelta(hours=49))
        ledger.reserve(study="old", study_key="o", run_id="r-old", **args)
    assert ledger.reserve(study="live", study_key="l", run_id="r-live", **args) == ["teacher"]
    assert ledger.release(run_id="r-live") == 1
    with monkeypatch.context() as m:  # same host name, another pid namespace (container), recent: it counts
        m.setattr(ledger_store, "owner", lambda: f"{socket.gethostname()}/pid:[1]:{dead}")
        ledger.reserve(study="remote", study_key="r", run_id="r-remote", **args)
    with pytest.raises(DatasetBudgetError):
        ledger.reserve(study="live", study_key="l", run_id="r-live", **args)


def _race(url: str, who: str, budget: float, barrier, results) -> None:
    """One of two processes: each round, reserve (even rounds) or begin (odd) the same teacher on a fresh dataset."""
    with DatasetLedger(url) as ledger:
        for round_ in range(RACE_ROUNDS):
            barrier.wait(timeout=120)
            args = dict(study=f"study-{who}", study_key=who, run_id=f"{round_}-{who}",
                        **budget_args(budget, dataset=f"race-{round_}"))
            try:
                if round_ % 2 == 0:
                    ledger.reserve(planned=[("teacher", TEACHER, "dp_sgd")], **args)
                else:
                    ledger.begin(stage="teacher", event=TEACHER, mechanism="dp_sgd", **args)
                results.put((round_, "passed"))
            except DatasetBudgetError:
                results.put((round_, "refused"))
            except Exception as err:
                results.put((round_, f"error: {err!r}"))


def test_two_processes_racing_for_the_last_epsilon_exactly_one_passes(tmp_path):
    context = multiprocessing.get_context("spawn")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_race, args=(url, who, one_fits_not_two(), barrier, results))
               for who in ("a", "b")]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * RACE_ROUNDS)]
    for worker in workers:
        worker.join(timeout=60)
    by_round = {r: sorted(o for round_, o in outcomes if round_ == r) for r in range(RACE_ROUNDS)}
    assert by_round == {r: ["passed", "refused"] for r in range(RACE_ROUNDS)}


def test_history_epsilon_and_datasets(ledger):
    spend(ledger, study="first", run_id="r1", budget=10.0)
    spend(ledger, study="other", run_id="r2", budget=10.0, dataset="fp-other", plan=PLAN[:1])
    ledger.reserve(study="third", study_key="t", run_id="r3", planned=PLAN, **budget_args(10.0))  # not history
    rows = ledger.history(DS)
    assert [(r.study, r.stage, r.status, r.stage_key) for r in rows] == [
        ("first", "teacher", "spent", "teacher-r1"), ("first", "distill", "spent", "distill-r1")]
    teacher = rows[0]
    assert teacher.event == TEACHER and (teacher.delta, teacher.accountant, teacher.mechanism) == (DELTA, ACC, "dp_sgd")
    assert teacher.owner.endswith(":" + str(os.getpid()))
    assert datetime.fromisoformat(teacher.created_at) <= datetime.fromisoformat(teacher.spent_at)
    with pytest.raises(AttributeError):
        teacher.study = "renamed"  # frozen
    assert ledger.epsilon(DS, delta=DELTA, accountant=ACC) == pytest.approx(eps(TEACHER, DISTILL))
    assert ledger.datasets() == ["fp-other", DS]
    assert [r.dataset for r in ledger.history()] == [DS, DS, "fp-other"]
    with DatasetLedger(f"sqlite:///{ledger.url.database}", create=False) as again:  # persisted
        assert again.history() == ledger.history()


def test_nonprivate_release_is_listed_but_not_composed(ledger):
    spend(ledger, study="first", run_id="r1", budget=10.0, plan=PLAN[:1])
    baseline = dict(dataset=DS, study="baseline", study_key="b", run_id="rb", stage="nonprivate", stage_key="np-1")
    row = ledger.record_nonprivate(**baseline)
    assert ledger.record_nonprivate(**baseline) == row  # idempotent
    assert (row.mechanism, row.event, row.noise_multiplier, row.status) == ("nonprivate", None, None, "spent")
    assert [r.mechanism for r in ledger.history(DS)] == ["dp_sgd", "nonprivate"]
    assert ledger.epsilon(DS, delta=DELTA, accountant=ACC) == pytest.approx(eps(TEACHER))
    assert ledger.reserve(study="second", study_key="s", run_id="r2", planned=PLAN[:1],
                          **budget_args(1.01 * eps(TEACHER, TEACHER))) == ["teacher"]


def test_a_local_dx_release_is_recorded_with_its_guarantee_and_never_composed_or_refused(ledger):
    budget = 1.01 * eps(TEACHER)  # one teacher release fits, with no room for anything else
    spend(ledger, study="first", run_id="r1", budget=budget, plan=PLAN[:1])
    local = dict(dataset=DS, study="sap", study_key="k", run_id="rs", stage="split_k0_eta50", stage_key="sp-1")
    guarantee = "local d_chi: eta * ||x - x'|| per token representation; not central DP"
    row = ledger.record_uncomposed(**local, mechanism="dx", eta=50.0, guarantee=guarantee, noise="secret")
    assert ledger.record_uncomposed(**local, mechanism="dx", eta=50.0, guarantee=guarantee, noise="secret") == row
    assert (row.mechanism, row.eta, row.guarantee, row.event, row.status) == ("dx", 50.0, guarantee, None, "spent")
    assert [r.mechanism for r in ledger.history(DS)] == ["dp_sgd", "dx"]
    assert ledger.epsilon(DS, delta=DELTA, accountant=ACC) == pytest.approx(eps(TEACHER))  # not composed
    # the lifetime budget is as full as before: a rerun of the first study passes, a second teacher is refused for
    # the teacher it adds, not for the dx row
    assert ledger.check(study="first", study_key="first", planned=PLAN[:1], **budget_args(budget)) \
        == pytest.approx(eps(TEACHER))
    with pytest.raises(DatasetBudgetError, match="1 release"):
        ledger.check(study="other", study_key="o", planned=PLAN[:1], **budget_args(budget))
    with pytest.raises(ValueError, match="composes into epsilon"):
        ledger.record_uncomposed(**local, mechanism="dp_sgd", eta=None, guarantee="")
    with pytest.raises(ValueError, match="finite eta"):
        ledger.record_uncomposed(**local, mechanism="dx", eta=float("inf"), guarantee="")


def _old_ledger(path):
    """A ledger file as the first version of the table made it (no ADDED_COLUMNS)."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        ledger_store.metadata.create_all(conn)
        for name in ledger_store.ADDED_COLUMNS:
            conn.execute(sa.text(f"ALTER TABLE {ledger_store.releases.name} DROP COLUMN {name}"))
    engine.dispose()
    return path


def test_a_ledger_created_before_the_uncomposed_columns_is_read_without_create(tmp_path):
    """`budget spent` and the pre-flight open the ledger read-only (create=False): an earlier version's file reads."""
    path = _old_ledger(tmp_path / "old.db")
    with DatasetLedger(path, create=False) as ledger:
        assert ledger.history(DS) == []
    with DatasetLedger(path) as ledger:
        spend(ledger, study="first", run_id="r1", budget=10.0, plan=PLAN[:1])
    with DatasetLedger(path, create=False) as ledger:
        assert [(r.mechanism, r.eta) for r in ledger.history(DS)] == [("dp_sgd", None)]
    with pytest.raises(FileNotFoundError):
        DatasetLedger(tmp_path / "missing.db", create=False)


def test_a_ledger_created_before_the_uncomposed_columns_gains_them(tmp_path):
    path = _old_ledger(tmp_path / "old.db")
    with DatasetLedger(path) as ledger:
        spend(ledger, study="first", run_id="r1", budget=10.0, plan=PLAN[:1])
        ledger.record_uncomposed(dataset=DS, study="sap", study_key="k", run_id="rs", stage="split", stage_key="s",
                                 mechanism="dx", eta=5.0, guarantee="local")
        assert [(r.mechanism, r.eta) for r in ledger.history(DS)] == [("dp_sgd", None), ("dx", 5.0)]
    with DatasetLedger(path) as again:  # a second opening finds the columns there
        assert len(again.history(DS)) == 2


def test_plain_path_creates_a_private_file(tmp_path):
    path = tmp_path / "new" / "folder" / "ledger.db"
    with DatasetLedger(path) as ledger:
        spend(ledger, study="first", run_id="r1", budget=10.0, plan=PLAN[:1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileNotFoundError, match="no dataset ledger"):
        DatasetLedger(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_default_url_and_bad_urls(monkeypatch, tmp_path):
    monkeypatch.delenv("DPCOMPRESS_LEDGER_URL", raising=False)
    monkeypatch.setenv("DPCOMPRESS_HOME", str(tmp_path / "dp"))
    assert default_ledger_url() == f"sqlite:///{tmp_path}/dp/ledger.db"
    monkeypatch.delenv("DPCOMPRESS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_ledger_url() == f"sqlite:///{tmp_path}/.dpcompress/ledger.db"
    monkeypatch.setenv("DPCOMPRESS_LEDGER_URL", "postgresql://dp@db.internal/ledger")
    assert default_ledger_url() == "postgresql://dp@db.internal/ledger"
    for bad, match in [("mysql://u@h/db", "unsupported"), ("sqlite://", "in-memory"),
                       ("sqlite:///:memory:", "in-memory"), ("not a url://", "not a database URL")]:
        with pytest.raises(ValueError, match=match):
            DatasetLedger(bad)
