"""Teacher-logit cache: one teacher pass over the training blocks, reused by every frozen-teacher run.

Per training block the cache stores the token ids, the teacher's top-k logits and their vocabulary
ids, and ``lse`` = logsumexp(logits / T) over the whole vocabulary at the cache temperature T (the
divergences against them: :mod:`kdcode.strategies.divergences`). Shards are safetensors files; ``cache.json``
records the teacher, tokenizer and data fingerprints, block size, k and T, and a cache that does not
match a run is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdcode.errors import KdcodeError
from kdcode.models.artifacts import atomic_dir, write_json
from kdcode.progress import make_progress
from kdcode.strategies.losses import within
from kdcode.strategies.sparse import SparseTargets
from kdcode.train.heap import kept_heap

CACHE_MANIFEST = "cache.json"
SHARD_BLOCKS = 512


def tokenizer_hash(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


@torch.no_grad()
def teacher_targets(
    teacher: Any, x: torch.Tensor, top_k: int, temperature: float, vocab: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Top-k logits, their ids and logsumexp(logits / T) over the first ``vocab`` tokens (LM-head padding left out)."""
    logits = within(teacher(x).logits, vocab).float()
    top = logits.topk(top_k, dim=-1)
    lse = torch.logsumexp(logits / temperature, dim=-1)
    return top.values, top.indices, lse


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 32767 else torch.int32


