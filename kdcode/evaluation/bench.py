"""Measurements of a model as it is: parameters, weight size on disk, peak memory, throughput, latency.

The protocol (one for `bench`, `bench --compare`, the sweep and the benchmarks): every model is loaded in a
fresh process of its own (spawned, so that its peak memory is its own), warmed up, and then timed in
**interleaved rounds**: round 1 of A, round 1 of B, round 2 of B, round 2 of A, ... (the order alternates,
so a drift of the machine falls on both). A round completes the same fixed prompt set (held-out lines, a
fixed number of new tokens each, no early stop, greedy with a KV cache). Each figure is reported as the
median over rounds with its range (min-max); two models are ranked only when their throughput ranges do not
overlap. The device, dtype, threads and backend are part of every result.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

from kdcode.compression.int8 import memory_bytes
from kdcode.data.corpus import load_corpus
from kdcode.device import cpu_features, cpu_name, peak_rss_mb, resolve_device, rss_mb, torch_kernels
from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy, n_positions
from kdcode.inference.loader import load_for_inference
from kdcode.inference.lookup import as_lookup
from kdcode.inference.speculative import auto_k, check_pair, speculative
from kdcode.models.artifacts import weights_size
from kdcode.progress import make_progress
from kdcode.spec import BenchSpec

TIMED = ("samples_per_s", "tokens_per_s", "ms_per_token_p50", "ms_per_token_p95", "ms_first_token_p50")
WAIT_S = 1.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bench_prompts(spec: BenchSpec) -> list[str]:
    """The fixed prompt set: ``warmup + prompts`` held-out line prefixes (the same for every model)."""
    corpus = load_corpus(spec.data)
    docs = corpus.splits["test"] or [d for s in corpus.splits.values() for d in s]
    return [s.input for s in build_line_samples(docs, spec.prompts + spec.warmup, spec.seed, spec.data.format)]


class Runner:
    """One loaded model, warmed up, that times rounds of the prompt set (in this process)."""

    def __init__(self, name: str, spec: BenchSpec, verify: bool = True, draft: str | None = None,
                 draft_tokens: int | str = 4, **load: Any) -> None:
        self.name, self.spec = name, spec
        self.device = resolve_device(spec.device)
        prompts = bench_prompts(spec)
        self.base_rss = rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.lm = load_for_inference(name, spec.device, spec.dtype, spec.threads, verify=verify, **load)
        # a fixed number of tokens per prompt (no early stop), so that a model that stops early does not look fast
        self.opts = DecodeOptions(max_new_tokens=spec.new_tokens, context_tokens=spec.context_tokens,
                                  heal=spec.data.format == "raw", fixed_length=True)
        self.context = self.opts.context_for(n_positions(self.lm.model))
        self.index = VocabIndex.for_model(self.lm.model, self.lm.tokenizer)
        self._greedy = greedy
        warm, self.prompts = prompts[: spec.warmup], prompts[spec.warmup :]
        self.draft, self.draft_tokens = None, draft_tokens
        if draft is not None:  # speculative decoding: the same model's own output, drafted by a student or by lookup
            if spec.batch_size != 1:
                raise KdcodeError("--draft runs at batch 1 (speculative decoding); drop --batch-size")
            lookup = as_lookup(draft)  # prompt lookup: no draft model
            if lookup is None:
                loaded = load_for_inference(draft, spec.device, spec.dtype, spec.threads, verify=verify)
                check_pair(self.lm.tokenizer, loaded.tokenizer, name, draft)
            self.draft = lookup if lookup is not None else loaded.model
            if draft_tokens == "auto":
                self.draft_tokens = auto_k(self.lm.model, self.draft, self.index, prompts[:4], self.opts)
        if warm:
            self._decode(warm)

    def _decode(self, prompts: list[str]) -> tuple[Any, Any]:
        if self.draft is None:
            return self._greedy(self.lm.model, self.index, prompts, self.opts, self.spec.batch_size), None
        return speculative(self.lm.model, self.draft, self.index, prompts, self.opts, int(self.draft_tokens))

    def round(self) -> dict[str, float]:
        """One timed pass over the prompt set."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        gen, acceptance = self._decode(self.prompts)
        sync()
        wall = time.perf_counter() - start
        tokens = sum(gen.token_counts)
        out: dict[str, Any] = {
            "samples_per_s": len(self.prompts) / wall,
            "tokens_per_s": tokens / wall,
            # speculative passes make several tokens: their per-token time is the pass over its tokens
            "ms_per_token_p50": 1000 * _percentile(gen.step_s, 0.5) if acceptance is None else 1000 * wall / tokens,
            "ms_per_token_p95": 1000 * _percentile(gen.step_s, 0.95) if acceptance is None else 1000 * wall / tokens,
            "ms_first_token_p50": 1000 * _percentile(gen.prefill_s, 0.5) if gen.prefill_s else float("nan"),
            "outputs_sha256": hashlib.sha256(json.dumps(gen.token_ids).encode()).hexdigest(),
        }
        if acceptance is not None:
            out["acceptance"] = acceptance.summary()
        return out

    def info(self) -> dict[str, Any]:
        """What does not change between rounds: size, memory, and what the figures were measured on."""
        lm = self.lm
        stepped = getattr(lm.model, "files", None) is not None  # a backend's model: its files are its weights
        size = lm.model.weight_bytes if stepped else weights_size(lm.folder) if lm.folder else None
        out: dict[str, Any] = {
            "model": self.name,
            "params_m": round(lm.params / 1e6, 3),  # int8 weights counted too
            "n_layer": lm.n_layer,
            "size_mb": round(size / 1e6, 3) if size is not None else None,  # a hub model: its cache
            "source": {"path": str(lm.folder) if lm.folder else None,
                       "hub": lm.hub and {k: lm.hub[k] for k in ("id", "revision")}},
            "weights_memory_mb": round((lm.model.memory_bytes if stepped else memory_bytes(lm.model)) / 1e6, 3),
            "prompts": len(self.prompts),
            "new_tokens": self.spec.new_tokens,
            "batch_size": self.spec.batch_size,
            "context_tokens": self.context,
            "device": self.device.type if self.device.type == "cpu" else lm.runtime["device"],
            "cpu": cpu_name(),
            "cpu_features": cpu_features(),
            "torch_kernels": torch_kernels(),
            "dtype": lm.runtime["dtype"],
            "threads": lm.runtime["threads"],
            "backend": lm.runtime.get("backend", "torch"),
            "runtime": {"backend": "torch", **lm.runtime},
            "verified": lm.verified,
        }
        if self.device.type == "cuda":
            out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            out["memory_kind"] = "max CUDA memory allocated"
        else:
            out["peak_memory_mb"] = round(peak_rss_mb(), 1)
            out["model_memory_mb"] = round(peak_rss_mb() - self.base_rss, 1)
            out["memory_kind"] = "peak process RSS (model_memory_mb: above the RSS before loading the model)"
        return out


