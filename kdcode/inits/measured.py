"""Student inits that choose the teacher's blocks by measurement on calibration blocks of the training data.

Half the depth of a deep, narrow model is a large cut, and which blocks go decides where the student starts: on
SmolLM2-135M (30 blocks) keeping every other block starts at a held-out loss above the uniform distribution's,
keeping the 15 blocks of highest Block Influence (ShortGPT, Men et al. 2024) far below it, the best contiguous run
of 15 removed blocks lower still. Methods (``params.method``):

- ``loss`` (default): Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") remove one
  contiguous run of blocks, chosen there by the angular distance between the run's input and output; here every
  contiguous run of the right length is scored by the calibration loss of the model without it (what the angular
  distance stands in for; n - k + 1 forward passes of the smaller model), and the lowest is kept.
- ``kl``: the same runs scored by KL(teacher || model without the run) on the calibration blocks: what KD will
  then minimise (a run of blocks that change nothing scores 0).
- ``angular``: Gromov et al.'s proxy itself: the run whose input and output hidden states are closest in angle
  (one forward pass of the teacher).
- ``influence``: ShortGPT's Block Influence, ``1 - cos(h_in, h_out)`` per block (one forward pass); keep the k
  blocks of highest influence.

Every method records all three scores (per-run losses only for ``loss``) in the manifest's ``init.origin``.
``auto`` (the default init) measures ``spread`` (evenly spaced blocks) against ``loss`` on the same calibration
blocks and keeps the lower: a shallow teacher keeps DistilGPT2's choice when it is as good, a deep one does not
start near uniform.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from kdcode.errors import KdcodeError
from kdcode.inits.base import (
    InitParams,
    LayerCopyInit,
    block_path,
    copy_weights,
    evenly_spaced,
    new_model,
    student_config,
)


class MeasuredParams(InitParams):
    method: Literal["loss", "kl", "angular", "influence"] = Field("loss",
                                                                  description="how blocks are ranked (see above)")
    calibration_blocks: int = Field(8, ge=1, le=256, description="training blocks the scores are measured on")


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    obj: Any = model
    for part in block_path(model).split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def block_states(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's input and output hidden states for ``x`` (hooks on the blocks: the model's own
    ``hidden_states`` output has the final norm applied to the last one)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def pre(_m: Any, args: tuple, kwargs: dict) -> None:
        inputs.append((args[0] if args else kwargs["hidden_states"]).float())

    def post(_m: Any, _args: Any, out: Any) -> None:
        outputs.append((out[0] if isinstance(out, tuple) else out).float())

    hooks = []
    for block in _blocks(model):
        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(block.register_forward_hook(post))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.size(-1)), b.reshape(-1, b.size(-1)), dim=-1)


@torch.no_grad()
def influence_and_angles(model: torch.nn.Module, x: torch.Tensor, drop: int) -> tuple[list[float], list[float]]:
    """(Block Influence per block, mean angular distance / pi between the input of block s and the output of block
    s + drop - 1 for every start s)."""
    inputs, outputs = block_states(model, x)
    influence = [float(1 - _cos(i, o).mean()) for i, o in zip(inputs, outputs)]
    angles = [float(torch.arccos(_cos(inputs[s], outputs[s + drop - 1]).clamp(-1, 1)).mean() / math.pi)
              for s in range(len(inputs) - drop + 1)]
    return influence, angles


@torch.no_grad()
def _pruned_logits(teacher: torch.nn.Module, layer_map: list[int], x: torch.Tensor) -> torch.Tensor:
    model = new_model(student_config(teacher, list(layer_map)))
    copy_weights(model, teacher, list(layer_map), True)
    return model.eval()(x).logits[:, :-1].float()


def calibration_loss(teacher: torch.nn.Module, layer_map: list[int], x: torch.Tensor) -> float:
    """Next-token loss on ``x`` of the teacher with only the blocks ``layer_map`` names (a student at init)."""
    logits = _pruned_logits(teacher, layer_map, x)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)))


def calibration_kl(teacher_logp: torch.Tensor, teacher: torch.nn.Module, layer_map: list[int],
                   x: torch.Tensor) -> float:
    """Mean per-token KL(teacher || teacher with only ``layer_map``'s blocks) on ``x``."""
    logp = torch.log_softmax(_pruned_logits(teacher, layer_map, x), -1)
    return float((teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean())


def _run(n_teacher: int, layers: int, start: int) -> list[int]:
    drop = n_teacher - layers
    return [j for j in range(n_teacher) if not start <= j < start + drop]


class Measured(LayerCopyInit):
    """Keep the teacher blocks whose removal costs most, measured on calibration blocks (see the module doc)."""

    summary = "blocks chosen by measurement on calibration data (contiguous run of lowest loss; angular; influence)"
    Params = MeasuredParams
    params: MeasuredParams
    needs_calibration = True

    def prepare(self, teacher: torch.nn.Module, calibration: torch.Tensor, layers: int) -> None:
        n_teacher = int(teacher.config.num_hidden_layers)
        self.check(n_teacher, layers)
        x = calibration[: self.params.calibration_blocks].to(next(teacher.parameters()).device)
        drop = n_teacher - layers
        scores: dict[str, Any] = {"method": self.params.method, "calibration_tokens": int(x.numel()),
                                  "dropped_blocks": drop}
        if drop == 0:
            self.origin, self._map = {"measured": scores}, list(range(n_teacher))
            return
        was_training = teacher.training
        teacher.eval()
        try:
            influence, angles = influence_and_angles(teacher, x, drop)
            scores["block_influence"] = [round(v, 5) for v in influence]
            scores["angular_distance_by_start"] = [round(v, 5) for v in angles]
            if self.params.method == "influence":
                keep = sorted(sorted(range(n_teacher), key=lambda j: -influence[j])[:layers])
            elif self.params.method == "angular":
                keep = _run(n_teacher, layers, min(range(len(angles)), key=angles.__getitem__))
            elif self.params.method == "kl":
                with torch.no_grad():
                    ref = torch.log_softmax(teacher(x).logits[:, :-1].float(), -1)
                kls = [calibration_kl(ref, teacher, _run(n_teacher, layers, s), x) for s in range(len(angles))]
                scores["kl_by_start"] = [round(v, 7) for v in kls]
                keep = _run(n_teacher, layers, min(range(len(kls)), key=kls.__getitem__))
            else:
                losses = [calibration_loss(teacher, _run(n_teacher, layers, s), x) for s in range(len(angles))]
                scores["loss_by_start"] = [round(v, 4) for v in losses]
                keep = _run(n_teacher, layers, min(range(len(losses)), key=losses.__getitem__))
            scores["calibration_loss"] = round(calibration_loss(teacher, keep, x), 4)
        finally:
            teacher.train(was_training)
        self.origin, self._map = {"measured": scores}, keep

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        chosen = getattr(self, "_map", None)
        if chosen is None or len(chosen) != layers:
            raise KdcodeError(f"init {self.name!r} measures the teacher's blocks on calibration data first; it runs "
                              "inside kdcode distil (call prepare(teacher, blocks, layers) before build)")
        return list(chosen)


class Auto(Measured):
    """``spread`` or the measured contiguous run, whichever has the lower calibration loss."""

    summary = "the lower calibration loss of spread (evenly spaced) and the measured contiguous run: the default"

    def prepare(self, teacher: torch.nn.Module, calibration: torch.Tensor, layers: int) -> None:
        self.params = self.params.model_copy(update={"method": "loss"})
        super().prepare(teacher, calibration, layers)
        n_teacher = int(teacher.config.num_hidden_layers)
        measured = self.origin["measured"]
        if n_teacher == layers:
            return
        spread = evenly_spaced(n_teacher, layers)
        x = calibration[: self.params.calibration_blocks].to(next(teacher.parameters()).device)
        was_training = teacher.training
        try:
            spread_loss = calibration_loss(teacher.eval(), spread, x)
        finally:
            teacher.train(was_training)
        measured["spread_calibration_loss"] = round(spread_loss, 4)
        if spread_loss <= measured["calibration_loss"]:
            self._map = spread
            measured["chosen"] = "spread"
        else:
            measured["chosen"] = "contiguous run of lowest loss"
