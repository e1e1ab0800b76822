"""Pruning: structured (channels, attention heads, MLP width) with torch-pruning, or unstructured magnitude."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from models.spec import PruneStep
from worker.core import PassContext, StepFailed, WorkingModel, any_data
from worker.passes.base import Pass, PassResult

if TYPE_CHECKING:
    import torch

    from worker.core import ArrayDataset

UNSTRUCTURED_NOTE = (
    "unstructured sparsity zeroes weights but keeps every tensor dense: size after compression falls, "
    "dense runtimes (ONNX Runtime CPU included) gain no speed from it"
)
# (query, key, value, heads attribute) of the attention blocks torch-pruning can prune head-wise
ATTENTION_PATTERNS = (
    ("query", "key", "value", "num_attention_heads"),
    ("q_lin", "k_lin", "v_lin", "n_heads"),
)


def attention_blocks(module: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple[str, str, str, str]]]:
    """Self-attention modules with separate q/k/v Linear layers and a head count."""
    import torch

    found = []
    for sub in module.modules():
        for pattern in ATTENTION_PATTERNS:
            q, k, v, heads = pattern
            if all(isinstance(getattr(sub, n, None), torch.nn.Linear) for n in (q, k, v)) and hasattr(
                sub, heads
            ):
                found.append((sub, pattern))
                break
    return found


def _matches(name: str, patterns: list[str]) -> bool:
    return any(p and p in name for p in patterns)


def _skipped(module: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Module]:
    return [m for name, m in module.named_modules() if name and _matches(name, patterns)]


def _hf_protected(inner: torch.nn.Module) -> list[torch.nn.Module]:
    """Parts of an hf transformer whose width is its hidden size or its interface: embeddings, pooler, head."""
    protected = []
    for name, m in inner.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("embeddings", "pooler", "classifier", "pre_classifier", "score", "lm_head"):
            protected.append(m)
    return protected


def _importance(kind: str) -> Any:
    import torch_pruning as tp

    if kind == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=1 if kind == "l1" else 2)


def _taylor_grads(
    wrapper: torch.nn.Module, model: WorkingModel, data: ArrayDataset, batches: int, device: str
) -> None:
    """Accumulate gradients of the task loss over a few batches (Taylor importance reads them)."""
    import torch
    import torch.nn.functional as F

    from worker.torch_utils import first_output, to_tensors

    wrapper.zero_grad(set_to_none=True)
    wrapper.eval()
    bs = 32
    for b in range(batches):
        sl = slice(b * bs, (b + 1) * bs)
        if sl.start >= len(data):
            break
        out = first_output(wrapper(*to_tensors(data, model.input_names, device, sl)))
        if data.labels is not None and out.ndim == 2:
            labels = torch.from_numpy(data.labels[sl]).to(device)
            loss = F.cross_entropy(out.float(), labels)
        else:
            loss = out.float().pow(2).mean()
        loss.backward()


def _ops(wrapper: torch.nn.Module, example: tuple[Any, ...]) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(wrapper, example)
    return int(macs), int(params)


def structured(
    model: WorkingModel, params: PruneStep, ctx: PassContext, data: ArrayDataset, example: tuple[Any, ...]
) -> dict[str, Any]:
    """Prune channels / heads / MLP width in place with torch-pruning's dependency graph."""
    import torch_pruning as tp

    from worker.torch_utils import interface, output_layers

    wrapper = interface(model)
    inner = model.module
    ignored: list[torch.nn.Module] = list(output_layers(wrapper, example))
    ignored += _skipped(inner, params.skip_layers)
    num_heads: dict[torch.nn.Module, int] = {}
    blocks = attention_blocks(inner) if model.transformers else []
    if model.transformers:
        ignored += _hf_protected(inner)
    for block, (q, k, v, heads) in blocks:
        for n in (q, k, v):
            num_heads[getattr(block, n)] = int(getattr(block, heads))
    pruner = tp.pruner.MetaPruner(
        wrapper,
        example,
        importance=_importance(params.importance),
        pruning_ratio=params.ratio,
        global_pruning=params.scope == "global",
        iterative_steps=params.iterative_steps,
        round_to=params.round_to,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=bool(num_heads),
        prune_head_dims=False,
        head_pruning_ratio=params.ratio if num_heads else 0.0,
    )
    for i in range(params.iterative_steps):
        ctx.check_cancelled()
        if params.importance == "taylor":
            _taylor_grads(wrapper, model, data, params.taylor_batches, ctx.device)
        pruner.step()
        ctx.progress("pruning", fraction=(i + 1) / params.iterative_steps)
    wrapper.zero_grad(set_to_none=True)
    info: dict[str, Any] = {"ignored_layers": len(ignored)}
    if blocks:
        info.update(_update_attention(inner, blocks, pruner))
    return info


