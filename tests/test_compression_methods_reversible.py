"""The `reversible` method: DP clipped sums against the one-example-at-a-time oracle (ordinary autograd through the
same network), dropout replayed by the recomputation, the inputs' reconstruction error over MiniLM's depth, saved
activation memory constant in depth, and the stack through dp_train (resume), save/load and HF export."""
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter

from compression.data import pad
from compression.export import export_hf
from compression.methods import MethodConfig, make_trainable, prepare
from compression.methods.reversible import ReversibleClassifier, ReversibleConfig
from compression.methods.reversible_autograd import invert, run_streams
from compression.models import build_tiny, load_classifier, load_saved, save_classifier
from compression.train import TrainConfig, dp_train
from privacy.engine import PrivateModel


def _model(*, num_layers=3, dtype=torch.float64, dropout=0.0, segment=0, **kw):
    """A tiny reversible model; larger adapters (visible gradients) and beta != 1 (a wrong beta shows)."""
    config = ReversibleConfig(segment=segment, init_std=0.2, **{"beta": 0.7, **kw})
    model = prepare(build_tiny(num_layers=num_layers, dropout=dropout, seed=1).to(dtype), config)
    make_trainable(model, config)
    return model


def _batch(n=6, seed=0, max_len=9):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in torch.randint(3, max_len, (n,), generator=g)]
    return ids, torch.randint(0, 2, (n,), generator=g)


