"""The stage cache: each pipeline prefix's output stored once, keyed by what determines it.

The key of steps ``0..i`` is the sha256 of a canonical JSON of the input model's sha256, the sha256s
of every model and dataset the job may read (train/eval/calibration, teachers, students), the
validated steps ``0..i``, the seed, the text/image preprocessing, the evaluation settings (a step's
report entry holds its eval), the export opset (it converts between forms), the task, the device and
the modelpress version. An entry holds the working model after step ``i`` as an ONNX file (a torch
module is exported first) in the blob store, and the step's report entry.

Entries are per owner (no tenant ever reads another's). Only models uploaded as ONNX are cached by
stage: a Hugging Face model's torch structure does not survive the ONNX round trip. A whole finished
job is an entry too (``kind='job'``): an identical job later succeeds at once with its artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from models import blobs
from models.db import session_scope
from models.ids import new_id
from models.settings import get_settings
from models.spec import DistillStep, JobSpec, StudentModel
from models.tables import Artifact, Dataset, Job, Model, StageCacheEntry, utcnow
from storage import get_store
from storage.staging import file_chunks

if TYPE_CHECKING:
    from datetime import datetime

    from worker.jobs import Claim
    from worker.passes.base import PipelineContext, WorkingModel

log = logging.getLogger(__name__)

STAGE, JOB, RUN = "stage", "job", "run"
WAIT_POLL_S = 0.5
WAIT_MAX_S = 1800.0  # the longest a job waits for another computing the same step


def _run_key(key: str) -> str:
    """The marker key of a step key being computed."""
    return hashlib.sha256(f"run:{key}".encode()).hexdigest()


def modelpress_version() -> str:
    try:
        return importlib.metadata.version("modelpress")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"




def dataset_refs(spec: JobSpec) -> set[str]:
    return spec.dataset_ids()


def db_shas(spec: JobSpec) -> dict[str, str]:
    """``{id: sha256}`` of the models and datasets the job reads, from their rows."""
    models, datasets = spec.model_ids(), dataset_refs(spec)
    with session_scope() as s:
        rows = list(s.execute(select(Model.id, Model.sha256).where(Model.id.in_(models))))
        rows += list(s.execute(select(Dataset.id, Dataset.sha256).where(Dataset.id.in_(datasets))))
    return {rid: sha for rid, sha in rows}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _base(spec: JobSpec, shas: dict[str, str], device: str) -> dict[str, Any]:
    """What every key shares: inputs by content (ids never matter), seed, preprocessing, version."""
    def sha(ref: str | None) -> str | None:
        if ref is None:
            return None
        if ref not in shas:
            raise KeyError(f"no sha256 for {ref!r}")
        return shas[ref]

    return {
        "version": modelpress_version(),
        "model": sha(spec.model),
        "data": {role: sha(getattr(spec.data, role)) for role in ("train", "eval", "calibration")},
        "task": spec.task,
        "seed": spec.seed,
        "text": spec.text.model_dump(mode="json"),
        "image": spec.image.model_dump(mode="json"),
        "evaluate": spec.evaluate.model_dump(mode="json"),
        "opset": spec.export.opset,
        "device": device,
    }


def _step_doc(spec: JobSpec, i: int, shas: dict[str, str]) -> dict[str, Any]:
    doc = spec.steps[i].model_dump(mode="json")
    # a distillation's teacher or student is named by id: key it by the model's bytes instead
    step = spec.steps[i]
    if isinstance(step, DistillStep):
        if step.teacher not in ("input", "current"):
            doc["teacher"] = shas[step.teacher]
        if isinstance(step.student, StudentModel):
            doc["student"] = {**doc["student"], "model": shas[step.student.model]}
    return doc


def stage_key(spec: JobSpec, i: int, shas: dict[str, str], device: str) -> str:
    """The key of the working model after ``spec.steps[0..i]``."""
    return _digest({"kind": STAGE, **_base(spec, shas, device),
                    "steps": [_step_doc(spec, j, shas) for j in range(i + 1)]})


def job_key(spec: JobSpec, shas: dict[str, str], device: str) -> str:
    """The key of the whole job: every step, export and evaluation setting (``cache`` and ``queue`` aside:
    the device is in the key)."""
    rest = spec.model_dump(mode="json", exclude={"model", "data", "steps", "cache", "queue"})
    return _digest({"kind": JOB, **_base(spec, shas, device), "spec": rest,
                    "steps": [_step_doc(spec, j, shas) for j in range(len(spec.steps))]})


@dataclass
class Resumed:
    """The longest cached prefix: ``count`` steps done, the model after them, their report entries."""

    count: int
    model: WorkingModel
    entries: list[dict[str, Any]]


class StageCache:
    """One job's view of its owner's stage cache (what the pipeline calls around its step loop)."""

    def __init__(self, owner: str, job_id: str, spec: JobSpec, shas: dict[str, str], device: str) -> None:
        self.owner, self.job_id, self.spec, self.device = owner, job_id, spec, device
        self.keys = [stage_key(spec, i, shas, device) for i in range(len(spec.steps))]
        self.job_key = job_key(spec, shas, device)
        self.hits: list[int] = []
        self.stored: list[int] = []

    # -- lookup ----------------------------------------------------------------------------------

    def _row(self, key: str) -> StageCacheEntry | None:
        with session_scope() as s:
            row = s.scalar(select(StageCacheEntry).where(
                StageCacheEntry.owner == self.owner, StageCacheEntry.key == key, StageCacheEntry.kind == STAGE))
            if row is not None:
                row.last_used_at = utcnow()
                s.flush()
                s.expunge(row)
            return row

    def resume(self, ctx: PipelineContext, input_model: WorkingModel) -> Resumed | None:
        """The longest prefix of the job's steps found in the cache, its model in the workdir; None if none.

        When another live job of the owner is computing the next step this job would run (a search's
        trials started together), this waits for its entry rather than running the same step twice;
        then it marks the steps it will compute itself."""
        if input_model.origin != "onnx" or not self.keys:
            return None
        deadline = time.monotonic() + WAIT_MAX_S
        waited = False
        while True:
            found = self._find()
            start = 0 if found is None else found[0] + 1
            if start >= len(self.keys) or time.monotonic() > deadline or not self._computing(self.keys[start]):
                if found is None:
                    break
                try:
                    model = self._load(found[1], ctx, input_model, found[0])
                except Exception:  # a lost blob is a miss, never a failed job
                    log.warning("stage cache entry %s unreadable; running the steps", found[1].key, exc_info=True)
                    self._drop(found[1].key)
                    continue
                break
            if not waited:
                ctx.log(f"waiting for another job computing steps[{start}] (the stage cache shares it)")
                waited = True
            ctx.check_cancelled()
            time.sleep(WAIT_POLL_S)
        self._mark(start)
        if found is None:
            return None
        i, row = found
        entries = [{**e, "cached": True, "cached_from": e.get("cached_from") or row.job_id}
                   for e in row.entry["steps"]]
        self.hits = list(range(i + 1))
        ctx.log(f"steps 0..{i} from the stage cache", cached_from=row.job_id)
        return Resumed(i + 1, model, entries)

    def _find(self) -> tuple[int, StageCacheEntry] | None:
        for i in reversed(range(len(self.keys))):
            row = self._row(self.keys[i])
            if row is not None and row.blob_key is not None:
                return i, row
        return None

    # -- steps in progress: a marker row per (owner, step key) a live job is computing ----------------

    def _computing(self, key: str) -> bool:
        """Whether another active job (heartbeat within the lease) has marked ``key`` as in progress."""
        fresh = utcnow() - timedelta(seconds=get_settings().job_lease_seconds)
        with session_scope() as s:
            return s.scalar(
                select(StageCacheEntry.id).join(Job, Job.id == StageCacheEntry.job_id).where(
                    StageCacheEntry.owner == self.owner, StageCacheEntry.key == _run_key(key),
                    StageCacheEntry.kind == RUN, StageCacheEntry.job_id != self.job_id,
                    Job.status.in_(("running", "cancelling")), Job.heartbeat_at > fresh).limit(1)
            ) is not None

    def _mark(self, start: int) -> None:
        for key in self.keys[start:]:
            run_key = _run_key(key)
            if self._computing(key):
                continue
            try:
                with session_scope() as s:
                    s.execute(delete(StageCacheEntry).where(
                        StageCacheEntry.owner == self.owner, StageCacheEntry.key == run_key))
                    s.add(StageCacheEntry(owner=self.owner, key=run_key, kind=RUN, blob_key=None, size_bytes=0,
                                          entry={"for": key}, job_id=self.job_id))
            except Exception:  # another job marked it at the same moment
                log.debug("stage cache: %s marked meanwhile", key, exc_info=True)

    def _load(self, row: StageCacheEntry, ctx: PipelineContext, input_model: WorkingModel, i: int) -> WorkingModel:
        assert row.blob_key is not None
        folder = Path(ctx.workdir) / "stage-cache"
        folder.mkdir(parents=True, exist_ok=True)
        src = get_store().local_copy(row.blob_key, folder)
        dest = folder / f"step{i}.onnx"
        if src != dest:
            shutil.copyfile(src, dest)  # passes get a file of their own, never the store's
        info = row.entry["model"]
        return dataclasses.replace(input_model, form="onnx", onnx_path=dest, module=None,
                                   input_names=list(info["input_names"]), output_names=list(info["output_names"]),
                                   meta=dict(info.get("meta") or {}))

    def _drop(self, key: str) -> None:
        with session_scope() as s:
            rows = list(s.scalars(select(StageCacheEntry).where(
                StageCacheEntry.owner == self.owner, StageCacheEntry.key == key)))
            blobs.mark_orphans(s, [r.blob_key for r in rows if r.blob_key])
            for r in rows:
                s.delete(r)

    # -- store -----------------------------------------------------------------------------------

    def store(self, i: int, model: WorkingModel, ctx: PipelineContext, entries: list[dict[str, Any]]) -> None:
        """Keep the model after step ``i`` with the report entries of steps ``0..i``; failures only log."""
        if model.origin != "onnx" or i in self.hits:
            return
        try:
            onnx_model = model
            if model.form != "onnx":
                from worker import convert

                onnx_model = convert.to_onnx(model, ctx, self.spec.export.opset, name=f"cache-step{i}")
            assert onnx_model.onnx_path is not None
            path = Path(onnx_model.onnx_path)
            if _has_external_data(path):
                return  # one file per entry: a graph with external data is not cached
            info = {"input_names": list(onnx_model.input_names), "output_names": list(onnx_model.output_names),
                    "meta": _json_meta(onnx_model.meta)}
            self._put(self.keys[i], path, {"model": info, "steps": [_plain(e) for e in entries]})
            self.stored.append(i)
        except Exception:
            log.warning("stage cache: could not store steps[%d] of %s", i, self.job_id, exc_info=True)

    @classmethod
    def for_job(cls, owner: str, job_id: str, spec: JobSpec, device: str) -> StageCache:
        """The cache of a DB job, its inputs keyed by their rows' sha256s."""
        return cls(owner, job_id, spec, db_shas(spec), device)

    def remember(self) -> None:
        """Once the job succeeded: note it under its whole-job key."""
        try:
            with session_scope() as s:
                if s.scalar(select(Job.status).where(Job.id == self.job_id)) != "succeeded":
                    return
            remember_job(self.owner, self.job_id, self.job_key)
        except Exception:  # e.g. an identical job noted itself at the same moment: the job stays succeeded
            log.warning("stage cache: could not note job %s", self.job_id, exc_info=True)

    def finish(self, entries: list[dict[str, Any]]) -> None:
        """The last step's eval, filled in from the output's evaluation: store it in that step's entry."""
        if not entries or not self.keys:
            return
        key = self.keys[len(entries) - 1]
        with session_scope() as s:
            row = s.scalar(select(StageCacheEntry).where(
                StageCacheEntry.owner == self.owner, StageCacheEntry.key == key, StageCacheEntry.kind == STAGE))
            if row is not None:
                row.entry = {**row.entry, "steps": [_plain(e) for e in entries]}

    def _put(self, key: str, path: Path, entry: dict[str, Any]) -> None:
        store = get_store()
        with store.stage(file_chunks(path)) as staged, blobs.writing(staged.sha256):
            blob = store.commit(staged)
            with session_scope() as s:
                if s.scalar(select(StageCacheEntry.id).where(
                        StageCacheEntry.owner == self.owner, StageCacheEntry.key == key)) is not None:
                    return  # a concurrent trial stored the same prefix first
                s.add(StageCacheEntry(owner=self.owner, key=key, kind=STAGE, blob_key=blob.key,
                                      size_bytes=blob.size_bytes, entry=entry, job_id=self.job_id))
                s.execute(delete(StageCacheEntry).where(
                    StageCacheEntry.owner == self.owner, StageCacheEntry.key == _run_key(key)))


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    # ``cached_from`` stays: it names the job that ran the step
    out: dict[str, Any] = json.loads(json.dumps({k: v for k, v in entry.items() if k != "cached"}, default=str))
    return out


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, Path):
            continue  # paths of this attempt's workdir mean nothing to a later job
        with contextlib.suppress(TypeError, ValueError):
            out[k] = json.loads(json.dumps(v))
    return out


