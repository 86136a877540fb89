"""Method `lora`: adapters as plain modules. A DP step's clipped sum equals one-example-at-a-time oracle gradients in
every engine mode; B = 0 leaves the model's function unchanged; merging gives the adapter model's logits as a plain
classifier (save, export); trainable counts; dp_train with checkpoints resumes bitwise; misuse fails clearly."""
import math

import pytest
import torch
import torch.nn.functional as F

from compression.data import pad
from compression.export import export_hf
from compression.methods import merge, prepare, stage_plan
from compression.methods.lora import LoraConfig, LoraLinear, adapters
from compression.models import TextClassifier, build_tiny, load_saved, save_classifier
from compression.train import TrainConfig, dp_train
from privacy.engine import PrivateModel

FAMILIES = ["bert", "roberta", "distilbert", "gpt2"]
MODES_CLIPPINGS = [("ghost", "flat"), ("hooks", "flat"), ("hooks", "per_layer"), ("bookkeeping", "flat"),
                   ("bookkeeping", "per_layer")]


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 1000, (int(k),), generator=g) for k in torch.randint(3, 9, (n,), generator=g)]
    return ids, torch.randint(0, 2, (n,), generator=g)


def _forward(model, ids):
    input_ids, mask = pad(ids)
    return model(input_ids, mask, torch.zeros_like(input_ids))


def _adapted(model_type="bert", *, targets=("query", "value"), layers="all", seed=1):
    """A tiny model without dropout with adapters whose B is random (B = 0 would leave A without gradient)."""
    config = LoraConfig(rank=4, alpha=8.0, targets=targets, layers=layers)
    model = prepare(build_tiny(model_type=model_type, dropout=0.0, seed=seed), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.5)
    return model, config


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _oracle_update(model, ids, labels, clip, clipping):
    params = _trainable(model)
    layer_clip = clip / math.sqrt(len(params))
    total = [torch.zeros_like(p) for p in params]
    for x, y in zip(ids, labels):
        grads = torch.autograd.grad(F.cross_entropy(_forward(model, [x]), y.view(1)), params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads):
            bound, size = (layer_clip, float(g.norm())) if clipping == "per_layer" else (clip, norm)
            t += min(1.0, bound / (size + 1e-6)) * g
    return total


def _dp_step_matches_oracle(model, mode, clipping, clip):
    """One DP step (noise 0, two physical chunks) against the oracle, in float64: exact up to rounding."""
    model.double()
    ids, labels = _batch()
    expected = _oracle_update(model, ids, labels, clip, clipping)
    assert all(float(e.abs().sum()) > 0 for e in expected)  # A and B both get gradient
    before = [p.detach().clone() for p in _trainable(model)]
    private = PrivateModel(model, torch.optim.SGD(_trainable(model), lr=1.0), noise_multiplier=0.0,
                           max_grad_norm=clip, expected_batch_size=len(ids), mode=mode, clipping=clipping)
    for chunk in ([0, 1, 2, 3], [4, 5]):
        private.backward(F.cross_entropy(_forward(model, [ids[i] for i in chunk]), labels[chunk], reduction="none"))
    private.step()
    private.close()
    scale = max(float(e.abs().max()) for e in expected) / len(ids)  # key biases: zero gradient up to rounding
    for b, p, e in zip(before, _trainable(model), expected):
        expected_update = e / len(ids)  # a tolerance on the scale of each tensor: a 1-element gate counts too
        torch.testing.assert_close(b - p.detach(), expected_update, rtol=1e-7,
                                   atol=1e-7 * max(float(expected_update.abs().max()), 1e-6 * scale))


@pytest.mark.parametrize("clip", [0.01, 1e6])  # every example clipped / none clipped
@pytest.mark.parametrize("mode,clipping", MODES_CLIPPINGS)
def test_dp_step_matches_the_microbatch_oracle(mode, clipping, clip):
    model, config = _adapted()
    stage_plan(model, config)
    _dp_step_matches_oracle(model, mode, clipping, clip)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "gpt2"])  # gpt2: adapters on the fused Conv1D
