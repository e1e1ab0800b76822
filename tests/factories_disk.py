"""A real full disk for tests: a small tmpfs mounted on a folder (root only), unmounted when the block ends."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(folder: Path, size_bytes: int, inodes: int | None = None) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size_bytes`` (and at most ``inodes`` files and folders): writes past it fail ENOSPC.

    Skips the test where mounting is not allowed (not root, no tmpfs)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (f",nr_inodes={inodes}" if inodes is not None else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
