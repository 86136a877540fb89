"""Smoke test: `bench/memory.py --quick` runs every registered method (lora, side and reversible through their
`prepare` and `StagePlan`), DP and not, on the tiny model and writes its JSON table with ratios to DP full
fine-tuning."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from compression.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_memory_quick_writes_every_method_dp_and_not(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["method"], r["dp"]) for r in rows} == {(m, dp) for m in METHODS for dp in (True, False)}
    for r in rows:
        assert "error" not in r, r
        assert r["median_step_s"] > 0 and len(r["step_s"]) == 2 and r["peak_mb"] > 0 and r["trainable_parameters"] > 0
        assert "peak_mb_ratio" in r and "median_step_s_ratio" in r
        assert r["libraries_mb"] > 0 and r["job_peak_mb"] == r["peak_mb"] - r["libraries_mb"]
    full = next(r for r in rows if r["method"] == "full" and r["dp"])
    assert full["peak_mb_ratio"] == full["median_step_s_ratio"] == 1.0
    # one process for all (--quick): the baseline's job memory may be nothing, and then no row has a job ratio
    assert all(("job_peak_mb_ratio" in r) == (full["job_peak_mb"] > 0) for r in rows)
    assert result["meta"]["complete"] and "reversible" in proc.stdout
    assert {"lora", "side", "reversible"} <= set(result["meta"]["settings"])  # each through prepare and its plan
    trainable = {r["method"]: r["trainable_parameters"] for r in rows if r["dp"]}
    assert all(trainable[m] < trainable["full"] for m in ("lora", "side", "reversible")), trainable


def test_ratios_are_left_out_against_a_baseline_that_is_not_positive():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    add_ratios = module.add_ratios
    key = {"model": "tiny", "seq_len": 16}
    rows = add_ratios([{**key, "method": "full", "dp": True, "peak_mb": 200.0, "job_peak_mb": 0.0,
                        "step_mb": -1.0, "median_step_s": 0.5},
                       {**key, "method": "lora", "dp": True, "peak_mb": 100.0, "job_peak_mb": 3.0,
                        "step_mb": 2.0, "median_step_s": 0.25}])
    assert rows[1]["peak_mb_ratio"] == 0.5 and rows[1]["median_step_s_ratio"] == 0.5
    assert not any(k in r for r in rows for k in ("job_peak_mb_ratio", "step_mb_ratio"))
