"""Inspection of a ``.npz`` dataset: sample count, arrays (dtype, shape) and classes, without pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.inspection.common import MAX_CLASSES, InspectionError, list_archive, sorted_labels
from storage.archive import NPZ_LIMITS

# Array data is never loaded whole: labels are streamed from the zip member this many bytes at a time,
# so inspecting a large upload costs a few MiB of memory, whatever its size.
READ_CHUNK_BYTES = 4 * 1024**2


def inspect_npz(path: Path) -> dict[str, Any]:
    """Sample count, arrays (dtype and shape) and classes of a ``.npz`` file, without pickle."""
    import zipfile

    import numpy as np

    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InspectionError(f"the file is not a readable .npz archive: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InspectionError("the file is a single .npy array, not an .npz archive of named arrays")
    with npz:
        list_archive(path, NPZ_LIMITS)
        fields: dict[str, Any] = {}
        dtypes: dict[str, Any] = {}
        zf = npz.zip
        if zf is None:
            raise InspectionError("the .npz archive could not be opened")
        if len(zf.infolist()) > 10_000:
            raise InspectionError("the .npz archive holds more than 10000 arrays")
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise InspectionError(f"member {info.filename!r} is not a .npy array")
            name = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise InspectionError(f"array {name!r}: unreadable header ({exc})") from exc
            if dtype.hasobject:
                raise InspectionError(f"array {name!r} holds Python objects (pickle), which are not loaded")
            if len(shape) == 0:
                raise InspectionError(f"array {name!r} is a scalar; every array needs a first (sample) axis")
            fields[name] = {"dtype": dtype.name if dtype.names is None else str(dtype), "shape": list(shape)}
            dtypes[name] = dtype
        if not fields:
            raise InspectionError("the .npz archive holds no arrays")
        counts = {name: f["shape"][0] for name, f in fields.items()}
        if len(set(counts.values())) != 1:
            desc = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise InspectionError(f"arrays disagree on the number of samples (first axis): {desc}")
        classes = None
        if "labels" in fields:
            info = fields["labels"]
            if len(info["shape"]) != 1:
                raise InspectionError(f"'labels' must be one-dimensional, got shape {info['shape']}")
            if dtypes["labels"].kind not in "iubU":
                raise InspectionError(f"'labels' must hold integers or strings, got {dtypes['labels'].name}")
            classes = sorted_labels(_distinct_labels(zf, "labels.npy", dtypes["labels"], info["shape"][0]))
    return {"num_samples": int(next(iter(counts.values()))), "fields": fields, "classes": classes}


def _distinct_labels(zf: Any, member: str, dtype: Any, count: int) -> set[Any]:
    """The distinct values of a 1-D array member, read in ``READ_CHUNK_BYTES`` pieces (never loaded whole)."""
    import zipfile

    import numpy as np

    per_chunk = max(1, READ_CHUNK_BYTES // max(1, dtype.itemsize))
    distinct: set[Any] = set()
    left = count
    try:
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(fh)
            else:
                np.lib.format.read_array_header_2_0(fh)
            while left > 0:
                n = min(per_chunk, left)
                raw = fh.read(n * dtype.itemsize)
                if len(raw) != n * dtype.itemsize:
                    raise InspectionError(f"'labels' is truncated: {count - left + len(raw) // dtype.itemsize} of {count} values")
                distinct.update(np.unique(np.frombuffer(raw, dtype=dtype)).tolist())
                if len(distinct) > MAX_CLASSES:
                    raise InspectionError(f"more than {MAX_CLASSES} distinct labels; labels must be class ids or names")
                left -= n
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InspectionError(f"'labels' could not be read: {exc}") from exc
    return distinct
