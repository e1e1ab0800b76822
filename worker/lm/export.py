"""Causal LM -> ONNX with a KV cache, in the layout ONNX Runtime GenAI and Optimum use.

File inputs: ``input_ids``, ``attention_mask`` (int64 ``[batch, seq]``; the mask covers past + current
tokens), optional ``position_ids``, ``past_key_values.{i}.key|value`` (``[batch, kv_heads, past_seq,
head_dim]``); outputs ``logits`` first (``[batch, seq, vocab]``), then ``present.{i}.key|value``.

Two exporters:

- ``torch``: ``torch.onnx.export`` (TorchScript tracer, ``dynamo=False``) of a wrapper that takes the
  past as flat tensors and builds a ``DynamicCache`` from them; works for any stock ``*ForCausalLM``
  whose attention reads the cache (Llama family with GQA, GPT-2, ...). The traced graph then goes through
  onnxruntime's transformer optimizer (``fuse``: SkipLayerNormalization, FastGelu, folded shape
  arithmetic), kept only when the fused file passes the parity check below.
- ``genai``: onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``, fp32, cpu), which
  writes fused ``GroupQueryAttention``/rotary/``SkipSimplifiedLayerNormalization`` graphs for the
  architectures it knows (Llama, Mistral, Qwen, Phi, Gemma, ...). Its ``kv_cache_dim`` is fixed to the
  head size here so that the file states its own cache shape. Its float RoPE cos/sin caches (``[max_positions,
  rotary_dim / 2]`` each: 67 MB for Gemma-3-270M's 32768 positions and two bases) are not stored: a few nodes
  compute them, folded back into constants by ONNX Runtime at session load (``worker.lm.rope``).

``auto`` picks ``genai`` where the builder supports the architecture, else ``torch``. Re-measured after the
torch path gained onnxruntime's fusions (load average 0.2): genai still decodes 3.09x faster on the tiny
model (3027 vs 981 tokens/s) and 1.29x on 8 layers x 512 (119 vs 92). First measured with
``python -m bench.lm_export`` (random-init Llama with GQA, 1 ORT thread, 128-token prompt, 32 new tokens,
medians of 3 interleaved rounds; 2 shared cores, load average 9), genai decodes 6.4x faster on the tiny
model of tests/factories_lm.py (1110 vs 172 tokens/s; prefill 1.7 vs 23 ms) and 1.42x faster on an
8-layer, hidden-512 model (56 vs 39 tokens/s; prefill equal, 200 vs 198 ms), exports in 12 vs 31 s there,
and its parity is the same (max logit diff 2e-6, 32 greedy tokens identical). Decode, where the
builder's fused GroupQueryAttention (rotary embedding inside) replaces the traced attention, is what it wins.

Every export is checked against torch: logits on the check text within ``atol + rtol*|torch|`` and
greedy decoding of ``generate_tokens`` tokens identical (a divergence is accepted only where torch's own
two candidates are within the logits tolerance, i.e. a tie) -> else ``StepFailed("export_mismatch")``.
Files whose weights pass 2 GB keep their weights as external data beside the ``.onnx``.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from worker.core import StepFailed
from worker.lm.layout import LMLayout
from worker.lm.rope import compact_rope_caches

if TYPE_CHECKING:
    import torch

Method = Literal["auto", "torch", "genai"]
TWO_GB = 2 * 1024**3
ATOL = 1e-3
RTOL = 1e-3
GENERATE_TOKENS = 32
# Architectures onnxruntime-genai's builder writes (its create_model dispatch) that this module enables.
GENAI_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "OlmoForCausalLM", "GraniteForCausalLM",
    "SmolLM3ForCausalLM", "NemotronForCausalLM",
})


# ----------------------------------------------------------------------------------------------------------
# torch.onnx


def _heads_hidden(config: Any) -> tuple[Any, int, int]:
    """(text config, attention heads, hidden size) of an hf causal LM config (Llama or GPT-2 names)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    return text, heads, hidden


