"""Acceptance rate as a fidelity metric (issue 22): how often a teacher accepts its student's tokens when the
student drafts for it in speculative decoding, on the held-out line samples `kdcode eval` uses. Greedy: the
teacher's output is its own either way; the figures say how much of it the student predicted."""

from __future__ import annotations

from typing import Any

from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import build_line_samples, eval_docs
from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy
from kdcode.inference.loader import load_for_inference
from kdcode.inference.speculative import auto_k, check_pair, speculative


def run_acceptance(student: str, teacher: str, spec: Any, k: int | str = 4, verify: bool = True) -> dict[str, Any]:
    """Draft ``teacher``'s greedy completions of ``spec``'s held-out line samples with ``student``; the acceptance
    figures (with k stated), and whether the output was the teacher's own (checked against plain greedy)."""
    if spec.lines:
        raise KdcodeError("--draft-for measures on the held-out split; drop --lines")
    target = load_for_inference(teacher, spec.device, spec.dtype, spec.threads, verify=verify)
    draft = load_for_inference(student, spec.device, spec.dtype, spec.threads, verify=verify)
    check_pair(target.tokenizer, draft.tokenizer, teacher, student)
    docs, _ = eval_docs(spec)
    prompts = [s.input for s in build_line_samples(docs, spec.samples, spec.seed, spec.data.format)]
    opts = DecodeOptions(max_new_tokens=spec.max_new_tokens, heal=spec.data.format == "raw")
    index = VocabIndex.for_model(target.model, target.tokenizer)
    if k == "auto":
        k = auto_k(target.model, draft.model, index, prompts[:8], opts)
    gen, acc = speculative(target.model, draft.model, index, prompts, opts, k=int(k))
    own = greedy(target.model, index, prompts, opts, batch_size=1)
    return {
        "student": student,
        "teacher": teacher,
        **acc.summary(),
        "samples": len(prompts),
        "identical_to_teacher_greedy": gen.token_ids == own.token_ids,
        "split": spec.split,
        "seed": spec.seed,
        "runtime": target.runtime,
    }
