import math

import pytest
import torch
import torch.nn.functional as F

from compression.distill import DistillConfig, every_other_layer, kd_loss, make_student, random_init
from compression.models import build_tiny


def test_kd_loss_on_hand_built_logits():
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    T = 2.0
    ce = F.cross_entropy(student, labels, reduction="none")
    p_t, p_s = F.softmax(teacher / T, -1), F.softmax(student / T, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1)
    torch.testing.assert_close(kd_loss(student, teacher, labels, alpha=0.0, temperature=T), ce)
    torch.testing.assert_close(kd_loss(student, teacher, labels, alpha=1.0, temperature=T), T**2 * kl)
    torch.testing.assert_close(kd_loss(student, teacher, labels, alpha=0.3, temperature=T), 0.7 * ce + 0.3 * T**2 * kl)
    # by hand for example 2: uniform teacher and uniform student -> KL 0, CE log 2
    assert float(kd_loss(student, teacher, labels, alpha=1.0, temperature=T)[1]) == pytest.approx(0.0, abs=1e-7)
    assert float(ce[1]) == pytest.approx(math.log(2))


def test_kd_loss_is_per_example():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    full = kd_loss(s, t, y, alpha=0.5, temperature=3.0)
    assert full.shape == (5,)
    torch.testing.assert_close(full[2:3], kd_loss(s[2:3], t[2:3], y[2:3], alpha=0.5, temperature=3.0))


def test_every_other_layer_copies_layers_embeddings_and_head():
    teacher = build_tiny(num_layers=4, seed=0)
    student = every_other_layer(teacher)
    assert student.num_layers == 2
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    for s_index, t_index in enumerate((0, 2)):
        for key in ("attention.self.query.weight", "output.dense.weight"):
            assert torch.equal(s_params[f"encoder.encoder.layer.{s_index}.{key}"],
                               t_params[f"encoder.encoder.layer.{t_index}.{key}"])
    assert torch.equal(s_params["head.weight"], t_params["head.weight"])
    assert torch.equal(s_params["encoder.embeddings.word_embeddings.weight"],
                       t_params["encoder.embeddings.word_embeddings.weight"])
    assert teacher.num_layers == 4  # the teacher is untouched
    ids = torch.randint(5, 100, (2, 7))
    assert student(ids, torch.ones_like(ids), torch.zeros_like(ids)).shape == (2, 2)


def test_registry_and_validation():
    teacher = build_tiny(num_layers=4, seed=0)
    assert make_student(teacher, DistillConfig(layer_map=(1, 3))).num_layers == 2
    rand = random_init(teacher)
    assert not torch.equal(rand.layers[0].output.dense.weight, teacher.layers[0].output.dense.weight)
    with pytest.raises(ValueError, match="init must be one of"):
        DistillConfig(init="nope")
    with pytest.raises(ValueError, match="outside"):
        every_other_layer(teacher, (0, 9))
