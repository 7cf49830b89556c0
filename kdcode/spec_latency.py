"""The latency budget a student is chosen by (`kdcode plan`, `kdcode distil --latency-ms`): the task that is timed
and the runtime it is timed in (backend, device, precision, threads), the shapes searched, the quality proxy.

Like :mod:`kdcode.spec` (which holds :class:`~kdcode.spec.PlanSpec` and uses :class:`LatencySpec` in its RunSpec),
this module imports neither torch nor any plugin.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdcode.spec_base import DeviceName, _Spec

Precision = Literal["fp32", "bf16", "int8", "int8-weight-only", "int8-per-token"]
#: what each runtime precision is, as `kdcode compress` writes it
PRECISIONS: dict[str, dict[str, object]] = {
    "fp32": {},
    "bf16": {"dtype": "bf16"},
    "int8": {"int8": True, "int8_scheme": "auto"},  # what kdcode compress --int8 writes on this CPU
    "int8-weight-only": {"int8": True, "int8_scheme": "weight-only"},
    "int8-per-token": {"int8": True, "int8_scheme": "per-token"},
}


class LatencySpec(_Spec):
    """A completion must take at most ``latency_ms`` on this machine, in the runtime the user will run."""

    latency_ms: float = Field(gt=0, description="the budget: milliseconds per completion on this machine")
    task: Literal["line", "infill"] = Field(
        "line", description="what is timed: a line completion, or an infill (prefix and suffix in the prompt)")
    prompt_tokens: int | None = Field(
        None, ge=1, description="prompt tokens per completion (default: min(positions, 1024) minus the new tokens)")
    new_tokens: int = Field(16, ge=1, description="tokens generated per completion (no early stop)")
    backend: Literal["torch"] = Field("torch", description="runtime the student will run in")
    device: DeviceName = "cpu"
    threads: int | None = Field(None, ge=1, description="threads the student will run with (default: torch's)")
    precisions: list[Precision] | None = Field(
        None, min_length=1, description="runtime precisions tried (default: fp32, plus bf16 where the device runs "
        "it natively, plus int8 where the CPU has int8 dot products)")
    ffn_keep: list[float] = Field(
        [1.0, 0.75, 0.5], min_length=1, description="fractions of each block's MLP channels kept (the rest pruned by "
        "importance)")
    head_prune: list[float] = Field(
        [0.0, 0.5], min_length=1, description="fractions of each block's attention heads removed (by importance)")
    margin: float = Field(0.10, ge=0, lt=0.5, description="fraction of the budget kept in hand: a shape must fit "
                          "within budget x (1 - margin), since one model's median moves between runs (up to 10% "
                          "measured on a shared 2-core machine)")
    rounds: int = Field(5, ge=1, description="interleaved timing rounds of the finalists")
    search_rounds: int = Field(2, ge=1, description="timing rounds of each shape while searching depths")
    proxy_blocks: int = Field(16, ge=1, description="held-out blocks the quality proxy is measured on")
    proxy_steps: int = Field(
        30, ge=0, description="KD steps each finalist takes before its held-out loss is measured (0: the loss at "
        "init; docs/latency.md says how each ranked distilled students)")
    proxy_batch_size: int = Field(8, ge=1, description="calibration blocks per proxy KD step")
    proxy_tie: float = Field(
        0.02, ge=0, description="finalists within the budget whose proxy loss is within this fraction of the best "
        "are near-ties: each is scored again after tie_steps KD steps, and the longer proxy chooses")
    tie_steps: int = Field(
        120, ge=0, description="KD steps of the near-tie proxy (from init; no second stage when not above "
        "proxy_steps)")

    def target_ms(self) -> float:
        """What a shape must fit within: the budget less its margin."""
        return self.latency_ms * (1.0 - self.margin)

    @model_validator(mode="after")
    def _fractions(self) -> LatencySpec:
        if any(not 0 < f <= 1 for f in self.ffn_keep):
            raise ValueError("ffn_keep: fractions in (0, 1]")
        if any(not 0 <= f < 1 for f in self.head_prune):
            raise ValueError("head_prune: fractions in [0, 1)")
        return self
