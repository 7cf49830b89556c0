#!/usr/bin/env bash
# The exact commands that produced kdcode's bundled teacher (kdcode/bundled/teacher): a 12-layer GPT-2
# (CodeGPT-small-py's depth) 128 wide, with an 8k byte-level BPE vocabulary and CodeGPT's special
# tokens, trained from scratch on the Python standard library (raw Python, indentation kept) on a
# 2-core CPU with bf16 autocast (AMX). The cosine LR schedule of each stage follows its wall clock.
#
# Stage 1 (100 min): tokenizer + model on the train split of the stdlib without its test/ folders.
# After it the model fitted its 2.8M training tokens far better than held-out code (loss 2.97 on
# train blocks, 3.51 valid, 3.97 test: 4.5 passes over too little data), so
# Stage 2 (85 min) goes on from stage 1 with the stdlib's test/ folders added to the train split
# (8.4M tokens). Splits are a hash of each file's path, so the held-out files of the default corpus
# (no test/ folders), on which `kdcode eval bundled` scores it, stay unseen.
# Stage 3 (80 min) is more of stage 2 from its end at a lower peak learning rate (stage 2's held-out
# loss was still falling when its cosine schedule ended); stage 4 (28 min) once more at 3e-4.
# Each stage's manifest records its recipe; its `init` section names the stage before by sha256, back to
# stage 1 (stage 3 was run as `--init bundled` while the stage before was the bundled teacher:
# the same weights).
set -euo pipefail
cd "$(dirname "$0")/.."
stage1=${STAGE1:-runs/teacher_stage1}
stage2=${STAGE2:-runs/teacher_stage2}
stage3=${STAGE3:-runs/teacher_stage3}
kdcode pretrain \
  --data stdlib \
  --layers 12 --hidden 128 --heads 4 --vocab-size 8192 --block-size 256 \
  --batch-size 16 --lr 1.5e-3 --warmup-steps 200 --max-minutes 100 --eval-every 250 \
  --precision auto --seed 0 \
  --out "$stage1" --overwrite
# go_on INIT LR WARMUP MINUTES SEED OUT: one more stage from INIT, test/ folders in the train split
go_on() {
  kdcode pretrain \
    --data stdlib --include-tests --init "$1" --block-size 256 \
    --batch-size 16 --lr "$2" --warmup-steps "$3" --max-minutes "$4" --eval-every 250 \
    --precision auto --seed "$5" \
    --out "$6" --overwrite
}
go_on "$stage1" 1e-3 100 85 1 "$stage2"
go_on "$stage2" 6e-4 100 80 2 "$stage3"
go_on "$stage3" 3e-4 50 28 3 kdcode/bundled/teacher
kdcode eval bundled --samples 500 --record
