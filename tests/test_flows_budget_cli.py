"""Tests for the `dpcompress budget` commands (epsilon, sigma, plan, spent) and fixed-sigma planning in configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import load_config
from flows.plan import stage_plans
from privacy.accounting import DPEvent, compose_epsilon
from privacy.config import BudgetConfig
from privacy.dataset_ledger import DatasetLedger

ROOT = Path(__file__).resolve().parents[1]
GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"
RUN = ["--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"]
needs_glue = pytest.mark.skipif(not (GLUE / "SST-2/train.tsv").is_file(), reason=f"no GLUE data at {GLUE}")


def run_json(capsys, *argv: str) -> dict:
    assert main(["budget", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object
    return json.loads(out)


def test_epsilon_text_states_the_guarantee(capsys):
    assert main(["budget", "epsilon", "--noise-multiplier", "1.1", *RUN]) == 0
    out = capsys.readouterr().out
    expected = compose_epsilon([DPEvent(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)], delta=1e-5)
    assert f"epsilon = {expected:.4f} at delta = 1e-05" in out
    assert "prv accountant" in out and "Poisson sampling" in out and "unit of privacy: one example" in out


def test_epsilon_json_from_a_subprocess():
    argv = [sys.executable, "-m", "flows.cli", "budget", "epsilon", "--noise-multiplier", "1.1", *RUN,
            "--accountant", "rdp", "--json"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    event = DPEvent(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
    assert values["epsilon"] == pytest.approx(compose_epsilon([event], delta=1e-5, accountant="rdp"))
    assert values | {"epsilon": None} == {"epsilon": None, "sigma": 1.1, "sample_rate": 0.01, "steps": 1000,
                                          "delta": 1e-5, "accountant": "rdp", "sampling": "poisson",
                                          "unit": "example"}


def test_sigma_then_epsilon_gives_back_the_target(capsys):
    found = run_json(capsys, "sigma", "--epsilon", "3", *RUN)
    assert found["target_epsilon"] == 3.0 and found["accountant"] == "prv"
    back = run_json(capsys, "epsilon", "--noise-multiplier", repr(found["sigma"]), *RUN)
    assert 0.97 * 3.0 < back["epsilon"] <= 3.0
    assert back["epsilon"] == pytest.approx(found["epsilon"])


@pytest.mark.parametrize(("command", "bad"), [
    ("epsilon", ["--sample-rate", "0"]),
    ("epsilon", ["--sample-rate", "1.5"]),
    ("epsilon", ["--sample-rate", "often"]),
    ("epsilon", ["--noise-multiplier", "0"]),
    ("epsilon", ["--noise-multiplier", "-1"]),
    ("epsilon", ["--delta", "1"]),
    ("epsilon", ["--delta", "0"]),
    ("epsilon", ["--steps", "0"]),
    ("epsilon", ["--steps", "ten"]),
    ("epsilon", ["--accountant", "moments"]),
    ("sigma", ["--epsilon", "0"]),
    ("sigma", ["--epsilon", "nan"]),
])
def test_bad_arguments_exit_2_with_one_line(capsys, command, bad):
    good = {"epsilon": ["--noise-multiplier", "1.1"], "sigma": ["--epsilon", "3"]}[command]
    with pytest.raises(SystemExit) as info:
        main(["budget", command, *good, *RUN, *bad])  # the last value of an option wins
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.endswith("\n") and err.count("\n") == 1 and bad[0] in err


def test_missing_argument_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["budget", "sigma", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--epsilon" in err


TINY = """
name: tiny
data: {{task: sst2, dir: {glue}, max_train_examples: 2000}}
privacy: {{epsilon: 4.0, accountant: rdp}}
teacher: {{train: {{epochs: 1, batch_size: 256}}}}
prune: {{schedule: {{rounds: 1}}, train: {{epochs: 1, batch_size: 256}}}}
distill: {{train: {{epochs: 1, batch_size: 256}}}}
"""


@pytest.fixture()
def tiny(tmp_path) -> Path:
    """A small study config; RDP because PRV takes ~10 s per calibration here (the ledger tests use PRV)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(glue=GLUE))
    return path


