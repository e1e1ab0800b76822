"""RoPE cos/sin caches as a few constant nodes instead of stored tensors.

onnxruntime-genai's builder stores each rotary cache (``cos_cache``/``sin_cache``, or ``*_global``/``*_local``
for Gemma's two bases) as a float initializer of ``[max_positions, rotary_dim / 2]``: 67 MB in Gemma-3-270M's
file (32768 positions x 128, two bases, cos and sin), a fifth of its INT4 file. Each row is
``cos(p * inv_freq) * scale`` (``sin`` likewise), so ``compact_rope_caches`` writes instead, per base,
``Range(0, M) -> Cast -> Unsqueeze -> Mul(inv_freq) -> Cast(double) -> Cos | Sin -> Cast(float) [-> Mul(scale)]`` with outputs named as the
initializers were: the consumers (``GroupQueryAttention`` inputs 7/8, ``RotaryEmbedding`` inputs 2/3) are
unchanged, and ONNX Runtime folds the nodes back into constants at session load (its default constant
folding), so the file shrinks by the caches and runs as before.

``inv_freq`` and ``scale`` are recovered from the stored caches themselves (no builder internals): the angle of
each column at position 1, refined by unwrapping it at positions 2, 4, 8, ... M-1, then the float32 value
whose float32 products ``p * inv_freq`` reproduce the most stored values exactly (the builder multiplies in
float32; cos/sin of them, correctly rounded, differ from torch's in 5 % of the values, by one ulp).
A cache is replaced only where ONNX Runtime's own evaluation of the nodes matches it within ``ATOL``
(position scaling, concatenated long/short caches and the like are left stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ATOL = 1e-6  # max |computed - stored| accepted (float32 cos/sin: an ulp near 1 is 6e-8)
PREFIX = "/rope_cache"  # node and initializer names of the subgraphs: to_fp16 keeps them in float32
# (op type, index of the cos input, index of the sin input)
CONSUMERS = (("GroupQueryAttention", 7, 8), ("RotaryEmbedding", 2, 3))
CANDIDATE_ULPS = 4  # float32 neighbours of the recovered inv_freq tried on each side


@dataclass
class Rope:
    """One cache pair as nodes: ``cos(p * inv_freq) * scale`` and ``sin(...)`` for p in [0, positions)."""
    cos: str
    sin: str
    positions: int
    inv_freq: np.ndarray  # float32 [rotary_dim / 2]
    scale: float


def _reference(positions: int, inv_freq: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """What the builder computes: float32 angles, cos/sin rounded to float32, times the float32 scale."""
    angle = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle.astype(np.float64)).astype(np.float32), np.sin(angle.astype(np.float64)).astype(np.float32)
    if scale != 1.0:
        cos, sin = cos * np.float32(scale), sin * np.float32(scale)
    return cos, sin


def recover(cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(float32 inv_freq, scale) with ``cos[p] = cos(p * inv_freq) * scale`` (sin likewise), or None where the
    pair is not of that form within ``ATOL`` (checked here against numpy; the caller checks ORT's nodes)."""
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] < 2 or cos.dtype != np.float32:
        return None
    positions = cos.shape[0]
    scale = float(cos[0, 0])
    if scale <= 0 or not np.all(cos[0] == cos[0, 0]) or np.any(sin[0] != 0):
        return None
    c, s = cos.astype(np.float64), sin.astype(np.float64)
    est = np.arctan2(s[1], c[1])
    for p in sorted({*(2**k for k in range(1, positions.bit_length()) if 2**k < positions), positions - 1}):
        at = np.arctan2(s[p], c[p])
        est = (at + 2 * np.pi * np.round((p * est - at) / (2 * np.pi))) / p
    base = est.astype(np.float32)
    best, best_misses = base.copy(), np.full(base.shape, np.iinfo(np.int64).max)
    for k in sorted(range(-CANDIDATE_ULPS, CANDIDATE_ULPS + 1), key=abs):  # ties keep the nearest to the estimate
        cand = base.copy()
        step = np.sign(k) * np.inf if k else 0.0
        for _ in range(abs(k)):
            cand = np.nextafter(cand, np.float32(step)).astype(np.float32)
        rc, rs = _reference(positions, cand, scale)
        misses = (rc != cos).sum(0) + (rs != sin).sum(0)  # the builder's inv_freq reproduces the most values exactly
        better = misses < best_misses
        best[better], best_misses[better] = cand[better], misses[better]
    rc, rs = _reference(positions, best, scale)
    if max(float(np.abs(rc - cos).max()), float(np.abs(rs - sin).max())) > ATOL:
        return None
    return best, scale


def pairs(m: Any) -> list[tuple[str, str]]:
    """(cos, sin) initializer names fed to the rotary inputs of ``m``'s attention nodes, each pair once."""
    inits = {t.name for t in m.graph.initializer}
    found: list[tuple[str, str]] = []
    for node in m.graph.node:
        for op, ci, si in CONSUMERS:
            if node.op_type == op and len(node.input) > si:
                pair = (node.input[ci], node.input[si])
                if pair[0] in inits and pair[1] in inits and pair not in found:
                    found.append(pair)
    return found


