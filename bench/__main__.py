"""``python -m bench``: every benchmark once at modest sizes (the full sizes are each script's defaults)."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from bench import (
    api_latency,
    bert_pipeline,
    digits_pipeline,
    job_overhead,
    lm_export,
    load,
    search,
    train_throughput,
    upload_stream,
)

MODEST: dict[str, tuple[Callable[[list[str] | None], dict[str, Any]], list[str]]] = {
    "api_latency": (api_latency.main, ["--duration", "5", "--warmup", "1", "--rounds", "2"]),
    "upload_stream": (upload_stream.main, ["--size-mib", "256"]),
    "load": (load.main, ["--reads", "10"]),
    "job_overhead": (job_overhead.main, ["--repeats", "2", "--samples", "32"]),
    "digits_pipeline": (digits_pipeline.main, ["--latency-runs", "100", "--rounds", "1"]),
    "bert_pipeline": (bert_pipeline.main, ["--train-rows", "1000", "--eval-rows", "300", "--latency-runs", "100"]),
    "train_throughput": (train_throughput.main, ["--samples", "1024"]),
    "lm_export": (lm_export.main, ["--rounds", "1", "--runs", "10"]),
    "search": (search.main, ["--quick"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(MODEST)} (default: all)")
    a = p.parse_args(argv)
    if unknown := [n for n in a.names if n not in MODEST]:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in a.names or list(MODEST):
        fn, args = MODEST[name]
        print(f"== {name} {' '.join(args)}", file=sys.stderr, flush=True)
        try:
            fn(args)
        except Exception:
            traceback.print_exc()
            print(f"[{name}] FAILED (see the traceback above)", flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
