"""Method `side` (Ladder-Side-Tuning): with reduction 1 the side network reproduces the backbone; with r > 1 its
weights are the backbone's largest-magnitude slices; a DP step's clipped sum equals one-example-at-a-time oracle
gradients of the side parameters (gates and down-projections included) in every engine mode; the backbone gets no
gradient and keeps no graph; save and HF export round trips; dp_train lowers the loss and resumes bitwise."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from compression.data import pad
from compression.export import MODELING_FILE, export_hf
from compression.methods import merge, prepare, stage_plan
from compression.methods.side import SideClassifier, SideConfig
from compression.methods.side_init import hidden_scores
from compression.methods.side_network import Gate
from compression.models import build_tiny, load_saved, save_classifier
from compression.pruning.structured import magnitude_scores
from compression.train import TrainConfig, dp_train
from privacy.engine import PrivateModel

MODES_CLIPPINGS = [("ghost", "flat"), ("hooks", "flat"), ("hooks", "per_layer"), ("bookkeeping", "flat"),
                   ("bookkeeping", "per_layer")]


def _batch(n=6, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, vocab, (int(k),), generator=g) for k in torch.randint(3, 9, (n,), generator=g)]
    return ids, torch.randint(0, 2, (n,), generator=g)


def _inputs(ids):
    input_ids, mask = pad(ids)
    return input_ids, mask, torch.zeros_like(input_ids)


def _side(model_type="bert", reduction=2, seed=1, **kw):
    """A side model on a tiny backbone without dropout; gate alphas moved off 0 so that every gate matters."""
    config = SideConfig(reduction=reduction, **kw)
    model = prepare(build_tiny(model_type=model_type, num_layers=3, dropout=0.0, seed=seed), config)
    with torch.no_grad():
        for k, gate in enumerate(model.side.gates):
            gate.alpha.weight.fill_(0.05 * (k + 1))
    return model, config


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_reduction_one_reproduces_the_backbone(model_type):
    backbone = build_tiny(model_type=model_type, num_layers=3, dropout=0.0, seed=3).eval()
    side = prepare(backbone, SideConfig(reduction=1)).eval()
    inputs = _inputs(_batch(n=4, seed=2)[0])
    with torch.no_grad():
        torch.testing.assert_close(side.hidden_states(*inputs), backbone.hidden_states(*inputs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(side(*inputs), backbone(*inputs), rtol=1e-5, atol=1e-6)


def test_gate_mixes_side_and_ladder_with_mu_sigmoid_alpha_over_t():
    gate = Gate(temperature=0.1)
    side, ladder = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert float(gate.alpha.weight) == 0.0
    torch.testing.assert_close(gate(side, ladder), 0.5 * side + 0.5 * ladder)  # alpha = 0: mu = 1/2
    with torch.no_grad():
        gate.alpha.weight.fill_(0.05)
    mu = torch.sigmoid(torch.tensor(0.05 / 0.1))  # > 1/2: leans to the side network
    torch.testing.assert_close(gate(side, ladder), mu * side + (1 - mu) * ladder)


def test_reduced_side_network_is_the_largest_magnitude_slices_of_the_backbone():
    backbone = build_tiny(num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, seed=4)
    side = prepare(backbone, SideConfig(reduction=4, drop_layers=(1,))).side
    assert side.spec["hidden_size"] == 8 and side.spec["intermediate_size"] == 16 and side.spec["layers"] == [0, 2]
    assert side.taps == [0, 1, 3] and len(side.downs) == 3 and len(side.gates) == 2
    hidden = torch.topk(hidden_scores(backbone, [0, 2]), 8).indices.sort().values
    for down in side.downs:  # ladders start as the selection of the kept hidden dimensions
        assert torch.equal(down.weight, torch.eye(32)[hidden]) and not down.bias.any()
    neurons = magnitude_scores(backbone).neurons
    for side_layer, i in zip(side.layers, [0, 2]):
        layer, kept = backbone.layers[i], torch.topk(neurons[i], 16).indices.sort().values
        assert torch.equal(side_layer.intermediate.dense.weight, layer.intermediate.dense.weight[kept][:, hidden])
        assert torch.equal(side_layer.output.dense.weight, layer.output.dense.weight[hidden][:, kept])
        assert torch.equal(side_layer.output.LayerNorm.weight, layer.output.LayerNorm.weight[hidden])
        query = side_layer.attention.self.query.weight  # 2 heads of 16 dims, 4 kept in each
        assert query.shape == (8, 8) and side_layer.attention.self.attention_head_size == 4
        rows = [int((layer.attention.self.query.weight[:, hidden] == row).all(1).nonzero()) for row in query]
        assert rows == sorted(rows) and [r // 16 for r in rows] == [0] * 4 + [1] * 4  # per head, in order


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _oracle_update(model, ids, labels, clip, clipping):
    params = _trainable(model)
    layer_clip = clip / math.sqrt(len(params))
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        grads = torch.autograd.grad(F.cross_entropy(model(*_inputs([x])), y.view(1)), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (layer_clip, float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    return total


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_dp_step_on_cached_states_matches_the_microbatch_oracle(mode, clipping, clip):
    model, config = _side()
    model.double()  # float64: exact up to rounding
    plan = stage_plan(model, config)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"side.gates.0.alpha.weight", "side.downs.3.weight", "head.weight"} <= names
    assert not any(n.startswith("encoder.") for n in names)
    ids, labels = _batch()
    expected = _oracle_update(model, ids, labels, clip, clipping)
    assert all(float(e.abs().sum()) > 0 for e in expected)
    before = [p.detach().clone() for p in _trainable(model)]
    private = PrivateModel(plan.module, torch.optim.SGD(_trainable(model), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=clip, expected_batch_size=len(ids), mode=mode, clipping=clipping)
    for chunk in ([0, 1, 2, 3], [4, 5]):  # the loop's path: features once without autograd, logits per chunk
        input_ids, mask, types = _inputs([ids[i] for i in chunk])
        states = plan.features(input_ids, mask, types)
        private.backward(F.cross_entropy(plan.logits(states, mask), labels[chunk], reduction="none"))
    private.step()
    private.close()
    scale = max(float(e.abs().max()) for e in expected) / len(ids)  # key biases: zero gradient up to rounding
    for b, p, e in zip(before, _trainable(model), expected):
        expected_update = e / len(ids)  # a tolerance on the scale of each tensor: a 1-element gate counts too
        torch.testing.assert_close(b - p.detach(), expected_update, rtol=1e-7,
                                   atol=1e-7 * max(float(expected_update.abs().max()), 1e-6 * scale))


def test_backbone_gets_no_gradient_and_keeps_no_graph():
    model, config = _side()
    stage_plan(model, config)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.encoder.requires_grad_(True)  # even so, the backbone runs without autograd (no activations kept)
    model.train()
    seen = []
    for module in [model.encoder.embeddings, *model.layers]:
        module.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    loss = F.cross_entropy(model(*_inputs(_batch(n=3)[0])), torch.tensor([0, 1, 0]))
    loss.backward()
    assert len(seen) == 1 + model.num_layers
    assert not any(h.requires_grad or h.grad_fn is not None for h in seen)  # no activation kept for backward
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.side.parameters())


def test_trainable_count_on_minilm_shapes():
    """MiniLM-L6 (hidden 384, 6 layers, 12 heads, FFN 1536) at r = 8: six side layers of width 48 (12 heads of 4)
    and FFN 192, seven 384 -> 48 ladders, six gate scalars and a 2-class head on 48 features."""
    model = build_tiny(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, seed=0)
    config = SideConfig(reduction=8)
    side = prepare(model, config)
    stage_plan(side, config)
    layer = 4 * (48 * 48 + 48) + 2 * 48 * 192 + 192 + 48 + 2 * 2 * 48
    assert sum(p.numel() for p in _trainable(side)) == 6 * layer + 7 * (384 * 48 + 48) + 6 + 98 == 299_096


def test_side_attention_dropout_defaults_to_none_and_survives_saving(tmp_path, tokenizer):
    """Attention-probability dropout makes PyTorch's SDPA keep every side layer's attention maps for backward (3.3x
    the side step's memory on BERT-base, bench/memory.py): off by default, the backbone's other dropouts kept, a
    chosen value saved with the side network."""
    backbone = build_tiny(seed=0, dropout=0.1)
    side = prepare(backbone, SideConfig()).side
    assert [layer.attention.self.dropout.p for layer in side.layers] == [0.0] * len(side.layers)
    assert {layer.output.dropout.p for layer in side.layers} == {0.1}
    model = prepare(build_tiny(seed=0, dropout=0.1), SideConfig(attention_dropout=0.05))
    assert {layer.attention.self.dropout.p for layer in model.side.layers} == {0.05}
    save_classifier(model, tokenizer, tmp_path / "model")
    loaded = load_saved(tmp_path / "model")[0]
    assert {layer.attention.self.dropout.p for layer in loaded.side.layers} == {0.05}
    with pytest.raises(ValueError, match="attention_dropout"):
        SideConfig(attention_dropout=1.0)


def test_save_and_export_round_trip(tmp_path, tokenizer):
    model, config = _side(model_type="roberta", drop_layers=(1,))
    model = merge(model, config).eval()
    inputs = _inputs(_batch(n=3, seed=5, vocab=12)[0])
    expected = model(*inputs).detach()
    save_classifier(model, tokenizer, tmp_path / "model")
    loaded = load_saved(tmp_path / "model")[0]
    assert isinstance(loaded, SideClassifier) and loaded.side.spec == model.side.spec
    torch.testing.assert_close(loaded(*inputs).detach(), expected, rtol=0, atol=0)
    folder = export_hf(loaded, tokenizer, tmp_path / "hf")
    source = (folder / MODELING_FILE).read_text()
    assert "import compression" not in source and "from compression" not in source
    exported = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(exported).__name__ == "DPCompressSideForSequenceClassification"
    with torch.no_grad():
        logits = exported(input_ids=inputs[0], attention_mask=inputs[1]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def _learnable_data(n, seed):
    """Token ids from two disjoint halves of a small vocabulary: the label says which half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = [(torch.randint(5, 50, (int(k),), generator=g) + 45 * int(y)).tolist()
           for k, y in zip(torch.randint(4, 10, (n,), generator=g), labels)]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}