def test_dp_step_matches_the_oracle_in_every_family(model_type):
    model, config = _adapted(model_type, targets=("query", "ffn_out"))
    stage_plan(model, config)
    _dp_step_matches_oracle(model, "bookkeeping", "flat", 0.01)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_zero_B_keeps_the_model_and_merge_keeps_the_adapted_one(model_type, tmp_path):
    base = build_tiny(model_type=model_type, dropout=0.0, seed=2).eval()
    ids, _ = _batch(n=4, seed=3)
    reference = _forward(base, ids).detach()
    config = LoraConfig(targets=("query", "key", "value", "attention_output", "ffn_in", "ffn_out"))
    model = prepare(base, config)
    torch.testing.assert_close(_forward(model, ids).detach(), reference, rtol=0, atol=0)  # B = 0: same function
    model, _ = _adapted(model_type, targets=config.targets, seed=2)
    adapted = _forward(model.eval(), ids).detach()
    assert not torch.allclose(adapted, reference, atol=1e-3)
    merged = merge(model, config)
    assert type(merged) is TextClassifier and not adapters(merged)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    torch.testing.assert_close(_forward(merged, ids).detach(), adapted, rtol=1e-5, atol=1e-5)
    save_classifier(merged, None, tmp_path / "model")
    torch.testing.assert_close(_forward(load_saved(tmp_path / "model")[0], ids).detach(), adapted, rtol=1e-5,
                               atol=1e-5)


def test_trainable_parameters_are_the_adapters_and_the_head():
    model, config = _adapted(layers=1)
    assert stage_plan(model, config).module is model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"head.weight", "head.bias"} | {f"encoder.encoder.layer.1.attention.self.{t}.lora_{m}.weight"
                                                    for t in ("query", "value") for m in "AB"}
    hidden, rank = 32, 4  # build_tiny: 2 layers of width 32; the top one adapted
    assert sum(p.numel() for p in _trainable(model)) == 2 * rank * (hidden + hidden) + (hidden * 2 + 2)


def test_trainable_count_on_minilm_shapes():
    """MiniLM-L6: hidden 384, 6 layers, 12 heads, FFN 1536; rank 8 on query and value: 6 * 2 * 8 * (384 + 384)
    adapter weights and the 2-class head."""
    model = build_tiny(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, seed=0)
    config = LoraConfig(rank=8)
    stage_plan(prepare(model, config), config)
    assert sum(p.numel() for p in _trainable(model)) == 6 * 2 * 8 * 768 + 770 == 74_498


def test_dp_train_resumes_bitwise_and_exports(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr("privacy.noise.secret_seed", lambda: 20261201)
    ids, labels = _batch(n=48, seed=4)
    data = {"input_ids": [x.tolist() for x in ids], "token_type_ids": [[0] * len(x) for x in ids], "labels": labels}
    train = TrainConfig(epochs=2, batch_size=12, physical_batch_size=8, checkpoint_every=2,
                        encoder_learning_rate=0.5)
    config = LoraConfig(rank=2, dropout=0.1)

    def run(stop_at=None, directory=None):
        model = prepare(build_tiny(seed=5), config)

        def on_step(step, metrics):
            if step == stop_at:
                raise KeyboardInterrupt
        result = dp_train(model, data, config=train, method=config, noise_multiplier=1.0, on_step=on_step,
                          checkpoint_dir=directory)
        return model, result

    expected, _ = run()
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=5, directory=tmp_path / "ckpt")
    resumed, result = run(directory=tmp_path / "ckpt")
    assert result.resumed_from == 4 and result.num_steps == 8
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), resumed.state_dict().values()))
    assert any(float(a.lora_B.weight.detach().abs().sum()) > 0 for _, a in adapters(resumed))  # B trained
    merged = merge(resumed, config).eval()
    folder = export_hf(merged, tokenizer, tmp_path / "hf")
    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    input_ids, mask = pad(ids[:4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, attention_mask=mask).logits,
                                   merged(input_ids, mask, torch.zeros_like(input_ids)), atol=1e-5, rtol=0)


def test_misuse_fails_clearly():
    config = LoraConfig()
    model = build_tiny(seed=0)
    with pytest.raises(ValueError, match="call compression.methods.prepare"):
        stage_plan(model, config)
    prepare(model, config)
    with pytest.raises(ValueError, match="already has adapters"):
        prepare(model, config)
    with pytest.raises(ValueError, match="cannot hold pruning masks"):
        dp_train(model, {"input_ids": [[5, 6]], "token_type_ids": [[0, 0]], "labels": torch.tensor([0])},
                 config=TrainConfig(), method=config, noise_multiplier=1.0,
                 masks={"head.weight": torch.ones_like(model.head.weight)})
    with pytest.raises(ValueError, match="lora target 'gate'.*roles"):
        prepare(build_tiny(seed=0), LoraConfig(targets=("gate",)))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
