"""The stage cache: keys, prefix reuse in the pipeline (pass executions counted), whole-job hits through
the real worker, and collection by age and size."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import select, update

from models.db import session_scope
from models.ids import new_id
from models.spec import JobSpec
from models.tables import Artifact, BlobOrphan, Dataset, Job, Model, StageCacheEntry, utcnow
from storage import get_store
from tests.worker.conftest import DigitsFiles
from worker import pipeline
from worker.passes.base import Pass
from worker.stage_cache.collect import collect
from worker.stage_cache.keys import job_key, stage_key
from worker.stage_cache.prefix import StageCache

FAST_EVAL = {"latency": {"warmup": 1, "runs": 3, "batch_size": 8}}
SHAS = {"mdl_mlp": "a" * 64, "ds_train": "b" * 64, "ds_eval": "c" * 64, "mdl_t": "d" * 64}


def _spec(steps: list[dict[str, Any]], **extra: Any) -> JobSpec:
    return JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification",
                                   "data": {"train": "ds_train", "eval": "ds_eval"}, "steps": steps,
                                   "evaluate": FAST_EVAL, **extra})


PRUNE = {"type": "prune", "ratio": 0.25}
DYNAMIC = {"type": "quantize", "mode": "dynamic"}
STATIC = {"type": "quantize", "mode": "static"}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How often each pass type ran (``worker.pipeline.pass_for`` instrumented)."""
    runs: Counter[str] = Counter()
    real = pipeline.pass_for

    def counting(step_type: str) -> Pass:
        p = real(step_type)
        inner = p.run

        def run(*args: Any, **kwargs: Any) -> Any:
            runs[step_type] += 1
            return inner(*args, **kwargs)

        p.run = run  # type: ignore[method-assign]
        return p

    monkeypatch.setattr(pipeline, "pass_for", counting)
    return runs


def test_the_key_changes_with_each_determining_input_and_nothing_else() -> None:
    spec = _spec([PRUNE, DYNAMIC])
    k0, k1 = stage_key(spec, 0, SHAS, "cpu"), stage_key(spec, 1, SHAS, "cpu")
    assert k0 != k1 and len(k0) == 64
    # the prefix key of step 0 ignores what follows it
    assert stage_key(_spec([PRUNE, STATIC]), 0, SHAS, "cpu") == k0
    assert stage_key(_spec([PRUNE, STATIC]), 1, SHAS, "cpu") != k1
    changed = [
        stage_key(_spec([{**PRUNE, "ratio": 0.5}, DYNAMIC]), 0, SHAS, "cpu"),
        stage_key(_spec([PRUNE, DYNAMIC], seed=1), 0, SHAS, "cpu"),
        stage_key(_spec([PRUNE, DYNAMIC], image={"size": 40}), 0, SHAS, "cpu"),
        stage_key(spec, 0, {**SHAS, "mdl_mlp": "e" * 64}, "cpu"),
        stage_key(spec, 0, {**SHAS, "ds_train": "e" * 64}, "cpu"),
        stage_key(spec, 0, {**SHAS, "ds_eval": "e" * 64}, "cpu"),
        stage_key(spec, 0, SHAS, "cuda"),
    ]
    assert len({k0, *changed}) == len(changed) + 1
    # ids do not matter, bytes do; nor do queue and the cache switch
    renamed = JobSpec.model_validate({**spec.model_dump(mode="json"), "model": "mdl_other"})
    assert stage_key(renamed, 0, {**SHAS, "mdl_other": SHAS["mdl_mlp"]}, "cpu") == k0
    same = _spec([PRUNE, DYNAMIC], queue="cpu", cache=False)
    assert stage_key(same, 1, SHAS, "cpu") == k1 and job_key(same, SHAS, "cpu") == job_key(spec, SHAS, "cpu")
    # the whole-job key also covers export settings, which no stage key does
    export = _spec([PRUNE, DYNAMIC], export={"opset": 18})
    assert job_key(export, SHAS, "cpu") != job_key(spec, SHAS, "cpu")
    # a distillation's teacher is keyed by its bytes
    distill = {"type": "distill", "teacher": "mdl_t", "epochs": 1}
    kd = stage_key(_spec([distill]), 0, SHAS, "cpu")
    assert stage_key(_spec([distill]), 0, {**SHAS, "mdl_t": "f" * 64}, "cpu") != kd