def _has_external_data(path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in proto.graph.initializer)


# -- whole jobs ------------------------------------------------------------------------------------

def remember_job(owner: str, job_id: str, key: str) -> None:
    """Note a succeeded job under its whole-job key (a later identical job reuses it)."""
    with session_scope() as s:
        s.execute(delete(StageCacheEntry).where(
            StageCacheEntry.owner == owner, StageCacheEntry.key == key, StageCacheEntry.kind == JOB))
        s.add(StageCacheEntry(owner=owner, key=key, kind=JOB, blob_key=None, size_bytes=0,
                              entry={}, job_id=job_id))


@dataclass
class FinishedJob:
    """A finished job identical to this one: its id, result and artifact rows (name, kind, sha, size, key, media)."""

    job_id: str
    result: dict[str, Any]
    artifacts: list[tuple[str, str, str, int, str, str]]


def finished_job(owner: str, key: str, this_job: str) -> FinishedJob | None:
    """The owner's succeeded job under ``key`` with all its artifacts still there; None otherwise."""
    with session_scope() as s:
        row = s.scalar(select(StageCacheEntry).where(
            StageCacheEntry.owner == owner, StageCacheEntry.key == key, StageCacheEntry.kind == JOB))
        if row is None or row.job_id == this_job:
            return None
        job = s.get(Job, row.job_id)
        arts = [] if job is None else list(s.scalars(select(Artifact).where(Artifact.job_id == job.id)))
        if job is None or job.status != "succeeded" or job.owner != owner or not job.result \
                or "model.onnx" not in {a.name for a in arts}:
            s.delete(row)  # the job or its artifacts were deleted since: forget it
            return None
        row.last_used_at = utcnow()
        return FinishedJob(job.id, dict(job.result),
                           [(a.name, a.kind, a.sha256, a.size_bytes, a.storage_key, a.media_type) for a in arts])


