"""Reading a study config file into a plain mapping, before it is typed (flows.config): strict YAML (a duplicate key is
an error, not the last value silently winning), syntax and encoding errors as one line naming the file and line,
`--set` overrides, the default GLUE folder, and keys of older versions (flows.renamed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from flows.renamed import renamed_keys

GLUE_DIR_ENV = "DPCOMPRESS_GLUE_DIR"
_MERGE = "tag:yaml.org,2002:merge"


class ConfigError(ValueError):
    """A config that cannot be used: `problems` holds one line per problem, each naming the file or key (str(err)
    joins them); `bad_sections`, the top-level sections at fault (empty when the file itself cannot be read)."""

    def __init__(self, problems: str | list[str], bad_sections: set[str] = frozenset()):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.bad_sections = set(bad_sections)
        super().__init__("\n".join(self.problems))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the document has the same key twice; `lines` says where, one line per key."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys: PyYAML keeps the last value silently, so `epsilon: 1.0` followed
    by `epsilon: 8.0` would run at 8. Merge keys (`<<: *defaults`) may still be overridden."""

    def construct_document(self, node):
        if lines := duplicate_keys(node):
            raise DuplicateKeyError(lines)
        return super().construct_document(node)


def duplicate_keys(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> list[str]:
    """One line per key that appears twice in a mapping under `node`, named by its dotted path."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already walked
        return []
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        return [line for i, item in enumerate(node.value) for line in duplicate_keys(item, f"{path}.{i}", seen)]
    if not isinstance(node, yaml.MappingNode):
        return []
    lines, first = [], {}
    for key, value in node.value:
        if key.tag == _MERGE:
            continue
        name = f"{path}.{key.value}".lstrip(".")
        line = key.start_mark.line + 1
        if isinstance(key, yaml.ScalarNode) and key.value in first:
            where = f"twice on line {line}" if first[key.value] == line else f"lines {first[key.value]} and {line}"
            lines.append(f"{name}: duplicate key ({where}); keep one")
        first.setdefault(key.value, line)
        lines += duplicate_keys(value, name, seen)
    return lines


def parse_yaml(text: str, where: str) -> Any:
    """`text` as YAML (StrictLoader); ConfigError naming `where` and the line for a syntax error or duplicate key."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except DuplicateKeyError as err:
        raise ConfigError([f"{where}: {line}" for line in err.lines]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(f"{where}: {at}YAML syntax error: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None


def read_text(path: Path) -> str:
    """The config file's text; ConfigError if it is missing, a folder, or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                          "UTF-8") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `KEY=VALUE` of `overrides` set (VALUE read as YAML); ConfigError listing every bad one."""
    problems = []
    for text in overrides:
        if "=" not in text:
            problems.append(f"--set needs KEY=VALUE, got {text!r}")
            continue
        key, value = text.split("=", 1)
        path, node = key.strip().split("."), raw
        try:
            value = parse_yaml(value, f"--set {text}")
        except ConfigError as err:
            problems += err.problems
            continue
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                problems.append(f"--set {text}: {part!r} is not a section")
                break
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


def read_config(path: str | Path, overrides: list[str] = (), *, glue_dir: str | None = None) -> dict:
    """The config file at `path` as a mapping, with `overrides` applied and the GLUE folder filled in where a data
    section has no `dir` (`glue_dir`, else $DPCOMPRESS_GLUE_DIR). ConfigError for anything that stops reading it."""
    path = Path(path)
    raw = parse_yaml(read_text(path), str(path))
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got a {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    if moved := renamed_keys(raw):
        raise ConfigError([f"{path}: {line}" for line in moved])
    glue_dir = glue_dir or os.environ.get(GLUE_DIR_ENV)
    prune = raw.get("prune") if isinstance(raw.get("prune"), dict) else {}
    calibration = prune.get("calibration")
    sources = [raw.get("data"), *([calibration] if isinstance(calibration, dict) else
                                  calibration if isinstance(calibration, list) else [])]
    for source in sources:
        if glue_dir and isinstance(source, dict) and not source.get("dir"):
            source["dir"] = str(Path(glue_dir).resolve())
    return raw
