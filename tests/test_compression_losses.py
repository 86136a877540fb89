"""compression.losses: the task loss and the one KD term every stage (and distillation on public text) uses."""
import math

import pytest
import torch
import torch.nn.functional as F

from compression.losses import KDConfig, kd_against, kd_loss, kd_term


def test_kd_loss_on_hand_built_logits():
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    T = 2.0
    ce = F.cross_entropy(student, labels, reduction="none")
    p_t, p_s = F.softmax(teacher / T, -1), F.softmax(student / T, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1)
    torch.testing.assert_close(kd_loss(student, teacher, labels, weight=0.0, temperature=T), ce)
    torch.testing.assert_close(kd_loss(student, teacher, labels, weight=1.0, temperature=T), T**2 * kl)
    torch.testing.assert_close(kd_loss(student, teacher, labels, weight=0.3, temperature=T), 0.7 * ce + 0.3 * T**2 * kl)
    # by hand for example 2: uniform teacher and uniform student -> KL 0, CE log 2
    assert float(kd_loss(student, teacher, labels, weight=1.0, temperature=T)[1]) == pytest.approx(0.0, abs=1e-7)
    assert float(ce[1]) == pytest.approx(math.log(2))


def test_kd_loss_is_per_example():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    full = kd_loss(s, t, y, weight=0.5, temperature=3.0)
    assert full.shape == (5,)
    torch.testing.assert_close(full[2:3], kd_loss(s[2:3], t[2:3], y[2:3], weight=0.5, temperature=3.0))


def test_kd_term_for_regression_is_the_squared_error_to_the_teacher():
    s, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.5], [3.0]])
    torch.testing.assert_close(kd_term(s, t, temperature=4.0), torch.tensor([0.25, 0.0]))
    y = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(kd_loss(s, t, y, weight=0.25, temperature=1.0),
                               0.75 * (s.squeeze(-1) - y) ** 2 + 0.25 * torch.tensor([0.25, 0.0]))


def test_kd_against_indexes_the_teachers_logits_by_example():
    teacher = torch.randn(10, 2)
    loss = kd_against(teacher, KDConfig(weight=1.0, temperature=2.0))
    student, index = torch.randn(3, 2), torch.tensor([7, 2, 9])
    torch.testing.assert_close(loss(student, torch.zeros(3, dtype=torch.long), index),
                               kd_term(student, teacher[index], temperature=2.0))
    with pytest.raises(ValueError, match="weight"):
        KDConfig(weight=1.5)