def reuse_finished(claim: Claim, owner: str, spec: JobSpec, workdir: Path) -> bool:
    """Finish this job at once from an identical succeeded job of the same owner, if there is one.

    Its artifacts become this job's (new rows on the same blobs, under write claims so no sweep takes
    them meanwhile); the report says every step came from the cache; ``result.cached_from`` names it."""
    from worker import jobs
    from worker.context import default_device

    try:
        key = job_key(spec, db_shas(spec), default_device())
    except KeyError:
        return False  # an input row is gone: the normal run says so
    hit = finished_job(owner, key, claim.job_id)
    if hit is None:
        return False
    keys = sorted({a[4] for a in hit.artifacts if a[0] != "report.json"})
    with contextlib.ExitStack() as stack:
        for k in keys:
            stack.enter_context(blobs.writing(k))
        with session_scope() as s:
            still = set(s.scalars(select(Artifact.storage_key).where(Artifact.job_id == hit.job_id)))
            if not set(keys) <= still:
                return False  # the source job's artifacts went meanwhile
            ids = []
            for name, kind, sha, size, skey, media in hit.artifacts:
                if name == "report.json":
                    continue
                old = s.scalar(select(Artifact).where(Artifact.job_id == claim.job_id, Artifact.name == name))
                if old is not None:  # a retried attempt
                    s.delete(old)
                    s.flush()
                art_id = new_id("art")
                s.add(Artifact(id=art_id, owner=owner, job_id=claim.job_id, name=name, kind=kind, media_type=media,
                               sha256=sha, size_bytes=size, storage_key=skey,
                               meta={"attempt": claim.attempt, "cached_from": hit.job_id}))
                ids.append(art_id)
    report = mark_cached(hit.result.get("report") or {}, hit.job_id)
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    ids += jobs._store_artifacts(claim, owner, {"report.json": ("report", report_path)})
    result = {**hit.result, "artifact_ids": ids, "report": report, "cached_from": hit.job_id}
    jobs.add_event(claim.job_id, "log", f"identical to job {hit.job_id}: its result reused, no pass run",
                   cached_from=hit.job_id)
    jobs._finish(claim, "succeeded", result=result, message="succeeded (from the stage cache)")
    return True


