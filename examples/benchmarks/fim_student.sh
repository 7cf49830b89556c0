#!/usr/bin/env bash
# Issue 21's goals for the FIM bundled teacher and its default student (`kdcode distil`, which trains with
# FIM as the teacher was): the student's infill ES >= 90% of the teacher's on the same 500 holes, and the
# teacher's infill ES clearly above prefix-only completion of the same holes (the suffix must help). Scores
# both on line completion and single-line infilling (stdlib test split, seed 0: the same lines, the same
# holes) and prints the ratios.
#   examples/benchmarks/fim_student.sh [STUDENT_DIR] [SAMPLES]
# TEACHER=DIR scores another FIM teacher (default: bundled); MAX_STEPS=N bounds the distil run by steps instead of
# the default budget (a busy CPU then changes only the wall clock). Infill prompts take the model's own order
# (--fim-order auto).
set -euo pipefail
student=${1:-student}
samples=${2:-500}
teacher=${TEACHER:-bundled}
out=${OUT:-runs/fim_student}
mkdir -p "$out"
[[ -d "$student" ]] || kdcode distil --teacher "$teacher" --out "$student" ${MAX_STEPS:+--max-steps "$MAX_STEPS"}
for m in "$teacher" "$student"; do
  name=$([[ "$m" == "$teacher" ]] && echo teacher || echo student)
  kdcode eval "$m" --samples "$samples" --json "$out/${name}_line.json"
  kdcode eval "$m" --samples "$samples" --task infill --json "$out/${name}_infill.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
r = {k: json.load(open(f"{out}/{k}.json")) for k in ("teacher_line", "teacher_infill", "student_line", "student_infill")}
for who in ("teacher", "student"):
    line, infill = r[f"{who}_line"], r[f"{who}_infill"]
    print(f"{who}: line ES {line['es']} EM {line['em']}; infill ES {infill['es']} EM {infill['em']}; "
          f"prefix-only on the same holes ES {infill['prefix_only']['es']} EM {infill['prefix_only']['em']}")
ratio = r["student_infill"]["es"] / r["teacher_infill"]["es"]
gain = r["teacher_infill"]["es"] - r["teacher_infill"]["prefix_only"]["es"]
print(f"student / teacher infill ES {ratio:.3f} (goal >= 0.90); the suffix adds {gain:+.2f} ES to the teacher")
json.dump({**r, "infill_ratio": ratio, "suffix_gain": gain}, open(f"{out}/summary.json", "w"), indent=2)
PY
