"""The streamed int4 path against the in-memory one on a real small LLM (``bench.zoo``'s SmolLM2-135M-Instruct,
dequantized and rotated, fp32 safetensors): held-out perplexity and size of the fp32 export, the in-memory
quantize pass (``int4`` defaults with calibration text: GPTQ, 8-bit head and table; and RTN), the streamed
writer with GPTQ (Hessians collected layer by layer), and streamed RTN with the token table at 8 bits and in its
stored dtype: the figures behind the streamed path's table policy and its agreement with the in-memory path.

    python -m bench.stream_parity --eval-tokens 4096 --calib-rows 32
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, log


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench import zoo, zoo_models
    from models.spec import QuantizeStep
    from worker import stream_job
    from worker.lm import stream
    from worker.passes.quantizers.gptq_layers import StreamedGPTQ

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(zoo_models.ZOO))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-rows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/stream-parity")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    hf = zoo_models.prepare(a.model, log)
    cal, ev = zoo.text_rows(hf, a.seq, a.eval_tokens, a.calib_rows)
    fp32, ref = zoo.fp32_reference(a.model, hf, ev, a)
    rows: dict[str, dict[str, Any]] = {"fp32": ref}

    def measured(name: str, path: Path, wall: float) -> None:
        rows[name] = {**zoo.measure(path, ev, a.threads, ref["perplexity"]), "quantize_s": wall}
        log(f"{name}: {rows[name]['size_mb']:.1f} MB, perplexity {rows[name]['perplexity']:.3f} "
            f"({100 * rows[name]['ppl_increase']:+.2f} %), {wall:.0f} s")

    for name, params in (("in_memory_gptq", {"algorithm": "gptq"}), ("in_memory_rtn", {})):
        t0 = time.perf_counter()  # (a job with calibration text gets GPTQ by default; this context names none)
        path, _ = zoo.quantize_direct(fp32, work / name, params, cal)
        measured(name, path, time.perf_counter() - t0)
    int4 = stream_job.settings_for(QuantizeStep(type="quantize", mode="int4"))
    batches = [(cal[i:i + 4], np.ones_like(cal[i:i + 4])) for i in range(0, len(cal), 4)]
    for name, settings, gptq in (("streamed_gptq", int4, True), ("streamed_rtn_table8", int4, False),
                                 ("streamed_rtn_table_stored", stream.StreamSettings(), False)):
        t0 = time.perf_counter()
        quantizer = StreamedGPTQ(hf, batches) if gptq else None
        written = stream.write_model(hf, work / name / "model.onnx", settings, quantizer=quantizer)
        measured(name, written.path, time.perf_counter() - t0)
    gap = rows["streamed_gptq"]["perplexity"] / rows["in_memory_gptq"]["perplexity"] - 1
    emit("stream_parity", f"{a.model}: streamed GPTQ {rows['streamed_gptq']['perplexity']:.3f} vs in-memory "
         f"{rows['in_memory_gptq']['perplexity']:.3f} ({100 * gap:+.2f} %); table 8-bit "
         f"{rows['streamed_rtn_table8']['perplexity']:.3f} vs stored {rows['streamed_rtn_table_stored']['perplexity']:.3f}",
         {"model": a.model, "eval_tokens": int(ev.size), "calib_rows": len(cal), "rows": rows, "gptq_gap": gap})
    return rows


if __name__ == "__main__":
    main()
