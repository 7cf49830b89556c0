"""CodeXGLUE-faithful code completion: py150 split files, line sets, the hub layouts, token-level accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run

from kdcode.data.corpus import Document, load_corpus
from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import read_completion_set
from kdcode.evaluation.token_level import _eval_blocks, token_accuracy
from kdcode.spec import DataSpec


# ------------------------------------------------------------------------------ token accuracy
@pytest.fixture(scope="module")
def hand_tokenizer():
    """A byte-level BPE whose sub-tokens are known: 'foo_bar' is three sub-tokens, the rest one each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from kdcode.data.bpe import SPECIAL_TOKENS, wrap

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ["Ġdef", "Ġfoo", "bar", "Ġreturn", "Ġ(", "Ġ)", "Ġ:", "Ġx"]:
        cur = word[0]
        for ch in word[1:]:
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return wrap(tok)


class Oracle(torch.nn.Module):
    """A fake LM that sees its whole input: it predicts the true next token, except after the tokens in
    ``wrong``, where it predicts the mapped token instead."""

    def __init__(self, vocab: int, wrong: dict[int, int] | None = None) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=vocab)
        self.wrong = wrong or {}

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        nxt = torch.roll(x, -1, dims=1)
        for after, pred in self.wrong.items():
            nxt = torch.where(x == after, torch.full_like(x, pred), nxt)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.config.vocab_size).float())


DOC = Document("golden", "<s> def foo_bar ( x ) : <EOL> return x </s>")


def test_hand_tokenizer_pieces(hand_tokenizer):
    ids = hand_tokenizer(DOC.text, add_special_tokens=False)["input_ids"]
    assert hand_tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "Ġdef", "Ġfoo", "_", "bar", "Ġ(", "Ġx", "Ġ)", "Ġ:", "Ġ", "<EOL>", "Ġreturn", "Ġx", "Ġ", "</s>",
    ]


def test_token_accuracy_golden_one_block(hand_tokenizer):
    tok = hand_tokenizer
    ids = tok.convert_tokens_to_ids
    # counted code tokens: def foo_bar ( x ) : return x (8); <s> <EOL> </s> and lone spaces are not counted
    perfect = token_accuracy(Oracle(len(tok)), tok, [DOC], max_blocks=10, block_size=64)
    assert perfect == {"token_accuracy": 100.0, "token_correct": 8, "token_total": 8, "token_blocks": 1}
    # wrong last sub-token of foo_bar ('_' -> 'Ġx' instead of 'bar'): the whole code token is wrong;
    # wrong first token after <EOL> ('Ġx' instead of 'Ġreturn')
    model = Oracle(len(tok), {ids("_"): ids("Ġx"), ids("<EOL>"): ids("Ġx")})
    assert token_accuracy(model, tok, [DOC], 10, 64)["token_accuracy"] == 75.0
    # a wrong <EOL> prediction is not counted: <EOL> is not a code token that counts
    model = Oracle(len(tok), {ids("Ġ:"): ids("Ġx")})
    assert token_accuracy(model, tok, [DOC], 10, 64)["token_accuracy"] == 100.0


