"""The worker process's memory: its resident size, handing freed memory back after a job, and what it has.

An LM job frees gigabytes of tensors, ONNX protos and sessions; without help the idle worker kept 1.6-4.4 GiB
of them: objects in reference cycles wait for the cyclic collector, and glibc's malloc keeps freed heap
pages (small and medium blocks, arenas of other threads) until ``malloc_trim`` gives them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from functools import cache
from typing import Any

from models.memory_fit import machine_memory_bytes as total_memory_bytes  # noqa: F401 (re-exported)


def rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; 0 where there is no procfs)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started or since ``reset_peak_rss`` (``VmHWM``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def reset_peak_rss() -> None:
    """Start ``peak_rss_bytes`` over from the current RSS (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


@cache
def _libc() -> Any:
    """glibc, when this process runs on it (``malloc_trim`` is a glibc function); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None
    return libc


def release_memory() -> dict[str, int]:
    """Hand back what the last job freed: the cyclic collector, torch's caches (when torch is loaded) and
    glibc's ``malloc_trim(0)``; returns the RSS before and after."""
    before = rss_bytes()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available():
            cuda.empty_cache()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    return {"rss_before": before, "rss_after": rss_bytes()}
