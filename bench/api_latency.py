"""GET /v1/jobs/{id} under concurrent clients, as a ratio to a bare FastAPI endpoint (bench/bare_app.py).

The real service runs distributed (PostgreSQL + Redis) with no worker: one quantize job is created
through the API and stays queued, so every request reads the same row. The baseline is
``bench.bare_app:app`` started with the same uvicorn command line. Both are driven by the same load
generator: ``--procs`` client processes holding ``--concurrency`` keep-alive connections in total,
each connection a closed loop (send, read the whole response, repeat). The default client speaks
HTTP/1.1 on raw asyncio streams so that the generator is cheap next to the server; ``--client httpx``
uses httpx.AsyncClient instead. Rounds alternate baseline and service; figures are the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing as mp
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    bench_home,
    emit,
    fmt_ratio,
    goal_met,
    log,
    machine_info,
    median,
    new_run_id,
    percentile,
    ratio,
    service,
)

GOAL_RPS_RATIO = 0.5


# --- load generator (runs in client processes) -----------------------------------------------------


async def _raw_connection(host: str, port: int, path: str, measure_at: float, end_at: float,
                          lat: list[float], counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n".encode()
    try:
        while (t0 := time.monotonic()) < end_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = -1
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length < 0:
                raise RuntimeError("response without Content-Length: " + head.decode(errors="replace"))
            await reader.readexactly(length)
            t1 = time.monotonic()
            if t0 >= measure_at:
                lat.append(t1 - t0)
                counts[0 if head[9:12] == b"200" else 1] += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _httpx_connection(client: Any, url: str, measure_at: float, end_at: float,
                            lat: list[float], counts: list[int]) -> None:
    while (t0 := time.monotonic()) < end_at:
        r = await client.get(url)
        t1 = time.monotonic()
        if t0 >= measure_at:
            lat.append(t1 - t0)
            counts[0 if r.status_code == 200 else 1] += 1


async def _drive(kind: str, url: str, conns: int, measure_at: float, end_at: float) -> tuple[list[float], list[int]]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lat: list[float] = []
    counts = [0, 0]
    if kind == "raw":
        assert parts.hostname is not None and parts.port is not None
        await asyncio.gather(*(
            _raw_connection(parts.hostname, parts.port, parts.path, measure_at, end_at, lat, counts)
            for _ in range(conns)
        ))
    else:
        import httpx

        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            await asyncio.gather(*(_httpx_connection(client, url, measure_at, end_at, lat, counts)
                                   for _ in range(conns)))
    return lat, counts


def _client_process(args: tuple[str, str, int, float, float]) -> tuple[list[float], list[int], float]:
    kind, url, conns, measure_at, end_at = args
    lat, counts = asyncio.run(_drive(kind, url, conns, measure_at, end_at))
    return lat, counts, time.process_time()


def load(pool: Any, url: str, *, kind: str, procs: int, concurrency: int, warmup: float, duration: float,
         server_pid: int) -> dict[str, Any]:
    """Drive ``url`` with ``concurrency`` closed-loop connections over ``procs`` processes."""
    import psutil

    split = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start = time.monotonic() + 0.5  # let every process connect before the clock starts
    measure_at, end_at = start + warmup, start + warmup + duration
    server = psutil.Process(server_pid)
    pending = pool.map_async(_client_process, [(kind, url, n, measure_at, end_at) for n in split if n])
    time.sleep(max(0.0, measure_at - time.monotonic()))
    cpu0 = sum(server.cpu_times()[:2])
    time.sleep(max(0.0, end_at - time.monotonic()))
    server_cpu = sum(server.cpu_times()[:2]) - cpu0
    results = pending.get()
    lat = [x for r in results for x in r[0]]
    ok = sum(r[1][0] for r in results)
    errors = sum(r[1][1] for r in results)
    return {
        "rps": ok / duration,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "requests": ok,
        "errors": errors,
        "server_cpu_pct": 100.0 * server_cpu / duration,
    }


# --- targets ---------------------------------------------------------------------------------------


def _tiny_onnx() -> bytes:
    """A 2-layer MLP (64 -> 32 -> 10) as ONNX bytes: enough for a valid quantize job."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], [w1, w2],
    )
    buf = io.BytesIO()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), buf)
    return buf.getvalue()