def test_token_accuracy_golden_blocks_end_at_code_token_boundaries(hand_tokenizer):
    tok = hand_tokenizer
    ids = tok.convert_tokens_to_ids
    stream = tok(DOC.text, add_special_tokens=False)["input_ids"]
    starts = [p.startswith("Ġ") for p in tok.convert_ids_to_tokens(list(range(len(tok))))]
    boundary = {ids(t) for t in ("<s>", "</s>", "<pad>", "<EOL>")}
    blocks = _eval_blocks(stream, 6, starts, boundary, tok.bos_token_id)
    assert [tok.convert_ids_to_tokens(b) for b in blocks] == [
        ["<s>", "Ġdef", "Ġfoo", "_", "bar"],  # cut before the word-start 'Ġ('
        ["Ġ(", "Ġx", "Ġ)", "Ġ:", "Ġ", "<EOL>"],  # ends at <EOL> (CodeGPT's sep): kept whole
        ["Ġreturn", "Ġx", "Ġ", "</s>"],
    ]
    # the first code token of a block has no context and counts as wrong: '(' and 'return'
    perfect = token_accuracy(Oracle(len(tok)), tok, [DOC], max_blocks=10, block_size=6)
    assert perfect == {"token_accuracy": 75.0, "token_correct": 6, "token_total": 8, "token_blocks": 3}
    model = Oracle(len(tok), {ids("_"): ids("Ġx")})
    assert token_accuracy(model, tok, [DOC], 10, 6)["token_accuracy"] == 62.5
    assert token_accuracy(model, tok, [DOC], 1, 6) == {
        "token_accuracy": 50.0, "token_correct": 1, "token_total": 2, "token_blocks": 1,
    }


def test_token_accuracy_wraps_unwrapped_documents(hand_tokenizer):
    tok = hand_tokenizer
    bare = Document("bare", "def foo_bar ( x ) : <EOL> return x")
    assert token_accuracy(Oracle(len(tok)), tok, [bare], 10, 64) == token_accuracy(
        Oracle(len(tok)), tok, [DOC], 10, 64
    )


