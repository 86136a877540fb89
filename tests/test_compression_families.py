"""Model families (bert, roberta, distilbert, gpt2): the classifier's hidden states equal the HF base model's own
forward at real tokens, split forwards equal full ones, pooling ignores padding, save/load and export round trips,
removed layers, unstructured pruning's default tensors, and book-keeping DP steps (GPT-2's Conv1D included) against
one-example-at-a-time microbatches."""
import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import privacy.bookkeeping_layers
from compression.data import pad
from compression.evaluate import sparsity
from compression.export import export_hf
from compression.families import FAMILIES, family_of
from compression.models import TextClassifier, build_tiny, count_parameters, load_saved, save_classifier
from compression.pruning.masks import prunable, prune_masks
from compression.pruning.structured import (
    StructuredConfig,
    remove_heads,
    remove_layers,
    remove_neurons,
    structured_round,
)
from privacy.engine import PrivateModel

TYPES = ["bert", "roberta", "distilbert", "gpt2"]


def _tiny(model_type, **kw):
    kw = {"num_layers": 3, "num_heads": 4, "dropout": 0.0, "seed": 0, **kw}
    return build_tiny(model_type=model_type, **kw).eval()


def _batch(model, seed=0):
    """Three right-padded rows (padding holds the config's pad id) and a second token-type segment."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 900, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, model.encoder.config.pad_token_id or 0)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types * mask


def _logits(model, ids, mask, types):
    with torch.no_grad():
        return model(ids, mask, types)


def _hf_hidden(model, ids, mask, types):
    """The base model's own forward (AutoModel; GPT-2's after ln_f), positions and masks computed by HF."""
    extra = {"token_type_ids": types} if model.family.reads_token_types(model.encoder.config) else {}
    with torch.no_grad():
        return model.encoder(input_ids=ids, attention_mask=mask, **extra).last_hidden_state


@pytest.mark.parametrize("model_type", [*TYPES, "xlm-roberta", "camembert"])
def test_hidden_states_equal_the_hf_base_model_at_real_tokens(model_type):
    if model_type in TYPES:
        model = _tiny(model_type)
    else:  # aliases of the roberta family
        config = AutoConfig.for_model(model_type, vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=130)
        torch.manual_seed(0)
        model = TextClassifier(AutoModel.from_config(config, add_pooling_layer=False), num_labels=2).eval()
    ids, mask, types = _batch(model)
    with torch.no_grad():
        ours = model.hidden_states(ids, mask, types)
    real = mask.bool()
    torch.testing.assert_close(ours[real], _hf_hidden(model, ids, mask, types)[real], atol=1e-5, rtol=0)
    if not model.family.reads_token_types(model.encoder.config):  # token types cannot reach the model
        with torch.no_grad():
            torch.testing.assert_close(model.hidden_states(ids, mask, torch.zeros_like(types)), ours, atol=0, rtol=0)


def test_roberta_positions_start_after_the_padding_index():
    model = _tiny("roberta")
    ids, mask, _ = _batch(model)
    positions = model.family.position_ids(model.encoder, ids, mask)
    assert positions[2].tolist() == [2, 3, 4] + [1] * 7 and positions[0].tolist() == list(range(2, 12))
    assert _tiny("bert").family.position_ids(None, ids, mask)[2].tolist() == list(range(10))


@pytest.mark.parametrize("model_type", TYPES)
def test_split_forward_equals_full_forward(model_type):
    model = _tiny(model_type)
    batch = _batch(model, seed=1)
    full = _logits(model, *batch)
    ids, mask, types = batch
    for k in range(model.num_layers + 1):
        with torch.no_grad():
            hidden = model.embed(ids, mask, types, num_layers=k)
            torch.testing.assert_close(model.classify(hidden, mask, start_layer=k), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", [None, "mean", "last"])
@pytest.mark.parametrize("model_type", TYPES)
def test_pooling_ignores_padding(model_type, pooling):
    model = _tiny(model_type)
    model.pooling = pooling or model.pooling
    assert model.pooling == (pooling or ("last" if model_type == "gpt2" else "mean"))
    ids = torch.randint(5, 900, (1, 6))
    pad_id = model.encoder.config.pad_token_id or 0
    padded = torch.cat([ids, torch.full((1, 4), pad_id)], 1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(_logits(model, padded, mask, torch.zeros_like(padded)),
                               _logits(model, ids, torch.ones_like(ids), torch.zeros_like(ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_save_and_load_round_trip(tmp_path, model_type):
    model = _tiny(model_type, num_labels=3)
    save_classifier(model, None, tmp_path / "m")
    loaded, _ = load_saved(tmp_path / "m")
    batch = _batch(model, seed=2)
    assert loaded.pooling == model.pooling and loaded.encoder.config.model_type == model_type
    torch.testing.assert_close(_logits(loaded.eval(), *batch), _logits(model, *batch), atol=0, rtol=0)
    assert count_parameters(loaded) == count_parameters(model)


def _structurally_pruned(model_type):
    model = _tiny(model_type, num_layers=4)
    remove_heads(model, {0: [1], 2: [0, 3]})
    remove_neurons(model, {1: [0, 5, 63], 3: list(range(10, 40))})
    remove_layers(model, [1])
    return model


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_structurally_pruned_save_load_and_export(tmp_path, model_type):
    model = _structurally_pruned(model_type)
    batch = _batch(model, seed=3)
    loaded, _ = load_saved(save_classifier(model, None, tmp_path / "m"))
    torch.testing.assert_close(_logits(loaded.eval(), *batch), _logits(model, *batch), atol=0, rtol=0)
    exported = AutoModelForSequenceClassification.from_pretrained(export_hf(model, None, tmp_path / "hf"),
                                                                   trust_remote_code=True)
    assert exported.config.layer_num_heads == [3, 2, 4]
    assert sum(p.numel() for p in exported.parameters()) == count_parameters(model)
    with torch.no_grad():
        logits = exported(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2]).logits
    torch.testing.assert_close(logits, _logits(model, *batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["distilbert", "gpt2"])
def test_structured_pruning_of_other_families_is_refused_naming_them(model_type):
    model = _tiny(model_type)
    for action in (lambda: remove_heads(model, {0: [0]}), lambda: remove_neurons(model, {0: [0]}),
                   lambda: structured_round(model, StructuredConfig(), 1)):
        with pytest.raises(ValueError, match=f"BERT-like.*model_type '{model_type}'"):
            action()


def test_unknown_model_type_is_a_clear_error():
    config = AutoConfig.for_model("albert", vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, embedding_size=16)
    with pytest.raises(ValueError, match=r"model_type 'albert'.*supported.*'bert'.*'gpt2'"):
        family_of(AutoModel.from_config(config))
    assert {"bert", "roberta", "distilbert", "gpt2"} <= set(FAMILIES)


@pytest.mark.parametrize("model_type", TYPES)
def test_removed_layers_match_the_model_skipping_them(model_type):
    model = _tiny(model_type, num_layers=4)
    oracle = copy.deepcopy(model)
    for i in (0, 2):
        oracle.layers[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
    remove_layers(model, [2, 0])
    batch = _batch(model, seed=4)
    torch.testing.assert_close(_logits(model, *batch), _logits(oracle, *batch), atol=1e-5, rtol=0)
    config = model.encoder.config
    assert model.num_layers == 2 and config.num_hidden_layers == 2 and config.original_num_hidden_layers == 4


@pytest.mark.parametrize("model_type,prefix", [
    ("bert", "encoder.encoder.layer."), ("roberta", "encoder.encoder.layer."),
    ("distilbert", "encoder.transformer.layer."), ("gpt2", "encoder.h.")])
def test_unstructured_pruning_selects_the_family_layers(model_type, prefix):
    model = _tiny(model_type)
    names = set(prunable(model))
    assert names and all(n.startswith(prefix) for n in names)
    assert len(names) == (4 if model_type == "gpt2" else 6) * 3  # GPT-2 fuses query, key and value
    masks = prune_masks(model, sparsity=0.5)
    assert set(masks) == names
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    assert sparsity(model) == pytest.approx(0.5, abs=1e-3)


# --- DP: book-keeping (and Opacus) against one-example-at-a-time microbatches --------------------------------------

def _oracle_update(forward, params, examples, clip, clipping):
    """Sum over examples of each example's gradient clipped (whole, or per parameter tensor), one at a time."""
    layer_clip = clip / math.sqrt(len(params))
    total = [torch.zeros_like(p) for p in params]
    for example in examples:
        grads = torch.autograd.grad(forward([example]).sum(), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (layer_clip, float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    return total


def _private_step_matches_oracle(model, forward, examples, *, mode, clipping, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _oracle_update(forward, params, examples, clip, clipping)
    before = [p.detach().clone() for p in params]
    private = PrivateModel(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                           expected_batch_size=len(examples), mode=mode, clipping=clipping)
    half = len(examples) // 2
    for chunk in (examples[:half], examples[half:]):  # two physical chunks of one logical batch
        private.backward(forward(chunk))
        assert float(private.per_example_norms().max()) > clip  # the bound is active
    private.step()
    private.close()
    for b, p, e in zip(before, params, expected):
        torch.testing.assert_close(b - p.detach(), e / len(examples), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type,mode,clipping",
                         [(t, "bookkeeping", c) for t in TYPES for c in ("flat", "per_layer")]
                         + [("gpt2", "hooks", "flat"), ("gpt2", "ghost", "flat")])
def test_dp_step_matches_microbatch_oracle(model_type, mode, clipping):
    """Every parameter trains, embeddings included; rows padded to their chunk's longest."""
    model = _tiny(model_type, num_layers=2).train()  # no dropout: the oracle and the engine see the same function
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(5, 900, (int(k),), generator=g) for k in torch.randint(3, 9, (6,), generator=g)]
    labels = torch.randint(0, 2, (6,), generator=g)

    def forward(rows):
        input_ids, mask = pad([ids[i] for i in rows])
        return F.cross_entropy(model(input_ids, mask, torch.zeros_like(input_ids)), labels[rows], reduction="none")

    _private_step_matches_oracle(model, forward, list(range(6)), mode=mode, clipping=clipping, clip=0.05)


@pytest.mark.parametrize("ghost_norm", [True, False])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bk_conv1d_matches_microbatch_oracle(monkeypatch, ghost_norm, clipping):
    """Conv1D (y = x W + b, W [in, out]) on 3-D inputs, through both of LinearCapture's norm paths."""
    monkeypatch.setattr(privacy.bookkeeping_layers, "use_ghost_norm", lambda **_: ghost_norm)
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7))
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))

    def forward(rows):
        return F.cross_entropy(model(x[rows]).mean(1), y[rows], reduction="none")

    _private_step_matches_oracle(model, forward, list(range(6)), mode="bookkeeping", clipping=clipping, clip=0.1)


