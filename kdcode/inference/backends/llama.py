"""llama.cpp, through llama-cpp-python's low-level API (``llama_decode`` and the logits of a batch): a GGUF file
run step by step under kdcode's decoder.

Each row of a decoding batch is a llama.cpp sequence in one context whose KV cells all sequences share (a
unified KV cache): a prompt's tokens go in with their positions (left padding is simply not sent), the logits of
the kept positions come back, and beam search's row reordering is ``llama_memory_seq_cp`` into fresh sequence
ids. The context holds one live cache at a time: a prompt (``cache`` None) starts over, and a cache from before
is refused. The KV cache is float32 and flash attention off, so that an f32 GGUF computes what torch does up to
llama.cpp's own kernels (its GELU reads an fp16 table). Rows are limited to the capacity the context was made
with (grown for a prompt when needed, up to :data:`MAX_ROWS`). So are the KV cells per row: not the model's whole
context (8k for SmolLM2, 128k for many models: gigabytes of float32 cache for every row) but :data:`ROW_POSITIONS`
at first, grown for a prompt that needs more, with :data:`HEADROOM` cells past the prompt for what is decoded.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcode.errors import KdcodeError
from kdcode.export.fileset import sidecar_path
from kdcode.export.gguf_file import gguf_manifest, read_fields
from kdcode.export.gguf_vocab import tokenizer_from_gguf
from kdcode.inference.backends.base import StepModel, config_namespace
from kdcode.models.artifacts import sha256_file

# llama.cpp's log is process-wide (one callback for the whole library): its last lines are kept here, and shown
# only when a load or a decode fails, instead of its load report on every start.
_LOG: deque[str] = deque(maxlen=8)
_CALLBACK: list[Any] = []


def _quiet_llama_log() -> None:
    import llama_cpp

    if not _CALLBACK:
        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, user_data: Any) -> None:
            _LOG.append(text.decode("utf-8", "replace").strip())

        _CALLBACK.append(keep)
        llama_cpp.llama_log_set(keep, None)


def _last_log() -> str:
    lines = [line for line in _LOG if line]
    return f" (llama.cpp: {lines[-1][:200]})" if lines else ""


MAX_ROWS = 64  # sequences a context may hold (llama.cpp allows 256 ids; beam reordering needs twice the rows)
START_ROWS = 8
ROW_POSITIONS = 2048  # KV cells per row a context starts with (up to the model's context length)
HEADROOM = 512  # KV cells per row kept past a prompt, for the tokens decoded after it


class SeqCache:
    """A decoding batch's rows as llama.cpp sequence ids; valid only while its model's context holds it."""

    def __init__(self, model: LlamaModel, seqs: list[int], epoch: int) -> None:
        self.model, self.seqs, self.epoch = model, seqs, epoch

    def _live(self) -> Any:
        if self.epoch != self.model.epoch:
            raise KdcodeError("this llama.cpp cache was replaced by a newer prompt on the same model (one at a time)")
        return self.model.memory

    def get_seq_length(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_memory_seq_pos_max(self._live(), self.seqs[0])) + 1

    def reorder_cache(self, rows: torch.Tensor) -> None:
        self.seqs = self.model.copy_rows(self.seqs, [int(r) for r in rows.tolist()], self._live())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.seqs = self.model.copy_rows(self.seqs, [r for r in range(len(self.seqs)) for _ in range(repeats)],
                                         self._live())

    def crop(self, length: int) -> None:
        import llama_cpp

        mem = self._live()
        keep = length if length >= 0 else self.get_seq_length() + length
        for seq in self.seqs:
            llama_cpp.llama_memory_seq_rm(mem, seq, keep, -1)


class LlamaModel(StepModel):
    backend = "llama.cpp"

    def __init__(self, path: Path, fields: dict[str, Any], threads: int) -> None:
        import llama_cpp

        arch = fields["general.architecture"]
        n_ctx = int(fields[f"{arch}.context_length"])
        tensors = fields["tensors"]
        vocab = int(fields.get("tokenizer.ggml.tokens") or 0)
        config = config_namespace(model_type=arch, vocab_size=vocab, n_positions=n_ctx,
                                  num_hidden_layers=int(fields[f"{arch}.block_count"]))
        params = sum(int(np.prod(shape)) for _, shape in tensors.values())
        super().__init__(config, [path], params)
        quant = (gguf_manifest(fields) or {}).get("export", {}).get("quant") or \
            "/".join(sorted({kind.lower() for kind, shape in tensors.values() if len(shape) > 1}))
        self.dtype_name = f"{quant} (GGUF)"
        self.path, self.threads, self.n_positions = path, threads, n_ctx
        self.row_positions = min(n_ctx, ROW_POSITIONS)
        _quiet_llama_log()
        llama_cpp.llama_backend_init()
        params_ = llama_cpp.llama_model_default_params()
        params_.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params_)
        if not self.model:
            raise KdcodeError(f"llama.cpp cannot load {path}: a damaged GGUF, or one this llama.cpp does not know"
                              f"{_last_log()}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx = self.batch = None
        self.rows = 0
        self.epoch = 0
        self._context(START_ROWS)

    def _context(self, rows: int) -> None:
        """A fresh context for ``rows`` sequences (twice as many ids, for reordering)."""
        import llama_cpp

        self._free_context()
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = self.row_positions * rows
        p.n_batch = p.n_ctx
        p.n_ubatch = min(p.n_ctx, 512)
        p.n_seq_max = 2 * rows
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.kv_unified = True
        p.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise KdcodeError(f"llama.cpp cannot make a context of {p.n_ctx} positions for {self.path}{_last_log()}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(p.n_batch, 0, 1)
        self.rows, self.free = rows, list(range(2 * rows))
        self.epoch += 1

    def copy_rows(self, seqs: list[int], sources: list[int], mem: Any) -> list[int]:
        """New sequence ids whose cells are those of ``seqs[s]`` for each ``s`` in ``sources``; ``seqs`` freed."""
        import llama_cpp

        if len(sources) > self.rows:
            raise KdcodeError(f"the llama.cpp context holds {self.rows} rows; this decoding needs {len(sources)} "
                              "(fewer beams or a smaller batch)")
        fresh = []
        for s in sources:
            new = self.free.pop(0)
            llama_cpp.llama_memory_seq_cp(mem, seqs[s], new, -1, -1)
            fresh.append(new)
        for old in seqs:
            llama_cpp.llama_memory_seq_rm(mem, old, -1, -1)
            self.free.append(old)
        return fresh

    def decode_step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int
    ) -> tuple[torch.Tensor, Any]:
        import llama_cpp

        rows, seq = input_ids.shape
        if cache is None:
            need = min(self.n_positions, seq + HEADROOM)
            if rows > self.rows or need > self.row_positions:
                if rows > MAX_ROWS:
                    raise KdcodeError(f"the llama.cpp backend decodes at most {MAX_ROWS} rows at once, not {rows}")
                if need > self.row_positions:
                    self.row_positions = min(self.n_positions, max(need, 2 * self.row_positions))
                self._context(max(rows, 2 * self.rows) if rows > self.rows else self.rows)
            llama_cpp.llama_memory_clear(self.memory, True)
            self.epoch += 1
            self.free = list(range(2 * self.rows))
            cache = SeqCache(self, [self.free.pop(0) for _ in range(rows)], self.epoch)
        else:
            cache._live()
        wanted = self._fill(input_ids.tolist(), mask[:, -seq:].tolist(), pos.tolist(), cache.seqs, keep)
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            room = (f"no room left in its KV cache of {self.row_positions * self.rows} cells; ask for fewer new "
                    "tokens") if rc == 1 else "an internal error"
            raise KdcodeError(f"llama.cpp could not decode this batch (llama_decode returned {rc}: {room})"
                              f"{_last_log()}")
        logits = np.zeros((rows, keep, self.n_vocab), dtype=np.float32)
        for i, (row, k) in wanted:
            ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
            logits[row, k] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return torch.from_numpy(logits), cache

    def _fill(self, ids: list[list[int]], mask: list[list[int]], pos: list[list[int]], seqs: list[int],
              keep: int) -> list[tuple[int, tuple[int, int]]]:
        """Put the unmasked tokens of every row in the batch; returns (batch index, (row, kept position))."""
        b, n, wanted = self.batch, 0, []
        first_kept = len(ids[0]) - keep
        for row, (row_ids, row_mask, row_pos) in enumerate(zip(ids, mask, pos)):
            for t, (tok, m, p) in enumerate(zip(row_ids, row_mask, row_pos)):
                if not m:
                    continue
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, p, 1
                b.seq_id[n][0] = seqs[row]
                b.logits[n] = t >= first_kept
                if t >= first_kept:
                    wanted.append((n, (row, t - first_kept)))
                n += 1
        b.n_tokens = n
        return wanted

    def _free_context(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        import llama_cpp

        self._free_context()
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to free into
            pass


def load_gguf(path: Path, threads: int, verify: bool) -> tuple[LlamaModel, Any, dict[str, Any] | None, bool | None]:
    """A GGUF file for the llama.cpp backend: (model, tokenizer, manifest (its sidecar, else the provenance
    inside it), verified: True when the sidecar's sha256 matches, None without a sidecar)."""
    try:
        import gguf
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise KdcodeError("the llama.cpp backend needs llama-cpp-python and gguf: pip install 'kdcode[llamacpp]', or "
                          "run the GGUF dequantized in torch with --backend torch") from exc

    fields = read_fields(path)
    sidecar = sidecar_path(path)
    manifest = read_manifest_file(sidecar) if sidecar.is_file() else None
    verified: bool | None = None
    if manifest is not None and verify:
        if sha256_file(path) != manifest.get("sha256"):
            raise KdcodeError(f"{path} does not match the sha256 in {sidecar.name} (edited or corrupted); re-export "
                              "it, or pass --no-verify to load it anyway")
        verified = True
    elif not verify:
        verified = False
    tokenizer = tokenizer_from_gguf(gguf.GGUFReader(str(path)))
    return LlamaModel(path, fields, threads), tokenizer, manifest or gguf_manifest(fields), verified


def read_manifest_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdcodeError(f"{path} is not valid JSON ({exc}); re-export the GGUF beside it") from exc
    if not isinstance(data, dict):
        raise KdcodeError(f"{path} holds a JSON {type(data).__name__}, not an object; re-export the GGUF beside it")
    return data

