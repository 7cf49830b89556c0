"""Each init's layer map, and that the copied weights are the teacher's."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2

from kdcode.errors import KdcodeError
from kdcode.plugins import make_init


@pytest.mark.parametrize(
    ("name", "n", "k", "expected"),
    [
        ("spread", 12, 6, [0, 2, 4, 7, 9, 11]),  # DistilGPT2's choice
        ("spread", 12, 4, [0, 4, 7, 11]),
        ("spread", 12, 8, [0, 2, 3, 5, 6, 8, 9, 11]),
        ("spread", 12, 12, list(range(12))),
        ("spread", 12, 1, [0]),
        ("alternate", 12, 6, [0, 2, 4, 6, 8, 10]),
        ("alternate", 12, 4, [0, 3, 6, 9]),
        ("alternate", 12, 8, [0, 1, 3, 4, 6, 7, 9, 10]),
        ("random", 12, 3, [None, None, None]),
    ],
)
def test_layer_maps(name, n, k, expected):
    assert make_init(name, {}).select(n, k) == expected


@pytest.fixture(scope="module")
def teacher12(tokenizer):
    return make_gpt2(tokenizer, n_layer=12, n_embd=16, n_head=2)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["spread", "alternate"])
def test_layer_copy_inits_copy_blocks_and_embeddings(name, teacher12):
    student, layer_map = make_init(name, {}).build(teacher12, 6)
    assert student.config.n_layer == 6 and len(student.transformer.h) == 6
    for i, j in enumerate(layer_map):
        assert _same(student.transformer.h[i], teacher12.transformer.h[j])
    assert torch.equal(student.transformer.wte.weight, teacher12.transformer.wte.weight)
    assert torch.equal(student.transformer.wpe.weight, teacher12.transformer.wpe.weight)
    assert _same(student.transformer.ln_f, teacher12.transformer.ln_f)
    # GPT-2 ties the LM head to the token embeddings: the tie survives the copy
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_random_init_copies_nothing_by_default(teacher12):
    student, layer_map = make_init("random", {}).build(teacher12, 3)
    assert layer_map == [None] * 3
    assert not torch.equal(student.transformer.wte.weight, teacher12.transformer.wte.weight)
    assert not _same(student.transformer.h[0], teacher12.transformer.h[0])


def test_random_init_can_copy_embeddings(teacher12):
    student, _ = make_init("random", {"copy_embeddings": True}).build(teacher12, 3)
    assert torch.equal(student.transformer.wte.weight, teacher12.transformer.wte.weight)
    assert not _same(student.transformer.h[0], teacher12.transformer.h[0])


@pytest.mark.parametrize("layers", [0, 13])
def test_depth_outside_teacher_is_refused(teacher12, layers):
    with pytest.raises(KdcodeError, match="outside 1..12"):
        make_init("spread", {}).build(teacher12, layers)


def test_unknown_init_param_is_refused():
    with pytest.raises(KdcodeError, match="copy_embedings"):
        make_init("spread", {"copy_embedings": True})


def _with_idle_blocks(tokenizer, idle: range) -> torch.nn.Module:
    """A 12-block GPT-2 whose blocks in ``idle`` add nothing to the residual stream (zero output projections)."""
    model = make_gpt2(tokenizer, n_layer=12, n_embd=16, n_head=2, seed=3)
    with torch.no_grad():
        for j in idle:
            for proj in (model.transformer.h[j].attn.c_proj, model.transformer.h[j].mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model


def _calibration(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(5, 500, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["kl", "angular", "influence"])
def test_measured_inits_drop_the_blocks_that_do_nothing(tokenizer, method):
    """(``loss`` ranks by the data's loss, which a random teacher's own blocks may raise: tested below by value.)"""
    teacher = _with_idle_blocks(tokenizer, range(3, 9))
    init = make_init("measured", {"method": method, "calibration_blocks": 4})
    with pytest.raises(KdcodeError, match="measures the teacher's blocks on calibration data first"):
        init.build(teacher, 6)
    x = _calibration()
    init.prepare(teacher, x, 6)
    student, layer_map = init.build(teacher, 6)
    assert layer_map == [0, 1, 2, 9, 10, 11]
    scores = init.origin["measured"]
    assert scores["method"] == method and scores["dropped_blocks"] == 6 and scores["calibration_tokens"] == 128
    assert all(v == pytest.approx(0, abs=1e-6) for v in scores["block_influence"][3:9])
    assert min(scores["block_influence"][:3] + scores["block_influence"][9:]) > 1e-3
    assert scores["angular_distance_by_start"][3] == pytest.approx(0, abs=1e-3)
    with torch.no_grad():  # the idle blocks are gone and nothing else: the student computes what the teacher does
        torch.testing.assert_close(student(x).logits, teacher(x).logits, atol=1e-4, rtol=1e-4)
    if method == "kl":
        kls = scores["kl_by_start"]
        assert len(kls) == 7 and kls[3] == pytest.approx(0, abs=1e-6) and min(kls[:3] + kls[4:]) > 0


def test_measured_loss_of_a_run_is_the_loss_of_that_student(teacher12):
    from kdcode.inits.measured import calibration_loss

    x = _calibration()
    init = make_init("measured", {"calibration_blocks": 4})
    init.prepare(teacher12, x, 8)
    for start, loss in enumerate(init.origin["measured"]["loss_by_start"]):
        kept = [j for j in range(12) if not start <= j < start + 4]
        student, _ = make_init("layers", {"layers": kept}).build(teacher12, 8)
        with torch.no_grad():
            logits = student(x).logits[:, :-1]
        direct = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        assert loss == pytest.approx(direct.item(), abs=1e-4)
        assert calibration_loss(teacher12, kept, x) == pytest.approx(direct.item(), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auto_keeps_the_lower_of_spread_and_the_measured_run(tokenizer, seed):
    from kdcode.inits.measured import calibration_loss

    teacher = make_gpt2(tokenizer, n_layer=12, n_embd=16, n_head=2, seed=seed)
    x = _calibration()
    auto = make_init("auto", {})
    auto.prepare(teacher, x, 6)
    m = auto.origin["measured"]
    spread = [0, 2, 4, 7, 9, 11]
    assert m["spread_calibration_loss"] == pytest.approx(calibration_loss(teacher, spread, x), abs=1e-4)
    best_run = min(range(7), key=m["loss_by_start"].__getitem__)
    run = [j for j in range(12) if not best_run <= j < best_run + 6]
    if m["spread_calibration_loss"] <= m["calibration_loss"]:
        assert auto.select(12, 6) == spread and m["chosen"] == "spread"
    else:
        assert auto.select(12, 6) == run and m["chosen"] != "spread"
