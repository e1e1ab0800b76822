"""A static INT8 job given only eval data, through the API and a real worker (embedded defaults): the service
calibrates on rows carved from the eval set and measures accuracy on the others, and says so in the events
and the report; an eval set too small to split is refused at submit, naming the field to give."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.client.conftest import tiny_npz, tiny_onnx
from tests.e2e.harness import LiveService
from tests.e2e.test_new_user import mp

pytestmark = pytest.mark.e2e


def _upload(client: httpx.Client, kind: str, path: Path, fmt: str) -> str:
    r = client.put(f"/v1/{kind}", params={"name": path.stem, "format": fmt}, content=path.read_bytes())
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _spec(model: str, eval_id: str) -> dict:
    return {"model": model, "task": "image-classification", "data": {"eval": eval_id},
            "steps": [{"type": "quantize", "mode": "static"}],
            "evaluate": {"latency": {"runs": 3, "warmup": 1, "threads": 1}}}


def test_static_int8_with_eval_only_calibrates_on_carved_rows(embedded: LiveService, tmp_path: Path) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        model = _upload(client, "models", tiny_onnx(tmp_path / "tiny.onnx"), "onnx")
        eval_id = _upload(client, "datasets", tiny_npz(tmp_path / "eval.npz", n=120), "npz")
        r = client.post("/v1/jobs", json=_spec(model, eval_id))
        assert r.status_code == 202, r.text
        job = embedded.wait_job(client, r.json()["id"])
        assert job["status"] == "succeeded", job
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 200}).json()["data"]
        page = client.get(f"/v1/jobs/{job['id']}/report.html")

    report = job["result"]["report"]
    # 120 eval rows: a quarter (30) calibrate, the other 90 measure, both sides of the report alike.
    split = report["calibration_split"]
    assert (split["calibration_rows"], split["eval_rows"], split["dataset"]) == (30, 90, eval_id)
    assert report["input"]["num_samples"] == report["output"]["num_samples"] == 90
    assert report["steps"][0]["metrics"]["calibration"]["samples"] == 30
    said = [e["message"] for e in events if "carved from eval" in e["message"]]
    assert len(said) == 1 and said[0].startswith(f"calibrated on 30 rows carved from eval ({eval_id}); "
                                                 "accuracy measured on the other 90"), said
    shown = mp(embedded.url, "jobs", "show", job["id"])  # the CLI says it beside the before/after table
    assert f"note: calibrated on 30 rows carved from eval ({eval_id})" in shown, shown
    assert page.status_code == 200  # and the report page, in its notes
    notes = page.text.split('<section id="notes">', 1)[1].split("</section>", 1)[0]
    assert f"calibrated on 30 rows carved from eval ({eval_id})" in notes


def test_an_eval_set_too_small_to_split_is_refused_naming_the_field(embedded: LiveService, tmp_path: Path) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        model = _upload(client, "models", tiny_onnx(tmp_path / "tiny.onnx"), "onnx")
        small = _upload(client, "datasets", tiny_npz(tmp_path / "small.npz", n=20, seed=5), "npz")
        r = client.post("/v1/jobs", json=_spec(model, small))
        listed = client.get("/v1/jobs").json()["data"]
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "data.calibration"
    assert "steps.0.mode needs calibration rows" in error["message"] and "data.eval has 20 rows" in error["message"]
    assert all(j["spec"]["data"].get("eval") != small for j in listed)  # nothing was queued
