"""Export of a `TextClassifier` of any model family: a self-contained HF folder (custom code, loads with
`trust_remote_code=True`) and a compact sparse file for unstructured-pruned weights (packed bitmask plus kept values).

Not a serving layer (no quantisation, no ONNX). Pure library: torch, transformers, safetensors, numpy.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from privacy import files

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_dpcompress.py"
SPARSE_FORMAT = "dpcompress-sparse-v1"
_BITS, _VALUES = ":bitmask", ":values"
_MODELING_HEADER = '''"""A dpcompress text classifier: any HF base model (its own config nested, built with AutoModel),
per-layer head counts and FFN widths for structurally pruned BERT-like layers, mean, first-token or last-token
pooling, linear head. Written by dpcompress (compression/export.py); depends only on torch and transformers."""
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
'''


# --- the portable model: these two classes are copied verbatim into every exported folder ------------------------

class DPCompressConfig(PreTrainedConfig):
    """The base model's own config (`encoder_config`: its model_type and fields), how inputs reach it, the pooling,
    and the per-layer shapes of structurally pruned BERT-like layers (heads of `head_dim` features, FFN width)."""

    model_type = "dpcompress"
    encoder_config: dict | None = None    # the base model's config.to_dict(), model_type included
    layers_path: str = "encoder.layer"    # the transformer layers' ModuleList inside the base model
    position_offset: int | None = None    # None: positions 0..L-1; p: p + running count of real tokens (RoBERTa)
    token_types: bool = True              # token_type_ids reach the base model
    pooling: str = "mean"                 # mean over real tokens, cls (first token), last (last real token)
    classifier_dropout: float | None = None
    head_dim: int | None = None
    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class DPCompressForSequenceClassification(PreTrainedModel):
    """Base model (no pooler) -> mean over real tokens, the first token or the last real token (right padding) ->
    dropout -> linear classifier. If `layer_num_heads` is set, BERT-like layer i has `layer_num_heads[i]` heads and
    an FFN of width `layer_intermediate_sizes[i]`."""

    config_class = DPCompressConfig
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        encoder_config = AutoConfig.for_model(**config.encoder_config)
        try:
            self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
        except TypeError:  # base models without a pooler option
            self.encoder = AutoModel.from_config(encoder_config)
        layers = self.encoder
        for name in config.layers_path.split("."):
            layers = getattr(layers, name)
        for index, layer in enumerate(layers if config.layer_num_heads else []):
            self._reshape_layer(layer, encoder_config, config, index)
        self.dropout = nn.Dropout(0.1 if config.classifier_dropout is None else config.classifier_dropout)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    @staticmethod
    def _reshape_layer(layer, encoder_config, config, index):
        head_dim, hidden = config.head_dim, encoder_config.hidden_size
        heads, width = config.layer_num_heads[index], config.layer_intermediate_sizes[index]
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            setattr(attention, name, nn.Linear(hidden, heads * head_dim))
        attention.num_attention_heads, attention.attention_head_size = heads, head_dim
        attention.all_head_size, attention.scaling = heads * head_dim, head_dim**-0.5
        layer.attention.output.dense = nn.Linear(heads * head_dim, hidden)
        layer.intermediate.dense = nn.Linear(hidden, width)
        layer.output.dense = nn.Linear(width, hidden)

    def _pool(self, hidden, mask):
        if self.config.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.config.pooling == "last":
            last = mask.long().sum(1).sub(1).clamp(min=0)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        return hidden[:, 0]

    def _inputs(self, input_ids, attention_mask, token_type_ids, kwargs):
        """The padding mask and the base model's keyword arguments (explicit position ids)."""
        kwargs.pop("return_dict", None)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.config.position_offset is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).contiguous()
        else:
            positions = mask.long().cumsum(1) * mask.long() + self.config.position_offset
        if self.config.token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return mask, dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        mask, inputs = self._inputs(input_ids, attention_mask, token_type_ids, kwargs)
        hidden = self.encoder(**inputs).last_hidden_state
        return self._output(self._pool(hidden, mask), labels)

    def _output(self, pooled, labels):
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None and self.num_labels == 1:
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


# --- HF export ---------------------------------------------------------------------------------------------------

PORTABLE_CLASSES = (DPCompressConfig, DPCompressForSequenceClassification)


