"""GPTQ for the MatMuls of an ONNX graph, written straight to ``MatMulNBits`` (the weight-only step's
``algorithm: gptq``).

GPTQ (Frantar et al. 2022) quantizes a weight column by column and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's inputs on
calibration data; each block of ``block_size`` input rows gets its own scale (and zero point), chosen by an
MSE search over clipped ranges. ORT's own GPTQ (``neural_compressor.gptq_quantize``) keeps every calibration
activation of every MatMul in memory at once: on a real 135 M-parameter LLM it had not finished after 20 min at
10.7 GB. Here one run of the graph per calibration batch adds each distinct MatMul input ``X`` to its running
``X^T X`` and drops it (memory: the Hessians, ``K^2`` floats per distinct input, plus one batch's
activations), then each weight is quantized alone in torch.

The math (``quantize_weight``) is apart from the graph glue (``hessians``, ``apply``): the codes, scales and
zero points are packed the way ``MatMulNBits`` reads them (two 4-bit codes per byte, low nibble first, along K;
zero points packed the same way along the blocks).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.passes.quantizers.files import use_ms_domain

if TYPE_CHECKING:
    import onnx

    from worker.core import PassContext

Runner = Callable[[Any, list[str], dict[str, np.ndarray]], list[Any]]
# Dampening added to the Hessian's diagonal, as a share of its mean (the paper's 1 %).
DAMP = 0.01
# Columns quantized between the lazy updates of the rest of the weight (the paper's 128).
LAZY_BLOCK = 128
# Range shrink factors tried per block for its scale (1.0 = min/max, down to 0.7).
SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(13))


@dataclasses.dataclass(frozen=True)
class Quantized:
    """One weight ``[K, N]`` quantized: codes ``[N, K]`` (uint8, 0..2^bits-1), scales and zero points
    ``[N, K / block]``; ``error``: the relative output error on the calibration inputs,
    ``sqrt(tr(dW^T H dW) / tr(W^T diag(H) W))`` (GPTQ's own running loss over the output energy with the
    inputs taken as uncorrelated: O(K N), where the exact ``tr(W^T H W)`` costs a K^2 N product)."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    error: float


