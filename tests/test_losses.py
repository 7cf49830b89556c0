"""Golden values for every loss term, on tensors small enough to check by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcode.plugins import make_strategy
from kdcode.strategies.divergences import forward_kl
from kdcode.strategies.losses import causal_ce, cosine_hidden

LN3 = math.log(3.0)


def out(logits, hidden=None):
    return SimpleNamespace(logits=torch.tensor([logits], dtype=torch.float32),
                           hidden_states=None if hidden is None else (torch.tensor([hidden], dtype=torch.float32),))


# One sequence of two tokens: position 0 predicts token 1 (= id 0); position 1 predicts nothing.
LABELS = torch.tensor([[1, 0]])
STUDENT = out([[0.0, 0.0], [5.0, -5.0]], hidden=[[1.0, 0.0], [3.0, 3.0]])
TEACHER = out([[LN3, 0.0], [-5.0, 5.0]], hidden=[[1.0, 1.0], [0.0, 9.0]])


def test_forward_kl_temperature_1():
    # p_t = [3/4, 1/4], p_s = [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert forward_kl(STUDENT.logits, TEACHER.logits, LABELS, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_forward_kl_temperature_2_is_scaled_by_t_squared():
    # t/2 = [ln3/2, 0]: p_t = [sqrt3, 1]/(sqrt3 + 1); KL against uniform, times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert forward_kl(STUDENT.logits, TEACHER.logits, LABELS, 2.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.145363, abs=1e-5)


def test_hard_ce_ignores_last_position_and_ignore_index():
    assert causal_ce(STUDENT.logits, LABELS).item() == pytest.approx(math.log(2), abs=1e-6)
    masked = torch.tensor([[1, -100]])
    assert math.isnan(causal_ce(STUDENT.logits, masked).item())  # nothing to predict


def test_cosine_hidden():
    # cos([1,0],[1,1]) = 1/sqrt2 at position 0 (position 1 has no next token)
    value = cosine_hidden(STUDENT.hidden_states[-1], TEACHER.hidden_states[-1], LABELS).item()
    assert value == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_cosine_needs_equal_widths():
    with pytest.raises(ValueError, match="equal widths"):
        cosine_hidden(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), LABELS)


def test_pretraining_total_with_defaults():
    terms = make_strategy("pretraining", {}).loss(STUDENT, TEACHER, LABELS)
    assert terms["soft"].item() == pytest.approx(0.145363, abs=1e-5)
    assert terms["hard"].item() == pytest.approx(0.693147, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * 0.145363 + 0.5 * 0.693147, abs=1e-5)
    assert "cos" not in terms


def test_pretraining_distilbert_weights_with_cosine():
    s = make_strategy("pretraining", {"alpha_soft": 5, "alpha_hard": 2, "alpha_cos": 1, "temperature": 1})
    assert s.needs_hidden_states
    terms = s.loss(STUDENT, TEACHER, LABELS)
    expected = 5 * 0.130812 + 2 * math.log(2) + 1 * (1 - 1 / math.sqrt(2))
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_in_training_same_student_loss_and_teacher_hard_loss():
    s = make_strategy("in-training", {})
    assert s.needs_teacher_grad and s.needs_teacher
    terms = s.loss(STUDENT, TEACHER, LABELS)
    assert terms["loss"].item() == pytest.approx(0.5 * 0.145363 + 0.5 * 0.693147, abs=1e-5)
    # teacher's own hard loss: logits [ln3, 0] on target 0 -> -ln(3/4)
    assert s.teacher_loss(TEACHER, LABELS).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_hard_only_needs_no_teacher():
    s = make_strategy("hard-only", {})
    assert not s.needs_teacher
    terms = s.loss(STUDENT, None, LABELS)
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_soft_loss_gradient_flows_to_student_only():
    s_logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    t_logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]], requires_grad=True)
    student = type("O", (), {"logits": s_logits, "hidden_states": None})()
    teacher = type("O", (), {"logits": t_logits, "hidden_states": None})()
    make_strategy("pretraining", {}).loss(student, teacher, LABELS)["loss"].backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert t_logits.grad is None


def test_tvd_golden_value_and_its_cached_form():
    # p_t = [3/4, 1/4], p_s = [1/2, 1/2] at position 0: TVD = 1/2 (1/4 + 1/4) = 1/4; hard = ln 2
    from kdcode.strategies.divergences import sparse_tvd, tvd
    from kdcode.strategies.sparse import SparseTargets

    assert tvd(STUDENT.logits, TEACHER.logits, LABELS, 1.0).item() == pytest.approx(0.25, abs=1e-6)
    s = make_strategy("tvd", {})
    terms = s.loss(STUDENT, TEACHER, LABELS)
    assert terms["loss"].item() == pytest.approx(0.25 + 0.5 * math.log(2), abs=1e-6)
    t = TEACHER.logits
    full = SparseTargets(t.topk(2, -1).values, t.topk(2, -1).indices, torch.logsumexp(t, -1), 1.0)
    assert sparse_tvd(STUDENT.logits, full, LABELS, 1.0).item() == pytest.approx(0.25, abs=1e-6)  # k = vocab: exact
    top1 = SparseTargets(t.topk(1, -1).values, t.topk(1, -1).indices, torch.logsumexp(t, -1), 1.0)
    assert sparse_tvd(STUDENT.logits, top1, LABELS, 1.0).item() == pytest.approx(0.25, abs=1e-6)  # 2 buckets
