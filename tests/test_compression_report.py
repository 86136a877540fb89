import math

import pandas as pd

from compression.report import results_frame, to_markdown, write_results

ROWS = [
    {"stage": "nonprivate_teacher", "line": "baseline", "metric": 0.9, "sparsity": 0.0, "parameters": 100,
     "latency_ms_b32": 40.0, "epsilon": math.inf, "delta": 0.0},
    {"stage": "teacher", "line": "teacher", "metric": 0.8, "sparsity": 0.0, "parameters": 100,
     "latency_ms_b32": 40.0, "epsilon": 4.0, "delta": 1e-4},
    {"stage": "structured_2", "line": "structured", "metric": 0.75, "sparsity": 0.0, "parameters": 50,
     "latency_ms_b32": 20.0, "epsilon": 8.0, "delta": 1e-4},
]


def test_frame_orders_columns_names_the_metric_and_leaves_latency_to_the_benchmark():
    frame = results_frame(ROWS, metric="accuracy")
    assert list(frame.columns[:4]) == ["stage", "line", "accuracy", "sparsity"]
    assert not [c for c in frame.columns if "latency" in c or "speedup" in c]  # bench/inference.py measures it


def test_markdown_and_files(tmp_path):
    md = to_markdown(results_frame(ROWS, metric="accuracy"))
    lines = md.splitlines()
    assert lines[0].startswith("| stage | line | accuracy") and len(lines) == 2 + len(ROWS)
    assert "| inf |" in lines[2] and "| 0.75 |" in lines[4]
    with_gap = to_markdown(results_frame([*ROWS, {"stage": "x", "metric": 0.5, "sparse_size_mb": 1.0}], metric="m"))
    assert "| nan |" not in with_gap and "| - |" in with_gap
    files = write_results(ROWS, tmp_path, metric="accuracy", footer="epsilon per line")
    assert pd.read_csv(files["csv"])["accuracy"].tolist() == [0.9, 0.8, 0.75]
    assert files["markdown"].read_text().rstrip().endswith("epsilon per line")
    for key in ("sparsity_plot", "epsilon_plot"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
