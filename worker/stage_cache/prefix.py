"""A job's view of its owner's stage cache: resume from the longest cached prefix, store each step's output."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from models import blobs
from models.db import session_scope
from models.formats import MODEL_FORMATS
from models.settings import get_settings
from models.spec import JobSpec
from models.tables import Job, StageCacheEntry, utcnow
from storage import get_store
from storage.staging import file_chunks
from worker.stage_cache.keys import RUN, STAGE, db_shas, job_key, marker_key, stage_key
from worker.stage_cache.reuse import remember_job

if TYPE_CHECKING:
    from worker.core import PipelineContext, WorkingModel

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.5
WAIT_MAX_S = 1800.0  # the longest a job waits for another computing the same step


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
        if not MODEL_FORMATS[input_model.origin].stage_cached or not self.keys:
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
                    StageCacheEntry.owner == self.owner, StageCacheEntry.key == marker_key(key),
                    StageCacheEntry.kind == RUN, StageCacheEntry.job_id != self.job_id,
                    Job.status.in_(("running", "cancelling")), Job.heartbeat_at > fresh).limit(1)
            ) is not None

    def _mark(self, start: int) -> None:
        for key in self.keys[start:]:
            run_key = marker_key(key)
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
        if not MODEL_FORMATS[model.origin].stage_cached or i in self.hits:
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
                    StageCacheEntry.owner == self.owner, StageCacheEntry.key == marker_key(key)))


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