def modeling_source(classes: tuple[type, ...] = PORTABLE_CLASSES) -> str:
    """The text of the modeling file written into exported folders: imports plus `classes` (default: the two above;
    a method's export adds its own, which need no more imports)."""
    return "\n\n".join([_MODELING_HEADER] + [inspect.getsource(c) for c in classes])


class Portable(NamedTuple):
    """What the exported folder of a model holds: its config and model classes, the modeling file's text, the config
    class's own fields, and every weight (`state`, the model class's state dict)."""

    config_class: type
    model_class: type
    source: str
    fields: dict
    state: dict[str, torch.Tensor]


# a TextClassifier subclass's `kind` -> (model, the plain classifier's weights: encoder.*, classifier.*) -> Portable.
# Registered by the methods whose stage model is more than a plain classifier (side, reversible).
PORTABLE: dict[str, Callable[[nn.Module, dict[str, torch.Tensor]], Portable]] = {}


def layer_dims(model) -> tuple[int, list[int], list[int]]:
    """`(head_dim, heads per layer, FFN width per layer)` of BERT-like layers, read from their weight shapes (after any
    shrinking)."""
    config = model.encoder.config
    head_dim = config.hidden_size // config.num_attention_heads
    if len(model.layers):
        head_dim = int(getattr(model.layers[0].attention.self, "attention_head_size", head_dim))
    heads, widths = [], []
    for index, layer in enumerate(model.layers):
        attention = layer.attention.self
        features = {attention.query.weight.shape[0], attention.key.weight.shape[0], attention.value.weight.shape[0],
                    layer.attention.output.dense.weight.shape[1]}
        if len(features) != 1 or next(iter(features)) % head_dim:
            raise ValueError(f"layer {index}: query/key/value/output widths {sorted(features)} are not one "
                             f"multiple of head_dim={head_dim}")
        heads.append(next(iter(features)) // head_dim)
        widths.append(layer.intermediate.dense.weight.shape[0])
    return head_dim, heads, widths


def export_config(model, *, id2label: dict[int, str] | None = None, config_class: type = DPCompressConfig,
                  model_class: type = DPCompressForSequenceClassification, **fields) -> DPCompressConfig:
    """The exported folder's config: the base model's own config, its family's input conventions (positions, token
    types), pooling, labels and, for BERT-like families, the actual per-layer shapes; `fields` are `config_class`'s
    own (the side network's spec of a side model)."""
    family, encoder = model.family, model.encoder.config
    shapes = {}
    if family.structured:
        head_dim, heads, widths = layer_dims(model)
        shapes = {"head_dim": head_dim, "layer_num_heads": heads, "layer_intermediate_sizes": widths}
    names = {int(i): str(v) for i, v in (id2label or {}).items()}
    labels = {"id2label": names, "label2id": {v: i for i, v in names.items()}} if names else {}
    if labels and len(labels["id2label"]) != model.num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries, the head has {model.num_labels} outputs")
    config = config_class(
        encoder_config=encoder.to_dict(), layers_path=family.layers_path,
        position_offset=encoder.pad_token_id if family.positions == "after_padding" else None,
        token_types=family.reads_token_types(encoder), pooling=model.pooling, classifier_dropout=model.dropout.p,
        **shapes, **labels, **fields)
    if not labels:
        config.num_labels = model.num_labels
    config.problem_type = "regression" if model.num_labels == 1 else "single_label_classification"
    config.architectures = [model_class.__name__]
    stem = MODELING_FILE.removesuffix(".py")
    config.auto_map = {"AutoConfig": f"{stem}.{config_class.__name__}",
                       "AutoModelForSequenceClassification": f"{stem}.{model_class.__name__}"}
    return config


def _portable(model) -> Portable:
    """What the folder of `model` holds: the two classes above, or those its kind registered in `PORTABLE`."""
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in model.head.state_dict().items()})
    if model.kind is None:
        return Portable(DPCompressConfig, DPCompressForSequenceClassification, modeling_source(), {}, state)
    import compression.methods  # noqa: F401  (the methods register their kinds' exports)

    if model.kind not in PORTABLE:
        raise ValueError(f"no export for a model of kind {model.kind!r}; known: {sorted(PORTABLE)}")
    return PORTABLE[model.kind](model, state)


