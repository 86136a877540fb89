"""The sweep's grid: cells validated before any flow run, names stable across reruns; its table and plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from compression.report import sweep_frame, write_sweep
from flows.config import ConfigError
from flows.sweep import cell_name, plan_cells

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path) -> str:
    cfg = yaml.safe_load((ROOT / "flows/configs/quickstart.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "runs"))
    cfg["data"]["dir"] = str(tmp_path / "glue")
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_every_combination_is_a_validated_cell_with_a_stable_name(config, tmp_path):
    grid = {"privacy.epsilon": [1, 4], "prune.schedule.sparsities": [[0.5], [0.5, 0.9]]}
    cells = plan_cells(config, grid, ["data.max_train_examples=100"], base_name="quickstart", glue_dir=None,
                       tracking_uri="http://mlflow:5000")
    assert [c.values for c in cells] == [{"privacy.epsilon": 1, "prune.schedule.sparsities": [0.5]},
                                         {"privacy.epsilon": 1, "prune.schedule.sparsities": [0.5, 0.9]},
                                         {"privacy.epsilon": 4, "prune.schedule.sparsities": [0.5]},
                                         {"privacy.epsilon": 4, "prune.schedule.sparsities": [0.5, 0.9]}]
    assert len({c.study for c in cells}) == 4 and cells[3].study.startswith("quickstart-epsilon4_sparsities")
    assert cells[0].study_dir == str(tmp_path / "runs" / cells[0].study)
    overrides = cells[3].parameters["overrides"]
    assert overrides[0] == "data.max_train_examples=100" and "privacy.epsilon=4" in overrides
    assert "prune.schedule.sparsities=[0.5, 0.9]" in overrides and "tracking.uri=http://mlflow:5000" in overrides
    again = plan_cells(config, grid, ["data.max_train_examples=100"], base_name="quickstart", glue_dir=None,
                       tracking_uri=None)
    assert [c.study for c in again] == [c.study for c in cells]  # a rerun finds the same study folders
    assert cell_name("s", {"a.b": 1}) != cell_name("s", {"a.b": "1"})


@pytest.mark.parametrize(("grid", "says"), [
    ({"privacy.epsilonn": [1]}, "privacy.epsilonn: unknown key"),
    ({"privacy.epsilon": [4, -1]}, r"grid cell \{'privacy.epsilon': -1\}: .*epsilon must be"),
    ({"privacy.epsilon": []}, "non-empty list"),
    ({"privacy.epsilon": 4}, "non-empty list"),
    ({"name": ["a"]}, "names its cells"),
    ({}, "grid: empty"),
])
def test_a_bad_grid_fails_before_any_flow_run_naming_the_key(config, grid, says):
    with pytest.raises(ConfigError, match=says):
        plan_cells(config, grid, [], base_name="quickstart", glue_dir=None, tracking_uri=None)


def test_sweep_table_and_plots(tmp_path):
    def table(eps, acc):
        return pd.DataFrame([{"stage": "teacher", "line": "teacher", "accuracy": acc, "sparsity": 0.0,
                              "parameters": 100, "nonzero_parameters": None, "epsilon": eps / 2, "delta": 1e-5},
                             {"stage": "prune_1", "line": "unstructured", "accuracy": acc - 0.1, "sparsity": 0.5,
                              "parameters": 100, "nonzero_parameters": 50, "epsilon": eps, "delta": 1e-5}])
    cells = [{"cell": "s-eps1", "privacy.epsilon": 1, "prune.schedule.sparsities": [0.5]},
             {"cell": "s-eps8", "privacy.epsilon": 8, "prune.schedule.sparsities": [0.5]}]
    frame = sweep_frame(cells, [table(1, 0.6), table(8, 0.8)])
    assert list(frame.columns[:4]) == ["cell", "privacy.epsilon", "prune.schedule.sparsities", "stage"]
    assert list(frame["privacy.epsilon"]) == [1, 1, 8, 8] and frame["prune.schedule.sparsities"][0] == "[0.5]"
    files = write_sweep(frame, tmp_path, metric="accuracy")
    written = pd.read_csv(files["csv"])
    assert list(written["size_parameters"]) == [100, 50, 100, 50]  # a pruned model counts its kept weights
    assert "| s-eps8 | 8 |" in files["markdown"].read_text()
    assert files["epsilon_plot"].stat().st_size > 0 and files["size_plot"].stat().st_size > 0
