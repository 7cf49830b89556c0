"""Keep freed memory in the process's heap while a CPU training loop runs (glibc only).

A training step allocates and frees the same large tensors every step: the teacher's and the student's logits
(16 x 256 x 8,192 float32 = 134 MB each for the bundled teacher), their softmaxes and gradients. glibc serves
every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it back with
``munmap`` when freed, so each step faults every page of those tensors in again from the kernel, zeroed. On
this project's 2-core CPU that was a quarter of the training process's CPU time in the kernel (181 million
page faults in one 15-minute `kdcode distil`). With mmap off and the heap never trimmed during the loop, the
second step reuses the first step's pages: the same job ran 1.42x the tokens/s (fp32, 2 threads; see "A faster
live-teacher step" in docs/measurements.md).

The settings are process-wide (``mallopt``), so :func:`kept_heap` sets them for the loop only and puts glibc's
defaults back after it (which also turns off glibc's self-adjusting mmap threshold, as any ``mallopt`` of these
does). After the loop the free top of the heap goes back to the system at the next ``free``; free chunks below it
stay in the process, where glibc reuses them before it maps new memory. The first few steps still fault: glibc's
aligned allocations leave holes slightly too small for the next step's tensors until the heap settles. It applies
only on the main thread: glibc's other arenas cannot grow past 64 MB without mmap, so a large allocation on
another thread would fail with mmap off. Elsewhere (not glibc, not the main thread, a GPU run) it does nothing
and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

# mallopt parameters (glibc's <malloc.h>) and glibc's documented defaults, which are put back after the loop
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_MAX: 65536}
# During the loop: no mmap, never trim (-1 is SIZE_MAX for glibc's size_t threshold), grow the heap 64 MB at a time
KEPT = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: 64 * 2**20}


def _mallopt():
    """glibc's ``mallopt``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallopt
        is_glibc = hasattr(libc, "gnu_get_libc_version")  # other C libraries number their parameters otherwise
    except (OSError, AttributeError):
        return None
    if not is_glibc:
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


@contextlib.contextmanager
def kept_heap(on_cpu: bool = True) -> Iterator[str]:
    """Keep freed memory in the heap inside the block; yields ``kept``, or ``system`` where it does not apply (not on
    the CPU, not the main thread, not glibc, or glibc refused a setting)."""
    mallopt = _mallopt() if on_cpu and threading.current_thread() is threading.main_thread() else None
    if mallopt is None or not all(mallopt(k, v) == 1 for k, v in KEPT.items()):
        if mallopt is not None:
            _restore(mallopt)
        yield "system"
        return
    try:
        yield "kept"
    finally:
        _restore(mallopt)


def _restore(mallopt) -> None:
    for k, v in GLIBC_DEFAULTS.items():
        mallopt(k, v)
