"""Inspection of an imagefolder dataset: a zip/tar of ``<class>/<image>`` files, counted without decoding."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from api.inspection.common import InspectionError, list_archive
from storage import archive
from storage.archive import IMAGEFOLDER_LIMITS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def inspect_imagefolder(path: Path) -> dict[str, Any]:
    """Sample count and classes of a zip/tar of ``<class>/<image>.png|jpg|jpeg`` (no image decoding)."""
    entries = list_archive(path, IMAGEFOLDER_LIMITS)
    root = archive.common_root(entries)
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.is_dir or archive.is_junk(entry.name):
            continue
        rel = entry.name[len(root):] if root and entry.name.startswith(root) else entry.name
        parts = PurePosixPath(rel).parts
        is_image = rel.lower().endswith(IMAGE_SUFFIXES)
        if len(parts) == 2 and is_image:
            counts[parts[0]] = counts.get(parts[0], 0) + 1
        elif is_image or len(parts) > 1:
            raise InspectionError(
                f"member {entry.name!r} does not fit the layout <class>/<image>.png|jpg|jpeg"
            )
        # Loose files at the top level (README, LICENSE) are ignored.
    if not counts:
        raise InspectionError("the archive holds no images laid out as <class>/<image>.png|jpg|jpeg")
    classes = sorted(counts)
    return {
        "num_samples": sum(counts.values()),
        "fields": {"image": {"dtype": "image"}, "label": {"dtype": "str"}},
        "classes": classes,
        "class_counts": {c: counts[c] for c in classes},
        "root": root,
        "archive": archive.detect_kind(path),
    }