def _run(tmp_path: Path, files: DigitsFiles, spec: JobSpec, job_id: str) -> dict[str, Any]:
    ctx = files.context(tmp_path / job_id, spec)
    cache = StageCache("alice", job_id, spec, SHAS, "cpu")
    out = pipeline.run(spec, ctx, cache)
    sess = ort.InferenceSession(str(out.output_path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixels": np.zeros((2, 64), np.float32)})[0].shape == (2, 10)
    return out.report


def test_a_repeated_run_runs_no_pass_and_a_shared_prefix_runs_once(
    pg_env: str, tmp_path: Path, digits_mlp: DigitsFiles, counted: Counter[str]
) -> None:
    first = _run(tmp_path, digits_mlp, _spec([PRUNE, DYNAMIC]), "job_a")
    assert counted == {"prune": 1, "quantize": 1}
    assert not any(s.get("cached") for s in first["steps"])
    with session_scope() as s:
        assert s.scalar(select(StageCacheEntry.id).where(StageCacheEntry.kind == "stage").limit(1)) is not None

    again = _run(tmp_path, digits_mlp, _spec([PRUNE, DYNAMIC]), "job_b")
    assert counted == {"prune": 1, "quantize": 1}  # no pass ran
    assert [(s["cached"], s["cached_from"]) for s in again["steps"]] == [(True, "job_a")] * 2
    assert again["output"]["accuracy"] == first["output"]["accuracy"]
    assert again["output"]["size_bytes"] == first["output"]["size_bytes"]
    assert again["steps"][0]["eval"] == first["steps"][0]["eval"] and again["steps"][0]["eval"]["measured"]
    assert again["steps"][1]["eval"]["accuracy"] == first["output"]["accuracy"]

    # another trial: the same prune, another quantization -> only the quantization runs
    other = _run(tmp_path, digits_mlp, _spec([PRUNE, STATIC]), "job_c")
    assert counted == {"prune": 1, "quantize": 2}
    assert other["steps"][0]["cached"] is True and other["steps"][0]["cached_from"] == "job_a"
    assert "cached" not in other["steps"][1] and other["steps"][1]["metrics"]["mode"] == "static"
    assert other["output"]["accuracy"] >= 0.8 and other["output"]["params"] == first["output"]["params"]

    # another owner shares nothing; cache: false neither reads nor writes
    ctx = digits_mlp.context(tmp_path / "job_d", _spec([PRUNE, DYNAMIC]))
    pipeline.run(_spec([PRUNE, DYNAMIC]), ctx, StageCache("bob", "job_d", _spec([PRUNE, DYNAMIC]), SHAS, "cpu"))
    assert counted == {"prune": 2, "quantize": 3}


def test_a_torch_step_after_a_cached_prefix_trains_the_reloaded_model(
    pg_env: str, tmp_path: Path, digits_mlp: DigitsFiles, counted: Counter[str]
) -> None:
    _run(tmp_path, digits_mlp, _spec([PRUNE]), "job_a")
    finetune = {"type": "finetune", "mode": "full", "epochs": 1, "batch_size": 64}
    report = _run(tmp_path, digits_mlp, _spec([PRUNE, finetune]), "job_b")
    assert counted == {"prune": 1, "finetune": 1}
    assert report["steps"][0]["cached_from"] == "job_a" and "cached" not in report["steps"][1]
    assert report["output"]["accuracy"] >= 0.85 and report["output"]["params"] < report["input"]["params"]


def test_an_entry_whose_blob_was_lost_is_a_miss_and_is_stored_anew(
    sqlite_env: str, tmp_path: Path, digits_mlp: DigitsFiles, counted: Counter[str]
) -> None:
    """On the embedded SQLite database too: a cache entry whose bytes went is forgotten, never a failure."""
    _run(tmp_path, digits_mlp, _spec([DYNAMIC]), "job_a")
    with session_scope() as s:
        (blob_key,) = s.scalars(select(StageCacheEntry.blob_key).where(StageCacheEntry.kind == "stage"))
    assert blob_key is not None
    get_store().delete(blob_key)
    report = _run(tmp_path, digits_mlp, _spec([DYNAMIC]), "job_b")
    assert counted == {"quantize": 2} and "cached" not in report["steps"][0]
    with session_scope() as s:
        assert list(s.scalars(select(StageCacheEntry.job_id).where(StageCacheEntry.kind == "stage"))) == ["job_b"]
    assert get_store().exists(blob_key)  # the same bytes, stored again
    assert _run(tmp_path, digits_mlp, _spec([DYNAMIC]), "job_c")["steps"][0]["cached_from"] == "job_b"
    assert counted == {"quantize": 2}


def test_a_trial_started_beside_another_waits_for_the_shared_prefix(
    pg_env: str, tmp_path: Path, digits_mlp: DigitsFiles, counted: Counter[str]
) -> None:
    """Two trials of one search at once: the second waits for the first's prune and runs nothing of it."""
    import threading

    from worker.stage_cache.keys import RUN, marker_key

    spec = _spec([PRUNE, DYNAMIC])
    with session_scope() as s:  # job_x is live (running, fresh heartbeat) and has begun its steps
        m = Model(id="mdl_x", owner="alice", name="m", format="onnx", sha256="0" * 64, size_bytes=1,
                  storage_key="0" * 64, meta={})
        s.add(m)
        s.flush()
        s.add(Job(id="job_x", owner="alice", status="running", spec={"model": "mdl_x"}, model_id="mdl_x",
                  queue="cpu", attempt=1, progress={}, heartbeat_at=utcnow()))
        s.flush()
        key0 = stage_key(spec, 0, SHAS, "cpu")
        s.add(StageCacheEntry(owner="alice", key=marker_key(key0), kind=RUN, entry={}, job_id="job_x", size_bytes=0))
    reports: dict[str, dict[str, Any]] = {}
    waiter = threading.Thread(target=lambda: reports.update(b=_run(tmp_path, digits_mlp, _spec([PRUNE, STATIC]),
                                                                   "job_b")))
    waiter.start()
    reports["x"] = _run(tmp_path, digits_mlp, spec, "job_x")
    waiter.join(timeout=120)
    assert not waiter.is_alive()
    assert counted == {"prune": 1, "quantize": 2}  # the prune ran once, in job_x
    assert reports["b"]["steps"][0]["cached_from"] == "job_x" and "cached" not in reports["b"]["steps"][1]
    with session_scope() as s:  # job_x's markers went as it stored its steps
        assert s.scalar(select(StageCacheEntry.id).where(StageCacheEntry.job_id == "job_x",
                                                         StageCacheEntry.kind == RUN).limit(1)) is None


def _upload(path: Path, table: type[Model] | type[Dataset], prefix: str, fmt: str) -> str:
    blob = get_store().put([path.read_bytes()])
    rid = new_id(prefix)
    with session_scope() as s:
        s.add(table(id=rid, owner="local", name=path.name, format=fmt, sha256=blob.sha256,
                    size_bytes=blob.size_bytes, storage_key=blob.key, meta={}))
    return rid


def _submit(spec: dict[str, Any]) -> str:
    with session_scope() as s:
        j = Job(id=new_id("job"), owner="local", status="queued", spec=spec, model_id=spec["model"], queue="cpu",
                attempt=0, max_attempts=3, progress={})
        s.add(j)
        return j.id


def test_a_repeated_job_through_the_worker_succeeds_at_once_from_the_cache(
    pg_env: str, tmp_path: Path, digits_mlp: DigitsFiles, counted: Counter[str]
) -> None:
    from api.services.jobs import job_out
    from worker import jobs

    model = _upload(digits_mlp.model, Model, "mdl", "onnx")
    ev = _upload(digits_mlp.eval, Dataset, "ds", "npz")
    spec = {"model": model, "task": "image-classification", "data": {"eval": ev},
            "steps": [DYNAMIC], "evaluate": FAST_EVAL}
    first = _submit(spec)
    assert jobs.execute(first) == "succeeded" and counted == {"quantize": 1}
    second = _submit(spec)
    assert jobs.execute(second) == "succeeded"
    assert counted == {"quantize": 1}  # no pass ran
    with session_scope() as s:
        a, b = s.get(Job, first), s.get(Job, second)
        assert a is not None and b is not None and a.result is not None and b.result is not None
        assert b.result["cached_from"] == first and "cached_from" not in a.result
        assert b.result["report"]["steps"][0]["cached"] is True
        assert b.result["report"]["steps"][0]["cached_from"] == first
        assert b.result["report"]["output"] == a.result["report"]["output"]
        arts = {x.name: x for x in s.scalars(select(Artifact).where(Artifact.job_id == second))}
        olds = {x.name: x for x in s.scalars(select(Artifact).where(Artifact.job_id == first))}
        assert set(arts) == {"model.onnx", "report.json"} and sorted(b.result["artifact_ids"]) == sorted(
            x.id for x in arts.values())
        assert arts["model.onnx"].storage_key == olds["model.onnx"].storage_key  # the same blob, stored once
        served = job_out(s, b)  # what GET /v1/jobs/{id} returns
        assert served.result is not None and served.result.cached_from == first
        assert {x.name for x in served.result.artifacts} == {"model.onnx", "report.json"}
    assert b"cached_from" in Path(get_store().local_copy(arts["report.json"].storage_key, tmp_path)).read_bytes()
    # cache: false runs the pass again
    assert jobs.execute(_submit({**spec, "cache": False})) == "succeeded" and counted == {"quantize": 2}
    # once the first job's artifacts are gone, a repeat runs afresh (the stage entry still spares the pass)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id.in_([first, second])).values(status="failed"))
    third = _submit(spec)
    assert jobs.execute(third) == "succeeded" and counted == {"quantize": 2}
    with session_scope() as s:
        j = s.get(Job, third)
        assert j is not None and j.result is not None and "cached_from" not in j.result
        assert j.result["report"]["steps"][0]["cached"] is True


def _entry(key: str, size: int, used_days_ago: float) -> str:
    blob = get_store().put([key[:1].encode() * size])
    with session_scope() as s:
        s.add(StageCacheEntry(owner="local", key=key, kind="stage", blob_key=blob.key, size_bytes=blob.size_bytes,
                              entry={}, job_id="job_x", last_used_at=utcnow() - timedelta(days=used_days_ago)))
    return blob.key


def test_gc_collects_entries_by_age_and_by_size(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.settings import get_settings
    from worker.gc import run_gc

    old = _entry("o" * 64, 100, 10)
    lru = _entry("l" * 64, 600, 2)
    fresh = _entry("f" * 64, 600, 1)
    monkeypatch.setenv("MODELPRESS_RETAIN_CACHE_DAYS", "7")
    monkeypatch.setenv("MODELPRESS_STAGE_CACHE_MAX_BYTES", "1000")
    get_settings.cache_clear()
    report = run_gc()
    assert report.stage_entries == 2  # the 10-day-old one; then the least recently used past 1000 bytes
    assert report.summary().endswith("2 stage-cache entries") and report.blobs == 2 and report.blob_bytes == 700
    store = get_store()
    assert not store.exists(old) and not store.exists(lru) and store.exists(fresh)
    with session_scope() as s:
        assert list(s.scalars(select(StageCacheEntry.key))) == ["f" * 64]
        assert s.scalar(select(BlobOrphan.key).limit(1)) is None
    # a blob a stage entry refers to is never swept as an orphan
    with session_scope() as s:
        s.add(BlobOrphan(key=fresh))
    assert run_gc().stage_entries == 0 and store.exists(fresh)
    assert collect(None, 0) == (0, [])
