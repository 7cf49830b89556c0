"""Why int8 cannot speed up a 128-wide student: per-layer kernel times and each decode step's share of matrix products.

For a GPT-2 of the given width and depth (seeded random weights; speed does not depend on their values) this
times, on CPU:

1. one Linear at each of a GPT-2 block's shapes (qkv, attention out, MLP up, MLP down) and the LM head, in
   fp32 (torch) and as kdcode's ``Int8Linear`` (dynamic int8), for 1 row (a decoding step at batch 1) and
   for ``--rows`` rows (a prompt's prefill);
2. kdcode's greedy decoding (as `kdcode bench` runs it: batch 1, 16 new tokens, KV cache) of held-out
   prompts under ``torch.profiler``, fp32 and int8 (``quantize_model``): the share of the time spent in
   matrix products. That share bounds what any faster GEMM can buy
   (Amdahl: 1 / (1 - share)).

    python examples/benchmarks/int8_layers.py --width 128 --layers 6 --threads 1 --json int8_layers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcode.compression.int8 import Int8Linear, quantize_model
from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy
from kdcode.models.load import load_tokenizer
from kdcode.spec import DataSpec

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "quantized::linear_dynamic")


def time_us(fn, x: torch.Tensor, repeat: int) -> float:
    with torch.inference_mode():
        for _ in range(max(10, repeat // 10)):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn(x)
    return (time.perf_counter() - t0) / repeat * 1e6


def layer_times(width: int, vocab: int, rows: int) -> list[dict]:
    out = []
    shapes = {"qkv": (width, 3 * width), "attn out": (width, width), "mlp up": (width, 4 * width),
              "mlp down": (4 * width, width), "lm head": (width, vocab)}
    for name, (d_in, d_out) in shapes.items():
        lin = torch.nn.Linear(d_in, d_out, bias=name != "lm head")
        q = Int8Linear.from_float(lin)
        for m in (1, rows):
            x = torch.randn(1, m, d_in)
            reps = 2000 if m == 1 else 200
            fp32, int8 = time_us(lin, x, reps), time_us(q, x, reps)
            out.append({"layer": name, "shape": [d_in, d_out], "rows": m, "fp32_us": round(fp32, 1),
                        "int8_us": round(int8, 1), "int8_speedup": round(fp32 / int8, 2)})
    return out


def decode_profile(model: torch.nn.Module, tokenizer, prompts: list[str], new_tokens: int) -> dict:
    """kdcode's greedy decoding (what `kdcode bench` times: batch 1, fixed new tokens, KV cache); returns
    wall ms per prompt and the share of the profiled CPU time spent in matrix products."""
    opts = DecodeOptions(max_new_tokens=new_tokens, fixed_length=True)
    index = VocabIndex.for_model(model, tokenizer)
    greedy(model, index, prompts[:2], opts, 1)  # warm-up
    t0 = time.perf_counter()
    greedy(model, index, prompts, opts, 1)
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        greedy(model, index, prompts, opts, 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    share = gemm / total if total else 0.0
    return {"ms_per_prompt": round(1000 * wall / len(prompts), 2), "gemm_share": round(share, 3),
            "amdahl_bound": round(1 / (1 - share), 2) if share < 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rows", type=int, default=200, help="rows of the per-layer prefill timing")
    ap.add_argument("--prompts", type=int, default=20, help="held-out prompts decoded (stdlib test split)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (bench's default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    layers = layer_times(args.width, 8192, args.rows)
    tokenizer = load_tokenizer("bundled")
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=len(tokenizer),
                     n_positions=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    fp32 = GPT2LMHeadModel(cfg).eval()
    int8 = copy.deepcopy(fp32)
    quantize_model(int8)
    prompts = [s.input for s in build_line_samples(load_corpus(DataSpec()).splits["test"], args.prompts, 0)]
    decode = {"fp32": decode_profile(fp32, tokenizer, prompts, args.new_tokens),
              "int8": decode_profile(int8, tokenizer, prompts, args.new_tokens)}

    print(f"{'layer':<10}{'shape':>12}{'rows':>6}{'fp32 us':>10}{'int8 us':>10}{'speedup':>9}")
    for r in layers:
        print(f"{r['layer']:<10}{'x'.join(map(str, r['shape'])):>12}{r['rows']:>6}{r['fp32_us']:>10}"
              f"{r['int8_us']:>10}{r['int8_speedup']:>9}")
    for k, v in decode.items():
        print(f"decode {k}: {v['ms_per_prompt']} ms/prompt, matrix products {100 * v['gemm_share']:.1f}% of the step "
              f"(a free GEMM would give at most {v['amdahl_bound']}x)")
    out = {"width": args.width, "layers": args.layers, "vocab": len(tokenizer), "threads": args.threads,
           "rows": args.rows, "layer_times": layers, "decode": decode}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
