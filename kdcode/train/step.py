"""One optimiser step: forward the student (and the teacher source), the strategy's loss, backward over the
micro-batches, clip, step. The loop calls it once per step; it knows nothing of budgets, logs or disks."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from kdcode.errors import KdcodeError


class Stepper:
    """The per-step function of a run, with what it needs set up once."""

    def __init__(
        self,
        accelerator: Any,
        student: torch.nn.Module,
        trainable: torch.nn.ModuleList,
        extra: list[torch.nn.Module],
        strategy: Any,
        source: Any,
        optimizer: torch.optim.Optimizer,
        cfg: Any,
        precision: str,
        budget: Any,
    ) -> None:
        self.accelerator, self.strategy, self.source, self.optimizer = accelerator, strategy, source, optimizer
        self.cfg, self.precision, self.budget, self.extra = cfg, precision, budget, extra
        self.device = accelerator.device
        self.trainable = trainable  # the student and the strategy's own modules (projections)
        world = budget.world
        # Data parallel: wrap what learns; a frozen teacher is just a replica on every process.
        self.student = accelerator.prepare_model(student) if world > 1 else student
        source.wrap(accelerator, world)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.fwd = strategy.forward_kwargs()
        self.amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.last_good: Any = None  # a callable naming the last checkpoint, for the NaN message

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"trainable": self.trainable, **self.source.modules()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer, **self.source.optimizers()}

    def set_lr(self, lr: float) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def __call__(self, blocks: torch.Tensor, index: torch.Tensor, progress: float, step: int) -> dict[str, float]:
        """Train on the blocks ``index`` names; returns each loss term, averaged over micro-batches (and processes)."""
        accel, cfg = self.accelerator, self.cfg
        sums: dict[str, float] = {}
        for a, part in self.budget.micro_batches(index, accel.process_index):
            x = blocks[part].to(self.device)
            sync = a == cfg.grad_accum - 1
            with contextlib.ExitStack() as stack:
                if self.budget.world > 1 and not sync:
                    stack.enter_context(accel.no_sync(self.student))
                    stack.enter_context(self.source.no_sync(accel))
                terms = self._loss(x, part, progress)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    good = self.last_good() if self.last_good else None
                    where = f"; the last good checkpoint is {good}" if good else ""
                    raise KdcodeError(
                        f"the loss became {loss.item()} at step {step}{where}; lower --lr or use --precision fp32"
                    )
                self.scaler.scale(loss / cfg.grad_accum).backward()
                self.source.backward(terms, self.scaler, cfg.grad_accum)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        self._update()
        if self.budget.world > 1:  # log the mean over processes
            packed = torch.tensor(list(sums.values()), device=self.device)
            sums = dict(zip(sums, accel.reduce(packed, "mean").tolist()))
        return sums

    def _loss(self, x: torch.Tensor, part: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        enabled = self.precision in ("bf16", "fp16")
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            s_out = self.student(x, **self.fwd)
            t_out = self.source.outputs(x, part, self.fwd)
            terms = self.strategy.loss(s_out, t_out, x, progress=progress)
            terms.update(self.source.extra_terms(self.strategy, t_out, x))
        return terms

    def _update(self) -> None:
        cfg, world = self.cfg, self.budget.world
        if world > 1 and self.extra:  # modules outside the DDP wrapper: average their gradients by hand
            for p in (p for m in self.extra for p in m.parameters() if p.grad is not None):
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        groups = [(self.optimizer, list(self.trainable.parameters()))]
        groups += [(opt, self.source.parameters()) for opt in self.source.optimizers().values()]
        for opt, params in groups:
            if cfg.grad_clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        self.scaler.update()