def _serve(name: str, spec_json: str, verify: bool, load: dict[str, Any], conn: Any) -> None:
    """A worker process: load one model, then answer "round" and "info" until "stop"."""
    try:
        runner = Runner(name, BenchSpec.model_validate_json(spec_json), verify, **load)
        conn.send(("ready", None))
        while (command := conn.recv()) != "stop":
            conn.send(("ok", runner.round() if command == "round" else runner.info()))
    except KdcodeError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    """A model in a process of its own (``isolate``) or in this one, driven round by round."""

    def __init__(self, name: str, spec: BenchSpec, verify: bool, load: dict[str, Any], isolate: bool) -> None:
        self.name, self.runner, self.proc = name, None, None
        if not isolate:
            self.runner = Runner(name, spec, verify, **load)
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(name, spec.model_dump_json(), verify, load, child), daemon=True)
        self.proc.start()
        self._answer()

    def _answer(self) -> Any:
        while not self.conn.poll(WAIT_S):
            if not self.proc.is_alive():
                raise KdcodeError(f"the benchmark process for {self.name} died (exit code {self.proc.exitcode})")
        status, payload = self.conn.recv()
        if status == "error":
            raise KdcodeError(payload)
        return payload

    def ask(self, command: str) -> Any:
        if self.runner is not None:
            return self.runner.round() if command == "round" else self.runner.info()
        self.conn.send(command)
        return self._answer()

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send("stop")
            except OSError:
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range (min, max) of every timed figure over the rounds."""
    out: dict[str, Any] = {}
    if rounds and "acceptance" in rounds[0]:
        out["acceptance"] = rounds[-1]["acceptance"]  # the same prompts every round: the same figures
    for key in TIMED:
        values = [r[key] for r in rounds]
        decimals = 1 if key == "tokens_per_s" else 3
        out[key] = round(statistics.median(values), decimals)
        out[f"{key}_range"] = [round(min(values), decimals), round(max(values), decimals)]
    out["rounds"] = len(rounds)
    return out


def run_bench_many(
    names: list[str], spec: BenchSpec, verify: bool = True, isolate: bool = True,
    runtimes: list[dict[str, Any] | None] | None = None, drafts: list[dict[str, Any] | None] | None = None,
    **load: Any
) -> list[dict[str, Any]]:
    """Benchmark ``names`` together in interleaved rounds (see the module doc); one result per model.
    ``runtimes`` gives each model its own backend / decode path (:class:`kdcode.spec.RuntimeSpec` fields);
    ``drafts`` its draft model for speculative decoding (``{"draft": DIR, "draft_tokens": k|"auto"}``)."""
    workers: list[Worker] = []
    try:
        for i, name in enumerate(names):
            own = (runtimes or [None] * len(names))[i]
            draft = (drafts or [None] * len(names))[i] or {}
            workers.append(Worker(name, spec, verify, {**load, **({"runtime": own} if own else {}), **draft}, isolate))
        rounds: list[list[dict[str, float]]] = [[] for _ in workers]
        with make_progress() as progress:
            task = progress.add_task("bench", total=spec.rounds * len(workers), info=f"{len(workers)} model(s)")
            for r in range(spec.rounds):
                order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
                for i in order:
                    rounds[i].append(workers[i].ask("round"))
                    progress.update(task, advance=1, info=f"round {r + 1}/{spec.rounds}")
        return [{**w.ask("info"), **summarise(rs), "round_figures": rs} for w, rs in zip(workers, rounds)]
    finally:
        for w in workers:
            w.close()


def separated(a: dict[str, Any], b: dict[str, Any], key: str = "samples_per_s") -> bool:
    """True when two models' ranges of ``key`` do not overlap: only then is one ranked above the other."""
    lo_a, hi_a = a[f"{key}_range"]
    lo_b, hi_b = b[f"{key}_range"]
    return hi_a < lo_b or hi_b < lo_a


