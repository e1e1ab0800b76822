"""An hf vision model's own image processor, for image-folder datasets.

A transformers checkpoint comes with ``preprocessor_config.json`` (resize, crop, rescale, normalise: what the model
was trained on). Its images go through that processor (``AutoImageProcessor``, stock classes only, never remote
code) instead of the spec's generic ``image`` settings, unless the spec sets ``image`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.core import StepFailed, WorkingModel

if TYPE_CHECKING:
    from models.spec import JobSpec

CHUNK = 64  # images per processor call


def model_processor(model: WorkingModel, spec: JobSpec) -> Any | None:
    """The model's image processor when it is an hf upload with ``preprocessor_config.json`` and the spec's ``image``
    is the default (a stored spec lists every field, so "not set" reads as "equal to the default"); None otherwise
    (the spec's size/mean/std apply)."""
    from models.spec import ImageConfig

    if model.hf_dir is None or spec.image != ImageConfig():
        return None
    if not (Path(model.hf_dir) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model.hf_dir), local_files_only=True, trust_remote_code=False,
                                                  use_fast=False)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise StepFailed("invalid_model", f"preprocessor_config.json is not a usable image processor: {exc}") from exc


def describe(processor: Any) -> dict[str, Any]:
    """What the processor does, for the job's log: its class, size, mean and std."""
    return {"image_processor": type(processor).__name__, "size": getattr(processor, "size", None),
            "image_mean": getattr(processor, "image_mean", None), "image_std": getattr(processor, "image_std", None)}


def process(processor: Any, files: list[Path], open_image: Callable[[Path], Any]) -> np.ndarray:
    """``files`` through the processor, ``CHUNK`` at a time: NCHW float32 ``pixel_values``."""
    out = []
    for start in range(0, len(files), CHUNK):
        images = [open_image(p) for p in files[start:start + CHUNK]]
        out.append(np.asarray(processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 3, 1, 1), np.float32)
