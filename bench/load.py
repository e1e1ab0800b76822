"""Load on the real service (PostgreSQL + Redis): concurrent job reads, concurrent uploads of one file.

Part 1: ``--readers`` (200) clients at once, each a keep-alive connection reading ``GET /v1/jobs/{id}``
``--reads`` times in a closed loop; any answer but 200 (or a connection error) counts as an error.
Part 2: ``--uploaders`` (20) clients upload the same file at the same moment (released together by a
barrier); every answer must be 200/201 with the same record id, and the database must hold one row per
(owner, sha256) and the store one blob, with no staged temp file left. Run with ``--read-cache-s 0`` to
have every read query PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import emit, log, machine_info, new_run_id, percentile, run_cli, service

GOAL_ERRORS = 0
GOAL_DUPLICATES = 0


async def _reader(host: str, port: int, path: str, reads: int, lat: list[float], errors: list[str]) -> None:
    """One keep-alive HTTP/1.1 connection on raw asyncio streams (a cheap generator next to the server)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        errors.extend([type(exc).__name__] * reads)
        return
    try:
        for done in range(reads):
            t0 = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                               if k.strip().lower() == b"content-length"), -1)
                if length < 0:
                    raise ValueError("no Content-Length")
                await reader.readexactly(length)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                errors.extend([type(exc).__name__] * (reads - done))
                return
            lat.append(time.perf_counter() - t0)
            if head[9:12] != b"200":
                errors.append(head[9:12].decode(errors="replace"))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def concurrent_reads(url: str, job_id: str, readers: int, reads: int) -> dict[str, Any]:
    """``readers`` connections at once, each reading the job ``reads`` times."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_reader(parts.hostname, parts.port, f"/v1/jobs/{job_id}", reads, lat, errors)
                           for _ in range(readers)))
    wall = time.perf_counter() - t0
    return {"readers": readers, "requests": readers * reads, "errors": len(errors),
            "error_kinds": sorted(set(errors)), "rps": len(lat) / wall,
            "p50_ms": percentile(lat, 50) * 1000, "p95_ms": percentile(lat, 95) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat, default=0.0) * 1000}


def concurrent_uploads(url: str, data: bytes, uploaders: int) -> dict[str, Any]:
    """``uploaders`` threads PUT the same bytes as a model at the same moment."""
    import httpx

    barrier = threading.Barrier(uploaders)
    answers: list[tuple[int, str | None, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            barrier.wait()
            t0 = time.perf_counter()
            try:
                r = client.put("/v1/models", params={"name": f"same-{i}.onnx", "format": "onnx"}, content=data)
                status, rid = r.status_code, (r.json().get("id") if r.status_code in (200, 201) else None)
            except httpx.HTTPError as exc:
                status, rid = -1, type(exc).__name__
            with lock:
                answers.append((status, rid, time.perf_counter() - t0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(uploaders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [a for a in answers if a[0] in (200, 201)]
    lat = [a[2] for a in answers]
    return {"uploaders": uploaders, "bytes": len(data), "errors": len(answers) - len(ok),
            "statuses": sorted({a[0] for a in answers}), "created": sum(a[0] == 201 for a in answers),
            "distinct_ids": len({a[1] for a in ok}), "p50_ms": percentile(lat, 50) * 1000,
            "max_ms": max(lat, default=0.0) * 1000}


def duplicates(database_url: str) -> int:
    """Rows beyond the first per (owner, sha256), over models and datasets."""
    import psycopg

    dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM ("
            " SELECT count(*) AS n FROM models GROUP BY owner, sha256"
            " UNION ALL SELECT count(*) FROM datasets GROUP BY owner, sha256) AS t").fetchone()
    return int(row[0]) if row else 0


def leftovers(storage: Path, sha256: str) -> dict[str, int]:
    """Copies of the blob in the store (goal 1) and staged temp files (goal 0)."""
    tmp = storage / "tmp"
    return {"blob_copies": sum(1 for p in storage.rglob(sha256) if p.is_file()),
            "temp_files": sum(1 for p in tmp.iterdir()) if tmp.exists() else 0}


def _model_bytes(mib: int) -> bytes:
    """A valid ONNX MLP of about ``mib`` MiB (a 1024 x N weight)."""
    import io

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cols = max(1, mib * 1024 * 1024 // (4 * 1024))
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1024, cols)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])], [w])
    buf = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.api_latency import create_job

    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    p.add_argument("--readers", type=int, default=200)
    p.add_argument("--reads", type=int, default=20, help="reads per reader")
    p.add_argument("--uploaders", type=int, default=20)
    p.add_argument("--upload-mib", type=int, default=16)
    p.add_argument("--read-cache-s", type=float, default=None, help="MODELPRESS_JOB_READ_CACHE_S (default: the service's)")
    a = p.parse_args(argv)
    overrides = {} if a.read_cache_s is None else {"job_read_cache_s": str(a.read_cache_s)}
    run_id = new_run_id()
    with service("distributed", run_id, worker=False, home_base=None, **overrides) as svc:
        job_id = create_job(svc.url)
        log(f"{a.readers} readers x {a.reads} reads of {job_id}")
        reads = asyncio.run(concurrent_reads(svc.url, job_id, a.readers, a.reads))
        data = _model_bytes(a.upload_mib)
        log(f"{a.uploaders} concurrent uploads of one {len(data) / 2**20:.1f} MiB file")
        uploads = concurrent_uploads(svc.url, data, a.uploaders)
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        uploads["duplicate_records"] = duplicates(svc.env["MODELPRESS_DATABASE_URL"])
        uploads.update(leftovers(svc.home / "storage", sha))
    errors = reads["errors"] + uploads["errors"]
    dups = uploads["duplicate_records"]
    met = errors <= GOAL_ERRORS and dups <= GOAL_DUPLICATES and uploads["distinct_ids"] == 1
    summary = (f"{reads['requests']} reads by {a.readers} clients: {reads['errors']} errors, "
               f"{reads['rps']:.0f} req/s, p50 {reads['p50_ms']:.1f} / p99 {reads['p99_ms']:.1f} ms; "
               f"{a.uploaders} uploads of one file: {uploads['errors']} errors, {dups} duplicate records, "
               f"{uploads['distinct_ids']} record id, {uploads['blob_copies']} blob, {uploads['temp_files']} temp files "
               f"(goal 0 errors / 0 duplicates: {'met' if met else 'MISSED'})")
    figures = {"reads": reads, "uploads": uploads, "goal_met": met, "machine": machine_info()}
    emit("load", summary, figures)
    return figures


if __name__ == "__main__":
    run_cli(main)
