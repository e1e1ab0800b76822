"""A job's peak memory on a worker, estimated from the upload's inspection (parameters, architecture) and
its steps: the API refuses at submit (422 ``job_too_large``) a job no worker could hold, saying what would
fit, and the worker picks the streamed LLM path by the same figures. Pure: no torch, no database.

Bytes per parameter at the peak, measured on random-init Llamas (``python -m bench.llm_scale``; issue 19):

- in memory (load the module, export to ONNX, evaluate, quantize): 14-18 B/param, taken as 18;
- streamed (``worker.lm.stream``: INT8 reference and INT4 file written layer by layer, one ONNX Runtime
  session at a time): 3.73 GB at 1.24 B and 5.57 GB at 3.21 B parameters, the evaluation of the INT8
  reference the highest phase (0.8 GB + 1.46 B/param): ``STREAMED_BYTES_PER_PARAM`` plus
  ``STREAMED_FIXED_BYTES`` covers both; streamed GPTQ adds a phase below that one (read from the code, not
  measured at 8 B: one fp32 decoder layer, the calibration hidden states, the layer's Hessians and one
  factorisation, 4.7 GiB measured alone at K = 14336: about 6 GB for a Llama-3.1-8B);
- training on CPU: full finetune / distill hold fp32 weights, gradients and two AdamW moments (16 B/param)
  plus activations: 20; LoRA and the partial modes hold the fp32 module and its activations: 6.
- training on CUDA (``training_plan``; planned from the weights' sizes, never measured yet: ``bench/gpu_check.py``):
  full in fp32 with gradient checkpointing 18 B/param, the partial modes 6; LoRA on 1 B parameters and more
  on a bf16 base 2.5, QLoRA (the base in 4-bit NF4) 0.75 (the embeddings stay bf16); each plus
  ``GPU_FIXED_BYTES`` (the CUDA context and one batch's activations).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

IN_MEMORY_BYTES_PER_PARAM = 18
STREAMED_BYTES_PER_PARAM = 1.5
STREAMED_FIXED_BYTES = 2 * 1024**3
TRAIN_FULL_BYTES_PER_PARAM = 20
TRAIN_PARTIAL_BYTES_PER_PARAM = 6
GPU_FULL_BYTES_PER_PARAM = 18
GPU_BF16_BYTES_PER_PARAM = 2.5
GPU_4BIT_BYTES_PER_PARAM = 0.75
GPU_FIXED_BYTES = 2 * 1024**3
# Models of this many parameters and more are trained on CUDA only (Settings.cpu_train_max_params' default),
# and there in bf16 (LoRA and the partial modes): on a CPU they would take days an epoch.
LARGE_MODEL_PARAMS = 1_000_000_000
# The share of a worker's memory a job may plan to use (the rest: the worker process itself, page cache, slack).
MEMORY_SHARE = 0.6
# Architectures the streaming writer covers (the Llama decoder layer; Qwen2 adds q/k/v biases).
STREAM_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
GB = 1e9


def streamable_step(step: Any) -> str | None:
    """Why ``step`` cannot be written by the streaming writer (None: it can)."""
    if step.type != "quantize" or step.mode not in ("int4", "int8_weight"):
        return "only quantize int4 / int8_weight is streamed"
    if step.algorithm not in (None, "rtn", "gptq"):
        return f"algorithm {step.algorithm} needs the whole graph (streaming writes RTN and GPTQ)"
    if step.quantize_embeddings or step.bits or step.nodes_to_exclude or step.op_types_to_exclude:
        return "quantize_embeddings true (a 4-bit table), bits and exclusions need the whole graph"
    if getattr(step, "int8_share", None):
        return "int8_share needs the whole graph (its layers are chosen by KL on the float model)"
    return None


def in_memory_fits(params: int, memory: int) -> bool:
    """Whether the in-memory export + quantize of ``params`` parameters fits ``memory``'s planned share."""
    return params * IN_MEMORY_BYTES_PER_PARAM <= MEMORY_SHARE * memory


