"""One quantized table for a tied head and its token lookup (the weight-only step, ``int4``).

onnxruntime-genai's builder writes a tied model (Gemma 3, SmolLM2) with the head's float ``[hidden, vocab]``
weight read twice: by the head ``MatMul`` and, through a ``Transpose``, by the token ``Gather``. Quantizing the
head alone left the float table for the Gather (Gemma-3-270M: 671 MB of a 977 MB int4 file). Here the lookup
becomes a ``GatherBlockQuantized`` (com.microsoft) over the head's own ``MatMulNBits`` bytes, the way the
builder's ``shared_embeddings`` does: B ``[vocab, blocks, block * bits / 8]`` read through a ``Reshape`` to
``[vocab, blocks * block * bits / 8]`` (``gather_axis`` 0, ``quantize_axis`` 1, the head's ``bits`` and
``block_size``), the same scales ``[vocab, blocks]`` and packed zero points; rows padded to whole blocks are
sliced back to ``hidden``. The float table is then dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

from worker.passes.quantizers.files import use_ms_domain

if TYPE_CHECKING:
    import onnx


@dataclasses.dataclass(frozen=True)
class TiedLookup:
    """A token Gather that reads the head's weight through a Transpose: the nodes' names and the head's output."""

    gather: str
    transpose: str
    head: str
    head_output: str


def find_tied_lookup(m: onnx.ModelProto) -> TiedLookup | None:
    """The Gather whose table is ``Transpose(perm [1, 0])`` of the output head's constant weight (the head:
    the last MatMul with a constant 2-D weight), or None."""
    import onnx

    inits = {t.name for t in m.graph.initializer if len(t.dims) == 2}
    head = next((n for n in reversed(m.graph.node)
                 if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits), None)
    if head is None:
        return None
    transposes = {
        n.output[0]: n for n in m.graph.node
        if n.op_type == "Transpose" and n.input and n.input[0] == head.input[1]
        and [int(v) for a in n.attribute if a.name == "perm" for v in onnx.helper.get_attribute_value(a)] in ([], [1, 0])
    }
    for n in m.graph.node:
        if n.op_type == "Gather" and n.input and n.input[0] in transposes and not any(
                a.name == "axis" and a.i != 0 for a in n.attribute):
            return TiedLookup(n.name, transposes[n.input[0]].name, head.name, head.output[0])
    return None


def share_head_table(m: onnx.ModelProto, tied: TiedLookup) -> int | None:
    """In place: the tied Gather reads the head's ``MatMulNBits`` table as a ``GatherBlockQuantized``; the
    Transpose and, with no other reader, the float weight go. Returns the table's bits, or None where the
    head is not a ``MatMulNBits`` (left float: the lookup keeps the float table)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    head = next((n for n in m.graph.node if n.op_type == "MatMulNBits" and tied.head_output in n.output), None)
    if head is None:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    bits, block, k, vocab = int(attrs.get("bits", 4)), int(attrs["block_size"]), int(attrs["K"]), int(attrs["N"])
    blocks = -(-k // block)
    inits = {t.name: t for t in m.graph.initializer}
    # MatMulNBits takes scales and zero points flat or 2-D; GatherBlockQuantized needs [vocab, blocks] (zero
    # points [vocab, packed blocks]): 2-D for both readers (GPTQ writes them flat)
    for name, cols in zip(head.input[2:4], (blocks, -(-blocks * bits // 8)), strict=False):
        t = inits.get(name) if name else None
        if t is not None and list(t.dims) != [vocab, cols]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(vocab, cols), name))
    base = tied.gather.rsplit("/", 1)[0] if "/" in tied.gather else tied.gather
    gather = next(n for n in m.graph.node if n.name == tied.gather)
    transpose = next(n for n in m.graph.node if n.name == tied.transpose)
    shape = f"{base}/SharedTable/shape"
    m.graph.initializer.append(numpy_helper.from_array(np.array([vocab, blocks * block * bits // 8], np.int64), shape))
    table = f"{base}/SharedTable/output_0"
    inputs = [table, gather.input[1], *[i for i in head.input[2:4]]]
    while inputs and not inputs[-1]:
        inputs.pop()
    padded = blocks * block != k
    out = f"{base}/GatherBlockQuantized/output_0" if padded else gather.output[0]
    nodes = [
        onnx.helper.make_node("Reshape", [head.input[1], shape], [table], name=f"{base}/SharedTable"),
        onnx.helper.make_node("GatherBlockQuantized", inputs, [out], name=f"{base}/GatherBlockQuantized",
                              domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1),
    ]
    if padded:  # the head's rows are padded to whole blocks: slice the lookup back to hidden
        ends = f"{base}/SharedTable/slice"
        m.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"{ends}_{i}")
                                   for i, v in enumerate(([0], [k], [-1])))
        nodes.append(onnx.helper.make_node("Slice", [out, f"{ends}_0", f"{ends}_1", f"{ends}_2"], list(gather.output),
                                           name=f"{base}/SharedTable/Slice"))
    at = list(m.graph.node).index(gather)
    m.graph.node.remove(gather)
    for i, node in enumerate(nodes):
        m.graph.node.insert(at + i, node)
    m.graph.node.remove(transpose)
    weight = transpose.input[0]
    if Counter(i for n in m.graph.node for i in n.input)[weight] == 0 and weight in inits:
        m.graph.initializer.remove(inits[weight])
    use_ms_domain(m)
    return bits
