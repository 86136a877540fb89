"""Structured pruning: physically removed heads/neurons give the logits of the unpruned model with those units zeroed,
removed layers those of the model skipping them; exact parameter counts, round targets, save/load, training and a
book-keeping DP step on a shrunken model against one-example-at-a-time microbatches."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from compression.data import pad
from compression.methods import make_trainable
from compression.methods.full import FullConfig
from compression.models import build_tiny, count_parameters, load_saved, save_classifier
from compression.pruning.structured import (
    SCORERS,
    StructuredConfig,
    layer_shapes,
    magnitude_scores,
    remove_heads,
    remove_layers,
    remove_neurons,
    round_targets,
    structured_round,
    taylor_scores,
)
from privacy.engine import PrivateModel

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 4
HEAD_DIM = HIDDEN // HEADS



def _tiny(seed=0):
    return build_tiny(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN, dropout=0.0,
                      seed=seed).eval()


def _batch(seed=0):
    """Three rows, two of them padded, and a second segment."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _logits(model, batch):
    with torch.no_grad():
        return model(*batch)


def _zero_heads_and_neurons(model, heads, neurons):
    """The oracle: zero each head's query/key/value rows and biases and its attention.output.dense columns (its
    contribution is then exactly zero), and each neuron's intermediate row and bias and output column (GELU(0) = 0)."""
    with torch.no_grad():
        for i, hs in heads.items():
            attention = model.layers[i].attention
            for h in hs:
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                for linear in (attention.self.query, attention.self.key, attention.self.value):
                    linear.weight[rows] = 0
                    linear.bias[rows] = 0
                attention.output.dense.weight[:, rows] = 0
        for i, ns in neurons.items():
            layer = model.layers[i]
            layer.intermediate.dense.weight[ns] = 0
            layer.intermediate.dense.bias[ns] = 0
            layer.output.dense.weight[:, ns] = 0


HEADS_REMOVED = {0: [1], 2: [0, 3], 3: [0, 1, 2]}
NEURONS_REMOVED = {1: [0, 5, 63], 2: list(range(10, 40)), 3: [7]}


def _shrunk(seed=0):
    model = _tiny(seed)
    remove_heads(model, HEADS_REMOVED)
    remove_neurons(model, NEURONS_REMOVED)
    return model


