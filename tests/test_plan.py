"""Students chosen by a latency budget (`kdcode plan`, `distil --latency-ms`): the search finds each family's
deepest shape within the budget and measures the boundary, the finalists are scored by the proxy and the best
within the budget is chosen, a student made this way records its plan and measured latency, and the three
outcomes a budget can have are one line each. Time is a model of the timed model's size (no wall clock decides)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_gpt2, run

from kdcode.compression.int8 import Int8Linear
from kdcode.errors import KdcodeError
from kdcode.models.load import count_params
from kdcode.planning import timing
from kdcode.planning.plan import PLAN_FILE_SUFFIX, plan_for_run, plan_shapes
from kdcode.planning.search import Finalists, families, short_kd
from kdcode.planning.shapes import Shape, timing_model
from kdcode.spec_latency import LatencySpec

FACTOR = {"fp32": 1.0, "bf16": 0.8, "int8": 0.6}


def model_ms(model: torch.nn.Module) -> float:
    """A stand-in clock: 1 ms per 1,000 weights, less for bf16 and int8 (what real timing shows on big models)."""
    kind = ("int8" if any(isinstance(m, Int8Linear) for m in model.modules())
            else "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32")
    return count_params(model) / 1000 * FACTOR[kind]


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    monkeypatch.setattr(timing.Timed, "once", lambda self, task: model_ms(self.model))


@pytest.fixture()
def blocks(tokenizer, corpus_dir):
    from kdcode.data.corpus import load_corpus, split_blocks
    from kdcode.inits.base import calibration_sample
    from kdcode.spec import DataSpec

    train, valid = split_blocks(load_corpus(DataSpec(source=str(corpus_dir))), tokenizer, 64)
    return calibration_sample(train, 0), valid


def spec(budget: float, **kw) -> LatencySpec:
    return LatencySpec(latency_ms=budget, prompt_tokens=48, new_tokens=4, rounds=2, search_rounds=1, proxy_blocks=4,
                       **{"proxy_steps": 0, "tie_steps": 0, "precisions": ["fp32", "int8"], "ffn_keep": [1.0, 0.5],
                          "head_prune": [0.0], **kw})


def test_each_family_keeps_its_deepest_shape_within_the_budget_and_the_best_proxy_wins(tokenizer, blocks):
    teacher = make_gpt2(tokenizer)  # 4 layers x 32: 1 layer ~33k weights, 4 layers ~71k
    calib, valid = blocks
    plan = plan_shapes(teacher, tokenizer, calib, valid, spec(50), log=lambda line: None)
    assert plan["outcome"] == "chosen" and plan["line"] is None
    rows = {Shape(r["layers"], r["ffn_keep"], r["head_prune"], r["precision"]): r for r in plan["candidates"]}
    finals = [s for s, r in rows.items() if r["phase"] == "final"]
    assert len(finals) == 4  # one per (MLP kept, precision) family
    target = 50 * (1 - plan["spec"]["margin"])  # the budget less the margin kept in hand (10%)
    assert target == 45
    for s in finals:
        assert rows[s]["ms"] <= target and rows[s]["meets"]
        deeper = Shape(s.layers + 1, *s.family)
        assert s.layers == 4 or rows[deeper]["ms"] > target  # the boundary was measured, not guessed
        assert rows[s]["proxy_loss"] > 0 and len(rows[s]["teacher_blocks"]) == s.layers
    chosen = plan["chosen"]
    assert chosen["chosen"] and chosen["meets"]
    assert chosen["proxy_loss"] == min(rows[s]["proxy_loss"] for s in finals)
    assert sum(r["chosen"] for r in plan["candidates"]) == 1
    assert plan["teacher"]["layers"] == 4 and plan["teacher"]["ms"] > 50
    assert plan["task"]["prompt_tokens"] == 48 and plan["task"]["new_tokens"] == 4 and plan["task"]["prompt"]
    assert plan["machine"]["threads"] >= 1 and "cpu_features" in plan["machine"]
    json.dumps(plan)  # the table is JSON too


def test_the_proxy_s_short_kd_is_seeded_and_lowers_the_held_out_loss(tokenizer, blocks):
    from kdcode.evaluation.perplexity import held_out_loss

    teacher = make_gpt2(tokenizer)
    calib, valid = blocks
    at_init = Finalists(teacher, calib, valid, spec(50), torch.device("cpu"), len(tokenizer))
    trained = Finalists(teacher, calib, valid, spec(50, proxy_steps=12), torch.device("cpu"), len(tokenizer))
    shape = Shape(2, 1.0, 0.0, "fp32")
    (m0, info0), (m1, info1) = at_init.build(shape), trained.build(shape)
    assert info1["proxy_steps"] == 12 and info1["proxy_loss"] < info0["proxy_loss"] - 0.05
    assert info1["proxy_loss"] == round(held_out_loss(m1, valid[:4], 4, None, torch.device("cpu")), 4)
    short_kd(m0, teacher, calib, 12, 8, len(tokenizer))  # the same steps on the same draws: the same weights
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))


def test_near_ties_are_decided_by_a_longer_proxy_and_one_shape_s_precisions_share_its_training(tokenizer, blocks):
    teacher = make_gpt2(tokenizer)
    calib, valid = blocks
    lines: list[str] = []
    plan = plan_shapes(teacher, tokenizer, calib, valid, spec(50, proxy_steps=2, tie_steps=6, proxy_tie=1.0),
                       log=lines.append)
    ok = [r for r in plan["candidates"] if r["phase"] == "final" and r["meets"]]
    assert len(ok) >= 2 and all(r["tie_loss"] is not None for r in ok)  # every one within 100% of the best
    assert plan["chosen"]["tie_loss"] == min(r["tie_loss"] for r in ok)
    assert any("scored again after 6 KD steps" in line for line in lines)
    fin = Finalists(teacher, calib, valid, spec(50), torch.device("cpu"), len(tokenizer))
    c = plan["chosen"]
    _, info = fin.build(Shape(c["layers"], c["ffn_keep"], c["head_prune"], c["precision"]), 6)
    assert info["proxy_loss"] == c["tie_loss"] and info["proxy_steps"] == 6
    # fp32 and int8 of one shape: one training, each converts a copy of it
    a, b = fin.trained(Shape(2, 1.0, 0.0, "fp32"), 3), fin.trained(Shape(2, 1.0, 0.0, "int8"), 3)
    assert a is not b and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # no second stage when the tie window holds one finalist or tie_steps is not above proxy_steps
    for kw in ({"proxy_tie": 0.0}, {"tie_steps": 2}):
        plan = plan_shapes(teacher, tokenizer, calib, valid, spec(50, **{"proxy_steps": 2, "tie_steps": 6,
                                                                          "proxy_tie": 1.0, **kw}), log=lambda _: None)
        assert all(r.get("tie_loss") is None for r in plan["candidates"])


@pytest.mark.parametrize("int8_dot", [True, False])
def test_an_int8_finalist_is_the_int8_compress_writes_on_this_cpu(tokenizer, blocks, monkeypatch, int8_dot):
    monkeypatch.setattr("kdcode.compression.smooth.cpu_has_int8_dot", lambda: int8_dot)
    teacher, (calib, valid) = make_gpt2(tokenizer), blocks
    lines: list[str] = []
    plan_shapes(teacher, tokenizer, calib, valid, spec(50), log=lines.append)
    scheme = "smooth-per-token" if int8_dot else "weight-only"
    assert any(line.startswith(f"int8 is {scheme}, as kdcode compress --int8 writes it here (auto: ")
               for line in lines)
    fin = Finalists(teacher, calib, valid, spec(50), torch.device("cpu"), len(tokenizer))
    student, _ = fin.build(Shape(2, 1.0, 0.0, "int8"))
    kinds = {m.activations for m in student.modules() if isinstance(m, Int8Linear)}
    assert kinds == {"per-token" if int8_dot else "weight-only"}
    assert len(student.get_output_embeddings().float_channels or []) == (16 if int8_dot else 0)
    timed = timing_model(teacher, Shape(2, 1.0, 0.0, "int8"))  # the model timed: the same kernels
    assert {m.activations for m in timed.modules() if isinstance(m, Int8Linear)} == kinds
    named, _ = fin.build(Shape(2, 1.0, 0.0, "int8-weight-only"))  # a scheme named is taken on any CPU
    assert {m.activations for m in named.modules() if isinstance(m, Int8Linear)} == {"weight-only"}


def test_a_budget_nothing_meets_names_the_fastest(tokenizer, blocks):
    plan = plan_shapes(make_gpt2(tokenizer), tokenizer, *blocks, spec(5), log=lambda line: None)
    assert plan["outcome"] == "none" and plan["chosen"] is None
    fastest = min(r["ms"] for r in plan["candidates"])
    assert plan["line"].startswith("no candidate meets 5 ms")
    assert f"takes {fastest} ms" in plan["line"] and "--latency-ms to at least" in plan["line"]


def test_a_budget_the_teacher_meets_says_no_student_is_needed(tokenizer, blocks):
    plan = plan_shapes(make_gpt2(tokenizer), tokenizer, *blocks, spec(1e6), log=lambda line: None)
    assert plan["outcome"] == "teacher" and plan["chosen"] is None
    assert plan["line"].startswith("the teacher itself (4 layers, fp32)") and "no student is needed" in plan["line"]
    assert [r["layers"] for r in plan["candidates"]] == [4]  # nothing else had to be timed


def test_a_family_that_cannot_be_pruned_is_searched_by_depth_and_precision(tokenizer):
    from transformers import AutoModelForCausalLM, Phi3Config

    phi3 = AutoModelForCausalLM.from_config(Phi3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    lines: list[str] = []
    fams = families(phi3, spec(50, head_prune=[0.0, 0.5]), torch.device("cpu"), lines.append)
    assert fams == [(1.0, 0.0, "fp32"), (1.0, 0.0, "int8")]
    assert lines == ["the teacher's family (phi3) cannot be pruned by kdcode in every way (GPT-2 and Llama-style "
                     "blocks): depth and precision are searched"]


def test_plan_cli_prints_the_table_and_json_and_one_line_when_nothing_fits(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--teacher", teacher_dir, "--data", corpus_dir, "--prompt-tokens", 48, "--new-tokens", 4,
            "--precisions", "fp32", "--ffn-keep", "1,0.5", "--head-prune", "0", "--rounds", 1]
    r = run(*args, "--latency-ms", 50, "--proxy-steps", 3, "--tie-steps", 5, "--json", out)
    assert r.exit_code == 0, r.output
    plan = json.loads(out.read_text())
    assert "chosen:" in r.output and "quality proxy: held-out loss after 3 KD steps (reverse-kl" in r.output
    assert plan["spec"]["tie_steps"] == 5 and plan["spec"]["proxy_tie"] == 0.02
    assert plan["chosen"]["proxy_steps"] == 3 and plan["spec"]["proxy_steps"] == 3
    assert plan["chosen"]["layers"] >= 1 and plan["budget_ms"] == 50 and plan["spec"]["margin"] == 0.1
    assert run(*args, "--latency-ms", 50, "--margin", 0.2, "--json", out).exit_code == 0
    assert json.loads(out.read_text())["chosen"]["ms"] <= 40  # 50 ms less 20% kept in hand
    r = run(*args, "--latency-ms", 5)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: no candidate meets 5 ms")
    r = run(*args[:3])
    assert r.exit_code == 2 and "--latency-ms is required" in r.output
    r = run(*args, "--latency-ms", 50, "--json", teacher_dir / "plan.json")  # inside the teacher: refused at once
    assert r.exit_code != 0 and "--json" in r.output and not (teacher_dir / "plan.json").exists()


def test_distil_by_budget_writes_the_chosen_student_its_int8_runtime_and_their_latency(teacher_dir, corpus_dir,
                                                                                     tmp_path):
    out = tmp_path / "s"
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--latency-ms", 45, "--prompt-tokens", 48,
            "--new-tokens", 4, "--precisions", "int8", "--proxy-steps", 2, "--tie-steps", 4, "--max-steps", 2,
            "--batch-size", 2,
            "--block-size", 64, "--out", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "kdcode.json").read_text())
    plan = manifest["latency_plan"]
    chosen = plan["chosen"]
    assert chosen["precision"] == "int8" and manifest["model"]["n_layer"] == chosen["layers"]
    assert manifest["layer_map"] == chosen["teacher_blocks"]
    assert manifest["spec"]["student"]["runtime"] == "int8"
    runtime = tmp_path / "s-int8"
    rt_manifest = json.loads((runtime / "kdcode.json").read_text())
    assert rt_manifest["metrics"]["latency"]["meets"] is True and rt_manifest["metrics"]["latency"]["budget_ms"] == 45
    assert manifest["metrics"]["latency"]["measured_on"] == "s-int8"
    assert (tmp_path / ("s" + PLAN_FILE_SUFFIX)).exists()
    r = run("bench", runtime, "--prompts", 1, "--rounds", 1, "--new-tokens", 2, "--json", "-")
    assert r.exit_code == 0, r.output
    check = json.loads(r.output[r.output.index("{"):])["latency_budget"]
    assert check["meets"] is True and check["prompt_tokens"] == 48


def test_distil_by_budget_refuses_layers_and_a_budget_the_teacher_meets(teacher_dir, corpus_dir, tmp_path):
    r = run("distil", "--teacher", teacher_dir, "--latency-ms", 45, "--layers", 2, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "drop --layers" in r.output
    r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--latency-ms", 1e6, "--prompt-tokens", 48,
            "--new-tokens", 4, "--precisions", "fp32", "--max-steps", 1, "--block-size", 64, "--out", tmp_path / "b")
    assert r.exit_code != 0 and "the teacher itself" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_a_resumed_run_reuses_its_plan(tokenizer, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kdcode.spec import RunSpec

    run_spec = RunSpec(teacher={"name": "t"}, latency=spec(50).model_dump())
    saved = {"spec": run_spec.latency.model_dump(mode="json"), "teacher_name": "t", "outcome": "chosen",
             "chosen": {"layers": 2, "ffn_keep": 1.0, "head_prune": 0.0, "precision": "fp32"}}
    (tmp_path / ("s" + PLAN_FILE_SUFFIX)).write_text(json.dumps(saved))
    monkeypatch.setattr("kdcode.planning.plan.plan_shapes", lambda *a, **k: pytest.fail("planned again"))
    assert plan_for_run(run_spec, SimpleNamespace(), None, None, tmp_path / "s") == saved
    with pytest.raises(KdcodeError):
        from kdcode.planning.plan import require_student

        require_student({"outcome": "none", "line": "no candidate meets 1 ms"})


def test_a_finalist_over_the_budget_in_the_final_rounds_gives_way_to_one_block_less(tokenizer, blocks, monkeypatch):
    from kdcode.planning import plan as plan_module

    calls = []
    real = plan_module.time_interleaved

    def noisy_first_final(models, task, rounds, warmup=1):  # the first final rounds: int8 shapes run slow
        out = real(models, task, rounds, warmup)
        calls.append(len(models))
        if len(calls) == 1:
            out = {s: [ms + 100 for ms in v] if s.precision == "int8" else v for s, v in out.items()}
        return out

    monkeypatch.setattr(plan_module, "time_interleaved", noisy_first_final)
    plan = plan_shapes(make_gpt2(tokenizer), tokenizer, *blocks, spec(50), log=lambda line: None)
    finals = [r for r in plan["candidates"] if r["phase"] == "final"]
    missed = [r for r in finals if r["precision"] == "int8" and not r["meets"]]
    assert missed and len(calls) == 2 and calls[1] == len(missed)
    for r in missed:  # each family that missed was timed again one block shallower, and fits
        again = next(x for x in finals if x["precision"] == "int8" and x["ffn_keep"] == r["ffn_keep"]
                     and x["layers"] == r["layers"] - 1)
        assert again["meets"] and again["proxy_loss"] > 0
    assert plan["chosen"]["meets"]
