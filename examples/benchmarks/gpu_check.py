"""Issue 9's GPU check (never in CI): distil a 12-layer GPT-2 of CodeGPT-small-py's shape (768 wide,
12 heads, 50k vocabulary, 1024 positions; random init is fine for a speed figure) into 6 layers for a
few hundred steps in bf16, and report tokens/s and peak GPU memory.

    python examples/benchmarks/gpu_check.py --steps 300 --batch-size 16 --block-size 1024 --json gpu.json

The teacher folder is built locally (bundled tokenizer, random weights), so no hub access is needed.
Record the printed figures, with the card's name, in examples/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcode.models.load import bundled_path, load_tokenizer
from kdcode.spec import RunSpec
from kdcode.train.distil import run_distil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = Path(tmp) / "teacher"
        tok = load_tokenizer(str(bundled_path()))
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50001, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        spec = RunSpec.model_validate({
            "teacher": {"name": str(teacher_dir)}, "student": {"layers": 6, "init": "spread"},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "block_size": args.block_size,
                      "precision": args.precision, "eval_every": 10**9},
            "out": str(Path(tmp) / "student"),
        })
        _, manifest = run_distil(spec)
    tr = manifest["training"]
    out = {"device": tr["device"], "precision": tr["precision"], "steps": tr["steps"],
           "batch": f"{args.batch_size}x{args.block_size}", "tokens_per_s": tr["tokens_per_s"],
           "peak_memory_mb": tr["peak_memory_mb"], "wall_time_s": tr["wall_time_s"]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
