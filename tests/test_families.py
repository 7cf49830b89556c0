"""Every code-model family at tiny size (issue 18.3): a random teacher built with plain transformers (4 blocks,
the conftest tokenizer's vocabulary) goes through what a user runs, and the student's blocks are the teacher's.

Per family: the spread (4 -> 3) and alternate (4 -> 2) students hold teacher block map[i] in block i, tensor for
tensor, and compute exactly what the teacher's own blocks map[0], map[1], ... compute when stacked with the
teacher's per-layer settings (a block from teacher layer j keeps layer j's attention type, rope, ...); they
survive a save and a plain reload. Then `distil` (spread + pretraining, alternate + intermediate), a reload with
plain `AutoModelForCausalLM`, eval, bench, complete, and `compress --int8` (completing from the int8 folder).
`examples/benchmarks/families.py` runs the same commands over every causal-LM architecture transformers has.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import run
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcode.evaluation.bench import run_bench
from kdcode.evaluation.evaluate import run_eval
from kdcode.inits.base import block_path
from kdcode.plugins import make_init
from kdcode.spec import BenchSpec, DataSpec, EvalSpec

LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# family -> (config class, its tiny shape); the GPT-2-named fields where the family uses them
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128}),
    "gpt_bigcode": ("GPTBigCodeConfig", {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128,
                                         "multi_query": True}),
    "starcoder2": ("Starcoder2Config", {**LLAMA_LIKE, "sliding_window": 16}),
    "codegen": ("CodeGenConfig", {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, "n_ctx": 128,
                                  "rotary_dim": 4}),
    "llama-gqa-tied": ("LlamaConfig", {**LLAMA_LIKE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": 16}),
    "qwen2-tied": ("Qwen2Config", {**LLAMA_LIKE, "tie_word_embeddings": True}),
    "qwen2-untied-sliding": ("Qwen2Config", {**LLAMA_LIKE, "tie_word_embeddings": False, "use_sliding_window": True,
                                             "sliding_window": 16, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8, "layer_types": ALTERNATING, "use_sliding_window": True,
                              "sliding_window": 16}),
    "gemma": ("GemmaConfig", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 16,
                                         "layer_types": ALTERNATING}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE}),
    "gpt_neox": ("GPTNeoXConfig", {**LLAMA_LIKE, "num_key_value_heads": None}),
    "olmo2": ("Olmo2Config", {**LLAMA_LIKE}),
    "smollm3": ("SmolLM3Config", {**LLAMA_LIKE}),  # no_rope_layers: every 4th block has no rope
    "granite": ("GraniteConfig", {**LLAMA_LIKE}),
}
SAMPLE = "import os\n\ndef main(path):\n    return os.path.join(path, 'x')\n"
pytestmark = pytest.mark.slow


def build(family: str, tokenizer) -> torch.nn.Module:
    name, shape = FAMILIES[family]
    config_cls = getattr(transformers, name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    shape = {k: v for k, v in shape.items() if v is not None}
    torch.manual_seed(0)
    config = config_cls(**shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return AutoModelForCausalLM.from_config(config).eval()


def teacher_blocks(teacher: torch.nn.Module, layer_map: list[int]) -> torch.nn.Module:
    """The teacher with only blocks ``layer_map`` stacked, each with its own layer's per-layer settings: what a
    student made of those blocks must compute."""
    model = copy.deepcopy(teacher)
    path = block_path(model)
    parent, name = path.rsplit(".", 1)
    blocks = model.get_submodule(path)
    setattr(model.get_submodule(parent), name, torch.nn.ModuleList([blocks[j] for j in layer_map]))
    n = teacher.config.num_hidden_layers
    for key, value in teacher.config.to_dict().items():  # a list with one entry per layer follows its layer
        if isinstance(value, list) and len(value) == n and "token" not in key:
            setattr(model.config, key, [value[j] for j in layer_map])
    model.config.num_hidden_layers = len(layer_map)
    return model


def check_students(teacher: torch.nn.Module, x: torch.Tensor, tmp_path) -> None:
    path = block_path(teacher)
    for init, layers in (("spread", 3), ("alternate", 2)):
        student, layer_map = make_init(init, {}).build(teacher, layers)
        student.eval()
        assert layer_map == ([0, 2, 3] if init == "spread" else [0, 2])
        for i, j in enumerate(layer_map):
            s, t = student.get_submodule(path)[i].state_dict(), teacher.get_submodule(path)[j].state_dict()
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s), (init, i, j)
        with torch.no_grad():
            got = student(x, use_cache=False).logits
            want = teacher_blocks(teacher, layer_map)(x, use_cache=False).logits
            assert torch.allclose(got, want, atol=1e-5), (init, float((got - want).abs().max()))
            student.save_pretrained(tmp_path / init)
            again = AutoModelForCausalLM.from_pretrained(tmp_path / init).eval()
            assert torch.allclose(again(x, use_cache=False).logits, got, atol=1e-6)


def cli(*args) -> str:
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_distils_reloads_and_runs_every_command(family, tmp_path, tokenizer, corpus_dir):
    teacher = build(family, tokenizer)
    x = torch.tensor([tokenizer(SAMPLE * 4)["input_ids"][:100]])  # longer than the sliding windows
    check_students(teacher, x, tmp_path / "init")
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    fast = ["--data", corpus_dir, "--max-steps", 2, "--batch-size", 2, "--block-size", 32, "--precision", "fp32"]
    cli("distil", "--teacher", folder, "--init", "alternate", "--strategy", "intermediate", "--layers", 2,
        "--out", tmp_path / "s2", *fast)
    student = tmp_path / "s3"
    cli("distil", "--teacher", folder, "--init", "spread", "--strategy", "pretraining", "--layers", 3,
        "--out", student, *fast)
    assert json.loads((student / "kdcode.json").read_text())["layer_map"] == [0, 2, 3]
    plain = AutoModelForCausalLM.from_pretrained(student).eval()
    assert plain.config.num_hidden_layers == 3 and AutoTokenizer.from_pretrained(student).get_vocab() == (
        tokenizer.get_vocab())
    with torch.no_grad():
        assert torch.isfinite(plain(x).logits).all()
    data = DataSpec(source=str(corpus_dir))
    ev = run_eval(str(student), EvalSpec(data=data, samples=2, max_new_tokens=3, ppl_blocks=1, batch_size=2))
    assert ev["samples"] == 2 and ev["perplexity"] > 1
    bench = run_bench(str(student), BenchSpec(data=data, prompts=1, warmup=0, new_tokens=3), isolate=False)
    assert bench["samples_per_s"] > 0
    (tmp_path / "sample.py").write_text(SAMPLE, encoding="utf-8")
    cli("complete", student, "--file", tmp_path / "sample.py", "--line", 3, "--max-tokens", 3)
    cli("compress", student, "--int8", "--out", tmp_path / "q8")
    out = cli("complete", tmp_path / "q8", "--file", tmp_path / "sample.py", "--line", 3, "--max-tokens", 3, "--json")
    assert json.loads(out)["runtime"]["dtype"].startswith("int8")


def test_blocks_of_any_layout_are_the_one_list_as_long_as_the_model_is_deep():
    config = transformers.BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64)
    model = transformers.BioGptForCausalLM(config)
    assert block_path(model) == "biogpt.layers"  # none of the named layouts: found by its depth
    model.extra = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])  # two candidates: ambiguous
    with pytest.raises(Exception, match="cannot find the transformer blocks of BioGptForCausalLM"):
        block_path(model)