# ------------------------------------------------------------------------------ data prepare / lines
def test_data_prepare_writes_codexglue_layout_and_counts_skips(tmp_path: Path, corpus_dir: Path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(corpus_dir.glob("*.py")):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.py").write_text("def f(:\n    x = '''never closed\n")
    out = tmp_path / "py150"
    r = run("data", "prepare", src, "--format", "py150", "--out", out)
    assert r.exit_code == 0, r.output
    assert "train.txt 24" in r.output and "dev.txt 3" in r.output and "test.txt 4" in r.output
    assert "py150_untokenizable 1" in r.output
    for name, n in {"train.txt": 24, "dev.txt": 3, "test.txt": 4}.items():
        lines = (out / name).read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) == n + 1
        assert all(x.startswith("<s> ") and x.endswith(" </s>") for x in lines[:-1])
    # refuses to replace, reads back as the folder's own split without re-normalising
    r = run("data", "prepare", src, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.output
    corpus = load_corpus(DataSpec(source=str(out), format="py150"))
    assert {s: len(d) for s, d in corpus.splits.items()} == {"train": 24, "valid": 3, "test": 4}
    assert corpus.splits["test"][0].text == (out / "test.txt").read_text().split("\n")[0]
    with pytest.raises(KdcodeError, match="--format py150"):
        load_corpus(DataSpec(source=str(out)))
    r = run("data", "prepare", src, "--format", "raw", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "py150" in r.output


@pytest.mark.parametrize("fmt", ["raw", "py150"])
def test_data_lines_writes_line_level_layout(tmp_path: Path, corpus_dir: Path, fmt: str):
    out = tmp_path / "test.jsonl"
    r = run("data", "lines", corpus_dir, "--out", out, "--samples", "7", "--seed", "3", "--format", fmt)
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 7 and all(set(x) == {"id", "input", "gt"} for x in records)
    assert all(x["gt"].strip() and x["input"] for x in records)
    if fmt == "py150":
        assert all(x["input"].startswith("<s> ") and "<EOL>" not in x["gt"] for x in records)
    again = tmp_path / "again.jsonl"
    run("data", "lines", corpus_dir, "--out", again, "--samples", "7", "--seed", "3", "--format", fmt)
    assert again.read_text() == out.read_text()


# ------------------------------------------------------------------------------ CodeXGLUE layouts
LINE_RECORDS = [
    {"id": 0, "input": "<s> import os <EOL> def f ( x ) : <EOL> return", "gt": "x + <NUM_LIT:1>"},
    {"id": 1, "input": "<s> x = <NUM_LIT> <EOL> y =", "gt": "x"},
]
TOKEN_RECORDS = [
    {"id": i, "path": f"repo/{i}.py",
     "code": ["<s>", "import", "os", "<EOL>", "def", f"f{i}", "(", "x", ")", ":", "<EOL>", "return", "x", "</s>"]}
    for i in range(3)
]


def test_read_completion_set_local_layouts(tmp_path: Path):
    jsonl = tmp_path / "test.json"  # CodeXGLUE's line-level test.json is JSON lines
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in LINE_RECORDS))
    samples, docs = read_completion_set(str(jsonl))
    assert docs == [] and [(s.id, s.gt) for s in samples] == [("0", "x + <NUM_LIT:1>"), ("1", "x")]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(LINE_RECORDS))
    assert read_completion_set(str(array))[0] == samples
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text("".join(json.dumps(r) + "\n" for r in TOKEN_RECORDS))
    samples, docs = read_completion_set(str(tokens))
    assert samples == [] and docs[0].text == " ".join(TOKEN_RECORDS[0]["code"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(KdcodeError, match="'input' and 'gt'"):
        read_completion_set(str(bad))
    with pytest.raises(KdcodeError, match="does not exist"):
        read_completion_set(str(tmp_path / "missing.jsonl"))


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        if name.endswith("code_x_glue_cc_code_completion_line"):
            return {"train": LINE_RECORDS}
        if name.endswith("code_x_glue_cc_code_completion_token"):
            return {"train": TOKEN_RECORDS[:1], "test": TOKEN_RECORDS}
        raise FileNotFoundError(name)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_token_level_hub_dataset_as_corpus_is_not_normalised_again(fake_hub):
    corpus = load_corpus(DataSpec(source="code_x_glue_cc_code_completion_token", format="py150"))
    assert fake_hub == [("code_x_glue_cc_code_completion_token", "python")]
    assert {s: len(d) for s, d in corpus.splits.items()} == {"train": 1, "valid": 0, "test": 3}
    assert corpus.splits["test"][2].text == " ".join(TOKEN_RECORDS[2]["code"])


def test_eval_lines_accepts_codexglue_hub_ids(tmp_path: Path, teacher_dir: Path, fake_hub):
    m = tmp_path / "m.json"
    r = run("eval", teacher_dir, "--lines", "code_x_glue_cc_code_completion_line", "--max-new-tokens", "4",
            "--json", m)
    assert r.exit_code == 0, r.output
    assert fake_hub == [("code_x_glue_cc_code_completion_line", "python")]
    result = json.loads(m.read_text())
    assert result["samples"] == 2 and result["decoding"]["format"] == "py150" and result["token_accuracy"] is None

    r = run("eval", teacher_dir, "--lines", "google/code_x_glue_cc_code_completion_token", "--samples", "3",
            "--max-new-tokens", "4", "--ppl-blocks", "1", "--json", m)
    assert r.exit_code == 0, r.output
    assert fake_hub[-1] == ("google/code_x_glue_cc_code_completion_token", "python")
    result = json.loads(m.read_text())
    assert result["samples"] == 3 and result["data"] == {"lines": "google/code_x_glue_cc_code_completion_token",
                                                          "files": 3}
    assert 0 <= result["token_accuracy"] <= 100 and result["token_total"] == 3 * 10  # test split: 3 files
    assert result["baseline"]["samples"] == 3

    r = run("eval", teacher_dir, "--lines", "code_x_glue_cc_code_completion_line:java", "--max-new-tokens", "2")
    assert fake_hub[-1] == ("code_x_glue_cc_code_completion_line", "java")
    r = run("eval", teacher_dir, "--lines", "nobody/nothing", "--max-new-tokens", "2")
    assert r.exit_code == 2 and "download it" in r.output


# ------------------------------------------------------------------------------ end to end, CodeGPT layout
@pytest.fixture(scope="module")
def codegpt_layout_dir(tmp_path_factory, corpus_dir: Path) -> Path:
    """A tiny GPT-2 in a folder laid out as microsoft/CodeGPT-small-py's: vocab.json + merges.txt of a byte-level
    BPE, added_tokens.json with <EOL> after the vocabulary, and the special tokens bos <s>, eos </s>, pad <pad>,
    unk <|UNKNOWN|>, sep <EOL> (special_tokens_map.json, tokenizer_config.json)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("codegpt_layout")
    bpe = ByteLevelBPETokenizer()
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.py"))[:8]]
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<|UNKNOWN|>"],
                            show_progress=False)
    bpe.save_model(str(d))
    base = bpe.get_vocab_size()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<|UNKNOWN|>", "sep_token": "<EOL>",
               "pad_token": "<pad>"}
    (d / "added_tokens.json").write_text(json.dumps({"<EOL>": base}))
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    (d / "tokenizer_config.json").write_text(json.dumps(special))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=base + 1, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<|UNKNOWN|>")
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<EOL>") == tok.sep_token_id == base and len(tok) == base + 1
    return d


def test_prepare_lines_eval_end_to_end_codegpt_layout(tmp_path: Path, corpus_dir: Path, codegpt_layout_dir: Path):
    prepared = tmp_path / "py150"
    r = run("data", "prepare", corpus_dir, "--format", "py150", "--out", prepared)
    assert r.exit_code == 0, r.output
    lines = tmp_path / "test.jsonl"
    r = run("data", "lines", prepared, "--format", "py150", "--out", lines, "--samples", "6", "--seed", "0")
    assert r.exit_code == 0, r.output
    preds = tmp_path / "p.txt"
    m = tmp_path / "m.json"
    r = run("eval", codegpt_layout_dir, "--lines", lines, "--beams", "2", "--max-new-tokens", "6",
            "--predictions", preds, "--json", m)
    assert r.exit_code == 0, r.output
    raw = preds.read_bytes().decode("utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 6
    assert len(raw.splitlines()) == 6  # no line break of any kind inside a prediction
    assert json.loads(m.read_text())["samples"] == 6

    r = run("eval", codegpt_layout_dir, "--data", prepared, "--format", "py150", "--samples", "3",
            "--max-new-tokens", "4", "--ppl-blocks", "1", "--json", m)
    assert r.exit_code == 0, r.output
    result = json.loads(m.read_text())
    assert 0 <= result["token_accuracy"] <= 100 and result["token_total"] > 0 and result["token_blocks"] >= 1
    assert result["perplexity"] > 1


# ------------------------------------------------------------------------------ prompt encoding
@pytest.mark.parametrize("fmt", ["raw", "py150"])
@pytest.mark.parametrize("heal", [True, False])
def test_encode_tokenizes_a_tail_exactly_as_the_whole_prompt(corpus_dir: Path, tokenizer, fmt: str, heal: bool):
    from conftest import make_gpt2

    from kdcode.evaluation.completion_sets import build_line_samples
    from kdcode.inference.decode import DecodeOptions, VocabIndex, encode_prompt

    corpus = load_corpus(DataSpec(source=str(corpus_dir), format=fmt))
    docs = [d for split in corpus.splits.values() for d in split]
    samples = build_line_samples(docs, 60, 0, fmt)
    model = make_gpt2(tokenizer, n_layer=1)
    for context in (8, 40, 100):
        opts = DecodeOptions(max_new_tokens=4, context_tokens=context, heal=heal)
        index = VocabIndex.for_model(model, tokenizer)
        long = 0
        for s in samples:
            full = tokenizer(s.input, add_special_tokens=False)["input_ids"]
            prefix = tokenizer.decode(full[-1:]) if heal and len(full) > 1 and full[-1] not in index.special_ids else ""
            want = (full[:-1] if prefix else full)[-context:]
            got = encode_prompt(index, s.input, opts, opts.context_for(model.config.n_positions))
            assert (list(got.ids), got.healed) == (want, prefix)
            long += len(s.input) > 16 * (context + 33)
        assert long > 10  # the tail path ran