def _mean_loss(model, data):
    with torch.no_grad():
        inputs = _inputs([torch.tensor(x) for x in data["input_ids"]])
        return float(F.cross_entropy(model.eval()(*inputs), data["labels"]))


def test_dp_training_lowers_the_loss_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr("privacy.noise.secret_seed", lambda: 20261201)
    data, config = _learnable_data(96, seed=6), SideConfig(reduction=4)
    train = TrainConfig(epochs=6, batch_size=32, physical_batch_size=16, learning_rate=0.2,
                        encoder_learning_rate=0.2, checkpoint_every=3)

    def run(stop_at=None):
        model = prepare(build_tiny(seed=7, dropout=0.0), config)

        def on_step(step, metrics):
            if step == stop_at:
                raise KeyboardInterrupt
        result = dp_train(model, data, config=train, method=config, noise_multiplier=0.3, on_step=on_step,
                          checkpoint_dir=tmp_path / "ckpt" if stop_at != 0 else None)
        return model, result

    start = _mean_loss(prepare(build_tiny(seed=7, dropout=0.0), config), data)
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=5)
    resumed, result = run()
    assert result.resumed_from == 3 and result.num_steps == 18
    expected, _ = run(stop_at=0)  # uninterrupted, no checkpoints
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), resumed.state_dict().values()))
    assert _mean_loss(resumed, data) < 0.95 * start  # 0.68-0.91 of it over six noise seeds


def test_misuse_fails_clearly():
    config = SideConfig()
    plain = build_tiny(seed=0)
    with pytest.raises(ValueError, match="call compression.methods.prepare"):
        stage_plan(plain, config)
    side = prepare(plain, config)
    assert prepare(side, config) is side
    with pytest.raises(ValueError, match="cannot hold pruning masks"):
        dp_train(side, _learnable_data(4, 0), config=TrainConfig(), method=config, noise_multiplier=1.0,
                 masks={"head.weight": torch.ones_like(side.head.weight)})
    with pytest.raises(ValueError, match="backbone stays frozen"):
        side.classify(torch.zeros(1, 2, 32), torch.ones(1, 2), start_layer=0)
    with pytest.raises(ValueError, match="BERT-like"):
        prepare(build_tiny(model_type="distilbert", seed=0), config)
    with pytest.raises(ValueError, match="drop_layers"):
        prepare(build_tiny(seed=0), SideConfig(drop_layers=(0, 1)))
    with pytest.raises(ValueError, match="reduction"):
        SideConfig(reduction=0)
