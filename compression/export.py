"""Export of a `TextClassifier`: a self-contained HF folder (custom code, loads with `trust_remote_code=True`) and a
compact sparse file for unstructured-pruned weights (packed bitmask plus kept values).

Not a serving layer (no quantisation, no ONNX). Pure library: torch, transformers, safetensors, numpy.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel

from privacy import files

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_dpcompress.py"
SPARSE_FORMAT = "dpcompress-sparse-v1"
_BITS, _VALUES = ":bitmask", ":values"
_BERT_FIELDS = ("vocab_size", "hidden_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")
_MODELING_HEADER = '''"""A dpcompress text classifier: BERT encoder with per-layer head counts and FFN widths,
mean or [CLS] pooling, linear head. Written by dpcompress (compression/export.py); depends only on torch and
transformers."""
import torch
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel
'''


# --- the portable model: these two classes are copied verbatim into every exported folder ------------------------

class DPCompressConfig(BertConfig):
    """BERT settings plus the classifier's pooling and per-layer shapes (heads of `head_dim` features, FFN width)."""

    model_type = "dpcompress_bert"
    pooling: str = "mean"
    head_dim: int | None = None
    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class DPCompressForSequenceClassification(BertPreTrainedModel):
    """BERT encoder (no pooler) -> mean over real tokens or the first token -> dropout -> linear classifier.

    Layer i has `layer_num_heads[i]` attention heads and an FFN of width `layer_intermediate_sizes[i]`.
    """

    config_class = DPCompressConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        for index, layer in enumerate(self.bert.encoder.layer):
            self._reshape_layer(layer, config, index)
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @staticmethod
    def _reshape_layer(layer, config, index):
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        heads = config.layer_num_heads[index] if config.layer_num_heads else config.num_attention_heads
        width = config.layer_intermediate_sizes[index] if config.layer_intermediate_sizes else config.intermediate_size
        attention, hidden = layer.attention.self, config.hidden_size
        for name in ("query", "key", "value"):
            setattr(attention, name, nn.Linear(hidden, heads * head_dim))
        attention.num_attention_heads, attention.attention_head_size = heads, head_dim
        attention.all_head_size, attention.scaling = heads * head_dim, head_dim**-0.5
        layer.attention.output.dense = nn.Linear(heads * head_dim, hidden)
        layer.intermediate.dense = nn.Linear(hidden, width)
        layer.output.dense = nn.Linear(width, hidden)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        kwargs.pop("return_dict", None)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           **kwargs).last_hidden_state
        if self.config.pooling == "mean":
            mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None and self.num_labels == 1:
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


# --- HF export ---------------------------------------------------------------------------------------------------

def modeling_source() -> str:
    """The text of the modeling file written into exported folders: imports plus the two classes above."""
    return "\n\n".join([_MODELING_HEADER] + [inspect.getsource(c) for c in
                                             (DPCompressConfig, DPCompressForSequenceClassification)])


def layer_dims(model) -> tuple[int, list[int], list[int]]:
    """`(head_dim, heads per layer, FFN width per layer)` read from the layers' weight shapes (after any shrinking)."""
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


def export_config(model, *, id2label: dict[int, str] | None = None) -> DPCompressConfig:
    """The exported folder's config: the encoder's BERT settings, pooling, labels and the actual per-layer shapes."""
    encoder = model.encoder.config
    if encoder.model_type != "bert":
        raise ValueError(f"export_hf supports BERT encoders only, got model_type={encoder.model_type!r}")
    head_dim, heads, widths = layer_dims(model)
    names = {int(i): str(v) for i, v in (id2label or {}).items()}
    labels = {"id2label": names, "label2id": {v: i for i, v in names.items()}} if names else {}
    if labels and len(labels["id2label"]) != model.num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries, the head has {model.num_labels} outputs")
    config = DPCompressConfig(
        **{f: getattr(encoder, f) for f in _BERT_FIELDS}, num_attention_heads=encoder.hidden_size // head_dim,
        num_hidden_layers=len(heads), intermediate_size=max(widths, default=encoder.intermediate_size),
        pooling=model.pooling, head_dim=head_dim, layer_num_heads=heads, layer_intermediate_sizes=widths,
        classifier_dropout=model.dropout.p, **labels)
    if not labels:
        config.num_labels = model.num_labels
    config.problem_type = "regression" if model.num_labels == 1 else "single_label_classification"
    config.architectures = [DPCompressForSequenceClassification.__name__]
    stem = MODELING_FILE.removesuffix(".py")
    config.auto_map = {"AutoConfig": f"{stem}.{DPCompressConfig.__name__}",
                       "AutoModelForSequenceClassification": f"{stem}.{DPCompressForSequenceClassification.__name__}"}
    return config


def export_hf(model, tokenizer, directory: str | Path, *, id2label: dict[int, str] | None = None) -> Path:
    """Write `model` (a `TextClassifier`) as an HF folder that loads without dpcompress installed:

    `AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)` gives the same logits
    for `(input_ids, attention_mask, token_type_ids)`. The folder holds config.json (with `auto_map`),
    `modeling_dpcompress.py`, model.safetensors and the tokenizer (if not None). `id2label` (optional) names the
    outputs. The write is atomic: a crash never leaves a half-written folder.
    """
    directory = Path(directory)
    exported = DPCompressForSequenceClassification(export_config(model, id2label=id2label))
    state = {f"bert.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in model.head.state_dict().items()})
    exported.load_state_dict(state, strict=True)  # a shape the config cannot express fails here, not at load time
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    exported.save_pretrained(tmp)
    (tmp / MODELING_FILE).write_text(modeling_source())
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    log.info("exported %s (%d layers, heads %s)", directory, exported.config.num_hidden_layers,
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
