"""Checked writes of work files: a full disk is ``StorageFull``, and a file a library wrote is read back before use.

Some writers swallow their own errors (onnxruntime's ``quant_pre_process`` logs an ENOSPC and goes on), so
the file they leave may be truncated. ``checked_onnx_write`` turns a full-disk error inside its block into
``StorageFull`` (removing the partial file) and, after the block, parses the ONNX file and checks that its
external data covers every tensor; a file that does not read back is ``StorageFull`` when its folder has no
room left, else :class:`CorruptWrite`. The job then fails ``storage_full`` (worker/pipeline.py), never on a
parse error in a later step.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from storage.base import FULL_ERRNOS, StorageFull, is_full

# A folder with less than this free is full for the purpose of explaining a file that did not read back.
LOW_SPACE_BYTES = 1024 * 1024


class CorruptWrite(OSError):
    """A written file does not read back (and the disk is not full)."""


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use in ``folder``'s filesystem."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def raise_if_full(exc: BaseException, what: str) -> None:
    """Re-raise ``exc`` as ``StorageFull`` naming ``what`` when it says the disk is full."""
    if isinstance(exc, StorageFull):
        raise exc
    if is_full(exc):
        code = exc.errno if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS else errno.ENOSPC
        raise StorageFull(code, f"no space left on the worker's disk writing {what}: {exc}") from exc


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        with contextlib.suppress(OSError):
            p.unlink()


def check_onnx_file(path: Path, what: str) -> None:
    """Parse ``path`` as ONNX and check its external data spans: StorageFull or CorruptWrite when it does not."""
    import onnx

    from storage.onnx_files import external_data_files

    try:
        external_data_files(onnx.load_model(str(path), load_external_data=False), path.parent)
    except Exception as exc:
        if free_bytes(path.parent) < LOW_SPACE_BYTES:
            _remove(path)
            raise StorageFull(errno.ENOSPC, f"no space left on the worker's disk: {what} was written "
                                            f"truncated ({type(exc).__name__})") from exc
        raise CorruptWrite(errno.EIO, f"{what} does not read back: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def checked_onnx_write(path: Path, what: str) -> Iterator[Path]:
    """Around code that writes the ONNX file ``path``: full disk -> StorageFull (partial file removed); the file
    must read back after the block (``check_onnx_file``)."""
    try:
        yield path
    except Exception as exc:
        if is_full(exc):
            _remove(path)
        raise_if_full(exc, what)
        raise
    check_onnx_file(path, what)
