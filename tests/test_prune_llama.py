"""`compress --prune-heads/--prune-ffn` for Llama-style blocks (issue 18.5): query heads pruned within their
key-value group under GQA (whole heads without it), gate/up/down channels together; the pruned model equals the
masked original, is described by its config, and its folder reloads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run
from transformers import AutoModelForCausalLM, LlamaConfig, Olmo2Config, Phi3Config, Qwen2Config

from kdcode.compression.compress import run_compress
from kdcode.compression.prune_llama import LlamaPruner
from kdcode.errors import KdcodeError
from kdcode.inference.forward import _forward_kwargs, _out_cache
from kdcode.spec import DataSpec
from kdcode.spec_compress import CompressSpec

SHAPE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 8,
         "max_position_embeddings": 128, "head_dim": 8}


def tiny(config_cls, tokenizer, seed=0, **kw):
    torch.manual_seed(seed)
    config = config_cls(**{**SHAPE, **kw}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(vocab: int, n: int = 2, t: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def masked_logits(model, heads: list[list[int]], ffn: list[list[int]], x: torch.Tensor) -> torch.Tensor:
    """The original model with every pruned head's and channel's output zeroed."""
    hd, hooks = model.config.head_dim, []
    for block, q, c in zip(model.model.layers, heads, ffn):
        head_mask = torch.zeros(model.config.num_attention_heads)
        head_mask[q] = 1
        chan_mask = torch.zeros(block.mlp.down_proj.in_features)
        chan_mask[c] = 1
        for module, m in ((block.self_attn.o_proj, head_mask.repeat_interleave(hd)), (block.mlp.down_proj, chan_mask)):
            hooks.append(module.register_forward_pre_hook(lambda mod, a, m=m: (a[0] * m,)))
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.slow
@pytest.mark.parametrize(("kv", "heads"), [
    (2, [[0, 1, 3, 5, 6, 7], [1, 2, 3, 4, 5, 7], [0, 2, 3, 4, 6, 7]]),  # GQA, 4 query heads per group: 3 kept each
    (8, [[0, 2, 3, 5, 6, 7], [1, 2, 3, 4, 5, 7], [0, 2, 3, 4, 6, 7]]),  # MHA: a head takes its k and v along
])
def test_pruned_equals_masked_and_reloads_from_its_config(tmp_path, tokenizer, kv, heads):
    model = tiny(Qwen2Config, tokenizer, num_key_value_heads=kv)  # Qwen2: q/k/v biases are cut too
    ffn = [sorted(torch.randperm(48, generator=torch.Generator().manual_seed(i))[:36].tolist()) for i in range(3)]
    pruned = LlamaPruner(model, heads=True, ffn=True).apply(heads, ffn)
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        6, 2 if kv == 2 else 6, 8, 36)
    assert model.config.num_attention_heads == 8  # the original is left as it was
    x = ids(len(tokenizer))
    want = masked_logits(model, heads, ffn, x)
    with torch.no_grad():
        got = pruned(x).logits
        first = pruned(x[:, :-1], use_cache=True)
        cache_kw = _forward_kwargs(pruned)[0]
        last = pruned(x[:, -1:], **{cache_kw: _out_cache(first)}, use_cache=True).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(last, want[:, -1], atol=1e-5)
    pruned.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "p")(x).logits, got, atol=1e-6)


def test_heads_are_chosen_per_key_value_group_and_dead_units_go_first(tokenizer):
    model = tiny(LlamaConfig, tokenizer, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 5 * 8 : 6 * 8] = 0  # query head 5 (group 1) is dead
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0  # channel 7 of layer 1 too
    pruner = LlamaPruner(model, heads=True, ffn=True)
    scores = pruner.importance(ids(len(tokenizer), n=4, t=24), 2, heads=True, ffn=True)
    assert scores["heads"][0][5] == 0 and bool((scores["heads"][0][[4, 6, 7]] > 0).all())
    kept = pruner.keep_heads(scores["heads"][0], 0.25)
    assert len(kept) == 6 and 5 not in kept
    assert [sum(1 for h in kept if h // 4 == g) for g in (0, 1)] == [3, 3]  # every group keeps 3 of its 4
    assert 7 not in pruner.keep_ffn(scores["ffn"][1], 0.1)
    assert not any(p.grad is not None for p in model.parameters())
    with pytest.raises(KdcodeError, match="0.2 of 4 query heads of a key-value group per layer removes none"):
        pruner.keep_heads(scores["heads"][0], 0.2)  # 0.2 of 4 heads per group is none


@pytest.mark.slow
def test_compress_prunes_a_gqa_model_into_a_plain_transformers_folder(tmp_path, tokenizer, corpus_dir):
    src = tmp_path / "qwen"
    tiny(Qwen2Config, tokenizer, num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["--data", corpus_dir, "--calib-batches", 1, "--calib-batch-size", 2, "--calib-block-size", 32]
    r = run("compress", src, "--prune-heads", 0.5, "--prune-ffn", 0.25, "--out", tmp_path / "p", *args)
    assert r.exit_code == 0, r.output
    assert "plain transformers" in r.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.intermediate_size) == (
        4, 2, 36)
    manifest = json.loads((tmp_path / "p" / "kdcode.json").read_text())
    assert manifest["compression"]["layout"]["loader"] == "transformers"
    assert [s["step"] for s in manifest["compression"]["steps"]] == ["prune-heads", "prune-ffn"]
    assert all(len(k) == 4 for k in manifest["compression"]["steps"][0]["kept"])
    r = run("compress", tmp_path / "p", "--int8", "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    r = run("eval", tmp_path / "q", "--data", corpus_dir, "--samples", 2, "--max-new-tokens", 2, "--ppl-blocks", 0)
    assert r.exit_code == 0, r.output


def test_families_it_cannot_cut_are_one_clear_line(tmp_path, tokenizer, corpus_dir):
    phi3 = tiny(Phi3Config, tokenizer, num_key_value_heads=8)  # fused qkv_proj and gate_up_proj
    with pytest.raises(KdcodeError, match=r"Llama-style blocks .*self_attn of this phi3 model is not"):
        LlamaPruner(phi3, heads=True, ffn=False)
    olmo2 = tiny(Olmo2Config, tokenizer, num_key_value_heads=8)  # q_norm over all heads at once
    with pytest.raises(KdcodeError, match="normalises its queries over all heads .*prune its MLP only"):
        LlamaPruner(olmo2, heads=True, ffn=False)
    LlamaPruner(olmo2, heads=False, ffn=True)  # its MLP is an ordinary gated one
    src = tmp_path / "phi3"
    phi3.save_pretrained(src)
    tokenizer.save_pretrained(src)
    spec = CompressSpec(data=DataSpec(source=str(corpus_dir)), prune_ffn=0.5, calib_batches=1, calib_batch_size=1)
    with pytest.raises(KdcodeError, match="mlp of this phi3 model is not mlp.gate_proj/up_proj/down_proj"):
        run_compress(str(src), spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
