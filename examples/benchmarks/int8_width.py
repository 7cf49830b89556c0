"""Where int8 pays on CPU: fp32 vs `kdcode compress --int8` throughput as the model gets wider (issue 8).

At the bundled teacher's width (128) a decoding step is dominated by per-layer overhead, not by matrix
products, so dynamic int8 cannot speed it up; at CodeGPT-small-py's width (768) the products dominate.
This builds seeded random-weight GPT-2s of the same depth at each width (speed does not depend on
the weights' values, so no training is needed; ES is measured by compress.py on real students), with
the bundled tokenizer, compresses each with `run_compress(int8=True)` and benchmarks both with
`run_bench` (fresh process per model, fixed new tokens, the bundled corpus's held-out prompts).

    python examples/benchmarks/int8_width.py --widths 128,256,512,768 --layers 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcode.compression.compress import run_compress
from kdcode.evaluation.bench import run_bench
from kdcode.models.load import load_tokenizer
from kdcode.spec import BenchSpec
from kdcode.spec_compress import CompressSpec


def build(width: int, layers: int, folder: Path, seed: int) -> Path:
    tok = load_tokenizer("bundled")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=width, n_layer=layers, n_head=max(width // 64, 2),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="128,256,512,768")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="bench each model this often, keep its fastest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    spec = BenchSpec(prompts=args.prompts, new_tokens=args.new_tokens, batch_size=args.batch_size,
                     threads=args.threads, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="kdcode-int8-width-"))
    rows = []
    print(f"{'width':>6}{'params M':>10}{'fp32 MB':>9}{'int8 MB':>9}{'x smaller':>10}"
          f"{'fp32 s/s':>10}{'int8 s/s':>10}{'x speed':>9}")
    for width in (int(w) for w in args.widths.split(",")):
        fp32 = build(width, args.layers, work / f"w{width}", args.seed)
        int8 = run_compress(str(fp32), CompressSpec(int8=True), work / f"w{width}-int8", overwrite=True)[0]
        best: dict[str, dict] = {}
        for _ in range(args.rounds):  # interleaved rounds, fastest kept: noise only ever slows a round
            for label, folder in (("fp32", fp32), ("int8", int8)):
                b = run_bench(str(folder), spec, verify=False)
                if label not in best or b["samples_per_s"] > best[label]["samples_per_s"]:
                    best[label] = b
        f, q = best["fp32"], best["int8"]
        row = {
            "width": width, "layers": args.layers, "params_m": f["params_m"],
            "fp32_size_mb": f["size_mb"], "int8_size_mb": q["size_mb"],
            "size_x": round(f["size_mb"] / q["size_mb"], 2),
            "fp32_samples_per_s": f["samples_per_s"], "int8_samples_per_s": q["samples_per_s"],
            "speed_x": round(q["samples_per_s"] / f["samples_per_s"], 2),
            "fp32_ms_per_token_p50": f["ms_per_token_p50"], "int8_ms_per_token_p50": q["ms_per_token_p50"],
            "threads": f["threads"], "cpu": f.get("cpu"),
        }
        rows.append(row)
        print(f"{width:>6}{row['params_m']:>10.2f}{row['fp32_size_mb']:>9.2f}{row['int8_size_mb']:>9.2f}"
              f"{row['size_x']:>10.2f}{row['fp32_samples_per_s']:>10.2f}{row['int8_samples_per_s']:>10.2f}"
              f"{row['speed_x']:>9.2f}", flush=True)
    print(f"CPU, {rows[0]['threads']} threads, {args.layers} layers, bench {args.prompts} prompts x "
          f"{args.new_tokens} tokens, batch {args.batch_size}, best of {args.rounds} rounds")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args) | {"json": str(args.json)}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
