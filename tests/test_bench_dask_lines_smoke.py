"""Smoke test: `bench/dask_lines.py` runs a two-line study sequentially and on 2 local Dask workers and writes its
JSON: wall times, every line's time and process (timings/lines.json), the same models (the test mode's seeded noise),
an estimate for more workers."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_flows_execution import GLUE, _config

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("dask_lines", ROOT / "bench" / "dask_lines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_longest_first_schedule():
    schedule_s = _bench().schedule_s
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
    lines = {"distill_every_other", "distill_random"}
    for name in ("sequential", "dask"):
        run = result[name]
        assert set(run["line_s"]) == lines and set(run["metric"]) == lines | {"teacher"}
        assert 0 < run["lines_span_s"] < run["wall_s"] and run["outside_lines_s"] > 0
    # sequential lines follow each other with nothing between them
    assert sum(result["sequential"]["line_s"].values()) == pytest.approx(result["sequential"]["lines_span_s"], abs=1)
    assert len(set(result["dask"]["line_process"].values())) == 2  # one line on each worker
    assert len(set(result["sequential"]["line_process"].values())) == 1
    assert result["dask"]["metric"] == result["sequential"]["metric"]  # seeded test-mode noise: the same models
    longest = max(result["dask"]["line_s"].values())
    assert result["estimate_wall_s_by_workers"]["2"] == pytest.approx(
        result["dask"]["outside_lines_s"] + longest, abs=0.2)
