"""`kdcode eval`: line-level completion (ES/EM as CodeXGLUE defines them), perplexity, token-level accuracy,
with the repeat-the-previous-line baseline scored on the same samples so every figure has a floor to beat."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdcode.data.corpus import Document
from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import (
    _LINE_BREAKS,
    build_line_samples,
    eval_docs,
    read_completion_set,
)
from kdcode.evaluation.infill import run_infill
from kdcode.evaluation.metrics import line_metrics
from kdcode.evaluation.perplexity import perplexity
from kdcode.evaluation.token_level import token_accuracy
from kdcode.inference.decode import DecodeOptions, VocabIndex, beam_search, greedy, n_positions
from kdcode.inference.loader import load_for_inference
from kdcode.models.artifacts import check_output
from kdcode.models.load import input_path
from kdcode.progress import make_progress
from kdcode.spec import EvalSpec


def run_eval(
    name: str,
    spec: EvalSpec,
    verify: bool = True,
    predictions: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    runtime: Any = None,
    loaded: Any = None,
) -> dict[str, Any]:
    """Evaluate a model folder / id (or a GGUF / ONNX export, in the backend ``runtime`` names: a
    :class:`kdcode.spec.RuntimeSpec` or its dict) on line completion and perplexity (``spec.task`` infill: on
    single-line infilling, :mod:`kdcode.evaluation.infill`); returns the metrics dict (with the device, dtype,
    threads and backend it ran with under ``runtime``). ``loaded``: a model already in memory (what
    :func:`kdcode.inference.loader.load_for_inference` returns, or an object with its ``model``, ``tokenizer``,
    ``runtime`` and ``verified``), evaluated as it is instead of loading ``name``."""
    if predictions is not None:
        check_output(predictions, inputs={"MODEL": input_path(name), "--lines": spec.lines}, folder=False,
                     flag="--predictions")
    if spec.task == "infill" and (spec.lines or spec.data.format == "py150"):
        raise KdcodeError("--task infill removes whole lines from held-out raw code files; drop --lines and "
                          "--format py150")
    lm = loaded or load_for_inference(name, spec.device, spec.dtype, spec.threads, verify=verify,
                                      allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, runtime=runtime)
    if spec.task == "infill":
        return run_infill(name, lm, spec, *eval_docs(spec), predictions=predictions)
    fmt = spec.data.format
    docs: list[Document] = []
    data_summary: dict[str, Any] = {}
    if spec.lines:
        samples, docs = read_completion_set(spec.lines, spec.split)
        if samples:
            samples = samples[: spec.samples]
            fmt = "py150" if any("<EOL>" in s.input for s in samples[:20]) else fmt
        else:  # token-level layout: cut lines from its py150 files
            fmt = "py150"
            samples = build_line_samples(docs, spec.samples, spec.seed, fmt)
            data_summary = {"lines": spec.lines, "files": len(docs)}
    else:
        docs, data_summary = eval_docs(spec)
        samples = build_line_samples(docs, spec.samples, spec.seed, fmt)
    heal = spec.heal if spec.heal is not None else fmt == "raw"
    opts = DecodeOptions(max_new_tokens=spec.max_new_tokens, context_tokens=spec.context_tokens, heal=heal)
    context = opts.context_for(n_positions(lm.model))
    index = VocabIndex.for_model(lm.model, lm.tokenizer)
    prompts = [s.input for s in samples]
    start = time.perf_counter()
    with make_progress() as progress:
        task = progress.add_task(f"eval {name}", total=len(prompts), info="")
        advance = lambda k: progress.update(task, advance=k)  # noqa: E731
        if spec.beams > 1:
            gen = beam_search(lm.model, index, prompts, opts, spec.beams, on_batch=advance)
        else:
            gen = greedy(lm.model, index, prompts, opts, spec.batch_size, on_batch=advance)
    gen_time = time.perf_counter() - start
    metrics = line_metrics(gen.texts, [s.gt for s in samples])
    baseline = line_metrics([s.prev for s in samples], [s.gt for s in samples]) if docs else None
    if predictions is not None:
        predictions.write_text("".join(_LINE_BREAKS.sub(" ", t) + "\n" for t in gen.texts), encoding="utf-8")
    ppl: dict[str, Any] = {"perplexity": None}
    if docs and spec.ppl_blocks:
        ppl = perplexity(lm.model, lm.tokenizer, docs, spec.ppl_blocks, context + spec.max_new_tokens)
    acc: dict[str, Any] = {"token_accuracy": None}
    if docs and (spec.token_level if spec.token_level is not None else fmt == "py150"):
        block = context + spec.max_new_tokens
        acc = token_accuracy(lm.model, lm.tokenizer, docs, spec.token_blocks, block)
    return {
        "model": name,
        "task": "line",
        **metrics,
        **ppl,
        **acc,
        "baseline": {"name": "repeat previous line", **baseline} if baseline else None,
        "decoding": {
            "beams": spec.beams,
            "max_new_tokens": spec.max_new_tokens,
            "context_tokens": context,
            "heal": heal,
            "format": fmt,
        },
        "seconds": round(gen_time, 2),
        "samples_per_s": round(len(samples) / gen_time, 2),
        "data": data_summary or {"lines": spec.lines},
        "split": spec.split,
        "seed": spec.seed,
        "verified": lm.verified,
        "runtime": lm.runtime,
        "examples": [
            {"id": s.id, "input_tail": s.input[-120:], "gt": s.gt, "pred": p}
            for s, p in list(zip(samples, gen.texts))[:5]
        ],
    }
