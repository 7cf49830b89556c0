"""Fill-in-the-middle: the token formats of four families detected from tiny tokenizers built here, the training
transform (round trips, lengths, seeding, teacher cache = live teacher), FIM tokens added when missing, and
pretrain/distil carrying FIM on through the manifests."""

from __future__ import annotations

import json
import random

import pytest
from conftest import run
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcode.data import fim
from kdcode.data.corpus import encode_documents, load_corpus, split_blocks, train_blocks
from kdcode.errors import KdcodeError
from kdcode.inference.infill import split_prompt
from kdcode.models import fim_tokens
from kdcode.spec import DataSpec, FimSpec

SOURCE = (
    "import os\n\n\ndef main(argv):\n    path = os.path.join(argv[0], 'x')\n"
    "    if not path:\n        return None\n    return path\n"
)
FAMILIES = {
    "starcoder": ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|endoftext|>", "<file_sep>"],
    "qwen": ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|endoftext|>",
             "<|repo_name|>", "<|file_sep|>", "<|im_start|>"],
    # CodeLlama's vocabulary spells its sentinels with SentencePiece's space mark
    "codellama": ["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>", "<s>", "</s>"],
    "deepseek": ["<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>",
                 "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"],
}


def family_tokenizer(specials: list[str], eos: str | None = None):
    """A tiny byte-level BPE trained here on a few lines of code, with a family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SOURCE] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos or specials[-1],
                                   additional_special_tokens=specials)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_detected_from_its_special_tokens(family):
    tok = family_tokenizer(FAMILIES[family])
    found = fim_tokens.detect(tok)
    assert found is not None and found.name == family
    vocab = tok.get_vocab()
    assert [found.prefix_id, found.suffix_id, found.middle_id] == [vocab[found.prefix], vocab[found.suffix],
                                                                   vocab[found.middle]]
    assert {found.prefix_id, found.suffix_id, found.middle_id, tok.eos_token_id} <= found.stop_ids
    if family == "codellama":
        assert found.prefix == "\u2581<PRE>" and vocab["\u2581<EOT>"] in found.stop_ids
    others = [f for f in FAMILIES if f != family]
    assert all(fim_tokens.find_tokens(tok, other) is None for other in others)
    assert fim_tokens.resolve(tok, family) == found


def test_a_tokenizer_without_fim_tokens(tokenizer):
    assert fim_tokens.detect(tokenizer) is None
    with pytest.raises(KdcodeError) as info:
        fim_tokens.require(tokenizer, None, "model x")
    assert "model x does not infill" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(KdcodeError, match="unknown FIM format 'fancy'; use one of starcoder, qwen"):
        fim_tokens.resolve(tokenizer, "fancy")


@pytest.mark.parametrize("name", [None, "qwen"])
def test_missing_fim_tokens_are_added_and_the_embeddings_resized(teacher_dir, name):
    from conftest import make_gpt2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = make_gpt2(tok, n_layer=1)
    before = model.get_input_embeddings().weight.detach().clone()
    tokens, added = fim.ensure_tokens(tok, model, name)
    n = len(before)
    assert tokens.name == (name or "starcoder") and len(tok) == n + 3 == model.config.vocab_size
    assert added["added_tokens"] == {tokens.prefix: n, tokens.suffix: n + 1, tokens.middle: n + 2}
    assert added["vocab_size"] == [n, n + 3] and added["embedding_rows"] == [n, n + 3]
    weight = model.get_input_embeddings().weight
    assert (weight[:n] == before).all() and (weight[n:] == before.mean(0)).all()
    assert model.lm_head.weight.data_ptr() == weight.data_ptr()  # still tied
    assert tok(f"x{tokens.middle}y", add_special_tokens=False)["input_ids"][1] == n + 2
    again, added2 = fim.ensure_tokens(tok, model, name)  # idempotent
    assert again == tokens and added2["added_tokens"] == {} and len(tok) == n + 3


# ------------------------------------------------------------------------------------------ the transform
code_text = st.text(st.sampled_from(list("abc xyz_():=\n    \t#'\"0123") + ["\u00e9", "\U0001f600"]), max_size=80)


@settings(max_examples=150, deadline=None)
@given(text=code_text, seed=st.integers(0, 2**32), mode=st.sampled_from(["document", "line"]),
       family=st.sampled_from(list(fim_tokens.FORMATS)), spm=st.booleans())
def test_text_round_trip(text, seed, mode, family, spm):
    """Un-permuting gives the document back, whatever the split, order and family."""
    a, b = fim.split_points(text, random.Random(seed), mode)
    assert 0 <= a <= b <= len(text)
    if mode == "line" and text.strip():
        middle = text[a:b]
        assert middle.strip() and "\n" not in middle and (a == 0 or text[a - 1] == "\n")
        assert b == len(text) or text[b] in "\n\r"
    fmt = fim_tokens.FORMATS[family]
    rendered = fim.render(text[:a], text[a:b], text[b:], fmt, spm)
    assert fim.unrender(rendered, fmt) == text


def test_split_points_do_not_cut_special_tokens():
    import re

    text = "a <EOL> b <EOL> c" * 5
    protect = re.compile(re.escape("<EOL>"))
    for seed in range(200):
        a, b = fim.split_points(text, random.Random(seed), "document", protect)
        for m in protect.finditer(text):
            assert not m.start() < a < m.end() and not m.start() < b < m.end()


@pytest.fixture(scope="module")
def fim_tok(fim_teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fim_teacher_dir)


def test_piece_round_trip_keeps_length_and_the_middle(fim_tok, corpus_dir):
    """A rearranged piece is as long as it was; un-permuted and decoded it is a stretch of the original code that
    holds the whole middle (the three FIM tokens take the place of the suffix's end, then the prefix's start);
    with nothing cut, un-permuting gives the piece's text back exactly."""
    tokens = fim_tokens.resolve(fim_tok, None)
    text = sorted(corpus_dir.glob("*.py"))[0].read_text(encoding="utf-8")
    ids = fim_tok(text, add_special_tokens=False)["input_ids"]
    eos = fim_tok.eos_token_id
    for mode in ("document", "line"):
        t = fim.Transform(FimSpec(rate=1.0, mode=mode), tokens, fim_tok)
        for seed in range(30):
            piece = ids[seed * 7 : seed * 7 + 120]
            whole = fim_tok.decode(piece)
            out = t.piece(piece, random.Random(seed))
            assert len(out) == len(piece) and out[0] == tokens.prefix_id and tokens.middle_id in out
            middle = fim_tok.decode([i for i in out[out.index(tokens.middle_id) + 1 :] if i != eos])
            if out[1] != tokens.suffix_id:  # PSM: only the middle follows the middle token
                assert middle in whole and (mode != "line" or "\n" not in middle.strip())
            decoded = fim_tok.decode([i for i in fim.unpermute(out, tokens) if i != eos])
            assert decoded in whole and (out[1] == tokens.suffix_id or middle in decoded), (mode, seed)
            # the same split, nothing cut: the exact text again, in either order
            a, b = fim.split_points(whole, random.Random(seed), mode)
            parts = [fim_tok(x, add_special_tokens=False)["input_ids"] for x in (whole[:a], whole[a:b], whole[b:])]
            psm = [tokens.prefix_id, *parts[0], tokens.suffix_id, *parts[2], tokens.middle_id, *parts[1]]
            spm = [tokens.prefix_id, tokens.suffix_id, *parts[2], tokens.middle_id, *parts[0], *parts[1]]
            for seq in (psm, spm):
                assert fim_tok.decode(fim.unpermute(seq, tokens)) == whole