@needs_glue
def test_plan_prints_every_stage_and_the_total(capsys, tiny):
    assert main(["budget", "plan", str(tiny)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "n = 2,000" in lines[0]
    for stage in ("teacher", "prune_1", "distill"):
        assert any(line.startswith(stage) for line in lines), out
    total = lines[-1]
    assert total.startswith("total: epsilon = ") and f"delta = {2000 ** -1.1:g} = n^-1.1" in total
    assert "rdp accountant" in total
    epsilon = float(total.split()[3])
    assert 0.99 * 4.0 < epsilon <= 4.0


@needs_glue
def test_plan_json_with_fixed_sigma(capsys, tiny):
    values = run_json(capsys, "plan", str(tiny), "--set", "prune.enabled=false",
                      "--set", "privacy.fixed_noise.teacher=3.0")
    teacher, distill = values["stages"]
    assert (teacher["stage"], teacher["sigma"], teacher["fixed"]) == ("teacher", 3.0, True)
    assert (distill["stage"], distill["fixed"]) == ("distill", False)
    assert teacher["epsilon"] < distill["epsilon"] == values["epsilon"]
    assert 0.98 * 4.0 < values["epsilon"] <= 4.0
    assert (values["delta"], values["accountant"], values["num_train"]) == (2000 ** -1.1, "rdp", 2000)


@needs_glue
def test_plan_refuses_too_small_fixed_sigma(capsys, tiny):
    assert main(["budget", "plan", str(tiny), "--set", "privacy.fixed_noise.prune_1=0.3"]) == 2
    assert "stage 'prune_1' with fixed noise multiplier 0.3" in capsys.readouterr().err


@needs_glue
def test_plan_refuses_unknown_fixed_stage(capsys, tiny):
    assert main(["budget", "plan", str(tiny), "--set", "privacy.fixed_noise.prune_2=1.0"]) == 2
    assert "prune_2" in capsys.readouterr().err


def test_plan_config_error_exits_2(capsys, tmp_path):
    assert main(["budget", "plan", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("data: {task: sst2}\nprivacy: {epsilonn: 1}\n")
    assert main(["budget", "plan", str(path)]) == 2
    assert "privacy.epsilonn" in capsys.readouterr().err


def test_stage_plans_pass_fixed_noise(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data: {task: sst2}\nprivacy: {fixed_noise: {distill: 1.5}}\n")
    teacher, lines = stage_plans(load_config(path), 1000)
    assert [(s.stage, s.noise_multiplier) for s in [teacher, *lines["unstructured"]]] == [
        ("teacher", None), ("prune_1", None), ("prune_2", None), ("distill", 1.5)]
    with pytest.raises(ValueError, match=r"do not run: \['distill'\]"):
        stage_plans(load_config(path, ["distill.enabled=false"]), 1000)


def test_budget_config_validates_fixed_noise():
    assert BudgetConfig().fixed_noise == {}
    with pytest.raises(ValueError, match="fixed_noise\\['teacher'\\]"):
        BudgetConfig(fixed_noise={"teacher": 0.0})


TEACHER = DPEvent(noise_multiplier=1.0, sample_rate=0.02, num_steps=300)
DISTILL = DPEvent(noise_multiplier=1.5, sample_rate=0.05, num_steps=200)


@pytest.fixture()
def ledger_path(tmp_path) -> Path:
    """A dataset ledger: study 'first' spent teacher (delta 1e-5) and distill (delta 1e-4) on fp-a, plus a
    non-private baseline; study 'second' spent teacher on fp-b. RDP keeps the per-release epsilons fast."""
    path = tmp_path / "ledger.db"
    with DatasetLedger(path) as ledger:
        for dataset, study, stage, event, delta in (("fp-a", "first", "teacher", TEACHER, 1e-5),
                                                    ("fp-a", "first", "distill", DISTILL, 1e-4),
                                                    ("fp-b", "second", "teacher", TEACHER, 1e-5)):
            ledger.begin(dataset=dataset, study=study, study_key=study, run_id=study, stage=stage, event=event,
                         mechanism="dp_sgd", epsilon_budget=100.0, delta=delta, accountant="rdp")
            ledger.commit(dataset=dataset, run_id=study, stage=stage, stage_key=f"{stage}-key", max_grad_norm=1.0,
                          noise="secret")
        ledger.record_nonprivate(dataset="fp-a", study="baseline", study_key="b", run_id="b", stage="nonprivate",
                                 stage_key="np")
    return path


def test_spent_json_lists_releases_and_composes_each_dataset(capsys, ledger_path):
    values = run_json(capsys, "spent", "--ledger", str(ledger_path))
    assert [(r["dataset"], r["study"], r["stage"], r["mechanism"]) for r in values["releases"]] == [
        ("fp-a", "first", "teacher", "dp_sgd"), ("fp-a", "first", "distill", "dp_sgd"),
        ("fp-b", "second", "teacher", "dp_sgd"), ("fp-a", "baseline", "nonprivate", "nonprivate")]
    distill = values["releases"][1]
    assert distill["epsilon"] == pytest.approx(compose_epsilon([DISTILL], delta=1e-4, accountant="rdp"))
    assert (distill["delta"], distill["noise"]) == (1e-4, "secret") and distill["date"].startswith("20")
    assert values["releases"][3]["epsilon"] is None  # non-private: no guarantee
    fp_a = values["datasets"]["fp-a"]
    assert fp_a["epsilon"] == pytest.approx(compose_epsilon([TEACHER, DISTILL], delta=1e-4, accountant="rdp"))
    assert (fp_a["delta"], fp_a["accountant"], fp_a["releases"], fp_a["nonprivate_releases"]) == (1e-4, "rdp", 2, 1)
    assert set(values["datasets"]) == {"fp-a", "fp-b"}
    only_b = run_json(capsys, "spent", "--ledger", f"sqlite:///{ledger_path}", "--dataset", "fp-b",
                      "--accountant", "prv")
    assert [r["dataset"] for r in only_b["releases"]] == ["fp-b"]
    assert only_b["datasets"]["fp-b"]["epsilon"] == pytest.approx(
        compose_epsilon([TEACHER], delta=1e-5, accountant="prv"))


def test_spent_text_shows_the_table_and_each_dataset(capsys, ledger_path):
    assert main(["budget", "spent", "--ledger", str(ledger_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("releases in sqlite:///") and lines[1].split()[:4] == ["dataset", "study", "stage",
                                                                                      "epsilon"]
    assert any(line.startswith("fp-a") and "nonprivate" in line and "inf" in line for line in lines)
    epsilon = compose_epsilon([TEACHER, DISTILL], delta=1e-4, accountant="rdp")
    assert (f"dataset fp-a: epsilon = {epsilon:.4f} at delta = 0.0001 (rdp accountant, Poisson sampling, unit of "
            f"privacy: one example) over 2 private release(s), composed; plus 1 non-private release(s)") in lines[-2]
    assert lines[-1].startswith("dataset fp-b: epsilon = ")
    assert main(["budget", "spent", "--ledger", str(ledger_path), "--dataset", "fp-none"]) == 0
    assert capsys.readouterr().out.startswith("no releases recorded for dataset fp-none in sqlite:///")


def test_spent_lists_a_local_dx_use_with_its_eta_and_never_composes_it(capsys, ledger_path):
    with DatasetLedger(ledger_path) as ledger:
        ledger.record_uncomposed(dataset="fp-a", study="sap", study_key="s", run_id="s", stage="split_k0_eta50",
                                 stage_key="sp", mechanism="dx", eta=50.0, guarantee="local d_chi per token",
                                 noise="secret")
    values = run_json(capsys, "spent", "--ledger", str(ledger_path), "--dataset", "fp-a")
    local = values["releases"][-1]
    assert (local["mechanism"], local["epsilon"], local["eta"], local["guarantee"]) == (
        "dx", None, 50.0, "local d_chi per token")
    fp_a = values["datasets"]["fp-a"]
    assert (fp_a["releases"], fp_a["local_releases"], fp_a["nonprivate_releases"]) == (2, 1, 1)
    assert fp_a["epsilon"] == pytest.approx(compose_epsilon([TEACHER, DISTILL], delta=1e-4, accountant="rdp"))
    assert main(["budget", "spent", "--ledger", str(ledger_path), "--dataset", "fp-a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("split_k0_eta50" in line and "local eta=50" in line and "dx" in line for line in lines)
    assert "plus 1 use(s) under a local d_chi guarantee per token representation" in lines[-1]


def test_spent_bad_store_exits_2_with_one_line(capsys, tmp_path):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database\n" * 100)
    for ledger, expected in ((str(tmp_path / "missing.db"), "no dataset ledger at"),
                             ("mysql://u@h/db", "unsupported ledger database"),
                             ("postgresql://u@h/db", "cannot read the dataset ledger at postgresql://u@h/db"),
                             (str(not_a_db), "cannot read the dataset ledger")):
        assert main(["budget", "spent", "--ledger", ledger]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "missing.db").exists()


def test_spent_json_from_a_subprocess_reads_the_default_ledger(ledger_path):
    env = {**os.environ, "DPCOMPRESS_LEDGER_URL": f"sqlite:///{ledger_path}"}
    argv = [sys.executable, "-m", "flows.cli", "budget", "spent", "--dataset", "fp-a", "--json"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert [r["stage"] for r in values["releases"]] == ["teacher", "distill", "nonprivate"]
    assert values["ledger"] == f"sqlite:///{ledger_path}"


def test_delta_defaults_below_one_over_n_and_one_over_n_is_refused():
    from privacy.config import BudgetConfig

    assert BudgetConfig().resolve_delta(8000) == pytest.approx(8000 ** -1.1) and 8000 ** -1.1 < 1 / 8000
    assert BudgetConfig(delta=1e-6).resolve_delta(8000) == 1e-6
    with pytest.raises(ValueError, match=r"delta=0.000125 is >= 1/n.*publishing one random example"):
        BudgetConfig(delta=1 / 8000).resolve_delta(8000)
