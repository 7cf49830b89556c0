"""Shared fixtures: a tiny corpus of real stdlib files, a BPE tokenizer trained on it, and tiny
random-init GPT-2 teachers saved as kdcode-free Hugging Face folders. Nothing touches the hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KDCODE_DISABLE_PLUGINS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic

from typer.testing import CliRunner, Result  # noqa: E402

from kdcode.data.corpus import split_of, stdlib_root  # noqa: E402

# One runner for every CLI test: rich output 200 columns wide (no wrapping inside a message) and no colour.
runner = CliRunner(env={"COLUMNS": "200", "TERM": "dumb"})


def run(*args: object, input: str | None = None, **kwargs) -> Result:
    """``kdcode ARGS...`` in this process (each argument str()-ed): the result's exit code and output."""
    from kdcode.cli import app

    return runner.invoke(app, [str(a) for a in args], input=input, **kwargs)

CORPUS_WANT = {"train": 24, "valid": 3, "test": 4}


def _pick_stdlib_files() -> list[Path]:
    """Small real stdlib modules, chosen so that every split of the default fractions gets files."""
    root = stdlib_root()
    got = {k: 0 for k in CORPUS_WANT}
    picked = []
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if not 2_000 <= size <= 25_000:
            continue
        split = split_of(path.name, 0.02, 0.05)
        if got[split] < CORPUS_WANT[split]:
            got[split] += 1
            picked.append(path)
        if got == CORPUS_WANT:
            break
    assert got == CORPUS_WANT, f"not enough small stdlib files for the test corpus: {got}"
    return picked


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for p in _pick_stdlib_files():
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="session")
def tokenizer(corpus_dir: Path):
    from kdcode.data.bpe import train_bpe

    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.py"))]
    return train_bpe(texts, vocab_size=512)


def make_gpt2(tokenizer, n_layer: int = 4, n_embd: int = 32, n_head: int = 2, n_positions: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A plain Hugging Face folder (no kdcode manifest): 4-layer random GPT-2 + the tiny tokenizer."""
    d = tmp_path_factory.mktemp("teacher")
    make_gpt2(tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def student_src(tmp_path_factory, tokenizer) -> Path:
    """A kdcode student folder (manifest with sha256), made once; tests that damage it use a copy."""
    out = tmp_path_factory.mktemp("students") / "student"
    from kdcode.models.artifacts import save_model

    return save_model(out, make_gpt2(tokenizer, n_layer=2, seed=1), tokenizer, {"kind": "student"})


@pytest.fixture()
def student(student_src, tmp_path) -> Path:
    dst = tmp_path / "student"
    shutil.copytree(student_src, dst)
    return dst


def make_fim_model(folder: Path, base_dir: Path, seed: int = 0, n_layer: int = 4) -> Path:
    """A plain Hugging Face folder: the tiny tokenizer of ``base_dir`` with StarCoder's FIM tokens added, and a
    random GPT-2 whose embeddings have rows for them."""
    from transformers import AutoTokenizer

    from kdcode.data.fim import ensure_tokens

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = make_gpt2(tok, n_layer=n_layer, seed=seed)
    ensure_tokens(tok, model, None)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fim_teacher_dir(tmp_path_factory: pytest.TempPathFactory, teacher_dir) -> Path:
    """The tiny teacher's shape and tokenizer, with FIM tokens (StarCoder's names): a model that 'infills'."""
    return make_fim_model(tmp_path_factory.mktemp("fim_teacher"), teacher_dir)
