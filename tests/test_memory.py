"""Memory at real size (issue 18.6). The fused KD loss, chunked along the sequence, gives the unchunked values
and gradients bit for bit, allocates nothing vocabulary-sized (a model's logits become their own gradient), and
reads the tokenizer's columns only (LM-head padding is in no softmax and gets no gradient). The frozen teacher
can be held in bf16/fp16 while the student starts from its weights as stored and trains in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, run
from torch.utils._python_dispatch import TorchDispatchMode

from kdcode.errors import KdcodeError
from kdcode.strategies.divergences import forward_kl
from kdcode.strategies.fused import chunk_positions, dense_kd_terms, sparse_kd_terms
from kdcode.strategies.losses import causal_ce

B, T, V = 3, 17, 50


def _inputs(seed: int = 0, pad_s: int = 0, pad_t: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(B, T, V + pad_s, generator=g)
    t = 3 * torch.randn(B, T, V + pad_t, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    return s, t, labels


def _run(fn, s0: torch.Tensor, weight: float = 0.3, model_output: bool = False):
    leaf = s0.clone().requires_grad_(True)
    s = leaf.clone() if model_output else leaf  # a model's logits are not a leaf: their gradient is written over them
    soft, hard = fn(s)
    (weight * soft + (1 - weight) * hard).backward()
    return soft.detach(), hard.detach(), leaf.grad


def _sparse(t: torch.Tensor, temp: float, k: int = 6):
    top = t.topk(k, dim=-1)
    return top.values.half(), top.indices.to(torch.int16), torch.logsumexp(t / temp, -1)


@pytest.mark.parametrize("temp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize(("chunk", "model_output"), [(1, False), (4, True), (7, False), (None, True)])
def test_chunked_equals_unchunked_bit_for_bit(temp, chunk, model_output):
    s0, t, labels = _inputs()
    dense = [_run(lambda s, c=c: dense_kd_terms(s, t, labels, temp, chunk=c), s0, model_output=m)
             for c, m in ((0, False), (chunk, model_output))]
    top = _sparse(t, temp)
    sparse = [_run(lambda s, c=c: sparse_kd_terms(s, *top, labels, temp, chunk=c), s0, model_output=m)
              for c, m in ((0, False), (chunk, model_output))]
    for whole, chunked in (dense, sparse):
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    # and the unchunked pass is the autograd reference
    ref = _run(lambda s: (forward_kl(s, t, labels, temp), causal_ce(s, labels)), s0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(dense[0], ref))


def test_chunked_bf16_logits_give_bf16_gradients_equal_to_unchunked():
    s0, t, labels = _inputs(1)
    runs = [_run(lambda s, c=c: dense_kd_terms(s, t.bfloat16(), labels, 2.0, chunk=c), s0.bfloat16(), model_output=True)
            for c in (0, 5)]
    assert runs[0][2].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(("chunk", "model_output"), [(0, False), (4, False), (4, True)])
def test_padding_columns_are_in_no_softmax_and_get_no_gradient(chunk, model_output):
    # a student head padded by 9 rows and a teacher's by 3, over one tokenizer of V tokens
    s0, t, labels = _inputs(2, pad_s=9, pad_t=3)
    s0[..., V:] = 40.0  # padding that would dominate any softmax it took part in
    soft, hard, grad = _run(lambda s: dense_kd_terms(s, t, labels, 2.0, vocab=V, chunk=chunk), s0, 0.3, model_output)
    ref = _run(lambda s: (forward_kl(s, t[..., :V], labels, 2.0), causal_ce(s, labels)), s0[..., :V].contiguous())
    assert torch.allclose(soft, ref[0], atol=1e-6) and torch.allclose(hard, ref[1], atol=1e-6)
    assert torch.allclose(grad[..., :V], ref[2], atol=1e-6)
    assert grad[..., V:].abs().sum() == 0
    top = _sparse(t[..., :V], 2.0)
    sparse = _run(lambda s: sparse_kd_terms(s, *top, labels, 2.0, vocab=V, chunk=chunk), s0, 0.3, model_output)
    unpadded = _run(lambda s: sparse_kd_terms(s, *top, labels, 2.0), s0[..., :V].contiguous())
    assert torch.allclose(sparse[0], unpadded[0]) and torch.allclose(sparse[2][..., :V], unpadded[2])
    assert sparse[2][..., V:].abs().sum() == 0


def test_widths_that_do_not_cover_the_tokenizer_are_one_clear_line():
    s, t, labels = _inputs(3, pad_t=2)
    with pytest.raises(KdcodeError, match="give the tokenizer's length"):
        dense_kd_terms(s, t, labels, 2.0)  # widths differ and nobody said which columns are tokens
    with pytest.raises(KdcodeError, match="fewer than the tokenizer's 60 tokens"):
        dense_kd_terms(s, t, labels, 2.0, vocab=60)


class _Allocations(TorchDispatchMode):
    """The element counts of every tensor an op creates (views and in-place results are not new memory)."""

    def __init__(self, when=None) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []
        self.made: list[tuple[str, int, int]] = []  # the same, with each element's size in bytes
        self.when = when  # counts only while when() is true (None: always)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.when is not None and not self.when():
            return out
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), o.numel()))
                self.made.append((str(func), o.numel(), o.element_size()))
        return out


def _allocations(
    chunk: int | None, sparse: bool, model_output: bool, reverse: bool = False
) -> tuple[list[tuple[str, int]], bool]:
    """Every allocation of the loss's forward and backward, and whether the gradient took the logits' memory."""
    s0, t, labels = _inputs(4)
    leaf = s0.clone().requires_grad_(True)
    s = leaf.clone() if model_output else leaf
    top = _sparse(t, 2.0)
    with _Allocations() as seen:
        if sparse:
            soft, hard = sparse_kd_terms(s, *top, labels, 2.0, chunk=chunk, reverse=reverse)
        else:
            soft, hard = dense_kd_terms(s, t, labels, 2.0, chunk=chunk, reverse=reverse)
        (grad,) = torch.autograd.grad(soft + hard, s)
    return seen.sizes, grad.data_ptr() == s.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunks_allocate_nothing_vocabulary_sized(sparse, reverse):
    whole, in_place = _allocations(0, sparse, model_output=True, reverse=reverse)
    assert len([n for _, n in whole if n >= B * (T - 1) * V]) >= 4 and not in_place  # the float copy, softmaxes...
    chunk = 4
    big, in_place = _allocations(chunk, sparse, model_output=True, reverse=reverse)
    assert [(f, n) for f, n in big if n > B * chunk * V] == [] and in_place  # a model's logits become their gradient
    # a leaf is left as it is: one new gradient
    big, in_place = _allocations(chunk, sparse, model_output=False, reverse=reverse)
    assert [n for _, n in big if n > B * chunk * V] == [B * T * V] and not in_place


def test_automatic_chunks_are_about_32_mb_of_float32():
    assert chunk_positions(4, 511, 50001, None) == 41  # 4 x 41 x 50001 floats ~ 32 MB
    assert chunk_positions(4, 63, 512, None) >= 63  # tiny vocabularies: one chunk, as before chunking
    assert chunk_positions(4, 63, 512, 0) == 63 and chunk_positions(4, 63, 512, 5) == 5


# ------------------------------------------------------------------------------------ teacher dtype
FAST = ["--layers", "2", "--max-steps", "1", "--batch-size", "2", "--block-size", "32", "--precision", "fp32"]


def _captured_run(monkeypatch, tmp_path, teacher_dir, corpus_dir, *flags):
    """Run `kdcode distil` with the training loop replaced by a recorder of what it would have trained."""
    import kdcode.train.distil as distil

    seen = {}

    def fake_loop(student, strategy, *args, teacher=None, **kwargs):
        seen.update(student=student, teacher=teacher, vocab=kwargs["vocab"], strategy=strategy)
        raise KdcodeError("stopped before training")

    monkeypatch.setattr(distil, "train_loop", fake_loop)
    r = run("distil", "--teacher", str(teacher_dir), "--data", str(corpus_dir), *FAST,
            "--out", str(tmp_path / "s"), *flags)
    assert "stopped before training" in r.output, r.output
    return seen


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_teacher_held_in_half_precision_student_copied_from_its_stored_weights(
    monkeypatch, tmp_path, teacher_dir, corpus_dir, dtype
):
    from transformers import AutoModelForCausalLM

    seen = _captured_run(monkeypatch, tmp_path, teacher_dir, corpus_dir, "--teacher-dtype", dtype, "--init", "spread")
    assert seen["teacher"].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    stored = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = seen["student"]
    assert student.dtype == torch.float32
    for i, j in enumerate([0, 3]):  # spread 4 -> 2: the float32 blocks, not their bf16 roundings
        a, b = student.transformer.h[i].state_dict(), stored.transformer.h[j].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert seen["vocab"] == stored.config.vocab_size


def test_teacher_stored_in_bf16_gives_a_float32_student(monkeypatch, tmp_path, tokenizer, corpus_dir):
    folder = tmp_path / "bf16_teacher"
    make_gpt2(tokenizer).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    seen = _captured_run(monkeypatch, tmp_path, folder, corpus_dir)
    assert seen["teacher"].dtype == torch.bfloat16 and seen["student"].dtype == torch.float32
    seen = _captured_run(monkeypatch, tmp_path, folder, corpus_dir, "--strategy", "in-training")
    assert seen["teacher"].dtype == torch.float32  # a teacher that trains keeps float32 weights


def test_half_precision_teacher_that_trains_is_refused_before_loading(tmp_path, corpus_dir):
    r = run("distil", "--teacher", str(tmp_path / "nowhere"), "--strategy", "in-training",
            "--teacher-dtype", "bf16", "--data", str(corpus_dir), *FAST, "--out", str(tmp_path / "s"))
    assert r.exit_code == 2, r.output
    assert "trains the teacher, which keeps float32 weights; drop teacher.dtype bf16" in r.output
    r = run("distil", "--teacher-dtype", "int4", "--print-spec")
    assert r.exit_code == 2 and "teacher.dtype" in r.output


@pytest.mark.slow
def test_a_bf16_teacher_and_small_chunks_keep_the_losses_and_allocate_less(monkeypatch, tmp_path, teacher_dir,
                                                                           corpus_dir):
    """The same 1-step run with a float32 teacher and the loss in one pass, then a bf16 teacher and 5-position
    chunks: the logged losses agree within 2e-3 (chunks change no bit; bf16 rounds the teacher's logits to 8 bits
    of mantissa) and the training steps allocate fewer vocabulary-sized bytes (every tensor of at least
    batch x (block - 1) x vocab elements an op creates while the student is in train mode, counted by a dispatch
    mode: a deterministic proxy of peak memory, where RSS and time are not)."""
    import json

    import kdcode.train.distil as distil

    real, big = distil.train_loop, []  # per run: vocabulary-sized bytes, and how many such float32 tensors

    def counted(student, strategy, blocks, *args, vocab=None, **kwargs):
        with _Allocations(when=lambda: student.training) as seen:  # the training steps, not the validation
            result = real(student, strategy, blocks, *args, vocab=vocab, **kwargs)
        least = 2 * (blocks.size(1) - 1) * vocab  # --batch-size 2
        made = [(n, size) for _, n, size in seen.made if n >= least]
        big.append((sum(n * size for n, size in made), sum(size == 4 for _, size in made)))
        return result

    monkeypatch.setattr(distil, "train_loop", counted)
    logs = {}
    for name, flags in (("plain", ["--loss-chunk", "0"]), ("lean", ["--teacher-dtype", "bf16", "--loss-chunk", "5"])):
        out = tmp_path / name
        r = run("distil", "--teacher", teacher_dir, "--data", corpus_dir, *FAST, "--out", out, *flags)
        assert r.exit_code == 0, r.output
        logs[name] = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    spec = json.loads((tmp_path / "lean" / "kdcode.json").read_text())["spec"]
    assert spec["teacher"]["dtype"] == "bf16" and spec["train"]["loss_chunk"] == 5
    assert len(logs["lean"]) == 1 and logs["lean"] == pytest.approx(logs["plain"], abs=2e-3)
    (plain, _), (lean, lean_f32) = big
    assert 0 < lean < 0.5 * plain, big  # the loss pass's float32 copies, softmaxes and gradient are gone
    assert lean_f32 == 1, big  # the student's logits alone: they become their own gradient


# ------------------------------------------------------------------------------------ activation checkpointing
@pytest.mark.slow
def test_activation_checkpointing_trains_the_same_student(tmp_path, teacher_dir, corpus_dir):
    from safetensors.torch import load_file

    weights = []
    for flag in ([], ["--activation-checkpointing"]):
        out = tmp_path / f"s{len(flag)}"
        r = run("distil", "--teacher", str(teacher_dir), "--data", str(corpus_dir), *FAST,
                "--max-steps", "3", "--loss-chunk", "7", "--out", str(out), *flag)
        assert r.exit_code == 0, r.output
        weights.append(load_file(str(out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_activation_checkpointing_on_and_off_and_refused_where_missing(tokenizer):
    from kdcode.train.resources import recompute_activations

    model = make_gpt2(tokenizer).train()
    recompute_activations(model, True)
    assert model.is_activation_checkpointing
    recompute_activations(model, False)
    assert not model.is_activation_checkpointing  # the saved student carries nothing of it
    with pytest.raises(KdcodeError, match="cannot recompute its activations"):
        recompute_activations(torch.nn.Linear(2, 2), True)
