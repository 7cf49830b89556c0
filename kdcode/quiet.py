"""Keep third-party chatter out of kdcode's output: transformers' and the hub's progress bars ("Loading
weights", "Writing model shards", downloads) and their advisory warnings (a long file's "sequence length is
longer than the specified maximum"), for the length of a block; what was set before is put back after."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hub_bars_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        if not hub_bars_off:
            enable_progress_bars()


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Python warnings off, and the named loggers ("" is the root logger) at ERROR, for the length of a block:
    exporters' advice ("torchvision is not installed", "consider pre-processing") is not kdcode's output."""
    loggers = [logging.getLogger(n or None) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
