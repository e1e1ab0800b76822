"""File helpers the quantizers share: unique output paths, external data for large models, node names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# Above this a model is written with external data (protobuf's 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
CALIBRATION_BATCH = 32


def name_unnamed_nodes(m: onnx.ModelProto) -> bool:
    """Give every unnamed node a unique ``<op>_<index>`` name (exclusions by name, Gemm->MatMul renaming
    and per-node bits need names); whether any node was renamed."""
    names = {n.name for n in m.graph.node if n.name}
    changed = False
    for i, node in enumerate(m.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in names:
                name += "_"
            node.name = name
            names.add(name)
            changed = True
    return changed


def node_attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (``onnx.helper.get_attribute_value``), or ``default``."""
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def use_ms_domain(m: onnx.ModelProto) -> None:
    """Import the ``com.microsoft`` domain (MatMulNBits, GatherBlockQuantized) where the model lacks it."""
    import onnx

    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def unique_path(workdir: Path, stem: str) -> Path:
    """``<workdir>/<stem>.onnx``, or ``<stem>-<n>.onnx`` for the first n not yet taken."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{stem}.onnx"
    n = 1
    while path.exists():
        n += 1
        path = workdir / f"{stem}-{n}.onnx"
    return path


def is_large(path: Path) -> bool:
    """Whether the model at ``path`` must be written with external data."""
    from worker.formats.onnx_model import model_size_bytes

    return model_size_bytes(path) > EXTERNAL_DATA_THRESHOLD


def save(model: onnx.ModelProto, path: Path, large: bool) -> None:
    """Write ``model`` to ``path``, its tensors in ``<name>.data`` when ``large``."""
    import onnx

    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the model at ``path`` has."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def calibration_batch(n: int, *, equal: bool) -> int:
    """Calibration batch size: up to CALIBRATION_BATCH; when batches must be equal, a divisor of ``n``
    if one of at least 8 exists (otherwise the reader pads the last batch)."""
    batch = min(CALIBRATION_BATCH, n)
    if equal and n % batch:
        divisor = next((b for b in range(batch, 7, -1) if n % b == 0), None)
        batch = divisor or batch
    return batch

