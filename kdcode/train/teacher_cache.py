"""Teacher-logit cache: one teacher pass over the training blocks, reused by every frozen-teacher run.

Per training block the cache stores the token ids, the teacher's top-k logits and their vocabulary
ids, and ``lse`` = logsumexp(logits / T) over the whole vocabulary at the cache temperature T (the
sparse KL against them: :mod:`kdcode.strategies.sparse`). Shards are safetensors files; ``cache.json``
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

from kdcode.errors import KdcodeError
from kdcode.strategies.sparse import SparseTargets

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
    from kdcode.strategies.losses import within

    logits = within(teacher(x).logits, vocab).float()
    top = logits.topk(top_k, dim=-1)
    lse = torch.logsumexp(logits / temperature, dim=-1)
    return top.values, top.indices, lse


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 32767 else torch.int32


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
) -> dict[str, Any]:
    """Run the teacher over ``blocks`` and write the cache folder atomically; soft targets over the first ``vocab``
    tokens (the tokenizer's; default: the teacher's whole LM head)."""
    from safetensors.torch import save_file

    from kdcode.artifacts import atomic_dir, write_json
    from kdcode.progress import make_progress

    vocab = int(vocab or teacher.config.vocab_size)
    if not 1 <= top_k <= vocab:
        raise KdcodeError(f"--top-k {top_k} must be between 1 and the vocabulary size {vocab}")
    device = next(teacher.parameters()).device
    teacher.eval()
    shards = []
    with atomic_dir(out, overwrite) as tmp, make_progress() as progress:
        task = progress.add_task("cache teacher", total=len(blocks), info=f"top-{top_k}, T={temperature}")
        for s0 in range(0, len(blocks), SHARD_BLOCKS):
            chunk = blocks[s0 : s0 + SHARD_BLOCKS]
            vals, ids, lses = [], [], []
            for b0 in range(0, len(chunk), batch_size):
                v, i, lse = teacher_targets(teacher, chunk[b0 : b0 + batch_size].to(device), top_k, temperature, vocab)
                vals.append(v.to(torch.float16).cpu())
                ids.append(i.to(id_dtype(vocab)).cpu())
                lses.append(lse.cpu())
                progress.update(task, advance=len(v))
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(
                {
                    "input_ids": chunk.contiguous(),
                    "topk_logits": torch.cat(vals),
                    "topk_ids": torch.cat(ids),
                    "lse": torch.cat(lses),
                },
                str(tmp / name),
            )
            shards.append(name)
        manifest = {
            **meta,
            "top_k": top_k,
            "temperature": temperature,
            "blocks": len(blocks),
            "block_size": int(blocks.size(1)),
            "shards": shards,
        }
        write_json(tmp / CACHE_MANIFEST, manifest)
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


def load_cache(folder: Path) -> TeacherCache:
    from safetensors.torch import load_file

    path = folder / CACHE_MANIFEST
    if not path.is_file():
        raise KdcodeError(f"{folder} is not a teacher cache (no {CACHE_MANIFEST}); make one with kdcode cache-teacher")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    parts: dict[str, list[torch.Tensor]] = {"input_ids": [], "topk_logits": [], "topk_ids": [], "lse": []}
    for shard in manifest["shards"]:
        tensors = load_file(str(folder / shard))
        for k in parts:
            parts[k].append(tensors[k])
    return TeacherCache(manifest, *(torch.cat(parts[k]) for k in ("input_ids", "topk_logits", "topk_ids", "lse")))


def check_cache(cache: TeacherCache, expected: dict[str, Any], folder: Path) -> None:
    """Refuse a cache made from another teacher, tokenizer, data, block size or FIM transform (a cache made
    before FIM existed records none, which matches a run without it), naming the mismatch."""
    for key, what in (
        ("teacher_fingerprint", "teacher"),
        ("tokenizer_hash", "tokenizer"),
        ("data_fingerprint", "training data"),
        ("block_size", "block size"),
        ("fim", "FIM transform (data.fim)"),
    ):
        if key in expected and cache.manifest.get(key) != expected[key]:
            raise KdcodeError(
                f"teacher cache {folder} was made for another {what} ({key} {str(cache.manifest.get(key))[:16]} "
                f"!= {str(expected[key])[:16]}); rebuild it with kdcode cache-teacher for this run"
            )
