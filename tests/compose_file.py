"""docker/compose.yaml as Compose reads it, for the tests: its variables interpolated from a given environment by the
Compose specification's rules, and its database URLs. Not a Compose implementation: only what the stack uses."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}, $NAME
_VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


class MissingVariable(ValueError):
    """A required variable (${NAME:?message}) is unset; the message is what Compose prints."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with every variable replaced as Compose does; MissingVariable for an unset required one."""

    def value(match: re.Match) -> str:
        if match["dollar"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg, have = match["op"], match["arg"] or "", env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op in ("-", ":-"):
            return arg if unset else have
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return have
        if op in ("+", ":+"):
            return "" if unset else arg
        return have or ""

    return _VARIABLE.sub(value, text)


def _interpolate_tree(node, env: dict[str, str]):
    """Interpolation of every string value of the parsed file (Compose interpolates values, not keys or comments)."""
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def load(env: dict[str, str], path: Path = COMPOSE) -> dict:
    """The compose file, parsed (YAML merge keys applied), with its variables interpolated from `env`."""
    return _interpolate_tree(yaml.safe_load(path.read_text()), env)


def variables(path: Path = COMPOSE) -> set[str]:
    """The names of every variable the file's values read."""
    names: set[str] = set()
    _interpolate_tree(yaml.safe_load(path.read_text()), _Recorder(names))
    return names


class _Recorder(dict):
    """An environment that has no variable and notes each name asked for."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def get(self, name, default=None):
        self.names.add(name)
        return "x"


def database_urls(spec: dict) -> dict[str, str]:
    """The stack's database URLs by service: MLflow's --backend-store-uri and Prefect's connection URL."""
    (mlflow_url,) = re.findall(r"--backend-store-uri\s+(\S+)", spec["services"]["mlflow"]["command"])
    return {"mlflow": mlflow_url,
            "prefect": spec["services"]["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]}
