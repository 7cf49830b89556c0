"""What a compression or a quantized export changed, measured before it reports success: line completion (ES)
and perplexity of the model before and after on the same held-out samples, the deltas, and a warning when a
delta is beyond the thresholds of :class:`kdcode.spec.QualityCheckSpec`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kdcode.device import describe_device, model_device
from kdcode.evaluation.evaluate import run_eval
from kdcode.inference.loader import dtype_name
from kdcode.quiet import quiet_hf
from kdcode.spec import DataSpec, EvalSpec
from kdcode.spec_compress import QualityCheckSpec


def check_spec(check: QualityCheckSpec, data: DataSpec) -> EvalSpec | None:
    """The eval both sides run (held-out split of ``data``, default decoding), or None when both parts are 0."""
    if not (check.check_samples or check.check_blocks):
        return None
    return EvalSpec(data=data, samples=max(check.check_samples, 1), ppl_blocks=check.check_blocks, split="test",
                    device="cpu")


def in_memory(model: Any, tokenizer: Any, verified: Any = None) -> Any:
    """A model already in memory, shaped as :func:`kdcode.evaluation.evaluate.run_eval` takes it (``loaded``)."""
    model.eval()
    runtime = {"device": describe_device(model_device(model)), "dtype": dtype_name(model), "backend": "torch"}
    return SimpleNamespace(model=model, tokenizer=tokenizer, runtime=runtime, verified=verified)


def measure(name: str, spec: EvalSpec, samples: int, loaded: Any = None, runtime: Any = None) -> dict[str, Any]:
    """ES / EM on ``samples`` held-out line completions (None when 0) and perplexity, of a model in memory
    (``loaded``) or of ``name`` loaded in ``runtime``."""
    with quiet_hf():
        r = run_eval(name, spec, loaded=loaded, runtime=runtime)
    out = {"es": r["es"], "em": r["em"], "samples": r["samples"]} if samples else {"es": None, "em": None, "samples": 0}
    return {**out, "perplexity": r.get("perplexity"), "ppl_tokens": r.get("ppl_tokens", 0)}


def compare(before: dict[str, Any], after: dict[str, Any], check: QualityCheckSpec, what: str) -> dict[str, Any]:
    """The ``quality`` record: both measurements, the deltas, the thresholds and the warning (None when within)."""
    es_delta = ppl_pct = None
    if before.get("es") is not None and after.get("es") is not None:
        es_delta = round(after["es"] - before["es"], 2)
    if before.get("perplexity") and after.get("perplexity"):
        ppl_pct = round(100 * (after["perplexity"] / before["perplexity"] - 1), 2)
    beyond = []
    if es_delta is not None and -es_delta > check.max_es_drop:
        beyond.append(f"ES {es_delta:+.2f} (more than {check.max_es_drop:g} lost)")
    if ppl_pct is not None and ppl_pct > check.max_ppl_rise:
        beyond.append(f"perplexity {ppl_pct:+.1f}% (more than {check.max_ppl_rise:g}% gained)")
    warning = f"{what} lost quality beyond the thresholds: {', '.join(beyond)}" if beyond else None
    return {
        "before": before,
        "after": after,
        "es_delta": es_delta,
        "perplexity_change_pct": ppl_pct,
        "thresholds": {"max_es_drop": check.max_es_drop, "max_ppl_rise_pct": check.max_ppl_rise},
        "within_thresholds": not beyond,
        "warning": warning,
        "held_out": {"split": "test", "samples": before.get("samples"), "ppl_tokens": before.get("ppl_tokens")},
    }


def skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason, "warning": None}


def quality_lines(q: dict[str, Any] | None) -> list[str]:
    """What the command prints about its quality check: before -> after and the deltas (the warning is the
    command's own ``warning:`` line)."""
    if not q:
        return []
    if q.get("skipped"):
        return [f"quality not measured: {q['skipped']}"]
    b, a, held = q["before"], q["after"], q["held_out"]
    parts = []
    if b.get("es") is not None:
        parts.append(f"ES {b['es']:.2f} -> {a['es']:.2f} ({q['es_delta']:+.2f}, {held['samples']} held-out samples)")
    if b.get("perplexity") is not None:
        change = f"{q['perplexity_change_pct']:+.1f}%" if q["perplexity_change_pct"] is not None else "n/a"
        parts.append(f"perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} ({change}, "
                     f"{held['ppl_tokens']:,} held-out tokens)")
    return ["quality: " + "; ".join(parts) if parts else "quality: nothing measured (no held-out data)"]