def export_hf(model, tokenizer, directory: str | Path, *, id2label: dict[int, str] | None = None) -> Path:
    """Write `model` (a `TextClassifier` of any registered family) as an HF folder that loads without dpcompress:

    `AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)` gives the same logits
    for right-padded `(input_ids, attention_mask, token_type_ids)`. The folder holds config.json (with `auto_map`
    and the base model's config nested), `modeling_dpcompress.py`, model.safetensors and the tokenizer (if not
    None); a method's model kind adds its own classes and weights (`PORTABLE`: a side model is its frozen backbone
    and its side network, compression.export_side; a reversible one its adapter stack,
    compression.methods.reversible_export). `id2label` (optional) names the outputs. The write is atomic: a crash
    never leaves a half-written folder.
    """
    directory = Path(directory)
    portable = _portable(model)
    exported = portable.model_class(export_config(model, id2label=id2label, config_class=portable.config_class,
                                                  model_class=portable.model_class, **portable.fields))
    # a shape the config cannot express fails here, not at load time
    exported.load_state_dict(portable.state, strict=True)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    exported.save_pretrained(tmp)
    (tmp / MODELING_FILE).write_text(portable.source)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    log.info("exported %s (%s, %d layers, heads %s)", directory, model.encoder.config.model_type, model.num_layers,
             exported.config.layer_num_heads)
    return directory


# --- sparse storage of unstructured-pruned weights ---------------------------------------------------------------

def save_sparse(model: nn.Module, masks: dict[str, torch.Tensor], path: str | Path, *,
                value_dtype: torch.dtype = torch.float32) -> Path:
    """Write `model`'s state dict to one safetensors file, each masked 2-D weight as a packed bitmask (1 bit per
    entry, `numpy.packbits`, row-major) plus its kept values in `value_dtype`; every other tensor dense.

    Entries under a zero mask are stored as zeros whatever their value (the mask is applied). float32 values
    reload bit-exact; float16 halves the values' bytes at a rounding error.
    """
    path = Path(path)
    state = model.state_dict()
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise KeyError(f"masks name tensors the model lacks: {unknown[:3]}")
    tensors, shapes = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name not in masks:
            tensors[name] = tensor.contiguous()
            continue
        if masks[name].shape != tensor.shape:
            raise ValueError(f"{name}: mask shape {tuple(masks[name].shape)} != weight {tuple(tensor.shape)}")
        keep = masks[name].detach().cpu().bool().reshape(-1)
        tensors[name + _BITS] = torch.from_numpy(np.packbits(keep.numpy()))
        tensors[name + _VALUES] = tensor.reshape(-1)[keep].to(value_dtype).contiguous()
        shapes[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    blob = save(tensors, metadata={"format": SPARSE_FORMAT, "sparse": json.dumps(shapes)})
    files.atomic_write(path, lambda file: file.write(blob))
    return path


def read_sparse(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense state dict stored by `save_sparse`, and the {0,1} float masks of its sparse tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path} is not a {SPARSE_FORMAT} file (format={meta.get('format')!r})")
    tensors = load_file(str(path))
    state, masks = {}, {}
    for name, spec in json.loads(meta["sparse"]).items():
        shape, dtype = spec["shape"], getattr(torch, spec["dtype"])
        numel = math.prod(shape)
        keep = torch.from_numpy(np.unpackbits(tensors.pop(name + _BITS).numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=dtype)
        dense[keep] = tensors.pop(name + _VALUES).to(dtype)
        state[name], masks[name] = dense.view(shape), keep.view(shape).float()
    state.update(tensors)
    return state, masks


def load_sparse(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load a `save_sparse` file into `model` (same architecture; strict) in place; returns the masks."""
    state, masks = read_sparse(path)
    model.load_state_dict(state, strict=True)
    return masks


def sparse_size_report(model: nn.Module, masks: dict[str, torch.Tensor], directory: str | Path, *,
                       value_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Write `dense.safetensors` and `sparse.safetensors` of `model` into `directory`; their sizes in bytes.

    Returns dense_bytes, sparse_bytes, ratio (sparse / dense), masked_fraction (share of the parameters under a
    mask) and sparsity (zero fraction of the masks).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dense, sparse = directory / "dense.safetensors", directory / "sparse.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, dense,
              metadata={"format": "pt"})
    save_sparse(model, masks, sparse, value_dtype=value_dtype)
    masked = sum(m.numel() for m in masks.values())
    total = sum(v.numel() for v in model.state_dict().values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    dense_bytes, sparse_bytes = dense.stat().st_size, sparse.stat().st_size
    return {"dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes, "ratio": sparse_bytes / dense_bytes,
            "masked_fraction": masked / total if total else 0.0, "sparsity": zeros / masked if masked else 0.0}