def _dims(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of an hf causal LM config."""
    text, heads, hidden = _heads_hidden(config)
    layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return layers, kv, head_dim


def _plain(module: Any) -> Any:
    """A float32 CPU copy of ``module`` in eval mode, LoRA adapters merged (peft)."""
    inner = copy.deepcopy(module)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    return inner.cpu().float().eval()


def _kv_wrapper(module: Any, layers: int, position_ids: bool = False) -> torch.nn.Module:
    import inspect

    import torch
    from transformers import DynamicCache

    # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns).
    kw = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"

    class KVWrapper(torch.nn.Module):
        """``(input_ids, attention_mask, [position_ids], *past) -> (logits, *present)`` over a flat key/value list."""

        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> Any:
            extra = {"position_ids": rest[0]} if position_ids else {}
            past = rest[1:] if position_ids else rest
            cache = DynamicCache(config=self.model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                             return_dict=True, **extra, **{kw: cache})
            present = out.past_key_values if kw == "past_key_values" else getattr(out, "past_key_values", cache)
            flat: list[Any] = []
            for layer in present.layers[:layers]:
                flat += [getattr(layer, "keys"), getattr(layer, "values")]  # noqa: B009 (union of layer types)
            return (out.logits, *flat)

    return KVWrapper().eval()


def _names(layers: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(layers)]
    present = [(f"present.{i}.key", f"present.{i}.value") for i in range(layers)]
    return past, present


def tensor_bytes(t: Any) -> int:
    """Bytes a ``TensorProto``'s data takes, from its dims and element type (no serialisation)."""
    import onnx

    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits is not None:
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def weight_bytes(proto: Any) -> int:
    """Bytes of a model's weights: initializers and ``Constant`` tensors, subgraphs included."""
    def graph_bytes(graph: Any) -> int:
        size = sum(tensor_bytes(t) for t in graph.initializer)
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    size += tensor_bytes(a.t)
                if a.HasField("g"):
                    size += graph_bytes(a.g)
                size += sum(graph_bytes(g) for g in a.graphs)
        return size

    return graph_bytes(proto.graph)


def needs_external_data(proto: Any) -> bool:
    """Whether ``proto`` must keep its weights beside it: protobuf refuses to serialise a message of 2 GB or
    more (``EncodeError``), and ``ByteSize()`` itself fails on such a message, so the weights are summed
    from their dims instead, with a 32nd of the limit (64 MB) left for the graph itself."""
    return weight_bytes(proto) + TWO_GB // 32 >= TWO_GB


def _save(proto: Any, out_path: Path) -> None:
    """Write ``proto`` to ``out_path``; weights of 2 GB or more go to ``<name>.data`` beside it."""
    import onnx

    try:
        if needs_external_data(proto):
            onnx.save_model(proto, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out_path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(out_path))
    except Exception as exc:  # protobuf, disk, memory: the caller may fall back to the other exporter
        raise StepFailed("export_failed", f"writing {out_path.name} failed: {type(exc).__name__}: {exc}") from exc


def torch_export(module: Any, out_path: Path, opset: int = 17, position_ids: bool = False) -> LMLayout:
    """``torch.onnx.export`` of ``module`` (an eval-mode float32 causal LM) with a KV cache to ``out_path``;
    ``position_ids``: an explicit ``position_ids`` input (``[batch, seq]``) instead of positions counted
    from the cache length (for left-padded batches)."""
    import torch

    layers, kv, head_dim = _dims(module.config)
    past, present = _names(layers)
    wrapper = _kv_wrapper(module, layers, position_ids)
    vocab = int(module.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.int64)
    flat_past = [torch.zeros(2, kv, 3, head_dim) for _ in range(2 * layers)]
    pos = [torch.arange(3, 8).repeat(2, 1)] if position_ids else []
    in_names = ["input_ids", "attention_mask", *(["position_ids"] if position_ids else []), *[n for p in past for n in p]]
    out_names = ["logits", *[n for p in present for n in p]]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **({"position_ids": {0: "batch", 1: "sequence"}} if position_ids else {}),
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for p in past for n in p})
    axes.update({n: {0: "batch", 2: "total_sequence"} for p in present for n in p})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (ids, mask, *pos, *flat_past), str(raw), input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes, opset_version=opset,
                                  do_constant_folding=True, dynamo=False)
        except Exception as exc:  # the exporter raises many types; the user needs the message
            raise StepFailed("export_failed", f"torch.onnx.export of the causal LM failed: "
                                              f"{type(exc).__name__}: {exc}") from exc
        import onnx

        _save(onnx.load(str(raw)), out_path)
    wrapper.eval()  # the exporter restores the caller's training flag recursively
    return LMLayout(layers, kv, head_dim, past, present, position_ids, "float32", "torch", opset=opset)


