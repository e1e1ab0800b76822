"""Load on the real service (PostgreSQL + Redis): concurrent job reads, concurrent uploads of one file.

Part 1: ``--readers`` (200) clients at once, each a keep-alive connection reading ``GET /v1/jobs/{id}``
``--reads`` times in a closed loop; any answer but 200 (or a connection error) counts as an error.
Part 2: ``--uploaders`` (20) clients upload the same file at the same moment (released together by a
barrier); every answer must be 200/201 with the same record id, and the database must hold one row per
(owner, sha256) and the store one blob, with no staged temp file left. Run with ``--read-cache-s 0`` to
have every read query PostgreSQL.
Part 3 (``--burst``, 150): on the embedded stack and on PostgreSQL + Redis, with API keys on, one per-owner
key sends ``--burst`` concurrent ``POST /v1/jobs`` (default limits: bursts of 120), then another key
``--burst`` concurrent uploads of distinct ~16 kB models, while a third client reads a job in a loop.
Printed per stack: answers by status, 5xx (goal 0), jobs or records created beyond the 2xx answers (goal 0),
p50/p99 of the answers, and the reads' p50/p99 during the burst.
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


BURST_KEY = "bench-load-bootstrap"


async def _burst_answers(url: str, auth: dict[str, str], n: int, send: Any) -> list[tuple[int, str | None, float]]:
    """``n`` requests released at once (one connection each): (status, id of a 2xx record, seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=180, limits=limits) as client:
        go = asyncio.Event()

        async def one(i: int) -> tuple[int, str | None, float]:
            await go.wait()
            t0 = time.perf_counter()
            try:
                r = await send(client, i)
            except httpx.HTTPError as exc:
                return -1, type(exc).__name__, time.perf_counter() - t0
            rid = r.json().get("id") if 200 <= r.status_code < 300 else None
            return r.status_code, rid, time.perf_counter() - t0

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.1)
        go.set()
        return list(await asyncio.gather(*tasks))


async def _with_reads(url: str, path: str, work: Any) -> tuple[Any, list[float]]:
    """Run ``work`` while one client reads ``path`` in a closed loop; (its result, the reads' seconds)."""
    import httpx

    lat: list[float] = []
    done = asyncio.Event()

    async def reader() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {BURST_KEY}"},
                                     timeout=180) as client:
            while not done.is_set():
                t0 = time.perf_counter()
                await client.get(path)
                lat.append(time.perf_counter() - t0)

    task = asyncio.create_task(reader())
    try:
        return await work, lat
    finally:
        done.set()
        await task


def _count(url: str, auth: dict[str, str], path: str) -> int:
    import httpx

    total, after = 0, None
    while True:
        page = httpx.get(f"{url}{path}", params={"limit": 100, **({"after": after} if after else {})},
                         headers=auth, timeout=60).json()
        total += len(page["data"])
        after = page.get("next_cursor")
        if not after:
            return total


