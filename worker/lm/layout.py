"""The KV-cache interface of an exported causal LM, read by the exporter, the session and the evaluator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.core import StepFailed


@dataclass
class LMLayout:
    """The KV-cache interface of an exported causal LM (stored in ``WorkingModel.meta["lm"]``)."""

    layers: int
    kv_heads: int
    head_dim: int
    past_names: list[tuple[str, str]]
    present_names: list[tuple[str, str]]
    has_position_ids: bool = False
    float_type: str = "float32"
    method: str = "torch"
    parity: dict[str, Any] = field(default_factory=dict)
    # Fused operators onnxruntime's transformer optimizer wrote into a torch.onnx export (name -> count).
    fusions: dict[str, int] = field(default_factory=dict)
    opset: int | None = None  # of the default domain (the genai builder writes its own, with com.microsoft ops)
    # RoPE caches computed by nodes instead of stored (worker.lm.rope): names, bytes saved, max |diff|
    rope_caches: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe form (tuples become lists)."""
        out = asdict(self)
        out["past_names"] = [list(p) for p in self.past_names]
        out["present_names"] = [list(p) for p in self.present_names]
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LMLayout:
        """The layout back from ``to_meta``'s dict."""
        known = {k: v for k, v in meta.items() if k in cls.__dataclass_fields__}
        known["past_names"] = [(str(k), str(v)) for k, v in known.get("past_names", [])]
        known["present_names"] = [(str(k), str(v)) for k, v in known.get("present_names", [])]
        return cls(**known)

    @classmethod
    def from_onnx(cls, path: Path) -> LMLayout:
        """The layout read from an ONNX file's inputs and outputs (weights not loaded)."""
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        graph = proto.graph
        opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        inputs = {i.name: i for i in graph.input}
        outputs = [o.name for o in graph.output]
        past: list[tuple[str, str]] = []
        present: list[tuple[str, str]] = []
        i = 0
        while f"past_key_values.{i}.key" in inputs:
            past.append((f"past_key_values.{i}.key", f"past_key_values.{i}.value"))
            present.append((f"present.{i}.key", f"present.{i}.value"))
            i += 1
        if not past:
            raise StepFailed("not_a_kv_model", f"{Path(path).name} has no past_key_values.* inputs")
        missing = [n for pair in present for n in pair if n not in outputs]
        if missing or not outputs or outputs[0] != "logits":
            raise StepFailed("not_a_kv_model", f"{Path(path).name}: outputs must be logits then present.*")
        first = inputs[past[0][0]].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise StepFailed("not_a_kv_model", f"{past[0][0]} must be [batch, kv_heads, past_seq, head_dim]"
                                               f" with fixed kv_heads and head_dim, not {dims}")
        float_type = onnx.helper.tensor_dtype_to_np_dtype(first.elem_type).name
        return cls(len(past), int(dims[1]), int(dims[3]), past, present, "position_ids" in inputs, float_type,
                   opset=opset)
