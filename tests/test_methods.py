"""The method registry beyond the foundation: jsd, intermediate, temperature schedules, more inits,
narrower students, the teacher-logit cache and third-party plugins by entry point."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_gpt2, run

from kdcode.errors import KdcodeError
from kdcode.plugins import make_init, make_strategy
from kdcode.registry import Registry
from kdcode.strategies.divergences import forward_kl, generalised_jsd, kd_terms
from kdcode.strategies.losses import causal_ce
from kdcode.strategies.sparse import SparseTargets

LN3 = math.log(3.0)
LABELS = torch.tensor([[1, 0]])
S = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
T = torch.tensor([[[LN3, 0.0], [-5.0, 5.0]]])


def test_jsd_endpoints_are_forward_and_reverse_kl():
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(P||Q), P=[3/4,1/4], Q=[1/2,1/2]
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(Q||P)
    assert generalised_jsd(S, T, LABELS, 0.0, 1.0).item() == pytest.approx(fwd, abs=1e-6)
    assert generalised_jsd(S, T, LABELS, 1.0, 1.0).item() == pytest.approx(rev, abs=1e-6)


def test_jsd_half_is_the_jensen_shannon_divergence():
    p, q = [0.75, 0.25], [0.5, 0.5]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert generalised_jsd(S, T, LABELS, 0.5, 1.0).item() == pytest.approx(js, abs=1e-6)
    assert js == pytest.approx(0.0338221, abs=1e-6)


def test_jsd_strategy_weights():
    s = make_strategy("jsd", {"beta": 0.0, "alpha_soft": 2.0, "alpha_hard": 1.0})
    out = SimpleNamespace(logits=S)
    terms = s.loss(out, SimpleNamespace(logits=T), LABELS)
    assert terms["loss"].item() == pytest.approx(2 * 0.130812 + math.log(2), abs=1e-5)


def test_linear_temperature_schedule():
    s = make_strategy("pretraining", {"temperature": 4.0, "temperature_schedule": "linear", "temperature_end": 1.0})
    assert [s.params.temperature_at(x) for x in (0.0, 0.5, 1.0, 2.0)] == [4.0, 2.5, 1.0, 1.0]
    early = s.loss(SimpleNamespace(logits=S), SimpleNamespace(logits=T), LABELS, progress=1.0)["soft"]
    assert early.item() == pytest.approx(forward_kl(S, T, LABELS, 1.0).item(), abs=1e-6)
    with pytest.raises(KdcodeError, match="temperature_end"):
        make_strategy("pretraining", {"temperature_schedule": "linear"})


def test_sparse_kl_top1_golden():
    # teacher [ln3, 0] at T=1: p_top = 3/4 on id 0, rest 1/4; student uniform: q_top = 1/2, rest 1/2
    targets = SparseTargets(torch.tensor([[[LN3], [0.0]]]), torch.tensor([[[0], [1]]]), torch.logsumexp(T, -1), 1.0)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_terms(S, targets, LABELS, 1.0)[0].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(KdcodeError, match="T=1.0"):
        kd_terms(S, targets, LABELS, 2.0)


def test_pretraining_strategy_terms_are_the_unfused_losses():
    # the strategy's fused path gives what forward_kl + causal_ce give, in bf16 too (autocast's logits dtype)
    torch.manual_seed(3)
    s, t = 2 * torch.randn(2, 6, 30), 2 * torch.randn(2, 6, 30)
    labels = torch.randint(0, 30, (2, 6))
    terms = make_strategy("pretraining", {}).loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t), labels)
    want = 0.5 * forward_kl(s, t, labels, 2.0) + 0.5 * causal_ce(s, labels)
    assert terms["loss"].item() == pytest.approx(want.item(), abs=1e-5)
    sb = s.bfloat16().requires_grad_(True)
    terms = make_strategy("pretraining", {}).loss(
        SimpleNamespace(logits=sb), SimpleNamespace(logits=t.bfloat16()), labels
    )
    terms["loss"].backward()
    assert sb.grad.dtype == torch.bfloat16 and terms["loss"].item() == pytest.approx(want.item(), abs=0.05)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return make_gpt2(tokenizer, n_layer=6, n_embd=32, n_head=2)


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [("first", {}, [0, 1, 2]), ("last", {}, [3, 4, 5]), ("layers", {"layers": [5, 0, 2]}, [5, 0, 2])],
)
def test_more_layer_copy_inits(teacher, name, params, expected):
    student, layer_map = make_init(name, params).build(teacher, 3)
    assert layer_map == expected
    for i, j in enumerate(expected):
        assert torch.equal(student.transformer.h[i].mlp.c_fc.weight, teacher.transformer.h[j].mlp.c_fc.weight)


@pytest.mark.parametrize(
    ("params", "match"), [({"layers": [0, 1]}, "lists 2 blocks"), ({"layers": [0, 1, 9]}, "\\[9\\]")]
)
def test_explicit_layers_validated(teacher, params, match):
    with pytest.raises(KdcodeError, match=match):
        make_init("layers", params).build(teacher, 3)


def test_narrower_student_needs_random_or_pretrained(teacher):
    student, _ = make_init("random", {}).build(teacher, 2, hidden_size=16, heads=2)
    assert student.config.n_embd == 16 and student.config.n_layer == 2
    with pytest.raises(KdcodeError, match="narrower student"):
        make_init("spread", {}).build(teacher, 2, hidden_size=16)
    with pytest.raises(KdcodeError, match="multiple of"):
        make_init("random", {}).build(teacher, 2, hidden_size=18, heads=4)


def test_pretrained_init_checks_shape(tmp_path, tokenizer, teacher):
    start = make_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2, seed=5)
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    init = make_init("pretrained", {"path": str(tmp_path / "start")})
    student, layer_map = init.build(teacher, 2, tokenizer=tokenizer)
    assert layer_map == [None, None]
    assert torch.equal(student.transformer.wte.weight, start.transformer.wte.weight)
    with pytest.raises(KdcodeError, match="has layers 2, the student asks for 3"):
        init.build(teacher, 3)


def test_intermediate_projection_and_golden_mse(teacher, tokenizer):
    s = make_strategy("intermediate", {"alpha_soft": 0, "alpha_hard": 0, "alpha_hid": 1})
    student = make_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2)
    extra = s.setup(student, teacher, [None, None])
    assert s.layer_map == [0, 5] and len(extra) == 1 and len(extra[0]) == 2
    # golden: identity widths, hidden states chosen by hand
    same = make_strategy("intermediate", {"alpha_soft": 0, "alpha_hard": 0, "alpha_hid": 2, "layer_map": [1]})
    same.setup(make_gpt2(tokenizer, n_layer=1, n_embd=32), teacher, [0])
    h = torch.zeros(1, 2, 32)
    hs = SimpleNamespace(logits=S, hidden_states=(h, torch.ones(1, 2, 32)))
    ht = SimpleNamespace(logits=T, hidden_states=(h, h, torch.full((1, 2, 32), 3.0)))
    terms = same.loss(hs, ht, LABELS)
    assert terms["hid"].item() == pytest.approx(4.0)  # (1 - 3)^2 on every counted position
    assert terms["loss"].item() == pytest.approx(8.0)


def _distil(tmp, teacher_dir, corpus_dir, *extra):
    return run("distil", "--teacher", teacher_dir, "--data", corpus_dir, "--layers", 2, "--max-steps", 2,
               "--batch-size", 2, "--block-size", 64, "--precision", "fp32", *extra)


@pytest.mark.slow
def test_teacher_cache_round_trip_and_refusal(tmp_path, teacher_dir, corpus_dir, tokenizer):
    cache = tmp_path / "cache"
    r = run("cache-teacher", "--teacher", teacher_dir, "--data", corpus_dir, "--block-size", 64, "--top-k", 8,
            "--out", cache)
    assert r.exit_code == 0, r.output
    manifest = json.loads((cache / "cache.json").read_text())
    # the default temperature is the default strategy's (reverse-kl: 1)
    assert manifest["top_k"] == 8 and manifest["block_size"] == 64 and manifest["temperature"] == 1.0
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", cache, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "s" / "kdcode.json").read_text())
    assert m["teacher_cache"]["top_k"] == 8 and m["training"]["final"]["reverse_kl"] >= 0
    # another block size, another temperature, a strategy that needs the live teacher: refused
    r = _distil(
        tmp_path, teacher_dir, corpus_dir, "--teacher-cache", cache, "--out", tmp_path / "x", "--temperature", 2
    )
    assert r.exit_code == 2 and "T=1.0" in r.output
    r = _distil(
        tmp_path,
        teacher_dir,
        corpus_dir,
        "--teacher-cache",
        cache,
        "--out",
        tmp_path / "x",
        "--strategy",
        "in-training",
    )
    assert r.exit_code == 2 and "cannot train from a teacher cache" in r.output
    other = tmp_path / "other_teacher"
    make_gpt2(tokenizer, seed=11).save_pretrained(other)
    tokenizer.save_pretrained(other)
    r = _distil(tmp_path, other, corpus_dir, "--teacher-cache", cache, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "another teacher" in r.output
    assert not (tmp_path / "x").exists()


PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "plugin" / "src"


def test_plugin_by_entry_point(tmp_path, monkeypatch, teacher_dir, corpus_dir):
    # A fake installed distribution: a dist-info folder on sys.path, found by importlib.metadata.
    site = tmp_path / "site"
    dist = site / "kdcode_topk-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdcode-topk\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[kdcode.strategies]\ntopk-kl = kdcode_topk:TopKKL\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.delenv("KDCODE_DISABLE_PLUGINS", raising=False)
    fresh: Registry = Registry("strategy", group="kdcode.strategies")
    for name in ("pretraining", "hard-only"):
        fresh.register(
            name,
            f"kdcode.strategies.{name.replace('-', '_')}:"
            + {"pretraining": "PretrainingKD", "hard-only": "HardOnly"}[name],
        )
    monkeypatch.setattr("kdcode.plugins.STRATEGIES", fresh)
    assert "topk-kl" in fresh.names() and fresh.source("topk-kl") == "package 'kdcode-topk'"
    spec = tmp_path / "run.yaml"
    spec.write_text("strategy:\n  name: topk-kl\n  params: {k: 4}\n")
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--spec", spec, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "s" / "kdcode.json").read_text())
    assert m["strategy"]["name"] == "topk-kl" and m["strategy"]["params"]["k"] == 4
    assert "topk_kl" in m["training"]["final"]
    sys.modules.pop("kdcode_topk", None)


@pytest.mark.slow
def test_a_cache_covers_the_run_and_distil_builds_or_grows_it(tmp_path, teacher_dir, corpus_dir):
    from safetensors.torch import load_file

    from kdcode.train.teacher_cache import cache_order, load_cache

    cache = tmp_path / "cache"
    r = run("cache-teacher", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
            "--block-size", "64", "--top-k", "8", "--max-steps", "2", "--train-batch-size", "2",
            "--out", str(cache))
    assert r.exit_code == 0, r.output
    small = json.loads((cache / "cache.json").read_text())
    total = small["total_blocks"]
    assert small["blocks"] == 4 < total and "4 of" in r.output
    first = load_cache(cache)
    # a run of 2 steps x 2 blocks reads what is there; one of 4 steps grows it to 8, continuing the same order
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", cache, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "kdcode.json").read_text())["teacher_cache"]["action"] == "reused"
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", cache, "--out", tmp_path / "g",
                "--max-steps", 4)
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "g" / "kdcode.json").read_text())["teacher_cache"]
    assert info["action"] == "grown" and info["from_blocks"] == 4 and info["blocks"] == 8
    grown = load_cache(cache)
    assert grown.manifest["blocks"] == 8 and len(grown.input_ids) == 8
    assert torch.equal(grown.input_ids[:4], first.input_ids) and torch.equal(grown.lse[:4], first.lse)
    index = torch.cat([load_file(str(cache / s))["block_index"] for s in grown.manifest["shards"]])
    assert torch.equal(index, cache_order(total)[:8])
    # the grown cache holds what one pass over those 8 blocks gives
    r = run("cache-teacher", "--teacher", str(teacher_dir), "--data", str(corpus_dir),
            "--block-size", "64", "--top-k", "8", "--max-blocks", "8", "--out", str(tmp_path / "c8"))
    assert r.exit_code == 0, r.output
    fresh = load_cache(tmp_path / "c8")
    assert torch.equal(fresh.input_ids, grown.input_ids) and torch.equal(fresh.topk_ids, grown.topk_ids)
    assert torch.allclose(fresh.topk_logits.float(), grown.topk_logits.float())
    # no cache yet: distil builds one sized to its run, at its temperature
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", tmp_path / "new", "--out", tmp_path / "b",
                "--temperature", 1)
    assert r.exit_code == 0, r.output
    built = json.loads((tmp_path / "new" / "cache.json").read_text())
    assert built["blocks"] == 4 and built["temperature"] == 1.0 and built["top_k"] == 64
    assert json.loads((tmp_path / "b" / "kdcode.json").read_text())["teacher_cache"]["action"] == "built"


def test_a_growth_that_fails_leaves_the_cache_as_it_was(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    import kdcode.train.teacher_cache
    from kdcode.errors import KdcodeError
    from kdcode.models.load import load_model
    from kdcode.train.teacher_cache import build_cache, cache_order, grow_cache, load_cache

    teacher = load_model(str(teacher_dir))
    blocks = torch.randint(0, len(teacher.tokenizer), (12, 16))
    build_cache(teacher.model, blocks, tmp_path / "c", 4, 2.0, {}, vocab=len(teacher.tokenizer), max_blocks=3)
    before = (tmp_path / "c" / "cache.json").read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kdcode.train.teacher_cache, "save_file", full_disk)
    with pytest.raises(OSError):
        grow_cache(teacher.model, blocks, tmp_path / "c", 9, len(teacher.tokenizer))
    assert (tmp_path / "c" / "cache.json").read_text() == before and len(load_cache(tmp_path / "c").input_ids) == 3
    monkeypatch.undo()
    with pytest.raises(KdcodeError, match="made from 12 training blocks"):
        grow_cache(teacher.model, blocks[:10], tmp_path / "c", 9, len(teacher.tokenizer))
    assert grow_cache(teacher.model, blocks, tmp_path / "c", 99, len(teacher.tokenizer))["blocks"] == 12
    assert torch.equal(load_cache(tmp_path / "c").input_ids, blocks[cache_order(12)])  # every block, in cache order


def test_a_cache_folder_distil_would_build_in_is_checked_before_loading(tmp_path, teacher_dir, corpus_dir):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", junk, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "not a teacher cache" in r.output and (junk / "notes.txt").read_text() == "mine"
    for cache, out in ((tmp_path / "s" / "cache", tmp_path / "s"), (tmp_path / "c", tmp_path / "c" / "s")):
        r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", cache, "--out", out)
        assert r.exit_code == 2 and "overlap" in r.output and "Traceback" not in r.output
        assert not cache.exists() and not out.exists()
    r = _distil(tmp_path, teacher_dir, corpus_dir, "--teacher-cache", teacher_dir / "cache", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "--teacher-cache" in r.output and not (teacher_dir / "cache").exists()
