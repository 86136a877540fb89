"""Reading one local GLUE TSV file (a task's train or dev split): UTF-8 text, the same number of tab-separated fields on
every line, the task's columns, valid labels. Every error is one line naming the file, and the data row at fault.

Not here: the task registry, the HF hub, subsampling (compression.data).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from compression.data import TaskSpec

STSB_RANGE = (0.0, 5.0)


def read_columns(path: Path, spec: TaskSpec) -> tuple[tuple[list[str], ...], list[int] | list[float]]:
    """(one stripped text list per text column, labels) of the GLUE TSV at `path` for task `spec`.

    ValueError naming the file (and data row) for: an empty file, text that is not UTF-8, a line with too few or too
    many fields, a missing column, no data rows, a label outside the task's labels."""
    text = read_text(path)
    _check_fields(text, path, spec)
    frame = _read_tsv(text, path, spec)
    found = list(frame.columns)
    for column in (*spec.text_columns, spec.label_column):
        if column not in found:
            raise ValueError(f"{path}: missing column {column!r}; columns found: {found}")
    if frame.empty:
        raise ValueError(f"{path}: no data rows (only the header line)")
    texts = tuple([text.strip() for text in frame[column].tolist()] for column in spec.text_columns)
    return texts, _parse_labels(frame[spec.label_column].tolist(), spec, path)


def read_text(path: Path) -> str:
    """The file's text, decoded as UTF-8 (a byte-order mark is dropped); ValueError naming the file if it is empty or
    not UTF-8 (with the line of the first bad byte)."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty file ({'0 bytes' if not data else 'only whitespace'})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
                         "UTF-8") from None


def _check_fields(text: str, path: Path, spec: TaskSpec) -> None:
    """Every non-blank line has as many tab-separated fields as the header (or the task's columns, headerless).
    GLUE TSVs are unquoted, so a tab inside a text or a cut line shows up here; pandas would pad or fail vaguely."""
    expected, row, bad = None if spec.header else len(spec.columns or ()), 0, []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines are skipped, as pandas does
        fields = line.count("\t") + 1
        if expected is None:
            expected = fields  # the header line
            continue
        row += 1
        if fields != expected:
            bad.append((row, number, fields))
    if bad:
        row, number, fields = bad[0]
        more = f"; {len(bad) - 1} more such row(s)" if len(bad) > 1 else ""
        hint = "a tab inside a text?" if fields > expected else "a cut line?"
        raise ValueError(f"{path}: data row {row} (line {number}): {fields} tab-separated field(s), expected "
                         f"{expected} ({hint}){more}")


def _read_tsv(text: str, path: Path, spec: TaskSpec) -> pd.DataFrame:
    try:
        return pd.read_csv(
            io.StringIO(text), sep="\t", quoting=3, keep_default_na=False, dtype=str,
            header=0 if spec.header else None,
            names=None if spec.header else list(spec.columns or ()),
            index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot parse as a GLUE TSV ({spec.name}): {str(err).strip()}") from None


def _parse_labels(raw: list[str], spec: TaskSpec, path: Path) -> list[int] | list[float]:
    if spec.label_names is None:
        return [_parse_score(value, row, path) for row, value in enumerate(raw, start=1)]
    index = {name: i for i, name in enumerate(spec.label_names)}
    labels = []
    for row, value in enumerate(raw, start=1):
        key = value.strip()
        if key not in index:
            raise ValueError(
                f"{path}: data row {row}: label {value!r} not in allowed labels {list(spec.label_names)}"
            )
        labels.append(index[key])
    return labels


def _parse_score(value: str, row: int, path: Path) -> float:
    low, high = STSB_RANGE
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not low <= score <= high:
        raise ValueError(f"{path}: data row {row}: score {value!r} is not a number in [{low}, {high}]")
    return score
