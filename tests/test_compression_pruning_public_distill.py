import copy

import pytest
import torch
import torch.nn.functional as F

from compression.evaluate import predict
from compression.models import build_tiny
from compression.pruning.masks import prune_masks
from compression.pruning.public_distill import (
    PublicDistillConfig,
    distill_loss,
    public_distill,
    public_texts,
    teacher_targets,
)
from compression.train import apply_masks


def _encoded(num: int, *, pairs: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, types = [], []
    for _ in range(num):
        a = torch.randint(5, 1000, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        b = torch.randint(5, 1000, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        if pairs:
            seq = torch.cat([torch.tensor([1]), a, torch.tensor([2]), b, torch.tensor([2])])
            tt = torch.cat([torch.zeros(len(a) + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
        else:
            seq = torch.cat([torch.tensor([1]), a, torch.tensor([2])])
            tt = torch.zeros(len(seq), dtype=torch.long)
        ids.append(seq.tolist())
        types.append(tt.tolist())
    return {"input_ids": ids, "token_type_ids": types, "labels": [0] * num}


def test_public_texts_split_pairs_into_single_texts():
    pair = {"input_ids": [[1, 7, 8, 2, 9, 2]], "token_type_ids": [[0, 0, 0, 0, 1, 1]], "labels": [1]}
    single = {"input_ids": [[1, 5, 2]], "token_type_ids": [[0, 0, 0]], "labels": [0]}
    texts = public_texts([pair, single])
    assert [t.tolist() for t in texts["input_ids"]] == [[1, 7, 8, 2], [1, 9, 2], [1, 5, 2]]
    assert all(t.tolist() == [0] * len(i) for i, t in zip(texts["input_ids"], texts["token_type_ids"]))
    kept = public_texts([pair], split_pairs=False)
    assert [t.tolist() for t in kept["input_ids"]] == [[1, 7, 8, 2, 9, 2]]
    assert kept["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1]


def test_distill_loss_by_hand():
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    pooled, target_pooled = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    T = 2.0
    p, q = F.softmax(logits / T, -1), F.softmax(target / T, -1)
    kl = (q * (q.log() - p.log())).sum(-1)  # example 2: both uniform, KL 0
    hidden = torch.tensor([1.0, 4.0]) / 2.0
    got = distill_loss(pooled, logits, target_pooled, target, temperature=T, hidden_weight=0.5, hidden_scale=2.0)
    torch.testing.assert_close(got, (T**2 * kl + 0.5 * hidden).mean())
    assert float(distill_loss(pooled, logits, target_pooled, target, temperature=T, hidden_weight=0.0,
                              hidden_scale=2.0)) == pytest.approx(float(T**2 * kl[0] / 2))
    regression = distill_loss(pooled, torch.tensor([[1.0], [3.0]]), target_pooled, torch.tensor([[0.0], [1.0]]),
                              temperature=T, hidden_weight=0.0, hidden_scale=1.0)
    assert float(regression) == pytest.approx((1.0 + 4.0) / 2)  # squared error, no temperature


def test_teacher_targets_follow_input_order():
    teacher = build_tiny(seed=1)
    data = _encoded(20, pairs=False)
    targets = teacher_targets(teacher, public_texts([data]), batch_size=3)
    torch.testing.assert_close(targets["logits"], torch.as_tensor(predict(teacher, data)), rtol=1e-5, atol=1e-5)
    assert targets["pooled"].shape == (20, 32)


def test_public_distill_moves_the_student_to_the_teacher_and_keeps_masks():
    teacher = build_tiny(num_layers=2, seed=1)
    student = build_tiny(num_layers=1, seed=2)  # another shape, other weights
    masks = prune_masks(student, sparsity=0.5, include="encoder.encoder.layer.")
    apply_masks(student, masks)
    frozen = copy.deepcopy(teacher.state_dict())
    public = _encoded(64, pairs=True, seed=1)
    texts = public_texts([public])
    held_out = public_texts([_encoded(32, pairs=False, seed=2)])

    def gap():
        t, s = teacher_targets(teacher, held_out), teacher_targets(student, held_out)
        return float(F.kl_div(F.log_softmax(s["logits"], -1), F.log_softmax(t["logits"], -1), log_target=True,
                              reduction="batchmean") + (s["pooled"] - t["pooled"]).pow(2).sum(-1).mean())

    before = gap()
    result = public_distill(student, teacher, texts, masks=masks,
                            config=PublicDistillConfig(epochs=8, batch_size=16, learning_rate=3e-3))
    assert result["num_steps"] == 8 * (128 // 16)
    assert result["loss_last"] < result["loss_first"]
    after = gap()
    assert after < 0.5 * before  # closer to the teacher on texts it never trained on
    params = dict(student.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0), name
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[name]), name  # the teacher only labels


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("batch_size", True),
                                         ("learning_rate", 0.0), ("temperature", -1.0), ("hidden_weight", -0.1)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PublicDistillConfig(**{field: value})


def test_reruns_give_the_same_student():
    teacher, texts = build_tiny(seed=1), public_texts([_encoded(40, pairs=True)])
    config = PublicDistillConfig(epochs=1.5, batch_size=8, learning_rate=1e-3, seed=3)
    first, second = build_tiny(seed=4), build_tiny(seed=4)
    torch.manual_seed(0)
    public_distill(first, teacher, texts, config=config)
    torch.manual_seed(123)  # the caller's RNG state does not matter, and is left as it was
    state = torch.random.get_rng_state()
    result = public_distill(second, teacher, texts, config=config)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result["num_steps"] == 15  # 1.5 epochs of 10 batches (40 pairs, 80 single texts)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_too_few_texts_are_refused():
    teacher = build_tiny(seed=1)
    with pytest.raises(ValueError, match="batch_size"):
        public_distill(copy.deepcopy(teacher), teacher, public_texts([_encoded(3, pairs=False)]),
                       config=PublicDistillConfig(batch_size=4))
