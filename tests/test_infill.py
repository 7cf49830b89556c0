"""Infilling: the prompt window (what of the prefix and suffix is kept), `kdcode eval --task infill` on a tiny
model (the same holes for every model, prefix-only beside it), and `kdcode complete` with the text after the
cursor as the suffix."""

from __future__ import annotations

import json

import pytest
from conftest import run

from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.evaluation.evaluate import run_eval
from kdcode.evaluation.infill import build_infill_samples
from kdcode.inference.decode import DecodeOptions, greedy
from kdcode.inference.engine import Engine, load_engine, prefix_at, suffix_at
from kdcode.inference.infill import encode_infill
from kdcode.models import fim_tokens
from kdcode.spec import DataSpec, EvalSpec

SOURCE = "import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n    return path\n"


@pytest.fixture(scope="module")
def engine(fim_teacher_dir) -> Engine:
    return load_engine(str(fim_teacher_dir), device="cpu", warm_up=False)


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_window_keeps_the_code_nearest_the_hole(engine, corpus_dir):
    t = engine.fim
    text = sorted(corpus_dir.glob("*.py"))[1].read_text(encoding="utf-8")
    prefix, suffix = text[: len(text) // 2], text[len(text) // 2 :]
    prompt, window = encode_infill(engine.index, t, prefix, suffix, 100)
    p, s = ids(engine, prefix), ids(engine, suffix)
    assert len(prompt.ids) == 100 and window.cut_prefix and window.cut_suffix and not prompt.healed
    assert window.suffix_tokens == 97 // 4 and window.prefix_tokens == 97 - 97 // 4
    want = [t.prefix_id, *p[-window.prefix_tokens :], t.suffix_id, *s[: window.suffix_tokens], t.middle_id]
    assert list(prompt.ids) == want  # the prefix's last tokens and the suffix's first, as whole-text tokenization
    # a short prefix leaves the suffix the rest of the window; short both: nothing is cut
    short, window = encode_infill(engine.index, t, "x = ", suffix, 100)
    assert window.prefix_tokens == len(ids(engine, "x = ")) and window.suffix_tokens == 97 - window.prefix_tokens
    assert window.cut_suffix and not window.cut_prefix
    both, window = encode_infill(engine.index, t, "x = ", "\ny = 2\n", 100)
    assert list(both.ids) == [t.prefix_id, *ids(engine, "x = "), t.suffix_id, *ids(engine, "\ny = 2\n"), t.middle_id]
    assert not window.cut
    empty, _ = encode_infill(engine.index, t, "", "", 100)
    assert list(empty.ids) == [t.prefix_id, t.suffix_id, t.middle_id]


def test_infill_samples_are_the_line_completion_holes(corpus_dir):
    docs = load_corpus(DataSpec(source=str(corpus_dir))).splits["test"]
    holes = build_infill_samples(docs, 30, 5)
    lines = build_line_samples(docs, 30, 5)
    assert [h.id for h in holes] == [s.id for s in lines] and len(holes) == 30
    for h, s in zip(holes, lines):
        assert h.prefix == s.input and h.gt == s.gt and h.prev == s.prev
        assert "\n" not in h.middle and h.middle.strip() and (h.suffix == "" or h.suffix[0] in "\r\n")
        key = h.id.rsplit("@", 1)[0]
        assert h.prefix + h.middle + h.suffix == next(d.text for d in docs if d.key == key)


@pytest.mark.slow
def test_eval_infill_on_a_tiny_model(tmp_path, fim_teacher_dir, corpus_dir, teacher_dir):
    from conftest import make_fim_model

    spec = EvalSpec(data={"source": str(corpus_dir)}, task="infill", samples=12, max_new_tokens=6, batch_size=4)
    preds = tmp_path / "preds.txt"
    a = run_eval(str(fim_teacher_dir), spec, predictions=preds)
    assert a["task"] == "infill" and a["samples"] == 12 and a["fim"]["format"] == "starcoder"
    assert a["window"]["context_tokens"] == 128 - 6 and a["decoding"]["heal"] is True
    assert len(preds.read_text(encoding="utf-8").splitlines()) == 12
    # the prefix-only figures are line completion of the same holes
    line = run_eval(str(fim_teacher_dir), spec.model_copy(update={"task": "line", "ppl_blocks": 0}))
    assert {k: a["prefix_only"][k] for k in ("es", "em", "samples")} == {k: line[k] for k in ("es", "em", "samples")}
    # the same holes, with the same ids, for another model
    other = run_eval(str(make_fim_model(tmp_path / "other", teacher_dir, seed=7, n_layer=1)), spec)
    assert [e["id"] for e in other["examples"]] == [e["id"] for e in a["examples"]]
    assert other["baseline"] == a["baseline"]
    # the infill figures are the ES/EM of what the model fills in
    from kdcode.evaluation.metrics import line_metrics

    holes = build_infill_samples(load_corpus(spec.data).splits["test"], 12, 0)
    gts = [s.gt for s in holes]
    assert line_metrics(preds.read_text(encoding="utf-8").splitlines(), gts)["es"] == a["es"]
    # prefix-only from as many prefix tokens as each infill prompt held: the windows of the prompts themselves
    from kdcode.inference.decode import DecodeOptions, VocabIndex, encode_prompt, greedy
    from kdcode.inference.infill import encode_infill
    from kdcode.models import fim_tokens
    from kdcode.models.load import load_model

    lm = load_model(str(fim_teacher_dir))
    index = VocabIndex.for_model(lm.model, lm.tokenizer)
    tokens = fim_tokens.require(lm.tokenizer, None, "t")
    opts = DecodeOptions(max_new_tokens=6, heal=True)
    windows = [encode_infill(index, tokens, h.prefix, h.suffix, 122, True, a["fim"]["order"])[1] for h in holes]
    assert any(w.cut_prefix for w in windows)  # the suffix displaced prefix tokens, so the two rows differ in input
    prompts = [encode_prompt(index, h.prefix, opts, w.prefix_tokens) for h, w in zip(holes, windows)]
    assert [len(p.ids) for p in prompts] == [w.prefix_tokens for w in windows]
    same = line_metrics(greedy(lm.model, index, prompts, opts, 4).texts, gts)
    assert {k: a["prefix_only_same_window"][k] for k in ("es", "em", "samples")} == \
        {k: same[k] for k in ("es", "em", "samples")}


def test_eval_infill_refusals_are_one_line(teacher_dir, corpus_dir):
    r = run("eval", str(teacher_dir), "--data", str(corpus_dir), "--task", "infill",
            "--samples", "2")
    assert r.exit_code == 2 and "does not infill" in r.output and "Traceback" not in r.output
    r = run("eval", str(teacher_dir), "--task", "fill")
    assert r.exit_code == 2 and "task" in r.output
    r = run("eval", str(teacher_dir), "--task", "infill", "--format", "py150")
    assert r.exit_code == 2 and "raw code" in r.output


def test_an_infill_prompt_heals_the_prefixs_last_token(engine):
    prefix, suffix = "def f(x):\n", "\n    return y\n"
    plain, _ = encode_infill(engine.index, engine.fim, prefix, suffix, 64)
    healed, _ = encode_infill(engine.index, engine.fim, prefix, suffix, 64, heal=True)
    last = plain.ids[plain.ids.index(engine.fim.suffix_id) - 1]  # the prefix's last token: the bare newline
    assert plain.healed == "" and healed.healed == engine.index.decode([last]) == "\n"
    assert healed.ids == tuple(i for n, i in enumerate(plain.ids) if n != plain.ids.index(engine.fim.suffix_id) - 1)


def test_engine_infills_between_prefix_and_suffix(engine):
    prefix, suffix = prefix_at(SOURCE, 5), suffix_at(SOURCE, 5)
    assert prefix + suffix == SOURCE and suffix.startswith("path =")
    got = engine.complete(prefix, 8, suffix=suffix)
    prompt, window = encode_infill(engine.index, engine.fim, prefix, suffix, engine.n_positions - 8, heal=True)
    want = greedy(engine.model, engine.index, [prompt], DecodeOptions(8, heal=False, heal_space=True))  # as served
    assert got.choices[0].text == want.texts[0] and "\n" not in got.choices[0].text
    assert got.prompt_tokens == len(prompt.ids) and got.truncated is window.cut is False
    beams = engine.complete(prefix, 6, suffix=suffix, n=2, beams=3)
    assert 1 <= len(beams.choices) <= 2
    sampled = [engine.complete(prefix, 6, suffix=suffix, temperature=0.8, seed=3).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_complete_uses_the_suffix_when_the_model_infills(tmp_path, engine, fim_teacher_dir, teacher_dir):
    src = tmp_path / "f.py"
    src.write_text(SOURCE, encoding="utf-8")
    r = run("complete", str(fim_teacher_dir), "--file", str(src), "--line", "5", "--col", "9",
            "--max-tokens", "6", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    prefix, suffix = prefix_at(SOURCE, 5, 9), suffix_at(SOURCE, 5, 9)
    assert out["infill"] == {"format": "starcoder", "suffix_chars": len(suffix), "cut": False}
    assert out["completions"][0]["text"] == engine.complete(prefix, 6, suffix=suffix).choices[0].text
    r = run("complete", str(fim_teacher_dir), "--file", str(src), "--line", "5", "--col", "9",
            "--max-tokens", "6", "--json", "--no-suffix")
    out = json.loads(r.output)
    assert out["infill"] is None and out["completions"][0]["text"] == engine.complete(prefix, 6).choices[0].text
    r = run("complete", str(teacher_dir), "--file", str(src), "--line", "5", "--max-tokens", "4",
            "--json")
    assert r.exit_code == 0 and json.loads(r.output)["infill"] is None  # no FIM tokens: the prefix alone
    r = run("complete", str(teacher_dir), "--file", str(src), "--line", "5", "--fim-format", "qwen")
    assert r.exit_code == 2 and "does not infill" in r.output and "qwen FIM tokens" in r.output


def test_vocab_index_stops_at_fim_tokens(engine):
    t = fim_tokens.detect(engine.tokenizer)
    assert {t.prefix_id, t.suffix_id, t.middle_id} <= engine.index.stop_ids


def test_an_spm_prompt_puts_the_prefix_right_before_the_middle(engine):
    prefix, suffix = "def f(x):\n    y = x + 1\n", "\n    return y\n"
    psm, w1 = encode_infill(engine.index, engine.fim, prefix, suffix, 64, heal=True)
    spm, w2 = encode_infill(engine.index, engine.fim, prefix, suffix, 64, heal=True, order="spm")
    t = engine.fim
    kept = list(psm.ids[1 : psm.ids.index(t.suffix_id)])  # the prefix as PSM keeps it (healed: its last token off)
    suf = list(psm.ids[psm.ids.index(t.suffix_id) + 1 : -1])
    assert list(spm.ids) == [t.prefix_id, t.suffix_id, *suf, t.middle_id, *kept]  # the same window, reordered
    assert spm.healed == psm.healed == "\n" and w1 == w2


def test_the_infill_order_is_the_models_own_unless_asked(tmp_path, fim_teacher_dir, corpus_dir):
    import shutil

    from kdcode.errors import KdcodeError
    from kdcode.models.artifacts import read_manifest, write_json

    assert fim_tokens.infill_order("auto", None) == "psm" and fim_tokens.infill_order("spm", None) == "spm"
    assert fim_tokens.infill_order("auto", {"fim": {"rate": 0.5, "spm_rate": 0.5}}) == "spm"  # kdcode trained it, SPM
    assert fim_tokens.infill_order("auto", {"fim": {"rate": 0.5, "spm_rate": 0.1}}) == "psm"
    assert fim_tokens.infill_order("psm", {"fim": {"rate": 0.5, "spm_rate": 1.0}}) == "psm"
    with pytest.raises(KdcodeError, match="unknown FIM order 'mps'"):
        fim_tokens.infill_order("mps", None)
    # a model whose manifest records SPM training is prompted in SPM by the engine and by eval
    folder = tmp_path / "spm_model"
    shutil.copytree(fim_teacher_dir, folder)
    manifest = read_manifest(folder) or {}
    write_json(folder / "kdcode.json", {**manifest, "fim": {"rate": 0.5, "spm_rate": 0.5, "format": "starcoder"}})
    eng = load_engine(str(folder), device="cpu", warm_up=False, verify=False)
    assert eng.fim_order == "spm"
    prefix, suffix = prefix_at(SOURCE, 5), suffix_at(SOURCE, 5)
    got = eng.complete(prefix, 6, suffix=suffix)
    prompt, _ = encode_infill(eng.index, eng.fim, prefix, suffix, eng.n_positions - 6, heal=True, order="spm")
    want = greedy(eng.model, eng.index, [prompt], DecodeOptions(6, heal=False, heal_space=True))
    assert got.choices[0].text == want.texts[0] and got.prompt_tokens == len(prompt.ids)
    assert load_engine(str(folder), device="cpu", warm_up=False, verify=False, fim_order="psm").fim_order == "psm"
    spec = EvalSpec(data={"source": str(corpus_dir)}, task="infill", samples=4, max_new_tokens=4)
    assert run_eval(str(folder), spec, verify=False)["fim"]["order"] == "spm"
    r = run("eval", str(folder), "--task", "infill", "--fim-order", "sideways")
    assert r.exit_code == 2 and "--fim-order: Input should be" in r.output and "Traceback" not in r.output
    r = run("complete", str(folder), "--fim-order", "sideways", "--no-verify", input="x = ")
    assert r.exit_code == 2 and "--fim-order: Input should be 'auto', 'psm' or 'spm'" in r.output
