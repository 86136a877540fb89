"""How a stage records its result in its folder (done.json, released.json): JSON of the small references tasks
return, read back only into the known reference types. Never pickle: a file someone else could write must not be able
to run code when read. (A Prefect Serializer, so it could serve as a result serializer; dpcompress has Prefect store
no results at all, see tasks/caching.py.)"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from prefect.serializers import Serializer

from privacy.accounting import DPEvent
from privacy.config import StageBudget
from tasks import refs

# The only types a result may hold (besides JSON's own): a decoded file names one of these or it is refused.
TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    refs.DataRef, refs.ModelRef, refs.StatsRef, refs.EvalRef, refs.SplitRef, refs.BudgetAccount, StageBudget, DPEvent)}


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if TYPES.get(name) is not type(value):
            raise TypeError(f"a task result may not hold {type(value).__qualname__} (not a reference type)")
        return {"__ref__": name, **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        if "__ref__" in value:
            raise ValueError("a result dict may not use the key '__ref__'")
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, float) and value != value:
        return {"__float__": "nan"}
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"__float__": "inf" if value > 0 else "-inf"}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__float__" in value:
            return float(value["__float__"])
        data = {k: _decode(v) for k, v in value.items()}
        name = data.pop("__ref__", None)
        if name is None:
            return data
        if name not in TYPES:
            raise ValueError(f"a task result names the unknown type {name!r}: refused")
        return TYPES[name](**data)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class RefSerializer(Serializer):
    """The reference types of tasks/refs.py as JSON (see the module doc)."""

    type: Literal["dpcompress-json"] = "dpcompress-json"

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(_encode(obj), sort_keys=True).encode()

    def loads(self, blob: bytes) -> Any:
        return _decode(json.loads(blob.decode()))
