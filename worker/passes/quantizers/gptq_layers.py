"""GPTQ on the streamed LLM path: ``gptq.py``'s math (``prepare``, ``quantize_weight``, ``pack``) over Hessians
collected one decoder layer at a time (``worker.lm.calibrate``), as a ``worker.lm.stream.LayerQuantizer``.

The streamed writer hands each projection over a block of output columns at a time (``[K, n]``, at most
``stream.CHUNK_ELEMENTS`` weights). GPTQ treats output columns independently (each column's scales come from
its own weights, and the error spread along K stays within the column), so quantizing a projection by blocks
of columns gives the codes of quantizing it whole; ``prepare`` (the Hessian's Cholesky factor) is computed once
per distinct input of a layer. Memory beyond the writer's: one fp32 decoder layer while its Hessians are
collected, the calibration hidden states, the layer's Hessians and one prepared ``H^-1`` factor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.lm import stream
from worker.lm.calibrate import LayerCalibration
from worker.passes.quantizers import gptq


class StreamedGPTQ:
    """A ``LayerQuantizer``: each decoder layer's Hessians on ``batches`` (``(input_ids, attention_mask)``
    pairs), then GPTQ of its 4-bit projections; ``errors``: each projection's relative output error."""

    def __init__(self, folder: Path, batches: Sequence[tuple[np.ndarray, np.ndarray]], act_order: bool = True,
                 progress: Callable[[str], None] | None = None) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        self.calibration = LayerCalibration(config, stream.SafetensorsReader(folder), batches, stream.CHUNK_ELEMENTS)
        self.act_order = act_order
        self.progress = progress
        self.layer = -1
        self.hessians: dict[str, np.ndarray] = {}
        self.prepared: tuple[str, gptq.Prepared] | None = None
        self.errors: dict[str, list[float]] = {}

    @property
    def rows(self) -> int:
        """Calibration tokens (unpadded positions) the Hessians are taken over."""
        return self.calibration.rows

    def begin_layer(self, index: int) -> None:
        """Run decoder layer ``index`` over the calibration batches: its Hessians."""
        if index != self.calibration.layer:
            raise ValueError(f"layers come in order: expected {self.calibration.layer}, got {index}")
        if self.progress is not None:
            self.progress(f"gptq: calibrating layer {index}")
        self.layer = index
        self.prepared = None
        self.hessians = self.calibration.next_layer()

    def quantize(self, wt: np.ndarray, key: str, bits: int, block: int, symmetric: bool,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """GPTQ of the output columns ``wt`` ``[K, n]`` of the projection reading input ``key``."""
        from threadpoolctl import threadpool_limits

        if self.prepared is None or self.prepared[0] != key:
            self.prepared = (key, gptq.prepare(self.hessians.pop(key), block, self.act_order))
        with threadpool_limits(1):  # small vector ops: BLAS threads would spin more than they compute
            q = gptq.quantize_weight(wt, self.prepared[1], bits, block, symmetric)
        self.errors.setdefault(f"layers.{self.layer}.{key}", []).append(q.error)
        packed, scales, zeros = gptq.pack(q, bits, block)
        n = wt.shape[1]
        return packed, scales.reshape(n, -1), zeros.reshape(n, -1)

    def report(self) -> dict[str, Any]:
        """The calibration facts and the output errors (mean over each input's column blocks), as the
        in-memory GPTQ's ``calibration`` metrics."""
        errors = {k: float(np.mean(v)) for k, v in self.errors.items()}
        worst = max(errors, key=lambda k: errors[k]) if errors else None
        return {"method": "gptq", "streamed": True, "samples": sum(len(m) for m in self.calibration.masks),
                "tokens": self.rows, "batch": len(self.calibration.masks[0]),
                "mean_output_error": round(float(np.mean(list(errors.values()))), 5) if errors else None,
                "worst": {"input": worst, "output_error": round(errors[worst], 5)} if worst else None}
