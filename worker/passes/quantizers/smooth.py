"""SmoothQuant for INT8 steps (``smooth``): move activation outliers into the weights before quantizing.

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models":
for a MatMul (or Gemm) ``X @ W`` with a constant ``W`` (K x N), per input channel k, ``s_k = max|X_k| ** alpha /
max|W_k| ** (1 - alpha)``; the graph computes ``(X / s) @ (diag(s) W)``, the same in float, while the
per-tensor activation range the INT8 kernels see (dynamic: one scale per request) no longer spans the few
channels with outliers. ``X / s`` is one ``Mul`` by a constant per distinct input tensor, shared by the
MatMuls that read it (Q, K and V). ``max|X_k|`` is measured on calibration rows.

Measured on all-MiniLM-L6-v2 (README ``bench.search``): dynamic INT8 worst-case cosine 0.986, the same with
``alpha`` 0.75 (32 calibration rows) 0.994, at dynamic INT8's speed; alpha 0.5, the paper's default for LLMs,
0.970 (it moves too much range into the weights, which per-channel INT8 quantizes per output column).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import SMOOTH_SAMPLES
from worker.core import PassContext, StepFailed, WorkingModel
from worker.passes.quantizers.files import is_large, node_attr, save, unique_path

if TYPE_CHECKING:
    import onnx

    from worker.ort_guard import RunGuard

# Scales are clipped to this range either way: a dead channel (max 0) or a huge one stays finite.
SCALE_CLIP = 1e2
_EPS = 1e-5


def transposed(n: onnx.NodeProto) -> bool:
    """Whether the node's weight is stored [N, K] (a Gemm with ``transB``)."""
    return n.op_type == "Gemm" and node_attr(n, "transB", 0) == 1


def groups(m: onnx.ModelProto, excluded: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """MatMuls (and Gemms, A not transposed) with a constant 2-D float weight, not excluded, by the activation
    tensor they read."""
    from onnx import TensorProto

    init = {t.name: t for t in m.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        weighted = (n.op_type == "MatMul" and len(n.input) == 2) or (n.op_type == "Gemm" and node_attr(n, "transA", 0) == 0)
        w = init.get(n.input[1]) if weighted else None
        if w is None or n.name in excluded or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            continue
        out.setdefault(n.input[0], []).append(n)
    # a weight shared with another reader (or read twice) cannot be rescaled for one activation only
    readers: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    return {x: ns for x, ns in out.items() if all(readers[n.input[1]] == 1 for n in ns)}


def scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scales ``max|X| ** alpha / max|W| ** (1 - alpha)``, clipped."""
    s = np.maximum(act_max, _EPS) ** alpha / np.maximum(weight_max, _EPS) ** (1.0 - alpha)
    return np.clip(s, 1.0 / SCALE_CLIP, SCALE_CLIP).astype(np.float32)


def activation_maxima(path: Path, names: list[str], inputs: dict[str, np.ndarray], guard: RunGuard) -> dict[str, np.ndarray]:
    """Per last-axis channel, the largest ``|value|`` of each named tensor over the rows (run a row at a time:
    the whole batch of every activation would not fit in memory on a large model)."""
    import onnx

    from worker.evaluate import _Runner, make_session

    m = onnx.load(str(path))
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x) for x in names if x not in known)
    probe = path.with_name(path.stem + "-smooth-probe.onnx")
    save(m, probe, is_large(path))
    try:
        runner = _Runner(make_session(probe, 1))
        runner.output_names = list(names)
        maxima: dict[str, np.ndarray] = {}
        n = len(next(iter(inputs.values())))
        for i in range(n):
            outs = runner.run_all({k: v[i : i + 1] for k, v in inputs.items()}, 1, guard.check_cancelled, guard)
            for x in names:
                a = np.abs(outs[x]).reshape(-1, outs[x].shape[-1]).max(axis=0)
                maxima[x] = a if x not in maxima else np.maximum(maxima[x], a)
        return maxima
    finally:
        probe.unlink(missing_ok=True)
        probe.with_name(probe.name + ".data").unlink(missing_ok=True)


def smooth(src: Path, alpha: float, excluded: list[str], model: WorkingModel, ctx: PassContext) -> tuple[Path, dict[str, Any]]:
    """``src`` with SmoothQuant's scales applied to every constant-weight MatMul not in ``excluded``; the new
    path and a report (how many activations and MatMuls, the largest scale)."""
    import onnx
    from onnx import numpy_helper

    from worker.passes.quantizers import ort

    data = ctx.dataset("calibration", model)
    if data is None or len(data) == 0:
        raise StepFailed("calibration_data_missing", "smooth measures activation ranges on calibration data")
    data = data.take(SMOOTH_SAMPLES)
    m = onnx.load(str(src))
    found = groups(m, set(excluded))
    if not found:
        return src, {"alpha": alpha, "activations": 0, "matmuls": 0}
    ctx.progress("smoothing: measuring activation ranges", fraction=0.1)
    with ort.calibration_guard(ctx, src, "smooth") as guard:
        act = activation_maxima(src, list(found), data.inputs, guard)
    init = {t.name: t for t in m.graph.initializer}
    producer = {o: i for i, n in enumerate(m.graph.node) for o in n.output}
    muls: dict[int, list[onnx.NodeProto]] = {}
    largest = 0.0
    for k, (x, nodes) in enumerate(found.items()):
        weights = [numpy_helper.to_array(init[n.input[1]]) for n in nodes]
        weights = [w.T if transposed(n) else w for n, w in zip(nodes, weights, strict=True)]  # all [K, N]
        if act[x].shape[0] != weights[0].shape[0]:
            continue
        s = scales(act[x], np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)
        largest = max(largest, float(s.max()), float(1.0 / s.min()))
        inv = f"smooth_inv_{k}"
        m.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        y = f"{x}_smoothed"
        muls.setdefault(producer.get(x, -1), []).append(onnx.helper.make_node("Mul", [x, inv], [y], name=f"smooth_{k}"))
        for n, w in zip(nodes, weights, strict=True):
            n.input[0] = y
            scaled = (w * s[:, None]).astype(np.float32)
            init[n.input[1]].CopyFrom(numpy_helper.from_array(scaled.T.copy() if transposed(n) else scaled, n.input[1]))
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(muls.get(-1, []))  # graph inputs read directly
    for i, n in enumerate(nodes):  # each Mul right after its producer: the order stays topological
        m.graph.node.append(n)
        m.graph.node.extend(muls.get(i, []))
    out = unique_path(ctx.workdir, "quantize-smoothed")
    save(m, out, is_large(src))
    smoothed = sum(n.op_type in ("MatMul", "Gemm") and n.input[0].endswith("_smoothed") for n in nodes)
    return out, {"alpha": alpha, "activations": sum(len(v) for v in muls.values()), "matmuls": smoothed,
                 "largest_scale": round(largest, 3), "samples": len(data)}