def run_bench(
    name: str,
    spec: BenchSpec,
    compare: str | None = None,
    verify: bool = True,
    isolate: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    runtime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure ``name`` (and ``compare``, interleaved with it, in the same ``runtime``); ratios and whether the
    ranking holds."""
    names = [name, compare] if compare else [name]
    results = run_bench_many(names, spec, verify, isolate, [runtime] * len(names), allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code)
    result = results[0]
    if compare:
        other = result["compare"] = results[1]
        apart = separated(result, other)
        result["ratios"] = {
            "params": round(result["params_m"] / other["params_m"], 3),
            "size": round(result["size_mb"] / other["size_mb"], 3) if result["size_mb"] and other["size_mb"] else None,
            "speedup": round(result["samples_per_s"] / other["samples_per_s"], 3),
            "speedup_range": [round(result["samples_per_s_range"][0] / other["samples_per_s_range"][1], 3),
                              round(result["samples_per_s_range"][1] / other["samples_per_s_range"][0], 3)],
            "latency": round(result["ms_per_token_p50"] / other["ms_per_token_p50"], 3),
            "separated": apart,
            "ranking": (name if result["samples_per_s"] > other["samples_per_s"] else compare) if apart else None,
        }
    return result


def run_bench_draft(
    name: str, spec: BenchSpec, draft: str, draft_tokens: int | str = 4, verify: bool = True, isolate: bool = True,
    **load: Any,
) -> dict[str, Any]:
    """``name`` alone and with ``draft`` drafting for it (speculative decoding; ``"lookup"``: prompt lookup, no draft
    model), the same prompts, interleaved rounds; the ratio of their speeds, the acceptance, and whether the outputs
    were identical."""
    alone, drafted = run_bench_many([name, name], spec, verify, isolate,
                                    drafts=[None, {"draft": draft, "draft_tokens": draft_tokens}], **load)
    alone["with_draft"] = {**drafted, "draft": draft}
    alone["ratios"] = {
        "speedup": round(drafted["samples_per_s"] / alone["samples_per_s"], 3),
        "speedup_range": [round(drafted["samples_per_s_range"][0] / alone["samples_per_s_range"][1], 3),
                          round(drafted["samples_per_s_range"][1] / alone["samples_per_s_range"][0], 3)],
        "separated": separated(drafted, alone),
        "identical_output": {r["outputs_sha256"] for r in alone["round_figures"] + drafted["round_figures"]} ==
        {alone["round_figures"][0]["outputs_sha256"]},
    }
    return alone
