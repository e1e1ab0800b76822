"""bench.gpu_check runs on a machine without CUDA too: every CUDA item is skipped saying so, the device
detection passes (no GPU on both sides), and the exit status is 0; an item that fails makes it 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from tests.e2e.harness import ROOT

CUDA_ITEMS = ("ort_cuda", "lora_bf16", "qlora", "int4_stream_cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs its GPU items")
def test_without_cuda_every_cuda_item_is_skipped_and_the_run_passes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MODELPRESS_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON "))
    rows = {r["name"]: r for r in json.loads(line.removeprefix("BENCH_JSON "))["rows"]}
    assert list(rows) == list(gpu_check.CHECKS)
    assert {n: (rows[n]["status"], rows[n]["detail"]) for n in CUDA_ITEMS} == {
        n: ("skipped", "no CUDA") for n in CUDA_ITEMS}
    assert rows["detect"]["status"] == "pass" and rows["detect"]["detail"].startswith("0 GPU(s)")
    table = {x.split()[0]: x for x in done.stdout.splitlines() if x.split() and x.split()[0] in rows}
    assert all(table[n].split(None, 1)[1] == "skipped: no CUDA" for n in CUDA_ITEMS), table


def test_a_failing_item_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: object) -> str:
        raise AssertionError("logits differ")

    monkeypatch.setitem(gpu_check.CHECKS, "detect", broken)
    figures = gpu_check.main(["--only", "detect"])
    assert figures["failed"] == ["detect"]
    assert "detect             fail" in capsys.readouterr().out
