"""Quickstart: train a small digits classifier, upload it with its data, quantize it, read the report.

The MLP is 1024 wide and the recipe dynamic INT8: at that size its MatMuls run faster in INT8 on CPU
(2.2x, 0.057 -> 0.026 ms median at batch 1 on one thread, on a 2-core AMD EPYC with AVX-512 VNNI; ONNX Runtime's
per-channel dynamic quantizer on this script's model, 7 interleaved rounds of 300 runs); a 256-wide MLP is too
small for INT8 to pay off, and the report would say so. The report printed at the end is the measurement that
counts on your machine.

Run against a local service started with `make serve` (or `modelpress serve`):

    .venv/bin/python examples/quickstart.py [--url http://127.0.0.1:8000] [--mode dynamic|static|fp16] [--width 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from client import Client
from models.report_view import gains, warning_lines


def build_model(workdir: Path, width: int) -> tuple[Path, Path, Path]:
    """Train a 64-width-width-10 MLP on scikit-learn's digits for a few seconds; export it and its data."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, evl = order[:1400], order[1400:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    model = workdir / "digits_mlp.onnx"
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
    torch.onnx.export(net.eval(), (torch.zeros(1, 64),), str(model), input_names=["pixels"],
                      output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    np.savez(workdir / "eval.npz", pixels=x[evl], labels=y[evl])
    np.savez(workdir / "calibration.npz", pixels=x[train][:256])
    return model, workdir / "eval.npz", workdir / "calibration.npz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="service URL (default: $MODELPRESS_URL or http://127.0.0.1:8000)")
    p.add_argument("--mode", default="dynamic", choices=["dynamic", "static", "fp16"])
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Client(args.url) as mp:
        work = Path(tmp)
        model_path, eval_path, calib_path = build_model(work, args.width)
        model = mp.upload_model(model_path, format="onnx")
        evald = mp.upload_dataset(eval_path, format="npz")
        calib = mp.upload_dataset(calib_path, format="npz")
        print(f"uploaded {model.id} ({model.size_bytes} bytes), eval {evald.id}, calibration {calib.id}")
        job = mp.submit({
            "model": model.id,
            "task": "image-classification",
            "data": {"eval": evald.id, "calibration": calib.id},
            "steps": [{"type": "quantize", "mode": args.mode}],
            "evaluate": {"max_accuracy_drop": 0.02},
        })
        print(f"submitted {job.id}")
        done = job.wait(on_progress=lambda j: print(f"  {j.status:10s} {j.phase:28s} {j.progress.percent:5.1f}%"))
        files = done.download(work / "out")
        report = json.loads(next(f for f in files if f.name == "report.json").read_text())
        inp, out = report["input"], report["output"]
        print(f"size     {inp['size_bytes']:>10} -> {out['size_bytes']:>10} bytes")
        print(f"latency  {inp['latency_ms']['median']:>10.4f} -> {out['latency_ms']['median']:>10.4f} ms (median)")
        print(f"accuracy {inp.get('accuracy', float('nan')):>10.4f} -> {out.get('accuracy', float('nan')):>10.4f}")
        print("gains:", ", ".join(f"{g.value_text} {g.word}" for g in gains(report)))
        for line in warning_lines(report):
            print(f"WARNING: {line}")
        print("downloaded:", ", ".join(f.name for f in files))


if __name__ == "__main__":
    main()