def fuse(src: Path, dst: Path, config: Any) -> dict[str, int]:
    """onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, model type ``gpt2``, its
    Python fusions only: no ORT session, so the file stays portable across CPUs) over a torch.onnx export:
    LayerNorm + residual Add -> ``SkipLayerNormalization``, the GELU pattern -> ``FastGelu``, shape
    arithmetic folded. Writes ``dst``; returns the fused operators written (empty: nothing matched, and
    ``dst`` is not written). On a 4-layer GPT-2 (h256) it removed two thirds of the nodes and decoded 1.2x
    faster in fp32, 1.27x after INT4."""
    import logging

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    _, heads, hidden = _heads_hidden(config)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize_model(str(src), model_type="gpt2", num_heads=heads, hidden_size=hidden, opt_level=0)
    finally:
        quiet.setLevel(level)
    fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    if fused:
        proto: onnx.ModelProto = opt.model
        domains = {o.domain for o in proto.opset_import}
        for domain in sorted({n.domain for n in proto.graph.node} - domains - {"", "ai.onnx"}):
            proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # the optimizer leaves it out
        _save(proto, dst)
    return fused


def _keep_fused_if_it_matches(out_path: Path, layout: LMLayout, config: Any,
                              parity: Callable[[LMLayout], dict[str, Any]]) -> str:
    """Replace the traced ``out_path`` by its fused form when onnxruntime's fusions match and the fused
    file passes ``parity`` (``layout.fusions`` and ``layout.parity`` then set); else leave the trace in
    place and say why ('' when nothing matched). Not over 2 GB: the optimizer holds the whole protobuf,
    and external data names its own file."""
    if out_path.with_name(out_path.name + ".data").exists():
        return ""
    fused_path = out_path.with_name(f".{out_path.name}.fused")
    try:
        fusions = fuse(out_path, fused_path, config)
    except Exception as exc:  # the optimizer is pattern matching: a graph it trips on stays unfused
        fused_path.unlink(missing_ok=True)
        return f"{type(exc).__name__}: {exc}"
    if not fusions:
        return ""
    plain_copy = out_path.with_name(f".{out_path.name}.plain")
    out_path.replace(plain_copy)
    fused_path.replace(out_path)
    try:
        layout.parity = parity(layout)
    except StepFailed as exc:
        plain_copy.replace(out_path)
        return f"[{exc.code}] {exc.message}"
    layout.fusions = fusions
    plain_copy.unlink()
    return ""


# ----------------------------------------------------------------------------------------------------------
# onnxruntime-genai model builder


def genai_supports(config: Any) -> bool:
    """Whether onnxruntime-genai's builder writes this architecture (and is installed)."""
    import importlib.util

    archs = getattr(config, "architectures", None) or []
    return bool(archs) and archs[0] in GENAI_ARCHITECTURES and importlib.util.find_spec("onnxruntime_genai") is not None


