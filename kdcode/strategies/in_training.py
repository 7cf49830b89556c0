"""In-training KD: the study's method (adapted from DistilBERT to CodeGPT).

The student minimises the same loss as ``pretraining`` KD,

    L_s = a_soft * T^2 * KL(softmax(t/T) || softmax(s/T)) + a_hard * CE(s, y) + a_cos * (1 - cos(h_s, h_t)),

while the teacher keeps training in the same step on its own hard loss L_t = CE(t, y), in train mode
with its own optimiser. The student's soft targets are the teacher's logits detached from its graph.
"""

from __future__ import annotations

from kdcode.strategies.pretraining import DistilParams, PretrainingKD


class InTrainingKD(PretrainingKD):
    summary = "the study's KD: student loss as pretraining, teacher also trained on its hard loss"
    Params = DistilParams
    needs_teacher_grad = True
    supports_cache = False  # the teacher changes every step