def _figures(answers: list[tuple[int, str | None, float]], created: int, reads: list[float]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok = sum(1 for status, _, _ in answers if 200 <= status < 300)
    lat = [a[2] for a in answers]
    return {"statuses": statuses, "5xx": sum(1 for a in answers if a[0] >= 500 or a[0] < 0), "ok": ok,
            "created": created, "created_beyond_2xx": created - len({a[1] for a in answers if a[1]}),
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "reads": len(reads), "read_p50_ms": percentile(reads, 50) * 1000,
            "read_p99_ms": percentile(reads, 99) * 1000}


def bursts(kind: str, n: int) -> dict[str, Any]:
    """Part 3 on one stack (``embedded`` or ``distributed``): a submit burst, then an upload burst."""
    import httpx

    from tests.api.builders import onnx_bytes

    out: dict[str, Any] = {}
    with service(kind, new_run_id(), worker=False, home_base=None, api_key=BURST_KEY) as svc:
        boot = {"Authorization": f"Bearer {BURST_KEY}"}

        def key(owner: str) -> dict[str, str]:
            r = httpx.post(f"{svc.url}/v1/keys", json={"owner": owner, "scope": "write"}, headers=boot, timeout=60)
            r.raise_for_status()
            return {"Authorization": f"Bearer {r.json()['key']}"}

        job_id = create_job_as(svc.url, boot)
        submitter = key("burst-submit")
        model = httpx.put(f"{svc.url}/v1/models", params={"format": "onnx"}, content=onnx_bytes(seed=1),
                          headers=submitter, timeout=60).json()["id"]

        async def submit(client: Any, i: int) -> Any:
            return await client.post("/v1/jobs", json={"model": model, "steps": [{"type": "quantize"}]})

        log(f"{kind}: {n} concurrent POST /v1/jobs with one key")
        answers, reads = asyncio.run(_with_reads(svc.url, f"/v1/jobs/{job_id}",
                                                 _burst_answers(svc.url, submitter, n, submit)))
        out["submit"] = _figures(answers, _count(svc.url, submitter, "/v1/jobs"), reads)
        uploader = key("burst-upload")
        models = [onnx_bytes(in_features=64, out_features=64, seed=1000 + i) for i in range(n)]

        async def put(client: Any, i: int) -> Any:
            return await client.put("/v1/models", params={"format": "onnx"}, content=models[i])

        log(f"{kind}: {n} concurrent uploads of distinct {len(models[0]) / 1024:.0f} kB models with one key")
        answers, reads = asyncio.run(_with_reads(svc.url, f"/v1/jobs/{job_id}",
                                                 _burst_answers(svc.url, uploader, n, put)))
        out["upload"] = _figures(answers, _count(svc.url, uploader, "/v1/models"), reads)
    return out


def create_job_as(url: str, auth: dict[str, str]) -> str:
    """A queued job of the bootstrap owner (the one the reader polls)."""
    import httpx

    from tests.api.builders import onnx_bytes

    with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
        mdl = client.put("/v1/models", params={"format": "onnx"}, content=onnx_bytes(seed=2)).json()["id"]
        r = client.post("/v1/jobs", json={"model": mdl, "steps": [{"type": "quantize"}]})
        r.raise_for_status()
        return str(r.json()["id"])


def _burst_line(kind: str, part: str, f: dict[str, Any]) -> str:
    return (f"{kind} {part}: {f['statuses']}, 5xx {f['5xx']}, created beyond 2xx {f['created_beyond_2xx']}, "
            f"p50 {f['p50_ms']:.0f} / p99 {f['p99_ms']:.0f} ms; reads during it p50 {f['read_p50_ms']:.0f} / "
            f"p99 {f['read_p99_ms']:.0f} ms ({f['reads']} reads)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.api_latency import create_job

    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    p.add_argument("--readers", type=int, default=200)
    p.add_argument("--reads", type=int, default=20, help="reads per reader")
    p.add_argument("--uploaders", type=int, default=20)
    p.add_argument("--upload-mib", type=int, default=16)
    p.add_argument("--read-cache-s", type=float, default=None, help="MODELPRESS_JOB_READ_CACHE_S (default: the service's)")
    p.add_argument("--burst", type=int, default=150, help="concurrent submits, then uploads, per stack (0: skip)")
    p.add_argument("--stacks", default="embedded,distributed", help="the stacks part 3 runs on")
    p.add_argument("--only-bursts", action="store_true", help="skip parts 1 and 2")
    a = p.parse_args(argv)
    burst_figures: dict[str, Any] = {}
    if a.burst:
        for kind in [k for k in a.stacks.split(",") if k]:
            burst_figures[kind] = bursts(kind, a.burst)
    burst_ok = all(f[part]["5xx"] == 0 and f[part]["created_beyond_2xx"] == 0
                   for f in burst_figures.values() for part in ("submit", "upload"))
    burst_summary = "; ".join(_burst_line(kind, part, f[part]) for kind, f in burst_figures.items()
                              for part in ("submit", "upload"))
    if a.only_bursts:
        emit("load", f"{burst_summary} (goal 0 x 5xx, 0 created beyond 2xx: {'met' if burst_ok else 'MISSED'})",
             {"bursts": burst_figures, "goal_met": burst_ok, "machine": machine_info()})
        return burst_figures
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
    met = errors <= GOAL_ERRORS and dups <= GOAL_DUPLICATES and uploads["distinct_ids"] == 1 and burst_ok
    summary = (f"{reads['requests']} reads by {a.readers} clients: {reads['errors']} errors, "
               f"{reads['rps']:.0f} req/s, p50 {reads['p50_ms']:.1f} / p99 {reads['p99_ms']:.1f} ms; "
               f"{a.uploaders} uploads of one file: {uploads['errors']} errors, {dups} duplicate records, "
               f"{uploads['distinct_ids']} record id, {uploads['blob_copies']} blob, {uploads['temp_files']} temp files "
               f"{'; ' + burst_summary if burst_summary else ''} "
               f"(goal 0 errors / 0 duplicates / 0 x 5xx: {'met' if met else 'MISSED'})")
    figures = {"reads": reads, "uploads": uploads, "bursts": burst_figures, "goal_met": met, "machine": machine_info()}
    emit("load", summary, figures)
    return figures


if __name__ == "__main__":
    run_cli(main)
