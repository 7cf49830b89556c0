"""`kdcode pretrain`: a byte-level BPE tokenizer and a GPT-2 from scratch (or continued from ``--init``),
through the one loop with the ``hard-only`` strategy, with checkpoints, ``--resume``, the live log and
TensorBoard like `distil`. This is how the bundled teacher was made (``examples/pretrain_bundled.sh``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdcode.compression.prune import heads_per_layer
from kdcode.data import fim
from kdcode.data.bpe import train_bpe
from kdcode.data.corpus import data_section, load_corpus, split_blocks
from kdcode.device import resolve_device
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import check_output, check_trainable, record_layout
from kdcode.models.load import count_params, load_model, load_tokenizer, resolve_path
from kdcode.plugins import make_strategy
from kdcode.spec_pretrain import PretrainSpec
from kdcode.train.loop import train_loop
from kdcode.train.resources import check_block_size, check_memory
from kdcode.train.state import run_context, save_trained


def _init_model(spec: PretrainSpec) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model, tokenizer, shape and lineage of ``spec.init``: a GPT-2 whose training goes on."""
    loaded = load_model(spec.init)
    check_trainable(loaded.manifest, f"--init {spec.init}")
    model, cfg = loaded.model, loaded.model.config
    if getattr(cfg, "model_type", None) != "gpt2":
        raise KdcodeError(f"--init {spec.init} is a {cfg.model_type} model; pretrain continues GPT-2 models only")
    actual = {"layers": cfg.n_layer, "hidden": cfg.n_embd, "heads": cfg.n_head, "vocab_size": cfg.vocab_size}
    for key in sorted(spec.model.model_fields_set):
        if getattr(spec.model, key) != actual[key]:
            flag = "--" + key.replace("_", "-")
            raise KdcodeError(
                f"{flag} {getattr(spec.model, key)} does not match the --init model ({actual[key]}); "
                f"drop {flag}: the shape comes from --init"
            )
    tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer else loaded.tokenizer
    if len(tokenizer) != cfg.vocab_size:
        raise KdcodeError(
            f"--tokenizer {spec.tokenizer} has {len(tokenizer)} tokens but the --init model has {cfg.vocab_size}; "
            "drop --tokenizer to use the --init model's own"
        )
    check_block_size(model, spec.train.block_size, f"the --init model {spec.init}")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(cfg, key, 0.0)
    parent = (loaded.manifest or {}).get("training", {})
    grand = (loaded.manifest or {}).get("init") or {}
    lineage = {
        "from": spec.init,
        "sha256": loaded.fingerprint,
        "steps": parent.get("steps"),
        "tokens_seen": parent.get("tokens_seen"),
        "wall_time_s": parent.get("wall_time_s"),
        # everything the parent has seen, its own parents included; this run's tokens are added at the end
        "tokens_seen_total": grand.get("tokens_seen_total") or parent.get("tokens_seen") or 0,
        "parent_init": grand or None,
        "fim": (loaded.manifest or {}).get("fim"),  # the parent's FIM training (a stage goes on with it)
    }
    return model.float(), tokenizer, type(spec.model)(**actual), lineage


def run_pretrain(spec: PretrainSpec, overwrite: bool = False, resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train a byte-level BPE tokenizer (or reuse one) and a GPT-2 from scratch on ``spec.data``.

    With ``spec.init`` the training goes on from that model (its weights, shape and tokenizer), and the
    manifest records the parent's sha256 and how much training it had already had. Interrupted runs
    (SIGINT/SIGTERM) leave a checkpoint in ``OUT.ckpt`` (with the run's tokenizer); ``resume=True`` continues it.
    """
    out = Path(spec.out)
    m = spec.model
    inputs = {"--init": resolve_path(spec.init) if spec.init else None, "--tokenizer": spec.tokenizer,
              "--data": spec.data.source if spec.data.source != "stdlib" else None}
    check_output(out, overwrite, inputs, need_bytes=4 * 12 * m.layers * m.hidden**2 + 8 * m.vocab_size * m.hidden)
    run = run_context(spec, resume, spec.train.tensorboard)
    saved_tokenizer = run.checkpoint_dir / "tokenizer" if run.checkpoint_dir else None
    torch.manual_seed(spec.train.seed)
    lineage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    if spec.init:
        model, tokenizer, shape, lineage = _init_model(spec)
        spec = spec.model_copy(update={"model": shape})
    m = spec.model
    check_memory(spec.train.batch_size, spec.train.block_size, m.hidden, m.layers, m.vocab_size, resolve_device("auto"))
    corpus = load_corpus(spec.data)
    if not spec.init and spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer)
    elif not spec.init and resume and saved_tokenizer is not None and saved_tokenizer.is_dir():
        tokenizer = load_tokenizer(str(saved_tokenizer))  # the one the interrupted run trained
    elif not spec.init:
        tokenizer = train_bpe((d.text for d in corpus.splits["train"]), spec.model.vocab_size)
        if saved_tokenizer is not None:
            tokenizer.save_pretrained(saved_tokenizer)  # a resumed run must see the same vocabulary
    tok_time = time.perf_counter() - t0
    # FIM as the spec says, else as the --init model was trained; missing FIM tokens are added (and rows to the
    # --init model's embeddings; a new model is built with the tokenizer's length)
    fim_spec = fim.effective(spec.data.fim, {"fim": (lineage or {}).get("fim")})
    transform, fim_section = fim.prepare(fim_spec, tokenizer, model if spec.init else None)
    train_blocks, valid_blocks = split_blocks(corpus, tokenizer, spec.train.block_size, transform)
    if not spec.init:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=spec.train.block_size,
            n_embd=spec.model.hidden,
            n_layer=spec.model.layers,
            n_head=spec.model.heads,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # No dropout: short single-machine runs are far from overfitting regimes.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    strategy = make_strategy("hard-only", {})
    result = train_loop(model, strategy, train_blocks, valid_blocks, spec.train, description="pretrain", run=run)
    manifest = {
        "kind": "pretrained",
        "spec": spec.model_dump(mode="json"),
        "model": {
            "n_layer": spec.model.layers,
            "params_m": round(count_params(model) / 1e6, 3),
            "vocab_size": len(tokenizer),
        },
        "tokenizer": {
            "trained": spec.tokenizer is None and spec.init is None,
            "source": spec.tokenizer or spec.init,
            "seconds": round(tok_time, 1),
        },
        "data": data_section(corpus, train_blocks, valid_blocks, spec.data.format),
        "fim": fim_section,
        "training": result.summary(),
    }
    if lineage is not None:
        lineage["tokens_seen_total"] += manifest["training"]["tokens_seen"]
        manifest["init"] = lineage
        record_layout(manifest, heads_per_layer(model), f"--init {spec.init}")
    save_trained(out, model, tokenizer, manifest, overwrite, result, run)
    return out, manifest
