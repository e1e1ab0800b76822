"""A causal LM session's peak memory, measured in a fresh process.

RSS growth inside the worker is not the session's memory: the input model's evaluation leaves the allocator's
arenas mapped, so the output model's session reuses them and its "growth" reads as a few KB (a LoRA job showed
18.31 MB -> 8.00 KB). Each model is measured instead in a child process of its own: RSS growth (sampled) from
just before the session is made through one prefill of the timing prompt and its decode steps, so input and
output are measured the same way from the same start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 600.0
CANCEL_POLL_S = 1.0  # how often the cancel flag is read while the probe runs
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the worker package


def _never() -> None:
    """The default cancel check."""


def session_peak_bytes(onnx_path: Path, threads: int, layout_meta: dict[str, Any] | None,
                       prompt_tokens: int, new_tokens: int,
                       check_cancelled: Callable[[], None] = _never) -> int | None:
    """Peak RSS growth of a fresh process loading the session and running one prefill + ``new_tokens`` decode
    steps; None when the probe could not run (the report then has no memory row rather than a wrong one).

    The probe is the uploaded graph run again: each of its runs is under the run guard's cap (a graph that
    loops fails ``run_time_limit`` here too), and ``check_cancelled`` is read while it runs (a cancel kills it)."""
    args = {"path": str(onnx_path), "threads": threads, "layout": layout_meta,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "worker.lm.memory", json.dumps(args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    except OSError:
        return None
    stdout = _wait(proc, check_cancelled)
    try:
        answer = json.loads((stdout or "").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    if isinstance(answer, dict) and answer.get("error") == "run_time_limit":
        from worker.core import StepFailed

        raise StepFailed("run_time_limit", f"measuring its memory: {answer.get('message', '')}")
    if proc.returncode != 0:
        return None
    try:
        return int(answer["peak_bytes"])
    except (KeyError, TypeError, ValueError):
        return None


def _wait(proc: subprocess.Popen[str], check_cancelled: Callable[[], None]) -> str | None:
    """The probe's stdout once it exits; None past PROBE_TIMEOUT_S (killed); a cancel kills it and raises."""
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while True:
        try:
            return proc.communicate(timeout=CANCEL_POLL_S)[0]
        except subprocess.TimeoutExpired:
            pass
        try:
            check_cancelled()
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        if time.monotonic() >= deadline:
            proc.kill()
            proc.communicate()
            return None


def _probe(args: dict[str, Any]) -> int:
    """In the child: the peak RSS growth of making the session and running one prefill + decode."""
    import numpy  # noqa: F401  (imported before the measurement starts, as onnxruntime below)
    import onnxruntime  # noqa: F401

    from worker.lm.layout import LMLayout
    from worker.lm.session import LMSession
    from worker.ort_guard import RunGuard

    layout = LMLayout.from_meta(args["layout"]) if args.get("layout") else None
    with RunGuard(what=f"the model {Path(args['path']).name}") as guard, peak_rss(interval_s=0.001) as mem:
        sess = LMSession(Path(args["path"]), threads=int(args["threads"]), layout=layout, guard=guard)
        sess.time_decode(int(args["prompt_tokens"]), max(1, int(args["new_tokens"])), 1)
    return int(mem["peak_bytes"])


@contextmanager
def peak_rss(interval_s: float = 0.005) -> Iterator[dict[str, int]]:
    """Sample this process's RSS while the block runs; ``out["peak_bytes"]`` = peak minus the RSS at entry."""
    import psutil

    proc = psutil.Process(os.getpid())
    start = proc.memory_info().rss
    out = {"start_bytes": start, "peak_bytes": 0}
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        out["peak_bytes"] = peak[0] - start


def _main() -> None:
    from worker.core import StepFailed

    try:
        print(json.dumps({"peak_bytes": _probe(json.loads(sys.argv[1]))}), flush=True)
    except StepFailed as failed:  # past the run cap: the parent names it
        print(json.dumps({"error": failed.code, "message": failed.message}), flush=True)
        sys.exit(3)


if __name__ == "__main__":
    _main()
