"""Every operation in the OpenAPI document, called with another owner's key against one owner's resources.

Owner A (alice) has a model, a dataset, a job with events, an artifact and a report page. Owner B (bob)
calls every operation: where the path names one of A's resources the answer is a 404 indistinguishable
from the answer for a random id; lists, look-ups by hash and uploads of A's bytes show nothing of A's;
with B's read key every operation that is not a GET is a 403, whatever id it names. The walk reads the
operations from ``app.openapi()``, so a new route is walked as soon as it exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response

from models.db import session_scope
from models.ids import new_id
from models.tables import Artifact, Job, Model
from tests.api import builders
from tests.api.tenants import bearer, keyed, make_key

__all__ = ["keyed"]
SAFE = {"GET", "HEAD"}
# Path parameters that name an owned resource, and the prefix of their ids.
PARAMS = {"model_id": "mdl", "dataset_id": "ds", "job_id": "job", "artifact_id": "art", "key_id": "key"}
PARAM = re.compile(r"\{(\w+)\}")


@dataclass
class World:
    """Alice's resources and the keys of both owners."""

    ids: dict[str, str]
    model_sha: str
    dataset_sha: str
    model_bytes: bytes
    alice: str
    bob_write: str
    bob_read: str
    bob_admin: str


@pytest.fixture
def world(keyed: TestClient) -> Iterator[World]:
    alice_key_id, alice = make_key("alice", "write")
    _, bob_write = make_key("bob", "write")
    _, bob_read = make_key("bob", "read")
    _, bob_admin = make_key("bob", "admin")
    model_bytes = builders.onnx_bytes(seed=11)
    model = keyed.put("/v1/models", params={"name": "a", "format": "onnx"}, content=model_bytes,
                      headers=bearer(alice)).json()
    data = builders.npz_bytes({"x": np.ones((8, 4), np.float32)})
    dataset = keyed.put("/v1/datasets", params={"name": "a", "format": "npz"}, content=data,
                        headers=bearer(alice)).json()
    job = keyed.post("/v1/jobs", json={"model": model["id"], "data": {"eval": dataset["id"]},
                                       "steps": [{"type": "quantize"}]}, headers=bearer(alice))
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    builders.add_events(job_id, 3)
    artifact_id = builders.insert_artifact(job_id, b"alice's optimized model", owner="alice")
    assert keyed.get(f"/v1/jobs/{job_id}/report.html", headers=bearer(alice)).status_code == 200
    ids = {"model_id": model["id"], "dataset_id": dataset["id"], "job_id": job_id, "artifact_id": artifact_id,
           "key_id": alice_key_id}
    yield World(ids, model["sha256"], dataset["sha256"], model_bytes, alice, bob_write, bob_read, bob_admin)