def test_removed_heads_and_neurons_match_the_zeroed_model():
    model = _tiny()
    oracle = copy.deepcopy(model)
    _zero_heads_and_neurons(oracle, HEADS_REMOVED, NEURONS_REMOVED)
    before = count_parameters(model)
    remove_heads(model, HEADS_REMOVED)
    remove_neurons(model, NEURONS_REMOVED)
    batch = _batch()
    torch.testing.assert_close(_logits(model, batch), _logits(oracle, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(oracle, batch), _logits(_tiny(), batch), atol=1e-3)  # the units mattered
    assert layer_shapes(model) == [{"num_heads": 3, "intermediate_size": 64}, {"num_heads": 4, "intermediate_size": 61},
                                   {"num_heads": 2, "intermediate_size": 34}, {"num_heads": 1, "intermediate_size": 63}]
    attention = model.layers[3].attention
    assert attention.self.query.weight.shape == (HEAD_DIM, HIDDEN) and attention.self.value.bias.shape == (HEAD_DIM,)
    assert attention.output.dense.weight.shape == (HIDDEN, HEAD_DIM) and attention.output.dense.in_features == HEAD_DIM
    assert attention.self.num_attention_heads == 1 and attention.self.all_head_size == HEAD_DIM
    assert model.layers[2].intermediate.dense.out_features == 34 and model.layers[2].output.dense.in_features == 34
    per_head = 3 * (HIDDEN * HEAD_DIM + HEAD_DIM) + HIDDEN * HEAD_DIM  # q/k/v rows and biases, output columns
    per_neuron = HIDDEN + 1 + HIDDEN  # intermediate row and bias, output column
    removed = 6 * per_head + 34 * per_neuron
    assert count_parameters(model) == before - removed


def test_removed_layers_match_the_model_skipping_them():
    model = _tiny(seed=1)
    oracle = copy.deepcopy(model)
    for i in (0, 2):  # identity layers: the oracle runs every layer but skips these
        oracle.layers[i].forward = lambda hidden_states, *args, **kwargs: hidden_states
    expected = count_parameters(model) - count_parameters(model.layers[0]) - count_parameters(model.layers[2])
    remove_layers(model, [2, 0])
    batch = _batch(seed=1)
    torch.testing.assert_close(_logits(model, batch), _logits(oracle, batch), atol=1e-5, rtol=0)
    assert model.num_layers == 2 and model.encoder.config.num_hidden_layers == 2
    assert model.encoder.config.original_num_hidden_layers == LAYERS
    assert count_parameters(model) == expected


def test_removing_everything_or_bad_indices_is_refused_and_changes_nothing():
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 1 heads: removing all 4"):
        remove_heads(model, {0: [1], 1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"layer 0 neurons: indices \[64\]"):
        remove_neurons(model, {0: [64]})
    with pytest.raises(ValueError, match=r"heads: layer indices \[4\]"):
        remove_heads(model, {4: [0]})
    with pytest.raises(ValueError, match="layers: removing all 4"):
        remove_layers(model, [0, 1, 2, 3])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # validated before any change


def test_magnitude_and_taylor_scores_follow_their_definitions():
    model = _shrunk().requires_grad_(False)
    scores = magnitude_scores(model)
    assert [len(h) for h in scores.heads] == [3, 4, 2, 1] and [len(n) for n in scores.neurons] == [64, 61, 34, 63]
    assert scores.layers.shape == (LAYERS,)
    layer = model.layers[2]
    rows = slice(HEAD_DIM, 2 * HEAD_DIM)  # head 1 of the two kept ones
    attention = layer.attention
    head = torch.cat([attention.self.query.weight[rows].flatten(), attention.self.key.weight[rows].flatten(),
                      attention.self.value.weight[rows].flatten(), attention.output.dense.weight[:, rows].flatten()])
    assert float(scores.heads[2][1]) == pytest.approx(float(head.norm()), rel=1e-5)
    neuron = torch.cat([layer.intermediate.dense.weight[5], layer.output.dense.weight[:, 5]])
    assert float(scores.neurons[2][5]) == pytest.approx(float(neuron.norm()), rel=1e-5)
    weights = [p for n, p in layer.named_parameters() if p.dim() == 2]
    assert len(weights) == 6
    assert float(scores.layers[2]) == pytest.approx(math.sqrt(sum(float((w**2).sum()) for w in weights)), rel=1e-5)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}  # stands in for noisy DP gradients
    taylor = taylor_scores(model, grads)
    g_in, g_out = (grads[f"encoder.encoder.layer.2.{name}.dense.weight"] for name in ("intermediate", "output"))
    expected = float((layer.intermediate.dense.weight[5] * g_in[5]).abs().sum()
                     + (layer.output.dense.weight[:, 5] * g_out[:, 5]).abs().sum())
    assert float(taylor.neurons[2][5]) == pytest.approx(expected, rel=1e-5)
    assert float(taylor.layers[2]) == pytest.approx(float(taylor.heads[2].sum() + taylor.neurons[2].sum()), rel=1e-5)
    with pytest.raises(ValueError, match="needs grads"):
        taylor_scores(model)
    del grads["encoder.encoder.layer.3.attention.self.key.weight"]
    with pytest.raises(ValueError, match="layer.3.attention.self.key.weight"):
        taylor_scores(model, grads)
    assert set(SCORERS) == {"magnitude", "taylor"}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("scorer", ["magnitude", "taylor"])
def test_rounds_reach_the_targets(scope, scorer):
    model = build_tiny(hidden_size=HIDDEN, num_layers=6, num_heads=HEADS, intermediate_size=FFN, seed=2)
    config = StructuredConfig(target_layers=0.5, target_heads=0.5, target_ffn=0.25, rounds=2, scope=scope,
                              scorer=scorer)
    expected = [{"num_layers": 4, "heads_per_layer": 3, "ffn_per_layer": 32},  # 6 * 0.707, 4 * 0.707, 64 * 0.5
                {"num_layers": 3, "heads_per_layer": 2, "ffn_per_layer": 16}]
    for r in (1, 2):
        assert round_targets(model, config, r) == expected[r - 1]
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()} if scorer == "taylor" else None
        before = count_parameters(model)
        report = structured_round(model, config, r, grads=grads)
        target = expected[r - 1]
        assert model.num_layers == report["num_layers"] == target["num_layers"]
        assert report["parameters_before"] == before and report["parameters_after"] == count_parameters(model) < before
        assert sum(report["heads"]) == target["num_layers"] * target["heads_per_layer"]
        assert sum(report["ffn"]) == target["num_layers"] * target["ffn_per_layer"]
        assert min(report["heads"]) >= 1 and min(report["ffn"]) >= 1
        if scope == "layer":
            assert set(report["heads"]) == {target["heads_per_layer"]}
            assert set(report["ffn"]) == {target["ffn_per_layer"]}
        assert len(report["layers_kept"]) == target["num_layers"]
    assert model.encoder.config.num_hidden_layers == 3
    _logits(model.eval(), _batch())  # still runs


