"""Tests for privacy.ledger: entries, JSON round trip, composed epsilon, the pre-training budget check,
immutability, and sequential noise planning."""

from __future__ import annotations

import dataclasses
import json

import pytest

from privacy.accounting import BudgetError, DPEvent, compose_epsilon
from privacy.ledger import BudgetExceededError, Ledger, LedgerEntry, union_epsilon
from privacy.planning import StagePlan, plan_lines, plan_noise

DELTA = 1e-5
TEACHER = DPEvent(noise_multiplier=1.0, sample_rate=0.02, num_steps=300)
STUDENT = DPEvent(noise_multiplier=1.5, sample_rate=0.05, num_steps=200)


def entry(stage: str = "teacher", **override) -> LedgerEntry:
    fields = dict(stage=stage, noise_multiplier=1.0, sample_rate=0.02, num_steps=300, max_grad_norm=1.0,
                  epsilon_after=1.0, delta=DELTA, accountant="prv", dataset_fingerprint="ab" * 32)
    return LedgerEntry(**(fields | override))


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return (Ledger()
            .record(stage="teacher", event=TEACHER, max_grad_norm=1.0, delta=DELTA, dataset_fingerprint="f1")
            .record(stage="distill", event=STUDENT, max_grad_norm=0.5, delta=DELTA, dataset_fingerprint="f1"))


def test_entry_defaults_and_event():
    e = entry()
    assert (e.sampling, e.unit, e.accountant) == ("poisson", "example", "prv")
    assert e.event == TEACHER


@pytest.mark.parametrize(("override", "match"), [
    (dict(stage=""), "stage"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(sample_rate=2.0), "sample_rate"),
    (dict(num_steps=-1), "num_steps"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(delta=0.0), "delta"),
    (dict(accountant="moments"), "accountant"),
    (dict(sampling="shuffle"), "sampling"),
    (dict(unit="user"), "unit"),
    (dict(mechanism="laplace"), "mechanism"),
    (dict(mechanism="gaussian_sum"), "one step at sample rate 1"),
])
def test_entry_validation(override, match):
    with pytest.raises(ValueError, match=match):
        entry(**override)


def test_keyword_only():
    with pytest.raises(TypeError):
        LedgerEntry("teacher", 1.0, 0.02, 300, 1.0, 1.0, DELTA, "prv")
    with pytest.raises(TypeError):
        Ledger().epsilon(DELTA)
    with pytest.raises(TypeError):
        StagePlan("teacher", 0.02, 300, 1.0)


def test_empty_ledger_spends_nothing():
    assert Ledger().epsilon(delta=DELTA) == 0.0
    assert Ledger().events() == [] and Ledger().stage_names() == []


def test_epsilon_after_is_the_composition_so_far(ledger):
    assert ledger.stage_names() == ["teacher", "distill"]
    assert ledger.entries[0].epsilon_after == compose_epsilon([TEACHER], delta=DELTA)
    assert ledger.entries[1].epsilon_after == compose_epsilon([TEACHER, STUDENT], delta=DELTA)
    assert ledger.epsilon(delta=DELTA) == ledger.entries[-1].epsilon_after
    assert ledger.entries[0].epsilon_after < ledger.entries[1].epsilon_after
    assert ledger.events() == [TEACHER, STUDENT]


def test_epsilon_with_other_accountant_and_delta(ledger):
    assert ledger.epsilon(delta=DELTA, accountant="rdp") > ledger.epsilon(delta=DELTA)
    assert ledger.epsilon(delta=1e-6) > ledger.epsilon(delta=DELTA)


