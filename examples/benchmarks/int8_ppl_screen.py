"""A cheap first screen of the int8 schemes: held-out perplexity of each, in memory, on the same blocks.

Loads MODEL once, builds the first N blocks (1,024 tokens, or 256 for a model with fewer positions) of the stdlib
test split, and for every variant (fp32, bf16, an int8 scheme, or ``smooth:ALPHA[:ACTIVATIONS[:K]]``: SmoothQuant's
migration calibrated on `kdcode compress`'s default calibration blocks, then int8 with those activations, the LM
head's K input channels of largest calibration values kept float32 (per-token only)) prints
the mean next-token loss and perplexity. ES needs generation: use int8_quality.py on what passes here.

    python examples/benchmarks/int8_ppl_screen.py smollm2 16 fp32,per-tensor,per-token,weight-only,smooth:0.5
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch

from kdcode.compression.compress import calibration_blocks
from kdcode.compression.int8 import quantize_model
from kdcode.compression.smooth import largest_channels, smooth_model
from kdcode.data.corpus import encode_documents
from kdcode.evaluation.completion_sets import eval_docs
from kdcode.evaluation.perplexity import held_out_loss
from kdcode.models.load import load_model
from kdcode.spec import EvalSpec
from kdcode.spec_compress import INT8_SCHEMES, CompressSpec


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    name, n_blocks, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    lm = load_model(name)
    docs, _ = eval_docs(EvalSpec())
    stream = encode_documents(docs, lm.tokenizer)
    size = 1024 if lm.model.config.max_position_embeddings >= 1024 else 256
    blocks = torch.tensor(stream[: n_blocks * size]).view(-1, size)
    print(f"{name}: {tuple(blocks.shape)} held-out blocks", flush=True)
    for variant in variants:
        model = copy.deepcopy(lm.model).float()
        start = time.time()
        if variant == "bf16":
            model.to(torch.bfloat16)
        elif variant.startswith("smooth:"):
            _, alpha, *act = variant.split(":")
            calib = calibration_blocks(CompressSpec(int8=True), lm.tokenizer, 1024)
            print(smooth_model(model, calib, 8, float(alpha)), flush=True)
            head = model.get_output_embeddings()
            channels = largest_channels(model, head, calib, 8, int(act[1])) if len(act) > 1 else None
            quantize_model(model, act[0] if act else "per-tensor", channels)
        elif variant in INT8_SCHEMES and not INT8_SCHEMES[variant][0]:
            quantize_model(model, INT8_SCHEMES[variant][1])
        elif variant != "fp32":
            sys.exit(f"unknown variant {variant}: fp32, bf16, an int8 scheme without migration, or smooth:ALPHA...")
        loss = held_out_loss(model, blocks, 4, None, torch.device("cpu"))
        print(f"{variant}: loss {loss:.4f} ppl {math.exp(loss):.3f} ({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
