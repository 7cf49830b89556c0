"""A run's state and its checkpoints: where it is (step, tokens, data position, RNGs), saved without pickle.

:class:`TrainState` is what the loop advances; :class:`Checkpointer` saves it with the modules and optimizers
into ``OUT.ckpt/`` and restores it on ``--resume``. Weights go to safetensors, every other state to
safetensors + JSON.

Optimizer state dicts and RNG states are nested dicts/lists of tensors and plain values. ``flatten``
pulls every tensor out into a flat ``{key: tensor}`` map (saved as safetensors) and leaves a JSON
skeleton that names them; ``unflatten`` puts them back. Dict keys keep their types (optimizer states
are keyed by int). A checkpoint folder is replaced atomically, so the last good one always survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kdcode.compression.prune import heads_per_layer
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import save_model
from kdcode.models.load import count_params
from kdcode.quiet import quiet_hf
from kdcode.train.runlog import write_log

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, tensors), flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], state: dict[str, Any]) -> None:
    """Write modules (safetensors, shared weights handled) and ``state`` into ``folder`` atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, module in modules.items():
            safetensors.torch.save_model(module, str(tmp / f"{name}.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(state, tensors)
        safetensors.torch.save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")
        if folder.exists():
            for extra in folder.iterdir():  # keep what is not part of a checkpoint (the live log, the tokenizer)
                if (tmp / extra.name).exists() or extra.name.startswith("."):
                    continue
                if extra.is_dir():
                    shutil.copytree(extra, tmp / extra.name)
                elif extra.is_file():
                    shutil.copy2(extra, tmp / extra.name)
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    for name, module in modules.items():
        safetensors.torch.load_model(module, str(folder / f"{name}.safetensors"))
    tensors = safetensors.torch.load_file(str(folder / STATE_TENSORS))
    return unflatten(json.loads((folder / STATE_JSON).read_text(encoding="utf-8")), tensors)


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file()


@dataclass
class RunContext:
    """Where a run keeps its working state: checkpoints, the live log, TensorBoard events."""

    checkpoint_dir: Path | None = None
    resume: bool = False
    fingerprint: str = ""  # hash of the run spec; a checkpoint of another spec is refused
    accepted: tuple[str, ...] = ()  # other names of the same spec (the older fingerprint of every field)
    tensorboard_dir: Path | None = None


def spec_fingerprint(spec: Any, exclude_defaults: bool = True) -> str:
    """Identity of a run for --resume: the resolved spec without its output folder, and without the fields left at
    their defaults, so that a field a later kdcode adds (at a default that changes nothing) keeps a checkpoint
    resumable. ``exclude_defaults=False``: every field, as older checkpoints were named."""
    data = spec.model_dump(mode="json", exclude_defaults=exclude_defaults)
    data.pop("out", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_context(spec: Any, resume: bool, tensorboard: bool = False) -> RunContext:
    """``OUT.ckpt`` (and ``OUT.tensorboard``) beside ``spec.out``; a checkpoint left there needs --resume."""
    out = Path(spec.out)
    ckpt = out.with_name(out.name + ".ckpt")
    if has_checkpoint(ckpt) and not resume:
        raise KdcodeError(
            f"{ckpt} holds a checkpoint of an interrupted run; add --resume to continue it, or delete that folder"
        )
    tb = out.with_name(out.name + ".tensorboard") if tensorboard else None
    return RunContext(checkpoint_dir=ckpt, resume=resume, fingerprint=spec_fingerprint(spec),
                      accepted=(spec_fingerprint(spec, exclude_defaults=False),), tensorboard_dir=tb)


@dataclass
class TrainState:
    """Where a run is: steps, tokens, its place in the shuffled data, and the clock (resumable)."""

    order: torch.Tensor  # the current epoch's shuffled block indices
    data_rng: torch.Generator
    cursor: int = 0
    step: int = 0
    tokens: int = 0
    elapsed0: float = 0.0  # seconds run before a resume
    log: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def fresh(cls, n_blocks: int, seed: int) -> TrainState:
        gen = torch.Generator().manual_seed(seed)
        return cls(order=torch.randperm(n_blocks, generator=gen), data_rng=gen)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.started

    def next_batch(self, batch: int) -> tuple[torch.Tensor, bool]:
        """The next ``batch`` block indices, and whether a new epoch (a reshuffle) began for them."""
        new_epoch = self.cursor + batch > len(self.order)
        if new_epoch:
            self.order = torch.randperm(len(self.order), generator=self.data_rng)
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + batch]
        self.cursor += batch
        return index, new_epoch


class Checkpointer:
    """Saves and restores a run: its modules, optimizers, grad scaler, RNGs and :class:`TrainState`."""

    def __init__(
        self,
        run: RunContext,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        scaler: Any,
        enabled: bool = True,
    ) -> None:
        self.run, self.modules, self.optimizers, self.scaler = run, modules, optimizers, scaler
        self.folder = run.checkpoint_dir if enabled else None

    def save(self, state: TrainState, reason: str, final: bool = False) -> None:
        """Save a resumable checkpoint; ``final`` (training is over) leaves the optimizer state out: it is only
        needed to train on, and the smallest checkpoint is the likeliest to fit on a disk that just filled up."""
        if self.folder is None:
            return
        snapshot = {
            "fingerprint": self.run.fingerprint, "reason": reason, "step": state.step, "tokens": state.tokens,
            "cursor": state.cursor, "order": state.order, "elapsed": state.elapsed(), "log": state.log,
            "optimizers": None if final else {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": torch.get_rng_state(), "data_rng": state.data_rng.get_state(),
        }
        save_checkpoint(self.folder, self.modules, snapshot)

    def restore(self, state: TrainState) -> None:
        """Load the checkpoint into the modules, optimizers and ``state`` (for --resume)."""
        folder = self.run.checkpoint_dir
        if folder is None or not has_checkpoint(folder):
            raise KdcodeError(f"--resume: no checkpoint in {folder}; start the run without --resume")
        saved = load_checkpoint(folder, self.modules)
        if saved["fingerprint"] not in (self.run.fingerprint, *self.run.accepted):
            raise KdcodeError(
                f"--resume: {folder} belongs to a run with another spec; use the same flags or another --out"
            )
        for name, opt in self.optimizers.items():
            if saved["optimizers"] is not None:  # None: a final checkpoint (nothing left to train)
                opt.load_state_dict(saved["optimizers"][name])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        state.data_rng.set_state(saved["data_rng"])
        state.order, state.cursor, state.step, state.tokens = (
            saved["order"], saved["cursor"], saved["step"], saved["tokens"]
        )
        state.elapsed0, state.log = saved["elapsed"], saved["log"]
        state.started = time.perf_counter()

    def last_good(self) -> Path | None:
        """The checkpoint folder when one holds a saved state (for messages)."""
        return self.run.checkpoint_dir if self.run.checkpoint_dir and has_checkpoint(self.run.checkpoint_dir) else None


# Up to this many parameters the round trip saves and reloads the weights too (a few seconds, a few hundred MB in
# the system's temp folder); above it, the config alone, and the architecture is rebuilt without weights.
ROUND_TRIP_MAX_PARAMS = 300_000_000


def check_round_trip(model: torch.nn.Module, tokenizer: Any) -> None:
    """Save ``model`` and ``tokenizer`` to a scratch folder and load them back with plain transformers, before
    any training: a save-time incompatibility (a config field kdcode did not map, say) then costs seconds, not a
    run. Head-pruned models (kdcode's own loader) are checked by that loader instead."""
    if heads_per_layer(model):
        return
    try:
        with tempfile.TemporaryDirectory(prefix="kdcode-roundtrip-") as tmp, quiet_hf():
            if count_params(model) <= ROUND_TRIP_MAX_PARAMS:
                model.save_pretrained(tmp, safe_serialization=True)
                AutoModelForCausalLM.from_pretrained(tmp)
            else:
                model.config.save_pretrained(tmp)
                with torch.device("meta"):
                    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp))
            tokenizer.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the user gets one line before training
        first = " ".join(str(exc).split())[:300]
        raise KdcodeError(
            f"the student built from this teacher cannot be saved and reloaded by transformers "
            f"({type(exc).__name__}: {first}); nothing was trained. Please report the teacher's architecture "
            f"({getattr(model.config, 'model_type', '?')})"
        ) from exc


def save_trained(
    out: Path, model: Any, tokenizer: Any, manifest: dict[str, Any], overwrite: bool, result: Any, run: RunContext
) -> None:
    """Save a trained model; if that fails, keep its final weights (and optimizer state) in ``OUT.ckpt`` so that
    the same command with ``--resume`` writes it without training again, and say so in the one error line."""
    try:
        save_model(out, model, tokenizer, manifest, overwrite, extra=write_log(result.log))
    except KdcodeError as exc:
        kept = ""
        if run.checkpoint_dir is not None and result.save_checkpoint is not None:
            try:
                result.save_checkpoint("final save failed")  # weights and state, no optimizer state
                kept = (f"; the trained weights (step {result.steps}) are in {run.checkpoint_dir}: make room, then "
                        "run the same command with --resume to write them")
            except Exception:  # noqa: BLE001 - the disk may be full for the checkpoint too
                last = run.checkpoint_dir if has_checkpoint(run.checkpoint_dir) else None
                kept = (f"; the checkpoint could not be written either; the last one ({last}) resumes from there"
                        if last else "; no checkpoint could be kept either")
        raise KdcodeError(f"{exc}{kept}") from exc
    if run.checkpoint_dir is not None:
        shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # the model is complete; the checkpoint is spent
