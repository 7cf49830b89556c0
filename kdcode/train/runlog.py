"""A run's log: every step's record to the live ``train_log.jsonl``, TensorBoard, a callback, the progress bar,
and, when stdout is not a terminal, a plain line every ~30 s with step, rate and ETA."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdcode.errors import KdcodeError
from kdcode.progress import make_progress

PLAIN_EVERY_S = 30.0  # a log line this often when the progress bar cannot be drawn (CI, nohup, a pipe)


def write_log(log: list[dict[str, Any]]) -> Callable[[Path], None]:
    """A writer of ``train_log.jsonl`` for :func:`kdcode.models.artifacts.save_model`'s ``extra``."""

    def write(folder: Path) -> None:
        with (folder / "train_log.jsonl").open("w", encoding="utf-8") as fh:
            for record in log:
                fh.write(json.dumps(record) + "\n")

    return write


class RunLog:
    """Context manager for one run's outputs while it trains (only the main process writes)."""

    def __init__(
        self,
        description: str,
        budget: Any,
        live_log: Path | None = None,
        tensorboard_dir: Path | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        enabled: bool = True,
    ) -> None:
        self.description, self.budget, self.on_step, self.enabled = description, budget, on_step, enabled
        self.live_log = live_log if enabled else None
        self.tensorboard_dir = tensorboard_dir if enabled else None
        self.writer: Any = None
        self.progress = make_progress(disable=not enabled, plain=False)  # its own plain lines: budget ETA
        self._plain_at = time.monotonic()

    def __enter__(self) -> RunLog:
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise KdcodeError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self.writer = SummaryWriter(str(self.tensorboard_dir))
        self.progress.__enter__()
        self.task = self.progress.add_task(self.description, total=self.budget.total_steps, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        if self.writer is not None:
            self.writer.close()

    def start_at(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def write(self, record: dict[str, Any], train_s: float) -> None:
        """One step's record everywhere it goes; ``train_s`` is the time spent in steps (for rates and ETA)."""
        if self.live_log is not None:
            self.live_log.parent.mkdir(parents=True, exist_ok=True)
            with self.live_log.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])
        if self.on_step:
            self.on_step(record)
        if not self.enabled:
            return
        info = f"loss {record['loss']:.3f}"
        console = self.progress.console
        if "valid_loss" in record:
            info += f" valid {record['valid_loss']:.3f}"
            console.print(
                f"step {record['step']}: loss {record['loss']:.4f}, valid {record['valid_loss']:.4f}, "
                f"lr {record['lr']:.2e}, {record['tokens_per_s']:.0f} tokens/s, {record['elapsed_s']:.0f} s",
                highlight=False,
            )
        self.progress.update(self.task, advance=1, info=info)
        if not console.is_terminal and time.monotonic() - self._plain_at >= PLAIN_EVERY_S:
            self._plain_at = time.monotonic()
            console.print(self.plain_line(record, train_s), highlight=False)

    def plain_line(self, record: dict[str, Any], train_s: float) -> str:
        step, total = record["step"], self.budget.total_steps
        eta = self.budget.eta(step, record["elapsed_s"], train_s / max(step, 1))
        eta_text = f", eta {eta:.0f} s" if eta is not None else ""
        return (
            f"{self.description}: step {step}{f'/{total}' if total else ''}, loss {record['loss']:.4f}, "
            f"{record['tokens_per_s']:.0f} tokens/s, {record['elapsed_s']:.0f} s{eta_text}"
        )