@pytest.mark.slow
def test_blocks_are_seeded_by_block_alone_and_rate_zero_is_off(fim_tok, corpus_dir):
    tokens = fim_tokens.resolve(fim_tok, None)
    corpus = load_corpus(DataSpec(source=str(corpus_dir)))
    stream = encode_documents(corpus.splits["train"], fim_tok)
    t = fim.Transform(FimSpec(rate=0.5, seed=3), tokens, fim_tok)
    a, b = t.stream(stream, 64), t.stream(stream, 64)
    assert a == b and len(a) == len(stream) // 64 * 64
    blocks = [a[i : i + 64] for i in range(0, len(a), 64)]
    assert 0.2 < sum(tokens.middle_id in blk for blk in blocks) / len(blocks) < 0.9
    # block i depends on (seed, i) only: the same block alone gives the same result
    assert t.block(stream[64:128], fim.block_rng(3, 1)) == blocks[1]
    assert fim.Transform(FimSpec(rate=0.5, seed=4), tokens, fim_tok).stream(stream, 64) != a
    assert fim.Transform(FimSpec(rate=0.0), tokens, fim_tok).stream(stream, 64) == stream[: len(a)]
    assert fim.prepare(FimSpec(rate=0.0), fim_tok, None) == (None, None) and fim.prepare(None, fim_tok, None)[0] is None
    plain = split_blocks(corpus, fim_tok, 64)
    with_fim = split_blocks(corpus, fim_tok, 64, t)
    assert (plain[1] == with_fim[1]).all()  # validation blocks stay plain
    assert (with_fim[0].flatten() == train_blocks(corpus, fim_tok, 64, t).flatten()).all()


def test_split_prompt_reads_client_templates(fim_tok):
    tokens = fim_tokens.resolve(fim_tok, None)
    fmt = tokens.format
    assert split_prompt(fmt.template("def f(", "):\n"), tokens) == ("def f(", "):\n")
    assert split_prompt("<file_sep>other" + fmt.template("a", "b") + "mid", tokens) == ("amid", "b")
    assert split_prompt(f"{fmt.prefix}{fmt.suffix}SUF{fmt.middle}PRE", tokens) == ("PRE", "SUF")  # SPM
    assert split_prompt("def f(x):", tokens) is None
    assert split_prompt(f"{fmt.prefix}a{fmt.suffix}b", tokens) is None  # no middle token: not a template
    llama = fim_tokens.FORMATS["codellama"]
    assert llama.template() == "<PRE> {prefix} <SUF>{suffix} <MID>"
    cl = fim_tokens.FimTokens(llama, "<PRE>", "<SUF>", "<MID>", 1, 2, 3, frozenset())
    assert split_prompt(llama.template("x = ", "\n"), cl) == ("x = ", "\n")


