"""worker.checked_io on a real full disk (a small tmpfs): ENOSPC in a pass is storage_full, and a file a library
wrote truncated while swallowing its ENOSPC is never parsed by a later step."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy.exc

from models.spec import JobSpec, QuantizeStep
from storage.base import StorageFull, is_full
from tests.api import builders
from tests.factories_disk import small_filesystem
from worker.checked_io import CorruptWrite, checked_onnx_write
from worker.context import LocalContext
from worker.passes.quantize import QuantizePass
from worker.stages import StepError
from worker.stages import stage as _stage


def test_quantize_on_a_full_disk_fails_storage_full_and_leaves_no_partial_file(tmp_path: Path) -> None:
    src = tmp_path / "big.onnx"
    src.write_bytes(builders.onnx_bytes(in_features=512, out_features=512))  # ~1 MB
    work = tmp_path / "work"
    with small_filesystem(work, 1_600_000):  # room for the job's copy of the input, not for the pre-processed one
        spec = JobSpec.model_validate({"model": "mdl_x", "steps": [{"type": "quantize"}]})
        ctx = LocalContext(work / "job", spec, models={"mdl_x": (src, "onnx", {})}, datasets={})
        model = ctx.load_model("input")
        with pytest.raises(StepError) as failed, _stage("steps[0] quantize"):
            QuantizePass().run(model, QuantizeStep(type="quantize", mode="dynamic"), ctx)
        assert failed.value.code == "storage_full" and "No space left on device" in failed.value.message
        assert isinstance(failed.value.__cause__, StorageFull)
        assert list((work / "job").glob("quantize-*")) == []  # the partial file went with the error


def _swallowing_write(path: Path, data: bytes) -> None:
    """A writer that logs and ignores its ENOSPC, as onnxruntime's quant_pre_process does."""
    with contextlib.suppress(OSError), open(path, "wb") as fh:
        fh.write(data)


def test_a_file_written_truncated_by_a_writer_that_swallowed_enospc_is_storage_full(tmp_path: Path) -> None:
    data = builders.onnx_bytes(in_features=512, out_features=512)
    with small_filesystem(tmp_path / "small", 300_000) as small:
        out = small / "pre.onnx"
        with pytest.raises(StorageFull, match="pre-processed model was written truncated"), \
                checked_onnx_write(out, "the pre-processed model"):
            _swallowing_write(out, data)
        assert not out.exists()
    roomy = tmp_path / "roomy.onnx"  # a file that does not parse on a disk with room: not a full disk
    with pytest.raises(CorruptWrite, match="does not read back"), checked_onnx_write(roomy, "the model"):
        roomy.write_bytes(data[: len(data) // 2])
    fine = tmp_path / "fine.onnx"
    with checked_onnx_write(fine, "the model"):
        fine.write_bytes(data)
    assert fine.stat().st_size == len(data)


def test_a_full_database_is_a_full_disk_too() -> None:
    full = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    locked = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    assert is_full(full) and not is_full(locked) and not is_full(ValueError("x"))
    try:
        raise RuntimeError("wrapped") from OSError(28, "No space left on device")
    except RuntimeError as wrapped:
        assert is_full(wrapped)
