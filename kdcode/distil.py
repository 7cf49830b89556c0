"""The training loop, and the two recipes built on it: `distil` (KD into a smaller student) and
`pretrain` (a tokenizer and a GPT-2 from scratch, the ``hard-only`` strategy).

One loop for both, readable top to bottom: setup, loop (forward, loss, backward, step, log),
periodic held-out loss, result. It writes nothing itself; the recipes save through artifacts.py.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcode.artifacts import check_out_dir, save_model
from kdcode.data import Corpus, encode_documents, fingerprint, load_corpus, to_blocks
from kdcode.errors import KdcodeError
from kdcode.progress import make_progress
from kdcode.spec import PretrainSpec, RunSpec, TrainSpec


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    wall_time_s: float
    tokens_per_s: float
    device: str
    precision: str
    threads: int
    final: dict[str, float]
    log: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "log"}
        out["valid_curve"] = [r for r in self.log if "valid_loss" in r]
        return out


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AMX or AVX512-BF16); else autocast is a slowdown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def lr_at(progress: float, step: int, cfg: TrainSpec) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at progress 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay matrices only; biases and norm gains stay undecayed (GPT-2/nanoGPT practice).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    precision: str,
) -> float:
    """Mean next-token cross-entropy over up to ``max_batches`` held-out batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(blocks), batch_size * max_batches), batch_size):
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


