"""Mixed INT4/INT8 per decoder layer from measured sensitivity (the weight-only step's ``int8_share``).

Each decoder layer's MatMuls (grouped by the ``layers.<i>`` in their node names) are quantized alone to 4 bits
(round-to-nearest, the step's block size), everything else float, and the model's next-token distribution on
a few calibration rows is compared with the float model's: mean KL(float || quantized) per token. The layers
that lose the most are kept at 8 bits, as many as ``int8_share`` of the layers' weights allows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from worker.ort_guard import RunGuard

if TYPE_CHECKING:
    import onnx

    from worker.core import PassContext

LAYER = re.compile(r"layers[._/](\d+)[./]")
# Rows x tokens of calibration text each layer is judged on (one forward pass per layer).
ROWS, TOKENS = 4, 128


def layer_groups(names: list[str]) -> dict[int, list[str]]:
    """MatMul names by decoder layer index (names without ``layers.<i>`` are left out)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        found = LAYER.search(name)
        if found:
            groups.setdefault(int(found.group(1)), []).append(name)
    return dict(sorted(groups.items()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(-1, keepdims=True)))


def _logits(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], threads: int, guard: RunGuard) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([np.asarray(guard.run(sess, ["logits"], f)[0]) for f in feeds])


def kl_per_layer(
    m: onnx.ModelProto, groups: dict[int, list[str]], quantize: Callable[[onnx.ModelProto, list[str]], onnx.ModelProto],
    feeds: list[dict[str, np.ndarray]], ctx: PassContext, threads: int = 2,
) -> dict[int, float]:
    """Mean per-token KL(float || this layer alone at 4 bits by ``quantize(model, names)``) of each layer
    (every run bounded and cancellable, worker/ort_guard.py)."""
    with RunGuard(ctx.check_cancelled, what="the model (int8_share sensitivity)") as guard:
        return _kl_per_layer(m, groups, quantize, feeds, ctx, threads, guard)


def _kl_per_layer(
    m: onnx.ModelProto, groups: dict[int, list[str]], quantize: Callable[[onnx.ModelProto, list[str]], onnx.ModelProto],
    feeds: list[dict[str, np.ndarray]], ctx: PassContext, threads: int, guard: RunGuard,
) -> dict[int, float]:
    import onnx

    ref = _log_softmax(_logits(m, feeds, threads, guard))
    p_ref = np.exp(ref)
    out: dict[int, float] = {}
    for i, (layer, names) in enumerate(groups.items()):
        ctx.check_cancelled()
        ctx.progress(f"sensitivity of layer {layer} at 4 bits", fraction=0.05 + 0.3 * i / max(len(groups), 1))
        trial = onnx.ModelProto()
        trial.CopyFrom(m)
        got = _log_softmax(_logits(quantize(trial, names), feeds, threads, guard))
        out[layer] = float((p_ref * (ref - got)).sum(-1).mean())
    return out


def promote(groups: dict[int, list[str]], kl: dict[int, float], sizes: dict[str, int], share: float) -> list[int]:
    """The most sensitive layers (highest KL first) whose weights fit in ``share`` of all the layers' weights."""
    total = sum(sizes.get(n, 0) for names in groups.values() for n in names)
    budget, chosen = share * total, []
    for layer in sorted(kl, key=lambda k: -kl[k]):
        cost = sum(sizes.get(n, 0) for n in groups[layer])
        if cost <= budget:
            chosen.append(layer)
            budget -= cost
    return sorted(chosen)


def calibration_rows(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The first ``ROWS`` rows of the calibration feeds, cut to ``TOKENS`` tokens, one row per feed."""
    out: list[dict[str, np.ndarray]] = []
    for feed in feeds:
        n = len(feed["input_ids"])
        for r in range(n):
            if len(out) == ROWS:
                return out
            row: dict[str, np.ndarray] = {}
            for k, v in feed.items():
                if k.startswith("past_key_values"):
                    row[k] = v[r : r + 1]
                else:
                    row[k] = v[r : r + 1, :TOKENS]
            out.append(row)
    return out
