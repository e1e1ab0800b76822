"""Baselines served like the real API: a job route returning a constant (bench.api_latency) and an
upload route that drains the body (bench.upload_stream).

Served by the same ``python -m uvicorn ... --log-level warning`` command line as the real API
(tests/e2e/harness.py), so the ratio measures what the service adds per request (settings,
middleware, the database read, the response model), not uvicorn or FastAPI themselves.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

app = FastAPI()

CONSTANT = {"id": "job_constant", "status": "queued"}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Process up (what the launcher polls)."""
    return {"status": "ok"}


@app.get("/v1/jobs/{job_id}")
def get_job(job_id: str) -> dict[str, str]:
    """Same path shape as the real route, same sync-def dispatch (threadpool), constant body."""
    return CONSTANT


@app.put("/v1/datasets")
async def drain(request: Request) -> dict[str, int]:
    """Read a streamed body and throw it away (bench.upload_stream's ceiling for uvicorn + h11 alone)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return {"size_bytes": size}
