"""Bursts against the live API (uvicorn subprocess, no worker) on both databases: no 5xx, jobs = 2xx answers,
quotas that hold, a fast 429 past the rate limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.api import builders
from tests.conftest import PG_ADMIN_DSN, RUN_ID, _sqlalchemy_url
from tests.e2e.harness import LiveService, live_service, service_env

KEY = "burst-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N = 60


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def home_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             redis_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A home and the environment of an API on SQLite (embedded) or on PostgreSQL + Redis (distributed)."""
    home = tmp_path_factory.mktemp(f"burst-{request.param}")
    if request.param == "embedded":
        yield home, service_env(home, RUN_ID, api_key=KEY)
        return
    name = f"mp_burst_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rpartition("/")[0]
    try:
        yield home, service_env(home, name, api_key=KEY, database_url=_sqlalchemy_url(f"{base}/{name}"),
                                broker_url=redis_url)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _serve(home_env: tuple[Path, dict[str, str]], tag: str, **extra: str) -> Iterator[LiveService]:
    """An API (no worker) of this stack with ``extra`` settings, in a home of its own (the database is shared
    on PostgreSQL: each test uses owners of its own)."""
    home, env = home_env
    sub = home / tag
    sub.mkdir()
    with live_service(sub, {**env, "MODELPRESS_HOME": str(sub),
                            **{f"MODELPRESS_{k.upper()}": v for k, v in extra.items()}}, worker=False) as svc:
        yield svc


@pytest.fixture(scope="module")
def plain(home_env: tuple[Path, dict[str, str]]) -> Iterator[LiveService]:
    """The API with its default limits (bursts of 120 submissions per key, 100 active jobs per owner)."""
    yield from _serve(home_env, "plain")


@pytest.fixture(scope="module")
def limited(home_env: tuple[Path, dict[str, str]]) -> Iterator[LiveService]:
    """The API with 5 active jobs and 1 MB stored per owner, and bursts of 20 submissions per key."""
    yield from _serve(home_env, "limited", quota_active_jobs="5", quota_stored_bytes="1000000",
                      submit_rate_burst="20", submit_rate_per_minute="1")


@pytest.fixture(scope="module")
def busy(home_env: tuple[Path, dict[str, str]]) -> Iterator[LiveService]:
    """The API handling one submission at a time, refusing at once the ones that find it busy."""
    yield from _serve(home_env, "busy", submit_concurrency="1", overload_wait_s="0")


