"""Image-folder datasets: a zip (or tar.gz) of one folder per class holding PNG/JPEG images.

Images are resized to ``spec.image.size``, scaled to [0, 1], normalised by ``spec.image.mean/std`` and
stacked NCHW float32 under the model's single image input; labels follow the sorted class names (or
the model config's label2id when it names every class). An hf vision model with ``preprocessor_config.json``
gets its own image processor's pixels instead, unless the spec sets ``image``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import archive
from worker.core import ArrayDataset, StepFailed, WorkingModel
from worker.formats.upload import extract_upload

if TYPE_CHECKING:
    from models.spec import JobSpec

SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
LIMITS = archive.IMAGEFOLDER_LIMITS  # the caps the API's inspection applied to the same upload
MAX_PIXELS = 50_000_000  # per image, against decompression bombs


def _class_root(folder: Path) -> Path:
    """The folder whose subfolders are the classes (descending through single wrapper folders)."""
    current = folder
    for _ in range(3):
        subdirs = [p for p in current.iterdir() if p.is_dir() and not archive.is_junk(p.name)]
        images = [p for p in current.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
        if len(subdirs) == 1 and not images:
            inner = subdirs[0]
            if any(p.is_dir() for p in inner.iterdir() if not archive.is_junk(p.name)):
                current = inner
                continue
        return current
    return current


def _image(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as raw:
            img = raw.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StepFailed("invalid_dataset", f"cannot read image {path.name!r}: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _rgb(path: Path) -> Any:
    """An image file as an RGB PIL image (for a model's own image processor), under the same pixel cap."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as raw:
            return raw.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StepFailed("invalid_dataset", f"cannot read image {path.name!r}: {exc}") from exc


def load(path: Path, meta: dict[str, Any], model: WorkingModel, spec: JobSpec, workdir: Path) -> ArrayDataset:
    """The image-folder archive at ``path`` as NCHW float32 arrays with integer labels; an hf vision model's images
    go through its own image processor (``worker.formats.image_processor``)."""
    from worker.formats.hf import classes_by_id, label_index
    from worker.formats.image_processor import model_processor, process

    if len(model.input_names) != 1:
        raise StepFailed(
            "dataset_mismatch", f"image folders feed one input; the model has {model.input_names}"
        )
    dest = extract_upload(
        path, workdir, LIMITS, prefix="imagefolder-", code="invalid_dataset", what="image-folder archive"
    )
    root = _class_root(dest)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not archive.is_junk(p.name))
    files = {
        f.name: sorted(p for p in f.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        for f in folders
    }
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise StepFailed("invalid_dataset", "no class folders with PNG/JPEG images found in the archive")
    names = sorted(files)
    index = label_index(names, model) or {name: i for i, name in enumerate(names)}
    mean = np.asarray(spec.image.mean, dtype=np.float32)
    std = np.asarray(spec.image.std, dtype=np.float32)
    if len(mean) != len(std):
        raise StepFailed("invalid_dataset", "image.mean and image.std must have the same length")
    channels = len(mean)
    ordered = [(file, index[name]) for name in names for file in files[name]]
    labels = [label for _, label in ordered]
    processor = model_processor(model, spec)
    if processor is not None:
        x = process(processor, [file for file, _ in ordered], _rgb)
    else:
        images = [_image(file, spec.image.size, channels) for file, _ in ordered]
        x = (np.stack(images) - mean[None, :, None, None]) / std[None, :, None, None]
    # A fixed interleaving, so that the first n samples (take(n)) span the classes.
    order = np.random.default_rng(spec.seed).permutation(len(labels))
    y = np.asarray(labels, dtype=np.int64)[order]
    return ArrayDataset({model.input_names[0]: x[order].astype(np.float32)}, y, classes_by_id(index))