def _nodes(ropes: list[Rope]) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing every pair of ``ropes`` under its cache names."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = [numpy_helper.from_array(np.array(0, np.int64), f"{PREFIX}/zero"),
                        numpy_helper.from_array(np.array(1, np.int64), f"{PREFIX}/one"),
                        numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}/axis1")]
    columns: dict[int, str] = {}
    for i, r in enumerate(ropes):
        if r.positions not in columns:  # integer positions, cast: exact in float32 (a float Range is not, in fp16)
            base = f"{PREFIX}/positions_{r.positions}"
            inits.append(numpy_helper.from_array(np.array(r.positions, np.int64), f"{base}/limit"))
            nodes += [helper.make_node("Range", [f"{PREFIX}/zero", f"{base}/limit", f"{PREFIX}/one"], [f"{base}/int"],
                                       name=f"{base}/Range"),
                      helper.make_node("Cast", [f"{base}/int"], [f"{base}/float"], name=f"{base}/Cast",
                                       to=TensorProto.FLOAT),
                      helper.make_node("Unsqueeze", [f"{base}/float", f"{PREFIX}/axis1"], [f"{base}/column"],
                                       name=f"{base}/Unsqueeze")]
            columns[r.positions] = f"{base}/column"
        base = f"{PREFIX}/{i}"
        inits.append(numpy_helper.from_array(r.inv_freq.astype(np.float32), f"{base}/inv_freq"))
        nodes.append(helper.make_node("Mul", [columns[r.positions], f"{base}/inv_freq"], [f"{base}/angle"],
                                      name=f"{base}/Mul"))
        # cos/sin of the float32 angle in float64, rounded once: ORT's float32 Cos is off by an ulp on 20 % of
        # Gemma's cache, torch's (the builder's) on 5 %, float64 rounded on none of the correctly rounded values
        nodes.append(helper.make_node("Cast", [f"{base}/angle"], [f"{base}/angle64"], name=f"{base}/Cast",
                                      to=TensorProto.DOUBLE))
        for op, out in (("Cos", r.cos), ("Sin", r.sin)):
            raw = out if r.scale == 1.0 else f"{base}/{op}/raw"
            nodes += [helper.make_node(op, [f"{base}/angle64"], [f"{base}/{op}/64"], name=f"{base}/{op}"),
                      helper.make_node("Cast", [f"{base}/{op}/64"], [raw], name=f"{base}/{op}/Cast",
                                       to=TensorProto.FLOAT)]
            if r.scale != 1.0:
                inits.append(numpy_helper.from_array(np.array(r.scale, np.float32), f"{base}/{op}/scale"))
                nodes.append(helper.make_node("Mul", [raw, f"{base}/{op}/scale"], [out], name=f"{base}/{op}/Mul"))
    return nodes, inits


def _evaluate(nodes: list[Any], inits: list[Any], outputs: list[str], opset: int) -> list[np.ndarray]:
    """ONNX Runtime's values of ``outputs`` of the nodes alone (what the session folds at load)."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "rope", [], [helper.make_empty_tensor_value_info(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # the runtime's newest may trail the onnx package's
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(outputs, {})]


def replacement(caches: list[tuple[str, str, np.ndarray, np.ndarray]], opset: int
                ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(nodes, initializers, report) computing each ``(cos name, sin name, cos, sin)`` cache pair that
    ``recover`` expresses, under its names; nothing where ONNX Runtime's values of the nodes differ from the
    given caches by more than ``ATOL``. The report: the caches replaced, bytes saved, max difference."""
    ropes: list[Rope] = []
    for cos_name, sin_name, cos, sin in caches:
        got = recover(cos, sin)
        if got is not None:
            ropes.append(Rope(cos_name, sin_name, int(cos.shape[0]), got[0], got[1]))
    report: dict[str, Any] = {"replaced": [], "bytes_saved": 0, "max_abs_diff": 0.0,
                              "kept": [n for c in caches for n in c[:2] if not any(n in (r.cos, r.sin) for r in ropes)]}
    if not ropes:
        return [], [], report
    nodes, inits = _nodes(ropes)
    given = {n: a for c in caches for n, a in ((c[0], c[2]), (c[1], c[3]))}
    outputs = [n for r in ropes for n in (r.cos, r.sin)]
    computed = _evaluate(nodes, inits, outputs, opset)
    report["max_abs_diff"] = max(float(np.abs(given[n] - v).max()) for n, v in zip(outputs, computed, strict=True))
    if report["max_abs_diff"] > ATOL:
        report["kept"] = [n for c in caches for n in c[:2]]
        return [], [], report
    report["replaced"] = outputs
    report["bytes_saved"] = sum(given[n].nbytes for n in outputs)
    return nodes, inits, report


def opset_of(m: Any) -> int:
    """``m``'s default-domain opset version."""
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=17)


def compact_rope_caches(m: Any) -> dict[str, Any]:
    """In place: every cos/sin cache initializer of ``m`` (``pairs``) that ``replacement`` expresses replaced
    by its nodes, placed first. Returns ``replacement``'s report."""
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    caches = [(c, s, numpy_helper.to_array(inits[c]), numpy_helper.to_array(inits[s])) for c, s in pairs(m)]
    nodes, new, report = replacement(caches, opset_of(m))
    if not nodes:
        return report
    gone = set(report["replaced"])
    keep = [t for t in m.graph.initializer if t.name not in gone]
    del m.graph.initializer[:]
    m.graph.initializer.extend([*keep, *new])
    rest = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([*nodes, *rest])
    return report
