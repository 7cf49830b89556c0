"""The before/after quality check's lines, shared by `kdcode compress` and `kdcode export` (their flags are the
check spec's fields, :class:`kdcode.spec_compress.QualityCheckSpec`)."""

from __future__ import annotations

from typing import Any

from kdcode.cli._common import warn
from kdcode.cli._console import out_console


def print_quality(quality: dict[str, Any] | None) -> None:
    """The quality check's lines on stdout, its warning (when beyond the thresholds) on stderr."""
    from kdcode.compression.quality import quality_lines

    for line in quality_lines(quality):
        out_console().print(line)
    if quality and quality.get("warning"):
        warn(quality["warning"])
