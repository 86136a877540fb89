"""Smoke test: `bench/inference.py --quick` runs end to end (tiny models, 3 repeats) and writes its JSON table, both
with its built-in models and with --model folders from save_classifier and export_hf."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from compression.export import export_hf
from compression.models import build_tiny, save_classifier

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "inference.py"), "--quick", "--threads", "1", "--out", str(out),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _check(rows: list[dict], models: set[str], reference: str):
    assert {r["model"] for r in rows} >= models and {r["batch_size"] for r in rows} == {1, 32}
    for r in rows:
        assert r["median_ms"] > 0 and r["throughput_seq_s"] > 0 and len(r["ms"]) == 3 and r["seq_len"] == 64
        assert r["parameters"] > 0 and r["speedup"] > 0
    assert all(r["speedup"] == 1.0 for r in rows if r["model"] == reference)


def test_inference_quick_default_models(tmp_path):
    out = tmp_path / "inference.json"
    proc = _run(out)
    result = json.loads(out.read_text())
    _check(result["rows"], {"teacher", "every_other"}, "teacher")
    params = {r["model"]: r["parameters"] for r in result["rows"]}
    assert params["every_other"] < params["teacher"]
    assert result["meta"]["threads"] == 1 and "speedup" in proc.stdout


def test_inference_quick_loads_saved_and_exported_folders(tmp_path):
    torch.set_num_threads(1)
    model = build_tiny(seed=0).eval()
    save_classifier(model, None, tmp_path / "saved")
    export_hf(model, None, tmp_path / "exported")
    out = tmp_path / "inference.json"
    _run(out, "--model", f"saved={tmp_path / 'saved'}", "--model", f"exported={tmp_path / 'exported'}")
    rows = json.loads(out.read_text())["rows"]
    _check(rows, {"saved", "exported"}, "saved")
    assert len({r["parameters"] for r in rows}) == 1
