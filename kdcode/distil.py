"""The training loop, and the two recipes built on it: `distil` (KD into a smaller student) and
`pretrain` (a tokenizer and a GPT-2 from scratch, the ``hard-only`` strategy).

One loop for both, readable top to bottom: setup, loop (forward, loss, backward, step, log),
periodic held-out loss, result. It writes nothing itself; the recipes save through artifacts.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcode.artifacts import check_out_dir, save_model
from kdcode.compress import check_trainable, record_layout
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
    world_size: int = 1
    launcher: str = "none"
    global_batch: int = 0
    grad_accum: int = 1
    is_main: bool = True
    peak_memory_mb: float = 0.0  # max CUDA memory allocated, or peak process RSS on CPU

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("log", "is_main")}
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
    """Linear warmup over ``warmup_steps``, then cosine (or linear) decay to ``min_lr_ratio * lr`` at progress 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(progress, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


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


class Interrupted(KdcodeError):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the run can be resumed."""

    exit_code = 130


@dataclass
class RunContext:
    """Where a run keeps its working state: checkpoints, the live log, TensorBoard events."""

    checkpoint_dir: Path | None = None
    resume: bool = False
    fingerprint: str = ""  # hash of the run spec; a checkpoint of another spec is refused
    tensorboard_dir: Path | None = None


def launcher() -> str:
    if os.environ.get("ACCELERATE_MIXED_PRECISION") is not None or os.environ.get("ACCELERATE_USE_CPU"):
        return "accelerate"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    return "none" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "distributed"


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def train_loop(
    student: torch.nn.Module,
    strategy: Any,
    train_blocks: torch.Tensor,
    valid_blocks: torch.Tensor | None,
    cfg: TrainSpec,
    teacher: torch.nn.Module | None = None,
    description: str = "distil",
    on_step: Callable[[dict[str, Any]], None] | None = None,
    layer_map: list[int | None] | None = None,
    cache: Any = None,
    run: RunContext | None = None,
) -> TrainResult:
    """Train ``student`` with ``strategy`` on ``train_blocks`` (or the cached teacher targets of ``cache``).

    Data-parallel under ``accelerate launch`` / ``torchrun`` (each process takes its slice of every
    global batch of ``batch_size`` blocks); single process otherwise.
    """
    from accelerate import Accelerator

    run = run or RunContext()
    # ---- setup -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    precision = pick_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise KdcodeError("precision bf16 was asked for, but this CPU has no native bf16; use fp32")
    if precision == "fp16" and device.type != "cuda":
        raise KdcodeError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if cache is not None:
        if not strategy.supports_cache:
            raise KdcodeError(f"strategy {strategy.name!r} cannot train from a teacher cache; drop --teacher-cache")
        train_blocks, teacher = cache.input_ids, None
    n_blocks = len(train_blocks)
    batch = min(cfg.batch_size, n_blocks)
    shards = world * cfg.grad_accum
    if batch % shards:
        raise KdcodeError(
            f"batch_size {batch} must split evenly over {world} process(es) x {cfg.grad_accum} accumulation steps"
        )
    micro = batch // shards  # blocks per forward pass on each process
    steps_per_epoch = math.ceil(n_blocks / batch)
    budgets = [s for s in (cfg.max_steps, cfg.epochs and math.ceil(cfg.epochs * steps_per_epoch)) if s]
    total_steps = min(budgets) if budgets else None
    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None

    student.to(device).train()
    teacher_opt = None
    if strategy.needs_teacher and cache is None:
        if teacher is None:
            raise KdcodeError(f"strategy {strategy.name!r} needs a teacher")
        teacher.to(device)
        if strategy.needs_teacher_grad:  # in-training KD: the teacher learns too, with its own optimizer
            teacher.train()
            teacher_opt = make_optimizer(teacher, cfg.teacher_lr or cfg.lr / 10, cfg.weight_decay)
        else:
            teacher.eval().requires_grad_(False)
    extra = strategy.setup(student, teacher, layer_map) if teacher is not None else []
    trainable = torch.nn.ModuleList([student, *extra])
    optimizer = make_optimizer(trainable, cfg.lr, cfg.weight_decay)
    # Data parallel: wrap what learns; a frozen teacher is just a replica on every process.
    s_model = accelerator.prepare_model(student) if world > 1 else student
    t_model = accelerator.prepare_model(teacher) if world > 1 and teacher_opt is not None else teacher
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fwd = strategy.forward_kwargs()
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_blocks, generator=gen)
    amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    log: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    tokens = step = cursor = 0
    elapsed0 = 0.0
    modules = {"trainable": trainable, **({"teacher": teacher} if teacher_opt is not None else {})}
    optimizers = {"student": optimizer, **({"teacher": teacher_opt} if teacher_opt is not None else {})}
    ckpt = run.checkpoint_dir
    if ckpt is not None and run.resume:
        from kdcode.checkpoint import has_checkpoint, load_checkpoint

        if not has_checkpoint(ckpt):
            raise KdcodeError(f"--resume: no checkpoint in {ckpt}; start the run without --resume")
        state = load_checkpoint(ckpt, modules)
        if state["fingerprint"] != run.fingerprint:
            raise KdcodeError(f"--resume: {ckpt} belongs to a run with another spec; use the same flags or another --out")
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        torch.set_rng_state(state["rng"])
        gen.set_state(state["data_rng"])
        order, cursor, step, tokens = state["order"], state["cursor"], state["step"], state["tokens"]
        elapsed0, log = state["elapsed"], state["log"]
        last = log[-1] if log else {}

    def save(reason: str) -> None:
        if ckpt is None or not main:
            return
        from kdcode.checkpoint import save_checkpoint

        state = {
            "fingerprint": run.fingerprint, "reason": reason, "step": step, "tokens": tokens, "cursor": cursor,
            "order": order, "elapsed": elapsed0 + time.perf_counter() - start, "log": log,
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": torch.get_rng_state(), "data_rng": gen.get_state(),
        }
        save_checkpoint(ckpt, modules, state)

    stop = {"signal": None}

    def on_signal(signum: int, frame: Any) -> None:
        stop["signal"] = signal.Signals(signum).name

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)
    writer = None
    if run.tensorboard_dir is not None and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise KdcodeError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
        writer = SummaryWriter(str(run.tensorboard_dir))
    live_log = (ckpt / "train_log.jsonl") if ckpt is not None and main else None

    start = time.perf_counter()
    # ---- loop --------------------------------------------------------------------------------
    try:
        with make_progress(disable=not main) as progress:
            task = progress.add_task(description, total=total_steps, completed=step, info="")
            while True:
                elapsed = elapsed0 + time.perf_counter() - start
                if (total_steps is not None and step >= total_steps) or (max_seconds and elapsed >= max_seconds):
                    break
                frac = max(step / total_steps if total_steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)
                lr = lr_at(frac, step, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if cursor + batch > n_blocks:  # new epoch: reshuffle
                    order = torch.randperm(n_blocks, generator=gen)
                    cursor = 0
                    save("epoch")
                index = order[cursor : cursor + batch]
                cursor += batch

                sums: dict[str, float] = {}
                for a in range(cfg.grad_accum):  # this process's slice of each micro-batch
                    part = index[(a * world + rank) * micro : (a * world + rank + 1) * micro]
                    x = train_blocks[part].to(device)
                    sync = a == cfg.grad_accum - 1
                    with contextlib.ExitStack() as stack:
                        if world > 1 and not sync:
                            stack.enter_context(accelerator.no_sync(s_model))
                            if t_model is not teacher:
                                stack.enter_context(accelerator.no_sync(t_model))
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=precision in ("bf16", "fp16")):
                            s_out = s_model(x, **fwd)
                            t_out: Any = None
                            if cache is not None:
                                t_out = cache.targets(part).to(device)
                            elif strategy.needs_teacher and teacher_opt is not None:
                                t_out = t_model(x, **fwd)
                            elif strategy.needs_teacher:
                                with torch.no_grad():
                                    t_out = t_model(x, **fwd)
                            terms = strategy.loss(s_out, t_out, x, progress=frac)
                            if teacher_opt is not None:
                                terms["teacher_hard"] = strategy.teacher_loss(t_out, x)
                        loss = terms["loss"]
                        if not torch.isfinite(loss):
                            where = f"; the last good checkpoint is {ckpt}" if ckpt and (ckpt / "state.json").exists() else ""
                            raise KdcodeError(
                                f"the loss became {loss.item()} at step {step}{where}; lower --lr or use --precision fp32"
                            )
                        scaler.scale(loss / cfg.grad_accum).backward()
                        if teacher_opt is not None:
                            scaler.scale(terms["teacher_hard"] / cfg.grad_accum).backward()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                if world > 1 and extra:  # modules outside the DDP wrapper: average their gradients by hand
                    for p in (p for m in extra for p in m.parameters() if p.grad is not None):
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
                for opt, params in ((optimizer, trainable.parameters()),
                                    *(((teacher_opt, teacher.parameters()),) if teacher_opt is not None else ())):
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(opt)
                    opt.zero_grad(set_to_none=True)
                scaler.update()

                step += 1
                tokens += batch * train_blocks.size(1)
                if world > 1:  # log the mean over processes
                    packed = torch.tensor(list(sums.values()), device=device)
                    sums = dict(zip(sums, (accelerator.reduce(packed, "mean")).tolist()))
                last = {k: round(v, 5) for k, v in sums.items()}
                now = elapsed0 + time.perf_counter() - start
                record: dict[str, Any] = {"step": step, "lr": lr, "tokens": tokens, **last}
                if main and valid_blocks is not None and len(valid_blocks) and step % cfg.eval_every == 0:
                    record["valid_loss"] = held_out_loss(student, valid_blocks, max(micro, 1) * cfg.grad_accum,
                                                         cfg.eval_batches, device, precision)
                record.update(elapsed_s=round(now, 2), tokens_per_s=round(tokens / max(now, 1e-9), 1),
                              memory_mb=round(memory_mb(device), 1))
                log.append(record)
                if live_log is not None:
                    live_log.parent.mkdir(parents=True, exist_ok=True)
                    with live_log.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(k, v, step)
                if on_step:
                    on_step(record)
                info = f"loss {last['loss']:.3f}"
                if "valid_loss" in record:
                    info += f" valid {record['valid_loss']:.3f}"
                    progress.console.print(
                        f"step {step}: loss {last['loss']:.4f}, valid {record['valid_loss']:.4f}, lr {lr:.2e}, "
                        f"{record['tokens_per_s']:.0f} tokens/s, {now:.0f} s", highlight=False)
                progress.update(task, advance=1, info=info)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save("periodic")
                if stop["signal"]:
                    save(stop["signal"])
                    where = f"a checkpoint is in {ckpt}; continue with the same command and --resume" if ckpt else (
                        "no checkpoint was kept")
                    raise Interrupted(f"{stop['signal']} at step {step}: {where}")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if writer is not None:
            writer.close()

    if step == 0:
        raise KdcodeError("training ran no step: the budget (max_steps / epochs / max_minutes) is too small")
    final = dict(last)
    final.pop("step", None)
    if main and valid_blocks is not None and len(valid_blocks):
        final["valid_loss"] = held_out_loss(student, valid_blocks, max(micro, 1) * cfg.grad_accum,
                                            cfg.eval_batches, device, precision)
        final["valid_ppl"] = math.exp(min(final["valid_loss"], 50))
    wall = elapsed0 + time.perf_counter() - start
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
        world_size=world,
        launcher=launcher(),
        global_batch=batch,
        grad_accum=cfg.grad_accum,
        is_main=main,
        peak_memory_mb=round(peak_memory_mb(device), 1),
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


# Activation memory of one training step, per token, per unit of width, per layer, in bytes. A GPT-2
# block keeps about 34 bytes per token per hidden unit for the backward pass in 16-bit training
# (Korthikanti et al. 2022, "Reducing Activation Recomputation", without the attention-score term);
# fp32 keeps about twice that. Taking the lower figure and leaving out weights, optimiser state and
# attention scores keeps the estimate an underestimate: the guard only fires on runs that cannot fit.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
# Logits are fp32 (4 bytes) and held about three times: the logits, their (log-)softmax, the gradient.
LOGIT_COPIES = 3


def estimate_step_bytes(batch: int, block: int, hidden: int, layers: int, vocab: int) -> int:
    """A conservative estimate of one training step's activation memory (see the constants above)."""
    tokens = batch * block
    return tokens * hidden * layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER + tokens * vocab * 4 * LOGIT_COPIES


def available_memory(device: torch.device) -> int:
    """Free bytes where training runs: free CUDA memory on a GPU, available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(batch: int, block: int, hidden: int, layers: int, vocab: int, device: torch.device) -> int:
    """Fail before training when one step's estimated activations exceed the available memory.

    Returns the estimate in bytes. The message gives both numbers and the largest batch that would fit.
    """
    need = estimate_step_bytes(batch, block, hidden, layers, vocab)
    have = available_memory(device)
    if need > have:
        fits = have // max(estimate_step_bytes(1, block, hidden, layers, vocab), 1)
        hint = f"use --batch-size {fits} or lower --block-size" if fits >= 1 else "lower --block-size"
        raise KdcodeError(
            f"one training step needs about {_size(need)} of activation memory (batch {batch} x block {block}, "
            f"{layers} layers of width {hidden}, vocab {vocab}), but only {_size(have)} is free on {device.type}; "
            f"{hint}"
        )
    return need


def spec_fingerprint(spec: RunSpec) -> str:
    """Identity of a run for --resume: the resolved spec without its output folder."""
    data = spec.model_dump(mode="json")
    data.pop("out", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_context(spec: RunSpec, resume: bool) -> RunContext:
    from kdcode.checkpoint import has_checkpoint

    out = Path(spec.out)
    ckpt = out.with_name(out.name + ".ckpt")
    if has_checkpoint(ckpt) and not resume:
        raise KdcodeError(
            f"{ckpt} holds a checkpoint of an interrupted run; add --resume to continue it, or delete that folder"
        )
    tb = out.with_name(out.name + ".tensorboard") if spec.train.tensorboard else None
    return RunContext(checkpoint_dir=ckpt, resume=resume, fingerprint=spec_fingerprint(spec), tensorboard_dir=tb)


def run_distil(spec: RunSpec, overwrite: bool = False, resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Distil ``spec.teacher`` into a smaller student; returns (student folder, manifest).

    Interrupted runs (SIGINT/SIGTERM) leave a checkpoint in ``OUT.ckpt``; ``resume=True`` continues it.
    """
    from kdcode.cache import check_cache, load_cache
    from kdcode.models import load_model
    from kdcode.plugins import validate_plugins

    out = Path(spec.out)
    check_out_dir(out, overwrite)
    run = run_context(spec, resume)
    strategy, init = validate_plugins(spec)
    if spec.teacher_cache and not strategy.supports_cache:
        raise KdcodeError(f"strategy {spec.strategy.name!r} cannot train from a teacher cache; drop teacher_cache")
    teacher = load_model(
        spec.teacher.name,
        revision=spec.teacher.revision,
        trust_remote_code=spec.teacher.trust_remote_code,
        allow_pickle=spec.teacher.allow_pickle,
    )
    check_block_size(teacher.model, spec.train.block_size, "the teacher")
    if strategy.needs_teacher_grad:
        check_trainable(teacher.manifest, f"teacher {spec.teacher.name} (strategy {spec.strategy.name!r} trains it)")
    check_memory(
        spec.train.batch_size,
        spec.train.block_size,
        spec.student.hidden_size or teacher.model.config.hidden_size,
        spec.student.layers + (teacher.n_layer if strategy.needs_teacher_grad else 0),
        len(teacher.tokenizer),
        pick_device(),
    )
    eol = teacher.tokenizer.convert_tokens_to_ids("<EOL>")
    if spec.data.format == "py150" and eol in (None, teacher.tokenizer.unk_token_id):
        raise KdcodeError("data.format py150 needs a tokenizer with the <EOL> token (CodeGPT-style)")
    corpus = load_corpus(spec.data)
    cache = None
    if spec.teacher_cache:
        # The cache replaces the teacher's forward passes; the teacher's weights are still read once
        # for the init (layer-copy inits copy its blocks), then dropped.
        cache = load_cache(Path(spec.teacher_cache))
        wanted_t = getattr(strategy.params, "temperature", None)
        if wanted_t is not None and getattr(strategy.params, "temperature_schedule", "constant") != "constant":
            raise KdcodeError("a teacher cache holds soft targets at one temperature; use a constant temperature")
        if wanted_t is not None and abs(wanted_t - cache.manifest["temperature"]) > 1e-9:
            raise KdcodeError(
                f"teacher cache {spec.teacher_cache} holds soft targets at T={cache.manifest['temperature']}, the "
                f"strategy asks for T={wanted_t}; pass --temperature {cache.manifest['temperature']} or rebuild the cache"
            )
        check_cache(cache, cache_key(teacher, corpus, spec.data.format, spec.train.block_size), Path(spec.teacher_cache))
        train_blocks = cache.input_ids
        valid_stream = encode_documents(corpus.splits["valid"], teacher.tokenizer)
        bs = spec.train.block_size
        valid_blocks = to_blocks(valid_stream, bs) if len(valid_stream) >= bs else train_blocks[:0]
    else:
        train_blocks, valid_blocks = _blocks(corpus, teacher.tokenizer, spec.train.block_size)
    student, layer_map = init.build(
        teacher.model, spec.student.layers, spec.student.hidden_size, spec.student.heads, tokenizer=teacher.tokenizer
    )
    result = train_loop(
        student,
        strategy,
        train_blocks,
        valid_blocks,
        spec.train,
        teacher=None if cache is not None else teacher.model,
        description=f"distil {teacher.n_layer}->{spec.student.layers} layers",
        layer_map=layer_map,
        cache=cache,
        run=run,
    )
    if not result.is_main:  # data-parallel workers: the main process writes the student
        return out, {}
    manifest = {
        "kind": "student",
        "spec": spec.model_dump(mode="json"),
        "teacher": teacher.describe(),
        "strategy": {"name": spec.strategy.name, "params": strategy.params.model_dump()},
        "init": {"name": spec.student.init, "params": init.params.model_dump()},
        "layer_map": layer_map,
        "model": {
            "n_layer": student.config.num_hidden_layers,
            "hidden_size": student.config.hidden_size,
            "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 3),
        },
        "data": _data_section(corpus, train_blocks, valid_blocks, spec.data.format),
        "teacher_cache": {"path": spec.teacher_cache, "top_k": cache.manifest["top_k"]} if cache else None,
        "training": result.summary(),
    }
    record_layout(manifest, student, f"init {spec.student.init} {init.params.model_dump()}")
    save_model(out, student, teacher.tokenizer, manifest, overwrite, extra=_write_log(result.log))
    if run.checkpoint_dir is not None:
        shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # the student is complete; the checkpoint is spent
    return out, manifest


def cache_key(teacher: Any, corpus: Corpus, fmt: str, block_size: int) -> dict[str, Any]:
    """What a teacher cache must match to be reused: teacher, tokenizer, training data, block size."""
    from kdcode.cache import tokenizer_hash

    return {
        "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_hash": tokenizer_hash(teacher.tokenizer),
        "data_fingerprint": f"{fmt}:{fingerprint(corpus.splits['train'])}",
        "block_size": block_size,
    }


def run_cache_teacher(
    teacher_name: str, data: Any, block_size: int, top_k: int, temperature: float, out: Path,
    batch_size: int = 8, overwrite: bool = False, allow_pickle: bool = False,
) -> dict[str, Any]:
    """One teacher pass over the training blocks of ``data``, stored as top-k soft targets."""
    from kdcode.cache import build_cache
    from kdcode.models import load_model

    check_out_dir(out, overwrite)
    teacher = load_model(teacher_name, allow_pickle=allow_pickle)
    check_block_size(teacher.model, block_size, "the teacher")
    corpus = load_corpus(data)
    blocks = to_blocks(encode_documents(corpus.splits["train"], teacher.tokenizer), block_size)
    teacher.model.to(pick_device())
    meta = {"teacher": teacher_name, **cache_key(teacher, corpus, data.format, block_size), "data": corpus.summary()}
    return build_cache(teacher.model, blocks, out, top_k, temperature, meta, batch_size, overwrite)


def _init_model(spec: PretrainSpec) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model, tokenizer, shape and lineage of ``spec.init``: a GPT-2 whose training goes on."""
    from kdcode.models import load_model, load_tokenizer

    loaded = load_model(spec.init)
    check_trainable(loaded.manifest, f"--init {spec.init}")
    model, cfg = loaded.model, loaded.model.config
    if getattr(cfg, "model_type", None) != "gpt2":
        raise KdcodeError(f"--init {spec.init} is a {cfg.model_type} model; pretrain continues GPT-2 models only")
    actual = {"layers": cfg.n_layer, "hidden": cfg.n_embd, "heads": cfg.n_head, "vocab_size": cfg.vocab_size}
    for key in sorted(spec.model.model_fields_set):
        if getattr(spec.model, key) != actual[key]:
            flag = "--" + key.replace("_", "-")
            raise KdcodeError(
                f"{flag} {getattr(spec.model, key)} does not match the --init model ({actual[key]}); "
                f"drop {flag}: the shape comes from --init"
            )
    tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer else loaded.tokenizer
    if len(tokenizer) != cfg.vocab_size:
        raise KdcodeError(
            f"--tokenizer {spec.tokenizer} has {len(tokenizer)} tokens but the --init model has {cfg.vocab_size}; "
            "drop --tokenizer to use the --init model's own"
        )
    check_block_size(model, spec.train.block_size, f"the --init model {spec.init}")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(cfg, key, 0.0)
    parent = (loaded.manifest or {}).get("training", {})
    grand = (loaded.manifest or {}).get("init") or {}
    lineage = {
        "from": spec.init,
        "sha256": loaded.fingerprint,
        "steps": parent.get("steps"),
        "tokens_seen": parent.get("tokens_seen"),
        "wall_time_s": parent.get("wall_time_s"),
        # everything the parent has seen, its own parents included; this run's tokens are added at the end
        "tokens_seen_total": grand.get("tokens_seen_total") or parent.get("tokens_seen") or 0,
        "parent_init": grand or None,
    }
    return model.float(), tokenizer, type(spec.model)(**actual), lineage


def run_pretrain(spec: PretrainSpec, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train a byte-level BPE tokenizer (or reuse one) and a GPT-2 from scratch on ``spec.data``.

    With ``spec.init`` the training goes on from that model (its weights, shape and tokenizer), and the
    manifest records the parent's sha256 and how much training it had already had.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcode.bpe import train_bpe
    from kdcode.models import load_tokenizer
    from kdcode.plugins import make_strategy

    out = Path(spec.out)
    check_out_dir(out, overwrite)
    torch.manual_seed(spec.train.seed)
    lineage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    if spec.init:
        model, tokenizer, shape, lineage = _init_model(spec)
        spec = spec.model_copy(update={"model": shape})
    m = spec.model
    check_memory(spec.train.batch_size, spec.train.block_size, m.hidden, m.layers, m.vocab_size, pick_device())
    corpus = load_corpus(spec.data)
    if not spec.init and spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer)
    elif not spec.init:
        tokenizer = train_bpe((d.text for d in corpus.splits["train"]), spec.model.vocab_size)
    tok_time = time.perf_counter() - t0
    train_blocks, valid_blocks = _blocks(corpus, tokenizer, spec.train.block_size)
    if not spec.init:
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
        "tokenizer": {
            "trained": spec.tokenizer is None and spec.init is None,
            "source": spec.tokenizer or spec.init,
            "seconds": round(tok_time, 1),
        },
        "data": _data_section(corpus, train_blocks, valid_blocks, spec.data.format),
        "training": result.summary(),
    }
    if lineage is not None:
        lineage["tokens_seen_total"] += manifest["training"]["tokens_seen"]
        manifest["init"] = lineage
        record_layout(manifest, model, f"--init {spec.init}")
    save_model(out, model, tokenizer, manifest, overwrite, extra=_write_log(result.log))
    return out, manifest