def operations(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every operation the OpenAPI document describes."""
    doc = client.app.openapi()  # type: ignore[attr-defined]
    return [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops
            if method in {"get", "put", "post", "patch", "delete", "head"}]


def _fill(path: str, ids: dict[str, str]) -> str:
    return PARAM.sub(lambda m: ids[m.group(1)], path)


def _random_ids() -> dict[str, str]:
    return {name: new_id(prefix) for name, prefix in PARAMS.items()}


def _normalized(r: Response, ids: dict[str, str]) -> tuple[int, Any, str]:
    """Status, headers and body of an answer with the ids it was asked about replaced by placeholders."""
    text = r.text
    for name, ident in ids.items():
        text = text.replace(ident, f"<{name}>")
    headers = sorted((k, v) for k, v in r.headers.items() if k not in ("date",))
    return r.status_code, headers, text


def _call(client: TestClient, method: str, path: str, key: str, **kw: Any) -> Response:
    return client.request(method, path, headers={**bearer(key), **kw.pop("headers", {})}, **kw)


def test_the_walk_covers_every_resource_kind(keyed: TestClient) -> None:
    ops = operations(keyed)
    named = {p for _, path in ops for p in PARAM.findall(path)}
    assert named <= set(PARAMS), f"a path parameter the walk does not know: {named - set(PARAMS)}"
    assert {"model_id", "dataset_id", "job_id", "artifact_id", "key_id"} <= named
    assert ("GET", "/v1/jobs/{job_id}/events/stream") in ops and ("GET", "/v1/jobs/{job_id}/report.html") in ops


def test_another_owners_resources_are_404_exactly_like_ids_that_do_not_exist(
    keyed: TestClient, world: World
) -> None:
    walked = 0
    for key in (world.bob_write, world.bob_admin):
        for method, template in operations(keyed):
            if not PARAM.search(template) or "{key_id}" in template:
                continue
            random = _random_ids()
            theirs = _call(keyed, method, _fill(template, world.ids), key)
            missing = _call(keyed, method, _fill(template, random), key)
            assert theirs.status_code == 404, (method, template, theirs.status_code, theirs.text)
            assert theirs.headers["content-type"] == "application/problem+json"
            assert _normalized(theirs, world.ids) == _normalized(missing, random), (method, template)
            walked += 1
    assert walked >= 2 * 9
    _alice_is_untouched(keyed, world)


def test_lists_hash_look_ups_and_uploads_show_nothing_of_another_owner(keyed: TestClient, world: World) -> None:
    alice_ids = set(world.ids.values()) - {world.ids["key_id"]}
    queries = {"/v1/models": {"sha256": world.model_sha}, "/v1/datasets": {"sha256": world.dataset_sha}}
    for method, template in operations(keyed):
        if method != "GET" or PARAM.search(template):
            continue
        r = _call(keyed, method, template, world.bob_write, params=queries.get(template, {}))
        if template.startswith("/v1/keys"):
            assert r.status_code == 403 and r.json()["code"] == "insufficient_scope"
            continue
        assert r.status_code == 200, (template, r.text)
        assert not any(ident in r.text for ident in alice_ids), template
        if template in queries:
            assert r.json()["data"] == []
    # The dashboard (not in the OpenAPI document) lists nothing of alice's either.
    page = _call(keyed, "GET", "/", world.bob_write, headers={"Accept": "text/html"})
    assert page.status_code == 200 and world.ids["job_id"] not in page.text
    # Bob uploading alice's very bytes gets a record of his own (uploads dedup per owner only).
    mine = _call(keyed, "PUT", "/v1/models?format=onnx", world.bob_write, content=world.model_bytes)
    assert mine.status_code == 201 and mine.json()["id"] != world.ids["model_id"]
    # A job spec naming alice's model or dataset is refused exactly like one naming unknown ids.
    random = _random_ids()
    answers = []
    for ids in (world.ids, random):
        spec = {"model": ids["model_id"], "data": {"eval": ids["dataset_id"]}, "steps": [{"type": "quantize"}]}
        answers.append(_normalized(_call(keyed, "POST", "/v1/jobs", world.bob_write, json=spec),
                                   ids if ids is random else world.ids))
    assert answers[0] == answers[1] and answers[0][0] == 422
    _alice_is_untouched(keyed, world)


def test_a_read_key_is_refused_every_operation_that_is_not_a_get(keyed: TestClient, world: World) -> None:
    refused = 0
    for method, template in operations(keyed):
        if method in SAFE:
            continue
        random = _random_ids()
        answers = []
        for ids in (world.ids, random):
            r = _call(keyed, method, _fill(template, ids), world.bob_read, json={})
            assert r.status_code == 403, (method, template, r.status_code, r.text)
            assert r.json()["code"] == "insufficient_scope"
            answers.append(_normalized(r, ids))
        assert answers[0] == answers[1]
        refused += 1
    assert refused >= 7  # uploads (4), submit, cancel, keys (2)
    # Reads with it behave like a write key's: another owner's ids are 404.
    r = _call(keyed, "GET", f"/v1/jobs/{world.ids['job_id']}", world.bob_read)
    assert r.status_code == 404
    _alice_is_untouched(keyed, world)


def _alice_is_untouched(client: TestClient, world: World) -> None:
    with session_scope() as s:
        job = s.get(Job, world.ids["job_id"])
        assert job is not None and job.status == "queued" and not job.cancel_requested
        assert s.get(Model, world.ids["model_id"]) is not None and s.get(Artifact, world.ids["artifact_id"])
        assert s.query(Job).filter(Job.owner == "bob").count() == 0
    body = _call(client, "GET", f"/v1/artifacts/{world.ids['artifact_id']}/content", world.alice)
    assert body.status_code == 200 and body.content == b"alice's optimized model"