def _cache_order(name: str) -> tuple[int, int, str]:
    """Sort key: logits / plain inputs first, then layer by layer, key before value."""
    parts = name.split(".")
    if name.startswith(("past_key_values.", "present.")) and len(parts) == 3 and parts[1].isdigit():
        return (1, int(parts[1]), parts[2])
    return (0, 0, "")


def _fix_head_dim(proto: Any, head_dim: int) -> None:
    """Replace the builder's symbolic ``kv_cache_dim`` by the head size on every cache input/output, and
    order the cache inputs and outputs layer by layer (the builder lists all keys, then all values)."""
    for values in (proto.graph.input, proto.graph.output):
        ordered = sorted(values, key=lambda vi: _cache_order(vi.name))  # stable: logits stays first
        copies = [type(vi)() for vi in ordered]
        for c, vi in zip(copies, ordered, strict=True):
            c.CopyFrom(vi)
        del values[:]
        values.extend(copies)
    for vi in [*proto.graph.input, *proto.graph.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].dim_value = head_dim


@contextlib.contextmanager
def _gemma3_as_transformers_5_writes_it(builder: Any) -> Iterator[None]:
    """While the builder runs, two fixes to its ``Gemma3Model``:

    - it reads transformers 4's flat RoPE names (``rope_theta``, ``rope_local_base_freq``,
      ``rope_parameters["rope_type"]``), transformers 5 writes one ``rope_parameters`` per layer type
      (``full_attention``, ``sliding_attention``): the config it loads is flattened to the old names (the global
      layers' parameters, the local theta) before the builder reads it;
    - it scales the embedding by sqrt(hidden) rounded to 2 decimals (25.3 for Gemma-3-270M's 640, transformers
      uses 25.298): the exact value, so that an fp32 export matches torch."""
    original = builder.Gemma3Model

    class Gemma3Exact(original):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            rope = getattr(config, "rope_parameters", None)
            if isinstance(rope, dict) and "full_attention" in rope:
                config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
                config.rope_theta = rope["full_attention"]["rope_theta"]
                config.rope_parameters = dict(rope["full_attention"])
            super().__init__(config, *args, **kwargs)
            self.embed_attrs["scale"] = float(np.float32(self.hidden_size) ** np.float32(0.5))

    builder.Gemma3Model = Gemma3Exact
    try:
        yield
    finally:
        builder.Gemma3Model = original


def copy_side_files(hf_dir: Path, dest: Path) -> None:
    """The tokenizer and whatever else ``hf_dir`` has beside weights and config, into ``dest`` (kept there)."""
    for f in Path(hf_dir).iterdir():
        if f.is_file() and not f.is_symlink() and not (dest / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)


def run_genai_builder(src: Path, dst: Path, cache: Path, extra: tuple[str, ...] = ()) -> None:
    """onnxruntime-genai's builder: the fp32 CPU ``dst/model.onnx`` (and genai_config.json) of the hf folder
    ``src``, quietly, with ``extra`` builder options (e.g. ``adapter_path=...``); its exceptions propagate."""
    import io

    from onnxruntime_genai.models import builder

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings(), _gemma3_as_transformers_5_writes_it(builder):
        warnings.simplefilter("ignore")
        opts = builder.parse_extra_options(None, str(src), str(dst), "fp32", "cpu", str(cache),
                                           ["hf_token=false", "filename=model.onnx", "windowed_kv_cache=false",
                                            *extra])
        builder.create_model(None, str(src), str(dst), "fp32", "cpu", str(cache), **opts)


