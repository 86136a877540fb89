"""Smoke test: `bench/dask_lines.py` runs a two-line study sequentially and on 2 local Dask workers and writes its
JSON: wall times, every line's time from its stages, the same models (the test mode's seeded noise), an estimate."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_flows_execution import GLUE, _config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from dask_lines import schedule_s  # noqa: E402


def test_longest_first_schedule():
    assert schedule_s([5, 4, 3, 3, 1], 1) == 16
    assert schedule_s([5, 4, 3, 3, 1], 2) == 8   # 5+3 | 4+3+1
    assert schedule_s([5, 4, 3], 8) == 5


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(), reason="GLUE data not present")
def test_dask_lines_bench_on_a_tiny_study(tmp_path):
    from transformers import AutoTokenizer

    from compression.models import build_tiny, resolve_model_path, save_classifier

    model = tmp_path / "tiny-bert"
    save_classifier(build_tiny(vocab_size=30522, hidden_size=32, num_layers=4, intermediate_size=64, seed=0),
                    AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")), model)
    config, out = _config(tmp_path, str(model)), tmp_path / "dask_lines.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dask_lines.py"), "--config", str(config),
                           "--out", str(out), "--keep", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["lines"] == {"distill_every_other": ["distill_every_other"], "distill_random": ["distill_random"]}
    for run in ("sequential", "dask"):
        assert result[run]["wall_s"] > 0
        assert set(result[run]["line_s"]) == set(result["lines"]) and min(result[run]["line_s"].values()) > 0
        assert result[run]["before_lines_s"] >= result[run]["stage_s"]["teacher"] > 0
    assert result["dask"]["metric"] == result["sequential"]["metric"]  # seeded test-mode noise: the same models
    assert set(result["dask"]["metric"]) == {"teacher", "distill_every_other", "distill_random"}
    assert result["estimate_wall_s_by_workers"]["2"] <= result["estimate_wall_s_by_workers"]["1"]
