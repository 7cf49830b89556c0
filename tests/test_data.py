"""Corpus loading (folders, .jsonl, the stdlib), deterministic file-level splits, and tokenisation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdcode.data.corpus import (
    Document,
    encode_documents,
    fingerprint,
    load_corpus,
    split_of,
    to_blocks,
)
from kdcode.errors import KdcodeError
from kdcode.spec import DataSpec


def all_docs(corpus) -> dict[str, str]:
    return {d.key: d.text for docs in corpus.splits.values() for d in docs}


# --- split_of ---------------------------------------------------------------------------------------


def test_split_of_is_deterministic_and_stable() -> None:
    # sha256-based: these literals hold on every machine and every run
    assert split_of("pkg/mod0.py", 0.02, 0.05) == "train"
    assert split_of("pkg/mod13.py", 0.02, 0.05) == "valid"
    assert split_of("pkg/mod25.py", 0.02, 0.05) == "test"
    assert split_of("json/decoder.py", 0.02, 0.05) == "train"
    assert [split_of(f"k{i}", 0.02, 0.05) for i in range(50)] == [split_of(f"k{i}", 0.02, 0.05) for i in range(50)]


def test_split_fractions_roughly_respected() -> None:
    keys = [f"src/pkg{i % 37}/module_{i}.py" for i in range(10_000)]
    counts = Counter(split_of(k, 0.02, 0.05) for k in keys)
    assert set(counts) == {"train", "valid", "test"}
    assert 0.04 <= counts["test"] / len(keys) <= 0.06
    assert 0.013 <= counts["valid"] / len(keys) <= 0.027
    assert 0.91 <= counts["train"] / len(keys) <= 0.95


def test_split_fractions_edge_values() -> None:
    keys = [f"f{i}.py" for i in range(2_000)]
    assert {split_of(k, 0.0, 0.0) for k in keys} == {"train"}
    counts = Counter(split_of(k, 0.3, 0.0) for k in keys)
    assert set(counts) == {"train", "valid"}
    assert 0.25 <= counts["valid"] / len(keys) <= 0.35


def test_test_split_only_grows_with_its_fraction() -> None:
    # a file in test at 5% stays in test at 10%: raising the fraction never moves test files into training
    keys = [f"f{i}.py" for i in range(2_000)]
    small = {k for k in keys if split_of(k, 0.02, 0.05) == "test"}
    large = {k for k in keys if split_of(k, 0.02, 0.10) == "test"}
    assert small and small < large


# --- folder corpora -----------------------------------------------------------------------------------


def test_folder_corpus_splits(corpus_dir: Path) -> None:
    corpus = load_corpus(DataSpec(source=str(corpus_dir)))
    summary = corpus.summary()
    assert summary["files"] == {"train": 24, "valid": 3, "test": 4}
    assert summary["skipped"] == {}
    assert summary["source"] == str(corpus_dir)
    docs = all_docs(corpus)
    assert sorted(docs) == sorted(p.name for p in corpus_dir.glob("*.py"))
    for key, text in docs.items():
        assert text == (corpus_dir / key).read_text(encoding="utf-8")
    for split, split_docs in corpus.splits.items():
        assert all(split_of(d.key, 0.02, 0.05) == split for d in split_docs)
    assert summary["chars"]["test"] == sum(len(d.text) for d in corpus.splits["test"])


def test_folder_corpus_is_reproducible(corpus_dir: Path) -> None:
    a = load_corpus(DataSpec(source=str(corpus_dir)))
    b = load_corpus(DataSpec(source=str(corpus_dir)))
    for split in ("train", "valid", "test"):
        assert fingerprint(a.splits[split]) == fingerprint(b.splits[split])
    assert fingerprint(a.splits["train"]) != fingerprint(a.splits["test"])


def test_folder_corpus_max_files(corpus_dir: Path) -> None:
    corpus = load_corpus(DataSpec(source=str(corpus_dir), max_files=10))
    assert sum(len(d) for d in corpus.splits.values()) == 10
    again = load_corpus(DataSpec(source=str(corpus_dir), max_files=10))
    assert all_docs(corpus).keys() == all_docs(again).keys()


def test_folder_corpus_nested_keys_and_glob(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "deep.py").write_text("x = 1\n")
    (tmp_path / "top.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    (tmp_path / "dir.py").mkdir()  # a folder whose name matches the glob is not a file
    corpus = load_corpus(DataSpec(source=str(tmp_path)))
    assert all_docs(corpus) == {"pkg/sub/deep.py": "x = 1\n", "top.py": "y = 2\n"}
    txt = load_corpus(DataSpec(source=str(tmp_path), glob="*.txt"))
    assert all_docs(txt) == {"notes.txt": "not code\n"}


def test_non_utf8_and_empty_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "empty.py").write_bytes(b"")
    (tmp_path / "blank.py").write_text("  \n\t\n")
    corpus = load_corpus(DataSpec(source=str(tmp_path)))
    assert all_docs(corpus) == {"good.py": "def f():\n    return 1\n"}
    assert corpus.skipped == Counter({"non_utf8": 1, "empty": 2})
    assert corpus.summary()["skipped"] == {"non_utf8": 1, "empty": 2}


def test_folder_without_matching_files_names_the_glob(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("# hi\n")
    with pytest.raises(KdcodeError) as info:
        load_corpus(DataSpec(source=str(tmp_path)))
    message = str(info.value)
    assert "no usable files matching '**/*.py'" in message
    assert str(tmp_path) in message
    with pytest.raises(KdcodeError, match=r"no usable files matching '\*\.pyx'"):
        load_corpus(DataSpec(source=str(tmp_path), glob="*.pyx"))


def test_folder_with_only_unusable_files_says_what_was_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "b.py").write_text("")
    with pytest.raises(KdcodeError, match=r"\(skipped: 1 empty, 1 not UTF-8 text\)"):
        load_corpus(DataSpec(source=str(tmp_path)))


def test_single_file_and_missing_paths(tmp_path: Path) -> None:
    one = tmp_path / "one.py"
    one.write_text("print('hi')\n")
    corpus = load_corpus(DataSpec(source=str(one)))
    assert all_docs(corpus) == {"one.py": "print('hi')\n"}
    empty = tmp_path / "empty.py"
    empty.write_text("")
    with pytest.raises(KdcodeError, match="cannot be used: 1 "):
        load_corpus(DataSpec(source=str(empty)))
    with pytest.raises(KdcodeError, match="does not exist"):
        load_corpus(DataSpec(source=str(tmp_path / "missing")))


# --- .jsonl corpora -----------------------------------------------------------------------------------


def test_jsonl_corpus(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"code": "x = 1\n", "path": "repo/a.py"}),
        json.dumps({"code": "y = 2\n", "id": 7}),
        json.dumps({"code": "z = 3\n"}),
        "{not json",
        json.dumps({"text": "no code field here"}),
        json.dumps({"code": ["def", "f", "(", ")", ":"], "path": "tokens.py"}),
        json.dumps({"code": "   "}),
        json.dumps([1, 2, 3]),
        json.dumps({"code": 42}),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n" + b"\xff\xfe\n")
    corpus = load_corpus(DataSpec(source=str(path)))
    assert all_docs(corpus) == {
        "repo/a.py": "x = 1\n",
        "7": "y = 2\n",
        "data.jsonl:3": "z = 3\n",
        "tokens.py": "def f ( ) :",
    }
    assert corpus.skipped == Counter({"bad_json": 2, "no_code_field": 3, "empty": 1})


def test_jsonl_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "a = 1\n", "code": "ignored"}) + "\n")
    corpus = load_corpus(DataSpec(source=str(path), field="content"))
    assert all_docs(corpus) == {"data.jsonl:1": "a = 1\n"}


def test_jsonl_without_the_field_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(KdcodeError, match="no records with a text field 'code'; set data.field"):
        load_corpus(DataSpec(source=str(path)))


# --- tokenisation ---------------------------------------------------------------------------------------


def test_enormous_single_line_loads_and_tokenizes(tmp_path: Path, tokenizer) -> None:
    text = ("s = '" + "return self.value " * 60_000)[: 1_000_000 - 1] + "'"  # exactly 1 MB, one line
    assert len(text) == 1_000_000 and "\n" not in text
    (tmp_path / "big.py").write_text(text)
    with pytest.raises(KdcodeError, match="1 with a line over 20000 characters"):  # the default limit
        load_corpus(DataSpec(source=str(tmp_path)))
    corpus = load_corpus(DataSpec(source=str(tmp_path), max_line_chars=1_000_000))  # raised on purpose
    assert all_docs(corpus) == {"big.py": text}
    docs = [d for split in corpus.splits.values() for d in split]
    stream = encode_documents(docs, tokenizer)
    assert stream[-1] == tokenizer.eos_token_id
    assert stream.count(tokenizer.eos_token_id) == 1
    assert 50_000 < len(stream) < 1_000_001
    assert tokenizer.decode(stream[:-1]) == text  # byte-level BPE round-trips exactly


def test_encode_documents_appends_eos_after_each_document(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    docs = [Document("a.py", "x = 1\n"), Document("b.py", "def f(): pass"), Document("c.py", "y")]
    ids = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    assert all(ids) and all(eos not in i for i in ids)
    stream = encode_documents(docs, tokenizer)
    assert stream == ids[0] + [eos] + ids[1] + [eos] + ids[2] + [eos]
    assert encode_documents([], tokenizer) == []


def test_encode_documents_across_batches(tokenizer) -> None:
    # more than one batch of 256 documents: every document still gets exactly one eos, in order
    docs = [Document(f"f{i}.py", f"v{i} = {i}\n") for i in range(300)]
    stream = encode_documents(docs, tokenizer)
    eos = tokenizer.eos_token_id
    assert stream.count(eos) == 300
    pieces, cur = [], []
    for t in stream:
        if t == eos:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == []
    assert [tokenizer.decode(p) for p in pieces] == [d.text for d in docs]


def test_to_blocks_shape_and_tail() -> None:
    blocks = to_blocks(list(range(27)), 8)
    assert blocks.shape == (3, 8)
    assert blocks.dtype == torch.long
    assert blocks[0].tolist() == list(range(8))
    assert blocks[2].tolist() == list(range(16, 24))  # the ragged tail 24..26 is dropped
    assert to_blocks(list(range(16)), 8).shape == (2, 8)
    assert to_blocks(list(range(8)), 8).shape == (1, 8)


def test_to_blocks_too_few_tokens() -> None:
    with pytest.raises(KdcodeError, match="the data holds 7 tokens, fewer than one block of 8"):
        to_blocks(list(range(7)), 8)
    with pytest.raises(KdcodeError, match="holds 0 tokens"):
        to_blocks([], 8)


# --- the stdlib corpus --------------------------------------------------------------------------------


@pytest.mark.slow
def test_stdlib_corpus_excludes_site_packages_and_tests() -> None:
    corpus = load_corpus(DataSpec())
    keys = all_docs(corpus).keys()
    assert corpus.source == "stdlib"
    assert "json/decoder.py" in keys
    assert "json/decoder.py" in {d.key for d in corpus.splits["train"]}
    assert len(keys) > 300
    assert all(sum(1 for _ in corpus.splits[s]) > 0 for s in ("train", "valid", "test"))
    assert not any(k.startswith("site-packages/") for k in keys)
    assert not any(k.startswith(("test/", "tests/", "idle_test/")) for k in keys)
    assert not any(part in k for k in keys for part in ("/test/", "/tests/", "/idle_test/"))


def test_inputs_are_read_with_bounded_memory(tmp_path):
    """A file over data.max_file_bytes is skipped before it is read; a .jsonl record over it is skipped a bounded
    chunk at a time; both are counted like non-UTF-8 files."""
    from kdcode.spec import DataSpec

    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "ok.py").write_text("def f():\n    return 1\n")
    (folder / "big.py").write_text("x = 1\n" * 200_000)  # 1.2 MB
    corpus = load_corpus(DataSpec(source=str(folder), max_file_bytes=2**20, test_fraction=0, valid_fraction=0))
    assert [d.key for d in corpus.splits["train"]] == ["ok.py"]
    assert dict(corpus.skipped) == {"over_max_file_bytes": 1}

    jsonl = tmp_path / "data.jsonl"
    with jsonl.open("w") as fh:
        fh.write('{"code": "a = 1"}\n')
        fh.write('{"code": "' + "b" * 3_000_000 + '"}\n')  # one 3 MB record
        fh.write('{"code": "c = 3"}\n')
    corpus = load_corpus(DataSpec(source=str(jsonl), max_file_bytes=2**20, test_fraction=0, valid_fraction=0))
    assert sorted(d.text for d in corpus.splits["train"]) == ["a = 1", "c = 3"]
    assert dict(corpus.skipped) == {"over_max_file_bytes": 1}


def test_max_files_keeps_every_split(tmp_path):
    """A subset by max_files is drawn independently of the split (it used to keep only test files)."""
    for i in range(400):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    corpus = load_corpus(DataSpec(source=str(tmp_path), max_files=100))
    sizes = {k: len(v) for k, v in corpus.splits.items()}
    assert sum(sizes.values()) == 100 and sizes["train"] > 80 and sizes["test"] < 15