def streamed_peak(params: int) -> int:
    """The streamed path's peak for ``params`` parameters."""
    return int(params * STREAMED_BYTES_PER_PARAM + STREAMED_FIXED_BYTES)


@dataclass(frozen=True)
class Estimate:
    """A job's planned peak: bytes, the path it takes (``in_memory``, ``streamed``, ``training``) and how."""

    peak_bytes: int
    path: str
    basis: str


def estimate(meta: dict[str, Any], steps: list[Any], memory: int) -> Estimate | None:
    """The peak of a job over an hf causal LM with inspection ``meta`` (None: not such a model, or no count)."""
    params = int(meta.get("parameters") or 0)
    if not params or meta.get("task") != "text-generation":
        return None
    training = [s for s in steps if s.type in ("finetune", "distill")]
    if training:
        full = any(s.type == "distill" or getattr(s, "mode", "full") == "full" for s in training)
        per = TRAIN_FULL_BYTES_PER_PARAM if full else TRAIN_PARTIAL_BYTES_PER_PARAM
        what = "full finetune / distill (fp32 weights, gradients, AdamW moments)" if full else "partial/LoRA training"
        return Estimate(params * per, "training", f"{what}: {per} bytes per parameter")
    streamable = (len(steps) == 1 and streamable_step(steps[0]) is None
                  and meta.get("architecture") in STREAM_ARCHITECTURES)
    if streamable and not in_memory_fits(params, memory):
        return Estimate(streamed_peak(params), "streamed",
                        f"written layer by layer: {STREAMED_BYTES_PER_PARAM} bytes per parameter + 2 GiB")
    return Estimate(params * IN_MEMORY_BYTES_PER_PARAM, "in_memory",
                    f"loaded, exported and quantized in memory: {IN_MEMORY_BYTES_PER_PARAM} bytes per parameter")


def refusal(meta: dict[str, Any], steps: list[Any], memory: int) -> str | None:
    """Why a job cannot fit a worker with ``memory`` bytes, and what would; None when it fits."""
    est = estimate(meta, steps, memory)
    if est is None or est.peak_bytes <= MEMORY_SHARE * memory:
        return None
    params = int(meta["parameters"])
    arch = meta.get("architecture")
    msg = (f"this job needs about {est.peak_bytes / GB:.0f} GB at its peak ({params / 1e9:.2f} B parameters, "
           f"{est.basis}); workers have {memory / GB:.0f} GB, of which a job may plan {MEMORY_SHARE:.0%}")
    if est.path == "training":
        msg += "; a CPU worker cannot train a model this large"
    if arch in STREAM_ARCHITECTURES and streamed_peak(params) <= MEMORY_SHARE * memory:
        msg += (f". What fits: a single step quantize {{mode: int4}} (RTN, or GPTQ with calibration text) or "
                f"int8_weight, streamed "
                f"layer by layer in about {streamed_peak(params) / GB:.0f} GB")
    elif arch not in STREAM_ARCHITECTURES:
        msg += (f". {arch} is not streamed (only {', '.join(sorted(STREAM_ARCHITECTURES))}): the largest model "
                f"this job fits is about {MEMORY_SHARE * memory / (est.peak_bytes / params) / 1e9:.2f} B parameters")
    else:
        msg += ". No path fits: use a worker with more memory"
    return msg


@dataclass(frozen=True)
class TrainingPlan:
    """How a training step runs on a worker: device, the frozen base's dtype, gradient checkpointing, a 4-bit
    base (QLoRA), and the planned peak on that device."""

    device: str
    dtype: str
    checkpointing: bool
    base_4bit: bool
    peak_bytes: int
    basis: str