def _logits(model, ids):
    input_ids, mask = pad(ids)
    return model(input_ids, mask, torch.zeros_like(input_ids))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _oracle_update(model, ids, labels, clip, clipping):
    """Sum over examples of each example's clipped gradient, one at a time, with every activation stored."""
    model.stack.recompute = False
    params = _trainable(model)
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        grads = torch.autograd.grad(F.cross_entropy(_logits(model, [x]), y.view(1)), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (clip / math.sqrt(len(params)), float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    model.stack.recompute = True
    return total


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("mode,clipping", [("bookkeeping", "flat"), ("bookkeeping", "per_layer"), ("hooks", "flat"),
                                           ("hooks", "per_layer"), ("ghost", "flat")])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_clipped_sum_matches_microbatch_oracle(mode, clipping, clip, dtype, tolerance):
    model = _model(dtype=dtype)
    ids, labels = _batch()
    expected = _oracle_update(model, ids, labels, clip, clipping)
    before = [p.detach().clone() for p in _trainable(model)]
    private = PrivateModel(model, torch.optim.SGD(_trainable(model), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=clip, expected_batch_size=len(ids), mode=mode, clipping=clipping)
    for chunk in ([0, 1, 2, 3], [4, 5]):  # two physical chunks of one logical batch
        private.backward(F.cross_entropy(_logits(model, [ids[i] for i in chunk]), labels[chunk], reduction="none"))
    private.step()
    private.close()
    assert len(before) == 4 * 3 + 4 * 1 + 2  # F adapters of 3 layers, G of the bottom one, the head
    for b, p, e in zip(before, _trainable(model), expected):
        torch.testing.assert_close(b - p.detach(), e / len(ids), rtol=tolerance, atol=tolerance * 1e-2)


def test_recomputation_replays_dropout_and_the_stored_segments():
    """Dropout on: the recomputing backward draws the forward's masks again, with streams stored every layer or none,
    and gives ordinary autograd's gradients (also for the stack's input)."""
    grads = {}
    for name, recompute, segment in (("plain", False, 0), ("none stored", True, 0), ("every layer", True, 1)):
        model = _model(num_layers=4, dropout=0.3, segment=segment)
        model.stack.recompute = recompute
        model.train()
        ids, labels = _batch(n=3)
        hidden, mask = pad([model.encoder.embeddings.word_embeddings(x).detach() for x in ids])
        hidden.requires_grad_(True)
        torch.manual_seed(5)
        loss = F.cross_entropy(model.classify(hidden, mask, start_layer=0), labels)
        grads[name] = torch.autograd.grad(loss, [hidden, *_trainable(model)])
        assert torch.rand(1).item() == pytest.approx(_after_seed(5, model, hidden, mask))  # same draws consumed
    for name in ("none stored", "every layer"):
        for a, b in zip(grads["plain"], grads[name]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _after_seed(seed, model, hidden, mask):
    """The next draw after a forward of `model` from `seed` (ordinary autograd): the forward consumed as much RNG."""
    torch.manual_seed(seed)
    model.stack.recompute = False
    with torch.no_grad():
        model.classify(hidden, mask, start_layer=0)
    return torch.rand(1).item()


@pytest.fixture(scope="module")
def minilm():
    return load_classifier("all-minilm-l6-v2", num_labels=2)[0].eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reconstruction_error_over_minilm_depth(minilm, dtype):
    """MiniLM-L6 (pretrained), all 6 layers reversible at lambda_ 0.1: each layer's inputs reconstructed from the
    top down, against those the forward computed. Relative error (max |error| / max |value|) after k inversions grows
    about 10x (1/lambda_) per layer once float32 rounding in a layer flips; float64 stays far below."""
    config = ReversibleConfig(lambda_=0.1)
    model = prepare(minilm.to(dtype), config)
    make_trainable(model, config)
    ids = torch.randint(1000, 30000, (4, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    errors = _reconstruction_errors(model, ids, mask)
    minilm.float()
    bounds = [1e-13, 1e-5, 1e-4, 2e-3, 3e-2] if dtype == torch.float32 else [1e-13, 1e-12, 1e-11, 1e-10, 1e-9]
    print(f"\n{dtype}: reconstruction error after 1..5 layers: " + ", ".join(f"{e:.1e}" for e in errors))
    assert all(e <= b for e, b in zip(errors, bounds, strict=True)), errors
    assert errors[-1] > 0  # it is measured, not the forward's own tensors


@pytest.mark.parametrize("segment,bound", [(3, 2e-5), (0, 1e-3)])  # the default; none stored
def test_minilm_gradients_match_ordinary_autograd_in_float32(minilm, segment, bound):
    """What the reconstruction error does to training: the recomputed adapter gradients of pretrained MiniLM-L6 in
    float32 (all 6 layers, lambda_ 0.1) against ordinary autograd's (worst relative error of a parameter tensor)."""
    config = ReversibleConfig(segment=segment)
    model = prepare(minilm, config)
    make_trainable(model, config)
    ids = torch.randint(1000, 30000, (4, 64), generator=torch.Generator().manual_seed(1))
    mask, labels = torch.ones_like(ids), torch.tensor([0, 1, 0, 1])
    grads = []
    for recompute in (False, True):
        model.stack.recompute = recompute
        loss = F.cross_entropy(model(ids, mask, torch.zeros_like(ids)), labels)
        grads.append(torch.autograd.grad(loss, _trainable(model)))
    worst = max(float((a - b).norm() / a.norm()) for a, b in zip(*grads))
    print(f"\nsegment {segment}: worst relative gradient error {worst:.1e}")
    assert 0 < worst < bound if segment == 0 else worst < bound


def _reconstruction_errors(model, ids, mask):
    with torch.no_grad():
        hidden = model.embed(ids, mask, torch.zeros_like(ids))
        coupling = model.stack.coupling(model, model.family.attention_mask(model.encoder, hidden, mask), hidden.dtype)
        depth = len(coupling.layers)
        x1, x2, inputs = run_streams(coupling, hidden, keep=set(range(depth - 1)))
        errors = []
        for n in reversed(range(depth - 1)):
            x1, x2, _ = invert(coupling, n, x2, x1)
            errors.append(max(float((a - b).abs().max() / b.abs().max()) for a, b in zip((x1, x2), inputs[n])))
    return errors


def _saved_bytes(model, ids, labels):
    """Bytes autograd saves for the backward during one forward (the activations training keeps)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(_logits(model, ids), labels)
    loss.backward()
    return sum(saved)


def test_saved_activations_do_not_grow_with_depth():
    ids, labels = _batch(n=4, seed=2, max_len=30)
    reversible, plain = {}, {}
    for depth in (2, 4, 8):
        model = _model(num_layers=depth, dtype=torch.float32)
        reversible[depth] = _saved_bytes(model, ids, labels)
        model.stack.recompute = False
        plain[depth] = _saved_bytes(model, ids, labels)
    assert reversible[2] == reversible[4] == reversible[8]  # the two streams at the top, whatever the depth
    per_layer = (plain[8] - plain[4]) / 4
    assert per_layer > 0.5 * (plain[4] - plain[2]) / 2 > 0  # ordinary autograd: linear in depth
    assert reversible[8] < plain[8] / 3
    stored = _saved_bytes(_model(num_layers=8, dtype=torch.float32, segment=2), ids, labels)
    assert reversible[8] < stored < reversible[8] + per_layer * 8 / 2  # segments: two streams per 2 layers


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 1000, (int(k),), generator=g).tolist() for k in torch.randint(4, 12, (n,), generator=g)]
    return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids],
            "labels": torch.randint(0, 2, (n,), generator=g)}


class _Stop(Exception):
    pass


def _train(data, checkpoint_dir=None, stop_at=None):
    method = ReversibleConfig(layers=2)
    # dropout on: replayed by the recomputation, restored by the resume
    model = prepare(build_tiny(num_layers=3, seed=0), method)
    config = TrainConfig(epochs=2, batch_size=16, physical_batch_size=8, learning_rate=0.5,
                         encoder_learning_rate=0.5, checkpoint_every=2)

    def on_step(step, metrics):
        if step == stop_at:
            raise _Stop

    dp_train(model, data, config=config, method=method, noise_multiplier=1.0, on_step=on_step,
             checkpoint_dir=checkpoint_dir, noise_seed=3)
    return model


def test_dp_train_trains_the_adapters_and_resumes_bitwise(tmp_path):
    data = _data()
    expected = _train(data)
    assert expected.stack.first_layer == 1 and len(expected.stack.f) == 2 and len(expected.stack.g) == 0
    with pytest.raises(_Stop):
        _train(data, checkpoint_dir=tmp_path, stop_at=3)
    resumed = _train(data, checkpoint_dir=tmp_path)
    a, b = expected.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = prepare(build_tiny(num_layers=3, seed=0), ReversibleConfig(layers=2))
    assert not torch.equal(fresh.stack.f[0].up.weight, expected.stack.f[0].up.weight)  # the adapters trained
    assert torch.equal(fresh.layers[2].output.dense.weight, expected.layers[2].output.dense.weight)  # frozen


def test_evaluate_predicts_through_the_stack():
    """Evaluation runs the stack (no autograd) and counts its adapters among the parameters."""
    from compression.evaluate import evaluate, predict

    data = _data(n=8, seed=4)
    model = build_tiny(num_layers=3, seed=0, vocab_size=2048)  # evaluate's latency batches use ids up to 2000
    plain = sum(p.numel() for p in model.parameters())
    config = ReversibleConfig(layers=2, init_std=0.2)
    model = prepare(model, config)
    make_trainable(model, config)
    model.eval()
    input_ids, mask = pad([torch.tensor(x) for x in data["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids, mask, torch.zeros_like(input_ids)).numpy()
    torch.testing.assert_close(predict(model, data, batch_size=3), expected, rtol=1e-5, atol=1e-6)
    results = evaluate(model, data, metric="accuracy")
    assert results["parameters"] == plain + sum(p.numel() for p in model.stack.parameters())
    assert 0.0 <= results["accuracy"] <= 1.0


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "gpt2"])
def test_saved_and_exported_folders_give_the_same_logits(tmp_path, model_type):
    from transformers import AutoModelForSequenceClassification

    model = prepare(build_tiny(model_type=model_type, num_layers=4, seed=1), ReversibleConfig(layers=3, init_std=0.2))
    model.eval()
    ids, _ = _batch(n=3, seed=7)
    input_ids, mask = pad(ids)
    with torch.no_grad():
        expected = model(input_ids, mask, torch.zeros_like(input_ids))
    save_classifier(model, None, tmp_path / "saved")
    export_hf(model, None, tmp_path / "hf")
    saved, _ = load_saved(tmp_path / "saved")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(saved.eval()(input_ids, mask, torch.zeros_like(input_ids)), expected,
                                   rtol=0, atol=0)
        logits = exported.eval()(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert isinstance(saved, ReversibleClassifier) and saved.stack.spec() == model.stack.spec()


def test_config_union_validation_and_stack_errors():
    config = TypeAdapter(MethodConfig).validate_python({"name": "reversible", "lambda_": 0.2, "layers": 2})
    assert config == ReversibleConfig(lambda_=0.2, layers=2)
    for bad in ({"layers": 0}, {"lambda_": 0.0}, {"beta": -1.0}, {"bottleneck": 0}, {"segment": -1}):
        with pytest.raises(ValueError, match="reversible"):
            ReversibleConfig(**bad)
    model = _model(num_layers=3)
    assert prepare(model, ReversibleConfig(segment=1, init_std=0.2, beta=0.7)) is model  # same stack: kept
    assert model.stack.segment == 1  # with the new segment
    with pytest.raises(ValueError, match="already has a stack"):
        prepare(model, ReversibleConfig(layers=2))
    with pytest.raises(ValueError, match="call compression.methods.prepare"):
        make_trainable(build_tiny(num_layers=3), ReversibleConfig())
    hidden = torch.zeros(1, 4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="runs whole"):
        model.run_layers(hidden, torch.ones(1, 4), start=1, stop=3)
