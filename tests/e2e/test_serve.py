"""`modelpress serve` on the embedded defaults: one command runs API + worker, and SIGTERM stops both."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import RUN_ID
from tests.e2e.harness import ROOT, free_port, service_env
from tests.factories import digits_split, train_digits_mlp_onnx, write_npz

pytestmark = pytest.mark.e2e


def test_serve_runs_a_job_on_embedded_defaults_and_stops_its_worker(tmp_path: Path) -> None:
    model = tmp_path / "mlp.onnx"
    train_digits_mlp_onnx(model)
    _, (x_ev, y_ev) = digits_split()
    import onnx

    write_npz(tmp_path / "eval.npz", x_ev, y_ev, onnx.load(str(model)).graph.input[0].name)
    port = free_port()
    env = service_env(tmp_path / "home", RUN_ID)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from client.cli import main; main()", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=30) as client:
            mdl = client.put("/v1/models", params={"format": "onnx"}, content=model.read_bytes()).json()
            ds = client.put("/v1/datasets", params={"format": "npz"},
                            content=(tmp_path / "eval.npz").read_bytes()).json()
            job = client.post("/v1/jobs", json={"model": mdl["id"], "data": {"eval": ds["id"]},
                                                "steps": [{"type": "quantize", "mode": "dynamic"}],
                                                "evaluate": {"latency": {"runs": 3, "warmup": 1}}}).json()
            deadline = time.monotonic() + 120
            while (status := (body := client.get(f"/v1/jobs/{job['id']}").json())["status"]) not in (
                "succeeded", "failed"
            ):
                if time.monotonic() >= deadline:
                    lines = (tmp_path / "serve.log").read_text().splitlines()
                    worker_lines = [line for line in lines if "GET /v1/jobs" not in line]
                    pytest.fail(f"job still {status} ({body.get('phase')!r}): " + "\n".join(worker_lines[-80:]))
                time.sleep(0.3)
            assert status == "succeeded"
        assert (tmp_path / "home" / "modelpress.db").exists() and (tmp_path / "home" / "broker.db").exists()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "serve started no worker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"worker processes outlived serve: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_a_sigkilled_serve_takes_its_worker_with_it(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path / "home", RUN_ID)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from client.cli import main; main()", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(children) < 2:  # the worker and its pool process
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
            children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, (tmp_path / "serve.log").read_text()
        proc.kill()  # SIGKILL: no finally, no handler runs in serve
        proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"worker processes outlived a killed serve: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:  # orphans (re-parented to PID 1) of a failed run of this test
            if child.is_running():
                child.kill()
        log.close()
