"""``python -m bench.gpu_check``: every CUDA path of the worker, exercised once in a few minutes on a GPU machine.

Run it whenever a GPU machine is lent (README, Benchmarks). Items, each timed and reported pass / fail / skipped:

- ``detect``: the worker's GPU probe (a child process) agrees with torch here, a worker with a GPU consumes the
  CUDA queue, and its advertisement carries the GPU's name and memory (runs on a CPU too: no GPU on both sides);
- ``ort_cuda``: an ONNX Runtime session on the CUDA execution provider (onnxruntime-gpu) matches the CPU one;
- ``lora_bf16``: ``FinetunePass`` LoRA on a random-init Llama from the Llama-3.2-1B config scaled down (or the
  real size with ``--full-size``), the 1 B threshold lowered to it so the large-model branch runs: bf16 base,
  gradient checkpointing, eval loss down, a plain fp32 module back;
- ``qlora``: the same with the bf16 base made not to fit, so the base goes 4-bit NF4 through bitsandbytes; the
  merged module has no 4-bit layer left;
- ``int4_stream_cuda``: the streaming writer's INT4 file (``worker.lm.stream``) run on the CUDA execution
  provider, its logits against the CPU's.

On a machine without CUDA every CUDA item is ``skipped: no CUDA``. Exits 1 when any item failed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, machine_info

NO_CUDA = "skipped: no CUDA"
# Llama-3.2-1B: hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, tied embeddings.
FULL_1B: dict[str, Any] = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192}
VOCAB = 128256
SCALED: dict[str, Any] = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
          "intermediate_size": 2048}


class Skip(Exception):
    """An item that cannot run here; its message says why."""


@dataclass
class Row:
    name: str
    status: str
    seconds: float
    detail: str


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _need_cuda() -> None:
    if not _cuda():
        raise Skip(NO_CUDA)


def _need_cuda_ep() -> None:
    _need_cuda()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"skipped: onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")


# -- items -----------------------------------------------------------------------------------------


def check_detect(_: argparse.Namespace, work: Path) -> str:
    import torch

    from models.settings import get_settings
    from worker.advertise import configure, current, probe_gpu, queues_for

    gpu = probe_gpu()
    assert gpu.count == torch.cuda.device_count(), (gpu, torch.cuda.device_count())
    queues = queues_for(None, gpu)
    assert (get_settings().cuda_queue in queues) == (gpu.count > 0), queues
    configure(queues, "gpu-check", gpu)
    advert = current()
    assert (advert.gpu_name, advert.gpu_count, advert.gpu_memory) == (gpu.name, gpu.count, gpu.memory)
    assert 0 < advert.memory_free <= advert.memory_total
    if gpu.count:
        assert gpu.name == torch.cuda.get_device_name(0)
        assert gpu.memory == max(torch.cuda.get_device_properties(i).total_memory for i in range(gpu.count))
    return f"{gpu.count} GPU(s) {gpu.name or ''} {gpu.memory / 1e9:.1f} GB; queues {queues}"


def check_ort_cuda(_: argparse.Namespace, work: Path) -> str:
    _need_cuda_ep()
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from worker.evaluate import make_session

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])], [w])
    path = work / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    cpu = make_session(path, 1).run(None, {"x": x})[0]
    sess = make_session(path, 1, "CUDAExecutionProvider")
    assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
    gpu = sess.run(None, {"x": x})[0]
    diff = float(np.abs(gpu - cpu).max())
    assert diff < 1e-2, diff
    return f"MatMul+Relu on {sess.get_providers()[0]}: max |diff| vs CPU {diff:.1e}"


def _llama(work: Path, a: argparse.Namespace, dtype: str = "float32") -> Path:
    """A random-init Llama (the 1B config, or scaled down) saved as safetensors; its folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / f"llama-{dtype}"
    if folder.exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=512,
                         **(FULL_1B if a.full_size else SCALED))
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def _lm_data(rows: int, length: int) -> Any:
    """Token rows of a learnable pattern (each row counts up in steps of 7 from its own start)."""
    from worker.core import ArrayDataset

    ids = ((np.arange(length)[None, :] * 7 + np.arange(rows)[:, None] * 13) % 1000 + 100).astype(np.int64)
    return ArrayDataset({"input_ids": ids, "attention_mask": np.ones_like(ids)}, ids.copy(), meta={"shape": "text"})


