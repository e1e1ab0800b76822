"""Shape-agnostic reshapes in a graph converted from ONNX, so that channel pruning can change widths.

An ONNX exporter may write the target of a Reshape as a constant: today's dynamo exporter turns
``nn.Flatten`` after a global pool into ``Reshape(x, [1, 32])`` (batch and channel count frozen at export
time). Converted to torch as is, the graph computes ``reshape(x, [1, 32])``: correct until structured pruning
narrows the convolutions to 16 channels, then ``shape '[1, 32]' is invalid for input of size 16``.

``flatten_reshapes`` runs the converted graph once on an example input (torch.fx shape propagation) and replaces
every reshape that, on that input, keeps the leading dimensions and merges the rest into one
(``[N, C, 1, 1] -> [N, C]``) by ``torch.flatten(x, start_dim)``: what the exporter's ``view`` meant, for any batch
and any channel count. Other reshapes are left as they were (pruning that contradicts one of them fails with
``shape_constrained``, see ``worker.passes.prune``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RESHAPE_MODULES = frozenset({"OnnxReshape", "OnnxReshapeAllowZero"})


def flatten_start(before: Sequence[int], after: Sequence[int]) -> int | None:
    """``start_dim`` when reshaping ``before`` into ``after`` is ``torch.flatten(x, start_dim)`` (leading dimensions
    kept, at least the batch; the rest merged into one); None otherwise."""
    before, after = list(before), list(after)
    if len(after) < 2 or len(after) > len(before) or after == before:
        return None
    start = len(after) - 1
    if before[:start] != after[:start] or math.prod(before[start:]) != after[-1]:
        return None
    return start


def _is_reshape(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    import torch

    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__ in RESHAPE_MODULES
    if node.op == "call_function":
        return node.target in (torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
    return node.op == "call_method" and node.target in ("reshape", "view")


def flatten_reshapes(module: torch.nn.Module, example: Sequence[torch.Tensor]) -> list[str]:
    """Rewrite ``module`` (an onnx2torch GraphModule) in place: each flatten-like reshape becomes
    ``torch.flatten``. Returns the names of the nodes rewritten (empty when nothing was, or when the graph cannot be
    traced on ``example``)."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    if not isinstance(module, torch.fx.GraphModule):
        return []
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(*example)
    except Exception:  # a graph shape propagation cannot run: nothing is rewritten, conversion stays as it was
        return []
    rewritten: list[str] = []
    graph = module.graph
    for node in list(graph.nodes):
        if not _is_reshape(module, node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source: Any = node.args[0]
        before, after = source.meta.get("tensor_meta"), node.meta.get("tensor_meta")
        if before is None or after is None:
            continue
        start = flatten_start(before.shape, after.shape)
        if start is None:
            continue
        with graph.inserting_after(node):
            flat = graph.call_function(torch.flatten, (source,), {"start_dim": start})
        node.replace_all_uses_with(flat)
        graph.erase_node(node)
        rewritten.append(str(node.name))
    if rewritten:
        graph.eliminate_dead_code()
        graph.lint()
        module.recompile()
    return rewritten


def example_inputs(proto: Any) -> list[torch.Tensor] | None:
    """Zeros shaped like the ONNX graph's inputs (symbolic dimensions as 1); None when one is not a float tensor
    of known rank."""
    import onnx
    import torch

    inits = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tensor = vi.type.tensor_type
        if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or not tensor.HasField("shape"):
            return None
        dims = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
        out.append(torch.zeros(dims, dtype=torch.float32))
    return out or None
