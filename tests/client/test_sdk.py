"""``client.sdk.Client`` against a real API server (uvicorn subprocess, PostgreSQL, Redis); no mocked HTTP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from client import APIValidationError, Client, ResourceNotFound, infer_dataset_format, infer_model_format
from tests.e2e.harness import LiveService


class RecordingTransport(httpx.HTTPTransport):
    """The default transport, remembering every request it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return super().handle_request(request)


def test_upload_is_streamed_with_progress_and_deduplicated(api_service: LiveService, assets: dict[str, Path]) -> None:
    size = assets["model"].stat().st_size
    seen: list[tuple[int, int]] = []
    with Client(api_service.url) as mp:
        first = mp.upload_model(assets["model"], name="tiny", on_progress=lambda a, b: seen.append((a, b)))
        again = mp.upload_model(assets["model"], name="tiny-again")
        assert first.format == "onnx" and first.size_bytes == size
        assert again.id == first.id and again.sha256 == first.sha256
        assert seen[-1] == (size, size)
        assert first.id in [m.id for m in mp.models()]
        ds = mp.upload_dataset(assets["data"])
        assert ds.format == "npz" and ds.num_samples == 64
        assert ds.id in [d.id for d in mp.datasets()]


def test_an_upload_the_server_already_has_sends_no_bytes(api_service: LiveService, assets: dict[str, Path]) -> None:
    size = assets["data"].stat().st_size
    recorder = RecordingTransport()
    with Client(api_service.url, transport=recorder) as mp:
        first = mp.upload_dataset(assets["data"], name="present")
        recorder.sent.clear()
        seen: list[tuple[int, int]] = []
        again = mp.upload_dataset(assets["data"], on_progress=lambda a, b: seen.append((a, b)))
        assert again.id == first.id and seen == [(size, size)]
        assert [(r.method, r.url.params.get("sha256")) for r in recorder.sent] == [("GET", first.sha256)]
        forced = mp.upload_dataset(assets["data"], skip_existing=False)
        assert forced.id == first.id and recorder.sent[-1].method == "PUT"
        with pytest.raises(FileNotFoundError):
            mp.upload_model(assets["data"].with_name("missing.onnx"))


def test_formats_are_inferred_from_file_names() -> None:
    assert [infer_model_format(n) for n in ("m.onnx", "m.zip", "M.TAR.GZ", "m.tgz")] == ["onnx", "hf", "hf", "hf"]
    assert [infer_dataset_format(n) for n in ("d.npz", "d.jsonl", "d.csv", "d.zip")] == [
        "npz", "text", "text", "imagefolder"]
    with pytest.raises(ValueError, match="pass format="):
        infer_model_format("weights.safetensors")
    for pickle in ("weights.bin", "model.pt", "model.pth", "last.ckpt"):  # refused before a byte is sent
        with pytest.raises(ValueError, match=r"PyTorch pickles \(torch.save\) are refused.*torch.onnx.export"):
            infer_model_format(pickle)


def test_an_archive_of_an_onnx_file_and_its_data_is_an_onnx_model(tmp_path: Path) -> None:
    from tests import factories_onnx

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    assert infer_model_format(factories_onnx.archive_of(src, tmp_path / "cnn.zip")) == "onnx"
    assert infer_model_format(factories_onnx.archive_of(src, tmp_path / "cnn.tar.gz", "tar", "export/")) == "onnx"
    hf = factories_onnx.pack({"m/config.json": b"{}", "m/model.onnx": b"x"}, tmp_path / "hf.zip")
    assert infer_model_format(hf) == "hf"


def test_typed_errors_from_problem_json(api_service: LiveService, uploaded: dict[str, str]) -> None:
    with Client(api_service.url) as mp:
        with pytest.raises(ResourceNotFound) as nf:
            mp.job("job_doesnotexist")
        assert nf.value.status == 404 and nf.value.code == "not_found"
        # Valid locally, rejected by the server: an unknown model id names the field.
        with pytest.raises(APIValidationError) as bad:
            mp.submit({"model": "mdl_nope", "steps": [{"type": "quantize"}]})
        assert bad.value.status == 422 and "model" in bad.value.fields()
        # Caught locally before any request: a ratio out of range.
        with pytest.raises(APIValidationError) as local:
            mp.submit({"model": uploaded["model"], "data": {"train": uploaded["data"]},
                       "steps": [{"type": "prune", "ratio": 1.5}]})
        assert local.value.fields() == ["steps.0.ratio"]


def test_jobs_iterate_lazily_across_pages_and_submit_is_idempotent(
    api_service: LiveService, uploaded: dict[str, str]
) -> None:
    spec = {"model": uploaded["model"], "data": {"eval": uploaded["data"]}, "steps": [{"type": "quantize"}]}
    recorder = RecordingTransport()
    with Client(api_service.url, transport=recorder) as mp:
        ids = {mp.submit(spec).id for _ in range(7)}
        assert len(ids) == 7
        same = mp.submit(spec, idempotency_key="k-1").id
        assert mp.submit(spec, idempotency_key="k-1").id == same
        keys = [r.headers.get("Idempotency-Key") for r in recorder.sent if r.method == "POST"]
        assert len(set(keys[:7])) == 7 and keys[7:] == ["k-1", "k-1"]
        recorder.sent.clear()
        pages = lambda: [r for r in recorder.sent if r.url.path == "/v1/jobs"]  # noqa: E731
        it = mp.jobs(limit=3)
        first = next(it)
        assert len(pages()) == 1 and first.status == "queued"
        listed = [first.id, *(j.id for j in it)]
        assert len(pages()) == 3  # 8 jobs, 3 per page
        assert len(listed) == len(set(listed)) == 8
        assert ids | {same} == set(listed)
        assert {j.id for j in mp.jobs(status="succeeded")} == set()


@pytest.mark.e2e
def test_submit_wait_progress_and_download_with_a_worker(
    live_worker_service: LiveService, assets: dict[str, Path], tmp_path: Path
) -> None:
    with Client(live_worker_service.url) as mp:
        model = mp.upload_model(assets["model"])
        data = mp.upload_dataset(assets["data"])
        job = mp.submit({"model": model.id, "data": {"eval": data.id}, "steps": [{"type": "quantize", "mode": "dynamic"}]})
        seen: list[tuple[str, str, float]] = []
        done = job.wait(timeout=300, poll=0.2,
                        on_progress=lambda j: seen.append((j.status, j.data.phase, j.data.progress.percent)))
        assert done.status == "succeeded"
        assert seen[0][0] in ("queued", "running") and seen[-1][0] == "succeeded"
        assert len(seen) >= 2
        events = list(done.events())
        assert events and events == list(mp.job(job.id).events(follow=True))
        paths = done.download(tmp_path / "out")
        assert any(p.suffix == ".onnx" for p in paths)
        for art, p in zip(done.artifacts, paths, strict=True):
            assert p.stat().st_size == art.size_bytes
        assert done.report.get("output", {}).get("size_bytes")


def test_the_client_imports_only_models_pure_modules() -> None:
    code = ("import sys, client, client.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'api', 'worker', 'torch', 'storage', 'onnxruntime'})); "
            "print(sorted(m for m in sys.modules if m.startswith('models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"
    assert "models.tables" not in out[1] and "models.db" not in out[1] and "models.report_view" in out[1]
