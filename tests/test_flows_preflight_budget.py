"""Pre-flight's budget checks in time: a plan that runs out of time, a study the dataset's lifetime budget would
refuse (read-only), and `dpcompress budget plan` going through the same checks."""
from __future__ import annotations

import time

import pytest
from preflight_study import main, run_cli


def test_a_plan_past_its_time_limit_is_one_line(study, no_server, capsys, monkeypatch):
    from flows import preflight_budget
    from privacy import accounting

    accounting._composed.cache_clear()  # a memoised epsilon would need no time at all
    monkeypatch.setattr(preflight_budget, "PLAN_TIMEOUT_S", 0.5)
    began = time.monotonic()
    code, lines = run_cli(capsys, "run", str(study.config), "--set", "privacy.accountant=prv",
                          "--set", "privacy.epsilon=0.05")
    assert code == 2 and len(lines) == 1, lines
    assert "privacy: could not plan within 0.5 s (epsilon=0.05, prv accountant)" in lines[0]
    assert time.monotonic() - began < 30


def test_a_study_the_dataset_ledger_would_refuse_is_one_line_and_reserves_nothing(study, no_server, capsys):
    from compression.data import GLUE_TASKS, fingerprint, load_split
    from privacy.accounting import DPEvent
    from privacy.dataset_ledger import DatasetLedger
    from privacy.fingerprint import owner_key

    source = load_split(GLUE_TASKS["sst2"], data_dir=str(study.glue), split="train")
    dataset, event = fingerprint(source, key=owner_key()), DPEvent(noise_multiplier=2.0, sample_rate=0.5, num_steps=2)
    earlier = {"dataset": dataset, "study": "earlier", "study_key": "k0", "run_id": "r0"}
    budget = {"epsilon_budget": 100.0, "delta": 1e-3, "accountant": "rdp"}
    with DatasetLedger(study.tmp / "ledger.db") as ledger:
        ledger.reserve(**earlier, planned=[("teacher", event, "dp_sgd")], **budget)
        ledger.begin(**earlier, stage="teacher", event=event, mechanism="dp_sgd", **budget)
        ledger.commit(dataset=dataset, run_id="r0", stage="teacher", stage_key="s0", max_grad_norm=1.0, noise="secret")
    code, lines = run_cli(capsys, "run", str(study.config))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("dpcompress: privacy.dataset_budget: dataset ") and "study 'earlier'" in lines[0]
    assert "Study 'pf' would add" in lines[0] and "--set privacy.dataset_budget=" in lines[0]
    with DatasetLedger(study.tmp / "ledger.db") as ledger:
        assert [(r.study, r.stage) for r in ledger.history()] == [("earlier", "teacher")]  # read-only check


@pytest.mark.parametrize(("overrides", "code", "expected"), [
    (["privacy.fixed_noise.prune_1=0.2"], 2, "privacy.fixed_noise.prune_1: stage 'prune_1'"),
    (["data.dir=/nonexistent/glue"], 2, "data.dir='/nonexistent/glue': no such folder"),
    (["model.name_or_path=/nonexistent/model", "tracking.uri=http://127.0.0.1:9"], 0, "total: epsilon = "),
], ids=["fixed-noise-too-small", "data-dir-missing", "needs-no-model-or-tracking"])
def test_budget_plan_runs_the_same_checks(study, capsys, overrides, code, expected):
    assert main(["budget", "plan", str(study.config), *(x for o in overrides for x in ("--set", o))]) == code
    captured = capsys.readouterr()
    assert expected in (captured.err if code else captured.out)
    assert code == 0 or captured.err.count("\n") == 1
