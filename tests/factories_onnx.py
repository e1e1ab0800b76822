"""ONNX files as today's PyTorch writes them: a graph plus ``model.onnx.data``, alone or in a zip / tar.gz.

``opset20_cnn`` builds, with onnx.helper (fast), the operators ``torch.onnx.export``'s default (dynamo)
exporter emits for a plain CNN at opset 20 (Conv, Relu, MaxPool, AveragePool-19, ReduceMean-18, Reshape,
Gemm); ``default_export`` runs the real exporter (about 10 s on two cores) for the end-to-end paths.
"""

from __future__ import annotations

import io
import math
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "input"
OUTPUT = "logits"


def opset20_cnn(folder: Path, *, seed: int = 0, classes: int = 10, external: bool = True, mish: bool = False) -> Path:
    """``folder/model.onnx`` (+ ``model.onnx.data`` when ``external``): 1x8x8 in, ``classes`` logits out.

    ``mish`` puts a Mish activation (an ONNX op no onnx2torch converter handles) after the first Relu.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [INPUT, "c1.weight", "c1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Mish", ["r1"], ["a1"]) if mish else helper.make_node("Identity", ["r1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2.weight", "c2.bias"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], dilations=[1, 1]),
        helper.make_node("ReduceMean", ["p2", "axes"], ["m"], keepdims=1),
        helper.make_node("Reshape", ["m", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], [OUTPUT], transB=1),
    ]
    inits = [
        init("c1.weight", 8, 1, 3, 3), init("c1.bias", 8), init("c2.weight", 16, 8, 3, 3), init("c2.bias", 16),
        init("fc.weight", classes, 16), init("fc.bias", classes),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 16], np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "main_graph",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10,
                              producer_name="pytorch", producer_version="2.13.0")
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)  # small int shapes stay inline, as torch writes them
    return path


def default_export(module: Any, folder: Path, example: Any) -> Path:
    """``torch.onnx.export(module, (example,), folder/'model.onnx')`` with the defaults, a dynamic batch axis."""
    import warnings

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return path


def pack(files: dict[str, bytes | Path], out: Path, kind: str = "zip") -> Path:
    """A zip or tar.gz at ``out`` holding ``files`` (member name -> bytes, or a file to copy)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    blobs = {name: (v.read_bytes() if isinstance(v, Path) else v) for name, v in files.items()}
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in blobs.items():
                zf.writestr(name, data)
        return out
    with tarfile.open(out, "w:gz") as tf:
        for name, data in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def archive_of(model_path: Path, out: Path, kind: str = "zip", prefix: str = "") -> Path:
    """The model file and every file next to it, under ``prefix`` in a zip or tar.gz at ``out``."""
    files = {f"{prefix}{p.name}": p for p in sorted(model_path.parent.iterdir()) if p.is_file()}
    return pack(files, out, kind)


def tar_with_link(out: Path, model_path: Path, link_target: str) -> Path:
    """A tar.gz whose ``model.onnx.data`` is a symlink to ``link_target`` (must be refused)."""
    with tarfile.open(out, "w:gz") as tf:
        tf.add(model_path, arcname="model.onnx")
        info = tarfile.TarInfo("model.onnx.data")
        info.type, info.linkname = tarfile.SYMTYPE, link_target
        tf.addfile(info)
    return out


def _loop_body() -> onnx.GraphProto:
    """A Loop body that passes its value through unchanged (``v + 0``)."""
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "zero"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
    )


def looping_lm(trips: int = 2**40, vocab: int = 16) -> onnx.ModelProto:
    """A KV-cache "causal LM" (one layer, 1 kv head of 2 dims: what ``worker.lm`` reads) whose logits come
    through an ONNX ``Loop`` of ``trips`` iterations (a computed count): every run of it loops."""
    kv = ["batch", 1, "past", 2]
    inits = [numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.array(max(1, trips // 2**20), np.int64), "a"),
             numpy_helper.from_array(np.array(min(trips, 2**20), np.int64), "b"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.ones((1, vocab), np.float32), "w")]
    nodes = [helper.make_node("Mul", ["a", "b"], ["trips"]),
             helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "last"], ["ids_3d"]),
             helper.make_node("Loop", ["trips", "cond", "ids_3d"], ["looped"], body=_loop_body()),
             helper.make_node("MatMul", ["looped", "w"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    graph = helper.make_graph(
        nodes, "looping_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, kv)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def looping_model(trips: int = 2**40, *, constant: bool = True, on_data: bool = False, features: int = 4,
                  classes: int = 3) -> onnx.ModelProto:
    """A classifier whose ONNX ``Loop`` runs ``trips`` times (body ``v + 0``) before a MatMul to logits.

    ``constant``: the trip count is an initializer (what an upload check can read); otherwise it is
    computed (``Mul`` of two initializers), so only running the graph shows how long it loops.
    ``on_data``: ``trips`` times the batch's largest value: all-zero samples run at once (an evaluation on
    them passes), samples of ones loop (the calibration set, say)."""
    body = _loop_body()
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np.float32), "w")]
    nodes = []
    if on_data:  # trips x the largest input value (cast to an integer): 0 on all-zero samples
        inits.append(numpy_helper.from_array(np.array(trips, np.int64), "per_unit"))
        nodes += [helper.make_node("ReduceMax", [INPUT], ["peak"], keepdims=0),
                  helper.make_node("Cast", ["peak"], ["peak_int"], to=TensorProto.INT64),
                  helper.make_node("Mul", ["peak_int", "per_unit"], ["trips"])]
    elif constant:
        inits.append(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
    else:
        root = max(1, math.isqrt(trips))
        inits += [numpy_helper.from_array(np.array(root, np.int64), "a"),
                  numpy_helper.from_array(np.array(max(1, trips // root), np.int64), "b")]
        nodes.append(helper.make_node("Mul", ["a", "b"], ["trips"]))
    nodes += [helper.make_node("Loop", ["trips", "cond", INPUT], ["looped"], body=body),
              helper.make_node("MatMul", ["looped", "w"], [OUTPUT])]
    graph = helper.make_graph(nodes, "looping", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
