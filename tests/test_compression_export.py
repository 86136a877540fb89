"""Export: HF folders load with AutoModelForSequenceClassification(trust_remote_code=True) and give the source model's
logits (mean/cls pooling, regression, per-layer shrunken heads and FFN widths, a removed layer), also in a fresh
interpreter that cannot import dpcompress; the sparse file reloads exactly and is smaller than dense."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from compression.export import (
    MODELING_FILE,
    export_hf,
    layer_dims,
    load_sparse,
    read_sparse,
    save_sparse,
    sparse_size_report,
)
from compression.models import build_tiny
from compression.pruning.masks import prune_masks

INCLUDE = "encoder.encoder.layer."



def _batch(seed=0, vocab=1000):
    """Ids with padding in one row and a second segment, as a pair task would give."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _logits(model, ids, mask, types):
    with torch.no_grad():
        return model(ids, mask, types)


def _load_exported(directory):
    loaded = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)
    return lambda ids, mask, types: loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, loaded


def _sliced(linear: nn.Linear, index: torch.Tensor, *, dim: int) -> nn.Linear:
    """A copy of `linear` keeping output rows (dim 0) or input columns (dim 1) `index`."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    out = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(linear.bias.detach()[index] if dim == 0 else linear.bias.detach())
    return out


def _shrink_layer(layer, *, heads: list[int], ffn: torch.Tensor):
    """Keep attention heads `heads` and FFN units `ffn` of one BertLayer, as structured pruning does."""
    attention = layer.attention.self
    d = attention.attention_head_size
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    for name in ("query", "key", "value"):
        setattr(attention, name, _sliced(getattr(attention, name), rows, dim=0))
    attention.num_attention_heads, attention.all_head_size = len(heads), len(heads) * d
    layer.attention.output.dense = _sliced(layer.attention.output.dense, rows, dim=1)
    layer.intermediate.dense = _sliced(layer.intermediate.dense, ffn, dim=0)
    layer.output.dense = _sliced(layer.output.dense, ffn, dim=1)


def _shrunken(num_labels=2, pooling="mean"):
    """A 4-head, 3-layer tiny model shrunk by hand: layer 0 keeps heads {0, 2} and 40 of 64 FFN units, layer 1 one
    head and 17 units, layer 2 is removed."""
    model = build_tiny(num_labels=num_labels, num_layers=3, num_heads=4, seed=5)
    model.pooling = pooling
    g = torch.Generator().manual_seed(0)
    _shrink_layer(model.layers[0], heads=[0, 2], ffn=torch.randperm(64, generator=g)[:40].sort().values)
    _shrink_layer(model.layers[1], heads=[3], ffn=torch.randperm(64, generator=g)[:17].sort().values)
    del model.encoder.encoder.layer[2]
    model.encoder.config.num_hidden_layers = 2
    return model.eval()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_gives_same_logits_and_tokenizer(tmp_path, tokenizer, pooling):
    model = build_tiny(num_labels=3, seed=1)
    model.pooling = pooling
    model.eval()
    names = {0: "neg", 1: "neutral", 2: "pos"}
    directory = export_hf(model, tokenizer, tmp_path / "hf", id2label=names)
    assert (directory / MODELING_FILE).exists() and (directory / "model.safetensors").exists()
    assert not (tmp_path / "hf.partial").exists()
    forward, loaded = _load_exported(directory)
    assert not loaded.training and loaded.config.pooling == pooling
    assert loaded.config.id2label == names and loaded.config.label2id == {v: k for k, v in names.items()}
    batch = _batch(seed=2)
    torch.testing.assert_close(forward(*batch), _logits(model, *batch), atol=1e-5, rtol=0)
    reloaded = AutoTokenizer.from_pretrained(directory)
    enc = reloaded(["the cat sat", "a dog"], ["on the mat", "the dog"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == tokenizer(["the cat sat", "a dog"], ["on the mat", "the dog"],
                                                  padding=True)["input_ids"]
    args = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    torch.testing.assert_close(forward(*args), _logits(model, *args), atol=1e-5, rtol=0)


def test_regression_head_exports_with_mse_loss(tmp_path):
    model = build_tiny(num_labels=1, seed=3).eval()
    forward, loaded = _load_exported(export_hf(model, None, tmp_path / "hf"))
    assert loaded.config.num_labels == 1 and loaded.config.problem_type == "regression"
    ids, mask, types = _batch(seed=4)
    expected = _logits(model, ids, mask, types)
    torch.testing.assert_close(forward(ids, mask, types), expected, atol=1e-5, rtol=0)
    target = torch.tensor([0.5, 2.0, 4.5])
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=target)
    torch.testing.assert_close(out.loss, ((expected.squeeze(-1) - target) ** 2).mean(), atol=1e-5, rtol=0)


def test_shrunken_heads_ffn_and_removed_layer_export(tmp_path):
    model = _shrunken(pooling="cls")
    assert layer_dims(model) == (8, [2, 1], [40, 17])
    forward, loaded = _load_exported(export_hf(model, None, tmp_path / "hf"))
    assert loaded.config.layer_num_heads == [2, 1] and loaded.config.layer_intermediate_sizes == [40, 17]
    assert len(loaded.encoder.encoder.layer) == 2
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    batch = _batch(seed=6)
    torch.testing.assert_close(forward(*batch), _logits(model, *batch), atol=1e-5, rtol=0)


def test_export_refuses_inconsistent_head_widths(tmp_path):
    model = build_tiny(num_heads=4, seed=7)
    attention = model.layers[0].attention.self
    attention.key = _sliced(attention.key, torch.arange(8), dim=0)  # key keeps 1 head, query 4
    with pytest.raises(ValueError, match="layer 0"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exported_folder_loads_without_dpcompress(tmp_path, tokenizer):
    """A fresh interpreter, run outside the repo with PYTHONPATH unset and every dpcompress package blocked from
    import (the venv installs it editable), loads the folder and reproduces the logits."""
    model = _shrunken(num_labels=3)
    directory = export_hf(model, tokenizer, tmp_path / "hf")
    batch = _batch(seed=8)
    torch.save(dict(zip(("ids", "mask", "types"), batch)), tmp_path / "batch.pt")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {{"compression", "privacy", "flows", "tasks"}}:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(directory)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(directory)!r})
        b = torch.load("batch.pt")
        with torch.no_grad():
            logits = model(input_ids=b["ids"], attention_mask=b["mask"], token_type_ids=b["types"]).logits
        torch.save(logits, "logits.pt")
        assert not [m for m in sys.modules if m.split(".")[0] == "compression"]
        print("loaded", type(model).__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded DPCompressForSequenceClassification" in proc.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(model, *batch), atol=1e-5, rtol=0)


def _pruned(sparsity=0.5, seed=9):
    model = build_tiny(seed=seed)
    masks = prune_masks(model, sparsity=sparsity, include=INCLUDE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return model, masks


def test_sparse_round_trip_is_exact_and_smaller(tmp_path):
    model, masks = _pruned()
    report = sparse_size_report(model, masks, tmp_path)
    fresh = build_tiny(seed=10)
    restored = load_sparse(tmp_path / "sparse.safetensors", fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert set(restored) == set(masks) and all(torch.equal(restored[n], masks[n]) for n in masks)
    masked = sum(m.numel() for m in masks.values())
    # pruned tensors: 4 bytes per weight dense; 1/8 byte of bitmask + 4 bytes per kept half sparse (~53%), plus
    # a larger header (two entries per pruned tensor and the shapes)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    saved = report["dense_bytes"] - report["sparse_bytes"]
    assert 1.875 * masked - 300 * len(masks) < saved <= 1.875 * masked
    assert report["ratio"] == report["sparse_bytes"] / report["dense_bytes"]


def test_sparse_float16_values_and_bad_inputs(tmp_path):
    model, masks = _pruned(sparsity=0.7, seed=11)
    exact = save_sparse(model, masks, tmp_path / "fp32.safetensors")
    half = save_sparse(model, masks, tmp_path / "fp16.safetensors", value_dtype=torch.float16)
    assert half.stat().st_size < exact.stat().st_size
    state, restored = read_sparse(half)
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == tensor.dtype
        torch.testing.assert_close(state[name], tensor, atol=1e-3, rtol=1e-3)
        if name in masks:
            assert torch.all(state[name][masks[name] == 0] == 0), name
    assert all(torch.equal(restored[n], masks[n]) for n in masks)
    with pytest.raises(KeyError, match="lacks"):
        save_sparse(model, {"nope.weight": torch.ones(2, 2)}, tmp_path / "bad.safetensors")
    report = sparse_size_report(model, masks, tmp_path / "sizes", value_dtype=torch.float16)
    assert sorted(report) == ["dense_bytes", "masked_fraction", "ratio", "sparse_bytes", "sparsity"]
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3) and 0 < report["masked_fraction"] < 1
    with pytest.raises(ValueError, match="not a dpcompress-sparse"):
        read_sparse(tmp_path / "sizes" / "dense.safetensors")