def _finetune(a: argparse.Namespace, work: Path, patches: dict[str, float],
              device: str = "cuda") -> tuple[Any, dict[str, Any], float]:
    """FinetunePass LoRA on ``device`` with ``memory_fit`` constants patched; (module, metrics, peak GPU GB)."""
    import torch
    from transformers import AutoModelForCausalLM

    from models import memory_fit
    from models.spec import FinetuneStep
    from tests.factories_train import MemoryContext, spec
    from worker.core import WorkingModel
    from worker.passes.finetune import FinetunePass

    folder = _llama(work, a)
    module = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = WorkingModel(form="torch", origin="hf", input_names=["input_ids", "attention_mask"],
                         output_names=["logits"], module=module, hf_dir=folder, meta={"hf_task": "text-generation"})
    ctx = MemoryContext(work, spec("text-generation"), device=device,
                        data={"train": _lm_data(64, 128), "eval": _lm_data(16, 128)})
    saved = {k: getattr(memory_fit, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(memory_fit, k, v)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = FinetunePass().run(model, FinetuneStep(type="finetune", mode="lora", epochs=3, batch_size=8,
                                                        lr=1e-2), ctx)
    finally:
        for k, v in saved.items():
            setattr(memory_fit, k, v)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    return result.model.module, result.metrics, peak


def _assert_trained(module: Any, m: dict[str, Any]) -> None:
    import torch

    assert m["gradient_checkpointing"] is True and m["device"] == "cuda", m
    assert m["eval_loss_after"] < m["eval_loss_before"], (m["eval_loss_before"], m["eval_loss_after"])
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert type(module).__name__ == "LlamaForCausalLM"


def check_lora_bf16(a: argparse.Namespace, work: Path) -> str:
    _need_cuda()
    module, m, peak = _finetune(a, work, {"LARGE_MODEL_PARAMS": 1})
    assert m["dtype"] == "bfloat16" and not m["base_4bit"], m
    _assert_trained(module, m)
    return (f"{m['total_params'] / 1e6:.0f} M params, eval loss {m['eval_loss_before']:.2f} -> "
            f"{m['eval_loss_after']:.2f}, {m['train_samples_per_s']:.0f} samples/s, peak GPU {peak:.2f} GB")


def check_qlora(a: argparse.Namespace, work: Path) -> str:
    _need_cuda()
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise Skip(f"skipped: bitsandbytes not installed ({exc})") from exc
    module, m, peak = _finetune(a, work, {"LARGE_MODEL_PARAMS": 1, "GPU_BF16_BYTES_PER_PARAM": 1e9})
    assert m["base_4bit"] is True, m
    _assert_trained(module, m)
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in module.modules())
    return (f"NF4 base (bitsandbytes {bnb.__version__}), eval loss {m['eval_loss_before']:.2f} -> "
            f"{m['eval_loss_after']:.2f}, peak GPU {peak:.2f} GB")


def check_int4_stream_cuda(a: argparse.Namespace, work: Path) -> str:
    _need_cuda_ep()
    from worker.evaluate import make_session
    from worker.lm.session import LMSession
    from worker.lm.stream import StreamSettings, write_model

    folder = _llama(work, a, "bfloat16")
    written = write_model(folder, work / "int4" / "model.onnx", StreamSettings())
    cpu = LMSession(written.path)
    gpu = LMSession(written.path)
    gpu.session = make_session(written.path, 1, "CUDAExecutionProvider")
    data = _lm_data(4, 64)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    lc, lg = cpu.logits(ids, mask), gpu.logits(ids, mask)
    agree = float((lc.argmax(-1) == lg.argmax(-1)).mean())
    diff = float(np.abs(lc - lg).max())
    assert agree >= 0.95 and np.isfinite(lg).all(), (agree, diff)
    return f"{written.path.stat().st_size / 1e6:.0f} MB + data; top-1 agreement CUDA vs CPU {agree:.3f}, max |diff| {diff:.2e}"


CHECKS: dict[str, Callable[[argparse.Namespace, Path], str]] = {
    "detect": check_detect,
    "ort_cuda": check_ort_cuda,
    "lora_bf16": check_lora_bf16,
    "qlora": check_qlora,
    "int4_stream_cuda": check_int4_stream_cuda,
}


def run_checks(a: argparse.Namespace, work: Path) -> list[Row]:
    """Each selected item once: pass (its figures), fail (the error) or skipped (why)."""
    rows: list[Row] = []
    for name in a.only or list(CHECKS):
        t0 = time.perf_counter()
        try:
            status, detail = "pass", CHECKS[name](a, work)
        except Skip as exc:
            status, detail = "skipped", str(exc).removeprefix("skipped: ")
        except Exception as exc:  # a check that breaks is a failure to report, not a crash of the others
            traceback.print_exc()
            status, detail = "fail", f"{type(exc).__name__}: {exc}"[:300]
        rows.append(Row(name, status, time.perf_counter() - t0, detail))
        shown = f"{status}: {detail}" if status == "skipped" else f"{status:<8} {rows[-1].seconds:7.1f} s  {detail}"
        print(f"{name:<18} {shown}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these items only")
    p.add_argument("--full-size", action="store_true", help="the real Llama-3.2-1B config (1.24 B parameters)")
    a = p.parse_args(argv)
    print(f"{'item':<18} {'status':<8} {'time':>9}  detail", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = run_checks(a, Path(tmp))
    failed = [r.name for r in rows if r.status == "fail"]
    figures = {"rows": [r.__dict__ for r in rows], "failed": failed, "cuda": _cuda(), **machine_info()}
    emit("gpu_check", f"{sum(r.status == 'pass' for r in rows)} passed, {len(failed)} failed, "
         f"{sum(r.status == 'skipped' for r in rows)} skipped", figures)
    return figures


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)