@pytest.mark.parametrize("scope,heads", [("global", [4, 1, 3, 4]), ("layer", [3, 3, 3, 3])])
def test_rounds_remove_the_lowest_scoring_units(scope, heads):
    model = _tiny(seed=3)
    attention = model.layers[1].attention
    kept_values = model.layers[2].attention.self.value.weight[HEAD_DIM:].detach().clone()
    with torch.no_grad():
        for linear in (attention.self.query, attention.self.key, attention.self.value, attention.output.dense):
            linear.weight.mul_(1e-3)  # layer 1: four weak heads; global scope takes all but its best one
        model.layers[2].attention.self.value.weight[:HEAD_DIM].mul_(1e-3)  # layer 2: head 0 the weakest elsewhere
    config = StructuredConfig(target_layers=1.0, target_heads=0.75, target_ffn=1.0, rounds=1, scope=scope)
    report = structured_round(model, config, 1)
    assert report["layers_removed"] == [] and report["heads"] == heads and report["ffn"] == [FFN] * LAYERS
    assert torch.equal(model.layers[2].attention.self.value.weight, kept_values)  # layer 2 lost its head 0


def test_rounds_remove_the_lowest_scoring_layer():
    model = _tiny(seed=3)
    with torch.no_grad():
        for p in model.layers[1].parameters():
            p.mul_(1e-3)
    config = StructuredConfig(target_layers=0.75, target_heads=1.0, target_ffn=1.0, rounds=1)
    report = structured_round(model, config, 1)
    assert report["layers_removed"] == [1] and report["layers_kept"] == [0, 2, 3]
    assert report["heads"] == [HEADS] * 3 and report["ffn"] == [FFN] * 3


def test_drop_layers_top_removes_the_highest_layers_whatever_their_scores():
    model = _tiny(seed=3)
    with torch.no_grad():
        for p in model.layers[1].parameters():
            p.mul_(1e-3)  # the lowest-scoring layer stays: "top" ignores scores
    reference = [copy.deepcopy(model.layers[i]).state_dict() for i in (0, 1)]
    config = StructuredConfig(target_layers=0.5, target_heads=1.0, target_ffn=1.0, rounds=2, drop_layers="top")
    report = structured_round(model, config, 1)
    assert report["layers_removed"] == [3] and report["drop_layers"] == "top"
    report = structured_round(model, config, 2)
    assert report["layers_removed"] == [2] and model.num_layers == 2 and report["layers_kept"] == [0, 1]
    for layer, state in zip(model.layers, reference):
        for name, value in layer.state_dict().items():
            assert torch.equal(value, state[name]), name


