"""Every ``modelpress`` command line in README.md's shell blocks, run as written (ids printed by the commands before
it put in for ``mdl_…``/``ds_…``/``job_…``) against a live service (API + worker, embedded defaults) on a fresh
MODELPRESS_HOME, in a folder holding what the README's commands name: ``model.zip`` (today's
``torch.onnx.export`` output, ``model.onnx`` + ``model.onnx.data``), a one-file ``model.onnx``, ``train.npz``,
``eval.npz`` and the README's ``spec.yaml``. A README command with neither a check here nor an exclusion that
says why fails ``test_every_readme_command_is_checked_or_excluded``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.e2e.harness import LiveService, live_service, service_env
from tests.factories_onnx import INPUT, archive_of
from tests.factories_train import digits, export_digits_onnx, fit

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).with_name("modelpress")

# README commands a test cannot run as written, and why. Everything else in a shell block is run below.
EXCLUDED = {
    "modelpress serve --host 0.0.0.0 --no-worker":
        "serves until stopped; the live service here is started the same way (tests/e2e/harness.py), and "
        "tests/e2e/test_serve.py runs `modelpress serve` itself",
    "modelpress worker --queues gpu,cpu --concurrency 1":
        "runs until stopped; the live service here starts one (tests/e2e/harness.py)",
}


def readme_commands() -> list[str]:
    """The ``modelpress ...`` command lines of README.md's ``sh`` blocks, in order, comments cut
    (``KEY=$(modelpress keys create ...)`` gives ``modelpress keys create ...``)."""
    found: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            inner = re.fullmatch(r"\w+=\$\((modelpress .*)\)", line)
            command = inner.group(1) if inner else line
            if command.startswith("modelpress "):
                found.append(command)
    return found


@dataclass
class Walk:
    """The folder the README's commands run in, the service, and the ids they printed."""

    svc: LiveService
    cwd: Path
    ids: dict[str, str] = field(default_factory=dict)  # "mdl", "train", "eval", "job"

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """``command`` as a user types it (ids put in), on the service's home and URL."""
        args = shlex.split(command.replace("job_…", self.ids.get("job", "job_…")))
        cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
        env = {**self.svc.env, "MODELPRESS_URL": self.svc.url, "COLUMNS": "200",
               "PYTHONPATH": str(ROOT)}
        return subprocess.run([*cmd, *args[1:]], cwd=self.cwd, capture_output=True, text=True, env=env,
                              timeout=240)

    def write_spec(self) -> None:
        """README's spec.yaml with the ids printed above put in (``model: mdl_…``, ``{train: ds_…, eval: ds_…}``)."""
        if not {"mdl", "train", "eval"} <= set(self.ids):
            return  # not all printed yet
        text = re.search(r"```yaml\n# spec.yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
        assert text is not None, "README lost its spec.yaml block"
        spec = text.group(1).replace("mdl_…", self.ids["mdl"])
        spec = spec.replace("train: ds_…", f"train: {self.ids['train']}").replace("eval: ds_…", f"eval: {self.ids['eval']}")
        assert "…" not in spec.split("#")[0], spec
        (self.cwd / "spec.yaml").write_text(spec)


def _ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, (p.args, p.returncode, p.stdout, p.stderr)
    return p.stdout


def _upload_model(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    printed = _ok(p).split()
    assert re.fullmatch(r"mdl_\w+", printed[0]) and printed[1] in ("model.zip", "model.onnx"), p.stdout  # mdl_…
    w.ids["mdl"] = printed[0]
    w.write_spec()


def _upload_dataset(role: str) -> Callable[[Walk, subprocess.CompletedProcess[str]], None]:
    def check(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
        printed = _ok(p).split()
        assert re.fullmatch(r"ds_\w+", printed[0]) and printed[1] == f"{role}.npz", p.stdout
        w.ids[role] = printed[0]
        w.write_spec()
    return check


def _submit_wait(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    out = _ok(p)
    job = re.search(r"submitted (job_\w+)", p.stderr)
    assert job is not None, p.stderr
    w.ids["job"] = job.group(1)
    with httpx.Client(base_url=w.svc.url, timeout=30) as client:
        body = client.get(f"/v1/jobs/{w.ids['job']}").json()
    assert body["status"] == "succeeded" and body["name"] == "digits-small", body
    report = body["result"]["report"]
    assert [s["type"] for s in report["steps"]] == ["prune", "distill", "quantize"]
    assert report["output"]["size_bytes"] < report["input"]["size_bytes"] and "smaller" in out, out


def _logs(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    out = _ok(p)
    assert re.search(r"distilling epoch 3/3  loss=\d", out), out  # "events, with loss and eval metric per epoch"
    assert "succeeded" in out


def _download(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    _ok(p)
    out = w.cwd / "out"
    report = json.loads((out / "report.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(w.cwd / "eval.npz")[INPUT][:4]
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (4, 10)
    assert report["steps"][-1]["type"] == "quantize"
    for stale in out.iterdir():
        stale.unlink()  # the next command writes out/ afresh


def _gc(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    assert re.search(r"\d", _ok(p) + p.stderr), (p.stdout, p.stderr)  # prints what it freed


def _optimize(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    _ok(p)
    assert "quantize int8 -> static" in p.stderr, p.stderr  # a convolution model with calibration data
    assert (w.cwd / "out" / "model.onnx").is_file()


def _keys_create(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    key = _ok(p).strip()
    assert re.fullmatch(r"mp_[\w-]+", key) and p.stdout == key + "\n", p.stdout  # alone: KEY=$(...)
    with httpx.Client(base_url=w.svc.url, timeout=30) as client:
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def _optimize_auto(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    # A net this small runs in microseconds: no recipe may halve its latency, so the search can end without a
    # winner. Either way the trials stream, and a miss exits 1 saying what was needed (never 2 or 3).
    assert re.search(r"^trial 0: ", p.stdout, re.M), (p.returncode, p.stdout, p.stderr)
    if p.returncode == 0:
        assert (w.cwd / "out" / "model.onnx").is_file()
    else:
        assert p.returncode == 1 and "needed below" in p.stderr and "stays downloadable" in p.stderr, p.stderr


def _migrate(w: Walk, p: subprocess.CompletedProcess[str]) -> None:
    _ok(p)  # the service's database is current: migrating again is a no-op that exits 0


CHECKS: dict[str, Callable[[Walk, subprocess.CompletedProcess[str]], None]] = {
    "modelpress models upload model.zip": _upload_model,
    "modelpress models upload model.onnx": _upload_model,
    "modelpress datasets upload train.npz": _upload_dataset("train"),
    "modelpress datasets upload eval.npz": _upload_dataset("eval"),
    "modelpress jobs submit spec.yaml --wait": _submit_wait,
    "modelpress jobs logs job_…": _logs,
    "modelpress jobs logs job_… --follow": _logs,
    "modelpress download job_… out/": _download,
    "modelpress gc": _gc,
    "modelpress optimize model.onnx --data train.npz --eval eval.npz --prune 0.5 --quantize int8 --out out/": _optimize,
    "modelpress keys create --owner alice --scope write --name laptop": _keys_create,
    "modelpress optimize model.onnx --eval eval.npz --auto --max-accuracy-drop 0.01 --objective latency --out out/":
        _optimize_auto,
    "modelpress migrate": _migrate,
}


def test_every_readme_command_is_checked_or_excluded() -> None:
    commands = readme_commands()
    assert len(commands) >= 15, commands
    unknown = [c for c in commands if c not in CHECKS and c not in EXCLUDED]
    assert not unknown, f"README commands with no test here (add a check to CHECKS, or an EXCLUDED reason): {unknown}"
    stale = [c for c in [*CHECKS, *EXCLUDED] if c not in commands]
    assert not stale, f"checks of commands the README no longer has: {stale}"


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    """A fresh home with the API and a worker on the embedded defaults, and the files the README names."""
    import torch
    from torch import nn

    home, cwd = tmp_path_factory.mktemp("readme-home"), tmp_path_factory.mktemp("readme-cwd")
    train, evald = digits()
    torch.manual_seed(0)
    net = fit(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10)), train, epochs=4)  # ~92 %, seconds
    export_digits_onnx(net, cwd / "model.onnx")  # one file, for `models upload model.onnx`
    (cwd / "export").mkdir()  # what today's torch.onnx.export writes: model.onnx + model.onnx.data, zipped
    onnx.save(onnx.load(str(cwd / "model.onnx")), str(cwd / "export" / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=64)
    archive_of(cwd / "export" / "model.onnx", cwd / "model.zip")
    np.savez(cwd / "train.npz", input=train.inputs[INPUT][:600], labels=train.labels[:600])
    np.savez(cwd / "eval.npz", input=evald.inputs[INPUT], labels=evald.labels)
    with live_service(home, service_env(home, f"readme-{os.getpid()}")) as svc:
        yield Walk(svc, cwd)


def test_readme_commands_run_in_order_on_a_fresh_home(walk: Walk) -> None:
    for command in readme_commands():
        if command in EXCLUDED:
            continue
        CHECKS[command](walk, walk.run(command))