def _update_attention(
    inner: torch.nn.Module, blocks: list[tuple[torch.nn.Module, tuple[str, str, str, str]]], pruner: Any
) -> dict[str, Any]:
    """Write the new head counts into the attention modules and the hf config (so re-export works)."""
    heads_per_layer, mlp_per_layer = [], []
    for block, (q, _k, _v, heads) in blocks:
        query = getattr(block, q)
        count = int(pruner.num_heads.get(query, getattr(block, heads)))
        setattr(block, heads, count)
        if hasattr(block, "all_head_size"):
            block.all_head_size = query.out_features
        if hasattr(block, "dim") and heads == "n_heads":
            block.dim = query.out_features
        heads_per_layer.append(count)
    for name, m in inner.named_modules():
        if name.endswith("intermediate.dense") or name.endswith("ffn.lin1"):
            mlp_per_layer.append(int(m.out_features))
    config = getattr(inner, "config", None)
    if config is not None and heads_per_layer:
        if len(set(heads_per_layer)) == 1:
            for attr in ("num_attention_heads", "n_heads"):
                if hasattr(config, attr):
                    setattr(config, attr, heads_per_layer[0])
        if mlp_per_layer and len(set(mlp_per_layer)) == 1:
            for attr in ("intermediate_size", "hidden_dim"):
                if hasattr(config, attr):
                    setattr(config, attr, mlp_per_layer[0])
    return {"heads_per_layer": heads_per_layer, "mlp_width_per_layer": mlp_per_layer}


def unstructured(model: WorkingModel, params: PruneStep, ctx: PassContext) -> dict[str, Any]:
    """Zero the smallest-magnitude weights of every Conv/Linear (per layer or globally), made permanent."""
    import torch
    from torch.nn.utils import prune

    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    targets = [
        (m, "weight")
        for name, m in model.module.named_modules()
        if isinstance(m, kinds) and not _matches(name, params.skip_layers)
    ]
    if not targets:
        raise StepFailed("nothing_to_prune", "no Conv/Linear weights to prune")
    if params.importance == "taylor":
        ctx.log(
            "unstructured pruning ranks by magnitude; 'taylor' importance applies to structured pruning only"
        )
    if params.scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=params.ratio)
    else:
        for m, attr in targets:
            prune.l1_unstructured(m, attr, amount=params.ratio)
    for m, attr in targets:
        prune.remove(m, attr)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    total = sum(m.weight.numel() for m, _ in targets)
    return {"sparsity": zeros / total, "pruned_layers": len(targets), "note": UNSTRUCTURED_NOTE}


def lm_layers(model: WorkingModel, params: PruneStep, ctx: PassContext, data: ArrayDataset) -> dict[str, Any]:
    """Drop ``round(ratio * L)`` decoder layers of least block influence on ``data`` (ShortGPT); one at least stays."""
    from worker.lm.importance import decoder_layers, keep_layers, layer_importance, most_important

    total = len(decoder_layers(model.module))
    drop = min(total - 1, round(params.ratio * total))
    if drop < 1:
        raise StepFailed(
            "nothing_to_prune",
            f"ratio {params.ratio} of the model's {total} decoder layers rounds to no layer to drop",
        )
    ctx.progress("pruning: scoring decoder layers", fraction=0.0)
    scores = layer_importance(model.module, data, device=ctx.device)
    ctx.check_cancelled()
    keep = most_important(scores, total - drop)
    keep_layers(model.module, keep)
    ctx.progress("pruning", fraction=1.0)
    return {
        "target": "layers",
        "layers_before": total,
        "layers_after": len(keep),
        "kept_layers": keep,
        "dropped_layers": [i for i in range(total) if i not in keep],
        "layer_scores": scores,
    }