def genai_export(module: Any, out_path: Path, hf_dir: Path | None) -> LMLayout:
    """The builder's fp32 CPU model of ``module`` (saved with ``hf_dir``'s tokenizer) as one ``out_path``."""
    import onnx

    layers, kv, head_dim = _dims(module.config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        src, dst, cache = Path(tmp) / "hf", Path(tmp) / "onnx", Path(tmp) / "cache"
        module.save_pretrained(src, safe_serialization=True)
        if hf_dir is not None:
            copy_side_files(hf_dir, src)
        if not (src / "tokenizer_config.json").exists() and not (src / "tokenizer.json").exists():
            raise StepFailed("export_failed", "the genai builder needs the model's tokenizer files (hf_dir)")
        try:
            run_genai_builder(src, dst, cache)
        except Exception as exc:
            raise StepFailed("export_failed", f"onnxruntime-genai builder failed: {type(exc).__name__}: {exc}") from exc
        proto = onnx.load(str(dst / "model.onnx"))  # with its external data, then one file (or .data over 2 GB)
        _fix_head_dim(proto, head_dim)
        rope = compact_rope_caches(proto)
        _save(proto, out_path)
        config_file = dst / "genai_config.json"
        if config_file.exists():
            (out_path.parent / "genai_config.json").write_text(config_file.read_text())
    layout = LMLayout.from_onnx(out_path)
    layout.method = "genai"
    layout.rope_caches = {"computed": rope["replaced"], "bytes_saved": rope["bytes_saved"],
                          "max_abs_diff": rope["max_abs_diff"]}
    if (layout.layers, layout.kv_heads, layout.head_dim) != (layers, kv, head_dim):
        raise StepFailed("export_failed", f"genai builder wrote {layout.layers} layers x {layout.kv_heads} kv heads "
                                          f"x {layout.head_dim}, the model has {layers} x {kv} x {head_dim}")
    return layout


# ----------------------------------------------------------------------------------------------------------
# parity


def _check_text(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (2, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # a right-padded row
    return ids, mask


def _torch_greedy(module: Any, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens of ``module`` (with its own KV cache) and its last-position logits at each step."""
    import inspect

    import torch

    kw = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    tokens: list[int] = []
    logits_seen: list[np.ndarray] = []
    x = torch.tensor([prompt], dtype=torch.int64)
    past = None
    with torch.inference_mode():
        for _ in range(steps):
            total = len(prompt) + len(tokens)
            out = module(input_ids=x, attention_mask=torch.ones(1, total, dtype=torch.int64), use_cache=True,
                         **({kw: past} if past is not None else {}))
            past = out.past_key_values
            last = out.logits[0, -1].float().numpy()
            logits_seen.append(last)
            tokens.append(int(last.argmax()))
            x = torch.tensor([[tokens[-1]]], dtype=torch.int64)
    return tokens, logits_seen


def check_parity(module: Any, onnx_path: Path, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                 atol: float = ATOL, rtol: float = RTOL, generate_tokens: int = GENERATE_TOKENS,
                 layout: LMLayout | None = None) -> dict[str, Any]:
    """Logits of ORT vs torch on real tokens and greedy decoding of ``generate_tokens``; StepFailed otherwise."""
    import torch

    from worker.lm.session import LMSession

    sess = LMSession(onnx_path, threads=1, layout=layout)
    got = sess.logits(input_ids, attention_mask)
    with torch.inference_mode():
        want = module(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)
                      ).logits.float().numpy()
    if got.shape != want.shape:
        raise StepFailed("export_mismatch", f"ONNX logits shape {list(got.shape)} != torch {list(want.shape)}")
    valid = attention_mask.astype(bool)
    diff = np.abs(got - want)[valid]
    allowed = atol + rtol * np.abs(want[valid])
    max_abs = float(diff.max()) if diff.size else 0.0
    if not bool((diff <= allowed).all()):
        raise StepFailed("export_mismatch", f"ONNX logits differ from torch on {int(valid.sum())} tokens: max abs "
                                            f"diff {max_abs:.3g} (tolerance atol={atol:g} + rtol={rtol:g}*|torch|)")
    prompt = [int(t) for t, m in zip(input_ids[0], attention_mask[0], strict=True) if m][:16]
    ort_tokens = sess.generate(prompt, generate_tokens)
    torch_tokens, torch_logits = _torch_greedy(module, prompt, generate_tokens)
    same = 0
    while same < len(torch_tokens) and same < len(ort_tokens) and torch_tokens[same] == ort_tokens[same]:
        same += 1
    tie_at = None
    if same < generate_tokens:
        last = torch_logits[same]
        margin = float(abs(last[torch_tokens[same]] - last[ort_tokens[same]])) if same < len(ort_tokens) else 1e9
        if margin > atol + rtol * float(np.abs(last).max()):
            raise StepFailed("export_mismatch", f"greedy decoding differs from torch at token {same} of "
                                                f"{generate_tokens}: torch {torch_tokens[same]} vs ONNX "
                                                f"{ort_tokens[same] if same < len(ort_tokens) else None} "
                                                f"(torch logit margin {margin:.3g})")
        tie_at = same
    return {"max_abs_diff": max_abs, "tokens": int(valid.sum()), "atol": atol, "rtol": rtol,
            "greedy_tokens": generate_tokens, "greedy_identical": tie_at is None, "greedy_tie_at": tie_at}


# ----------------------------------------------------------------------------------------------------------


def choose_method(module: Any, method: Method) -> Literal["torch", "genai"]:
    """``auto``: the genai builder where it supports the architecture, else torch.onnx."""
    if method == "genai":
        if not genai_supports(module.config):
            archs = getattr(module.config, "architectures", None)
            raise StepFailed("export_failed", f"onnxruntime-genai's builder does not support {archs}")
        return "genai"
    if method == "torch":
        return "torch"
    return "genai" if genai_supports(module.config) else "torch"


def export_causal_lm(module: Any, out_path: Path, *, opset: int = 17, hf_dir: Path | None = None,
                     method: Method = "auto", check_ids: np.ndarray | None = None,
                     check_mask: np.ndarray | None = None, atol: float = ATOL,
                     generate_tokens: int = GENERATE_TOKENS) -> LMLayout:
    """Export ``module`` (an hf ``*ForCausalLM``) with a KV cache to ``out_path`` and check it against torch.

    ``check_ids``/``check_mask``: the tokens the logits parity runs on (eval text; random tokens if None).
    """
    out_path = Path(out_path)
    plain = _plain(module)
    chosen = choose_method(plain, method)
    if check_ids is None:
        check_ids, check_mask = _check_text(int(plain.config.get_text_config().vocab_size))
    elif check_mask is None:
        check_mask = np.ones_like(check_ids)
    ids, mask = np.asarray(check_ids, np.int64), np.asarray(check_mask, np.int64)

    def parity(layout: LMLayout) -> dict[str, Any]:
        return check_parity(plain, out_path, ids, mask, atol=atol, generate_tokens=generate_tokens, layout=layout)

    def export_and_check(how: str) -> LMLayout:
        if how == "genai":
            layout = genai_export(plain, out_path, hf_dir)
            layout.parity = parity(layout)
            return layout
        layout = torch_export(plain, out_path, opset)
        why = _keep_fused_if_it_matches(out_path, layout, plain.config, parity)
        if not layout.fusions:
            layout.parity = parity(layout)
            if why:
                layout.parity["fusion_failed"] = why
        return layout

    def attempt(how: str) -> LMLayout:
        try:
            return export_and_check(how)
        except StepFailed:
            raise
        except Exception as exc:  # any failure is the step's, named, so that auto can fall back
            raise StepFailed("export_failed", f"{how} export of the causal LM failed: "
                                              f"{type(exc).__name__}: {exc}") from exc

    if chosen == "genai" and method == "auto":
        try:
            return attempt("genai")
        except StepFailed as exc:  # auto: the builder's graph is the faster one, torch.onnx the general one
            layout = attempt("torch")
            layout.parity["genai_failed"] = f"[{exc.code}] {exc.message}"
            return layout
    return attempt(chosen)
