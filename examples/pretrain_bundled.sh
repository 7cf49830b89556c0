#!/usr/bin/env bash
# The exact command that produced kdcode's bundled teacher (kdcode/bundled/teacher).
# A 12-layer GPT-2 (CodeGPT-small-py's depth) 128 wide, with an 8k byte-level BPE vocabulary and
# CodeGPT's special tokens, trained from scratch on the train split of the Python standard library
# (raw Python, indentation kept; test/ folders excluded), for a 100-minute wall-clock budget on a
# 2-core CPU with bf16 autocast (AMX). The cosine LR schedule follows the wall clock.
set -euo pipefail
cd "$(dirname "$0")/.."
kdcode pretrain \
  --data stdlib \
  --layers 12 --hidden 128 --heads 4 --vocab-size 8192 --block-size 256 \
  --batch-size 16 --lr 1.5e-3 --warmup-steps 200 --max-minutes 100 --eval-every 250 \
  --precision auto --seed 0 \
  --out kdcode/bundled/teacher --overwrite "$@"