def test_save_and_load_round_trip_a_shrunken_model(tmp_path):
    model = _shrunk(seed=5)
    remove_layers(model, [1])
    directory = save_classifier(model, None, tmp_path / "m")
    loaded, _ = load_saved(directory)
    assert layer_shapes(loaded) == layer_shapes(model) and loaded.num_layers == 3
    assert loaded.encoder.config.original_num_hidden_layers == LAYERS
    assert count_parameters(loaded) == count_parameters(model)
    batch = _batch(seed=5)
    torch.testing.assert_close(_logits(loaded.eval(), batch), _logits(model, batch), atol=0, rtol=0)
    save_classifier(_tiny(), None, tmp_path / "plain")  # unshrunk: no shapes recorded, loads as before
    assert "layer_shapes" not in (tmp_path / "plain" / "classifier.json").read_text()


def test_a_shrunken_model_trains():
    model = _shrunk(seed=6)
    remove_layers(model, [0])
    model.train()
    ids, mask, types = _batch(seed=6)
    F.cross_entropy(model(ids, mask, types), torch.tensor([0, 1, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert model.layers[2].attention.self.query.weight.grad.shape == (HEAD_DIM, HIDDEN)


def _oracle_update(model, ids, labels, clip):
    """Sum over examples of each example's whole gradient clipped to norm `clip`, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        input_ids, mask = pad([x])
        loss = F.cross_entropy(model(input_ids, mask, torch.zeros_like(input_ids)), y.view(1))
        grads = torch.autograd.grad(loss, params)
        scale = min(1.0, clip / (float(torch.sqrt(sum((g**2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads):
            t += scale * g
    return total


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
def test_bk_dp_step_on_a_shrunken_model_matches_microbatch_oracle(clip):
    model = _shrunk(seed=7)
    remove_layers(model, [1])
    make_trainable(model, FullConfig(layers=model.num_layers))
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in torch.randint(3, 9, (6,), generator=g)]
    labels = torch.randint(0, 2, (6,), generator=g)
    expected = _oracle_update(model, ids, labels, clip)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    private = PrivateModel(model, torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                           expected_batch_size=len(ids), mode="bookkeeping", clipping="flat")
    for chunk in ([0, 1, 2, 3], [4, 5]):  # two physical chunks of one logical batch
        input_ids, mask = pad([ids[i] for i in chunk])
        private.backward(F.cross_entropy(model(input_ids, mask, torch.zeros_like(input_ids)), labels[chunk],
                                         reduction="none"))
    private.step()
    private.close()
    for b, p, e in zip(before, params, expected):
        torch.testing.assert_close(b - p.detach(), e / len(ids), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value", [("target_layers", 0.0), ("target_heads", 1.5), ("target_ffn", -0.1),
                                         ("target_heads", True), ("rounds", 0), ("rounds", 1.5),
                                         ("scorer", "fisher"), ("scope", "tensor"),
                                         ("drop_layers", "bottom")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StructuredConfig(**{field: value})


def test_round_index_outside_the_schedule_is_refused():
    with pytest.raises(ValueError, match="round_index"):
        structured_round(_tiny(), StructuredConfig(rounds=2), 3)


def test_trainable_layers_beyond_a_shrunk_models_depth_train_all_of_them():
    model = _tiny()
    remove_layers(model, [0, 1])
    assert make_trainable(model, FullConfig(layers=6)) == 0
    assert all(p.requires_grad for p in model.layers.parameters())
    with pytest.raises(ValueError, match="layers must be an integer >= 0 or 'all'"):
        FullConfig(layers=-1)
