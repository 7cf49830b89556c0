"""Measurements of a model as it is: parameters, weight size on disk, peak memory, throughput, latency.

Each model is measured in a fresh process (spawned), so that its peak memory is its own and not the
high-water mark of whatever ran before it. Speed is measured on a fixed completion set: the same
held-out prompts for every model, a fixed number of generated tokens per prompt (no early stop, so
that a model that stops early does not look fast), greedy decoding with a KV cache, after warm-up.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import statistics
import time
from queue import Empty
from typing import Any

from kdcode.errors import KdcodeError
from kdcode.spec import BenchSpec


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(
    name: str,
    spec: BenchSpec,
    verify: bool = True,
    show_progress: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Measure one model in this process (use ``run_bench`` for a clean peak-memory figure)."""
    import torch

    from kdcode.artifacts import weights_size
    from kdcode.data import load_corpus
    from kdcode.device import peak_rss_mb, resolve_device, rss_mb
    from kdcode.evaluation.completion_sets import build_line_samples
    from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy, n_positions
    from kdcode.inference.loader import load_for_inference
    from kdcode.progress import make_progress

    device = resolve_device(spec.device).type
    corpus = load_corpus(spec.data)
    docs = corpus.splits["test"] or [d for s in corpus.splits.values() for d in s]
    samples = build_line_samples(docs, spec.prompts + spec.warmup, spec.seed, spec.data.format)
    prompts = [s.input for s in samples]
    base_rss = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lm = load_for_inference(name, spec.device, spec.dtype, spec.threads, verify=verify, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
    model = lm.model
    # a fixed number of tokens per prompt (no early stop), so that a model that stops early does not look fast
    opts = DecodeOptions(max_new_tokens=spec.new_tokens, heal=spec.data.format == "raw", fixed_length=True)
    context = opts.context_for(n_positions(model))
    index = VocabIndex.for_model(model, lm.tokenizer)
    warm, timed = prompts[: spec.warmup], prompts[spec.warmup :]
    if warm:
        greedy(model, index, warm, opts, spec.batch_size)
    with make_progress() as progress:
        task = progress.add_task(f"bench {name}", total=len(timed), info="", visible=show_progress)

        def advance(k: int) -> None:
            steps = gen.step_s if gen else []
            progress.update(task, advance=k, info=f"{1000 * statistics.median(steps):.1f} ms/token" if steps else "")

        gen = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        gen = greedy(model, index, timed, opts, spec.batch_size, on_batch=advance)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    from kdcode.compression.int8 import memory_bytes

    params = lm.params  # int8 weights counted too
    out: dict[str, Any] = {
        "model": name,
        "params_m": round(params / 1e6, 3),
        "n_layer": lm.n_layer,
        "size_mb": round(weights_size(lm.folder) / 1e6, 3) if lm.folder else None,  # a hub model: its cache files
        "source": {"path": str(lm.folder) if lm.folder else None, "hub": lm.hub and {k: lm.hub[k] for k in
                                                                                    ("id", "revision")}},
        "weights_memory_mb": round(memory_bytes(model) / 1e6, 3),
        "samples_per_s": round(len(timed) / wall, 3),
        "tokens_per_s": round(sum(gen.token_counts) / wall, 1),
        "ms_per_token_p50": round(1000 * _percentile(gen.step_s, 0.5), 3),
        "ms_per_token_p95": round(1000 * _percentile(gen.step_s, 0.95), 3),
        "ms_first_token_p50": round(1000 * _percentile(gen.prefill_s, 0.5), 3),
        "prompts": len(timed),
        "new_tokens": spec.new_tokens,
        "batch_size": spec.batch_size,
        "context_tokens": context,
        "device": device if device == "cpu" else lm.runtime["device"],
        "cpu": platform.processor() or platform.machine(),
        "dtype": lm.runtime["dtype"],
        "threads": lm.runtime["threads"],
        "runtime": lm.runtime,
        "verified": lm.verified,
    }
    if device == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["memory_kind"] = "max CUDA memory allocated"
    else:
        out["peak_memory_mb"] = round(peak_rss_mb(), 1)
        out["model_memory_mb"] = round(peak_rss_mb() - base_rss, 1)
        out["memory_kind"] = "peak process RSS (model_memory_mb: above the RSS before loading the model)"
    return out


def _child(name: str, spec_json: str, verify: bool, queue: Any, load: dict[str, bool] | None = None) -> None:
    try:
        queue.put(("ok", measure(name, BenchSpec.model_validate_json(spec_json), verify, **(load or {}))))
    except KdcodeError as exc:
        queue.put(("error", str(exc)))
    except Exception as exc:  # reported to the parent as one line
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_bench(
    name: str,
    spec: BenchSpec,
    compare: str | None = None,
    verify: bool = True,
    isolate: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Measure ``name`` (and ``compare``), each in its own process when ``isolate``."""
    load = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}

    def one(target: str) -> dict[str, Any]:
        if not isolate:
            return measure(target, spec, verify, **load)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(target, spec.model_dump_json(), verify, queue, load))
        proc.start()
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():
                    raise KdcodeError(f"the benchmark process for {target} died (exit code {proc.exitcode})") from None
        proc.join()
        if status == "error":
            raise KdcodeError(payload)
        return payload

    result = one(name)
    if compare:
        other = one(compare)
        result["compare"] = other
        result["ratios"] = {
            "params": round(result["params_m"] / other["params_m"], 3),
            "size": round(result["size_mb"] / other["size_mb"], 3) if result["size_mb"] and other["size_mb"] else None,
            "speedup": round(result["samples_per_s"] / other["samples_per_s"], 3),
            "latency": round(result["ms_per_token_p50"] / other["ms_per_token_p50"], 3),
        }
    return result
