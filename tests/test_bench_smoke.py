"""Smoke test: `bench/dp_overhead.py --quick` runs end to end (tiny model, 2 steps) and writes its JSON table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dp_overhead_quick_runs_under_a_minute(tmp_path):
    out = tmp_path / "dp_overhead.json"
    cmd = [sys.executable, str(ROOT / "bench" / "dp_overhead.py"), "--quick", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"nondp", "hooks", "ghost", "bookkeeping"}
    for r in rows:
        assert r["median_step_s"] > 0 and len(r["step_s"]) == 2
        assert r["peak_mb"] > 0 and "time_ratio" in r
    assert "bookkeeping" in proc.stdout
