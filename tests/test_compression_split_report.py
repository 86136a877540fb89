"""compression.split.report: EP, the relative EP gain and the accuracy cost are read against plain split fine-tuning
at the same depth (never another depth's), a gain over an EP of zero is undefined, the best configuration within one
point is found and judged against the paper's +62%, and the table and plot are written."""
import csv
import math

import pytest

from compression.split.report import best_within, split_rows, summary, write_split_results


def _result(split, eta, cti, metric, recovery, attack=None):
    stage = f"split_k{split}_" + ("plain" if math.isinf(eta) else f"eta{eta:g}") + ("_cti" if cti else "")
    return {"stage": stage, "split": split, "eta": eta, "cti": cti, "metric": metric, "recovery": recovery,
            "attack": attack or ("nearest" if split == 0 else "learned")}


RESULTS = [
    _result(0, math.inf, False, 0.80, 1.00),   # embedding split, no noise: inverted exactly (EP 0)
    _result(0, 50.0, False, 0.795, 0.90),
    _result(2, math.inf, False, 0.82, 0.40),   # EP 0.60
    _result(2, 50.0, False, 0.815, 0.10),      # EP 0.90: +50%, cost 0.5
    _result(2, 50.0, True, 0.818, 0.04),       # EP 0.96: +60%, cost 0.2
    _result(2, 10.0, False, 0.70, 0.01),       # EP 0.99: +65%, but 12 points lost
]


def test_gains_and_costs_are_against_the_same_depth_without_noise():
    rows = {r["stage"]: r for r in split_rows(RESULTS)}
    assert rows["split_k2_eta50"]["ep"] == pytest.approx(0.90)
    assert rows["split_k2_eta50"]["ep_gain_rel"] == pytest.approx(0.5)
    assert rows["split_k2_eta50"]["accuracy_cost"] == pytest.approx(0.5)  # points, not a fraction
    assert rows["split_k2_eta10"]["ep_gain_rel"] == pytest.approx(0.65)
    assert rows["split_k2_plain"]["ep_gain_rel"] == 0 and rows["split_k2_plain"]["accuracy_cost"] == 0
    assert rows["split_k0_eta50"]["ep_gain_rel"] is None  # relative to EP 0: undefined, not infinite
    assert rows["split_k0_eta50"]["accuracy_cost"] == pytest.approx(0.5)
    orphan = split_rows([_result(4, 20.0, False, 0.7, 0.5)])[0]  # no baseline at its depth
    assert orphan["ep_gain_rel"] is None and orphan["accuracy_cost"] is None


def test_the_best_configuration_within_one_point_and_the_target():
    rows = split_rows(RESULTS)
    best = best_within(rows)
    assert best["stage"] == "split_k2_eta50_cti"  # eta 10 gains more but costs 12 points
    text = summary(rows, metric="accuracy")
    assert "k=0: 100.0% (nearest)" in text and "k=2: 40.0% (learned)" in text
    assert "split_k2_eta50_cti" in text and "not met" in text and "never composed" in text
    better = split_rows([*RESULTS, _result(2, 25.0, True, 0.815, 0.01)])  # EP 0.99: +65% at 0.5 points
    assert best_within(better)["stage"] == "split_k2_eta25_cti"
    assert ") met" in summary(better, metric="accuracy")
    assert best_within(split_rows(RESULTS[:2])) is None  # k=0: no defined relative gain
    assert "target not met" in summary(split_rows(RESULTS[:2]), metric="accuracy")


def test_the_table_and_the_plot_are_written(tmp_path):
    written = write_split_results(split_rows(RESULTS), tmp_path, metric="accuracy")
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(written["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["stage", "split", "eta", "cti", "attack", "accuracy", "recovery", "ep", "ep_gain_rel",
                              "accuracy_cost"]
    assert [r["stage"] for r in table] == [r["stage"] for r in RESULTS]
    markdown = written["markdown"].read_text()
    assert "| split_k0_plain | 0 | inf | off |" in markdown and "| split_k2_eta50_cti | 2 | 50 | on |" in markdown
    assert "Top-1 token recovery without noise" in markdown
