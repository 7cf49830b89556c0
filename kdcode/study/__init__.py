"""The study: a sweep of runs (``sweep``: distil, eval and bench each point, the teacher first) and its report
(``report``: results.md and pareto.png from results.jsonl alone). It drives ``train`` and ``evaluation``, which never
import it."""
