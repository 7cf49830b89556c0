"""Teacher and student folders in CodeGPT-small-py's width, to measure runtimes where 8-bit weights can pay.

The bundled teacher is 128 wide: its whole fp32 model (14 MB) sits in this CPU's caches, so a decode step is
per-call overhead and arithmetic, and 8-bit weights save neither (README: q8_0 is 1.08x its f32 counterpart).
The mission's teachers are 768 wide (microsoft/CodeGPT-small-py: 12 layers, 124M parameters, ~500 MB in fp32),
where every decoded token reads all the weights from memory and 8-bit weights read a quarter of the bytes.

This writes, with random weights (speed does not depend on their values; the hub is not reachable here),
a 12-layer and a 6-layer GPT-2 of that shape (768 wide, 12 heads, 1024 positions) with the bundled teacher's
tokenizer (8,192 tokens instead of CodeGPT's 50,001: the head is smaller than CodeGPT's), so that
`runtimes.py` can time them in every backend:

    python examples/benchmarks/wide_models.py /tmp/wide
    python examples/benchmarks/runtimes.py --teacher /tmp/wide/teacher12 --student /tmp/wide/student6 \\
        --variants llama-f32,llama-q8_0 --rounds 5 --prompts 8 --es-samples 5 --latency-prompts 5 \\
        --work /tmp/wide/exports --note "random weights, CodeGPT-small-py's width: ES is meaningless"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcode.models.artifacts import save_model
from kdcode.models.load import load_model


def wide(layers: int, tokenizer, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=768, n_layer=layers, n_head=12,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    tokenizer = load_model("bundled").tokenizer
    for name, layers in (("teacher12", 12), ("student6", 6)):
        model = wide(layers, tokenizer, seed=layers)
        params = sum(p.numel() for p in model.parameters())
        path = save_model(args.out / name, model, tokenizer,
                          {"kind": "student", "note": "random weights in CodeGPT-small-py's width (runtime timing)"},
                          overwrite=True)
        print(f"{path}: {layers} layers x 768, {params / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
