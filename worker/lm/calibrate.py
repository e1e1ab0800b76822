"""Calibration activations of a streamed LLM, collected one decoder layer at a time: the Hessians
``X^T X / rows`` of each projection's input, for GPTQ on the streamed path (``worker.lm.stream``).

The in-memory GPTQ (``worker.passes.quantizers.gptq.hessians``) runs the whole float ONNX graph per
calibration batch. Here the model never exists whole: the calibration tokens are embedded from the table
(read a block of rows at a time), then each decoder layer is built alone in fp32 torch from its safetensors
(stored dtype widened exactly), run over every batch with hooks on its projections' inputs, and its float
outputs become the next layer's inputs (as in the float graph: GPTQ's Hessians of the in-memory path also come
from the unquantized model). Memory: one layer's fp32 weights, the calibration hidden states
(``rows x seq x hidden`` fp32), and the layer's Hessians (``K^2`` fp32 per distinct input).

Padded positions (``attention_mask`` 0) are left out of the Hessians.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from worker.lm.stream import SafetensorsReader

# The distinct inputs of a Llama decoder layer's projections, by the module whose input each is read at.
INPUTS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}
TABLE = "model.embed_tokens.weight"


def _modeling(config: Any) -> Any:
    return importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")


def _class(module: Any, suffix: str) -> Any:
    return next(getattr(module, n) for n in dir(module) if n.endswith(suffix) and not n.startswith("_"))


class LayerCalibration:
    """The calibration batches' hidden states, advanced one decoder layer per ``next_layer`` call."""

    def __init__(self, config: Any, reader: SafetensorsReader, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                 chunk_elements: int) -> None:
        import copy

        import torch

        if not batches:
            raise ValueError("no calibration batches")
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "sdpa"
        self.reader = reader
        self.layer = 0
        modeling = _modeling(config)
        self.layer_cls = _class(modeling, "DecoderLayer")
        rotary = _class(modeling, "RotaryEmbedding")(config=self.config)
        self.masks = [torch.from_numpy(np.asarray(mask) != 0) for _, mask in batches]
        self.rows = int(sum(int(m.sum()) for m in self.masks))
        if not self.rows:
            raise ValueError("the calibration batches hold no unmasked token")
        self.hidden = [torch.from_numpy(h) for h in self._embed([np.asarray(ids) for ids, _ in batches],
                                                                 chunk_elements)]
        self.positions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attn: list[torch.Tensor] = []
        with torch.inference_mode():
            for h, mask in zip(self.hidden, self.masks, strict=True):
                b, s = mask.shape
                self.positions.append(rotary(h, torch.arange(s)[None].expand(b, s)))
                causal = torch.ones(s, s, dtype=torch.bool).tril()
                allowed = causal[None, None] & mask[:, None, None, :]
                allowed |= torch.eye(s, dtype=torch.bool)[None, None]  # a padded query sees itself: no NaN rows
                self.attn.append(torch.zeros(b, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min))

    def _embed(self, ids: list[np.ndarray], chunk_elements: int) -> list[np.ndarray]:
        """The table's rows for ``ids``, reading the table a block of rows at a time (once)."""
        vocab, hidden = self.reader.shape(TABLE)
        out = [np.zeros((*x.shape, hidden), dtype=np.float32) for x in ids]
        step = max(1, chunk_elements // hidden)
        for r0 in range(0, vocab, step):
            r1 = min(vocab, r0 + step)
            rows: np.ndarray | None = None
            for x, o in zip(ids, out, strict=True):
                sel = (x >= r0) & (x < r1)
                if sel.any():
                    rows = self.reader.rows(TABLE, r0, r1) if rows is None else rows
                    o[sel] = rows[x[sel] - r0]
        return out

    def _build(self, i: int) -> torch.nn.Module:
        """Decoder layer ``i`` in fp32 with its stored weights (no random init: built on the meta device)."""
        import torch

        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        prefix = f"model.layers.{i}."
        state = {name: torch.from_numpy(self.reader.rows(prefix + name).copy()) for name in layer.state_dict()}
        layer.load_state_dict(state, assign=True)
        return layer.eval()

    def next_layer(self) -> dict[str, np.ndarray]:
        """Run the next decoder layer over the calibration batches: its inputs' Hessians (``INPUTS``' keys,
        fp32 ``[K, K]``); the hidden states move on to its outputs."""
        import torch

        layer = self._build(self.layer)
        sums: dict[str, torch.Tensor] = {}
        current: list[torch.Tensor] = []  # the batch's mask, for the hooks

        def hook(key: str) -> Any:
            def fold(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0][current[0]].float()
                xtx = x.T @ x
                sums[key] = sums[key] + xtx if key in sums else xtx
            return fold

        handles = [layer.get_submodule(path).register_forward_pre_hook(hook(key)) for key, path in INPUTS.items()]
        try:
            with torch.inference_mode():
                for b, mask in enumerate(self.masks):
                    current[:] = [mask]
                    out = layer(self.hidden[b], attention_mask=self.attn[b], position_embeddings=self.positions[b])
                    self.hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            for h in handles:
                h.remove()
        self.layer += 1
        return {key: (s / self.rows).numpy() for key, s in sums.items()}