def create_job(base_url: str) -> str:
    """Upload a tiny model, submit a dynamic quantize job, return its id (it stays queued: no worker)."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=30) as client:
        r = client.put("/v1/models", params={"name": "tiny.onnx", "format": "onnx"}, content=_tiny_onnx())
        r.raise_for_status()
        r = client.post("/v1/jobs", json={"model": r.json()["id"], "steps": [{"type": "quantize", "mode": "dynamic"}]})
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text[:500]}")
        job_id: str = r.json()["id"]
        r = client.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        log(f"job {job_id}: status {r.json()['status']}, response {len(r.content)} bytes")
        return job_id


@contextlib.contextmanager
def bare_server(home: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``bench.bare_app:app`` under the harness's uvicorn command line; yields (url, pid)."""
    import httpx

    from tests.e2e.harness import free_port

    port = free_port()
    with open(home / "bare.log", "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("bare app exited:\n" + (home / "bare.log").read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("bare app did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.api_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32, help="concurrent connections in total (default 32)")
    p.add_argument("--procs", type=int, default=2, help="client processes sharing them (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per target and round (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating baseline/service rounds (default 3)")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator (default raw)")
    p.add_argument("--read-cache-s", default="0.25",
                   help="the API's job read micro-cache TTL (MODELPRESS_JOB_READ_CACHE_S; 0 = every GET queries)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    run_id = new_run_id()
    kw = {"kind": a.client, "procs": a.procs, "concurrency": a.concurrency, "warmup": a.warmup,
          "duration": a.duration}
    rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "service": []}
    ctx = mp.get_context("spawn")
    with service("distributed", run_id, worker=False, job_read_cache_s=a.read_cache_s) as svc, bench_home(run_id) as bare_home, \
            bare_server(bare_home, svc.env) as (bare_url, bare_pid), ctx.Pool(a.procs) as pool:
        job_id = create_job(svc.url)
        assert svc.api is not None
        targets = {"bare": (f"{bare_url}/v1/jobs/{job_id}", bare_pid),
                   "service": (f"{svc.url}/v1/jobs/{job_id}", svc.api.pid)}
        for i in range(a.rounds):
            for name, (url, pid) in targets.items():
                res = load(pool, url, server_pid=pid, **kw)
                log(f"round {i + 1}/{a.rounds} {name}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.2f} ms, "
                    f"p99 {res['p99_ms']:.2f} ms, errors {res['errors']}, server cpu {res['server_cpu_pct']:.0f}%")
                rounds[name].append(res)
    fig: dict[str, Any] = {}
    for name, results in rounds.items():
        for key in ("rps", "p50_ms", "p99_ms", "server_cpu_pct"):
            fig[f"{name}_{key}"] = median([r[key] for r in results])
        fig[f"{name}_errors"] = sum(r["errors"] for r in results)
    fig["rps_ratio"] = ratio(fig["service_rps"], fig["bare_rps"])
    fig["p99_ratio"] = ratio(fig["service_p99_ms"], fig["bare_p99_ms"])
    fig["p50_ratio"] = ratio(fig["service_p50_ms"], fig["bare_p50_ms"])
    fig["goal_rps_ratio"] = GOAL_RPS_RATIO
    fig["goal_met"] = goal_met(fig["rps_ratio"], GOAL_RPS_RATIO)
    fig["params"] = {**kw, "rounds": a.rounds, "backend": "postgresql+redis", "read_cache_s": a.read_cache_s}
    fig["machine"] = machine_info()
    summary = (
        f"GET /v1/jobs/{{id}} at {a.concurrency} conns (read cache {a.read_cache_s} s): service {fig['service_rps']:.0f} req/s "
        f"(p50 {fig['service_p50_ms']:.1f} ms, p99 {fig['service_p99_ms']:.1f} ms) vs bare "
        f"{fig['bare_rps']:.0f} req/s (p50 {fig['bare_p50_ms']:.1f} ms, p99 {fig['bare_p99_ms']:.1f} ms); "
        f"rps ratio {fmt_ratio(fig['rps_ratio'], GOAL_RPS_RATIO)}, p99 ratio {fig['p99_ratio']:.2f}x"
    )
    emit("api_latency", summary, fig)
    return fig


if __name__ == "__main__":
    main()