# --- export --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", TYPES)
def test_export_round_trip_gives_the_same_logits(tmp_path, model_type):
    model = _tiny(model_type, num_labels=3)
    directory = export_hf(model, None, tmp_path / "hf")
    loaded = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)
    assert loaded.config.encoder_config["model_type"] == model_type and loaded.config.pooling == model.pooling
    ids, mask, types = _batch(model, seed=6)
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(logits, _logits(model, ids, mask, types), atol=1e-5, rtol=0)


def test_exported_families_load_without_dpcompress(tmp_path):
    """A fresh interpreter that cannot import dpcompress loads a RoBERTa, a DistilBERT and a GPT-2 export."""
    expected = {}
    for model_type in ("roberta", "distilbert", "gpt2"):
        model = _tiny(model_type)
        export_hf(model, None, tmp_path / model_type)
        batch = _batch(model, seed=7)
        torch.save(batch, tmp_path / f"{model_type}.pt")
        expected[model_type] = _logits(model, *batch)
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"compression", "privacy", "flows", "tasks"}:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForSequenceClassification
        for name in ("roberta", "distilbert", "gpt2"):
            model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=True)
            ids, mask, types = torch.load(name + ".pt")
            with torch.no_grad():
                torch.save(model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, name + ".out")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, logits in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.out"), logits, atol=1e-5, rtol=0)