def _grid(w: np.ndarray, bits: int, symmetric: bool, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of ``w [N, block]`` for the range shrunk by ``shrink``."""
    top = 2**bits - 1
    if symmetric:
        amax = np.abs(w).max(1) * shrink
        scale = np.where(amax > 0, amax / (top // 2), 1.0).astype(np.float32)
        return scale, np.full_like(scale, float(top // 2 + 1))
    lo = np.minimum(w.min(1) * shrink, 0.0)
    hi = np.maximum(w.max(1) * shrink, 0.0)
    scale = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    return scale, np.clip(np.round(-lo / scale), 0, top).astype(np.float32)


def block_params(w: np.ndarray, bits: int, symmetric: bool, weight: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point per row of one block ``w [N, block]`` that minimise the squared rounding
    error (weighted per column by ``weight``, the Hessian's diagonal) over ``SHRINK_GRID``."""
    top = 2**bits - 1
    best_err = np.full(w.shape[0], np.inf)
    best_scale = np.ones(w.shape[0], dtype=np.float32)
    best_zero = np.zeros(w.shape[0], dtype=np.float32)
    for shrink in SHRINK_GRID:
        scale, zero = _grid(w, bits, symmetric, shrink)
        q = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, top)
        sq = ((q - zero[:, None]) * scale[:, None] - w) ** 2
        err = sq @ weight if weight is not None else sq.sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What GPTQ derives from one input's Hessian alone, shared by the MatMuls that read that input (q/k/v,
    gate/up): the padded Hessian's diagonal, dead inputs, the column order and the upper Cholesky factor of
    the damped, permuted ``H^-1``."""

    k: int
    block: int
    diag: np.ndarray
    dead: np.ndarray
    perm: np.ndarray
    hinv: np.ndarray


def prepare(hessian: np.ndarray, block: int, act_order: bool = True) -> Prepared:
    """``H`` ``[K, K]`` padded to whole blocks (MatMulNBits blocks cover K rounded up: padded inputs are 0),
    inputs that never fire set to 1 on the diagonal, columns ordered (``act_order``: decreasing ``H``
    diagonal, the paper's trick for small models), 1 % damping, then ``chol(H^-1)``."""
    k = hessian.shape[0]
    kp = k + (-k % block)
    h = np.zeros((kp, kp), dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    diag = np.diag(h).astype(np.float32)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(kp)
    h = h[perm]  # one K^2 float64 copy at a time (at K = 14336, an 8 B model's down_proj, each is 1.6 GB)
    h = h[:, perm]
    h[np.diag_indices(kp)] += DAMP * np.mean(np.diag(h))
    return Prepared(k, block, diag, dead, perm, _inverse_cholesky(h))


def quantize_weight(weight: np.ndarray, hessian: np.ndarray | Prepared, bits: int, block: int, symmetric: bool,
                    act_order: bool = True) -> Quantized:
    """GPTQ of one MatMul weight ``[K, N]`` (``y = x @ W``) given ``H = X^T X`` ``[K, K]`` of its inputs (or
    ``prepare(H)``, computed once per input).

    Blocks of ``block`` input rows share a scale; the block scales are chosen up front on the original weights
    (static groups) so the file layout stays in input order whatever the column order. Works on ``W`` as
    stored (``[K, N]``: one input's weights are a contiguous row), in numpy: the column loop is thousands of
    small vector operations, where torch's per-op overhead and thread hand-offs cost 20x on busy cores.
    """
    prep = hessian if isinstance(hessian, Prepared) else prepare(hessian, block, act_order)
    top = 2**bits - 1
    k, n = weight.shape
    kp = prep.diag.shape[0]
    w0 = np.zeros((kp, n), dtype=np.float32)
    w0[:k] = weight
    w = w0.copy()
    w[prep.dead] = 0.0
    diag, perm, hinv = prep.diag, prep.perm, prep.hinv
    blocks = kp // block
    scales = np.zeros((blocks, n), dtype=np.float32)
    zeros = np.zeros((blocks, n), dtype=np.float32)
    for b in range(blocks):  # the block grids, on the original weights (static groups)
        sl = slice(b * block, (b + 1) * block)
        scales[b], zeros[b] = block_params(np.ascontiguousarray(w[sl].T), bits, symmetric, diag[sl])
    w = w[perm]
    codes = np.zeros((kp, n), dtype=np.float32)
    loss = 0.0  # sum over columns of (w - q)^2 / [H^-1]_ii: tr(dW^T H dW) of the damped H (the paper's Losses)
    group = perm // block
    for i1 in range(0, kp, LAZY_BLOCK):
        i2 = min(i1 + LAZY_BLOCK, kp)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group[i1 + i]
            row, sc, zp = w1[i], scales[g], zeros[g]
            q = np.clip(np.round(row / sc) + zp, 0, top)
            codes[i1 + i] = q
            e = (row - (q - zp) * sc) / h1[i, i]
            loss += float(e @ e)
            w1[i:] -= h1[i, i:, None] * e[None, :]
            err1[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err1
    codes = codes[np.argsort(perm)]
    live = np.where(prep.dead, 0.0, diag)[:k]  # H's own diagonal: inputs that never fire were set to 1
    energy = float(np.einsum("kn,k,kn->", w0[:k], live, w0[:k]))  # tr(W^T diag(H) W)
    error = float(np.sqrt(loss / energy)) if energy > 0 else 0.0
    return Quantized(codes.T.astype(np.uint8), scales.T.copy(), zeros.T.astype(np.uint8), error)


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of ``H^-1`` (what GPTQ's updates read), fp32, by LAPACK's triangular routines
    (potrf, potri: a third of a general inverse), more damping if ``H`` is not positive definite. Works in
    place on LAPACK's own copy: ``H`` and one more ``K^2`` float64 array at the peak (the results are those of
    the symmetric ``H^-1`` built whole: potrf reads one triangle)."""
    from scipy.linalg import lapack

    damp = 0.0
    for _ in range(6):
        chol, info = lapack.dpotrf(h if damp == 0.0 else h + damp * np.eye(h.shape[0]), lower=1)
        if info == 0:
            inv, info = lapack.dpotri(chol, lower=1, overwrite_c=1)  # H^-1, lower triangle, in place
            del chol
            if info == 0:
                _triangle(inv, copy_lower_up=True)
                upper, info = lapack.dpotrf(inv, lower=0, overwrite_a=1)
                del inv
                if info == 0:
                    _triangle(upper, copy_lower_up=False)
                    return np.array(upper, dtype=np.float32, order="C")
        damp = max(damp * 10, 1e-2 * float(np.mean(np.diag(h))))
    raise RuntimeError("the calibration Hessian is not positive definite even with heavy damping")


def _triangle(a: np.ndarray, copy_lower_up: bool, rows: int = 512) -> None:
    """In place, a block of rows at a time: the strict upper triangle copied from the lower (``copy_lower_up``),
    else the strict lower triangle zeroed (``np.triu``)."""
    n = a.shape[0]
    for i in range(0, n, rows):
        block = a[i:i + rows]
        if copy_lower_up:
            np.copyto(block, a[:, i:i + rows].T, where=np.triu(np.ones(block.shape, dtype=bool), i + 1))
        else:
            np.copyto(block, 0.0, where=~np.triu(np.ones(block.shape, dtype=bool), i))


def pack(q: Quantized, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulNBits`` inputs: B ``[N, blocks, block * bits / 8]`` uint8, scales ``[N * blocks]``, zero points
    ``[N * ceil(blocks * bits / 8)]`` uint8 (4-bit values two per byte, low nibble first)."""
    n, kp = q.codes.shape
    blocks = kp // block
    if bits == 8:
        return q.codes.reshape(n, blocks, block), q.scales.reshape(-1), q.zeros.reshape(-1)
    c = q.codes.reshape(n, blocks, block // 2, 2)
    b = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
    z = q.zeros
    if blocks % 2:
        z = np.concatenate([z, np.zeros((n, 1), dtype=np.uint8)], 1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    return b, q.scales.reshape(-1).astype(np.float32), zp.reshape(-1)


def hessians(m: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]], ctx: PassContext,
             threads: int, session_path: str | None = None, run: Runner | None = None) -> dict[str, np.ndarray]:
    """``X^T X / rows`` of each distinct input ``X`` of the MatMuls ``names``, over the calibration ``feeds``
    (one graph run per feed; each activation is folded into its Hessian and dropped; positions a feed's
    ``attention_mask`` pads are left out). ``run(session, names,
    feed)`` runs the uploaded graph (a ``RunGuard``'s: bounded and cancellable); the session's own by default."""
    import onnx
    import onnxruntime as ort

    chosen = set(names)
    acts = sorted({n.input[0] for n in m.graph.node if n.name in chosen})
    have = {o.name for o in m.graph.output}
    aug = onnx.ModelProto()
    aug.CopyFrom(m)
    for name in acts:
        if name not in have:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    if session_path is not None:
        from worker.passes.quantizers.files import save

        save(aug, Path(session_path), True)
        sess = ort.InferenceSession(session_path, opts, providers=["CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(aug.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del aug
    sums: dict[str, np.ndarray] = {}
    rows = 0
    for feed in feeds:
        ctx.check_cancelled()
        outs = run(sess, acts, feed) if run is not None else sess.run(acts, feed)
        mask = feed.get("attention_mask")
        keep = None if mask is None else np.asarray(mask) != 0
        count = 0
        for name, x in zip(acts, outs, strict=True):
            x = np.asarray(x, dtype=np.float32)
            # padded positions carry no text (the pad token's row, attention to nothing): left out, as the
            # streamed path's layer-by-layer Hessians leave them (worker.lm.calibrate)
            x2 = x[keep] if keep is not None and x.shape[:2] == keep.shape else x.reshape(-1, x.shape[-1])
            count = x2.shape[0]
            xtx = x2.T @ x2
            sums[name] = sums[name] + xtx if name in sums else xtx
        rows += count
    if not rows:
        raise ValueError("no calibration rows reached the MatMuls")
    return {name: s / rows for name, s in sums.items()}


def apply(m: onnx.ModelProto, names: list[str], hess: dict[str, np.ndarray], bits: int, block: int,
          symmetric: bool, accuracy_level: int | None, ctx: PassContext, act_order: bool = True,
          ) -> dict[str, float]:
    """In place: each MatMul in ``names`` becomes a ``MatMulNBits`` with GPTQ'd weights; the relative
    output error of each (the sensitivity the mixed-bits choice and the report read)."""
    import onnx
    from onnx import numpy_helper
    from threadpoolctl import threadpool_limits

    chosen = set(names)
    inits = {t.name: t for t in m.graph.initializer}
    users = Counter(i for node in m.graph.node for i in node.input)
    errors: dict[str, float] = {}
    nodes = sorted((n for n in m.graph.node if n.name in chosen), key=lambda n: n.input[0])  # shared inputs together
    prepared: tuple[str, Prepared] | None = None
    for done, node in enumerate(nodes):
        ctx.check_cancelled()
        ctx.progress(f"gptq {done + 1}/{len(nodes)}: {node.name}", fraction=0.3 + 0.6 * done / max(len(nodes), 1))
        table = inits[node.input[1]]
        raw = numpy_helper.to_array(table)
        k, n = raw.shape
        with threadpool_limits(1):  # small vector ops: BLAS threads would spin more than they compute
            if prepared is None or prepared[0] != node.input[0]:
                prepared = (node.input[0], prepare(hess[node.input[0]], block, act_order))
            q = quantize_weight(raw.astype(np.float32), prepared[1], bits, block, symmetric)
        errors[node.name] = q.error
        b, scales, zp = pack(q, bits, block)
        base = f"{node.input[1]}_Q{bits}G{block}"
        new_inits = [numpy_helper.from_array(b, base),
                     numpy_helper.from_array(scales.astype(raw.dtype), f"{base}_scales")]
        inputs = [node.input[0], base, f"{base}_scales"]
        if not symmetric:
            new_inits.append(numpy_helper.from_array(zp, f"{base}_zp"))
            inputs.append(f"{base}_zp")
        m.graph.initializer.extend(new_inits)
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        node.CopyFrom(onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                                            domain="com.microsoft", **attrs))
        users[table.name] -= 1
        if users[table.name] == 0:
            m.graph.initializer.remove(table)
    use_ms_domain(m)
    return errors
