"""The study's results table: one row per model (task metric, sparsity, parameters, size, epsilon, delta),
written as CSV and Markdown, with plots of sparsity vs metric and epsilon vs metric. Pure library (pandas,
matplotlib); the caller decides where the files go and who sees them."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from privacy import files as atomic

COLUMNS = ("stage", "line", "metric", "sparsity", "parameters", "nonzero_parameters", "size_mb", "sparse_size_mb",
           "trainable_parameters", "train_peak_mb", "train_step_mb", "train_step_s", "epsilon", "delta")


def results_frame(rows: list[dict], *, metric: str) -> pd.DataFrame:
    """Rows (dicts with at least stage and metric) as a frame in COLUMNS order; the metric column is named after
    the task's metric."""
    frame = pd.DataFrame(rows)
    frame = frame[[c for c in COLUMNS if c in frame]]
    return frame.rename(columns={"metric": metric})


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-style Markdown table (numbers to 4 significant places; epsilon infinity as "inf")."""
    def cell(value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            if math.isinf(value):
                return "inf"
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return f"{value:,}" if isinstance(value, int) else str(value)
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" if c in ("stage", "line") else "---:" for c in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.astype(object).itertuples(index=False)]
    return "\n".join([head, rule, *body])


def plot(frame: pd.DataFrame, *, x: str, y: str, path: Path) -> Path:
    """A labelled scatter of `y` against `x`, one point per model (models with infinite x are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = frame[frame[x].map(lambda v: math.isfinite(float(v)))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(data[x], data[y])
    for _, row in data.iterrows():
        ax.annotate(str(row["stage"]), (row[x], row[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict], directory: str | Path, *, metric: str, footer: str = "") -> dict[str, Path]:
    """results.csv, results.md (table + `footer`), sparsity_vs_metric.png and epsilon_vs_metric.png in `directory`
    (and memory_vs_metric.png when rows have a `train_peak_mb`: training memory, from tasks.profile)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame = results_frame(rows, metric=metric)
    files = {"csv": directory / "results.csv", "markdown": directory / "results.md"}
    frame.to_csv(files["csv"], index=False)
    atomic.write_text(files["markdown"], to_markdown(frame) + (f"\n\n{footer}\n" if footer else "\n"))
    files["sparsity_plot"] = plot(frame, x="sparsity", y=metric, path=directory / "sparsity_vs_metric.png")
    files["epsilon_plot"] = plot(frame, x="epsilon", y=metric, path=directory / "epsilon_vs_metric.png")
    if "train_peak_mb" in frame:  # models whose training was profiled (the others have no memory to plot)
        files["memory_plot"] = plot(frame[frame["train_peak_mb"].notna()], x="train_peak_mb", y=metric,
                                    path=directory / "memory_vs_metric.png")
    return files