def test_effective_fim_follows_the_teacher_unless_told():
    section = {**FimSpec(rate=0.3, mode="line").model_dump(), "format": "starcoder", "tokens": {}}
    assert fim.effective(None, {"fim": section}) == FimSpec(rate=0.3, mode="line", format="starcoder")
    assert fim.effective(FimSpec(rate=0.0), {"fim": section}) is None  # rate 0: off
    assert fim.effective(None, {}) is None and fim.effective(None, None) is None
    assert fim.effective(FimSpec(rate=0.7), None) == FimSpec(rate=0.7)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_teacher_cache_and_live_teacher_see_the_same_blocks(tmp_path, fim_teacher_dir, corpus_dir):
    from transformers import AutoTokenizer

    from kdcode.models.load import load_model
    from kdcode.train.distil import cache_key, run_cache_teacher
    from kdcode.train.teacher_cache import check_cache, load_cache

    data = DataSpec(source=str(corpus_dir), fim=FimSpec(rate=0.5, seed=1))
    run_cache_teacher(str(fim_teacher_dir), data, 32, 4, 2.0, tmp_path / "cache")
    cache = load_cache(tmp_path / "cache")
    assert cache.manifest["fim"] == {**data.fim.model_dump(), "format": "starcoder"}
    teacher = load_model(str(fim_teacher_dir))
    transform, _ = fim.prepare(data.fim, teacher.tokenizer, teacher.model)
    corpus = load_corpus(data)
    live = train_blocks(corpus, AutoTokenizer.from_pretrained(fim_teacher_dir), 32, transform)
    assert (cache.input_ids == live).all()
    check_cache(cache, cache_key(teacher, corpus, "raw", 32, transform), tmp_path / "cache")
    with pytest.raises(KdcodeError, match="another FIM transform"):
        check_cache(cache, cache_key(teacher, corpus, "raw", 32, None), tmp_path / "cache")


@pytest.mark.slow
def test_pretrain_adds_fim_tokens_and_distil_carries_fim_on(tmp_path, teacher_dir, corpus_dir):
    """A stage trained with --fim-rate: FIM tokens added, embeddings resized, all recorded with the lineage; the
    next stage and a default distil from it go on with FIM (their students infill)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "fim_stage"
    common = ["--data", str(corpus_dir), "--block-size", "32", "--max-steps", "2", "--warmup-steps", "0",
              "--batch-size", "4", "--precision", "fp32", "--eval-every", "1"]
    r = run("pretrain", "--init", str(teacher_dir), "--fim-rate", "0.5", "--fim-mode", "line",
            *common, "--out", str(out))
    assert r.exit_code == 0, r.output
    n = len(AutoTokenizer.from_pretrained(teacher_dir))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == n + 3 == AutoModelForCausalLM.from_pretrained(out).config.vocab_size
    m = json.loads((out / "kdcode.json").read_text())
    assert m["fim"]["rate"] == 0.5 and m["fim"]["mode"] == "line" and m["fim"]["format"] == "starcoder"
    assert m["fim"]["added_tokens"] == {"<fim_prefix>": n, "<fim_suffix>": n + 1, "<fim_middle>": n + 2}
    assert m["fim"]["embedding_rows"] == [n, n + 3] and m["fim"]["tokens"]["<fim_middle>"] == n + 2
    assert m["init"]["from"] == str(teacher_dir) and m["init"]["fim"] is None
    assert m["spec"]["data"]["fim"]["rate"] == 0.5

    more = tmp_path / "more"
    r = run("pretrain", "--init", str(out), *common, "--out", str(more))
    assert r.exit_code == 0, r.output
    m2 = json.loads((more / "kdcode.json").read_text())
    assert m2["fim"]["rate"] == 0.5 and m2["fim"]["mode"] == "line" and m2["fim"]["added_tokens"] == {}
    assert m2["init"]["fim"]["rate"] == 0.5 and m2["spec"]["data"]["fim"] is None

    student = tmp_path / "student"
    r = run("distil", "--teacher", str(more), "--layers", "1", "--data", str(corpus_dir),
            "--max-steps", "2", "--batch-size", "4", "--block-size", "32", "--precision", "fp32",
            "--out", str(student))
    assert r.exit_code == 0, r.output
    s = json.loads((student / "kdcode.json").read_text())
    assert s["fim"]["rate"] == 0.5 and s["fim"]["mode"] == "line"
    assert fim_tokens.detect(AutoTokenizer.from_pretrained(student)).middle_id == n + 2
    off = tmp_path / "off"
    r = run("distil", "--teacher", str(more), "--layers", "1", "--data", str(corpus_dir),
            "--max-steps", "1", "--batch-size", "4", "--block-size", "32", "--precision", "fp32",
            "--fim-rate", "0", "--out", str(off))
    assert r.exit_code == 0, r.output
    assert json.loads((off / "kdcode.json").read_text())["fim"] is None
