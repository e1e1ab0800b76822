"""Decoder-layer importance of a causal LM and dropping layers (ShortGPT, Men et al. 2024).

A layer's block influence is ``1 - cos(h_in, h_out)`` between the hidden state entering it and the one
leaving it, averaged over real (non-padding) tokens of calibration text: a layer that barely turns the
residual stream matters little and is the first to go. ``keep_layers`` removes the others in place and
renumbers what caches and ``save_pretrained``/``from_pretrained`` read (config layer count, per-layer
``layer_types``, attention ``layer_idx``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from worker.core import ArrayDataset

# Where stock ``*ForCausalLM`` classes keep their decoder blocks (attribute path from the top module).
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Phi-3, Gemma
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.blocks",  # MPT
    "transformer.layers",
)
# Config attributes that hold the number of decoder layers (GPT-2 maps num_hidden_layers to n_layer).
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _layers_path(module: torch.nn.Module) -> tuple[Any, str]:
    """The parent holding the decoder ModuleList and its attribute name."""
    import torch

    for path in LAYER_PATHS:
        found = _get(module, path)
        if isinstance(found, torch.nn.ModuleList) and len(found):
            parent_path, _, attr = path.rpartition(".")
            return _get(module, parent_path), attr
    lists = [
        (parent, name)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1
    ]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no stack of decoder layers")
    return max(lists, key=lambda pn: len(getattr(pn[0], pn[1])))


def decoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``model.layers`` on Llama/Mistral/Qwen, ``transformer.h`` on GPT-2, ...)."""
    parent, attr = _layers_path(module)
    return getattr(parent, attr)


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


def layer_importance(
    module: torch.nn.Module, data: ArrayDataset, *, batches: int = 8, batch_size: int = 4, device: str = "cpu"
) -> list[float]:
    """Block influence per decoder layer, ``1 - cos(h_in, h_out)`` averaged over real tokens (higher = matters more).

    Reads the first ``batches * batch_size`` samples of ``data`` (``input_ids`` and ``attention_mask``).
    """
    import torch
    import torch.nn.functional as F

    layers = decoder_layers(module)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0.0
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre_hook(i: int) -> Any:
        def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[i] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def post_hook(i: int) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            outputs[i] = _hidden(out).detach()

        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post_hook(i)) for i, layer in enumerate(layers)]
    ids_all = data.inputs["input_ids"]
    mask_all = data.inputs.get("attention_mask")
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            for b in range(batches):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                if sl.start >= len(ids_all):
                    break
                ids = torch.from_numpy(np.ascontiguousarray(ids_all[sl])).to(device)
                mask = (
                    torch.ones_like(ids)
                    if mask_all is None
                    else torch.from_numpy(np.ascontiguousarray(mask_all[sl])).to(device)
                )
                inputs.clear()
                outputs.clear()
                module(input_ids=ids, attention_mask=mask, use_cache=False)
                weight = mask.to(torch.float64)
                for i in range(len(layers)):
                    cos = F.cosine_similarity(inputs[i].double(), outputs[i].double(), dim=-1)
                    sums[i] += ((1.0 - cos) * weight).sum().cpu()
                count += float(weight.sum())
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if count == 0:
        raise ValueError("no tokens to measure layer importance on")
    return [float(s) / count for s in sums]


def most_important(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in layer order (ties go to the earlier layer)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def keep_layers(module: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only decoder layers ``keep`` (in place); config layer count, ``layer_types`` and ``layer_idx`` renumbered."""
    import torch

    parent, attr = _layers_path(module)
    layers = getattr(parent, attr)
    total = len(layers)
    keep = sorted(set(keep))
    if not keep or keep[0] < 0 or keep[-1] >= total:
        raise ValueError(f"keep must name layers in 0..{total - 1}, got {keep}")
    config = getattr(module, "config", None)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and keep != list(range(len(keep))):
        raise ValueError("attention scaled by the inverse layer index (GPT-2 option) changes when layers move")
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    for new_idx, block in enumerate(getattr(parent, attr)):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx
    if config is not None:
        for name in LAYER_COUNT_ATTRS:
            if hasattr(config, name):
                with contextlib.suppress(AttributeError):  # a read-only alias
                    setattr(config, name, len(keep))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == total:
            config.layer_types = [layer_types[i] for i in keep]
    return module