def mark_cached(report: dict[str, Any], source: str) -> dict[str, Any]:
    """``report`` (a copy) saying every step came from job ``source``."""
    steps = [{**e, "cached": True, "cached_from": e.get("cached_from") or source} for e in report.get("steps") or []]
    return {**report, "steps": steps, "cached_from": source}


# -- collection (gc) -------------------------------------------------------------------------------

def collect(max_age: timedelta | None, max_bytes: int, now: datetime | None = None) -> tuple[int, list[str]]:
    """Delete entries unused for ``max_age`` and then the least recently used beyond ``max_bytes`` in all
    (0: no bound); returns ``(entries deleted, their blob keys)`` — orphans now, for the sweep."""
    now = now or utcnow()
    with session_scope() as s:
        ids: set[int] = set()
        if max_age is not None:
            ids |= set(s.scalars(select(StageCacheEntry.id).where(StageCacheEntry.last_used_at < now - max_age)))
        if max_bytes > 0:
            rows = s.execute(select(StageCacheEntry.id, StageCacheEntry.size_bytes)
                             .where(StageCacheEntry.kind == STAGE)
                             .order_by(StageCacheEntry.last_used_at.desc(), StageCacheEntry.id.desc())).all()
            total = 0
            for rid, size in rows:
                if rid in ids:
                    continue
                total += int(size)
                if total > max_bytes:
                    ids.add(int(rid))
        if not ids:
            return 0, []
        keys = sorted({k for k in s.scalars(select(StageCacheEntry.blob_key).where(
            StageCacheEntry.id.in_(ids), StageCacheEntry.blob_key.is_not(None))) if k})
        blobs.mark_orphans(s, keys)
        s.execute(delete(StageCacheEntry).where(StageCacheEntry.id.in_(ids)))
        return len(ids), keys


def touch(owner: str, key: str) -> None:
    """Mark an entry used now (tests and tools)."""
    with session_scope() as s:
        s.execute(update(StageCacheEntry).where(StageCacheEntry.owner == owner, StageCacheEntry.key == key)
                  .values(last_used_at=utcnow()))