def cache_order(total: int, seed: int = 0) -> torch.Tensor:
    """The order in which a cache takes the training blocks: a cache of n blocks holds the first n of this seeded
    permutation, so a grown cache extends a smaller one and both are random samples of the whole split."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))


def blocks_for_run(train: Any) -> int | None:
    """Training blocks a run reads: ``max_steps`` x the global batch; None (all of them) when epochs or minutes
    alone bound it."""
    if train.epochs is not None or train.max_steps is None:
        return None
    return int(train.max_steps) * int(train.batch_size)


def _write_shards(
    teacher: Any, blocks: torch.Tensor, index: torch.Tensor, folder: Path, first: int, top_k: int,
    temperature: float, batch_size: int, vocab: int,
) -> list[str]:
    """Teacher targets of ``blocks[index]`` as shards ``first, first + 1, ...`` in ``folder`` (each written to a
    temp file and renamed, so a shard that exists is whole); returns their names."""
    device = next(teacher.parameters()).device
    teacher.eval()
    names = []
    with kept_heap(device.type == "cpu"), make_progress() as progress:
        task = progress.add_task("cache teacher", total=len(index), info=f"top-{top_k}, T={temperature}")
        for s0 in range(0, len(index), SHARD_BLOCKS):
            part = index[s0 : s0 + SHARD_BLOCKS]
            chunk = blocks[part]
            # The shard's targets are allocated before its teacher passes and filled in place: a small tensor kept
            # from each pass would land in the hole the pass's logits left and split it, and with the heap kept
            # (no mmap, no trim) every later pass would then take fresh memory (RSS grew by ~300 MB per batch of
            # 8 x 256 tokens over a 49k vocabulary until the process was killed).
            shape = (len(chunk), chunk.size(1))
            vals = torch.empty(*shape, top_k, dtype=torch.float16)
            ids = torch.empty(*shape, top_k, dtype=id_dtype(vocab))
            lses = torch.empty(shape, dtype=torch.float32)
            for b0 in range(0, len(chunk), batch_size):
                v, i, lse = teacher_targets(teacher, chunk[b0 : b0 + batch_size].to(device), top_k, temperature, vocab)
                rows = slice(b0, b0 + len(v))
                vals[rows], ids[rows], lses[rows] = v, i, lse
                del v, i, lse
                progress.update(task, advance=rows.stop - b0)
            name = f"shard-{first + len(names):05d}.safetensors"
            tmp = folder / f".{name}.tmp"
            tmp.unlink(missing_ok=True)  # a leftover of a killed run
            save_file({"input_ids": chunk.contiguous(), "topk_logits": vals, "topk_ids": ids, "lse": lses,
                       "block_index": part.to(torch.int64).contiguous()}, str(tmp))
            tmp.replace(folder / name)
            names.append(name)
    return names


def build_cache(
    teacher: Any,
    blocks: torch.Tensor,
    out: Path,
    top_k: int,
    temperature: float,
    meta: dict[str, Any],
    batch_size: int = 8,
    overwrite: bool = False,
    vocab: int | None = None,
    max_blocks: int | None = None,
) -> dict[str, Any]:
    """Run the teacher over ``max_blocks`` of ``blocks`` (default: all; the first of :func:`cache_order`) and write
    the cache folder atomically; soft targets over the first ``vocab`` tokens (the tokenizer's; default: the
    teacher's whole LM head)."""
    vocab = int(vocab or teacher.config.vocab_size)
    if not 1 <= top_k <= vocab:
        raise KdcodeError(f"--top-k {top_k} must be between 1 and the vocabulary size {vocab}")
    total = len(blocks)
    if max_blocks is not None and max_blocks < 1:
        raise KdcodeError(f"--max-blocks {max_blocks} must be at least 1")
    n = total if max_blocks is None else min(max_blocks, total)
    index = cache_order(total)[:n] if n < total else torch.arange(total)
    with atomic_dir(out, overwrite) as tmp:
        shards = _write_shards(teacher, blocks, index, tmp, 0, top_k, temperature, batch_size, vocab)
        manifest = {**meta, "top_k": top_k, "temperature": temperature, "blocks": n, "total_blocks": total,
                    "order": "all" if n == total else "randperm-seed-0", "block_size": int(blocks.size(1)),
                    "vocab": vocab, "shards": shards}
        write_json(tmp / CACHE_MANIFEST, manifest)
    return manifest


def coverage(manifest: dict[str, Any]) -> tuple[int, int]:
    """(blocks a cache holds, blocks of the training split it samples); a cache from before sizing holds them all."""
    return int(manifest["blocks"]), int(manifest.get("total_blocks", manifest["blocks"]))


def grow_cache(
    teacher: Any, blocks: torch.Tensor, folder: Path, wanted: int, vocab: int, batch_size: int = 8
) -> dict[str, Any]:
    """Extend the cache in ``folder`` (already checked against this run) to ``wanted`` blocks of ``blocks`` (the
    whole training split it was made from), continuing its order. New shards are written first and the manifest
    last (atomically): a run killed while growing leaves the old cache intact."""
    manifest = read_manifest(folder)
    have, total = coverage(manifest)
    if total != len(blocks):
        raise KdcodeError(f"teacher cache {folder} was made from {total} training blocks, this run has {len(blocks)}; "
                          "rebuild it with kdcode cache-teacher")
    wanted = min(wanted, total)
    if wanted <= have:
        return manifest
    index = cache_order(total)[have:wanted]
    new = _write_shards(teacher, blocks, index, folder, len(manifest["shards"]), int(manifest["top_k"]),
                        float(manifest["temperature"]), batch_size, vocab)
    manifest.update(blocks=wanted, total_blocks=total, order="randperm-seed-0", vocab=vocab,
                    shards=manifest["shards"] + new)
    write_json(folder / CACHE_MANIFEST, manifest)
    return manifest


@dataclass
class TeacherCache:
    manifest: dict[str, Any]
    input_ids: torch.Tensor
    topk_logits: torch.Tensor
    topk_ids: torch.Tensor
    lse: torch.Tensor

    def targets(self, index: torch.Tensor) -> SparseTargets:
        return SparseTargets(
            self.topk_logits[index], self.topk_ids[index], self.lse[index], float(self.manifest["temperature"])
        )


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / CACHE_MANIFEST
    if not path.is_file():
        raise KdcodeError(f"{folder} is not a teacher cache (no {CACHE_MANIFEST}); make one with kdcode cache-teacher")
    return json.loads(path.read_text(encoding="utf-8"))


def load_cache(folder: Path) -> TeacherCache:
    manifest = read_manifest(folder)
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "topk_logits": [], "topk_ids": [], "lse": []}
    for shard in manifest["shards"]:
        tensors = load_file(str(folder / shard))
        for k in parts:
            parts[k].append(tensors[k])
    return TeacherCache(manifest, *(torch.cat(parts[k]) for k in ("input_ids", "topk_logits", "topk_ids", "lse")))


def check_cache(cache: TeacherCache | dict[str, Any], expected: dict[str, Any], folder: Path) -> None:
    """Refuse a cache (or its manifest) made from another teacher, tokenizer, data, block size or FIM transform (a
    cache made before FIM existed records none, which matches a run without it), naming the mismatch."""
    manifest = cache if isinstance(cache, dict) else cache.manifest
    for key, what in (
        ("teacher_fingerprint", "teacher"),
        ("tokenizer_hash", "tokenizer"),
        ("data_fingerprint", "training data"),
        ("block_size", "block size"),
        ("fim", "FIM transform (data.fim)"),
    ):
        if key in expected and manifest.get(key) != expected[key]:
            raise KdcodeError(
                f"teacher cache {folder} was made for another {what} ({key} {str(manifest.get(key))[:16]} "
                f"!= {str(expected[key])[:16]}); rebuild it with kdcode cache-teacher for this run"
            )