# the Linear layers of a gated MLP (Llama, Mistral, Qwen, Gemma, Phi-3 style): intermediate width is
# the output width of gate and up and the input width of down
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def _gated_mlps(module: torch.nn.Module) -> list[Any]:
    """The MLP of every decoder layer, or StepFailed when one is not a gated Linear MLP."""
    import torch

    from worker.lm.importance import decoder_layers

    mlps = []
    for i, block in enumerate(decoder_layers(module)):
        mlp = getattr(block, "mlp", None)
        if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in GATED_MLP):
            kind = type(mlp).__name__ if mlp is not None else type(block).__name__
            parts = ", ".join(f"{n}: {type(c).__name__}" for n, c in (mlp or block).named_children())
            raise StepFailed(
                "unsupported_model",
                f"MLP width pruning needs gated Linear MLPs (gate_proj, up_proj, down_proj: Llama, Mistral, "
                f"Qwen); layer {i} has {kind} ({parts}), which torch-pruning cannot narrow here; "
                "use target: layers",
            )
        mlps.append(mlp)
    return mlps


def _channel_scores(mlp: Any, kind: str) -> torch.Tensor:
    """Importance of each intermediate channel: its gate/up rows and down column (l1, l2 or |w * grad|)."""
    import torch

    rows = [mlp.gate_proj.weight, mlp.up_proj.weight]
    cols = mlp.down_proj.weight
    if kind == "taylor":
        terms = [(w * w.grad).abs().sum(1) if w.grad is not None else torch.zeros(w.shape[0]) for w in rows]
        terms.append((cols * cols.grad).abs().sum(0) if cols.grad is not None else torch.zeros(cols.shape[1]))
        return torch.stack([t.detach().float().cpu() for t in terms]).sum(0)
    p = 1 if kind == "l1" else 2
    norms = [w.detach().float().abs().pow(p).sum(1) for w in rows] + [cols.detach().float().abs().pow(p).sum(0)]
    return torch.stack([n.cpu() for n in norms]).sum(0)


def _lm_taylor_grads(module: torch.nn.Module, data: ArrayDataset, batches: int, device: str) -> None:
    """Gradients of the LM loss over a few batches of 8 (Taylor importance reads them)."""
    import torch

    from worker.lm.objectives import with_labels

    data = with_labels(data)
    assert data.labels is not None
    module.zero_grad(set_to_none=True)
    for b in range(batches):
        sl = slice(b * 8, (b + 1) * 8)
        if sl.start >= len(data):
            break
        batch = {k: torch.from_numpy(v[sl]).to(device) for k, v in data.inputs.items() if k in ("input_ids", "attention_mask")}
        module(**batch, labels=torch.from_numpy(data.labels[sl]).to(device), use_cache=False).loss.backward()


