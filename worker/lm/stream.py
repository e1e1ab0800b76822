"""Streaming weight-only export of Llama-family causal LMs: safetensors in, an INT4/INT8 KV-cache ONNX out,
with memory that grows with one weight chunk, not with the model.

The in-memory path (``worker.lm.export`` then ``worker.passes.quantize``) holds the bf16 module, an fp32
copy, the builder's fp32 ONNX and a serialised copy at once: 14-18 bytes per parameter, so a 24 GB worker
stopped near 1.7 B parameters. Here:

- ``SafetensorsReader`` reads (sharded) safetensors lazily, a block of rows of one tensor at a time, in
  the stored dtype (bf16/fp16/fp32, widened to fp32 per block). It reads with ``pread`` rather than through
  ``safetensors.safe_open``'s memory map: pages of a map that were touched stay in the process's resident
  set until it is unmapped, so a mapped 16 GB checkpoint would show as 16 GB of RSS by the end.
- Each projection is quantized block of rows by block of rows with onnxruntime's own blockwise RTN kernels
  (``quantize_matmul_4bits`` / ``_8bits``, those ``MatMulNBitsQuantizer`` calls), so the bytes are those
  of the in-memory path for the same settings, and appended to ``model.onnx.data`` as they come (tensors
  aligned to 4 KiB). The graph itself (a few kB per layer) is written last.
- The graph is the one onnxruntime-genai's builder writes for these architectures (packed QKV,
  ``GroupQueryAttention`` with the rotary embedding inside, ``SkipSimplifiedLayerNormalization``), with
  ``MatMulNBits`` in place of each MatMul, so ``LMLayout``, ``LMSession`` and the evaluation read it as
  they read the builder's; the embedding table in its stored dtype (a bf16 ``Gather`` then ``Cast``, exact)
  or at 8 bits (``GatherBlockQuantized``, the quantize pass's bytes), the output head at 8 bits as the quantize
  pass's default.
- A ``LayerQuantizer`` (GPTQ over Hessians collected one decoder layer at a time) may take the decoder layers'
  4-bit projections instead of RTN; it sees the same blocks of output columns.

At most one block of ``CHUNK_ELEMENTS`` weights is in fp32 at any time, plus the scales of the matrix
being written (a 16th of its fp32 size at block 64).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from models.memory_fit import STREAM_ARCHITECTURES
from worker.core import StepFailed
from worker.lm import rope

if TYPE_CHECKING:
    import onnx

# Weights widened to fp32 at once (64 MiB): the bound on the float a writer holds.
CHUNK_ELEMENTS = 16 * 1024 * 1024
ALIGN = 4096
OPSET = 21  # of the default domain
_DTYPES = {"F32": (np.float32, 1), "F16": (np.float16, 10), "BF16": (np.uint16, 16)}  # numpy view, ONNX type


class SafetensorsReader:
    """The tensors of a folder's (sharded) safetensors, read by rows on demand, never all at once."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise StepFailed("invalid_model", f"no *.safetensors in {folder.name}")
        self.tensors: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.tensors[name] = (f, str(info["dtype"]), list(info["shape"]), 8 + n + start, 8 + n + end)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> list[int]:
        """The tensor's shape as stored."""
        return list(self._info(name)[2])

    def _info(self, name: str) -> tuple[Path, str, list[int], int, int]:
        try:
            info = self.tensors[name]
        except KeyError:
            raise StepFailed("invalid_model", f"the safetensors have no tensor {name!r}") from None
        if info[1] not in _DTYPES:
            raise StepFailed("invalid_model", f"{name} is stored as {info[1]}; streaming reads F32, F16 and BF16")
        return info

    def raw(self, name: str, r0: int = 0, r1: int | None = None) -> tuple[np.ndarray, int]:
        """Rows ``r0:r1`` in the stored dtype (bf16 as uint16) and that dtype's ONNX type."""
        path, dtype, shape, start, _ = self._info(name)
        np_type, onnx_type = _DTYPES[dtype]
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        r1 = shape[0] if r1 is None else r1
        item = np.dtype(np_type).itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray((r1 - r0) * row * item)
            view, done = memoryview(buf), 0
            while done < len(buf):
                got = os.preadv(fd, [view[done:]], start + r0 * row * item + done)
                if got <= 0:
                    raise StepFailed("invalid_model", f"{path.name} ends inside tensor {name}")
                done += got
        finally:
            os.close(fd)
        arr = np.frombuffer(buf, dtype=np_type).reshape((r1 - r0, *shape[1:]) if shape else ())
        return arr, onnx_type

    def rows(self, name: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows ``r0:r1`` widened to fp32 (bf16 exactly: its bits are the top half of an fp32's)."""
        arr, onnx_type = self.raw(name, r0, r1)
        if onnx_type == 16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32, copy=False)

    def columns(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of a 2-D tensor widened to fp32 and transposed (``[in, rows]``, the layout ORT's
        quantizer reads), in one pass through torch (twice as fast as numpy's widen-then-transpose)."""
        import torch

        arr, onnx_type = self.raw(name, r0, r1)
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if onnx_type == 16 else torch.from_numpy(arr)
        return t.t().float().contiguous().numpy()


class DataWriter:
    """``model.onnx.data`` written front to back; each tensor becomes an external-data ``TensorProto``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def begin(self) -> int:
        """Pad to the alignment and return where the next tensor starts."""
        pad = -self.offset % ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def write(self, data: np.ndarray) -> None:
        """Append ``data``'s bytes (C order)."""
        mv = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        self.fh.write(mv)
        self.offset += len(mv)

    def tensor(self, name: str, onnx_type: int, dims: list[int], start: int) -> onnx.TensorProto:
        """The proto of the tensor written since ``start`` (``begin``'s value)."""
        import onnx

        t = onnx.TensorProto(name=name, data_type=onnx_type, dims=dims)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    def array(self, name: str, arr: np.ndarray, onnx_type: int | None = None) -> onnx.TensorProto:
        """Write a whole (small) array and return its proto."""
        import onnx

        start = self.begin()
        self.write(arr)
        kind = onnx_type if onnx_type is not None else onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        return self.tensor(name, kind, list(arr.shape), start)

    def close(self) -> None:
        """Flush and close the file."""
        self.fh.close()


@dataclass(frozen=True)
class StreamSettings:
    """How the projections are stored: ``bits`` 4 or 8 (None: fp32 MatMul), RTN block settings, the head's bits."""

    bits: int | None = 4
    block_size: int = 64
    symmetric: bool = False
    accuracy_level: int | None = 4
    head_bits: int | None = 8
    # The token table: None keeps its stored dtype (a Gather, then a Cast), 8 writes a GatherBlockQuantized
    # (``quantize_table_8bit``: the bytes of the in-memory quantize pass's 8-bit table).
    embedding_bits: int | None = None


class LayerQuantizer(Protocol):
    """A data-aware quantizer of the decoder layers' projections (GPTQ: ``worker.passes.quantizers.gptq_layers``);
    without one the writer rounds to nearest."""

    def begin_layer(self, index: int) -> None:
        """Called before decoder layer ``index`` is written (layers come in order)."""

    def quantize(self, wt: np.ndarray, key: str, bits: int, block: int, symmetric: bool,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``wt`` ``[K, n]`` fp32 (some output columns of the projection whose input is ``key``, one of
        ``worker.lm.calibrate.INPUTS``) -> ``_quantize_columns``' three arrays."""


@dataclass
class Written:
    """What ``write_model`` produced: the file, its layout meta, weight counts and the peak float held."""

    path: Path
    layers: int
    kv_heads: int
    head_dim: int
    matmul_bits: dict[str, int] = field(default_factory=dict)
    max_float_elements: int = 0
    params: int = 0
    embedding_bits: int | None = None


def table_block(cols: int, block_size: int) -> int | None:
    """The block along the hidden axis of an 8-bit table: ``block_size`` if it divides ``cols``, else the
    largest of 128, 64, 32, 16 that does (None: none does)."""
    return next((b for b in (block_size, 128, 64, 32, 16) if cols % b == 0 and b <= cols), None)


def quantize_table_8bit(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``w`` ``[rows, cols]`` fp32 of a token table -> ``GatherBlockQuantized`` (8 bits, quantize axis 1)
    codes ``[rows, cols]`` uint8, scales ``[rows, cols / block]`` fp32, zero points uint8 of the same shape:
    asymmetric round to nearest per block (the range widened to hold 0). Rows are independent, so a table
    quantized a block of rows at a time gives the bytes of the whole."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block, block)
    lo = np.minimum(blocks.min(-1), 0.0)
    hi = np.maximum(blocks.max(-1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
    return codes.reshape(rows, cols), scale, zero


def _quantize_columns(wt: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``wt`` ``[K, n]`` fp32 (a block of an hf Linear's rows, transposed) -> MatMulNBits ``B [n, blocks, blob]``,
    scales ``[n, blocks]``, zero points ``[n, ceil(blocks / (8 / bits))]``: onnxruntime's RTN kernels, as
    ``MatMulNBitsQuantizer`` calls them."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = wt.shape
    k_blocks = -(-k // block)
    kpack = 8 // bits
    if k % block:
        wt = np.concatenate([wt, np.zeros((k_blocks * block - k, n), dtype=np.float32)])
    packed = np.zeros((n, k_blocks, block // kpack), dtype=np.uint8)
    zero = np.zeros((n, -(-k_blocks // kpack)), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, wt, scales, zero, block, n, k, symmetric)
    return packed, scales, zero


class _Graph:
    """Nodes, inputs, outputs and initializers of the graph being written."""

    def __init__(self, writer: DataWriter, reader: SafetensorsReader, s: StreamSettings,
                 quantizer: LayerQuantizer | None = None) -> None:
        self.w, self.r, self.s, self.q = writer, reader, s, quantizer
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.max_float = 0
        self.bits: dict[str, int] = {}
        self.params = 0

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs: Any) -> list[str]:
        import onnx

        outs = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(onnx.helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def small(self, name: str, src: str) -> str:
        """A 1-D tensor (norm weight, bias) in fp32."""
        arr = self.r.rows(src)
        self.params += arr.size
        self.inits.append(self.w.array(name, arr))
        return name

    def linear(self, x: str, sources: list[str], name: str, bits: int | None, key: str | None = None) -> str:
        """``x @ concat(sources).T`` as MatMulNBits (``bits``) or a float MatMul; biases added when stored.
        At 4 bits with a ``LayerQuantizer``, the projection whose input is ``key`` goes through it."""
        import onnx

        k = self.r.shape(sources[0])[1]
        n_total = sum(self.r.shape(src)[0] for src in sources)
        self.params += k * n_total
        step = max(1, CHUNK_ELEMENTS // k)
        if bits is None:  # fp32 [K, N]: whole matrices (for checks and small models)
            w = np.concatenate([self.r.rows(src) for src in sources]).T
            self.max_float = max(self.max_float, 2 * w.size)
            self.inits.append(self.w.array(f"{name}.weight", np.ascontiguousarray(w)))
            out = self.node("MatMul", [x, f"{name}.weight"], f"{name}/MatMul")[0]
        else:
            start = self.w.begin()
            scales: list[np.ndarray] = []
            zeros: list[np.ndarray] = []
            blob = 0
            for src in sources:
                rows = self.r.shape(src)[0]
                for r0 in range(0, rows, step):
                    chunk = self.r.columns(src, r0, min(rows, r0 + step))
                    self.max_float = max(self.max_float, chunk.size)
                    if self.q is not None and key is not None and bits == 4:
                        packed, sc, zp = self.q.quantize(chunk, key, bits, self.s.block_size, self.s.symmetric)
                    else:
                        packed, sc, zp = _quantize_columns(chunk, bits, self.s.block_size, self.s.symmetric)
                    del chunk
                    self.w.write(packed)
                    blob = packed.shape[2]
                    scales.append(sc)
                    zeros.append(zp)
            k_blocks = -(-k // self.s.block_size)
            self.inits.append(self.w.tensor(f"{name}.weight_Q{bits}", onnx.TensorProto.UINT8,
                                            [n_total, k_blocks, blob], start))
            self.inits.append(self.w.array(f"{name}.weight_scales", np.concatenate(scales)))
            inputs = [x, f"{name}.weight_Q{bits}", f"{name}.weight_scales"]
            if not self.s.symmetric:
                self.inits.append(self.w.array(f"{name}.weight_zero_points", np.concatenate(zeros)))
                inputs.append(f"{name}.weight_zero_points")
            attrs: dict[str, Any] = {"K": k, "N": n_total, "bits": bits, "block_size": self.s.block_size}
            if self.s.accuracy_level is not None:
                attrs["accuracy_level"] = self.s.accuracy_level
            out = self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain="com.microsoft", **attrs)[0]
            self.bits[f"{name}/MatMulNBits"] = bits
        biases = [src[: -len("weight")] + "bias" for src in sources]
        if all(b in self.r for b in biases):
            bias = np.concatenate([self.r.rows(b) for b in biases])
            self.params += bias.size
            self.inits.append(self.w.array(f"{name}.bias", bias))
            out = self.node("Add", [out, f"{name}.bias"], f"{name}/Add")[0]
        return out


TABLE_Q8 = "model.embed_tokens.weight_Q8"


def _write_table(g: _Graph, shape: list[int], s: StreamSettings) -> int | None:
    """The token table, a block of rows at a time: in its stored dtype, or at 8 bits when ``s.embedding_bits``
    is 8 and its width has a block (``table_block``). Returns the 8-bit block (None: stored dtype). The
    table is the graph's first initializer either way."""
    name = "model.embed_tokens.weight"
    step = max(1, CHUNK_ELEMENTS // shape[1])
    block = table_block(shape[1], s.block_size) if s.embedding_bits == 8 and s.bits is not None else None
    g.params += shape[0] * shape[1]
    start = g.w.begin()
    if block is None:
        for r0 in range(0, shape[0], step):
            rows, table_type = g.r.raw(name, r0, min(shape[0], r0 + step))
            g.w.write(rows)
        g.inits.append(g.w.tensor(name, table_type, shape, start))
        return None
    import onnx

    scales: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    for r0 in range(0, shape[0], step):
        rows32 = g.r.rows(name, r0, min(shape[0], r0 + step))
        g.max_float = max(g.max_float, rows32.size)
        codes, sc, zp = quantize_table_8bit(rows32, block)
        del rows32
        g.w.write(codes)
        scales.append(sc)
        zeros.append(zp)
    g.inits.append(g.w.tensor(TABLE_Q8, onnx.TensorProto.UINT8, shape, start))
    g.inits.append(g.w.array(f"{TABLE_Q8}_scales", np.concatenate(scales)))
    g.inits.append(g.w.array(f"{TABLE_Q8}_zp", np.concatenate(zeros)))
    return block


def projected_bytes(config: Any, s: StreamSettings, table_itemsize: int = 2) -> int:
    """The exact size of the ``model.onnx.data`` that ``write_model`` writes for ``config`` with ``s``, from the
    shapes alone (every tensor starts on ``ALIGN``); ``table_itemsize``: the stored table's bytes per value
    (2: bf16). The graph itself (``model.onnx``) adds a few kB per layer."""
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    vocab, inter = int(config.vocab_size), int(config.intermediate_size)
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = bool(getattr(config, "attention_bias", False))
    size = 0

    def put(n: int) -> None:
        nonlocal size
        size += -size % ALIGN + n

    def linear(k: int, n: int, bits: int | None, bias: bool = False) -> None:
        if bits is None:
            put(k * n * 4)
        else:
            blocks = -(-k // s.block_size)
            put(n * blocks * s.block_size * bits // 8)
            put(n * blocks * 4)
            if not s.symmetric:
                put(n * -(-blocks // (8 // bits)))
        if bias:
            put(n * 4)

    block = table_block(hidden, s.block_size) if s.embedding_bits == 8 and s.bits is not None else None
    if block is None:
        put(vocab * hidden * table_itemsize)
    else:
        put(vocab * hidden)
        put(vocab * hidden // block * 4)
        put(vocab * hidden // block)
    # the RoPE cos/sin caches: computed by a few nodes in the graph (worker.lm.rope), nothing in the data file
    for _ in range(layers):
        put(hidden * 4)
        linear(hidden, (heads + 2 * kv) * head_dim, s.bits, qkv_bias)
        linear(heads * head_dim, hidden, s.bits, o_bias)
        put(hidden * 4)
        linear(hidden, inter, s.bits)
        linear(hidden, inter, s.bits)
        linear(inter, hidden, s.bits)
    put(hidden * 4)
    linear(hidden, vocab, s.head_bits if s.bits is not None else None)
    return size


def supports(config: Any) -> str | None:
    """Why the streaming writer cannot write this config (None: it can)."""
    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] not in STREAM_ARCHITECTURES:
        return f"architecture {archs[0] if archs else None} is not one of {sorted(STREAM_ARCHITECTURES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the writer has SiLU)"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} tokens)"
    return None


def _rotary_cache(config: Any, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` ``[max_positions, head_dim / 2]`` from the model's own rotary embedding (its scaling)."""
    import importlib

    import torch

    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = cls(config=config)
    positions = int(config.max_position_embeddings)
    with torch.inference_mode():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    half = head_dim // 2
    return cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy()


def write_model(folder: Path, out_path: Path, settings: StreamSettings,
                progress: Callable[[int, int], None] | None = None,
                check_cancelled: Callable[[], None] | None = None,
                quantizer: LayerQuantizer | None = None) -> Written:
    """Write ``folder``'s hf causal LM (config + safetensors) to ``out_path`` (+ ``.data``) layer by layer;
    the decoder layers' 4-bit projections through ``quantizer`` when one is given (else RTN)."""
    import onnx
    from onnx import TensorProto, helper
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    why = supports(config)
    if why is not None:
        raise StepFailed("unsupported_model", f"the streaming writer does not cover this model: {why}")
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    vocab = int(config.vocab_size)
    eps = float(config.rms_norm_eps)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reader = SafetensorsReader(folder)
    writer = DataWriter(out_path.with_name(out_path.name + ".data"))
    g = _Graph(writer, reader, settings, quantizer)
    try:
        table_shape = reader.shape("model.embed_tokens.weight")
        table_bits = _write_table(g, table_shape, settings)
        cos, sin = _rotary_cache(config, head_dim)
        rope_nodes, rope_inits, _ = rope.replacement([("cos_cache", "sin_cache", cos, sin)], OPSET)
        g.nodes += rope_nodes  # computed at session load (worker.lm.rope); stored where they do not match
        g.inits += rope_inits or [writer.array("cos_cache", cos), writer.array("sin_cache", sin)]
        del cos, sin
        mask = "/model/attn_mask"
        one = helper.make_tensor("/model/constants/one", TensorProto.INT64, [1], [1])
        g.inits.append(one)
        total = g.node("ReduceSum", ["attention_mask", one.name], f"{mask}/ReduceSum", keepdims=0)[0]
        seqlens = g.node("Cast", [g.node("Sub", [total, one.name], f"{mask}/Sub")[0]], f"{mask}/Sub/Cast",
                         to=TensorProto.INT32)[0]
        shape = g.node("Shape", ["attention_mask"], f"{mask}/Shape")[0]
        g.inits.append(helper.make_tensor("/model/constants/one_scalar", TensorProto.INT64, [], [1]))
        total_len = g.node("Cast", [g.node("Gather", [shape, "/model/constants/one_scalar"], f"{mask}/Gather",
                                           axis=0)[0]], f"{mask}/Gather/Cast", to=TensorProto.INT32)[0]
        if table_bits is not None:
            x = g.node("GatherBlockQuantized", [TABLE_Q8, "input_ids", f"{TABLE_Q8}_scales", f"{TABLE_Q8}_zp"],
                       "/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", bits=8,
                       block_size=table_bits, gather_axis=0, quantize_axis=1)[0]
        else:
            x = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens/Gather")[0]
            if g.inits[0].data_type != TensorProto.FLOAT:
                x = g.node("Cast", [x], "/model/embed_tokens/Cast", to=TensorProto.FLOAT)[0]
        residual, mlp_out = x, ""
        for i in range(layers):
            if check_cancelled is not None:
                check_cancelled()
            if quantizer is not None:
                quantizer.begin_layer(i)
            p, n = f"model.layers.{i}", f"/model/layers.{i}"
            ln = g.small(f"{p}.input_layernorm.weight", f"{p}.input_layernorm.weight")
            if i == 0:
                normed = g.node("SimplifiedLayerNormalization", [residual, ln], f"{n}/input_layernorm/LayerNorm",
                                epsilon=eps, axis=-1, stash_type=1)[0]
            else:
                normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, mlp_out, ln],
                                                f"{n}/input_layernorm/SkipLayerNorm", outputs=4,
                                                domain="com.microsoft", epsilon=eps)
            attn = f"{p}.self_attn"
            qkv = g.linear(normed, [f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"],
                           f"{n}/attn/qkv_proj", settings.bits, "qkv")
            out, _, _ = g.node(
                "GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                        seqlens, total_len, "cos_cache", "sin_cache"],
                f"{n}/attn/GroupQueryAttention", outputs=[f"{n}/attn/output_0", f"present.{i}.key",
                                                          f"present.{i}.value"],
                domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=1.0 / math.sqrt(head_dim),
                local_window_size=-1, softcap=0.0, do_rotary=1, rotary_interleaved=0)
            o = g.linear(out, [f"{attn}.o_proj.weight"], f"{n}/attn/o_proj", settings.bits, "o")
            post = g.small(f"{p}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm.weight")
            normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, o, post],
                                            f"{n}/post_attention_layernorm/SkipLayerNorm", outputs=4,
                                            domain="com.microsoft", epsilon=eps)
            gate = g.linear(normed, [f"{p}.mlp.gate_proj.weight"], f"{n}/mlp/gate_proj", settings.bits, "gate_up")
            up = g.linear(normed, [f"{p}.mlp.up_proj.weight"], f"{n}/mlp/up_proj", settings.bits, "gate_up")
            act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{n}/mlp/act_fn/Sigmoid")[0]],
                         f"{n}/mlp/act_fn/Mul")[0]
            mlp_out = g.linear(g.node("Mul", [act, up], f"{n}/mlp/Mul")[0], [f"{p}.mlp.down_proj.weight"],
                               f"{n}/mlp/down_proj", settings.bits, "down")
            if progress is not None:
                progress(i + 1, layers)
        norm = g.small("model.norm.weight", "model.norm.weight")
        final = g.node("SkipSimplifiedLayerNormalization", [residual, mlp_out, norm], "/model/norm/SkipLayerNorm",
                       outputs=[f"/model/norm/output_{j}" for j in range(4)], domain="com.microsoft",
                       epsilon=eps)[0]
        tied = "lm_head.weight" not in reader or bool(getattr(config, "tie_word_embeddings", False))
        head_src = "model.embed_tokens.weight" if tied else "lm_head.weight"
        head_bits = settings.head_bits if settings.bits is not None else None
        params_before_head = g.params
        logits = g.linear(final, [head_src], "/lm_head", head_bits)
        if tied:
            g.params = params_before_head  # the tied head shares the table: count it once
        g.nodes[-1].output[0] = "logits"
    finally:
        writer.close()
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab])]
    for i in range(layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", f32,
                                                        ["batch_size", kv, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", f32,
                                                         ["batch_size", kv, "total_sequence_length", head_dim]))
    del logits
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="modelpress-stream")
    model.ir_version = 10
    onnx.save_model(model, str(out_path))  # weights are external already: the proto is the graph alone
    return Written(out_path, layers, kv, head_dim, g.bits, g.max_float, g.params,
                   None if table_bits is None else 8)