def training_plan(params: int, mode: str, *, cuda: bool, gpu_memory: int = 0,
                  cpu_max_params: int = LARGE_MODEL_PARAMS) -> TrainingPlan | str:
    """The plan for training ``params`` parameters in ``mode`` (``full``, ``head``, ``last_n``, ``lora``,
    ``distill``) on a CUDA device of ``gpu_memory`` bytes, or on a CPU; a str says why it cannot run there.

    CPU: fp32, refused from ``cpu_max_params``. CUDA, all with gradient checkpointing: LoRA from
    ``LARGE_MODEL_PARAMS`` on a frozen bf16 base (its adapters fp32), or a 4-bit one (QLoRA) where the bf16 one
    does not fit; every other mode and size in fp32 (weights that train in bf16 lose small updates)."""
    size = f"{params / 1e9:.2f} B parameters"
    full = mode in ("full", "distill")
    if not cuda:
        if params >= cpu_max_params:
            return (f"a CPU worker does not train a model this large: {size}, the limit is "
                    f"{cpu_max_params / 1e9:.2f} B (training at this size runs on a GPU worker)")
        per = TRAIN_FULL_BYTES_PER_PARAM if full else TRAIN_PARTIAL_BYTES_PER_PARAM
        return TrainingPlan("cpu", "float32", False, False, params * per, f"fp32 on the CPU: {per} bytes per parameter")
    budget = MEMORY_SHARE * gpu_memory
    options: list[tuple[str, float, bool]] = []  # (dtype, bytes per parameter, 4-bit base), the first that fits
    if full:
        options.append(("float32", GPU_FULL_BYTES_PER_PARAM, False))
    elif mode != "lora" or params < LARGE_MODEL_PARAMS:
        options.append(("float32", TRAIN_PARTIAL_BYTES_PER_PARAM, False))
    else:
        options += [("bfloat16", GPU_BF16_BYTES_PER_PARAM, False), ("bfloat16", GPU_4BIT_BYTES_PER_PARAM, True)]
    for dtype, per_param, four in options:
        peak = int(params * per_param + GPU_FIXED_BYTES)
        if peak <= budget:
            base = "a 4-bit NF4 base (QLoRA)" if four else f"a {dtype} base"
            return TrainingPlan("cuda", dtype, True, four, peak,
                                f"{base} with gradient checkpointing on CUDA: {per_param} bytes per parameter + 2 GiB")
    least = int(params * options[-1][1] + GPU_FIXED_BYTES)
    hint = "" if mode == "lora" else "; LoRA (mode lora, QLoRA where the base does not fit) needs far less"
    return (f"training {size} in mode {mode} needs about {least / GB:.0f} GB of GPU memory; the GPU has "
            f"{gpu_memory / GB:.0f} GB, of which a job may plan {MEMORY_SHARE:.0%}{hint}")


def machine_memory_bytes() -> int:
    """Memory this process's machine offers: the cgroup's limit where one is set, else the RAM."""
    try:
        ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError):
        ram = 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                raw = fh.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return min(int(raw), ram) if ram else int(raw)
    return ram


def without_training(meta: dict[str, Any], memory: int) -> str:
    """What a job over this model that trains nothing can do on workers of ``memory`` bytes."""
    params, arch = int(meta.get("parameters") or 0), meta.get("architecture")
    if arch in STREAM_ARCHITECTURES and streamed_peak(params) <= MEMORY_SHARE * memory:
        return (f"a single step quantize {{mode: int4}} (or int8_weight, algorithm rtn), streamed layer by layer "
                f"in about {streamed_peak(params) / GB:.0f} GB")
    if in_memory_fits(params, memory):
        return f"steps that do not train (quantize, prune, export), in memory in about {params * 18 / GB:.0f} GB"
    return "no step over this model fits these workers"


def machine_free_memory_bytes() -> int:
    """Memory this machine has free now: the cgroup's limit less its usage where one is set, else MemAvailable."""
    free = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
    except (OSError, ValueError):
        return free
    if limit.isdigit() and int(limit) < 1 << 60:
        left = max(0, int(limit) - used)
        return min(left, free) if free else left
    return free


def planned_memory(configured: int | None) -> int:
    """The workers' memory jobs are planned against: ``configured`` (the setting), else this machine's."""
    return configured or machine_memory_bytes()