def lm_width(model: WorkingModel, params: PruneStep, ctx: PassContext, data: ArrayDataset) -> dict[str, Any]:
    """Narrow every decoder layer's gated MLP by ``ratio`` with torch-pruning; config ``intermediate_size`` follows."""
    import torch_pruning as tp

    if params.scope == "global" or params.skip_layers:
        raise StepFailed(
            "invalid_step",
            "MLP width pruning of a causal LM is uniform (one intermediate_size in its config): "
            "scope: global and skip_layers do not apply",
        )
    module = model.module
    mlps = _gated_mlps(module)
    width = int(mlps[0].gate_proj.out_features)
    new = width - round(params.ratio * width)
    if params.round_to:
        new = max(params.round_to, new // params.round_to * params.round_to)
    new = max(1, min(width, new))
    if new == width:
        raise StepFailed("nothing_to_prune", f"ratio {params.ratio} of MLP width {width} removes no channel")
    if params.importance == "taylor":
        _lm_taylor_grads(module, data, params.taylor_batches, ctx.device)
    for i, mlp in enumerate(mlps):
        ctx.check_cancelled()
        if int(mlp.gate_proj.out_features) != width:
            raise StepFailed("unsupported_model", f"layer {i}'s MLP is {mlp.gate_proj.out_features} wide, not {width}")
        order = _channel_scores(mlp, params.importance).argsort()
        idxs = sorted(int(j) for j in order[: width - new])
        tp.prune_linear_out_channels(mlp.gate_proj, idxs)
        tp.prune_linear_out_channels(mlp.up_proj, idxs)
        tp.prune_linear_in_channels(mlp.down_proj, idxs)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new
        ctx.progress("pruning", fraction=(i + 1) / len(mlps))
    module.zero_grad(set_to_none=True)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = new
    return {"target": "width", "mlp_width_before": width, "mlp_width_after": new, "layers": len(mlps)}


SHAPE_CONSTRAINED = (
    "structured pruning changed layer widths that a fixed shape in the graph contradicts ({error}). The ONNX "
    "graph states that shape as a constant (today's dynamo exporter writes Reshape targets so; flatten-like ones are "
    "rewritten, this one is not). Export with torch.onnx.export(..., dynamo=False), upload the model as safetensors "
    "with its config (format hf), keep the layers around it out with skip_layers, or prune with method: unstructured"
)


def _structured_checked(model: WorkingModel, params: PruneStep, ctx: PassContext, data: ArrayDataset,
                        example: tuple[Any, ...]) -> dict[str, Any]:
    """``structured``, then one forward on ``example``: a width the graph's fixed shapes contradict is a
    ``shape_constrained`` StepFailed saying what to do, not PyTorch's raw text."""
    import torch

    from worker.torch_utils import interface

    try:
        info = structured(model, params, ctx, data, example)
        with torch.no_grad():
            interface(model).eval()(*example)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepFailed("shape_constrained", SHAPE_CONSTRAINED.format(error=first)) from exc
    return info


class PrunePass(Pass):
    """Structured pruning with torch-pruning's dependency graph (Fang et al., "DepGraph: Towards Any
    Structural Pruning", CVPR 2023; magnitude importance after Li et al. 2017, Taylor after Molchanov et
    al. 2019), or unstructured magnitude pruning (Han et al., "Learning both Weights and Connections", 2015).
    Causal LMs: whole decoder layers by block influence (ShortGPT, Men et al. 2024), or gated-MLP width.
    """

    name = "prune"

    def run(self, model: WorkingModel, params: PruneStep, ctx: PassContext) -> PassResult:
        """Prune the torch module in place; report params and MACs before and after."""
        from worker.convert import ensure_torch
        from worker.lm.objectives import eval_loss, is_lm
        from worker.metrics import torch_metric
        from worker.torch_utils import example_inputs, interface

        model = ensure_torch(model, ctx)
        lm = is_lm(model, ctx.spec.task)
        data = any_data(ctx, model)
        if params.importance == "taylor" or (lm and params.method == "structured"):
            data = ctx.dataset("calibration", model) or ctx.dataset("train", model) or data
        example = example_inputs(model, data, ctx.device)
        model.module.eval()
        macs_before, params_before = _ops(interface(model), example)
        evald = ctx.dataset("eval", model)
        lm_before = eval_loss(model.module, evald, ctx.device) if lm and evald is not None and len(evald) else None
        ctx.progress("pruning", fraction=0.0)
        if params.method == "structured" and lm:
            if params.target == "width":
                info = lm_width(model, params, ctx, data)
            else:
                info = lm_layers(model, params, ctx, data)
        elif params.method == "structured":
            info = _structured_checked(model, params, ctx, data, example)
        else:
            info = unstructured(model, params, ctx)
        model.module.eval()
        macs_after, params_after = _ops(interface(model), example)
        metrics: dict[str, Any] = {
            "method": params.method,
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": params_before / max(1, params_after),
            "macs_before": macs_before,
            "macs_after": macs_after,
            "macs_ratio": macs_before / max(1, macs_after),
            **info,
        }
        if lm_before is not None and evald is not None:
            lm_after = eval_loss(model.module, evald, ctx.device)
            metrics.update({f"{k}_before_prune": v for k, v in lm_before.items()})
            metrics.update({f"{k}_after_prune": v for k, v in lm_after.items()})
        elif not lm and evald is not None and evald.labels is not None:
            metrics.update({f"{k}_after_prune": v for k, v in torch_metric(model, evald, ctx.spec).items()})
        ctx.log("pruned", **{k: v for k, v in metrics.items() if not isinstance(v, list)})
        meta = {**model.meta, "pruned": {"method": params.method, "ratio": params.ratio}}
        return PassResult(replace(model, meta=meta), metrics)
