"""Smoke test: `bench/split_sst2.py --quick` runs end to end (tiny random BERT over the bundled MiniLM tokenizer, a
few GLUE-shaped rows written here) at both split kinds, with and without noise and CTI, and writes its JSON table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "great", "fun", "bad", "dull", "awful", "a", "movie", "plot", "the", "with", "and"]


def _glue(root: Path) -> Path:
    """SST-2 train/dev and CoLA train in the GLUE TSV layouts (CoLA: no header, four columns)."""
    rows = [(" ".join([WORDS[i % 3] if i % 2 else WORDS[3 + i % 3], "movie", WORDS[6 + i % 6]]), i % 2)
            for i in range(80)]
    (root / "SST-2").mkdir(parents=True)
    for name, part in (("train.tsv", rows), ("dev.tsv", rows[:24])):
        text = "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part)
        (root / "SST-2" / name).write_text(text, encoding="utf-8")
    (root / "CoLA").mkdir()
    cola = "".join(f"src\t1\t\t{WORDS[i % 12]} the {WORDS[(i + 5) % 12]} .\n" for i in range(40))
    (root / "CoLA" / "train.tsv").write_text(cola, encoding="utf-8")
    return root


def test_split_sst2_quick_runs_and_writes_json(tmp_path):
    out = tmp_path / "split_sst2.json"
    cmd = [sys.executable, str(ROOT / "bench" / "split_sst2.py"), "--quick", "--threads", "1", "--splits", "0,1",
           "--public-tasks", "cola", "--data-dir", str(_glue(tmp_path / "glue")), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["split_layer"], r["eta"], r["cti"]) for r in rows} == {
        (0, None, False), (0, 5.0, False), (0, 5.0, True), (1, None, False), (1, 5.0, False), (1, 5.0, True)}
    assert {r["attack"] for r in rows if r["split_layer"] == 0} == {"nearest"}
    assert {r["attack"] for r in rows if r["split_layer"] == 1} <= {"linear", "neighbour", "neighbour_clean"}
    for r in rows:
        assert 0 <= r["dev_accuracy"] <= 1 and abs(r["recovery"] + r["empirical_privacy"] - 1) < 1e-9
        assert r["attacked_tokens"] > 0 and "loss" not in r  # the training loss is private: never in results
    clean = next(r for r in rows if r["split_layer"] == 0 and r["eta"] is None)
    assert clean["recovery"] == 1.0  # nearest neighbour inverts unperturbed embedding outputs exactly
    cti = next(r for r in rows if r["split_layer"] == 0 and r["cti"])
    assert cti["eta_contributing"] > 5.0 > cti["eta_other"]
    assert len(result["gains"]) == 4 and all("accuracy_cost" in g for g in result["gains"])
    settings = result["settings"]
    assert settings["quick"] and settings["train_examples"] == 64 and settings["dev_examples"] == 24
