"""Pre-flight (flows.preflight) through the `dpcompress` CLI: each bad input ends in exit code 2 with exactly one line
naming the field or file (and data row), before any server starts or anything is written to output_dir; several
problems are reported at once, also from a real process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from preflight_study import SST2_DEV, SST2_TRAIN, Study, run_cli

ROOT = Path(__file__).resolve().parents[1]


def cola_calibration(s: Study) -> list[str]:
    s.replace("prune: {schedule: {rounds: 1}", f"prune: {{calibration: {{task: cola, dir: {s.glue}}}, "
                                              "schedule: {rounds: 1}")
    return []


def _sets(*overrides: str):
    return lambda s: [item for o in overrides for item in ("--set", o)]


def _file(name: str, text: str | bytes):
    def edit(s: Study) -> list[str]:
        s.write(name, text)
        return []
    return edit


def _remove(name: str):
    def edit(s: Study) -> list[str]:
        (s.tmp / name).unlink()
        return []
    return edit


def _config(old: str, new: str):
    def edit(s: Study) -> list[str]:
        s.replace(old, new)
        return []
    return edit


def _calibration_file(name: str, text: str):
    def edit(s: Study) -> list[str]:
        cola_calibration(s)
        s.write(f"glue/CoLA/{name}", text)
        return []
    return edit


def _env(name: str, value: str):
    def edit(s: Study) -> list[str]:
        s.monkeypatch.setenv(name, value.format(tmp=s.tmp))
        return []
    return edit


# (id, edit of the good study -> extra argv, what the one line must contain)
BAD = [
    # the config file
    ("duplicate-key", _config("privacy: {epsilon: 8.0,", "privacy: {epsilon: 1.0, epsilon: 8.0,"),
     ["study.yaml", "privacy.epsilon: duplicate key"]),
    ("duplicate-section", lambda s: s.add("data: {task: cola}\n") or [],
     ["study.yaml", "data: duplicate key (lines 3 and 10)"]),
    ("yaml-syntax", _config("teacher: {train: {epochs: 1, batch_size: 16}}", "teacher: {train: {epochs: 1"),
     ["study.yaml", "line 7", "YAML syntax error"]),
    ("yaml-indent", lambda s: s.add("tracking2:\n  a: 1\n b: 2\n") or [], ["study.yaml", "line 12", "YAML syntax"]),
    ("config-not-utf8", lambda s: s.config.write_bytes(s.config.read_bytes() + "# caf\xe9\n".encode("latin-1")) and [],
     ["study.yaml", "line 10", "not UTF-8"]),
    ("config-missing", lambda s: s.config.unlink() or [], ["config file not found", "study.yaml"]),
    ("config-top-list", lambda s: s.config.write_text("- a\n- b\n") and [],
     ["study.yaml", "top level must be a mapping"]),
    ("unknown-key", _sets("teacher.train.epocs=3"), ["teacher.train.epocs", "unknown key", "epochs"]),
    ("old-key", _sets("privacy.teacher_share=0.4"), ["privacy.teacher_share", "privacy.shares.teacher"]),
    ("set-without-value", _sets("privacy.epsilon"), ["--set needs KEY=VALUE", "privacy.epsilon"]),
    ("set-bad-yaml", _sets("teacher.train.epochs=[1"), ["--set teacher.train.epochs=[1", "YAML syntax"]),
    ("epsilon-inf", _sets("privacy.epsilon=.inf"), ["privacy.epsilon", "finite"]),
    ("epsilon-nan", _sets("privacy.epsilon=.nan"), ["privacy.epsilon", "finite"]),
    ("epsilon-zero", _sets("privacy.epsilon=0"), ["privacy", "epsilon must be a finite number > 0"]),
    ("max-grad-norm-inf", _sets("teacher.train.max_grad_norm=.inf"), ["teacher.train.max_grad_norm", "finite"]),
    ("epochs-nan", _sets("prune.train.epochs=.nan"), ["prune.train.epochs", "finite"]),
    ("fixed-noise-inf", _sets("privacy.fixed_noise.teacher=.inf"), ["privacy.fixed_noise.teacher", "finite"]),
    ("dataset-budget-inf", _sets("privacy.dataset_budget=.inf"), ["privacy.dataset_budget", "finite"]),
    ("sparsity-nan", _sets("prune.schedule.sparsities=[0.5, .nan]"), ["prune.schedule.sparsities.1", "finite"]),
    ("examples-bool", _sets("data.max_train_examples=true"), ["data.max_train_examples", "boolean true"]),
    ("layers-bool", _sets("teacher.method.layers=yes"), ["teacher.method.layers", "boolean true"]),
    ("share-bool", _sets("privacy.shares.prune=no"), ["privacy.shares.prune", "boolean false"]),
    ("batch-fraction", _sets("teacher.train.batch_size=16.5"), ["teacher.train.batch_size", "integer"]),
    ("unknown-task", _sets("data.task=sst-2"), ["data", "unknown GLUE task 'sst-2'"]),
    # the data files
    ("data-dir-missing", _sets("data.dir=/nonexistent/glue"), ["data.dir='/nonexistent/glue'", "no such folder"]),
    ("task-folder-missing", _sets("data.task=rte"), ["data.dir=", "no RTE/ folder", "'rte'"]),
    ("train-missing", _remove("glue/SST-2/train.tsv"), ["data:", "split 'train'", "SST-2/train.tsv"]),
    ("dev-missing", _remove("glue/SST-2/dev.tsv"), ["data:", "split 'dev'", "SST-2/dev.tsv"]),
    ("train-zero-bytes", _file("glue/SST-2/train.tsv", ""), ["SST-2/train.tsv", "empty file (0 bytes)"]),
    ("dev-header-only", _file("glue/SST-2/dev.tsv", "sentence\tlabel\n"), ["SST-2/dev.tsv", "no data rows"]),
    ("train-not-utf8", _file("glue/SST-2/train.tsv", SST2_TRAIN.encode() + "caf\xe9 \t1\n".encode("latin-1")),
     ["SST-2/train.tsv", "line 42", "not UTF-8"]),
    ("train-cut-row", _file("glue/SST-2/train.tsv", SST2_TRAIN + "no label here\n" + SST2_TRAIN.split("\n", 1)[1]),
     ["SST-2/train.tsv", "data row 41", "line 42", "1 tab-separated field(s), expected 2"]),
    ("dev-extra-field", _file("glue/SST-2/dev.tsv", SST2_DEV + "a\tb\t1\n"), ["SST-2/dev.tsv", "data row 9",
                                                                           "3 tab-separated", "a tab inside"]),
    ("train-bad-label", _file("glue/SST-2/train.tsv", SST2_TRAIN + "positive! \t2\n"),
     ["SST-2/train.tsv", "data row 41", "label '2'"]),
    ("train-no-label-column", _file("glue/SST-2/train.tsv", SST2_TRAIN.replace("sentence\tlabel", "sentence\tscore")),
     ["SST-2/train.tsv", "missing column 'label'"]),
    ("calibration-bad-row", _calibration_file("train.tsv", "src\t1\t\tfine .\nsrc\t7\t\tbad label .\n"),
     ["prune.calibration.0", "CoLA/train.tsv", "data row 2", "label '7'"]),
    ("calibration-empty-dev", _calibration_file("dev.tsv", ""), ["prune.calibration.0", "CoLA/dev.tsv", "empty"]),
    # the model
    ("model-missing", _sets("model.name_or_path=/nonexistent/model"),
     ["model.name_or_path='/nonexistent/model'", "no folder"]),
    ("model-hub-offline", _sets("model.name_or_path=someone/not-cached-model"),
     ["model.name_or_path='someone/not-cached-model'", "not", "cache"]),
    ("model-no-config", _remove("model/config.json"), ["model.name_or_path=", "no config.json"]),
    ("model-no-tokenizer", _remove("model/vocab.txt"), ["model.name_or_path=", "no tokenizer"]),
    ("model-unknown-family", _file("model/config.json", '{"model_type": "t5"}'),
     ["model.name_or_path=", "model_type 't5' has no registered family", "bert"]),
    ("student-missing", _sets("distill.student.init=pretrained", "distill.student.pretrained=/nonexistent/student"),
     ["distill.student.pretrained='/nonexistent/student'", "no folder"]),
    # the split branch: its public text, its depths against the model's
    ("split-public-missing", _sets("split.enabled=true", "split.attack.public=[{task: mrpc}]"),
     ["split.attack.public.0.dir=", "no MRPC/ folder"]),
    ("split-deeper-than-model", lambda s: _file("model/config.json", '{"model_type": "bert", "num_hidden_layers": 2}')(
        s) + _sets("split.enabled=true", "split.attack.public=[{task: cola}]", "split.splits=[0, 3]")(s),
     ["split.splits=[0, 3]", "the model has 2 blocks"]),
    ("split-lora-without-a-block", lambda s: _file("model/config.json", '{"model_type": "bert", "num_hidden_layers": '
                                                                       '2}')(s)
     + _sets("split.enabled=true", "split.attack.public=[{task: cola}]", "split.splits=[2]")(s),
     ["split.splits", "a split at 2", "no block for split.method lora"]),
    # where the run writes
    ("output-dir-is-file", lambda s: s.write("runs", "not a folder") and [], ["output_dir=", "is a file"]),
    ("output-dir-under-file", _sets("output_dir=/etc/hostname/runs"), ["output_dir='/etc/hostname/runs'", "is a file"]),
    ("tracking-file-store", _sets("tracking.uri=file:///tmp/mlruns"), ["tracking.uri='file:///tmp/mlruns'",
                                                                       "MLflow 3 refuses", "sqlite:///"]),
    ("tracking-plain-path", _sets("tracking.uri=mlruns"), ["tracking.uri='mlruns'", "file store"]),
    ("tracking-sqlite-under-file", _sets("tracking.uri=sqlite:////etc/hostname/mlflow.db"),
     ["tracking.uri='sqlite:////etc/hostname/mlflow.db'", "is a file"]),
    ("tracking-postgres-unreachable", _sets("tracking.uri=postgresql://me:hunter2@127.0.0.1:9/mlflow"),
     ["tracking.uri='postgresql://127.0.0.1/mlflow'", "no connection to 127.0.0.1:9"]),
    ("tracking-unreachable", _sets("tracking.uri=http://127.0.0.1:9"), ["tracking.uri='http://127.0.0.1:9'",
                                                                       "no answer within 3 s"]),
    ("tracking-env-file-store", lambda s: _env("MLFLOW_TRACKING_URI", "{tmp}/mlruns")(s) + _config(
        'tracking: {uri: "sqlite:///' + str(s.tmp) + '/mlflow/mlflow.db"}', "")(s),
     ["$MLFLOW_TRACKING_URI=", "file store"]),
    ("prefect-unreachable", _env("PREFECT_API_URL", "http://127.0.0.1:9/api"), ["PREFECT_API_URL=", "no answer"]),
    # the budget
    ("one-example", _sets("data.max_train_examples=1"), ["data: 1 training example(s)", "at least 2"]),
    ("delta-too-large", _sets("privacy.delta=0.05"), ["privacy.delta=0.05", ">= 1/n", "n = 32"]),
    ("fixed-noise-unknown-stage", _sets("privacy.fixed_noise.prune_2=1.0"), ["privacy.fixed_noise", "prune_2"]),
    ("fixed-noise-too-small", _sets("privacy.fixed_noise.prune_1=0.2"),
     ["privacy.fixed_noise.prune_1", "fixed noise multiplier 0.2", "over privacy.epsilon=8"]),
    ("stats-noise-too-small", _sets("prune.schedule.scorer=wanda", "prune.schedule.scope=row",
                                    "prune.schedule.stats_noise=0.1"), ["prune.schedule.stats_noise", "prune_1_stats"]),
    ("epsilon-unreachable", _sets("privacy.epsilon=0.0001", "privacy.delta=1e-6"),
     ["privacy.epsilon=0.0001 cannot be met", "noise multiplier 1000"]),
    ("register-unknown-stage", _sets("tracking.register_stage=prune_3"), ["tracking.register_stage='prune_3'",
                                                                           "prune_1"]),
    ("ledger-bad-url", _sets("privacy.dataset_ledger=mysql://x/y"), ["privacy.dataset_ledger='mysql://x/y'",
                                                                      "unsupported"]),
]


@pytest.mark.parametrize(("edit", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_each_bad_input_is_one_line_and_exit_2(study, no_server, capsys, edit, expected):
    began = time.monotonic()
    code, lines = run_cli(capsys, "run", str(study.config), *edit(study))
    assert code == 2
    assert len(lines) == 1, lines
    assert all(part in lines[0] for part in expected), lines[0]
    assert "Traceback" not in lines[0]
    assert not (study.tmp / "runs").is_dir() or not any((study.tmp / "runs").iterdir())
    assert time.monotonic() - began < 30


def test_the_good_study_passes(study):
    from flows.preflight import preflight

    checked = preflight(study.config)
    assert checked.problems == [] and checked.num_train == 32
    assert set(checked.plan) == {"teacher", "prune_1", "distill"}
    assert not (study.tmp / "runs").exists()


def test_several_problems_in_one_config_are_all_reported_at_once(study, no_server, capsys):
    study.write("glue/SST-2/dev.tsv", SST2_DEV + "a bad row \t5\n")
    overrides = ["privacy.epsilonn=1", "teacher.train.max_grad_norm=.inf", "model.name_or_path=/nonexistent/model",
                 "tracking.uri=file:///tmp/mlruns"]
    code, lines = run_cli(capsys, "run", str(study.config), *(x for o in overrides for x in ("--set", o)))
    assert code == 2
    expected = [["privacy.epsilonn", "unknown key"], ["teacher.train.max_grad_norm", "finite"],
                ["SST-2/dev.tsv", "data row 9", "label '5'"], ["model.name_or_path='/nonexistent/model'"],
                ["tracking.uri='file:///tmp/mlruns'", "MLflow 3 refuses"]]
    assert len(lines) == len(expected), lines
    for parts in expected:
        assert sum(all(part in line for part in parts) for line in lines) == 1, (parts, lines)
    assert not (study.tmp / "runs").exists()


def _cli(*argv: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=timeout, check=False)


def test_a_real_process_refuses_a_duplicate_key_with_exit_2_within_seconds(study):
    study.replace("privacy: {epsilon: 8.0,", "privacy: {epsilon: 1.0, epsilon: 8.0,")
    began = time.monotonic()
    out = _cli("run", str(study.config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"dpcompress: {study.config}: privacy.epsilon: duplicate key (twice on line 5); keep one\n"
    assert time.monotonic() - began < 15
    assert not (study.tmp / "runs").exists()


def test_a_real_process_reports_every_problem_with_exit_2_within_seconds(study):
    began = time.monotonic()
    out = _cli("run", str(study.config), "--set", "teacher.train.epocs=3", "--set", "data.dir=/nonexistent/glue",
               "--set", "tracking.uri=http://127.0.0.1:9")
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 3, out.stderr
    assert "teacher.train.epocs: unknown key" in lines[0] and "data.dir='/nonexistent/glue'" in lines[1]
    assert "tracking.uri='http://127.0.0.1:9': no answer within 3 s" in lines[2]
    # typing the config imports the libraries (torch, transformers): ~7 s on an idle 2-core machine, 30 s at load 9
    assert time.monotonic() - began < 60
    assert not (study.tmp / "runs").exists() and "Traceback" not in out.stderr


def test_a_study_folder_in_use_by_another_run_is_one_line(study, no_server, capsys):
    from tasks.lock import study_lock

    with study_lock(study.tmp / "runs" / "pf"):  # another open file: flock refuses it even within this process
        code, lines = run_cli(capsys, "run", str(study.config))
    assert code == 2 and len(lines) == 1, lines
    assert "output_dir=" in lines[0] and "is in use by pid" in lines[0] and "one run of a study at a time" in lines[0]
    code, lines = run_cli(capsys, "budget", "plan", str(study.config))  # planning needs no lock
    assert code == 0


def test_a_hosted_tracking_store_named_without_a_url_is_not_a_file_store():
    from flows.preflight_io import check_tracking

    assert check_tracking("databricks", "tracking.uri") == []
    assert "file store" in check_tracking("mlruns", "tracking.uri")[0]
    assert all("hunter2" not in line for line in check_tracking("mysql://u:hunter2@127.0.0.1:9/x", "tracking.uri"))
