"""Config keys of earlier dpcompress versions, and where each went: an old key fails with one line naming the new."""
from __future__ import annotations

STAGE_SECTIONS = ("teacher", "nonprivate", "prune", "structured", "distill")
# (section path, old key) -> the new key, or a sentence
_MOVED = {
    ("privacy", "teacher_share"): "privacy.shares.teacher",
    ("privacy", "prune_share"): "privacy.shares.prune",
    ("privacy", "structured_share"): "privacy.shares.structured",
    ("privacy", "distill_share"): "privacy.shares.distill",
    ("prune", "distill_alpha"): "prune.kd.weight",
    ("prune", "temperature"): "prune.kd.temperature",
    ("prune", "lines"): "prune.layout",
    ("structured", "distill_alpha"): "structured.kd.weight",
    ("structured", "temperature"): "structured.kd.temperature",
    ("distill.method", "alpha"): "distill.kd.weight",
    ("distill.method", "temperature"): "distill.kd.temperature",
    ("distill.method", "init"): "distill.student.init",
    ("distill.method", "layer_map"): "distill.student.layer_map",
    ("distill.method", "student"): "distill.student.pretrained",
}
_VALUES = {("prune.schedule", "scorer", "activation"): "wanda"}


def _get(raw: dict, path: str):
    node = raw
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def renamed_keys(raw: dict) -> list[str]:
    """One line per key (or value) of an older dpcompress found in `raw`, naming what replaced it."""
    from compression.train import TrainConfig  # imported here: it takes seconds, and a YAML error needs none of it

    train_fields = frozenset(TrainConfig.__dataclass_fields__)
    lines = [f"{where}.{key}: renamed to {new}" for (where, key), new in _MOVED.items()
             if key in (_get(raw, where) or {})]
    lines += [f"{where}.{key}: {old!r} is now {new!r}" for (where, key, old), new in _VALUES.items()
              if (_get(raw, where) or {}).get(key) == old]
    for section in STAGE_SECTIONS:
        node = _get(raw, section) or {}
        train = _get(raw, f"{section}.train") or {}
        for key in ("trainable_layers", "trainable_params"):
            if key in train:
                lines.append(f"{section}.train.{key}: replaced by {section}.method, e.g. {{name: full, layers: 1}} "
                             "or {name: bias_norm, layers: all}")
        lines += [f"{section}.{key}: moved to {section}.train.{key}" for key in sorted(train_fields & set(node))]
        if train.get("engine") == "bk":
            lines.append(f"{section}.train.engine: 'bk' is now 'bookkeeping'")
    return lines
