"""Training checkpoints without pickle: weights in safetensors, every other state as safetensors + JSON.

Optimizer state dicts and RNG states are nested dicts/lists of tensors and plain values. ``flatten``
pulls every tensor out into a flat ``{key: tensor}`` map (saved as safetensors) and leaves a JSON
skeleton that names them; ``unflatten`` puts them back. Dict keys keep their types (optimizer states
are keyed by int). A checkpoint folder is replaced atomically, so the last good one always survives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

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
    from safetensors.torch import save_file, save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(state, tensors)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")
        if folder.exists():
            for extra in folder.iterdir():  # keep files that are not part of a checkpoint (the live log)
                if not (tmp / extra.name).exists() and extra.is_file():
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
    from safetensors.torch import load_file, load_model

    for name, module in modules.items():
        load_model(module, str(folder / f"{name}.safetensors"))
    tensors = load_file(str(folder / STATE_TENSORS))
    return unflatten(json.loads((folder / STATE_JSON).read_text(encoding="utf-8")), tensors)


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file()
