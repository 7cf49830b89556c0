"""The student's config through the layer map (issue 18.1): per-layer lists follow their layer, lists of layer
indices name the student blocks whose teacher block they named, other lists stay, and what cannot be mapped is
one clear line. Found by shape and name, not from a list of families."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

from kdcode.errors import KdcodeError
from kdcode.inits.base import reindex_per_layer_fields
from kdcode.plugins import make_init


def config(**fields):
    c = LlamaConfig(num_hidden_layers=4, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def test_per_layer_lists_follow_their_layer():
    c = config(layer_types=("sliding", "full", "sliding", "full"), no_rope_layers=[1, 1, 1, 0],
               intermediate_sizes=[64, 64, 32, 32])
    changed = reindex_per_layer_fields(c, 4, [0, 2, 3])
    assert c.layer_types == ("sliding", "sliding", "full")  # the type of the list is kept
    assert c.no_rope_layers == [1, 1, 0] and c.intermediate_sizes == [64, 32, 32]
    assert set(changed) == {"layer_types", "no_rope_layers", "intermediate_sizes"}


@pytest.mark.parametrize(("key", "value", "want"), [
    ("mlp_only_layers", [1, 3], [2]),  # teacher block 3 is student block 2; block 1 is not copied
    ("moe_layers", [0, 1, 2, 3], [0, 1, 2]),  # every layer: as long as the teacher's depth, still indices
    ("full_attn_idxs", [0, 2], [0, 1]),
    ("mlp_only_layers", [], []),
])
def test_lists_of_layer_indices_name_the_student_blocks(key, value, want):
    c = config(**{key: value})
    reindex_per_layer_fields(c, 4, [0, 2, 3])
    assert getattr(c, key) == want


def test_other_lists_are_left_alone():
    c = config(eos_token_id=[1, 2, 3, 4], mlp_multipliers=[1.0, 2.0], time_step_limit=[0.0, 1.0])
    assert reindex_per_layer_fields(c, 4, [0, 2, 3]) == []
    assert c.eos_token_id == [1, 2, 3, 4] and c.mlp_multipliers == [1.0, 2.0]


def test_a_layer_field_of_another_shape_is_one_clear_line():
    c = config(layer_windows=[[1, 2], [3, 4]])  # two entries for four layers: kdcode cannot know which is whose
    with pytest.raises(KdcodeError, match="'layer_windows' looks per-layer but has 2 entries for 4 layers"):
        reindex_per_layer_fields(c, 4, [0, 2, 3])


@pytest.mark.slow
def test_a_moe_teacher_with_dense_layers_gives_students_built_like_their_blocks(tokenizer):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[1], pad_token_id=tokenizer.pad_token_id,
    )).eval()
    for init, layer_map, dense in (("alternate", [0, 1, 2], [1]), ("spread", [0, 2, 3], [])):
        student, got = make_init(init, {}).build(teacher, 3)
        assert got == layer_map and student.config.mlp_only_layers == dense
        for i, j in enumerate(layer_map):
            s, t = student.model.layers[i].state_dict(), teacher.model.layers[j].state_dict()
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
