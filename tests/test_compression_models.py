import pytest
import torch

from compression.models import build_tiny, count_parameters, load_classifier, load_saved, save_classifier


def test_split_forward_equals_full_forward():
    model = build_tiny(num_layers=3, dropout=0.0, seed=0).eval()
    ids = torch.randint(5, 900, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = torch.zeros_like(ids)
    full = model(ids, mask, types)
    for k in range(4):
        hidden = model.embed(ids, mask, types, num_layers=k)
        torch.testing.assert_close(model.classify(hidden, mask, start_layer=k), full)


def test_mean_pooling_ignores_padding():
    model = build_tiny(dropout=0.0, seed=1).eval()
    ids = torch.randint(5, 900, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(model(ids, torch.ones_like(ids), torch.zeros_like(ids)),
                               model(padded, mask, torch.zeros_like(padded)))


def test_save_and_load_round_trip(tmp_path):
    model = build_tiny(num_labels=3, seed=2).eval()
    save_classifier(model, None, tmp_path / "m")
    loaded, _ = load_saved(tmp_path / "m")
    loaded.eval()
    ids = torch.randint(5, 900, (2, 5))
    torch.testing.assert_close(loaded(ids, torch.ones_like(ids), torch.zeros_like(ids)),
                               model(ids, torch.ones_like(ids), torch.zeros_like(ids)))
    assert count_parameters(loaded) == count_parameters(model)
    assert not (tmp_path / "m.partial").exists()
    reloaded, _ = load_classifier(str(tmp_path / "m"), num_labels=3)  # a saved classifier loads whole
    assert torch.equal(reloaded.head.weight, model.head.weight)


def test_bundled_default_model_loads_offline():
    model, tokenizer = load_classifier("all-minilm-l6-v2", num_labels=2)
    assert model.num_layers == 6 and model.encoder.config.hidden_size == 384
    assert 22_000_000 < count_parameters(model) < 23_000_000
    batch = tokenizer(["a fine film"], return_tensors="pt")
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert logits.shape == (1, 2)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, OSError), match="nope"):
        load_classifier(str(tmp_path / "nope"), num_labels=2)


def test_encoder_dropout_reaches_every_dropout_and_the_saved_folder(tmp_path):
    ids = torch.randint(1000, 5000, (4, 12))

    def train_mode_twice(model):
        model.train()
        head_dropout_free = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        return model(*head_dropout_free), model(*head_dropout_free)

    pretrained, _ = load_classifier("all-minilm-l6-v2", num_labels=2, dropout=0.0)
    first, second = train_mode_twice(pretrained)
    assert not torch.equal(first, second)  # the base model's own dropout (0.1) draws in train mode
    model, tokenizer = load_classifier("all-minilm-l6-v2", num_labels=2, dropout=0.0, encoder_dropout=0.0)
    first, second = train_mode_twice(model)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # attention dropout included
    assert model.encoder.config.hidden_dropout_prob == model.encoder.config.attention_probs_dropout_prob == 0.0
    save_classifier(model, tokenizer, tmp_path / "m")
    loaded, _ = load_saved(tmp_path / "m")
    first, second = train_mode_twice(loaded)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_encoder_dropout_outside_0_1_is_refused(value):
    from compression.models import ModelConfig

    with pytest.raises(ValueError, match="model.encoder_dropout must be in"):
        ModelConfig(encoder_dropout=value)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_encoder_dropout_of_every_family(tmp_path, family):
    from compression.models import set_encoder_dropout

    model = build_tiny(model_type=family, dropout=0.5, seed=0)
    model.dropout.p = 0.0  # the head's own dropout is not the encoder's
    ids = torch.randint(5, 900, (3, 8))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    model.train()
    assert not torch.equal(model(*inputs), model(*inputs))
    set_encoder_dropout(model.encoder, 0.0)
    torch.testing.assert_close(model(*inputs), model(*inputs), rtol=0, atol=0)
    save_classifier(model, None, tmp_path / "m")
    loaded, _ = load_classifier(str(tmp_path / "m"), num_labels=2, encoder_dropout=0.3)  # a saved folder too
    assert {m.p for m in loaded.encoder.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    reloaded, _ = load_saved(tmp_path / "m")
    reloaded.train()
    torch.testing.assert_close(reloaded(*inputs), reloaded(*inputs), rtol=0, atol=0)
