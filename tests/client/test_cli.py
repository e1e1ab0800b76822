"""The ``modelpress`` command against a real API server: exit codes, --json, optimize --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.report_view import comparison_rows, quality_rows
from models.spec import JobSpec
from tests.api.report_samples import sample_report
from tests.client.conftest import insert_job, job_with_artifact, tiny_npz, tiny_onnx
from tests.e2e.harness import LiveService, free_port

BIN = Path(sys.executable).with_name("modelpress")


def mp(*args: str, url: str | None = None, check: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (``python -m client.cli`` when the script is missing)."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
    if url:
        cmd += ["--url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env["COLUMNS"] = "200"
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-assets")
    return {"model": tiny_onnx(d / "tiny.onnx"), "data": tiny_npz(d / "tiny.npz"), "dir": d}


def test_optimize_dry_run_prints_a_valid_spec_without_a_server(files: dict[str, Path]) -> None:
    out = mp("--url", f"http://127.0.0.1:{free_port()}", "optimize", str(files["model"]),
             "--data", f"{files['data']},eval.npz", "--prune", "0.5", "--quantize", "int8-static",
             "--task", "image-classification", "--epochs", "2", "--out", "x", "--dry-run", check=0)
    spec = JobSpec.model_validate(json.loads(out.stdout))
    assert [s.type for s in spec.steps] == ["prune", "distill", "quantize"]  # recovery added after prune
    assert spec.steps[0].ratio == 0.5 and spec.steps[1].epochs == 2 and spec.steps[2].mode == "static"
    assert spec.model == f"<upload:{files['model']}>"
    assert spec.data.train == f"<upload:{files['data']}>" and spec.data.eval == "<upload:eval.npz>"
    no_recover = json.loads(mp("optimize", "m.onnx", "--data", "t.npz", "--prune", "0.3", "--no-recover",
                               "--out", "x", "--dry-run", check=0).stdout)
    assert [s["type"] for s in no_recover["steps"]] == ["prune"]
    bad = mp("optimize", "m.onnx", "--distill", "--out", "x", "--dry-run", check=2)
    assert "steps.0" in bad.stderr and "data.train" in bad.stderr
    assert mp("optimize", "m.onnx", "--out", "x", "--dry-run", check=2).stderr.startswith("error: nothing to do")
    assert mp("optimize", "m.onnx", "--quantize", "int3", "--out", "x", check=2).returncode == 2  # argparse


def test_connection_errors_exit_3() -> None:
    out = mp("jobs", "list", url=f"http://127.0.0.1:{free_port()}", check=3)
    assert "cannot reach" in out.stderr


def test_upload_list_show_and_json(api_service: LiveService, files: dict[str, Path]) -> None:
    up = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    assert up["format"] == "onnx" and up["id"].startswith("mdl_")
    ds = json.loads(mp("datasets", "upload", str(files["data"]), "--json", url=api_service.url, check=0).stdout)
    assert ds["format"] == "npz"
    models = json.loads(mp("models", "list", "--json", url=api_service.url, check=0).stdout)
    assert up["id"] in [m["id"] for m in models]
    assert up["id"] in mp("models", "list", url=api_service.url, check=0).stdout
    spec = files["dir"] / "spec.yaml"
    spec.write_text(f"model: {up['id']}\ndata: {{eval: {ds['id']}}}\nsteps:\n  - type: quantize\n")
    job_id = mp("jobs", "submit", str(spec), url=api_service.url, check=0).stdout.strip()
    shown = json.loads(mp("jobs", "show", job_id, "--json", url=api_service.url, check=0).stdout)
    assert shown["id"] == job_id and shown["status"] == "queued"
    listed = json.loads(mp("jobs", "list", "--json", "--status", "queued", url=api_service.url, check=0).stdout)
    assert job_id in [j["id"] for j in listed]
    assert "queued" in mp("jobs", "show", job_id, url=api_service.url, check=0).stdout
    cancelled = json.loads(mp("jobs", "cancel", job_id, "--json", url=api_service.url, check=0).stdout)
    assert cancelled["status"] in ("cancelled", "cancelling")


def test_validation_and_not_found_exit_2_with_detail_and_field(api_service: LiveService, files: dict[str, Path]) -> None:
    out = mp("jobs", "show", "job_missing", url=api_service.url, check=2)
    assert "404" in out.stderr and "not_found" in out.stderr
    spec = files["dir"] / "bad.json"
    spec.write_text(json.dumps({"model": "mdl_unknown", "steps": [{"type": "quantize"}]}))
    out = mp("jobs", "submit", str(spec), url=api_service.url, check=2)
    assert "422" in out.stderr and "field model" in out.stderr


def test_failed_job_exits_1_with_code_and_step(api_service: LiveService, files: dict[str, Path]) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    job_id = insert_job(api_service, model["id"], status="failed", phase="failed",
                        error={"code": "step_failed", "message": "prune found no prunable layer", "step": "prune"})
    out = mp("jobs", "wait", job_id, url=api_service.url, check=1)
    assert "step_failed" in out.stderr and "prune found no prunable layer" in out.stderr and "step prune" in out.stderr


def test_download_of_a_failed_job_exits_1_with_its_error_and_makes_no_folder(
    api_service: LiveService, files: dict[str, Path], tmp_path: Path
) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    error = {"code": "step_failed", "message": "RuntimeError: boom", "step": "steps[0] prune"}
    job_id = insert_job(api_service, model["id"], status="failed", phase="failed", error=error,
                        progress={"step": 2, "steps": 5, "percent": 20.0})
    out = mp("download", job_id, str(tmp_path / "out"), url=api_service.url, check=1)
    assert "step_failed" in out.stderr and "RuntimeError: boom" in out.stderr and "steps[0] prune" in out.stderr
    assert not (tmp_path / "out").exists()
    running = insert_job(api_service, model["id"], status="running", phase="training")
    out = mp("download", running, str(tmp_path / "later"), url=api_service.url, check=1)
    assert "nothing to download yet" in out.stderr and not (tmp_path / "later").exists()
    # one numbering: the failed job's progress names the step its error names, never 'step 2/5'
    shown = mp("jobs", "show", job_id, url=api_service.url, check=0).stdout
    assert "progress: failed in steps[0] prune" in shown and "2/5" not in shown


def test_jobs_list_never_cuts_an_id_at_80_columns(api_service: LiveService, files: dict[str, Path]) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    job_id = insert_job(api_service, model["id"], status="failed", phase="export + evaluate output", name="x" * 40,
                        error={"code": "step_failed", "message": "m", "step": "steps[2] quantize"})
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}, "COLUMNS": "80"}
    for args in (["jobs", "list"], ["models", "list"]):
        proc = subprocess.run([*cmd, "--url", api_service.url, *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert max(len(line) for line in proc.stdout.splitlines()) <= 80
        assert (job_id if args[0] == "jobs" else model["id"]) in proc.stdout  # whole, on one line
        assert "\u2026" not in proc.stdout


def test_download_exits_1_on_a_tampered_artifact(api_service: LiveService, files: dict[str, Path], tmp_path: Path) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    job_id, blob = job_with_artifact(api_service, model["id"], os.urandom(200_000))
    out = mp("download", job_id, str(tmp_path / "ok"), "--json", url=api_service.url, check=0)
    assert [Path(p).name for p in json.loads(out.stdout)] == ["model.onnx"]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    out = mp("download", job_id, str(tmp_path / "bad"), url=api_service.url, check=1)
    assert "sha256 mismatch" in out.stderr
    assert not (tmp_path / "bad" / "model.onnx").exists()


def test_show_and_wait_print_the_report_rows_the_html_report_shows(
    api_service: LiveService, files: dict[str, Path]
) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    report = sample_report()
    job_id = insert_job(api_service, model["id"], status="succeeded", phase="done", result={"report": report})
    for command in ("show", "wait"):
        lines = mp("jobs", command, job_id, url=api_service.url, check=0).stdout.splitlines()
        assert any("before / after" in line for line in lines)
        for row in comparison_rows(report):
            line = next(line for line in lines if row.label in line)
            assert all(text in line for text in (row.before_text, row.after_text, row.change_text)), line
        for q in quality_rows(report):
            assert q.value_text in next(line for line in lines if q.label in line)


def test_wait_and_show_print_a_red_slower_warning_and_a_missed_budget_table(
    api_service: LiveService, files: dict[str, Path]
) -> None:
    from models.report_view import regressions

    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    report = sample_report()
    report["input"]["latency_ms"], report["output"]["latency_ms"] = {"median": 0.27}, {"median": 0.864}
    report["gains"]["latency_ratio"] = 0.27 / 0.864
    warnings = regressions(report["input"], report["output"])
    error = {"code": "accuracy_budget_exceeded", "step": "evaluate",
             "message": "accuracy \u22121.01 points, 4 of 397 samples (allowed \u22121.00)"}
    job_id = insert_job(api_service, model["id"], status="failed", phase="failed", error=error,
                        progress={"step": 5, "steps": 5, "percent": 80.0},
                        result={"report": report, "warnings": warnings})
    waited = mp("jobs", "wait", job_id, url=api_service.url, check=1)
    assert "warning: 3.2\u00d7 slower than the input model (0.27 \u2192 0.864 ms median)" in waited.stdout
    assert "before / after" in waited.stdout and "accuracy budget" in waited.stdout
    assert "accuracy_budget_exceeded" in waited.stderr and "4 of 397 samples" in waited.stderr
    shown = mp("jobs", "show", job_id, url=api_service.url, check=0).stdout
    assert "progress: failed in evaluate" in shown and "80%" not in shown  # the error's own step, one numbering
    assert "3.2\u00d7 slower" in shown
    listed = next(line for line in mp("jobs", "list", url=api_service.url, check=0).stdout.splitlines() if job_id in line)
    assert "failed in evaluate" in listed and "80%" not in listed
    as_json = json.loads(mp("jobs", "show", job_id, "--json", url=api_service.url, check=0).stdout)
    assert as_json["result"]["warnings"][0]["code"] == "slower_than_input"


def test_int8_picks_static_for_a_calibrated_conv_graph_and_dynamic_for_matmul() -> None:
    from client.recipes import build_optimize_spec, int8_step

    step, why = int8_step({"op_types": {"Conv": 12, "Relu": 12, "Gemm": 1}}, calibrated=True)
    assert step["mode"] == "static" and why == "static INT8 (QDQ): the graph has 12 Conv nodes and calibration data was given"
    step, why = int8_step({"op_types": {"Conv": 12, "Gemm": 1}}, calibrated=False)
    assert step["mode"] == "dynamic" and "no calibration data" in why
    step, why = int8_step({"op_types": {"MatMul": 96, "Softmax": 12}}, calibrated=True)
    assert step["mode"] == "dynamic" and why == "dynamic INT8: the graph is MatMul-heavy (0 Conv and 96 MatMul/Gemm nodes)"
    notes: list[str] = []
    spec = build_optimize_spec("mdl_x", "ds_t", None, None, prune=0.5, quantize="int8",
                               model_meta={"op_types": {"Conv": 4}}, notes=notes)
    assert [s["type"] for s in spec["steps"]] == ["prune", "distill", "quantize"]
    assert spec["steps"][-1]["mode"] == "static" and notes == [
        "static INT8 (QDQ): the graph has 4 Conv nodes and calibration data was given"]


def test_int8_never_calibrates_on_the_eval_set_it_measures_on() -> None:
    from client.recipes import build_optimize_spec

    notes: list[str] = []
    spec = build_optimize_spec("mdl_x", None, "ds_e", None, quantize="int8", model_meta={"op_types": {"Conv": 4}},
                               notes=notes)
    assert spec["steps"] == [{"type": "quantize", "mode": "dynamic"}] and spec["data"] == {"eval": "ds_e"}
    assert "only data given is the eval set" in notes[0] and "--calibration" in notes[0]
    with pytest.raises(ValueError, match="apart from the eval set"):
        build_optimize_spec("mdl_x", None, "ds_e", None, quantize="int8-static")
    calibrated = build_optimize_spec("mdl_x", None, "ds_e", "ds_c", quantize="int8", model_meta={"op_types": {"Conv": 4}})
    assert calibrated["steps"][-1]["mode"] == "static" and calibrated["data"]["calibration"] == "ds_c"


def test_optimize_on_a_causal_lm_fine_tunes_with_lora_and_quantizes_to_int4() -> None:
    from client import Client
    from client.recipes import build_optimize_spec

    spec = build_optimize_spec("mdl_x", "ds_t", "ds_e", None, finetune=True, quantize="int4",
                               max_perplexity_increase=0.05, model_meta={"task": "text-generation"})
    validated = Client.build_spec(spec)
    assert validated.task == "text-generation" and validated.evaluate.max_perplexity_increase == 0.05
    assert [(s.type, getattr(s, "mode", None)) for s in validated.steps] == [("finetune", "lora"), ("quantize", "int4")]
    plain = build_optimize_spec("mdl_x", "ds_t", None, None, finetune=True, model_meta={"task": "text-classification"})
    assert plain["steps"] == [{"type": "finetune"}] and "task" not in plain


def test_optimize_int8_says_which_mode_it_picked_from_the_uploaded_record(
    api_service: LiveService, files: dict[str, Path]
) -> None:
    record = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    assert record["meta"]["op_types"] == {"Add": 1, "MatMul": 1}
    out = mp("optimize", str(files["model"]), "--data", str(files["data"]), "--quantize", "int8",
             "--task", "generic", "--out", str(files["dir"] / "o"), "--timeout", "0.5", url=api_service.url)
    assert "quantize int8 -> dynamic INT8: the graph is MatMul-heavy (0 Conv and 1 MatMul/Gemm nodes)" in out.stderr, out


@pytest.mark.e2e
def test_optimize_end_to_end(live_worker_service: LiveService, files: dict[str, Path], tmp_path: Path) -> None:
    out = mp("optimize", str(files["model"]), "--data", str(files["data"]), "--quantize", "int8",
             "--out", str(tmp_path / "out"), url=live_worker_service.url, check=0)
    assert any(p.suffix == ".onnx" for p in (tmp_path / "out").iterdir())
    assert "before" in out.stdout and "size" in out.stdout
    assert "quantize int8 -> dynamic INT8: the graph is MatMul-heavy" in out.stderr
    job_id = json.loads(mp("jobs", "list", "--json", url=live_worker_service.url, check=0).stdout)[0]["id"]
    logs = mp("jobs", "logs", job_id, "--follow", "--json", url=live_worker_service.url, check=0)
    assert [json.loads(line)["job_id"] for line in logs.stdout.splitlines()] and job_id in logs.stdout


def test_report_table_shows_the_lm_rows_and_the_generations() -> None:
    from rich.console import Console

    from client.render import generations_table, report_table
    from tests.api.report_samples import lm_report

    report = lm_report()
    console = Console(record=True, width=200, color_system=None)
    console.print(report_table(report))
    table = generations_table(report)
    assert table is not None
    console.print(table)
    lines = console.export_text().splitlines()

    def line_of(label: str) -> str:
        return next(line for line in lines if label in line)

    assert all(t in line_of("perplexity (eval text)") for t in ("12.41", "12.97", "+4.51 %"))
    assert all(t in line_of("decode tokens/s") for t in ("9.8", "27.3", "2.79\u00d7 faster"))
    assert all(t in line_of("prefill 128 tokens median (ms)") for t in ("412", "201", "2.05\u00d7 faster"))
    assert all(t in line_of("session peak memory") for t in ("3.26 GB", "1.12 GB", "2.92\u00d7 less"))
    assert "0.9137" in line_of("next-token top-1 agreement") and "0.0412" in line_of("mean KL")
    assert "met" in line_of("budget (max perplexity +5.00%)")
    row = line_of("This License applies to")
    assert row.index("any program or other work") < row.index("any work or program")


def test_a_reupload_says_it_was_deduplicated(api_service: LiveService, files: dict[str, Path]) -> None:
    from client import Client

    first = json.loads(mp("models", "upload", str(files["model"]), "--name", "first", "--json",
                          url=api_service.url, check=0).stdout)
    again = mp("models", "upload", str(files["model"]), "--name", "second", url=api_service.url, check=0).stdout
    assert f"deduplicated: the server already holds these bytes as {first['id']}" in again
    with Client(api_service.url) as c:  # the server itself says so too, when the SDK does not look first
        record = c.upload_model(files["model"], name="third", skip_existing=False)
    assert record.id == first["id"] and record.deduplicated is True and record.name == first["name"]


def test_jobs_get_a_name_and_metadata_and_list_filters_on_them(
    api_service: LiveService, files: dict[str, Path]
) -> None:
    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    spec = files["dir"] / "named.yaml"
    spec.write_text(f"model: {model['id']}\nname: from-file\nmetadata: {{team: vision}}\n"
                    "steps:\n  - type: quantize\n")
    named = mp("jobs", "submit", str(spec), "--name", "nightly", "--meta", "run=7", url=api_service.url,
               check=0).stdout.strip()
    plain = mp("jobs", "submit", str(spec), url=api_service.url, check=0).stdout.strip()
    shown = json.loads(mp("jobs", "show", named, "--json", url=api_service.url, check=0).stdout)
    assert shown["name"] == "nightly" and shown["metadata"] == {"team": "vision", "run": "7"}
    assert "name: nightly  run=7  team=vision" in mp("jobs", "show", named, url=api_service.url, check=0).stdout
    by_meta = json.loads(mp("jobs", "list", "--meta", "run=7", "--meta", "team=vision", "--json",
                            url=api_service.url, check=0).stdout)
    assert [j["id"] for j in by_meta] == [named]
    by_name = json.loads(mp("jobs", "list", "--name", "from-file", "--json", url=api_service.url, check=0).stdout)
    assert [j["id"] for j in by_name] == [plain]
    assert "expected key=value" in mp("jobs", "list", "--meta", "run", url=api_service.url, check=2).stderr


def test_logs_print_the_metric_values_of_the_events(api_service: LiveService, files: dict[str, Path]) -> None:
    from models.tables import JobEvent
    from tests.client.conftest import service_db
    from worker.context import metrics_message

    model = json.loads(mp("models", "upload", str(files["model"]), "--json", url=api_service.url, check=0).stdout)
    job_id = insert_job(api_service, model["id"], status="succeeded")
    with service_db(api_service) as s:
        s.add(JobEvent(job_id=job_id, kind="progress", data={"metrics": {"loss": 0.41234, "accuracy": 0.9}},
                       message=metrics_message("finetune epoch 2/3", {"loss": 0.41234, "accuracy": 0.9})))
        s.add(JobEvent(job_id=job_id, kind="log", message="finetune: early stop", data={"best_epoch": 2}))
    out = mp("jobs", "logs", job_id, url=api_service.url, check=0).stdout
    assert "finetune epoch 2/3  loss=0.4123 accuracy=0.9" in out
    assert "finetune: early stop  best_epoch=2" in out


def test_optimize_takes_the_latency_settings(files: dict[str, Path]) -> None:
    out = mp("--url", f"http://127.0.0.1:{free_port()}", "optimize", str(files["model"]), "--quantize", "fp16",
             "--threads", "4", "--batch-size", "8", "--provider", "CPUExecutionProvider", "--out", "x",
             "--dry-run", check=0)
    latency = JobSpec.model_validate(json.loads(out.stdout)).evaluate.latency
    assert (latency.threads, latency.batch_size, latency.provider) == (4, 8, "CPUExecutionProvider")
    bad = mp("optimize", "m.onnx", "--quantize", "fp16", "--provider", "NoSuchProvider", "--out", "x",
             "--dry-run", check=2)
    assert "evaluate.latency.provider" in bad.stderr
