"""The one training loop, for `distil` and `pretrain` alike. It reads top to bottom: setup, loop (step, log,
periodic held-out loss, checkpoint, signals), result. Its parts have names: the :class:`~kdcode.train.budget.Budget`
(steps / time / batch split), the :class:`~kdcode.train.state.TrainState` and its
:class:`~kdcode.train.state.Checkpointer`, the per-step :class:`~kdcode.train.step.Stepper`, the teacher
source (frozen, cached, or trained alongside: :mod:`kdcode.train.teachers`), the
:class:`~kdcode.train.runlog.RunLog` and :func:`stop_on_signals`. It writes nothing but checkpoints and logs;
the recipes save through :mod:`kdcode.models.artifacts`.

Timing: ``wall_time_s`` is the loop (its periodic held-out losses included, as the time budget counts
them); ``train_time_s`` the steps alone, which ``tokens_per_s`` divides by; ``eval_time_s`` every
held-out loss, the final one included.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from kdcode.device import describe_device, memory_mb, peak_memory_mb, set_threads
from kdcode.errors import KdcodeError
from kdcode.evaluation.perplexity import held_out_loss
from kdcode.spec import TrainSpec
from kdcode.train.budget import Budget
from kdcode.train.heap import kept_heap
from kdcode.train.optim import lr_at, make_optimizer
from kdcode.train.resources import launcher, pick_precision, recompute_activations
from kdcode.train.runlog import RunLog
from kdcode.train.state import Checkpointer, RunContext, TrainState
from kdcode.train.step import Stepper
from kdcode.train.teachers import teacher_source


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    wall_time_s: float  # the loop, periodic held-out losses included
    tokens_per_s: float  # tokens / train_time_s
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
    train_time_s: float = 0.0  # the steps alone
    eval_time_s: float = 0.0  # held-out losses, periodic and final
    save_checkpoint: Callable[[str], None] | None = None  # keeps the final state (when the final save fails)
    heap: str = "system"  # "kept": freed memory stayed in the heap during the loop (kdcode.train.heap)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("log", "is_main", "save_checkpoint")}
        out["valid_curve"] = [r for r in self.log if "valid_loss" in r]
        return out


class Interrupted(KdcodeError):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the run can be resumed."""

    exit_code = 130


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, str | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (so a checkpoint can be saved)."""
    stop: dict[str, str | None] = {"signal": None}
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.update(signal=signal.Signals(signum).name))
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


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
    vocab: int | None = None,
) -> TrainResult:
    """Train ``student`` with ``strategy`` on ``train_blocks`` (or the cached teacher targets of ``cache``); the
    losses see the first ``vocab`` logits (the tokenizer's tokens; None: all).

    Data-parallel under ``accelerate launch`` / ``torchrun`` (each process takes its slice of every global
    batch of ``batch_size`` blocks); single process otherwise.
    """
    # ---- setup -------------------------------------------------------------------------------------
    run = run or RunContext()
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    precision = pick_precision(cfg.precision, device)
    source = teacher_source(strategy, teacher, cache, cfg, device)
    blocks = cache.input_ids if cache is not None else train_blocks
    budget = Budget.plan(cfg, len(blocks), world)
    student.to(device).train()
    recompute_activations(student, cfg.activation_checkpointing)
    strategy.use_logits(vocab, cfg.loss_chunk)
    extra = strategy.setup(student, source.model, layer_map) if source.model is not None else []
    trainable = torch.nn.ModuleList([student, *extra])
    step_fn = Stepper(accelerator, student, trainable, extra, strategy, source,
                      make_optimizer(trainable, cfg.lr, cfg.weight_decay), cfg, precision, budget)
    state = TrainState.fresh(len(blocks), cfg.seed)
    ckpt = Checkpointer(run, step_fn.modules(), step_fn.optimizers(), step_fn.scaler, enabled=main)
    step_fn.last_good = ckpt.last_good
    if run.resume:
        ckpt.restore(state)
    has_valid = main and valid_blocks is not None and len(valid_blocks) > 0
    eval_s = [0.0]

    def valid_loss() -> float:
        t0 = time.perf_counter()
        loss = held_out_loss(student, valid_blocks, max(budget.micro, 1) * cfg.grad_accum, cfg.eval_batches,
                             device, precision)
        eval_s[0] += time.perf_counter() - t0
        return loss

    live = run.checkpoint_dir / "train_log.jsonl" if run.checkpoint_dir is not None else None
    # ---- loop --------------------------------------------------------------------------------------
    with (kept_heap(device.type == "cpu") as heap, stop_on_signals() as stop,
          RunLog(description, budget, live, run.tensorboard_dir, on_step, main) as log):
        log.start_at(state.step)
        while not budget.done(state.step, state.elapsed()):
            frac = budget.progress(state.step, state.elapsed())
            lr = step_fn.set_lr(lr_at(frac, state.step, cfg))
            index, new_epoch = state.next_batch(budget.batch)
            if new_epoch:
                ckpt.save(state, "epoch")
            terms = step_fn(blocks, index, frac, state.step)
            state.step += 1
            state.tokens += budget.batch * blocks.size(1)
            now = state.elapsed()
            train_s = max(now - eval_s[0], 1e-9)
            record: dict[str, Any] = {"step": state.step, "lr": lr, "tokens": state.tokens,
                                      **{k: round(v, 5) for k, v in terms.items()}}
            if has_valid and state.step % cfg.eval_every == 0:
                record["valid_loss"] = valid_loss()
            record.update(elapsed_s=round(now, 2), tokens_per_s=round(state.tokens / train_s, 1),
                          memory_mb=round(memory_mb(device), 1))
            state.log.append(record)
            log.write(record, train_s)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                ckpt.save(state, "periodic")
            if stop["signal"]:
                ckpt.save(state, stop["signal"])
                where = (f"a checkpoint is in {run.checkpoint_dir}; continue with the same command and --resume"
                         if run.checkpoint_dir else "no checkpoint was kept")
                raise Interrupted(f"{stop['signal']} at step {state.step}: {where}")
    # ---- result ------------------------------------------------------------------------------------
    if state.step == 0:
        raise KdcodeError("training ran no step: the budget (max_steps / epochs / max_minutes) is too small")
    wall = state.elapsed()
    loop_eval_s = eval_s[0]
    final = {k: v for k, v in (state.log[-1] if state.log else {}).items()
             if k not in ("step", "lr", "tokens", "valid_loss", "elapsed_s", "tokens_per_s", "memory_mb")}
    if has_valid:
        final["valid_loss"] = valid_loss()
        final["valid_ppl"] = math.exp(min(final["valid_loss"], 50))
    recompute_activations(student, False)
    student.eval()
    return TrainResult(
        steps=state.step, tokens_seen=state.tokens, wall_time_s=round(wall, 2),
        tokens_per_s=round(state.tokens / max(wall - loop_eval_s, 1e-9), 1), device=describe_device(device),
        precision=precision, threads=torch.get_num_threads(), final=final, log=state.log, world_size=world,
        launcher=launcher(), global_batch=budget.batch, grad_accum=cfg.grad_accum, is_main=main,
        peak_memory_mb=round(peak_memory_mb(device), 1), train_time_s=round(wall - loop_eval_s, 2),
        eval_time_s=round(eval_s[0], 2), heap=heap, save_checkpoint=lambda reason: ckpt.save(state, reason, final=True),
    )
