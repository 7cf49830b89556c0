"""Held-out next-token loss: the one function training's validation and `kdcode eval`'s perplexity share."""

from __future__ import annotations

import math
from typing import Any

import torch

from kdcode.data.corpus import encode_documents
from kdcode.device import model_device


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    precision: str = "fp32",
) -> float:
    """Mean next-token cross-entropy over up to ``max_batches`` batches of ``blocks`` (all when None)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    end = len(blocks) if max_batches is None else min(len(blocks), batch_size * max_batches)
    for i in range(0, end, batch_size):
        x = blocks[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def perplexity(model: Any, tokenizer: Any, docs: list[Any], max_blocks: int, block_size: int) -> dict[str, Any]:
    """exp(mean next-token CE) over the first ``max_blocks`` blocks of the documents' token stream."""
    stream = encode_documents(docs, tokenizer)
    n = min(max_blocks, len(stream) // block_size)
    if n == 0:
        return {"perplexity": None, "ppl_tokens": 0, "ppl_block_size": block_size}
    blocks = torch.tensor(stream[: n * block_size]).view(n, block_size)
    device = model_device(model)
    loss = held_out_loss(model, blocks, 8, None, device)
    return {"perplexity": round(math.exp(loss), 3), "ppl_tokens": n * (block_size - 1), "ppl_block_size": block_size}
