"""Plain-text tables for the console (the study summary, the budget plan, the dataset ledger)."""
from __future__ import annotations


def format_table(rows: list[dict]) -> str:
    """Plain-text table, one row per model."""
    if not rows:
        return "(no models)"
    headers = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 1e-3 and value:
            return f"{value:.4g}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