def test_json_round_trip(ledger, tmp_path):
    assert Ledger.from_json(ledger.to_json()) == ledger
    path = tmp_path / "ledger.json"
    ledger.save(path)
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"  # pretty, sorted
    assert Ledger.load(path) == ledger
    assert json.loads(text)["entries"][1]["max_grad_norm"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temp file left behind


def test_gaussian_sum_release_composes_like_one_full_batch_step(ledger):
    """A Gaussian-sum release (privacy.mechanisms.gaussian_sum) is recorded with its mechanism and composes as q = 1,
    one step;
    a ledger saved before `mechanism` existed still loads, as DP-SGD."""
    release = DPEvent(noise_multiplier=10.0, sample_rate=1.0, num_steps=1)
    extended = ledger.record(stage="prune_1_stats", event=release, max_grad_norm=1.0, delta=DELTA,
                             mechanism="gaussian_sum")
    assert extended.entries[-1].mechanism == "gaussian_sum" and extended.entries[0].mechanism == "dp_sgd"
    assert extended.entries[-1].epsilon_after == pytest.approx(
        compose_epsilon([TEACHER, STUDENT, release], delta=DELTA), rel=1e-9)
    assert extended.entries[-1].epsilon_after > ledger.epsilon(delta=DELTA)
    old = json.loads(ledger.to_json())
    for item in old["entries"]:
        del item["mechanism"]
    assert Ledger.from_json(json.dumps(old)) == ledger


def test_from_json_rejects_foreign_or_unknown(ledger):
    with pytest.raises(ValueError, match="not a privacy ledger"):
        Ledger.from_json(json.dumps({"entries": []}))
    data = json.loads(ledger.to_json())
    data["entries"][0]["sigma"] = 1.0
    with pytest.raises(ValueError, match="sigma"):
        Ledger.from_json(json.dumps(data))
    data = json.loads(ledger.to_json())
    data["entries"][1]["stage"] = "teacher"
    with pytest.raises(ValueError, match="duplicate"):
        Ledger.from_json(json.dumps(data))


def test_append_returns_new_ledger_and_keeps_old():
    first = Ledger().append(entry("teacher"))
    second = first.append(entry("prune-1"))
    assert first.stage_names() == ["teacher"]
    assert second.stage_names() == ["teacher", "prune-1"]
    assert isinstance(second.entries, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.entries = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.entries[0].num_steps = 1


def test_append_refuses_duplicate_stage():
    first = Ledger().append(entry("teacher"))
    with pytest.raises(ValueError, match="'teacher' is already in the ledger"):
        first.append(entry("teacher", num_steps=10))
    assert len(first.entries) == 1


def test_check_fits_returns_composed_epsilon(ledger):
    extra = DPEvent(noise_multiplier=2.0, sample_rate=0.01, num_steps=100)
    expected = compose_epsilon([*ledger.events(), extra], delta=DELTA)
    got = ledger.check_fits(stage="prune-1", event=extra, target_epsilon=expected, delta=DELTA)
    assert got == expected
    assert ledger.stage_names() == ["teacher", "distill"]  # checking records nothing


def test_check_fits_raises_before_training_with_numbers(ledger):
    extra = DPEvent(noise_multiplier=0.8, sample_rate=0.05, num_steps=500)
    would = compose_epsilon([*ledger.events(), extra], delta=DELTA)
    target = ledger.epsilon(delta=DELTA) + 0.1
    with pytest.raises(BudgetExceededError) as info:
        ledger.check_fits(stage="prune-1", event=extra, target_epsilon=target, delta=DELTA)
    assert str(info.value) == (
        f"stage 'prune-1' would bring epsilon to {would:.3f} (delta=1e-05, prv), "
        f"over the study budget {target:.3f} by {would - target:.3f}"
    )
    assert isinstance(info.value, BudgetError) and isinstance(info.value, ValueError)


def test_check_fits_refuses_recorded_stage(ledger):
    with pytest.raises(ValueError, match="'teacher' is already in the ledger"):
        ledger.check_fits(stage="teacher", event=TEACHER, target_epsilon=100.0, delta=DELTA)


def test_check_fits_with_free_event_never_raises(ledger):
    free = DPEvent(noise_multiplier=1.0, sample_rate=0.1, num_steps=0)
    spent = ledger.epsilon(delta=DELTA)
    assert ledger.check_fits(stage="eval", event=free, target_epsilon=spent, delta=DELTA) == spent


STAGES = [
    StagePlan(stage="teacher", sample_rate=0.02, num_steps=300, budget_share=1.0),
    StagePlan(stage="prune", sample_rate=0.05, num_steps=100, budget_share=1.0),
    StagePlan(stage="distill", sample_rate=0.02, num_steps=200, budget_share=2.0),
]


@pytest.fixture(scope="module")
def planned() -> list[float]:
    return plan_noise(STAGES, target_epsilon=4.0, delta=DELTA)


def cumulative_epsilons(sigmas, stages, prior=()):
    events = list(prior)
    out = []
    for sigma, plan in zip(sigmas, stages):
        events.append(DPEvent(noise_multiplier=sigma, sample_rate=plan.sample_rate, num_steps=plan.num_steps))
        out.append(compose_epsilon(events, delta=DELTA))
    return out


def test_plan_shares_respected_and_last_stage_hits_target(planned):
    assert len(planned) == 3 and all(s > 0 for s in planned)
    eps = cumulative_epsilons(planned, STAGES)
    for got, budget in zip(eps, [1.0, 2.0, 4.0]):  # cumulative shares 1/4, 2/4, 4/4 of 4.0
        assert 0.99 * budget < got <= budget


def test_plan_earlier_sigma_ignores_later_steps(planned):
    changed = [*STAGES[:2], dataclasses.replace(STAGES[2], num_steps=50)]
    sigmas = plan_noise(changed, target_epsilon=4.0, delta=DELTA)
    assert sigmas[:2] == planned[:2]
    assert sigmas[2] < planned[2]  # fewer steps for the same budget need less noise


LATER = [dataclasses.replace(STAGES[1], stage="prune-2"), dataclasses.replace(STAGES[2], stage="finetune")]


def test_plan_after_spent_ledger(ledger):
    # Shares are of the whole target, the spend included: LATER's shares 1:2 put the first stage at
    # target / 3 cumulatively, which must exceed what the ledger already spent.
    spent = ledger.epsilon(delta=DELTA, accountant="rdp")
    target = 3 * (spent + 0.5)
    sigmas = plan_noise(LATER, target_epsilon=target, delta=DELTA, spent=ledger, accountant="rdp")
    events = [*ledger.events(), *(DPEvent(noise_multiplier=s, sample_rate=p.sample_rate,
                                          num_steps=p.num_steps) for s, p in zip(sigmas, LATER))]
    eps = [compose_epsilon(events[:n], delta=DELTA, accountant="rdp") for n in (3, 4)]
    assert 0.99 * (spent + 0.5) < eps[0] <= spent + 0.5
    assert 0.99 * target < eps[1] <= target


def test_plan_refuses_when_spent_exceeds(ledger):
    with pytest.raises(BudgetError, match="stage 'prune-2'"):
        plan_noise(LATER, target_epsilon=0.5, delta=DELTA, spent=ledger.events())


def test_plan_refuses_reused_stage_names(ledger):
    with pytest.raises(ValueError, match="teacher"):
        plan_noise(STAGES, target_epsilon=10.0, delta=DELTA, spent=ledger)
    with pytest.raises(ValueError, match="prune"):
        plan_noise([STAGES[1], STAGES[1]], target_epsilon=10.0, delta=DELTA)


@pytest.mark.parametrize(("override", "match"), [
    (dict(budget_share=0.0), "budget_share"),
    (dict(num_steps=0), "num_steps"),
    (dict(sample_rate=0.0), "sample_rate"),
])
def test_stage_plan_validation(override, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(STAGES[0], **override)


def fixed(plan: StagePlan, sigma: float) -> StagePlan:
    return dataclasses.replace(plan, noise_multiplier=sigma)


# calibrate_noise finds sigma within 0.5%, so the last calibrated stage lands within ~1-2% of its target


def test_plan_fixed_stage_keeps_sigma_and_meets_target(planned):
    stages = [STAGES[0], fixed(STAGES[1], 2.0), STAGES[2]]
    sigmas = plan_noise(stages, target_epsilon=4.0, delta=DELTA)
    assert sigmas[1] == 2.0
    assert sigmas[0] == planned[0]  # an earlier calibrated stage is unaffected
    eps = cumulative_epsilons(sigmas, stages)
    assert 0.98 * 4.0 < eps[-1] <= 4.0


def test_plan_fixed_last_stage_counts_in_last_calibrated_one():
    stages = [STAGES[0], fixed(STAGES[2], 2.0)]
    sigmas = plan_noise(stages, target_epsilon=4.0, delta=DELTA)
    assert sigmas[1] == 2.0
    assert 0.98 * 4.0 < cumulative_epsilons(sigmas, stages)[-1] <= 4.0


def test_plan_fixed_stage_over_its_share_leaves_the_rest_to_later_stages():
    # teacher alone spends ~2.2, over its cumulative share 1.0 and the next one's 2.0
    stages = [fixed(STAGES[0], 1.0), *STAGES[1:]]
    sigmas = plan_noise(stages, target_epsilon=4.0, delta=DELTA)
    eps = cumulative_epsilons(sigmas, stages)
    assert sigmas[0] == 1.0
    assert eps[0] < eps[1] < eps[2] and 0.98 * 4.0 < eps[2] <= 4.0


def test_plan_refuses_too_small_fixed_sigma():
    stages = [STAGES[0], fixed(STAGES[1], 0.6), STAGES[2]]  # prune alone spends ~11.6
    with pytest.raises(BudgetError, match="stage 'prune' with fixed noise multiplier 0.6"):
        plan_noise(stages, target_epsilon=4.0, delta=DELTA)


def test_plan_all_fixed_needs_no_calibration():
    stages = [fixed(plan, 2.0) for plan in STAGES]
    assert plan_noise(stages, target_epsilon=100.0, delta=DELTA) == [2.0, 2.0, 2.0]


def test_stage_plan_refuses_bad_fixed_sigma():
    with pytest.raises(ValueError, match="stage 'teacher': noise_multiplier"):
        fixed(STAGES[0], 0.0)


def _line_plans():
    teacher = StagePlan(stage="teacher", sample_rate=0.05, num_steps=60, budget_share=0.5)
    prune = [StagePlan(stage=f"prune_{r}", sample_rate=0.05, num_steps=20, budget_share=0.125) for r in (1, 2)]
    kd = [StagePlan(stage="kd", sample_rate=0.1, num_steps=40, budget_share=0.25)]
    return teacher, [prune, kd]


def test_plan_lines_scope_line_each_line_meets_the_budget_and_the_teacher_has_one_sigma():
    teacher, lines = _line_plans()
    sigmas = plan_lines(teacher, lines, scope="line", target_epsilon=4.0, delta=1e-5)
    assert set(sigmas) == {"teacher", "prune_1", "prune_2", "kd"}
    t_event = teacher.event_at(sigmas["teacher"])
    assert compose_epsilon([t_event], delta=1e-5) == pytest.approx(2.0, rel=0.01)  # its fraction: 0.5
    ledgers = []
    for line in lines:
        events = [t_event, *(p.event_at(sigmas[p.stage]) for p in line)]
        assert compose_epsilon(events, delta=1e-5) <= 4.0 * (1 + 1e-9)
        assert compose_epsilon(events, delta=1e-5) == pytest.approx(4.0, rel=0.01)
        ledger = Ledger()
        for p in [teacher, *line]:
            ledger = ledger.record(stage=p.stage, event=p.event_at(sigmas[p.stage]), max_grad_norm=1.0, delta=1e-5)
        ledgers.append(ledger)
    both = union_epsilon(ledgers, delta=1e-5)  # the teacher counts once
    all_events = [t_event, *(p.event_at(sigmas[p.stage]) for line in lines for p in line)]
    assert both == pytest.approx(compose_epsilon(all_events, delta=1e-5)) and both > 4.0


def test_plan_lines_scope_study_composes_everything_into_the_budget():
    teacher, lines = _line_plans()
    sigmas = plan_lines(teacher, lines, scope="study", target_epsilon=4.0, delta=1e-5)
    events = [p.event_at(sigmas[p.stage]) for p in [teacher, *lines[0], *lines[1]]]
    assert compose_epsilon(events, delta=1e-5) == pytest.approx(4.0, rel=0.01)
    assert compose_epsilon(events, delta=1e-5) <= 4.0 * (1 + 1e-9)


def test_plan_lines_validates_scope_and_teacher_fraction():
    teacher, lines = _line_plans()
    with pytest.raises(ValueError, match="scope must be one of"):
        plan_lines(teacher, lines, scope="model", target_epsilon=4.0, delta=1e-5)
    with pytest.raises(ValueError, match=r"fraction of epsilon in \(0, 1\)"):
        plan_lines(StagePlan(stage="teacher", sample_rate=0.05, num_steps=60, budget_share=1.0), lines,
                   scope="line", target_epsilon=4.0, delta=1e-5)


def test_plan_lines_independent_lines_meet_the_budget_without_the_teacher():
    teacher, lines = _line_plans()
    own = [StagePlan(stage="finetune_a", sample_rate=0.05, num_steps=60, budget_share=1.0, independent=True)]
    two = [StagePlan(stage="finetune_b", sample_rate=0.1, num_steps=30, budget_share=0.5, independent=True),
           StagePlan(stage="finetune_b2", sample_rate=0.1, num_steps=30, budget_share=0.5)]
    sigmas = plan_lines(teacher, [*lines, own, two], scope="line", target_epsilon=4.0, delta=1e-5)
    t_event = teacher.event_at(sigmas["teacher"])
    assert compose_epsilon([t_event], delta=1e-5) == pytest.approx(2.0, rel=0.01)  # still half, for its own lines
    for line in (own, two):  # all of epsilon, the teacher's events not in it
        events = [p.event_at(sigmas[p.stage]) for p in line]
        assert compose_epsilon(events, delta=1e-5) == pytest.approx(4.0, rel=0.01)
        assert compose_epsilon(events, delta=1e-5) <= 4.0 * (1 + 1e-9)
    assert compose_epsilon(events[:1], delta=1e-5) == pytest.approx(2.0, rel=0.05)  # its own shares split it
    # the same stage in a line from the teacher gets less: the teacher's half is in that line
    dependent = plan_lines(teacher, [[dataclasses.replace(own[0], independent=False)]], scope="line",
                           target_epsilon=4.0, delta=1e-5)
    assert dependent["finetune_a"] > sigmas["finetune_a"]


def test_plan_lines_teacher_alone_with_independent_lines_gets_all_of_epsilon():
    teacher, _ = _line_plans()
    own = [StagePlan(stage="finetune_a", sample_rate=0.05, num_steps=60, budget_share=1.0, independent=True)]
    sigmas = plan_lines(teacher, [own], scope="line", target_epsilon=4.0, delta=1e-5)
    assert sigmas["teacher"] == pytest.approx(sigmas["finetune_a"])  # the same event, both at the whole budget
    assert compose_epsilon([teacher.event_at(sigmas["teacher"])], delta=1e-5) == pytest.approx(4.0, rel=0.01)
    study = plan_lines(teacher, [own], scope="study", target_epsilon=4.0, delta=1e-5)  # everything composes
    both = [teacher.event_at(study["teacher"]), own[0].event_at(study["finetune_a"])]
    assert compose_epsilon(both, delta=1e-5) == pytest.approx(4.0, rel=0.01)
