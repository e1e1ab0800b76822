"""Safe extraction of an uploaded archive (an hf model, an image folder) into a job's work folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from storage import archive
from storage.archive import Limits
from worker.core import StepFailed


def extract_upload(path: Path, workdir: Path, limits: Limits, *, prefix: str, code: str, what: str) -> Path:
    """Safely extract the uploaded archive at ``path`` into a fresh folder under ``workdir``.

    A rejected archive fails the step with ``code`` (``invalid_model`` / ``invalid_dataset``) naming ``what``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        archive.extract(Path(path), dest, limits)
    except archive.ArchiveError as exc:
        raise StepFailed(code, f"{what} rejected: {exc}") from exc
    return dest
