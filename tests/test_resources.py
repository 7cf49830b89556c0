"""Resource guards: block size against the model's positions, one step's memory against what is free."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_gpt2

import kdcode.train.heap
import kdcode.train.resources
from kdcode.errors import KdcodeError
from kdcode.train.resources import (
    ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER,
    available_memory,
    check_block_size,
    check_memory,
    estimate_step_bytes,
)

CPU = torch.device("cpu")


def test_block_size_within_positions_passes(tokenizer):
    model = make_gpt2(tokenizer, n_layer=1, n_positions=64)
    check_block_size(model, 64, "the teacher")
    check_block_size(model, 8, "the teacher")


def test_block_size_above_positions_names_both_numbers(tokenizer):
    model = make_gpt2(tokenizer, n_layer=1, n_positions=64)
    with pytest.raises(KdcodeError, match=r"--block-size 65 exceeds the teacher's 64 positions; use --block-size 64"):
        check_block_size(model, 65, "the teacher")


def test_estimate_formula():
    batch, block, hidden, layers, vocab = 16, 256, 768, 12, 50_000
    tokens = batch * block
    expected = tokens * hidden * layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER + tokens * vocab * 4 * 3
    assert estimate_step_bytes(batch, block, hidden, layers, vocab) == expected
    # linear in the batch, so the largest batch that fits is available // per-sample estimate
    assert estimate_step_bytes(2 * batch, block, hidden, layers, vocab) == 2 * expected


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (its figures are kB)."""
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux's /proc/meminfo is the reference")
def test_available_memory_on_cpu_is_the_kernels_memavailable():
    """The kernel's own estimate of what can be allocated without swapping (MemAvailable), not free RAM (MemFree,
    which leaves out the page cache) nor total RAM. Other processes move it between two reads: the figure must lie
    within what /proc/meminfo said just before and just after, give or take 64 MiB."""
    slack = 64 * 2**20
    before = _meminfo()
    got = available_memory(CPU)
    after = _meminfo()
    low = min(before["MemAvailable"], after["MemAvailable"]) - slack
    high = max(before["MemAvailable"], after["MemAvailable"]) + slack
    assert low <= got <= high, (got, before["MemAvailable"], after["MemAvailable"])
    assert 0 < got < before["MemTotal"]


def test_fits_returns_the_estimate(monkeypatch):
    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: 64 * 2**30)
    assert check_memory(16, 256, 128, 6, 8192, CPU) == estimate_step_bytes(16, 256, 128, 6, 8192)


def test_exactly_available_is_allowed(monkeypatch):
    need = estimate_step_bytes(4, 64, 32, 2, 512)
    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: need)
    assert check_memory(4, 64, 32, 2, 512, CPU) == need


def test_over_available_fails_with_numbers_and_a_batch_that_fits(monkeypatch):
    per_sample = estimate_step_bytes(1, 1024, 768, 12, 50_257)
    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: 5 * per_sample + 1)
    with pytest.raises(KdcodeError) as info:
        check_memory(64, 1024, 768, 12, 50_257, CPU)
    message = str(info.value)
    assert "one training step needs about 55.9 GiB of activation memory" in message
    assert "(batch 64 x block 1024, 12 layers of width 768, vocab 50257)" in message
    assert "but only 4.4 GiB is free on cpu; use --batch-size 5 or lower --block-size" in message


def test_even_one_sample_too_big_suggests_the_block_size(monkeypatch):
    monkeypatch.setattr(kdcode.train.resources, "available_memory", lambda device: 2**20)
    with pytest.raises(KdcodeError, match=r"but only 1\.0 MiB is free on cpu; lower --block-size$"):
        check_memory(1, 1024, 768, 12, 50_257, CPU)


# Ten steps of a training-like loop (a 256 MB and a 64 MB tensor made, written and freed); prints the page faults of
# the last three steps, once the heap has settled (glibc's aligned allocations leave a few holes at first).
_STEPS = """
import resource, sys, torch
from kdcode.train.heap import kept_heap
def last_faults():
    counts = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x, y = torch.ones(64 * 2**20), torch.ones(16 * 2**20)
        del x, y
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-3:])
if sys.argv[1] == "kept":
    with kept_heap() as heap:
        assert heap == "kept"
        print(last_faults())
else:
    print(last_faults())
"""


@pytest.mark.skipif(kdcode.train.heap._mallopt() is None, reason="glibc's mallopt is not in this C library")
def test_a_kept_heap_stops_faulting_in_the_same_pages_every_step():
    import subprocess
    import sys

    def faults(mode: str) -> int:  # a fresh process each: no earlier test's heap
        run = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(run.stdout.split()[-1])

    system, kept = faults("system"), faults("kept")
    # glibc's defaults: both tensors come from a fresh mmap every step (3 x 81,920 4-KiB pages, or 3 x 160 huge pages
    # where THP is always on); kept: the freed pages are reused
    assert system >= 3 * 160 and kept * 10 < system, (system, kept)


def test_a_kept_heap_sets_glibc_and_puts_its_defaults_back(monkeypatch):
    from kdcode.train import heap

    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda k, v: calls.append((k, v)) or 1)
    with heap.kept_heap() as state:
        assert state == "kept" and calls == list(heap.KEPT.items())
    assert calls[len(heap.KEPT) :] == list(heap.GLIBC_DEFAULTS.items())
    calls.clear()
    with pytest.raises(RuntimeError), heap.kept_heap():
        raise RuntimeError("a failed step")
    assert calls[len(heap.KEPT) :] == list(heap.GLIBC_DEFAULTS.items())  # put back on the way out of an error too


def test_the_heap_is_left_alone_off_the_main_thread_off_glibc_and_on_a_gpu(monkeypatch):
    import threading

    from kdcode.train import heap

    seen = []
    worker = threading.Thread(target=lambda: seen.append(heap.kept_heap().__enter__()))
    worker.start()
    worker.join()
    with heap.kept_heap(on_cpu=False) as on_gpu:
        seen.append(on_gpu)
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    with heap.kept_heap() as no_glibc:
        seen.append(no_glibc)
    assert seen == ["system"] * 3


# A teacher cache built in a fresh process: 20 teacher passes of 8 x 256 tokens over SmolLM2's 49,152-token vocabulary
# (each pass's logits 403 MB in float32). Prints how far the peak RSS rose over one pass's own peak.
_CACHE_PASSES = """
import resource, sys, tempfile
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from kdcode.train.teacher_cache import _write_shards
torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
blocks = torch.randint(0, 49152, (160, 256))
with torch.no_grad():
    model(blocks[:8])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as folder:
    _write_shards(model, blocks, torch.arange(160), Path(folder), 0, 16, 1.0, 8, 49152)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_building_a_teacher_cache_does_not_grow_the_heap_pass_after_pass():
    import subprocess
    import sys

    # (progress to /dev/null: how a background job runs; the heap's layout depends on what else the process does)
    run = subprocess.run([sys.executable, "-c", _CACHE_PASSES], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grew_mb = int(run.stdout.split()[-1])
    # a pass holds its logits and a scaled copy: 0.8-1.2 GB above one pass here. When each pass's kept top-k landed
    # in the hole the last pass's logits left, the kept heap took fresh memory every pass from the 16th on: 4.6-5.8 GB
    # over these 20 (a SmolLM2 cache of 800 blocks was killed by the kernel at 18 GB)
    assert grew_mb < 4 * 403, grew_mb
