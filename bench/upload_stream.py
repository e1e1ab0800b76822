"""Streaming a large upload: peak RSS growth of the API process, and throughput vs a same-disk file copy.

The file is a valid uncompressed ``.npz`` (a float32 array ``x`` of shape (N, 1024) plus int64
``labels``), written in chunks so it never sits in memory, and cached under bench/out/. It is sent
to ``PUT /v1/datasets?format=npz`` as a chunked body (httpx with a generator, no Content-Length), so
the upload succeeds end to end: streamed to a temp file while hashed, fsync'ed, renamed into the
content-addressed store, inspected (npz headers only) and recorded. The API runs on the embedded
defaults with no worker; its storage folder and the source file are on the same filesystem.

The API process's CPU use during the upload (and this client's) is reported to show which side is
the bottleneck, and so is the time from the last byte sent to the response (fsync, rename, inspection,
database row). A second reference (skip with --no-drain) streams the same body to a route of
bench/bare_app.py that only drains it: the ceiling of uvicorn + h11 + this client on this machine. RSS of the uvicorn process (plus any children) is sampled every 20 ms in a thread; the baseline is
taken after a small warm-up upload (so lazy imports on the upload path are already loaded), and the
growth before that warm-up is reported too. The baseline for throughput is ``shutil.copyfile`` of the
same file into the storage folder followed by ``fsync`` (the upload path fsyncs too); the copy time
without fsync is also reported. The page cache cannot be dropped here: the file is read once first,
so both the copy and the upload read it from a warm cache.

In the same run (skip with --no-s3) the upload goes again to a fresh service whose store is S3
(``MODELPRESS_STORAGE_URL=s3://…`` on a SeaweedFS ``weed mini`` of its own, from the dev extra): the
body is staged and inspected as before, then multipart-uploaded part by part, so its throughput and
API RSS growth are reported against the local store's (the S3 server's own memory is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    OUT,
    RssSampler,
    Timer,
    emit,
    fmt_ratio,
    goal_met,
    log,
    machine_info,
    median,
    new_run_id,
    ratio,
    service,
)

GOAL_RSS_MIB = 64.0
GOAL_THROUGHPUT_RATIO = 0.5
ROW_FLOATS = 1024  # one sample = 4 KiB
CHUNK = MIB


def make_npz(path: Path, size_mib: int, seed: int = 0) -> tuple[Path, int]:
    """A valid ``.npz`` of about ``size_mib`` MiB, written chunk by chunk (ZIP64, stored); returns (path, samples)."""
    import numpy as np

    rows = max(1, size_mib * MIB // (4 * ROW_FLOATS))
    if path.exists():
        return path, rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, 16 * MIB // (4 * ROW_FLOATS))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                     "shape": (rows, ROW_FLOATS)})
            for start in range(0, rows, rows_per_chunk):
                n = min(rows_per_chunk, rows - start)
                fh.write(rng.random((n, ROW_FLOATS), dtype=np.float32).tobytes())
        with zf.open("labels.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, rng.integers(0, 10, size=rows, dtype=np.int64))
    tmp.replace(path)
    return path, rows


def read_through(path: Path) -> float:
    """Read the whole file once (warms the page cache); returns seconds."""
    with Timer() as t, open(path, "rb") as fh:
        while fh.read(8 * MIB):
            pass
    return t.elapsed


def copy_baseline(src: Path, dest_dir: Path) -> tuple[float, float]:
    """``shutil.copyfile`` into ``dest_dir``: (seconds without fsync, seconds including fsync)."""
    dest = dest_dir / f"bench-copy-{os.getpid()}"
    try:
        t0 = time.perf_counter()
        shutil.copyfile(src, dest)
        t1 = time.perf_counter()
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t2 = time.perf_counter()
    finally:
        dest.unlink(missing_ok=True)
    return t1 - t0, t2 - t0


def _chunks(path: Path, done: list[float] | None = None) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk
    if done is not None:
        done.append(time.perf_counter())  # the last byte was handed to the socket


def _drain(src: Path, env: dict[str, str]) -> float:
    """Seconds to stream ``src`` to bench/bare_app.py's draining route (same uvicorn command line)."""
    import httpx

    from bench.api_latency import bare_server
    from bench.common import bench_home

    with bench_home("drain") as home, bare_server(home, env) as (url, _pid), \
            httpx.Client(base_url=url, timeout=None) as client:
        t0 = time.perf_counter()
        r = client.put("/v1/datasets", content=_chunks(src))
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        if r.json()["size_bytes"] != src.stat().st_size:
            raise RuntimeError(f"drain route saw {r.json()['size_bytes']} bytes")
    return elapsed


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A SeaweedFS ``weed mini`` under bench/out for this run: the MODELPRESS_/AWS_ variables that reach it."""
    from tests.storage.seaweed import weed_mini

    data = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=OUT))
    try:
        with weed_mini(data) as weed:
            yield {**weed.env(), "MODELPRESS_STORAGE_URL": f"s3://bench-{new_run_id()}/blobs"}  # one run's bucket
    finally:
        shutil.rmtree(data, ignore_errors=True)


def upload_once(src: Path, rows: int, small: Path, settle: float, drain: bool,
                s3_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One fresh embedded service (its store S3 when ``s3_env``): warm-up upload, then the big upload under the RSS sampler."""
    run_id = new_run_id()
    overrides = {"storage_url": s3_env["MODELPRESS_STORAGE_URL"]} if s3_env else {}
    saved = {k: os.environ.get(k) for k in (s3_env or {}) if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in (s3_env or {}).items() if k.startswith("AWS_")})  # service_env copies them
    try:
        with service("embedded", run_id, worker=False, home_base=OUT, **overrides) as svc:
            return _measure(svc, src, rows, small, settle, drain)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_in_bucket(env: dict[str, str], sha256: str, size: int) -> None:
    """The upload really went to the bucket (a run that only deduplicated would measure nothing)."""
    from storage.s3 import make_client

    client = make_client(env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                         secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket, _, prefix = env["MODELPRESS_STORAGE_URL"].removeprefix("s3://").partition("/")
    key = f"{prefix}/{sha256[:2]}/{sha256[2:4]}/{sha256}".lstrip("/")
    stored = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    if stored != size:
        raise RuntimeError(f"s3://{bucket}/{key} holds {stored} bytes, expected {size}")


def _measure(svc: Any, src: Path, rows: int, small: Path, settle: float, drain: bool) -> dict[str, Any]:
    import httpx

    assert svc.api is not None
    home = Path(svc.env["MODELPRESS_HOME"])
    # The copy baseline writes where the upload is staged: the local store's temp folder, or $HOME/tmp for S3.
    storage = home if "MODELPRESS_STORAGE_URL" in svc.env else home / "storage"
    with RssSampler(svc.api.pid) as sampler, httpx.Client(base_url=svc.url, timeout=None) as client:
        time.sleep(settle)
        idle = sampler.rss()
        r = client.put("/v1/datasets", params={"name": "warmup.npz", "format": "npz"}, content=_chunks(small))
        r.raise_for_status()
        time.sleep(settle)
        t_base = time.perf_counter()
        time.sleep(min(settle, 0.5))
        base = statistics.median([rss for t, rss in sampler.samples if t >= t_base] or [sampler.rss()])
        api_cpu0, client_cpu0 = sum(sampler.proc.cpu_times()[:2]), time.process_time()
        t0 = time.perf_counter()
        sent: list[float] = []
        r = client.put("/v1/datasets", params={"name": src.name, "format": "npz"}, content=_chunks(src, sent))
        elapsed = time.perf_counter() - t0
        api_cpu = sum(sampler.proc.cpu_times()[:2]) - api_cpu0
        client_cpu = time.process_time() - client_cpu0
        time.sleep(0.1)
        peak = sampler.peak(since=t0)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
    body = r.json()
    if body.get("num_samples") != rows:
        raise RuntimeError(f"upload recorded {body.get('num_samples')} samples, expected {rows}: {body}")
    if "MODELPRESS_STORAGE_URL" in svc.env:
        _check_in_bucket(svc.env, body["sha256"], src.stat().st_size)
    (storage / "tmp").mkdir(parents=True, exist_ok=True)
    copy_s, copy_fsync_s = copy_baseline(src, storage / "tmp")
    drain_s = _drain(src, svc.env) if drain else None
    return {"drain_s": drain_s, "upload_s": elapsed, "after_last_byte_s": elapsed - (sent[0] - t0) if sent else None, "copy_s": copy_s, "copy_fsync_s": copy_fsync_s, "rss_base_mib": base / MIB,
            "rss_idle_mib": idle / MIB, "rss_peak_mib": peak / MIB, "rss_growth_mib": (peak - base) / MIB,
            "rss_growth_from_idle_mib": (peak - idle) / MIB, "samples": len(sampler.samples),
            "api_cpu_pct": 100 * api_cpu / elapsed, "client_cpu_pct": 100 * client_cpu / elapsed,
            "status": r.status_code}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.upload_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="upload size in MiB (default 1024 = 1 GiB)")
    p.add_argument("--repeats", type=int, default=1, help="uploads (each on a fresh service) and copies (default 1)")
    p.add_argument("--no-drain", action="store_true", help="skip the bare uvicorn drain reference")
    p.add_argument("--no-s3", action="store_true", help="skip the same upload to an S3 store (SeaweedFS)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds to let the API settle before sampling (default 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    src, rows = make_npz(OUT / f"upload-{a.size_mib}mib.npz", a.size_mib)
    small, _ = make_npz(OUT / "upload-1mib.npz", 1, seed=1)
    size = src.stat().st_size
    log(f"{src.name}: {size / MIB:.1f} MiB, {rows} samples; cached read {size / MIB / read_through(src):.0f} MiB/s")
    runs = []
    for i in range(a.repeats):
        read_through(src)
        res = upload_once(src, rows, small, a.settle, not a.no_drain)
        drain_txt = f"bare drain {size / MIB / res['drain_s']:.0f} MiB/s, " if res["drain_s"] else ""
        log(f"repeat {i + 1}/{a.repeats}: upload {size / MIB / res['upload_s']:.0f} MiB/s, copy+fsync "
            f"{size / MIB / res['copy_fsync_s']:.0f} MiB/s, copy {size / MIB / res['copy_s']:.0f} MiB/s, {drain_txt}"
            f"response {res['after_last_byte_s']:.2f} s after the last byte, rss growth "
            f"{res['rss_growth_mib']:.1f} MiB ({res['samples']} samples), API cpu {res['api_cpu_pct']:.0f}%, "
            f"client cpu {res['client_cpu_pct']:.0f}%")
        runs.append(res)
    s3_runs = []
    if not a.no_s3:
        with s3_server() as s3_env:
            for i in range(a.repeats):
                read_through(src)
                # A bucket of its own each time: the same bytes already stored would be deduplicated, not sent.
                fresh = {**s3_env, "MODELPRESS_STORAGE_URL": f"s3://bench-{new_run_id()}/blobs"}
                res = upload_once(src, rows, small, a.settle, False, fresh)
                log(f"s3 repeat {i + 1}/{a.repeats}: upload {size / MIB / res['upload_s']:.0f} MiB/s, response "
                    f"{res['after_last_byte_s']:.2f} s after the last byte (the multipart upload), rss growth "
                    f"{res['rss_growth_mib']:.1f} MiB, API cpu {res['api_cpu_pct']:.0f}%")
                s3_runs.append(res)
    fig: dict[str, Any] = {"size_bytes": size}
    if not a.no_drain:
        fig["drain_s"] = median([r["drain_s"] for r in runs])
        fig["drain_mb_s"] = size / 1e6 / fig["drain_s"]
        fig["throughput_ratio_vs_drain"] = ratio(size / 1e6 / median([r["upload_s"] for r in runs]), fig["drain_mb_s"])
    for key in ("upload_s", "after_last_byte_s", "copy_s", "copy_fsync_s", "rss_base_mib", "rss_peak_mib", "api_cpu_pct", "client_cpu_pct"):
        fig[key] = median([r[key] for r in runs])
    fig["rss_growth_mib"] = max(r["rss_growth_mib"] for r in runs)
    fig["rss_growth_from_idle_mib"] = max(r["rss_growth_from_idle_mib"] for r in runs)
    fig["upload_mb_s"] = size / 1e6 / fig["upload_s"]
    fig["copy_fsync_mb_s"] = size / 1e6 / fig["copy_fsync_s"]
    fig["copy_mb_s"] = size / 1e6 / fig["copy_s"]
    fig["throughput_ratio"] = ratio(fig["upload_mb_s"], fig["copy_fsync_mb_s"])
    fig["throughput_ratio_vs_copy_no_fsync"] = ratio(fig["upload_mb_s"], fig["copy_mb_s"])
    if s3_runs:
        s3: dict[str, Any] = {key: median([r[key] for r in s3_runs])
                              for key in ("upload_s", "after_last_byte_s", "rss_base_mib", "rss_peak_mib", "api_cpu_pct")}
        s3["rss_growth_mib"] = max(r["rss_growth_mib"] for r in s3_runs)
        s3["upload_mb_s"] = size / 1e6 / s3["upload_s"]
        s3["throughput_ratio_vs_local"] = ratio(s3["upload_mb_s"], fig["upload_mb_s"])
        s3["goal_met"] = goal_met(s3["rss_growth_mib"], GOAL_RSS_MIB, higher_is_better=False)
        fig["s3"] = s3
    fig["goal_rss_growth_mib"] = GOAL_RSS_MIB
    fig["goal_throughput_ratio"] = GOAL_THROUGHPUT_RATIO
    fig["goal_met"] = goal_met(fig["rss_growth_mib"], GOAL_RSS_MIB, higher_is_better=False) and goal_met(
        fig["throughput_ratio"], GOAL_THROUGHPUT_RATIO)
    fig["params"] = {"size_mib": a.size_mib, "repeats": a.repeats, "chunk_bytes": CHUNK, "backend": "embedded",
                     "s3": "weed mini (SeaweedFS), same machine" if s3_runs else None}
    fig["machine"] = machine_info()
    rss_ok = "met" if fig["rss_growth_mib"] <= GOAL_RSS_MIB else "MISSED"
    summary = (
        f"{size / MIB:.0f} MiB chunked upload: peak API RSS growth {fig['rss_growth_mib']:.1f} MiB "
        f"(goal <= {GOAL_RSS_MIB:g}: {rss_ok}); {fig['upload_mb_s']:.0f} MB/s vs copyfile+fsync "
        f"{fig['copy_fsync_mb_s']:.0f} MB/s = {fmt_ratio(fig['throughput_ratio'], GOAL_THROUGHPUT_RATIO)} "
        f"(vs copyfile without fsync {fig['copy_mb_s']:.0f} MB/s: {fig['throughput_ratio_vs_copy_no_fsync']:.2f}x)"
    )
    if "drain_mb_s" in fig:
        summary += (f"; a bare uvicorn route draining the body: {fig['drain_mb_s']:.0f} MB/s "
                    f"(upload = {fig['throughput_ratio_vs_drain']:.2f}x of it)")
    if "s3" in fig:
        s3 = fig["s3"]
        summary += (f"; to S3 (SeaweedFS on this machine): {s3['upload_mb_s']:.0f} MB/s = "
                    f"{s3['throughput_ratio_vs_local']:.2f}x of the local store, peak API RSS growth "
                    f"{s3['rss_growth_mib']:.1f} MiB ({'met' if s3['goal_met'] else 'MISSED'})")
    emit("upload_stream", summary, fig)
    return fig


if __name__ == "__main__":
    main()