def train_loop(
    student: torch.nn.Module,
    strategy: Any,
    train_blocks: torch.Tensor,
    valid_blocks: torch.Tensor | None,
    cfg: TrainSpec,
    teacher: torch.nn.Module | None = None,
    description: str = "distil",
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    # ---- setup -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device()
    precision = pick_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise KdcodeError("precision bf16 was asked for, but this CPU has no native bf16; use fp32")
    n_blocks = len(train_blocks)
    batch = min(cfg.batch_size, n_blocks)
    steps_per_epoch = math.ceil(n_blocks / batch)
    budgets = [s for s in (cfg.max_steps, cfg.epochs and math.ceil(cfg.epochs * steps_per_epoch)) if s]
    total_steps = min(budgets) if budgets else None
    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None

    student.to(device).train()
    optimizer = make_optimizer(student, cfg.lr, cfg.weight_decay)
    teacher_opt = None
    if strategy.needs_teacher:
        if teacher is None:
            raise KdcodeError(f"strategy {strategy.name!r} needs a teacher")
        teacher.to(device)
        if strategy.needs_teacher_grad:  # in-training KD: the teacher learns too, with its own optimizer
            teacher.train()
            teacher_opt = make_optimizer(teacher, cfg.teacher_lr or cfg.lr / 10, cfg.weight_decay)
        else:
            teacher.eval().requires_grad_(False)
    hidden = strategy.needs_hidden_states
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_blocks, generator=gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    log: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    tokens = 0
    step = 0
    start = time.perf_counter()
    # ---- loop --------------------------------------------------------------------------------
    with make_progress() as progress:
        task = progress.add_task(description, total=total_steps, info="")
        while True:
            elapsed = time.perf_counter() - start
            if (total_steps is not None and step >= total_steps) or (max_seconds and elapsed >= max_seconds):
                break
            frac = max(step / total_steps if total_steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)
            lr = lr_at(frac, step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            pos = (step * batch) % n_blocks
            if pos + batch > n_blocks:  # new epoch: reshuffle
                order = torch.randperm(n_blocks, generator=gen)
                pos = 0
            x = train_blocks[order[pos : pos + batch]].to(device)

            with autocast:
                s_out = student(x, output_hidden_states=hidden)
                t_out = None
                if strategy.needs_teacher and teacher_opt is not None:
                    t_out = teacher(x, output_hidden_states=hidden)
                elif strategy.needs_teacher:
                    with torch.no_grad():
                        t_out = teacher(x, output_hidden_states=hidden)
                terms = strategy.loss(s_out, t_out, x, progress=frac)
                t_loss = strategy.teacher_loss(t_out, x) if teacher_opt is not None else None
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise KdcodeError(f"the loss became {loss.item()} at step {step}; lower --lr or use --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            if teacher_opt is not None and t_loss is not None:
                teacher_opt.zero_grad(set_to_none=True)
                t_loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(teacher.parameters(), cfg.grad_clip)  # type: ignore[union-attr]
                teacher_opt.step()
                terms["teacher_hard"] = t_loss

            step += 1
            tokens += x.numel()
            last = {k: round(float(v.detach()), 5) for k, v in terms.items()}
            record: dict[str, Any] = {"step": step, "lr": lr, "tokens": tokens, **last}
            if valid_blocks is not None and len(valid_blocks) and (step % cfg.eval_every == 0):
                record["valid_loss"] = held_out_loss(student, valid_blocks, batch, cfg.eval_batches, device, precision)
            record["elapsed_s"] = round(time.perf_counter() - start, 2)
            log.append(record)
            if on_step:
                on_step(record)
            info = f"loss {last['loss']:.3f}"
            if "valid_loss" in record:
                info += f" valid {record['valid_loss']:.3f}"
                progress.console.print(
                    f"step {step}: loss {last['loss']:.4f}, valid {record['valid_loss']:.4f}, lr {lr:.2e}, "
                    f"{tokens / record['elapsed_s']:.0f} tokens/s, {record['elapsed_s']:.0f} s",
                    highlight=False,
                )
            progress.update(task, advance=1, info=info)

    if step == 0:
        raise KdcodeError("training ran no step: the budget (max_steps / epochs / max_minutes) is too small")
    final = dict(last)
    if valid_blocks is not None and len(valid_blocks):
        final["valid_loss"] = held_out_loss(student, valid_blocks, batch, cfg.eval_batches, device, precision)
        final["valid_ppl"] = math.exp(min(final["valid_loss"], 50))
    wall = time.perf_counter() - start
    student.eval()
    return TrainResult(
        steps=step,
        tokens_seen=tokens,
        wall_time_s=round(wall, 2),
        tokens_per_s=round(tokens / wall, 1),
        device=describe_device(device),
        precision=precision,
        threads=torch.get_num_threads(),
        final=final,
        log=log,
    )


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def _data_section(corpus: Corpus, train_blocks: torch.Tensor, valid_blocks: torch.Tensor, spec_format: str) -> dict:
    return {
        **corpus.summary(),
        "format": spec_format,
        "fingerprint": {s: fingerprint(d) for s, d in corpus.splits.items()},
        "train_tokens": int(train_blocks.numel()),
        "valid_tokens": int(valid_blocks.numel()),
        "train_blocks": len(train_blocks),
    }


def _blocks(corpus: Corpus, tokenizer: Any, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = to_blocks(encode_documents(corpus.splits["train"], tokenizer), block_size)
    valid_stream = encode_documents(corpus.splits["valid"], tokenizer)
    valid = to_blocks(valid_stream, block_size) if len(valid_stream) >= block_size else train[:0]
    return train, valid


def _write_log(log: list[dict[str, Any]]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        with (folder / "train_log.jsonl").open("w", encoding="utf-8") as fh:
            for record in log:
                fh.write(json.dumps(record) + "\n")

    return write


def check_block_size(model: torch.nn.Module, block_size: int, what: str) -> None:
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_pos is not None and block_size > n_pos:
        raise KdcodeError(f"--block-size {block_size} exceeds {what}'s {n_pos} positions; use --block-size {n_pos}")


def run_distil(spec: RunSpec, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Distil ``spec.teacher`` into a smaller student; returns (student folder, manifest)."""
    from kdcode.models import load_model
    from kdcode.plugins import validate_plugins

    out = Path(spec.out)
    check_out_dir(out, overwrite)
    strategy, init = validate_plugins(spec)
    teacher = load_model(
        spec.teacher.name, revision=spec.teacher.revision, trust_remote_code=spec.teacher.trust_remote_code
    )
    check_block_size(teacher.model, spec.train.block_size, "the teacher")
    if spec.data.format == "py150" and teacher.tokenizer.convert_tokens_to_ids("<EOL>") in (
        None,
        teacher.tokenizer.unk_token_id,
    ):
        raise KdcodeError("data.format py150 needs a tokenizer with the <EOL> token (CodeGPT-style)")
    corpus = load_corpus(spec.data)
    train_blocks, valid_blocks = _blocks(corpus, teacher.tokenizer, spec.train.block_size)
    student, layer_map = init.build(teacher.model, spec.student.layers)
    result = train_loop(
        student,
        strategy,
        train_blocks,
        valid_blocks,
        spec.train,
        teacher=teacher.model,
        description=f"distil {teacher.n_layer}->{spec.student.layers} layers",
    )
    manifest = {
        "kind": "student",
        "spec": spec.model_dump(mode="json"),
        "teacher": teacher.describe(),
        "strategy": {"name": spec.strategy.name, "params": strategy.params.model_dump()},
        "init": {"name": spec.student.init, "params": init.params.model_dump()},
        "layer_map": layer_map,
        "model": {
            "n_layer": student.config.num_hidden_layers,
            "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 3),
        },
        "data": _data_section(corpus, train_blocks, valid_blocks, spec.data.format),
        "training": result.summary(),
    }
    save_model(out, student, teacher.tokenizer, manifest, overwrite, extra=_write_log(result.log))
    return out, manifest


def run_pretrain(spec: PretrainSpec, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train a byte-level BPE tokenizer (or reuse one) and a GPT-2 from scratch on ``spec.data``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcode.bpe import train_bpe
    from kdcode.models import load_tokenizer
    from kdcode.plugins import make_strategy

    out = Path(spec.out)
    check_out_dir(out, overwrite)
    torch.manual_seed(spec.train.seed)
    corpus = load_corpus(spec.data)
    t0 = time.perf_counter()
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer)
    else:
        tokenizer = train_bpe((d.text for d in corpus.splits["train"]), spec.model.vocab_size)
    tok_time = time.perf_counter() - t0
    train_blocks, valid_blocks = _blocks(corpus, tokenizer, spec.train.block_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.train.block_size,
        n_embd=spec.model.hidden,
        n_layer=spec.model.layers,
        n_head=spec.model.heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: short single-machine runs are far from overfitting regimes.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    strategy = make_strategy("hard-only", {})
    result = train_loop(model, strategy, train_blocks, valid_blocks, spec.train, description="pretrain")
    manifest = {
        "kind": "pretrained",
        "spec": spec.model_dump(mode="json"),
        "model": {
            "n_layer": spec.model.layers,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "vocab_size": len(tokenizer),
        },
        "tokenizer": {"trained": spec.tokenizer is None, "source": spec.tokenizer, "seconds": round(tok_time, 1)},
        "data": _data_section(corpus, train_blocks, valid_blocks, spec.data.format),
        "training": result.summary(),
    }
    save_model(out, model, tokenizer, manifest, overwrite, extra=_write_log(result.log))
    return out, manifest
