"""What crosses between the customer and the vendor of a split fine-tuning, and its one wire format.

The vendor sees only `Crossing`s: privatized token representations at the split, the attention mask (so the lengths)
and, as in the paper, the training labels; never token ids, token types or text. The customer sees only `Reply`s:
a loss, logits, or (U-shaped split) pooled features; the vendor receives `Gradient`s in the U-shaped split. Every
message serialises to bytes with a fixed schema: a JSON header naming each field's dtype and shape, then the raw
tensors; decoding refuses any other field, dtype, rank or length (no pickle crosses). Not here: who sends what
(customer.py, vendor.py) or how (transport.py).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields

import torch

SCHEMA = "dpcompress.split.crossing/1"
MAGIC = b"DPCX"
_FLOATS = (torch.float32,)
_LABELS = (torch.int64, torch.float32)  # class indices, or regression scores
_DTYPES = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}


@dataclass(frozen=True, kw_only=True)
class Crossing:
    """Customer -> vendor, one batch.

    hidden: [B, L, H] float32, the privatized representations after the customer's `split_layer` blocks, zero on
        padding. attention_mask: [B, L] uint8, 1 on real tokens (right padding). labels: [B] int64 class indices or
        float32 scores for a training batch; None for evaluation and in the U-shaped split (labels stay home).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        _check(self, "hidden", _FLOATS, 3)
        _check(self, "attention_mask", (torch.uint8,), 2)
        _check(self, "labels", _LABELS, 1, optional=True)
        batch, length, _ = self.hidden.shape
        if tuple(self.attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must be [{batch}, {length}], got {list(self.attention_mask.shape)}")
        if self.attention_mask.numel() and int(self.attention_mask.max()) > 1:
            raise ValueError("attention_mask must hold 0 and 1 only")
        if self.labels is not None and len(self.labels) != batch:
            raise ValueError(f"labels must be [{batch}], got {list(self.labels.shape)}")


@dataclass(frozen=True, kw_only=True)
class Reply:
    """Vendor -> customer. loss: [] float32, the batch's mean training loss. logits: [B, C] float32 (evaluation).
    features: [B, H] float32, the pooled representation the customer's head reads (U-shaped split)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __post_init__(self):
        _check(self, "loss", _FLOATS, 0, optional=True)
        _check(self, "logits", _FLOATS, 2, optional=True)
        _check(self, "features", _FLOATS, 2, optional=True)


@dataclass(frozen=True, kw_only=True)
class Gradient:
    """Customer -> vendor in the U-shaped split: d loss / d features, [B, H] float32, for the last forward batch."""

    features: torch.Tensor

    def __post_init__(self):
        _check(self, "features", _FLOATS, 2)


MESSAGES = {cls.__name__: cls for cls in (Crossing, Reply, Gradient)}


def _check(message, name: str, dtypes: tuple, ndim: int, *, optional: bool = False) -> None:
    value = getattr(message, name)
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor) or value.dtype not in dtypes or value.dim() != ndim:
        got = f"{value.dtype} with {value.dim()} dims" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{type(message).__name__}.{name} must be a {ndim}-D tensor of {dtypes}, got {got}")


def to_bytes(message) -> bytes:
    """The wire form of a Crossing, Reply or Gradient: MAGIC, header length, JSON header, raw tensors in field order."""
    kind = type(message).__name__
    if kind not in MESSAGES:
        raise TypeError(f"not a split message: {kind}")
    header, blobs = {"schema": SCHEMA, "type": kind, "fields": []}, []
    for field in fields(message):
        value = getattr(message, field.name)
        if value is None:
            continue
        tensor = value.detach().cpu().contiguous()
        header["fields"].append({"name": field.name, "dtype": str(tensor.dtype).removeprefix("torch."),
                                 "shape": list(tensor.shape)})
        blobs.append(tensor.numpy().tobytes())
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(encoded)) + encoded + b"".join(blobs)


def from_bytes(data: bytes, *, expect: type):
    """Decode `data` as a message of type `expect`; ValueError on anything outside the schema."""
    if data[:4] != MAGIC or len(data) < 8:
        raise ValueError("not a split message (bad magic)")
    (size,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + size])
    if header.get("schema") != SCHEMA or header.get("type") != expect.__name__:
        raise ValueError(f"expected {expect.__name__} of {SCHEMA}, got {header.get('type')} of {header.get('schema')}")
    allowed = {f.name for f in fields(expect)}
    values, offset = {}, 8 + size
    for entry in header["fields"]:
        name, dtype, shape = entry["name"], _DTYPES.get(entry["dtype"]), [int(n) for n in entry["shape"]]
        if name not in allowed or name in values or dtype is None or min(shape, default=0) < 0:
            raise ValueError(f"{expect.__name__}: field {entry} is outside the schema")
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if offset + nbytes > len(data):
            raise ValueError(f"{expect.__name__}: truncated field {name!r}")
        flat = torch.frombuffer(bytearray(data[offset:offset + nbytes]), dtype=dtype) if nbytes else \
            torch.empty(0, dtype=dtype)
        values[name] = flat.reshape(shape)
        offset += nbytes
    if offset != len(data):
        raise ValueError(f"{expect.__name__}: {len(data) - offset} trailing bytes")
    return expect(**values)


def field_names(data: bytes) -> list[str]:
    """The names of the fields a wire message carries (what a test asserts the vendor saw)."""
    (size,) = struct.unpack("<I", data[4:8])
    return [entry["name"] for entry in json.loads(data[8:8 + size])["fields"]]
