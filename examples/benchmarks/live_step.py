"""kdcode's live-teacher distillation step against a plain PyTorch loop (issue 20.3).

The same job on both sides: the bundled teacher, the same 6-layer `spread` student init, the same batches
(16 x 256 tokens of the stdlib train split), the same loss (T^2 KL(softmax(t/T) || softmax(s/T)) at T=2 with
weight 0.5 + CE with weight 0.5), the same precision (--precision: bf16 autocast where the CPU has it, else
fp32), AdamW, grad clipping at 1.0, the same threads. The plain loop
computes the loss as torchdistill's ``KDLoss`` does (``KLDivLoss(reduction="batchmean")`` of
``log_softmax(s/T)`` against ``softmax(t/T)``, times T^2, plus CE; torchdistill itself needs torchvision,
which does not install beside torch 2.13 here, so its formula is written out). kdcode's side is its own
training loop (`train_loop`: the fused soft+hard loss, its teacher source, logging; no held-out loss).
Rounds alternate (plain, kdcode, kdcode, plain, ...) after one warm-up round each; each round is --steps
steps, timed from the end of its first step; reported: tokens/s median [min-max] per side and their ratio.

    python examples/benchmarks/live_step.py --steps 12 --rounds 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kdcode.data.corpus import encode_documents, load_corpus, to_blocks
from kdcode.models.load import load_model
from kdcode.plugins import make_init, make_strategy
from kdcode.spec import DataSpec, TrainSpec
from kdcode.train.loop import train_loop
from kdcode.train.optim import make_optimizer
from kdcode.train.resources import pick_precision


def kd_loss_torchdistill(s_logits, t_logits, labels, temperature=2.0, alpha=0.5):
    """torchdistill's KDLoss: alpha * CE + (1 - alpha) * T^2 * KLDiv(batchmean)(log_softmax(s/T), softmax(t/T))."""
    s = s_logits[:, :-1].reshape(-1, s_logits.size(-1)).float()
    t = t_logits[:, :-1].reshape(-1, t_logits.size(-1)).float()
    y = labels[:, 1:].reshape(-1)
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * temperature**2 * soft


def plain_round(student, teacher, batches, steps: int, precision: str) -> float:
    """One round of the plain loop; tokens/s from the end of its first step."""
    opt = make_optimizer(student, 5e-4, 0.01)
    student.train()
    stamps = []
    for x in batches[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                t_logits = teacher(x).logits
            loss = kd_loss_torchdistill(student(x).logits, t_logits, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return (steps - 1) * batches[0].numel() / (stamps[-1] - stamps[0])


def kdcode_round(student, teacher, blocks, steps: int, batch: int, threads: int, precision: str) -> float:
    stamps: list[float] = []
    cfg = TrainSpec(max_steps=steps, batch_size=batch, block_size=blocks.size(1), precision=precision, lr=5e-4,
                    warmup_steps=0, eval_every=10**6, threads=threads)
    strategy = make_strategy("pretraining", {"temperature": 2.0, "alpha_soft": 0.5, "alpha_hard": 0.5})
    train_loop(student, strategy, blocks, None, cfg, teacher=teacher, description="kdcode",
               on_step=lambda r: stamps.append(time.perf_counter()))
    return (steps - 1) * batch * blocks.size(1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--teacher-dtype", default=None, help="hold kdcode's teacher in bf16 (if supported)")
    ap.add_argument("--precision", default="auto", help="bf16 | fp32 | auto (bf16 where the CPU runs it natively)")
    args = ap.parse_args()
    args.precision = pick_precision(args.precision, torch.device("cpu"))
    torch.set_num_threads(args.threads)
    teacher = load_model("bundled").model
    corpus = load_corpus(DataSpec())
    blocks = to_blocks(encode_documents(corpus.splits["train"][:200], load_model("bundled").tokenizer), 256)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    batches = [blocks[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps)]
    run_blocks = torch.cat(batches)
    init = make_init("spread", {})
    base, _ = init.build(teacher, 6)
    rates: dict[str, list[float]] = {"plain": [], "kdcode": []}
    kd_teacher = copy.deepcopy(teacher)
    if args.teacher_dtype == "bf16":
        kd_teacher = kd_teacher.to(torch.bfloat16)
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        order = ["plain", "kdcode"] if r % 2 == 0 else ["kdcode", "plain"]
        for side in order:
            student = copy.deepcopy(base)
            if side == "plain":
                rate = plain_round(student, teacher.eval(), batches, args.steps, args.precision)
            else:
                rate = kdcode_round(student, kd_teacher, run_blocks, args.steps, args.batch_size, args.threads,
                                    args.precision)
            if r:
                rates[side].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {k: {"tokens_per_s": round(med[k], 1), "range": [round(min(v), 1), round(max(v), 1)]}
           for k, v in rates.items()}
    out["ratio"] = round(med["kdcode"] / med["plain"], 3)
    out["ratio_range"] = [round(min(rates["kdcode"]) / max(rates["plain"]), 3),
                          round(max(rates["kdcode"]) / min(rates["plain"]), 3)]
    out["settings"] = vars(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
