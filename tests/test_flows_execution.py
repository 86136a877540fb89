"""Concurrent model lines: the `execution` section, and a scope-line study whose 2 lines run on a local Dask cluster of
2 single-thread workers (prefect-dask) with the same ledgers, models and results as the sequential run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


def _config(tmp_path: Path, model: str = "all-minilm-l6-v2", uri: str = "sqlite:///x.db") -> Path:
    cfg = yaml.safe_load((ROOT / "flows/configs/quickstart.yaml").read_text())
    small = {"epochs": 1, "batch_size": 16, "physical_batch_size": 8}
    cfg.update(name="lines", output_dir=str(tmp_path / "runs"), model={"name_or_path": model})
    cfg["data"].update(dir=str(GLUE), max_train_examples=48, max_eval_examples=32)
    cfg["prune"]["enabled"] = False
    cfg["distill"].update(inits=["every_other", "random"], after="teacher")
    for section in ("teacher", "distill"):
        cfg[section].update(train=small, method={"name": "full", "layers": 2})
    cfg["privacy"].update(scope="line", reproducible_noise=True, dataset_budget=100.0,
                          dataset_ledger=str(tmp_path / "ledger.db"))
    cfg["tracking"] = {"uri": uri, "experiment": "lines"}
    path = tmp_path / "lines.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("sets", "says"), [
    (["execution.dask=tcp://127.0.0.1:8786", "execution.local_workers=2"], "not both"),
    (["execution.local_workers=0"], ">= 1"),
    (["execution.local_workers=2", "execution.threads_per_worker=0"], "threads_per_worker must be >= 1"),
    (["execution.threads_per_worker=2"], "set execution.local_workers too"),
    (["execution.local_workers=2", "privacy.scope=study"], "set privacy.scope: line"),
    (["execution.workers=2"], "execution.workers: unknown key"),
])
def test_execution_section_refuses_what_cannot_run(tmp_path, sets, says):
    with pytest.raises(ConfigError, match=says):
        load_config(_config(tmp_path), sets)


def test_execution_changes_no_study_key(tmp_path):
    from flows.config import study_key

    path = _config(tmp_path)
    assert study_key(load_config(path)) == study_key(load_config(path, ["execution.local_workers=2"]))
    assert load_config(path, ["execution.local_workers=2"]).execution.concurrent


def test_a_local_cluster_gives_each_worker_its_threads(tmp_path):
    from flows.execution import THREAD_VARIABLES, task_runner

    cfg = load_config(_config(tmp_path), ["execution.local_workers=3", "execution.threads_per_worker=4"])
    kwargs = task_runner(cfg.execution).cluster_kwargs
    assert kwargs["n_workers"] == 3 and kwargs["threads_per_worker"] == 1  # one line at a time per worker
    assert {name: kwargs["env"][name] for name in THREAD_VARIABLES} == dict.fromkeys(THREAD_VARIABLES, "4")


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")
def test_lines_on_a_local_dask_cluster_match_the_sequential_run(tmp_path, mlflow_server, prefect_backend):
    import torch
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier
    from flows.study import study
    from privacy.dataset_ledger import DatasetLedger

    model = tmp_path / "tiny-bert"
    save_classifier(build_tiny(vocab_size=30522, hidden_size=32, num_layers=4, intermediate_size=64, seed=0),
                    AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), model)
    path = _config(tmp_path, str(model), mlflow_server)
    seconds, rows = {}, {}
    dask = ["execution.local_workers=2", "execution.threads_per_worker=2"]
    for name, sets in (("sequential", []), ("dask", dask)):
        began = time.monotonic()
        rows[name] = study(config_path=str(path), overrides=[f"name={name}", *sets])
        seconds[name] = time.monotonic() - began
    print(f"study wall time: sequential {seconds['sequential']:.0f}s, 2 Dask workers {seconds['dask']:.0f}s")

    assert [r["stage"] for r in rows["dask"]] == ["teacher", "distill_every_other", "distill_random"]
    # metrics, sizes, epsilon (the noise is seeded in this test mode, a random student from its stage seed)
    assert rows["dask"] == rows["sequential"]
    for stage in ("distill_every_other", "distill_random"):
        folders = {name: list((tmp_path / "runs" / name / "stages").glob(f"{stage}-*")) for name in rows}
        (seq,), (par,) = folders["sequential"], folders["dask"]  # keys differ: the upstream teacher's path does
        ledgers = [[{k: v for k, v in e.items() if k not in ("timestamp", "created_at")}
                    for e in json.loads((f / "ledger.json").read_text())["entries"]] for f in (seq, par)]
        assert ledgers[0] == ledgers[1] and [e["stage"] for e in ledgers[0]] == ["teacher", stage]
    with DatasetLedger(tmp_path / "ledger.db", create=False) as ledger:
        spent = ledger.history()
        assert ledger.release(run_id="none") == 0
    by_study = {name: sorted(r.stage for r in spent if r.study == name) for name in rows}
    assert by_study == {name: ["distill_every_other", "distill_random", "teacher"] for name in rows}
    # who charged each release (host:pid): the sequential lines this process, the concurrent ones two Dask workers
    pids = {name: {r.stage: int(r.owner.rsplit(":", 1)[1]) for r in spent if r.study == name} for name in rows}
    assert set(pids["sequential"].values()) == {os.getpid()} and pids["dask"]["teacher"] == os.getpid()
    workers = {pids["dask"]["distill_every_other"], pids["dask"]["distill_random"]}
    assert os.getpid() not in workers and len(workers) == 2, pids
    # each line's wall time and process, in the study folder (bench/dask_lines.py reads it)
    times = {name: json.loads((tmp_path / "runs" / name / "timings" / "lines.json").read_text()) for name in rows}
    for name, expected in (("sequential", {os.getpid()}), ("dask", workers)):
        assert set(times[name]) == {"distill_every_other", "distill_random"}
        assert {int(t["process"].rsplit(":", 1)[1]) for t in times[name].values()} == expected
        assert all(t["seconds"] > 0 and t["began"] > 0 for t in times[name].values())
    # the workers computed on the threads the cluster gave them (Dask's own default is 1), this process on torch's
    assert {t["threads"] for t in times["sequential"].values()} == {torch.get_num_threads()}
    assert {t["threads"] for t in times["dask"].values()} == {2}
