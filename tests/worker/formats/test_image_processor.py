"""An hf vision checkpoint (config + safetensors + its image processor) with an image-folder dataset: the images
go through the model's own processor, and the README's walkthrough (prune -> distill -> static INT8) runs on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.spec import JobSpec
from tests import factories_train as f
from worker.formats import hf, imagefolder


@pytest.fixture(scope="module")
def vit_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT for the ten digit classes (16x16 RGB, patch 4), with a ViTImageProcessor of its own."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit") / "vit"
    names = [str(i) for i in range(10)]
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10,
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.3, 0.4, 0.5],
                      image_std=[0.2, 0.25, 0.5]).save_pretrained(folder)
    return f.zip_dir(folder, folder.parent / "vit.zip")


def test_imagefolder_pixels_come_from_the_models_own_image_processor(vit_zip: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import ViTImageProcessor

    model = hf.load(vit_zip, {}, tmp_path / "m")
    assert model.input_names == ["pixel_values"] and model.meta["hf_task"] == "image-classification"
    archive = f.digits_imagefolder(tmp_path / "d.zip", per_class=2)
    data = imagefolder.load(archive, {}, model, f.spec(), tmp_path / "w")
    x = data.inputs["pixel_values"]
    assert x.shape == (20, 3, 16, 16) and x.dtype == np.float32 and data.labels is not None
    # one image by hand through the same processor: the loader's pixels are exactly those
    processor = ViTImageProcessor.from_pretrained(model.hf_dir)
    label = int(data.labels[0])
    folder = next(p for p in (tmp_path / "w").rglob(str(label)) if p.is_dir())
    by_hand = [processor(images=Image.open(p).convert("RGB"), return_tensors="np")["pixel_values"][0]
               for p in sorted(folder.iterdir())]
    assert min(float(np.abs(x[0] - h).max()) for h in by_hand) < 1e-5
    # the spec's own image settings still win when given
    own = imagefolder.load(archive, {}, model, f.spec(image={"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}),
                           tmp_path / "w2")
    assert not np.allclose(own.inputs["pixel_values"], x)


def test_the_walkthrough_runs_on_a_transformers_vision_model(vit_zip: Path, tmp_path: Path) -> None:
    from worker import pipeline
    from worker.context import LocalContext

    train = f.digits_imagefolder(tmp_path / "train.zip", per_class=6)
    evald = f.digits_imagefolder(tmp_path / "eval.zip", per_class=3)
    spec = JobSpec.model_validate({
        "model": "mdl_vit", "task": "image-classification", "data": {"train": "ds_train", "eval": "ds_eval"},
        "steps": [{"type": "prune", "method": "structured", "ratio": 0.5}, {"type": "distill", "epochs": 1},
                  {"type": "quantize", "mode": "static", "calibration": {"samples": 16}}],
        "evaluate": {"latency": {"warmup": 1, "runs": 5}}, "cache": False,
    })
    ctx = LocalContext(tmp_path / "work", spec, models={"mdl_vit": (vit_zip, "hf", {})},
                       datasets={"ds_train": (train, "imagefolder", {}), "ds_eval": (evald, "imagefolder", {})},
                       device="cpu")
    report = pipeline.run(spec, ctx).report
    prune = report["steps"][0]["metrics"]
    assert prune["params_after"] < 0.8 * prune["params_before"], prune
    assert report["output"]["num_samples"] == 30 and report["output"]["accuracy"] is not None
    assert report["steps"][2]["label"] == "quantize (static)"
