"""ONNX Runtime: a `kdcode export --format onnx` folder run step by step, past key values fed back as arrays.

The graph's signature is :mod:`kdcode.export.onnx_graph`'s. The cache is the list of ``present.*`` arrays of
the last step; beam search reorders its rows with numpy. ONNX Runtime runs on the CPU here (``--device cpu``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig

from kdcode.errors import KdcodeError
from kdcode.export.onnx_graph import BASE_INPUTS, cache_shape
from kdcode.inference.backends.base import StepModel
from kdcode.models.artifacts import read_manifest
from kdcode.models.artifacts import verify as verify_folder
from kdcode.models.load import load_error
from kdcode.quiet import quiet_hf


class ArrayCache:
    """Past keys and values as numpy arrays, (rows, kv_heads, positions, head_dim) each, two per layer."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def get_seq_length(self) -> int:
        return int(self.arrays[0].shape[2]) if self.arrays else 0

    def reorder_cache(self, rows: torch.Tensor) -> None:
        index = rows.cpu().numpy()
        self.arrays = [a[index] for a in self.arrays]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.arrays = [np.repeat(a, repeats, axis=0) for a in self.arrays]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (a negative ``length`` drops that many from the end)."""
        keep = length if length >= 0 else self.get_seq_length() + length
        self.arrays = [a[:, :, :keep] for a in self.arrays]


class OrtModel(StepModel):
    backend = "onnxruntime"

    def __init__(self, folder: Path, config: Any, manifest: dict[str, Any], threads: int) -> None:
        import onnxruntime as ort

        files = [folder / name for name in (manifest.get("onnx") or {}).get("files", ["model.onnx"])]
        super().__init__(config, files, int((manifest.get("model") or {}).get("params", 0)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign graph: one line
            raise KdcodeError(f"ONNX Runtime cannot load {folder / 'model.onnx'}: {' '.join(str(exc).split())[:200]}"
                              " (re-export it)") from exc
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names[: len(BASE_INPUTS)]) != BASE_INPUTS:
            raise KdcodeError(f"{folder / 'model.onnx'} does not take kdcode's decoder inputs {BASE_INPUTS}; "
                              "make it with kdcode export --format onnx")
        self.past_names = names[len(BASE_INPUTS) :]
        layers, self.kv_heads, self.head_dim = cache_shape(config)
        if len(self.past_names) != 2 * layers:
            raise KdcodeError(f"{folder / 'model.onnx'} has {len(self.past_names)} past inputs for {layers} layers")
        self.dtype_name = "int8 dynamic (MatMul), rest float32" if (manifest.get("export") or {}).get("int8") \
            else "float32"

    def decode_step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int
    ) -> tuple[torch.Tensor, Any]:
        rows, seq = input_ids.shape
        if cache is None:
            empty = np.zeros((rows, self.kv_heads, 0, self.head_dim), dtype=np.float32)
            cache = ArrayCache([empty] * len(self.past_names))
        feed = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64),
            "attention_mask": mask.cpu().numpy().astype(np.int64),
            "position_ids": pos.cpu().numpy().astype(np.int64),
            "logits_index": np.arange(seq - keep, seq, dtype=np.int64),
            **dict(zip(self.past_names, cache.arrays)),
        }
        logits, *present = self.session.run(None, feed)
        return torch.from_numpy(logits), ArrayCache(present)


def load_onnx(folder: Path, threads: int, verify: bool) -> tuple[OrtModel, dict[str, Any], bool | None]:
    """The ONNX export in ``folder``: (model, manifest, verified)."""
    manifest = read_manifest(folder)
    if not (folder / "model.onnx").is_file() or not manifest or manifest.get("format") != "onnx":
        raise KdcodeError(f"{folder} is not a kdcode ONNX export (model.onnx + kdcode.json); make one with "
                          f"kdcode export MODEL --format onnx --out {folder}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise KdcodeError("the onnxruntime backend needs ONNX Runtime: pip install 'kdcode[onnx]'") from exc
    verified = verify_folder(folder) if verify else False
    try:
        with quiet_hf():
            config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a damaged config.json: one line, as for a torch folder
        raise load_error(folder, exc) from exc
    return OrtModel(folder, config, manifest, threads), manifest, verified
