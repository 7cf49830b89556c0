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