def _key(svc: LiveService, owner: str, scope: str = "write") -> dict[str, str]:
    """A new per-owner key (looked up in the database on every request, as in production): its header."""
    r = httpx.post(f"{svc.url}/v1/keys", json={"owner": owner, "scope": scope}, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def _model(svc: LiveService, auth: dict[str, str]) -> str:
    r = httpx.put(f"{svc.url}/v1/models", params={"name": "m", "format": "onnx"},
                  content=builders.onnx_bytes(seed=7), headers=auth, timeout=30)
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


async def _burst(url: str, auth: dict[str, str], n: int,
                 make: object) -> list[tuple[int, dict[str, object], float, dict[str, str]]]:
    """``n`` requests at once (one connection each); (status, body, seconds, headers) per answer."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=auth, timeout=120, limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, dict[str, object], float, dict[str, str]]:
            await start.wait()
            t0 = time.perf_counter()
            r = await make(client, i)  # type: ignore[operator]
            body = r.json() if r.headers.get("content-type", "").endswith("json") else {}
            return r.status_code, body, time.perf_counter() - t0, dict(r.headers)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))


def _submit(model_id: str, **headers: str) -> object:
    async def make(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/jobs", json={"model": model_id, "steps": [{"type": "quantize"}]},
                                 headers={k.replace("_", "-"): v.format(i=i) for k, v in headers.items()})
    return make


def _jobs(svc: LiveService, auth: dict[str, str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    after = None
    while True:
        r = httpx.get(f"{svc.url}/v1/jobs", params={"limit": 100, **({"after": after} if after else {})},
                      headers=auth, timeout=30)
        page = r.json()
        out += page["data"]
        after = page["next_cursor"]
        if not after:
            return out


def _codes(answers: list[tuple[int, dict[str, object], float, dict[str, str]]]) -> dict[object, int]:
    """How many answers had each status (and, for problems, each code): {202: n, (429, "rate_limited"): m}."""
    out: dict[object, int] = {}
    for status, body, _, _ in answers:
        key: object = status if status < 400 else (status, body.get("code"))
        out[key] = out.get(key, 0) + 1
    return out


def test_a_submit_burst_has_no_5xx_and_creates_exactly_the_accepted_jobs(plain: LiveService) -> None:
    auth = _key(plain, "alice")
    model_id = _model(plain, auth)
    answers = asyncio.run(_burst(plain.url, auth, N, _submit(model_id)))
    assert _codes(answers) == {202: N}, plain.logs("api.log")  # under the burst of 120: every one accepted
    accepted = {a[1]["id"] for a in answers}
    assert len(accepted) == N and {j["id"] for j in _jobs(plain, auth)} == accepted


def test_a_burst_with_one_idempotency_key_makes_one_job(plain: LiveService) -> None:
    auth = _key(plain, "bob")
    model_id = _model(plain, auth)
    answers = asyncio.run(_burst(plain.url, auth, 40, _submit(model_id, Idempotency_Key="same")))
    assert _codes(answers) == {202: 1, 200: 39}, plain.logs("api.log")
    assert len({a[1]["id"] for a in answers}) == 1 and len(_jobs(plain, auth)) == 1
    # The first answer lost: the retry gets the same job, and another spec under the key is refused.
    again = httpx.post(f"{plain.url}/v1/jobs", json={"model": model_id, "steps": [{"type": "quantize"}]},
                       headers={**auth, "Idempotency-Key": "same"})
    assert again.status_code == 200 and again.json()["id"] == answers[0][1]["id"]


def test_quotas_and_the_rate_limit_hold_under_a_burst(limited: LiveService) -> None:
    auth = _key(limited, "carol")
    model_id = _model(limited, auth)
    t0 = time.perf_counter()
    answers = asyncio.run(_burst(limited.url, auth, 60, _submit(model_id)))
    wall = time.perf_counter() - t0
    # 20 tokens: 5 jobs fit the quota, 15 are over it; the other 40 never got past the rate limit.
    assert _codes(answers) == {202: 5, (429, "job_quota_exceeded"): 15, (429, "rate_limited"): 40}, \
        limited.logs("api.log")
    assert all(int(h["retry-after"]) >= 1 for status, body, _, h in answers if body.get("code") == "rate_limited")
    assert len(_jobs(limited, auth)) == 5 and wall < 30


def test_the_storage_quota_holds_under_concurrent_uploads(limited: LiveService) -> None:
    auth = _key(limited, "dave")
    models = [builders.onnx_bytes(in_features=200, out_features=200, seed=i) for i in range(40)]
    size = len(models[0])
    assert 150_000 < size < 170_000 and 6 * size < 1_000_000 < 7 * size

    async def put(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.put("/v1/models", params={"name": f"m{i}", "format": "onnx"}, content=models[i])

    answers = asyncio.run(_burst(limited.url, auth, len(models), put))
    assert _codes(answers) == {201: 6, (413, "storage_quota_exceeded"): 34}, limited.logs("api.log")
    listed = httpx.get(f"{limited.url}/v1/models", params={"limit": 100}, headers=auth).json()["data"]
    assert len(listed) == 6 and sum(m["size_bytes"] for m in listed) <= 1_000_000


def test_a_busy_server_answers_503_with_retry_after_and_records_nothing_for_it(busy: LiveService) -> None:
    auth = _key(busy, "erin")
    model_id = _model(busy, auth)
    answers = asyncio.run(_burst(busy.url, auth, 40, _submit(model_id)))
    codes = _codes(answers)
    assert set(codes) <= {202, (503, "overloaded")} and codes.get((503, "overloaded"), 0) > 0, codes
    assert all(h["retry-after"] == "1" and secs < 5 for status, _, secs, h in answers if status == 503)
    assert len(_jobs(busy, auth)) == codes.get(202, 0)
